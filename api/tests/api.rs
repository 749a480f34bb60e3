//! The api through a real tonic client over TCP, against a real redis-server (`TICKFLEET_TEST_REDIS_URL`;
//! `scripts/test.sh` starts one). Ticks are written with `RedisStore::write_batch`, the call the worker
//! makes, under a key prefix of each test's own.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use tickfleet_api::ApiMetrics;
use tickfleet_proto::v1::tick_service_client::TickServiceClient;
use tickfleet_proto::v1::{
    self, BatchGetLatestRequest, GetCandlesRequest, GetLatestRequest, GetMovingAverageRequest,
    ListAssetsRequest, ListTicksRequest, StreamCandlesRequest, StreamTicksRequest,
    get_moving_average_request::Over, stream_candles_response, stream_ticks_response,
};
use tickfleet_service::{CancellationToken, Health};
use tickfleet_store::{RedisStore, Retention, Tick, TickStore};
use tonic::transport::Channel;
use tonic::{Code, Request};

const T0: i64 = 1_700_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;

fn redis_url() -> String {
    std::env::var("TICKFLEET_TEST_REDIS_URL").expect(
        "TICKFLEET_TEST_REDIS_URL is not set: run scripts/test.sh, which starts redis-server and sets it",
    )
}

fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "api-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn store(prefix: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::open(&redis_url(), prefix, Retention::default()).unwrap())
}

/// An api server on a free loopback port over Redis keys under `prefix`.
struct Server {
    addr: std::net::SocketAddr,
    client: TickServiceClient<Channel>,
    channel: Channel,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    registry: prometheus::Registry,
}

impl Server {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, tickfleet_api::Options::default()).await
    }

    async fn start_with(prefix: &str, options: tickfleet_api::Options) -> Self {
        Self::start_over(store(prefix), options).await
    }

    /// An api over `store`.
    async fn start_over(store: Arc<RedisStore>, options: tickfleet_api::Options) -> Self {
        let stop = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let running = tickfleet_api::start(
            store,
            "127.0.0.1:0".parse().unwrap(),
            ApiMetrics::new(&registry).unwrap(),
            Health::new(),
            stop.clone(),
            options,
        )
        .await
        .unwrap();
        let channel = Channel::from_shared(format!("http://{}", running.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Server {
            addr: running.addr,
            client: TickServiceClient::new(channel.clone()),
            channel,
            stop,
            task: running.task,
            registry,
        }
    }

    fn channel_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::metric(&self.registry, name, labels)
    }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn tick(asset: &str, t: i64, seq: u64, price: &str, size: Option<&str>) -> Tick {
    Tick {
        asset_id: asset.into(),
        price: d(price),
        size: size.map(d),
        event_time_ns: t,
        seq,
        source: "api-test".into(),
    }
}

fn wire(t: &Tick) -> v1::Tick {
    t.into()
}

#[tokio::test]
async fn list_ticks_pages_across_pages_with_opaque_tokens() {
    let prefix = unique_prefix();
    let ticks: Vec<Tick> = (1..=25)
        .map(|i| {
            tick(
                "BTC",
                T0 + i * 1_000,
                i as u64,
                &format!("100.{i:02}"),
                None,
            )
        })
        .collect();
    store(&prefix).write_batch(&ticks).await.unwrap();
    let mut api = Server::start(&prefix).await;

    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = api
            .client
            .list_ticks(ListTicksRequest {
                asset_id: "BTC".into(),
                limit: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.ticks.len() <= 10);
        got.extend(page.ticks);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(
            !page.next_page_token.contains(&T0.to_string()),
            "tokens are opaque: {}",
            page.next_page_token
        );
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(got, ticks.iter().map(wire).collect::<Vec<_>>());

    // A bounded range pages too, and stays inside its bounds.
    let page = api
        .client
        .list_ticks(ListTicksRequest {
            asset_id: "BTC".into(),
            from_ns: Some(T0 + 5_000),
            to_ns: Some(T0 + 8_000),
            limit: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.ticks, vec![wire(&ticks[4]), wire(&ticks[5])]);
    let rest = api
        .client
        .list_ticks(ListTicksRequest {
            asset_id: "BTC".into(),
            from_ns: Some(T0 + 5_000),
            to_ns: Some(T0 + 8_000),
            limit: 2,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.ticks, vec![wire(&ticks[6])]);
    assert!(rest.next_page_token.is_empty());
    assert_eq!(
        api.metric(
            "tickfleet_api_requests_total",
            &[("method", "ListTicks"), ("code", "OK")]
        ),
        5.0
    );
}

#[tokio::test]
async fn candles_stay_exact_after_a_duplicated_batch() {
    let prefix = unique_prefix();
    let writer = store(&prefix);
    let first = vec![
        tick("ETH", T0 + 100, 1, "100", Some("1")),
        tick("ETH", T0 + 200, 2, "105.5", Some("2")),
        tick("ETH", T0 + 300, 3, "95.25", None),
    ];
    let second = vec![
        tick("ETH", T0 + 400, 4, "101", Some("0.5")),
        tick("ETH", T0 + SEC + 1, 5, "200", Some("3")),
        tick("ETH", T0 + 3 * SEC, 6, "7", None),
    ];
    writer.write_batch(&first).await.unwrap();
    writer.write_batch(&second).await.unwrap();
    // The worker sees the first batch again (a Kafka redelivery), and then both at once.
    let s = writer.write_batch(&first).await.unwrap();
    assert_eq!(s.inserted, 0);
    writer
        .write_batch(&[first.clone(), second.clone()].concat())
        .await
        .unwrap();

    let mut api = Server::start(&prefix).await;
    let candles = api
        .client
        .get_candles(GetCandlesRequest {
            asset_id: "ETH".into(),
            interval: "1s".into(),
            from_ns: None,
            to_ns: None,
        })
        .await
        .unwrap()
        .into_inner()
        .candles;
    let summary: Vec<_> = candles
        .iter()
        .map(|c| {
            (
                c.start_ns,
                c.end_ns,
                c.open.as_str(),
                c.high.as_str(),
                c.low.as_str(),
                c.close.as_str(),
                c.volume.as_str(),
                c.tick_count,
            )
        })
        .collect();
    // T0 is a whole second; the 2 s bucket has no ticks and so no candle.
    assert_eq!(
        summary,
        vec![
            (T0, T0 + SEC, "100", "105.5", "95.25", "101", "3.5", 4),
            (T0 + SEC, T0 + 2 * SEC, "200", "200", "200", "200", "3", 1),
            (T0 + 3 * SEC, T0 + 4 * SEC, "7", "7", "7", "7", "0", 1),
        ]
    );
    // A range starting inside a bucket covers the whole bucket; one minute holds everything.
    let minute = api
        .client
        .get_candles(GetCandlesRequest {
            asset_id: "ETH".into(),
            interval: "1m".into(),
            from_ns: Some(T0 + 250),
            to_ns: Some(T0 + 10 * SEC),
        })
        .await
        .unwrap()
        .into_inner()
        .candles;
    assert_eq!(minute.len(), 1);
    assert_eq!(
        (
            minute[0].open.as_str(),
            minute[0].close.as_str(),
            minute[0].volume.as_str(),
            minute[0].tick_count
        ),
        ("100", "7", "6.5", 6)
    );
}

#[tokio::test]
async fn moving_average_and_vwap_are_exact() {
    let prefix = unique_prefix();
    let writer = store(&prefix);
    let mut ticks = vec![tick("SOL", T0, 1, "5000", None)]; // older than the last 5: not averaged
    for (i, p) in ["100", "101", "99", "102", "98"].iter().enumerate() {
        ticks.push(tick(
            "SOL",
            T0 + (i as i64 + 1) * SEC,
            i as u64 + 2,
            p,
            None,
        ));
    }
    writer.write_batch(&ticks).await.unwrap();
    let mut api = Server::start(&prefix).await;
    let ma = api
        .client
        .get_moving_average(GetMovingAverageRequest {
            asset_id: "SOL".into(),
            over: Some(Over::Points(5)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ma.sma.as_str(), ma.count, ma.vwap), ("100", 5, None));
    assert_eq!((ma.from_ns, ma.to_ns), (T0 + SEC, T0 + 5 * SEC));
    // A window of 2 s back from the newest tick: (T0+3s, T0+5s] = 102, 98.
    let ma = api
        .client
        .get_moving_average(GetMovingAverageRequest {
            asset_id: "SOL".into(),
            over: Some(Over::Window("2s".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ma.sma.as_str(), ma.count), ("100", 2));

    // VWAP over the ticks with a size: (10·1 + 20·3) / 4 = 17.5; SMA over all three.
    writer
        .write_batch(&[
            tick("ADA", T0, 1, "10", Some("1")),
            tick("ADA", T0 + 1, 2, "20", Some("3")),
            tick("ADA", T0 + 2, 3, "1000", None),
        ])
        .await
        .unwrap();
    let ma = api
        .client
        .get_moving_average(GetMovingAverageRequest {
            asset_id: "ADA".into(),
            over: Some(Over::Points(3)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ma.vwap.as_deref(), Some("17.5"));
    assert_eq!(ma.sma, "343.33333333");
}

#[tokio::test]
async fn latest_batch_latest_and_assets() {
    let prefix = unique_prefix();
    let writer = store(&prefix);
    let a = tick("A", T0 + 2, 2, "1.50", Some("0"));
    let b = tick("B", T0, 1, "64250.10", None);
    writer
        .write_batch(&[tick("A", T0 + 1, 1, "1.40", None), a.clone(), b.clone()])
        .await
        .unwrap();
    let mut api = Server::start(&prefix).await;
    let latest = api
        .client
        .get_latest(GetLatestRequest {
            asset_id: "A".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.tick, Some(wire(&a)));
    let batch = api
        .client
        .batch_get_latest(BatchGetLatestRequest {
            asset_ids: vec!["B".into(), "nope".into(), "A".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.ticks, vec![wire(&b), wire(&a)]);
    assert_eq!(batch.missing, vec!["nope".to_string()]);
    assert_eq!(
        batch.ticks[0].price, "64250.10",
        "prices keep their exact text"
    );
    let assets = api
        .client
        .list_assets(ListAssetsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assets.asset_ids, vec!["A".to_string(), "B".to_string()]);
}

/// Every validation error the api answers, with its code and a message that names the problem.
#[tokio::test]
async fn bad_requests_get_the_right_code_and_say_what_is_wrong() {
    let prefix = unique_prefix();
    // Two ticks 20 s apart: 1 ms candles over them would be 20000, more than one answer holds.
    store(&prefix)
        .write_batch(&[
            tick("A", T0, 1, "1", None),
            tick("A", T0 + 20 * SEC, 9, "1", None),
        ])
        .await
        .unwrap();
    let api = Server::start(&prefix).await;
    let c = || api.client.clone();
    let list = |f: fn(&mut ListTicksRequest)| {
        let mut r = ListTicksRequest {
            asset_id: "A".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let candles = |interval: &str, from: Option<i64>, to: Option<i64>| GetCandlesRequest {
        asset_id: "A".into(),
        interval: interval.into(),
        from_ns: from,
        to_ns: to,
    };
    let ma = |over: Option<Over>| GetMovingAverageRequest {
        asset_id: "A".into(),
        over,
    };
    let cases: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = vec![
        (
            "latest of an unknown asset",
            c().get_latest(GetLatestRequest {
                asset_id: "nope".into(),
            })
            .await
            .map(drop),
            Code::NotFound,
            "\"nope\" has no ticks",
        ),
        (
            "latest without an asset",
            c().get_latest(GetLatestRequest {
                asset_id: String::new(),
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            "asset_id is required",
        ),
        (
            "an over-long asset id",
            c().get_latest(GetLatestRequest {
                asset_id: "x".repeat(300),
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            "the limit is 256",
        ),
        (
            "batch latest of nothing",
            c().batch_get_latest(BatchGetLatestRequest { asset_ids: vec![] })
                .await
                .map(drop),
            Code::InvalidArgument,
            "at least one asset id",
        ),
        (
            "batch latest of too many",
            c().batch_get_latest(BatchGetLatestRequest {
                asset_ids: vec!["A".into(); 1001],
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            "the limit is 1000",
        ),
        (
            "ticks of an unknown asset",
            c().list_ticks(ListTicksRequest {
                asset_id: "nope".into(),
                ..Default::default()
            })
            .await
            .map(drop),
            Code::NotFound,
            "has no ticks",
        ),
        (
            "an inverted range",
            c().list_ticks(list(|r| {
                r.from_ns = Some(T0);
                r.to_ns = Some(T0 - 1);
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
            "must be greater than from_ns",
        ),
        (
            "an empty range",
            c().list_ticks(list(|r| {
                r.from_ns = Some(T0);
                r.to_ns = Some(T0);
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
            "must be greater than from_ns",
        ),
        (
            "a negative time",
            c().list_ticks(list(|r| r.from_ns = Some(-1)))
                .await
                .map(drop),
            Code::InvalidArgument,
            "cannot be negative",
        ),
        (
            "a page larger than the cap",
            c().list_ticks(list(|r| r.limit = 10_001)).await.map(drop),
            Code::InvalidArgument,
            "the most ticks one page holds is 10000",
        ),
        (
            "a page token that is not ours",
            c().list_ticks(list(|r| r.page_token = "garbage!".into()))
                .await
                .map(drop),
            Code::InvalidArgument,
            "page_token is not one this api issued",
        ),
        (
            "candles of an unknown asset",
            c().get_candles(GetCandlesRequest {
                asset_id: "nope".into(),
                interval: "1m".into(),
                ..Default::default()
            })
            .await
            .map(drop),
            Code::NotFound,
            "has no ticks",
        ),
        (
            "candles without an interval",
            c().get_candles(candles("", None, None)).await.map(drop),
            Code::InvalidArgument,
            "interval \"\" is not a whole number",
        ),
        (
            "a zero interval",
            c().get_candles(candles("0s", None, None)).await.map(drop),
            Code::InvalidArgument,
            "more than 0",
        ),
        (
            "an interval beyond a year",
            c().get_candles(candles("367d", None, None)).await.map(drop),
            Code::InvalidArgument,
            "at most 366d",
        ),
        (
            "an interval in an unknown unit",
            c().get_candles(candles("5y", None, None)).await.map(drop),
            Code::InvalidArgument,
            "followed by ms, s, m, h or d",
        ),
        (
            "candles over an inverted range",
            c().get_candles(candles("1s", Some(T0 + SEC), Some(T0)))
                .await
                .map(drop),
            Code::InvalidArgument,
            "must be greater than from_ns",
        ),
        (
            "too many candles",
            c().get_candles(candles("1ms", Some(T0), Some(T0 + 30 * SEC)))
                .await
                .map(drop),
            Code::InvalidArgument,
            "more than 10000 intervals",
        ),
        (
            "an average over nothing",
            c().get_moving_average(ma(None)).await.map(drop),
            Code::InvalidArgument,
            "set points",
        ),
        (
            "an average of 0 points",
            c().get_moving_average(ma(Some(Over::Points(0))))
                .await
                .map(drop),
            Code::InvalidArgument,
            "points is 0",
        ),
        (
            "an average of too many points",
            c().get_moving_average(ma(Some(Over::Points(10_001))))
                .await
                .map(drop),
            Code::InvalidArgument,
            "1..=10000",
        ),
        (
            "an average over a bad window",
            c().get_moving_average(ma(Some(Over::Window("soon".into()))))
                .await
                .map(drop),
            Code::InvalidArgument,
            "window: interval \"soon\"",
        ),
        (
            "an average of an unknown asset",
            c().get_moving_average(GetMovingAverageRequest {
                asset_id: "nope".into(),
                over: Some(Over::Points(5)),
            })
            .await
            .map(drop),
            Code::NotFound,
            "has no ticks",
        ),
        (
            "a stream with an empty asset id",
            c().stream_ticks(StreamTicksRequest {
                asset_ids: vec![String::new()],
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            "asset_ids is required",
        ),
        (
            "live candles with a bad interval",
            c().stream_candles(StreamCandlesRequest {
                asset_ids: vec![],
                interval: "1w".into(),
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            "interval \"1w\"",
        ),
    ];
    for (what, result, code, message) in cases {
        let status = result.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_eq!(
            status
                .metadata()
                .get(tickfleet_api::validate::FIELD_KEY)
                .is_some(),
            code == Code::InvalidArgument,
            "{what}: the tickfleet-field trailer names the field of every INVALID_ARGUMENT: {status:?}"
        );
        assert!(
            status.message().contains(message),
            "{what}: message {:?} should contain {message:?}",
            status.message()
        );
    }

    // A page token of one query is refused by another.
    let mut client = c();
    store(&prefix)
        .write_batch(&[tick("A", T0 + 1, 2, "1", None), tick("B", T0, 1, "1", None)])
        .await
        .unwrap();
    let token = client
        .list_ticks(list(|r| r.limit = 1))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let status = client
        .list_ticks(ListTicksRequest {
            asset_id: "B".into(),
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("belongs to another query"),
        "{status:?}"
    );
    // The field an INVALID_ARGUMENT is about travels in the tickfleet-field trailer.
    let field = |s: &tonic::Status| {
        s.metadata()
            .get(tickfleet_api::validate::FIELD_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(field(&status).as_deref(), Some("page_token"));
    let status = client
        .get_latest(GetLatestRequest {
            asset_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field(&status).as_deref(), Some("asset_id"));
    let status = client
        .get_latest(GetLatestRequest {
            asset_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field(&status), None, "NOT_FOUND names no field");
}

/// A client's deadline ends a call the store cannot answer: a redis-server of this test's own is
/// stopped (SIGSTOP: connected, silent), the store timeout is a minute, and a call with a 300 ms
/// deadline still ends — with a deadline error — long before the store could have answered. (It once
/// used CLIENT PAUSE on the shared server, a pause every other test felt, and a 1.5 s pause that a
/// loaded machine could outlast before the call was even sent.)
///
/// The api answers DEADLINE_EXCEEDED a little before the deadline; tonic's own timer for the
/// `grpc-timeout` header, started when the request arrived, answers CANCELLED "Timeout expired" when
/// the handler starts late on a loaded machine. Either is the deadline honoured; what the test rules
/// out is the call waiting for the store.
#[tokio::test]
async fn deadlines_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let redis = tickfleet_e2e::RedisServer::start(dir.path());
    let prefix = unique_prefix();
    let store = Arc::new(RedisStore::open(&redis.url(), &prefix, Retention::default()).unwrap());
    store
        .write_batch(&[tick("A", T0, 1, "1", None)])
        .await
        .unwrap();
    let options = tickfleet_api::Options {
        store_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut api = Server::start_over(store, options).await;
    // A first call, so the api's connection to Redis is up before Redis stops.
    api.client
        .get_latest(GetLatestRequest {
            asset_id: "A".into(),
        })
        .await
        .unwrap();
    redis.freeze();
    let mut req = Request::new(GetLatestRequest {
        asset_id: "A".into(),
    });
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), api.client.get_latest(req))
        .await
        .expect("the call ends at its deadline, not when the store answers")
        .unwrap_err();
    let elapsed = started.elapsed();
    let by_the_api =
        status.code() == Code::DeadlineExceeded && status.message().contains("deadline");
    let by_tonic = status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    assert!(by_the_api || by_tonic, "{status:?}");
    // Not a timing claim: the store was never going to answer within the minute.
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    // Once Redis answers again, so does the api.
    redis.thaw();
    let mut req = Request::new(GetLatestRequest {
        asset_id: "A".into(),
    });
    req.set_timeout(Duration::from_secs(10));
    api.client.get_latest(req).await.unwrap();
}

async fn next_tick(
    stream: &mut tonic::Streaming<v1::StreamTicksResponse>,
) -> stream_ticks_response::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a stream message within 10 s")
        .expect("stream ok")
        .expect("stream open")
        .event
        .expect("an event")
}

/// Two api replicas over one Redis both stream what a writer (the worker's store call) stores — each new
/// tick once, a redelivered batch not again — and end their streams cleanly on shutdown.
#[tokio::test]
async fn two_replicas_stream_every_new_tick_once_and_end_cleanly() {
    let prefix = unique_prefix();
    let mut replicas = [Server::start(&prefix).await, Server::start(&prefix).await];
    let mut all = replicas[0]
        .client
        .stream_ticks(StreamTicksRequest { asset_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut only_b = replicas[1]
        .client
        .stream_ticks(StreamTicksRequest {
            asset_ids: vec!["B".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let writer = store(&prefix);
    let a: Vec<Tick> = (1..=3)
        .map(|i| tick("A", T0 + i, i as u64, "1.1", None))
        .collect();
    let b: Vec<Tick> = (1..=4)
        .map(|i| tick("B", T0 + i, i as u64, "2.2", Some("1")))
        .collect();
    writer
        .write_batch(&[a.clone(), b[..2].to_vec()].concat())
        .await
        .unwrap();
    writer
        .write_batch(&[a.clone(), b[..2].to_vec()].concat())
        .await
        .unwrap(); // redelivery
    writer.write_batch(&b).await.unwrap();

    let mut got_all = Vec::new();
    for _ in 0..7 {
        match next_tick(&mut all).await {
            stream_ticks_response::Event::Tick(t) => got_all.push(t),
            other => panic!("unexpected {other:?}"),
        }
    }
    got_all.sort_by(|x, y| (&x.asset_id, x.seq).cmp(&(&y.asset_id, y.seq)));
    assert_eq!(
        got_all,
        [a.clone(), b.clone()]
            .concat()
            .iter()
            .map(wire)
            .collect::<Vec<_>>()
    );
    let mut got_b = Vec::new();
    for _ in 0..4 {
        match next_tick(&mut only_b).await {
            stream_ticks_response::Event::Tick(t) => got_b.push(t),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got_b, b.iter().map(wire).collect::<Vec<_>>());
    assert_eq!(
        replicas[0].metric("tickfleet_api_active_streams", &[("method", "StreamTicks")]),
        1.0
    );

    // Nothing else was sent: after a marker tick for B, the B stream's next message is the marker.
    let marker = tick("B", T0 + 100, 100, "3", None);
    writer
        .write_batch(std::slice::from_ref(&marker))
        .await
        .unwrap();
    assert_eq!(
        next_tick(&mut only_b).await,
        stream_ticks_response::Event::Tick(wire(&marker))
    );

    // Shutdown: the streams end with OK (no error), and the servers drain.
    for r in &replicas {
        r.stop.cancel();
    }
    for stream in [&mut all, &mut only_b] {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the stream ends within 10 s")
            {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(status) => panic!("stream ended with an error: {status:?}"),
            }
        }
    }
    for r in &mut replicas {
        (&mut r.task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn live_candles_start_from_the_store_and_follow_new_ticks() {
    let prefix = unique_prefix();
    let writer = store(&prefix);
    // Already stored before the stream starts: part of the current candle.
    writer
        .write_batch(&[tick("A", T0 + 10, 1, "100", Some("1"))])
        .await
        .unwrap();
    let mut api = Server::start(&prefix).await;
    let mut stream = api
        .client
        .stream_candles(StreamCandlesRequest {
            asset_ids: vec!["A".into()],
            interval: "1s".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || match tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .event
        .unwrap()
    {
        stream_candles_response::Event::Candle(c) => c,
        other => panic!("unexpected {other:?}"),
    };
    let b1 = [
        tick("A", T0 + 20, 2, "120", Some("2")),
        tick("A", T0 + 30, 3, "90", None),
    ];
    writer.write_batch(&b1).await.unwrap();
    writer.write_batch(&b1).await.unwrap(); // redelivered: no update, no double count
    let c = next().await;
    assert_eq!(
        (
            c.start_ns,
            c.open.as_str(),
            c.high.as_str(),
            c.low.as_str(),
            c.close.as_str()
        ),
        (T0, "100", "120", "90", "90")
    );
    assert_eq!((c.volume.as_str(), c.tick_count, c.closed), ("3", 3, false));
    // A tick in the next second closes this candle and opens the next.
    writer
        .write_batch(&[tick("A", T0 + SEC + 5, 4, "95", Some("1"))])
        .await
        .unwrap();
    let closed = next().await;
    assert_eq!(
        (closed.start_ns, closed.tick_count, closed.closed),
        (T0, 3, true)
    );
    let open = next().await;
    assert_eq!(
        (
            open.start_ns,
            open.open.as_str(),
            open.tick_count,
            open.closed
        ),
        (T0 + SEC, "95", 1, false)
    );
    // A late tick for the closed candle: it is sent again, recomputed from the store, still closed.
    writer
        .write_batch(&[tick("A", T0 + 40, 4_000, "130", Some("0.5"))])
        .await
        .unwrap();
    let mut updates = [next().await, next().await];
    updates.sort_by_key(|c| c.start_ns);
    assert_eq!(
        (
            updates[0].start_ns,
            updates[0].high.as_str(),
            updates[0].close.as_str(),
            updates[0].volume.as_str(),
            updates[0].tick_count,
            updates[0].closed
        ),
        (T0, "130", "130", "3.5", 4, true)
    );
    assert_eq!((updates[1].start_ns, updates[1].tick_count), (T0 + SEC, 1));
}

#[tokio::test]
async fn health_and_reflection_list_the_services() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };

    let prefix = unique_prefix();
    let api = Server::start(&prefix).await;
    let mut health = HealthClient::new(api.channel.clone());
    // Serving once the store answered its first ping.
    let mut status = ServingStatus::Unknown;
    for _ in 0..100 {
        status = health
            .check(HealthCheckRequest {
                service: "tickfleet.v1.TickService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(api.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "tickfleet.v1.TickService",
        "tickfleet.v1.PollService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // The schema comes by reflection too: the file defining the service, and the file it imports.
    let mut files = std::collections::BTreeMap::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(
        "tickfleet.v1.TickService".into(),
    )];
    while let Some(request) = wanted.pop() {
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            }]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(fds)) = response.message_response else {
            panic!("unexpected reflection answer {response:?}");
        };
        for bytes in fds.file_descriptor_proto {
            let file =
                <prost_types::FileDescriptorProto as prost::Message>::decode(&bytes[..]).unwrap();
            for dep in &file.dependency {
                if !files.contains_key(dep) {
                    wanted.push(MessageRequest::FileByFilename(dep.clone()));
                }
            }
            files.insert(file.name().to_owned(), file);
        }
    }
    let api_file = &files["tickfleet/v1/api.proto"];
    let methods: Vec<&str> = api_file.service[0]
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(
        methods,
        [
            "GetLatest",
            "BatchGetLatest",
            "ListTicks",
            "GetCandles",
            "GetMovingAverage",
            "ListAssets",
            "StreamTicks",
            "StreamCandles"
        ]
    );
    assert!(
        files.contains_key("tickfleet/v1/tick.proto"),
        "{:?}",
        files.keys()
    );

    // On shutdown a health watcher sees NOT_SERVING, then its stream ends cleanly, and the server drains
    // (a watch left open would hold the drain up until its timeout, and the task would fail).
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "tickfleet.v1.TickService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    api.stop.cancel();
    let mut seen = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch ends")
        .expect("ends cleanly")
    {
        seen.push(m.status());
    }
    assert_eq!(seen, vec![ServingStatus::NotServing]);
    api.task.await.unwrap().unwrap();
}

/// A client that stops reading loses messages (and is told how many), while another client of the same
/// replica gets every tick: a slow client blocks nobody.
#[tokio::test]
async fn a_slow_client_gets_a_gap_notice_and_blocks_nobody() {
    let prefix = unique_prefix();
    let api = Server::start_with(
        &prefix,
        tickfleet_api::Options {
            stream_buffer: 512,
            ..Default::default()
        },
    )
    .await;
    let mut fast = api
        .client
        .clone()
        .stream_ticks(StreamTicksRequest { asset_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    // Small HTTP/2 windows, so an unread stream backs up into the server soon.
    let slow_channel = Channel::from_shared(api.channel_url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow = TickServiceClient::new(slow_channel)
        .stream_ticks(StreamTicksRequest { asset_ids: vec![] })
        .await
        .unwrap()
        .into_inner();

    // 100k ticks (about 7 MB on the wire, far more than the windows, socket buffers and 512 messages
    // hold), written in batches of 500; the fast client reads each batch before the next is written.
    let writer = store(&prefix);
    let mut seq = 0u64;
    for _ in 0..200 {
        let batch: Vec<Tick> = (0..500)
            .map(|_| {
                seq += 1;
                tick("S", T0 + seq as i64, seq, "1.5", None)
            })
            .collect();
        writer.write_batch(&batch).await.unwrap();
        for want in &batch {
            assert_eq!(
                next_tick(&mut fast).await,
                stream_ticks_response::Event::Tick(wire(want)),
                "the fast client gets every tick, in order, no gap"
            );
        }
    }

    // The slow client now reads. Markers are written until one reaches it: by then every gap before the
    // marker has been reported, so what it received plus what it was told it missed is everything.
    let mut received = 0u64;
    let mut missed = 0u64;
    let mut gaps = 0;
    let mut last_seq = 0;
    let mut marker = None;
    while marker.is_none() {
        tokio::select! {
            event = next_tick(&mut slow) => match event {
                stream_ticks_response::Event::Tick(t) => {
                    assert!(t.seq > last_seq, "in order, none twice");
                    last_seq = t.seq;
                    received += 1;
                    if t.seq > 100_000 {
                        marker = Some(t.seq);
                    }
                }
                stream_ticks_response::Event::Gap(g) => {
                    assert_eq!(g.reason, "client_slow");
                    missed += g.missed;
                    gaps += 1;
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                seq += 1;
                writer.write_batch(&[tick("S", T0 + seq as i64, seq, "2", None)]).await.unwrap();
            }
        }
    }
    assert!(
        gaps >= 1 && missed > 0,
        "the slow client was told it missed ticks"
    );
    assert_eq!(
        received + missed,
        marker.unwrap(),
        "every tick received or reported missed"
    );
    assert_eq!(
        api.metric(
            "tickfleet_api_stream_messages_dropped_total",
            &[("method", "StreamTicks")]
        ),
        missed as f64
    );
}

/// Pauses every client of the test Redis for `ms` (the pausing connection included).
async fn pause_redis(ms: u64) {
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Shutdown lets a call already in flight finish (it answers once Redis does); a drain that outlasts
/// its bound ends the server with an error instead of hanging.
#[tokio::test]
async fn shutdown_finishes_in_flight_calls_within_its_bound() {
    let prefix = unique_prefix();
    store(&prefix)
        .write_batch(&[tick("A", T0, 1, "1", None)])
        .await
        .unwrap();
    for (drain, finishes) in [
        (Duration::from_secs(20), true),
        (Duration::from_millis(200), false),
    ] {
        let mut api = Server::start_with(
            &prefix,
            tickfleet_api::Options {
                drain_timeout: drain,
                ..Default::default()
            },
        )
        .await;
        // Warm the api's Redis connection, then hold Redis still so the next call stays in flight.
        api.client
            .get_latest(GetLatestRequest {
                asset_id: "A".into(),
            })
            .await
            .unwrap();
        pause_redis(1500).await;
        let mut client = api.client.clone();
        let call = tokio::spawn(async move {
            client
                .get_latest(GetLatestRequest {
                    asset_id: "A".into(),
                })
                .await
        });
        // Give the call time to reach the server before shutdown begins.
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.stop.cancel();
        let served = call.await.unwrap();
        let drained = (&mut api.task).await.unwrap();
        if finishes {
            let tick = served
                .expect("the in-flight call is answered")
                .into_inner()
                .tick;
            assert_eq!(tick.unwrap().seq, 1);
            drained.expect("a clean drain");
        } else {
            let e = drained.expect_err("the drain outlasted its 200 ms bound");
            assert!(e.to_string().contains("did not finish"), "{e:#}");
        }
    }
}

/// With Redis unreachable, calls fail with UNAVAILABLE (retryable) and health says NOT_SERVING.
#[tokio::test]
async fn an_unreachable_store_is_unavailable_not_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::open(
        &format!("redis://127.0.0.1:{port}"),
        "x",
        Retention::default(),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let running = tickfleet_api::start(
        Arc::new(store),
        "127.0.0.1:0".parse().unwrap(),
        ApiMetrics::new(&prometheus::Registry::new()).unwrap(),
        Health::new(),
        stop.clone(),
        tickfleet_api::Options::default(),
    )
    .await
    .unwrap();
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = TickServiceClient::new(channel.clone())
        .get_latest(GetLatestRequest {
            asset_id: "A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = TickServiceClient::new(channel.clone())
        .stream_ticks(StreamTicksRequest { asset_ids: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "tickfleet.v1.TickService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::NotServing);
    stop.cancel();
    running.task.await.unwrap().unwrap();
}

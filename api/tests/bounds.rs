//! The api's bounds, through a real tonic client over TCP: per-replica limits on concurrent calls and
//! open streams (RESOURCE_EXHAUSTED beyond them, counted in the metrics), a deadline on every store
//! call, and the per-client rate limits on the polling jobs' service as on every other. The store is a test double of the one layer below the api (the [`TickStore`] trait): the
//! in-memory store behind a gate that holds chosen calls until the test opens it, so "in flight" and
//! "hanging" are states the test controls, not timings.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tickfleet_api::ApiMetrics;
use tickfleet_api::limits::Limits;
use tickfleet_api::ratelimit::{Class, Rate};
use tickfleet_proto::v1::poll_service_client::PollServiceClient;
use tickfleet_proto::v1::tick_service_client::TickServiceClient;
use tickfleet_proto::v1::{
    CreatePollJobRequest, DeletePollJobRequest, GetCandlesRequest, GetLatestRequest,
    GetMovingAverageRequest, GetPollJobRequest, ListAssetsRequest, StreamCandlesRequest,
    StreamTicksRequest, get_moving_average_request::Over,
};
use tickfleet_service::{CancellationToken, Health};
use tickfleet_store::{
    LiveFeed, MemoryJobs, MemoryStore, RangeQuery, StoreError, Tick, TickPage, TickStore,
    WriteSummary,
};
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::Channel;

const T0: i64 = 1_700_000_000_000_000_000;

/// Which calls the gate holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Held {
    /// `latest` (every unary query starts with it).
    Latest,
    /// `range` and `rollups` (candles, averages, ranges).
    Range,
    /// `subscribe` (opening a stream).
    Subscribe,
    /// `assets`.
    Assets,
}

/// A [`MemoryStore`] whose `held` calls wait for a permit of `gate` (none until the test adds some).
struct GatedStore {
    inner: MemoryStore,
    held: Vec<Held>,
    gate: Semaphore,
}

impl GatedStore {
    async fn pass(&self, call: Held) {
        if self.held.contains(&call) {
            self.gate.acquire().await.unwrap().forget();
        }
    }
}

#[async_trait]
impl TickStore for GatedStore {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        self.inner.write_batch(ticks).await
    }
    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        self.pass(Held::Latest).await;
        self.inner.latest(asset_id).await
    }
    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        self.pass(Held::Range).await;
        self.inner.range(asset_id, query).await
    }
    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        self.inner.tail(asset_id, n).await
    }
    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        self.pass(Held::Assets).await;
        self.inner.assets().await
    }
    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        self.pass(Held::Subscribe).await;
        self.inner.subscribe().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn rollups(
        &self,
        asset_id: &str,
        query: &tickfleet_store::RollupQuery,
    ) -> Result<tickfleet_store::RollupPage, StoreError> {
        self.pass(Held::Range).await;
        self.inner.rollups(asset_id, query).await
    }
    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<tickfleet_store::RebuildSummary, StoreError> {
        self.inner.rebuild_rollups(asset_id, from_ns, to_ns).await
    }
}

struct Server {
    client: TickServiceClient<Channel>,
    channel: Channel,
    store: Arc<GatedStore>,
    registry: prometheus::Registry,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(held: &[Held], options: tickfleet_api::Options) -> Self {
        let store = Arc::new(GatedStore {
            inner: MemoryStore::new(),
            held: held.to_vec(),
            gate: Semaphore::new(0),
        });
        store
            .inner
            .write_batch(&[Tick {
                asset_id: "A".into(),
                price: rust_decimal::Decimal::from_str("100.5").unwrap(),
                size: Some(rust_decimal::Decimal::ONE),
                event_time_ns: T0,
                seq: 1,
                source: "bounds".into(),
            }])
            .await
            .unwrap();
        let registry = prometheus::Registry::new();
        let stop = CancellationToken::new();
        let running = tickfleet_api::start(
            store.clone(),
            "127.0.0.1:0".parse().unwrap(),
            ApiMetrics::new(&registry).unwrap(),
            Health::new(),
            stop.clone(),
            tickfleet_api::Options {
                drain_timeout: Duration::from_secs(5),
                ..options
            },
        )
        .await
        .unwrap();
        let channel = Channel::from_shared(format!("http://{}", running.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Server {
            client: TickServiceClient::new(channel.clone()),
            channel,
            store,
            registry,
            stop,
            task: running.task,
        }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        common::metric(&self.registry, name, labels)
    }

    /// Polls a metric until it has `value` (what the server reports, not a timing).
    async fn until_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        for _ in 0..1000 {
            if self.metric(name, labels) == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{name}{labels:?} is {}, not {value}",
            self.metric(name, labels)
        );
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn latest_req() -> GetLatestRequest {
    GetLatestRequest {
        asset_id: "A".into(),
    }
}

/// Guards a call the api must answer (so a regression fails the test instead of hanging it).
async fn answered<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the api answers instead of leaving the call stuck")
}

#[tokio::test]
async fn calls_past_the_concurrency_limit_are_resource_exhausted_and_counted() {
    let api = Server::start(
        &[Held::Latest],
        tickfleet_api::Options {
            limits: Limits::new(2, 8),
            store_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        api.metric("tickfleet_api_limit", &[("limit", "calls")]),
        2.0
    );
    // Two calls held in flight by the store: the limit is reached.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut c = api.client.clone();
            tokio::spawn(async move { c.get_latest(latest_req()).await })
        })
        .collect();
    api.until_metric(
        "tickfleet_api_in_flight_calls",
        &[("method", "GetLatest")],
        2.0,
    )
    .await;
    // Any third unary call is refused at once, whatever its method.
    let mut c = api.client.clone();
    let refused = answered(c.get_latest(latest_req())).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limit of 2 concurrent calls")
            && refused.message().contains("--max-concurrent-calls"),
        "{refused:?}"
    );
    let refused = answered(c.list_assets(ListAssetsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        api.metric(
            "tickfleet_api_rejected_total",
            &[("method", "GetLatest"), ("limit", "calls")]
        ),
        1.0
    );
    assert_eq!(
        api.metric("tickfleet_api_rejected_total", &[("limit", "calls")]),
        2.0
    );
    assert_eq!(
        api.metric(
            "tickfleet_api_requests_total",
            &[("method", "ListAssets"), ("code", "RESOURCE_EXHAUSTED")]
        ),
        1.0
    );
    // Once the held calls finish, their slots are free again.
    api.store.gate.add_permits(2);
    for h in held {
        answered(h).await.unwrap().unwrap();
    }
    api.store.gate.add_permits(1);
    answered(c.get_latest(latest_req())).await.unwrap();
    api.stop().await;
}

#[tokio::test]
async fn streams_past_the_stream_limit_are_resource_exhausted_and_counted() {
    let api = Server::start(
        &[],
        tickfleet_api::Options {
            limits: Limits::new(8, 2),
            ..Default::default()
        },
    )
    .await;
    let mut c = api.client.clone();
    let ticks = c
        .stream_ticks(StreamTicksRequest { asset_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let candles = c
        .stream_candles(StreamCandlesRequest {
            asset_ids: vec!["A".into()],
            interval: "1m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Both kinds of stream share the bound.
    for refused in [
        answered(c.stream_ticks(StreamTicksRequest { asset_ids: vec![] }))
            .await
            .map(drop)
            .unwrap_err(),
        answered(c.stream_candles(StreamCandlesRequest {
            asset_ids: vec![],
            interval: "1s".into(),
        }))
        .await
        .map(drop)
        .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("limit of 2 open streams"),
            "{refused:?}"
        );
    }
    assert_eq!(
        api.metric("tickfleet_api_rejected_total", &[("limit", "streams")]),
        2.0
    );
    // Streams do not take call slots: unary calls still work.
    answered(c.get_latest(latest_req())).await.unwrap();
    // A stream that ends frees its slot.
    drop(ticks);
    api.until_metric(
        "tickfleet_api_active_streams",
        &[("method", "StreamTicks")],
        0.0,
    )
    .await;
    let _again = answered(c.stream_ticks(StreamTicksRequest { asset_ids: vec![] }))
        .await
        .unwrap();
    drop(candles);
    api.stop().await;
}

#[tokio::test]
async fn a_store_call_that_hangs_is_unavailable_not_a_stuck_call() {
    let api = Server::start(
        &[Held::Latest, Held::Assets, Held::Subscribe],
        tickfleet_api::Options {
            store_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let mut c = api.client.clone();
    // No client deadline: the store's deadline ends each call.
    let statuses = [
        answered(c.get_latest(latest_req())).await.map(drop),
        answered(c.list_assets(ListAssetsRequest {}))
            .await
            .map(drop),
        answered(c.get_candles(GetCandlesRequest {
            asset_id: "A".into(),
            interval: "1m".into(),
            from_ns: None,
            to_ns: None,
        }))
        .await
        .map(drop),
        answered(c.stream_ticks(StreamTicksRequest { asset_ids: vec![] }))
            .await
            .map(drop),
    ];
    for s in statuses {
        let s = s.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("did not answer"), "{s:?}");
    }
    assert_eq!(
        api.metric("tickfleet_api_store_errors_total", &[("kind", "timeout")]),
        4.0
    );
    // A call slot is not kept by a call that timed out.
    assert_eq!(api.metric("tickfleet_api_in_flight_calls", &[]), 0.0);
    api.stop().await;
}

#[tokio::test]
async fn a_range_read_that_hangs_mid_query_is_unavailable() {
    let api = Server::start(
        &[Held::Range],
        tickfleet_api::Options {
            store_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let mut c = api.client.clone();
    let s = answered(c.get_moving_average(GetMovingAverageRequest {
        asset_id: "A".into(),
        over: Some(Over::Window("1m".into())),
    }))
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    // A window average reads rollups, and raw ticks only for a second the window cuts.
    assert!(s.message().contains("rollups"), "{s:?}");
    // With the store answering again, so does the api (one permit per read it makes).
    api.store.gate.add_permits(16);
    let avg = answered(c.get_moving_average(GetMovingAverageRequest {
        asset_id: "A".into(),
        over: Some(Over::Window("1m".into())),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!((avg.sma.as_str(), avg.count), ("100.5", 1));
    api.stop().await;
}

#[tokio::test]
async fn poll_job_calls_are_rate_limited_and_counted_like_every_other_method() {
    let mut rate_limits = tickfleet_api::ratelimit::RateLimits::default();
    let writes = Class::ALL.iter().position(|c| *c == Class::Writes).unwrap();
    rate_limits.rates[writes] = Some(Rate {
        count: 1,
        per: Duration::from_secs(3600),
        burst: 1,
    });
    let api = Server::start(
        &[],
        tickfleet_api::Options {
            rate_limits,
            jobs: Some(Arc::new(MemoryJobs::new())),
            ..Default::default()
        },
    )
    .await;
    let mut polls = PollServiceClient::new(api.channel.clone());
    let create = || CreatePollJobRequest {
        symbols: vec!["AAPL".into()],
        interval: "1m".into(),
        provider: "finnhub".into(),
    };
    let job = answered(polls.create_poll_job(create())).await.unwrap();
    let refused = answered(polls.create_poll_job(create())).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.metadata().get("retry-after").is_some(),
        "{refused:?}"
    );
    let method = ("method", "CreatePollJob");
    let requests = "tickfleet_api_requests_total";
    assert_eq!(
        api.metric("tickfleet_api_rejected_total", &[method, ("limit", "rate")]),
        1.0
    );
    assert_eq!(api.metric(requests, &[method, ("code", "OK")]), 1.0);
    assert_eq!(
        api.metric(requests, &[method, ("code", "RESOURCE_EXHAUSTED")]),
        1.0
    );
    // Reads are another class (not limited here); writes share one bucket, so a delete is refused
    // too, and counted under its own method.
    let id = job.into_inner().id;
    answered(polls.get_poll_job(GetPollJobRequest { id: id.clone() }))
        .await
        .unwrap();
    let refused = answered(polls.delete_poll_job(DeletePollJobRequest { id }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let unknown = GetPollJobRequest {
        id: "0000000000000000".into(),
    };
    let gone = answered(polls.get_poll_job(unknown)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let get = ("method", "GetPollJob");
    assert_eq!(api.metric(requests, &[get, ("code", "OK")]), 1.0);
    assert_eq!(api.metric(requests, &[get, ("code", "NOT_FOUND")]), 1.0);
    let delete = ("method", "DeletePollJob");
    assert_eq!(
        api.metric("tickfleet_api_rejected_total", &[delete, ("limit", "rate")]),
        1.0
    );
    api.stop().await;
}

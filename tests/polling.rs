//! Provider polling jobs end to end with the real binaries: a fixture HTTP server answering as Finnhub,
//! Alpha Vantage and Yahoo Finance (`tickfleet_connector::poll::fixture`: their documented shapes,
//! error bodies and 429s) → `tickfleet-connector poll` × 3 (leases in Redis) → the dev broker →
//! `tickfleet-worker` → redis-server, read back through `tickfleet-api`'s REST routes; jobs created
//! and deleted with `POST /v1/prices/poll` and `/v1/polls/{id}`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tickfleet_connector::poll::fixture::{FIXTURE_KEY, ProviderFixture};
use tickfleet_e2e::http::{get, request};
use tickfleet_e2e::{
    Api, DevBroker, Worker, WorkerSetup, bin, redis_url, signal, tickctl_json, wait_for,
};
use tickfleet_store::jobs::Pair;
use tickfleet_store::{JobStore, RedisStore, Retention};

const LONG: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_millis(100);

struct Connector {
    child: Child,
    log: std::path::PathBuf,
}

impl Connector {
    fn start(setup: &WorkerSetup, fixture: &ProviderFixture, id: &str, extra: &[&str]) -> Self {
        let log = setup.dir.join(format!("connector-{id}.log"));
        let child = Command::new(bin("tickfleet-connector"))
            .arg("poll")
            .args(["--brokers", &setup.bootstrap, "--topic", &setup.topic])
            .args([
                "--redis-url",
                &setup.redis_url,
                "--redis-prefix",
                &setup.prefix,
            ])
            .args(["--holder-id", id, "--admin-addr", "127.0.0.1:0"])
            .args(["--lease-ttl-ms", "2000", "--scan-interval-ms", "200"])
            .args(["--backoff-min-ms", "200", "--backoff-max-ms", "1000"])
            .args(["--finnhub-url", &fixture.url()])
            .args(["--alphavantage-url", &fixture.url()])
            .args(["--yahoo-url", &fixture.url()])
            .args(extra)
            .env("FINNHUB_API_KEY", FIXTURE_KEY)
            .env("ALPHAVANTAGE_API_KEY", FIXTURE_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tickfleet-connector poll");
        Connector { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    fixture: ProviderFixture,
    broker: DevBroker,
    setup: WorkerSetup,
    _worker: Worker,
    api: Api,
    jobs: tickfleet_store::RedisJobs,
}

impl Rig {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let fixture = runtime
            .block_on(ProviderFixture::start(
                "127.0.0.1:0".parse().unwrap(),
                Duration::from_millis(50),
            ))
            .unwrap();
        let broker = DevBroker::start(&["ticks:3", "ticks.dlq:2"]);
        let setup = WorkerSetup::new(&broker, dir.path(), &redis_url());
        let worker = Worker::start(&setup, 0);
        let api = Api::start(&setup.prefix, dir.path(), 0);
        let jobs = {
            let _rt = runtime.enter();
            RedisStore::open(&redis_url(), &setup.prefix, Retention::default())
                .unwrap()
                .jobs()
        };
        Rig {
            _dir: dir,
            runtime,
            fixture,
            broker,
            setup,
            _worker: worker,
            api,
            jobs,
        }
    }

    fn create(&self, body: &str) -> String {
        let r = request(&self.api.http, "POST", "/v1/prices/poll", &[], Some(body)).unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        let id = r.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(
            r.header("location"),
            Some(format!("/v1/polls/{id}").as_str())
        );
        id
    }

    fn stored_price(&self, symbol: &str) -> Option<String> {
        let r = get(
            &self.api.http,
            &format!("/v1/prices/latest?symbol={symbol}"),
        );
        (r.status == 200).then(|| r.json()["price"].as_str().unwrap().to_owned())
    }

    fn wait_stored(&self, symbol: &str, price: &str) {
        wait_for(
            LONG,
            STEP,
            &format!("{symbol} at {price} in the store"),
            || (self.stored_price(symbol).as_deref() == Some(price)).then_some(()),
        );
    }

    fn holder(&self, pair: &Pair) -> Option<tickfleet_store::jobs::Lease> {
        self.runtime.block_on(self.jobs.holder(pair)).unwrap()
    }

    /// Every message on the topic: (key, payload, raw id header, fence header), read up to the high
    /// watermarks.
    fn kafka_messages(&self) -> Vec<(String, Vec<u8>, String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.bootstrap)
            .set("group.id", "polling-test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..3 {
            let (_, high) = consumer
                .fetch_watermarks(&self.setup.topic, p, Duration::from_secs(10))
                .unwrap();
            ends.insert(p, high);
            tpl.add_partition_offset(&self.setup.topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut seen: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = Instant::now() + LONG;
        while ends
            .iter()
            .any(|(p, high)| seen.get(p).copied().unwrap_or(0) < *high)
        {
            assert!(Instant::now() < deadline, "reading the topic");
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m.unwrap();
            seen.insert(m.partition(), m.offset() + 1);
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().unwrap_or_default().to_vec(),
                header("tickfleet-raw-id"),
                header("tickfleet-fence"),
            ));
        }
        out
    }
}

#[test]
fn three_replicas_poll_each_symbol_once_survive_a_killed_holder_and_store_every_price_once() {
    let rig = Rig::start();
    let symbols = ["AAPL", "MSFT", "IBM"];
    let mut connectors: Vec<Connector> = (0..3)
        .map(|i| Connector::start(&rig.setup, &rig.fixture, &format!("r{i}"), &[]))
        .collect();
    let prices = ["100", "101", "99", "102", "98"];
    rig.fixture.set_quote("finnhub", "AAPL", prices[0]);
    rig.fixture.set_quote("finnhub", "MSFT", "400.10");
    rig.fixture
        .set_quote("finnhub", "IBM", "0.1000000000000000055511151231");
    let id = rig.create(
        r#"{"symbols": ["AAPL", "MSFT", "IBM"], "interval": "200ms", "provider": "finnhub"}"#,
    );
    rig.wait_stored("AAPL", "100");
    rig.wait_stored("MSFT", "400.1");
    // a price f64 cannot hold, stored digit for digit
    rig.wait_stored("IBM", "0.1000000000000000055511151231");

    let aapl = Pair::new("finnhub", "AAPL");
    for (step, price) in prices.iter().enumerate().skip(1) {
        if step == 3 {
            // SIGKILL the holder of AAPL: another replica takes the lease over when it expires
            let before = rig.holder(&aapl).expect("AAPL has a holder");
            let n: usize = before.holder[1..].parse().unwrap();
            signal(&connectors[n].child, "KILL");
            let _ = connectors[n].child.wait();
            let killed = Instant::now();
            rig.fixture.set_quote("finnhub", "AAPL", price);
            let after = wait_for(LONG, STEP, "another replica to take AAPL over", || {
                rig.holder(&aapl).filter(|l| l.holder != before.holder)
            });
            assert!(
                after.token > before.token,
                "fencing token {} after {}",
                after.token,
                before.token
            );
            // measured, not asserted: the lease TTL is 2 s, the scan 200 ms
            eprintln!(
                "AAPL taken over by {} {:?} after the SIGKILL",
                after.holder,
                killed.elapsed()
            );
            // the same job keeps every symbol polled
            let status = get(&rig.api.http, &format!("/v1/polls/{id}")).json();
            for s in status["status"].as_array().unwrap() {
                assert_ne!(s["holder"], before.holder.as_str(), "{status}");
            }
            connectors.remove(n);
        } else {
            rig.fixture.set_quote("finnhub", "AAPL", price);
        }
        rig.wait_stored("AAPL", price);
    }

    // exactly one replica polled each symbol at any moment
    for s in symbols {
        assert!(rig.fixture.polls("finnhub", s) >= 2, "{s} polled");
        assert_eq!(
            rig.fixture.max_in_flight("finnhub", s),
            1,
            "{s}: overlapping polls"
        );
    }
    // every price once, in order, with the pair's own sequence numbers
    let ticks = get(&rig.api.http, "/v1/ticks?asset_id=AAPL").json();
    let ticks = ticks["ticks"].as_array().unwrap();
    let got: Vec<(&str, &str, &str)> = ticks
        .iter()
        .map(|t| {
            (
                t["price"].as_str().unwrap(),
                t["seq"].as_str().unwrap(),
                t["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("100", "1", "finnhub"),
            ("101", "2", "finnhub"),
            ("99", "3", "finnhub"),
            ("102", "4", "finnhub"),
            ("98", "5", "finnhub")
        ]
    );
    // the seed's check: a 5-point moving average of [100, 101, 99, 102, 98] is exactly 100
    let ma = get(&rig.api.http, "/v1/moving-average?asset_id=AAPL&points=5").json();
    assert_eq!(ma["sma"], "100", "{ma}");
    // latest by provider reads the quote cache
    let latest = get(
        &rig.api.http,
        "/v1/prices/latest?symbol=AAPL&provider=finnhub",
    )
    .json();
    assert_eq!(
        (latest["price"].as_str(), latest["provider"].as_str()),
        (Some("98"), Some("finnhub"))
    );

    // on Kafka: one message per new price (a takeover may produce the dead holder's pending tick
    // again: the very same message, stored once), each with its raw response's id and its lease
    let messages = rig.kafka_messages();
    let mut by_seq: BTreeMap<(String, Vec<u8>), usize> = BTreeMap::new();
    for (key, payload, raw_id, fence) in &messages {
        assert!(!raw_id.is_empty() && !fence.is_empty(), "headers of {key}");
        let body = rig
            .runtime
            .block_on(rig.jobs.raw(&Pair::new("finnhub", key), raw_id))
            .unwrap()
            .unwrap_or_else(|| panic!("raw response {raw_id} of {key} is kept"));
        assert!(body.contains("\"c\":"), "{body}");
        *by_seq.entry((key.clone(), payload.clone())).or_default() += 1;
    }
    let aapl_messages: BTreeSet<&Vec<u8>> = by_seq
        .keys()
        .filter(|(k, _)| k == "AAPL")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(aapl_messages.len(), 5, "five distinct AAPL ticks on Kafka");
    assert!(
        by_seq.values().all(|n| *n <= 2),
        "no tick produced more than once per poll (+1 replay on takeover): {by_seq:?}"
    );
    let logs: String = connectors.iter().map(Connector::log_text).collect();
    assert!(!logs.contains(FIXTURE_KEY), "an API key in the logs");
}

/// The window between a poll's commit (the new price recorded as the pair's pending tick) and
/// Kafka's acknowledgement: the broker hangs (SIGSTOP) so the holder is caught in it, and is
/// SIGKILLed there. The replica that takes the lease over produces the pending tick: the price is
/// stored once, with its own sequence number, and nothing after it is lost.
#[test]
fn a_holder_killed_between_its_commit_and_kafkas_ack_loses_nothing_and_stores_the_price_once() {
    let rig = Rig::start();
    let mut connectors: Vec<Connector> = (0..2)
        .map(|i| Connector::start(&rig.setup, &rig.fixture, &format!("r{i}"), &[]))
        .collect();
    rig.fixture.set_quote("finnhub", "AAPL", "100");
    rig.create(r#"{"symbols": ["AAPL"], "interval": "200ms", "provider": "finnhub"}"#);
    rig.wait_stored("AAPL", "100");
    let aapl = Pair::new("finnhub", "AAPL");
    let pending = || rig.runtime.block_on(rig.jobs.pending(&aapl)).unwrap();
    wait_for(LONG, STEP, "the first price acknowledged", || {
        pending().is_none().then_some(())
    });

    rig.broker.signal("STOP");
    rig.fixture.set_quote("finnhub", "AAPL", "101");
    // the holder has committed the new price and waits for an acknowledgement that cannot come
    let caught = wait_for(LONG, STEP, "101 committed as AAPL's pending tick", || {
        pending().filter(|p| p.tick.price.to_string() == "101")
    });
    assert_eq!(caught.tick.seq, 2, "{caught:?}");
    let holder = rig.holder(&aapl).expect("AAPL has a holder");
    let n: usize = holder.holder[1..].parse().unwrap();
    signal(&connectors[n].child, "KILL");
    let _ = connectors[n].child.wait();
    assert!(pending().is_some(), "the killed holder never got its ack");
    rig.broker.signal("CONT");
    connectors.remove(n);

    let after = wait_for(LONG, STEP, "the other replica to take AAPL over", || {
        rig.holder(&aapl).filter(|l| l.holder != holder.holder)
    });
    assert!(after.token > holder.token, "{after:?} after {holder:?}");
    rig.wait_stored("AAPL", "101");
    wait_for(LONG, STEP, "the pending tick marked produced", || {
        pending().is_none().then_some(())
    });
    // and polling goes on from there
    rig.fixture.set_quote("finnhub", "AAPL", "102");
    rig.wait_stored("AAPL", "102");

    let ticks = get(&rig.api.http, "/v1/ticks?asset_id=AAPL").json();
    let got: Vec<(&str, &str)> = ticks["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["price"].as_str().unwrap(), t["seq"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [("100", "1"), ("101", "2"), ("102", "3")], "{ticks}");
    // On Kafka, 101 once from the new holder, and perhaps once more from the killed one (if its
    // request had reached the stopped broker's socket): the same message, which the store keeps once.
    let mut copies: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (key, payload, _, _) in rig.kafka_messages() {
        if key == "AAPL" {
            *copies.entry(payload).or_default() += 1;
        }
    }
    assert_eq!(copies.len(), 3, "three distinct AAPL ticks: {copies:?}");
    assert!(copies.values().all(|n| *n <= 2), "{copies:?}");
    eprintln!(
        "copies of each AAPL tick on Kafka: {:?}",
        copies.values().collect::<Vec<_>>()
    );
}

#[test]
fn alphavantage_and_yahoo_back_off_on_rate_limits_and_jobs_are_validated_read_and_deleted() {
    let rig = Rig::start();
    let connector = Connector::start(&rig.setup, &rig.fixture, "solo", &[]);

    // validation: 400 problems naming the field
    for (body, field) in [
        (
            r#"{"symbols": ["AAPL"], "interval": "5s", "provider": "bloomberg"}"#,
            "provider",
        ),
        (
            r#"{"symbols": [], "interval": "5s", "provider": "yahoo"}"#,
            "symbols",
        ),
        (
            r#"{"symbols": ["A B"], "interval": "5s", "provider": "yahoo"}"#,
            "symbols",
        ),
        (
            r#"{"symbols": ["AAPL"], "interval": "5", "provider": "yahoo"}"#,
            "interval",
        ),
        (r#"{"symbols": ["AAPL"], "provider": "yahoo"}"#, "interval"),
        (
            r#"{"symbols": "AAPL", "interval": "5s", "provider": "yahoo"}"#,
            "symbols",
        ),
        (
            r#"{"symbols": ["AAPL"], "interval": "5s", "provider": "yahoo", "extra": 1}"#,
            "extra",
        ),
    ] {
        let r = request(&rig.api.http, "POST", "/v1/prices/poll", &[], Some(body)).unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["field"], field, "{body}: {}", r.body);
    }
    assert_eq!(get(&rig.api.http, "/v1/polls/0123456789abcdef").status, 404);
    assert_eq!(get(&rig.api.http, "/v1/polls/not-an-id").status, 400);

    // Yahoo: two 429s with Retry-After: 1, then the quote; Alpha Vantage: its quota message, then the quote
    rig.fixture.fail_next("yahoo", "^GSPC", 2, 429, Some(1));
    rig.fixture.set_quote("yahoo", "^GSPC", "5743.25");
    rig.fixture.fail_next("alphavantage", "IBM", 1, 429, None);
    rig.fixture.fail_next("alphavantage", "IBM", 1, 503, None);
    rig.fixture.set_quote("alphavantage", "IBM", "293.8700");
    let y = rig.create(r#"{"symbols": ["^GSPC"], "interval": "100ms", "provider": "yahoo"}"#);
    let a = rig.create(r#"{"symbols": ["IBM"], "interval": "100ms", "provider": "alphavantage"}"#);
    rig.wait_stored("%5EGSPC", "5743.25");
    rig.wait_stored("IBM", "293.87");
    let times = rig.fixture.poll_times("yahoo", "^GSPC");
    assert!(times.len() >= 3, "{times:?}");
    for w in times.windows(2).take(2) {
        // Retry-After: 1 honoured (a lower bound: a slow machine only waits longer)
        assert!(
            w[1] - w[0] >= Duration::from_secs(1),
            "polled again after {:?}",
            w[1] - w[0]
        );
    }
    let latest = get(
        &rig.api.http,
        "/v1/prices/latest?symbol=IBM&provider=alphavantage",
    )
    .json();
    assert_eq!(latest["price"], "293.87", "{latest}");
    let job = get(&rig.api.http, &format!("/v1/polls/{a}")).json();
    assert_eq!(job["status"][0]["holder"], "solo", "{job}");
    assert_eq!(job["status"][0]["quote"]["price"], "293.87", "{job}");
    assert_eq!(job["interval"], "100ms");
    // tickctl's view of the same job and quote, over gRPC
    let cli = tickctl_json(&rig.api.url, &["poll", "get", &a]).unwrap();
    assert_eq!(
        (&cli["id"], &cli["provider"], &cli["interval"]),
        (&json!(a), &json!("alphavantage"), &json!("100ms")),
        "{cli}"
    );
    assert_eq!(cli["status"][0]["holder"], "solo", "{cli}");
    assert_eq!(cli["status"][0]["quote"]["price"], "293.87", "{cli}");
    let quote = tickctl_json(
        &rig.api.url,
        &["poll", "quote", "--provider", "alphavantage", "IBM"],
    )
    .unwrap();
    assert_eq!(quote["price"], "293.87", "{quote}");
    let refused = tickctl_json(
        &rig.api.url,
        &["poll", "create", "--provider", "bloomberg", "AAPL"],
    )
    .unwrap_err();
    assert!(
        refused.contains("InvalidArgument") && refused.contains("bloomberg"),
        "{refused}"
    );

    // deleting a job releases its symbols' leases
    let r = request(
        &rig.api.http,
        "DELETE",
        &format!("/v1/polls/{y}"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        request(
            &rig.api.http,
            "DELETE",
            &format!("/v1/polls/{y}"),
            &[],
            None
        )
        .unwrap()
        .status,
        404
    );
    let gspc = Pair::new("yahoo", "^GSPC");
    wait_for(LONG, STEP, "the deleted job's lease released", || {
        rig.holder(&gspc).is_none().then_some(())
    });
    assert!(rig.holder(&Pair::new("alphavantage", "IBM")).is_some());
    // tickctl creates and deletes jobs as REST does
    let c = tickctl_json(
        &rig.api.url,
        &[
            "poll",
            "create",
            "--provider",
            "yahoo",
            "--interval",
            "1m",
            "MSFT",
        ],
    )
    .unwrap();
    let id = c["id"].as_str().unwrap().to_owned();
    assert_eq!(get(&rig.api.http, &format!("/v1/polls/{id}")).status, 200);
    tickctl_json(&rig.api.url, &["poll", "delete", &id]).unwrap();
    assert_eq!(get(&rig.api.http, &format!("/v1/polls/{id}")).status, 404);
    let gone = tickctl_json(&rig.api.url, &["poll", "delete", &id]).unwrap_err();
    assert!(gone.contains("NotFound"), "{gone}");
    // one tick per new price, whatever the retries
    let ticks = get(&rig.api.http, "/v1/ticks?asset_id=IBM").json();
    assert_eq!(ticks["ticks"].as_array().unwrap().len(), 1, "{ticks}");
    let log = connector.log_text();
    assert!(log.contains("rate_limited"), "{log}");
    assert!(!log.contains(FIXTURE_KEY), "an API key in the log");
}

//! The api's memory is bounded per call, whatever the range: 50 clients of day-long candles — live
//! `StreamCandles` of `1d` and `GetCandles` of a whole day in `1m` candles — on one asset holding two
//! million ticks in that day, against the real `tickfleet-api` binary and redis-server. The api's peak
//! resident memory (`VmHWM` in `/proc/PID/status`) stays under a bound far below what holding one
//! call's range took before calls were folded page by page (about 150 MB per million ticks), every
//! answer is exact, and the clients past the api's limits get RESOURCE_EXHAUSTED.
//!
//! The ticks are loaded straight into Redis with `RedisStore::write_batch` (the worker's store call),
//! not through Kafka: the subject is the api.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tickfleet_e2e::{Api, Watch, bin, redis_url, unique, wait_exit, wait_for};
use tickfleet_store::{RedisStore, Retention, Tick, TickStore};

/// Ticks stored in the day before the clients come.
const TICKS: u64 = 2_000_000;
/// Start of the day (UTC midnight) the ticks fall in.
const DAY: i64 = 19_676 * 86_400 * 1_000_000_000;
const DAY_NS: i64 = 86_400 * 1_000_000_000;
/// Concurrent clients of each kind.
const CLIENTS: usize = 50;
/// The api's limits in this test: every stream fits, the queries do not.
const MAX_STREAMS: usize = CLIENTS;
const MAX_CALLS: usize = 2;
/// Bound on the api's peak RSS. Holding the range of one call would take several times this.
const RSS_BOUND_MIB: u64 = 100;

fn tick(i: u64) -> Tick {
    Tick {
        asset_id: "BIG".into(),
        // 100.00 .. 149.99: exact two-place prices; the high and low are known.
        price: Decimal::new(10_000 + (i % 5_000) as i64, 2),
        size: Some(Decimal::ONE),
        event_time_ns: DAY + (i as i64) * (DAY_NS / TICKS as i64),
        seq: i + 1,
        source: "api-memory".into(),
    }
}

/// `VmHWM` (peak) and `VmRSS` of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect(name)
            / 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn fifty_day_long_candle_clients_on_two_million_ticks_keep_the_api_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("e2e-api-memory");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Opened inside the runtime: the store's connection manager needs its reactor.
    let store = rt
        .block_on(async { RedisStore::open(&redis_url(), &prefix, Retention::default()).unwrap() });
    let loading = Instant::now();
    rt.block_on(async {
        let batches: Vec<Vec<Tick>> = (0..TICKS)
            .collect::<Vec<_>>()
            .chunks(10_000)
            .map(|c| c.iter().map(|i| tick(*i)).collect())
            .collect();
        for group in batches.chunks(4) {
            let writes = group.iter().map(|b| store.write_batch(b));
            for w in futures::future::join_all(writes).await {
                assert_eq!(w.unwrap().inserted, 10_000);
            }
        }
    });
    eprintln!("loaded {TICKS} ticks in {:?}", loading.elapsed());

    let api = Api::start_with(
        &prefix,
        dir.path(),
        0,
        &[
            "--max-streams",
            &MAX_STREAMS.to_string(),
            "--max-concurrent-calls",
            &MAX_CALLS.to_string(),
        ],
    );
    let pid = api.child.id();
    let (_, idle_rss) = memory_mib(pid);

    // 50 live day candles of the asset, all open before the next tick is stored.
    let mut watches: Vec<Watch> = (0..CLIENTS)
        .map(|i| {
            Watch::start(
                &api.url,
                &["BIG", "--candles", "1d", "--count", "1"],
                dir.path().join(format!("watch-{i}.jsonl")),
            )
        })
        .collect();
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "50 open candle streams",
        || {
            (api.metric("tickfleet_api_active_streams", "StreamCandles") == CLIENTS as f64)
                .then_some(())
        },
    );
    // One stream more than the limit is refused, and says why.
    let over = run_tickctl(
        &api.url,
        &["watch", "BIG", "--candles", "1d", "--count", "1"],
    );
    assert!(!over.status.success());
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(
        err.contains("ResourceExhausted") && err.contains("open streams"),
        "{err}"
    );

    // A new tick in the day: every stream seeds its candle from the two million stored ticks.
    let last = Tick {
        event_time_ns: DAY + DAY_NS - 1,
        price: Decimal::new(99, 0),
        ..tick(TICKS)
    };
    rt.block_on(store.write_batch(std::slice::from_ref(&last)))
        .unwrap();
    let want_count = TICKS + 1;
    for (i, w) in watches.iter_mut().enumerate() {
        let status = wait_exit(&mut w.child, Duration::from_secs(600))
            .unwrap_or_else(|| panic!("watch {i} got no candle"));
        assert!(status.success(), "watch {i}: {status}");
        let lines = w.lines();
        let c = &lines[0];
        assert_eq!(c["start_ns"], DAY, "watch {i}: {c}");
        assert_eq!(c["tick_count"], want_count, "watch {i}: {c}");
        assert_eq!(
            (c["open"].as_str(), c["high"].as_str(), c["low"].as_str()),
            (Some("100.00"), Some("149.99"), Some("99")),
            "watch {i}: {c}"
        );
        assert_eq!(c["close"], "99", "watch {i}: {c}");
        assert_eq!(c["volume"], want_count.to_string(), "watch {i}: {c}");
    }

    // 50 concurrent queries of the whole day in 1-minute candles.
    let from = DAY.to_string();
    let to = (DAY + DAY_NS).to_string();
    let queries: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, from, to) = (api.url.clone(), from.clone(), to.clone());
            std::thread::spawn(move || {
                run_tickctl(
                    &url,
                    &["candles", "BIG", "-i", "1m", "--from", &from, "--to", &to],
                )
            })
        })
        .collect();
    let mut answered = 0;
    let mut refused = 0;
    for q in queries {
        let out = q.join().unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let candles = v["candles"].as_array().unwrap();
            assert_eq!(candles.len(), 1440);
            let total: u64 = candles
                .iter()
                .map(|c| c["tick_count"].as_u64().unwrap())
                .sum();
            assert_eq!(total, want_count);
            answered += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("ResourceExhausted") && err.contains("concurrent calls"),
                "a query failed otherwise: {err}"
            );
            refused += 1;
        }
    }
    assert!(answered > 0, "no query was answered");
    assert_eq!(
        api.metric("tickfleet_api_rejected_total", "limit=\"calls\"") as usize,
        refused
    );

    let (peak, rss) = memory_mib(pid);
    eprintln!(
        "api RSS: idle {idle_rss} MiB, peak {peak} MiB, now {rss} MiB; queries answered {answered}, refused {refused}"
    );
    assert!(
        peak < RSS_BOUND_MIB,
        "the api's peak RSS was {peak} MiB (bound {RSS_BOUND_MIB} MiB)"
    );

    // Free the test Redis of the two million ticks.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
}

fn run_tickctl(url: &str, args: &[&str]) -> Output {
    Command::new(bin("tickctl"))
        .args(args)
        .args(["--api", url, "--json"])
        .output()
        .expect("run tickctl")
}

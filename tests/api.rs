//! The api and the query commands end to end, with the real binaries: `tickctl produce` → Apache Kafka →
//! `tickfleet-worker` → redis-server → two `tickfleet-api` replicas → `tickctl watch`/queries; and
//! `tickctl demo` as a user runs it, stopped with Ctrl-C (SIGINT). The streaming test runs on
//! PostgreSQL alone too (`--store postgres`: the streams come from LISTEN/NOTIFY).

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use tickfleet_e2e::postgres::{Store, postgres_url};
use tickfleet_e2e::{
    Api, Watch, Worker, WorkerSetup, bin, free_port, produce, redis_url, shared_topic, signal,
    tickctl_json, unique, wait_exit, wait_for, wait_verified_on,
};

const TICKS: u64 = 3_000;

/// Every (asset, seq) in a report: what the store must hold and a full stream must show.
fn expected(report: &std::path::Path) -> BTreeMap<String, u64> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    r["assets"]
        .as_object()
        .map(|assets| {
            assets
                .iter()
                .map(|(k, v)| (k.clone(), v["count"].as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_api_replicas_stream_every_tick_a_worker_stores_once() {
    two_api_replicas_stream(Store::Redis);
}

#[test]
fn two_api_replicas_stream_every_tick_a_worker_stores_once_in_postgres() {
    two_api_replicas_stream(Store::Postgres);
}

fn two_api_replicas_stream(store: Store) {
    let pg_url = if store.has_postgres() {
        postgres_url()
    } else {
        String::new()
    };
    let store_args = store.args(&pg_url);
    let store_args: Vec<&str> = store_args.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic(&format!("api-{}", store.name()), 4);
    let prefix = unique("e2e-api");
    let mut setup = WorkerSetup {
        prefix: prefix.clone(),
        ..WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url())
    };
    setup.args = store.args(&pg_url);
    let apis = [
        Api::start_with(&prefix, dir.path(), 0, &store_args),
        Api::start_with(&prefix, dir.path(), 1, &store_args),
    ];
    let mut watches: Vec<Watch> = apis
        .iter()
        .enumerate()
        .map(|(i, api)| {
            Watch::start(
                &api.url,
                &["--count", &TICKS.to_string()],
                dir.path().join(format!("watch-{i}.jsonl")),
            )
        })
        .collect();
    // Both streams are open (the api counts them) before anything is produced.
    for api in &apis {
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "the watch stream to open",
            || (api.metric("tickfleet_api_active_streams", "StreamTicks") == 1.0).then_some(()),
        );
    }
    let _worker = Worker::start(&setup, 0);
    let report = produce(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count",
            &TICKS.to_string(),
            "--assets",
            "10",
            "--rate",
            "3000",
        ],
    );
    wait_verified_on(
        &report,
        &redis_url(),
        &prefix,
        &store_args,
        Duration::from_secs(60),
    );

    let want = expected(&report);
    assert_eq!(want.values().sum::<u64>(), TICKS);
    for (i, w) in watches.iter_mut().enumerate() {
        let status = wait_exit(&mut w.child, Duration::from_secs(30)).unwrap_or_else(|| {
            let lines = w.lines();
            panic!(
                "watch {i} got {} of {TICKS} ticks; gaps: {:?}",
                lines.len(),
                lines
                    .iter()
                    .filter(|l| l.get("gap").is_some())
                    .collect::<Vec<_>>()
            )
        });
        assert!(status.success(), "watch {i}: {status}");
        let lines = w.lines();
        assert!(
            lines.iter().all(|l| l.get("gap").is_none()),
            "watch {i} reported a gap"
        );
        // Each stored tick exactly once, each asset in sequence order.
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for l in &lines {
            seen.entry(l["asset_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(l["seq"].as_u64().unwrap());
        }
        let got: BTreeMap<String, u64> = seen
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect();
        assert_eq!(got, want, "watch {i}: ticks per asset");
        for (asset, seqs) in &seen {
            let in_order: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, &in_order, "watch {i}: {asset} in order, none twice");
        }
    }

    // SIGTERM with a stream open: the stream ends cleanly (the watch exits 0) and the api exits 0.
    let mut apis = apis;
    let mut open = Watch::start(&apis[1].url, &[], dir.path().join("watch-open.jsonl"));
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "the open stream",
        || (apis[1].metric("tickfleet_api_active_streams", "StreamTicks") == 1.0).then_some(()),
    );
    signal(&apis[1].child, "TERM");
    let status = wait_exit(&mut apis[1].child, Duration::from_secs(30)).expect("api exits");
    let log = apis[1].log_text();
    assert!(status.success(), "api exited with {status}\n{log}");
    assert!(log.contains("drained"), "{log}");
    let status = wait_exit(&mut open.child, Duration::from_secs(10)).expect("watch ends");
    assert!(
        status.success(),
        "the watch saw an error, not a clean end: {status}"
    );
    // The other replica still serves.
    let latest = tickctl_json(&apis[0].url, &["latest"]).unwrap();
    assert_eq!(latest["ticks"].as_array().unwrap().len(), want.len());
}

#[test]
fn tickctl_demo_serves_queries_and_stops_on_ctrl_c() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", free_port());
    // Spawned directly, not through a shell with `&`, so SIGINT reaches it as Ctrl-C would.
    let mut demo = Command::new(bin("tickctl"))
        .args(["demo", "--api-addr", &format!("127.0.0.1:{port}")])
        .args(["--http-addr", &http])
        .args(["--assets", "5", "--rate", "2000", "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tickctl demo");

    let latest = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the demo to serve the latest tick of all 5 assets",
        || {
            tickctl_json(&url, &["latest"])
                .ok()
                .filter(|v| v["ticks"].as_array().is_some_and(|t| t.len() == 5))
        },
    );
    assert_eq!(latest["ticks"][0]["asset_id"], "A0000");

    // `curl localhost:8080/v1/prices/latest?symbol=A0000`, on the demo's --http-addr.
    let r = tickfleet_e2e::http::get(&http, "/v1/prices/latest?symbol=A0000");
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["symbol"], "A0000");
    assert!(
        p["price"]
            .as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .is_ok(),
        "{p}"
    );
    assert!(p["timestamp"].as_str().unwrap().ends_with('Z'), "{p}");

    let ticks = tickctl_json(&url, &["ticks", "A0000", "--limit", "5"]).unwrap();
    assert_eq!(ticks["ticks"].as_array().unwrap().len(), 5);
    assert_eq!(ticks["ticks"][0]["seq"], 1);

    let candles = tickctl_json(&url, &["candles", "A0000", "--interval", "1s"]).unwrap();
    let candles = candles["candles"].as_array().unwrap();
    assert!(!candles.is_empty());
    for c in candles {
        let n = |k: &str| {
            c[k].as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        };
        assert!(n("low") <= n("open") && n("open") <= n("high"), "{c}");
        assert!(n("low") <= n("close") && n("close") <= n("high"), "{c}");
        assert!(c["tick_count"].as_u64().unwrap() >= 1);
    }

    let ma = tickctl_json(&url, &["ma", "A0000", "--points", "10"]).unwrap();
    assert_eq!(ma["count"], 10, "{ma}");
    assert!(
        ma["vwap"].is_string(),
        "the generator's ticks have sizes: {ma}"
    );

    // `--api host:port` works as well as a URL.
    let out = Command::new(bin("tickctl"))
        .args(["watch", "A0001", "--count", "3", "--json"])
        .args(["--api", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let streamed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(streamed.len(), 3);
    assert!(streamed.iter().all(|t| t["asset_id"] == "A0001"));

    signal(&demo, "INT");
    let status =
        wait_exit(&mut demo, Duration::from_secs(90)).expect("the demo stops after Ctrl-C");
    let mut stdout = String::new();
    demo.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(status.success(), "demo exited with {status}:\n{stdout}");
    assert!(
        stdout.contains("tickctl watch A0000"),
        "prints what to try:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "curl 'http://{http}/v1/prices/latest?symbol=A0000'"
        )),
        "prints the REST api:\n{stdout}"
    );
    assert!(stdout.contains("-> OK"), "the audit passed:\n{stdout}");
}

/// `tickctl watch A0000 | head -3` (and any other output command whose reader goes away) stops quietly:
/// status 0 and nothing on stderr — not a panic ("failed printing to stdout: Broken pipe", status 101).
#[test]
fn tickctl_exits_quietly_when_head_closes_its_stdout() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut demo = KillOnDrop(
        Command::new(bin("tickctl"))
            .args(["demo", "--api-addr", &format!("127.0.0.1:{port}")])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--assets", "2", "--rate", "500", "--workers", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tickctl demo"),
    );
    // Enough stored for `ticks --limit 10000` to print more than a pipe buffer holds.
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the demo to store 2000 ticks of A0000",
        || {
            tickctl_json(&url, &["ticks", "A0000", "--limit", "2000"])
                .ok()
                .filter(|v| v["ticks"].as_array().is_some_and(|t| t.len() == 2000))
        },
    );
    for args in [
        &["watch", "A0000"][..],
        &["watch", "A0000", "--json"],
        &["watch", "A0000", "--candles", "1s"],
        &["ticks", "A0000", "--limit", "10000"],
    ] {
        let mut tickctl = KillOnDrop(
            Command::new(bin("tickctl"))
                .args(args)
                .args(["--api", &url])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tickctl"),
        );
        let head = Command::new("head")
            .arg("-3")
            .stdin(tickctl.0.stdout.take().unwrap())
            .output()
            .expect("run head");
        assert_eq!(
            String::from_utf8_lossy(&head.stdout).lines().count(),
            3,
            "{args:?}"
        );
        let status = wait_exit(&mut tickctl.0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("tickctl {args:?} still running after head exited"));
        let mut stderr = String::new();
        tickctl
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(
            status.success(),
            "tickctl {args:?} | head -3 exited with {status}: {stderr}"
        );
        assert!(
            stderr.is_empty(),
            "tickctl {args:?} printed on a closed stdout: {stderr}"
        );
    }
    signal(&demo.0, "INT");
    let status = wait_exit(&mut demo.0, Duration::from_secs(90)).expect("the demo stops");
    assert!(status.success(), "demo exited with {status}");
}

/// A child process killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

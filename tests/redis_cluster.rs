//! The pipeline on a Redis Cluster, end to end with the real binaries: `tickctl produce` → Apache Kafka
//! → two `tickfleet-worker --redis-mode cluster` → a 3-primary, 3-replica Redis Cluster of the test's
//! own (`scripts/redis-cluster.sh`) → two `tickfleet-api` replicas → `tickctl watch`/queries, while the
//! test moves slots between primaries or SIGKILLs a primary; and `tickctl demo` on the shared test
//! cluster.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tickfleet_e2e::{
    Api, RedisCluster, TestDir, Watch, Worker, WorkerSetup, assert_exact, produce_to_in_background,
    shared_topic, tickctl_json, total, verify_on, wait_for,
};

const CLUSTER: &[&str] = &["--redis-mode", "cluster"];

/// Workers of a fresh group and key prefix on `topic`, in cluster mode against `cluster`, with `extra`
/// flags.
fn cluster_setup(
    bootstrap: &str,
    topic: &str,
    dir: &Path,
    cluster: &RedisCluster,
    extra: &[&str],
) -> WorkerSetup {
    let mut setup = WorkerSetup::on(bootstrap, topic, dir, &cluster.urls);
    setup.args = CLUSTER.iter().chain(extra).map(|s| s.to_string()).collect();
    setup
}

/// `tickctl verify` (cluster mode) until every produced tick is stored once; the last summary.
fn wait_verified_on(
    report: &Path,
    cluster: &RedisCluster,
    prefix: &str,
    workers: &[Worker],
    timeout: Duration,
) -> serde_json::Value {
    // By hand rather than with `wait_for`, so that a timeout says what verify last found (lost or
    // doubled ticks, or only some not stored yet) and what the workers were doing.
    let deadline = Instant::now() + timeout;
    loop {
        let (clean, summary) = verify_on(report, &cluster.urls, prefix, CLUSTER);
        if clean {
            return summary;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for tickctl verify to find every tick stored once; \
                 its last summary: {summary}\n{}",
                worker_progress(workers)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What each worker reports about its partitions, its store errors and its readiness: for a
/// failure message (the whole `/metrics` text is written beside its log).
fn worker_progress(workers: &[Worker]) -> String {
    const SHOWN: &[&str] = &[
        "tickfleet_worker_ticks_stored_total",
        "tickfleet_worker_ticks_duplicate_total",
        "tickfleet_worker_committed_offset",
        "tickfleet_worker_consumer_lag_messages",
        "tickfleet_worker_store_errors_total",
        "tickfleet_worker_messages_dead_lettered_total",
        "tickfleet_worker_assigned_partitions",
        "tickfleet_worker_ready",
    ];
    let mut out = String::new();
    for (i, w) in workers.iter().enumerate() {
        let metrics = w.metrics().unwrap_or_default();
        let _ = std::fs::write(w.log.with_extension("metrics"), &metrics);
        let ready = tickfleet_e2e::http_status(&w.admin, "/readyz");
        out += &format!("worker {i} ({}): /readyz {ready:?}\n", w.log.display());
        for l in metrics
            .lines()
            .filter(|l| SHOWN.iter().any(|m| l.starts_with(m)))
        {
            out += &format!("  {l}\n");
        }
    }
    out
}

/// Every asset's tick count in a `produce --report`.
fn expected(report: &Path) -> BTreeMap<String, u64> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    r["assets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["count"].as_u64().unwrap()))
        .collect()
}

/// 300k ticks over 100 assets while 1500 of one primary's slots (with the keys in them) move to another:
/// nothing lost, nothing doubled, order kept; both api replicas answer `latest`/`ticks` throughout and
/// stream every tick once.
#[test]
fn a_reshard_mid_stream_loses_and_doubles_nothing() {
    const TICKS: u64 = 300_000;
    const MOVED_SLOTS: u32 = 1500;
    let dir = TestDir::new();
    let cluster = RedisCluster::start(&dir.path().join("redis-cluster"));
    let (bootstrap, topic) = shared_topic("rcluster-reshard", 8);
    let setup = cluster_setup(&bootstrap, &topic, dir.path(), &cluster, &[]);
    let prefix = setup.prefix.clone();
    let apis = [
        Api::start_on(&cluster.urls, &prefix, dir.path(), 0, CLUSTER),
        Api::start_on(&cluster.urls, &prefix, dir.path(), 1, CLUSTER),
    ];
    // The reshard moves the source primary's lowest slots: the streams follow the assets whose keys
    // live there, plus ten others (all 100 would be 300k JSON lines per client on a 2-core machine).
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    let (from, to) = (&primaries[0], &primaries[1]);
    let first = from.ranges.iter().map(|r| r.0).min().unwrap();
    let assets: Vec<String> = (0..100).map(|i| format!("A{i:04}")).collect();
    let watched: Vec<String> = assets
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            *i < 10 || {
                let slot = cluster.slot_of(&format!("{prefix}:{{{a}}}:ticks"));
                from.serves(slot) && slot < first + MOVED_SLOTS
            }
        })
        .map(|(_, a)| a.clone())
        .collect();
    let watches: Vec<Watch> = apis
        .iter()
        .enumerate()
        .map(|(i, api)| {
            let args: Vec<&str> = watched.iter().map(String::as_str).collect();
            Watch::start(&api.url, &args, dir.path().join(format!("watch-{i}.jsonl")))
        })
        .collect();
    for api in &apis {
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "the watch stream to open",
            || (api.metric("tickfleet_api_active_streams", "StreamTicks") == 1.0).then_some(()),
        );
    }
    let workers: Vec<Worker> = (0..2).map(|i| Worker::start(&setup, i)).collect();
    let producer = produce_to_in_background(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count",
            &TICKS.to_string(),
            "--assets",
            "100",
            "--rate",
            "20000",
        ],
    );

    wait_for(
        Duration::from_secs(120),
        Duration::from_millis(100),
        "30k ticks stored before the reshard",
        || (total(&workers, "tickfleet_worker_ticks_stored_total") >= 30_000.0).then_some(()),
    );
    // Queries against both replicas for as long as the slots move (every asset has ticks by now).
    let moving = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let queries = {
        let urls: Vec<String> = apis.iter().map(|a| a.url.clone()).collect();
        let (moving, ok, failed, errors) =
            (moving.clone(), ok.clone(), failed.clone(), errors.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while moving.load(Ordering::Relaxed) {
                let url = &urls[i % urls.len()];
                let asset = format!("A{:04}", i % 100);
                for args in [
                    vec!["latest", asset.as_str()],
                    vec!["ticks", asset.as_str(), "--limit", "5"],
                ] {
                    match tickctl_json(url, &args) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                i += 1;
            }
        })
    };

    let before = total(&workers, "tickfleet_worker_ticks_stored_total");
    let owner = |nodes: &[tickfleet_e2e::redis_cluster::Node], asset: &str| {
        let slot = cluster.slot_of(&format!("{prefix}:{{{asset}}}:ticks"));
        nodes.iter().find(|n| n.serves(slot)).map(|n| n.id.clone())
    };
    let owners_before: Vec<_> = assets.iter().map(|a| owner(&primaries, a)).collect();
    let started = Instant::now();
    cluster.reshard(from, to, MOVED_SLOTS);
    let took = started.elapsed();
    let move_ended = std::time::SystemTime::now();
    let after = total(&workers, "tickfleet_worker_ticks_stored_total");
    moving.store(false, Ordering::Relaxed);
    queries.join().unwrap();
    let moved = cluster.primaries();
    let assets_moved = assets
        .iter()
        .zip(&owners_before)
        .filter(|(a, before)| owner(&moved, a) != **before)
        .count();
    eprintln!(
        "reshard of 1500 slots took {took:?}, moved {assets_moved} of 100 assets' keys; {} ticks \
         were stored meanwhile ({before} before)",
        after - before
    );
    assert!(assets_moved > 0, "the moved slots held no asset");
    assert!(
        before < TICKS as f64 && after > before,
        "the slots moved while ticks were being stored ({before} before, {after} after)"
    );
    let slots = |id: &str| moved.iter().find(|n| n.id == id).map_or(0, |n| n.slots);
    assert_eq!(slots(&to.id), to.slots + MOVED_SLOTS);
    assert_eq!(slots(&from.id), from.slots - MOVED_SLOTS);
    let watched_moved: Vec<&String> = watched
        .iter()
        .filter(|a| {
            owner(&moved, a).as_deref() == Some(to.id.as_str())
                && owner(&primaries, a).as_deref() == Some(from.id.as_str())
        })
        .collect();
    assert!(
        !watched_moved.is_empty(),
        "no streamed asset moved: {watched:?}"
    );
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 0, "no query ran during the move");
    assert_eq!(
        failed,
        0,
        "queries failed during the move: {:?}",
        errors.lock().unwrap()
    );

    let report = producer.join().unwrap();
    let summary = wait_verified_on(
        &report,
        &cluster,
        &prefix,
        &workers,
        Duration::from_secs(180),
    );
    assert_exact(&summary, 100, TICKS);
    // The producer's end is when it wrote its report (it is joined only after the move).
    let produced = std::fs::metadata(&report).unwrap().modified().unwrap();
    let producer_vs_move = match move_ended.duration_since(produced) {
        Ok(d) => format!("the producer had finished {d:?} before the move ended"),
        Err(e) => format!(
            "the producer finished {:?} after the move ended",
            e.duration()
        ),
    };
    eprintln!(
        "every tick stored once {:?} after the move ended; {producer_vs_move}",
        started.elapsed() - took
    );
    let want = expected(&report);

    // Both replicas streamed every stored tick of the watched assets once, in sequence order, the
    // moved ones included.
    let want_streamed: u64 = watched.iter().map(|a| want[a]).sum();
    for (i, w) in watches.iter().enumerate() {
        wait_for(
            Duration::from_secs(120),
            Duration::from_millis(500),
            &format!("watch {i} to show {want_streamed} ticks"),
            || (w.lines().len() as u64 >= want_streamed).then_some(()),
        );
        let lines = w.lines();
        assert!(
            lines.iter().all(|l| l.get("gap").is_none()),
            "watch {i} reported a gap"
        );
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for l in &lines {
            seen.entry(l["asset_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(l["seq"].as_u64().unwrap());
        }
        for a in &watched {
            assert_eq!(seen[a], (1..=want[a]).collect::<Vec<_>>(), "watch {i}, {a}");
        }
        assert_eq!(seen.len(), watched.len(), "watch {i}");
    }
    drop(watches);
    eprintln!(
        "both api replicas streamed {want_streamed} ticks of {} assets ({} of them moved) once",
        watched.len(),
        watched_moved.len()
    );
}

/// Fails a primary over the hard way: stops its replica (SIGSTOP) and cuts the replication link (the
/// primary's `CLIENT KILL TYPE replica`), so for 2 s the primary takes writes the replica never gets;
/// SIGKILLs the primary, resumes the replica and waits until it was promoted; with `restart`, starts
/// the killed node again and waits until it is the new primary's replica. Returns the killed port.
fn fail_over_a_primary(cluster: &RedisCluster, restart: bool) -> u16 {
    let victim = cluster.primaries()[0].clone();
    let replica = cluster.replica_of(&victim.id);
    cluster.signal(replica.port, "STOP");
    RedisCluster::cli(victim.port, &["client", "kill", "type", "replica"]);
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(victim.port);
    cluster.signal(replica.port, "CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = cluster.nodes();
        let served: u32 = nodes
            .iter()
            .filter(|n| n.primary && !n.failed)
            .map(|n| n.slots)
            .sum();
        if served == 16384 && nodes.iter().any(|n| n.id == victim.id && n.failed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no replica was promoted in {victim:?}'s place within 30 s: {nodes:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.wait_healthy(Duration::from_secs(30));
    if restart {
        cluster.restart(victim.port);
    }
    victim.port
}

/// One failover run: 60k ticks over 50 assets, a primary SIGKILLed after 15k are stored, its replica
/// cut off for its last 2 s ([`fail_over_a_primary`]). Returns the verify summary once every tick is
/// stored (or once the count stops changing) and the ticks produced.
fn failover_run(acks: &str, name: &str) -> (serde_json::Value, u64) {
    const TICKS: u64 = 60_000;
    let dir = TestDir::new();
    let cluster = RedisCluster::start_failing_over_fast(&dir.path().join("redis-cluster"));
    let (bootstrap, topic) = shared_topic(name, 4);
    let setup = cluster_setup(
        &bootstrap,
        &topic,
        dir.path(),
        &cluster,
        &[
            "--redis-min-replica-acks",
            acks,
            "--redis-replica-ack-timeout-ms",
            "1000",
        ],
    );
    let workers: Vec<Worker> = (0..2).map(|i| Worker::start(&setup, i)).collect();
    let producer = produce_to_in_background(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count",
            &TICKS.to_string(),
            "--assets",
            "50",
            "--rate",
            "6000",
        ],
    );
    wait_for(
        Duration::from_secs(120),
        Duration::from_millis(50),
        "15k ticks stored before the failover",
        || (total(&workers, "tickfleet_worker_ticks_stored_total") >= 15_000.0).then_some(()),
    );
    // At 1 ack the promoted primary needs a replica again before its shard takes writes; at 0 the
    // killed node stays down (restarted without its data, it can take writes for a moment while it
    // still believes it is the primary, and loses them when it learns it is not: a second loss this
    // run would count too).
    fail_over_a_primary(&cluster, acks != "0");
    let report = producer.join().unwrap();
    (
        wait_verified_or_settled(&report, &cluster, &setup.prefix),
        TICKS,
    )
}

/// `tickctl verify` until it is clean, or until its `stored` count has not moved for 30 s (ticks lost
/// for good never arrive); the last summary.
fn wait_verified_or_settled(
    report: &Path,
    cluster: &RedisCluster,
    prefix: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let (clean, summary) = verify_on(report, &cluster.urls, prefix, CLUSTER);
        let stored = summary["stored"].as_u64().unwrap_or(0);
        if clean || last.1.elapsed() > Duration::from_secs(30) || Instant::now() > deadline {
            return summary;
        }
        if stored != last.0 {
            last = (stored, Instant::now());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// With `--redis-min-replica-acks 1`, an offset is committed only once a replica holds its batch: after
/// a primary is SIGKILLed mid-stream and its replica promoted, every tick is stored exactly once.
#[test]
fn a_failover_with_one_replica_ack_loses_nothing() {
    let (summary, ticks) = failover_run("1", "rcluster-failover-acks");
    assert_exact(&summary, 50, ticks);
}

/// The same failover with `--redis-min-replica-acks 0`: an offset may be committed before the replica
/// has the batch, so ticks the dead primary had not replicated are lost for good. Not a failure: the
/// test reports the count (nothing may be doubled, and every tick is stored or lost).
#[test]
fn a_failover_without_replica_acks_may_lose_what_was_not_replicated() {
    let (summary, ticks) = failover_run("0", "rcluster-failover-noacks");
    let lost = summary["lost"].as_u64().unwrap();
    eprintln!("failover at 0 replica acks: {lost} of {ticks} ticks lost");
    assert_eq!(summary["expected"], ticks, "{summary}");
    assert_eq!(
        summary["stored"].as_u64().unwrap() + lost,
        ticks,
        "{summary}"
    );
    for field in ["duplicated", "unexpected"] {
        assert_eq!(summary[field], 0, "{field}: {summary}");
    }
}

/// `tickctl demo --redis SEEDS --redis-mode cluster`: the demo's workers store into the shared test
/// cluster and its api serves from it; Ctrl-C stops it cleanly.
#[test]
fn tickctl_demo_runs_on_a_redis_cluster() {
    let urls = tickfleet_e2e::redis_cluster_urls();
    let prefix = format!("demo-cluster-{}", std::process::id());
    let port = tickfleet_e2e::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut demo = std::process::Command::new(tickfleet_e2e::bin("tickctl"))
        .args(["demo", "--api-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--http-addr",
            &format!("127.0.0.1:{}", tickfleet_e2e::free_port()),
        ])
        .args([
            "--redis",
            &urls,
            "--redis-mode",
            "cluster",
            "--redis-prefix",
            &prefix,
        ])
        .args(["--assets", "5", "--rate", "2000", "--workers", "2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start tickctl demo");
    let latest = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the demo to serve the latest tick of all 5 assets from the cluster",
        || {
            tickctl_json(&url, &["latest"])
                .ok()
                .filter(|v| v["ticks"].as_array().is_some_and(|t| t.len() == 5))
        },
    );
    assert_eq!(latest["ticks"][0]["asset_id"], "A0000", "{latest}");
    // The ticks are in the cluster, under the demo's prefix, in each asset's own slot.
    let seed = urls.split(',').next().unwrap();
    let port_of = seed.rsplit(':').next().unwrap().trim_end_matches('/');
    for asset in ["A0000", "A0004"] {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-c",
                "-p",
                port_of,
                "ZCARD",
                &format!("{prefix}:{{{asset}}}:ticks"),
            ])
            .output()
            .expect("run redis-cli");
        let n: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(n > 0, "{asset}: {n} ticks in the cluster");
    }
    tickfleet_e2e::signal(&demo, "INT");
    let status = demo.wait().unwrap();
    assert!(status.success(), "the demo exits 0 on Ctrl-C: {status}");
}

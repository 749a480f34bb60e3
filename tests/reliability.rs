//! Reliability end to end, with the real binaries on Apache Kafka: poison messages, a Redis outage, a
//! broker SIGKILLed and restarted on its log dirs, and a SIGKILLed worker. Each test counts: `tickctl
//! verify` must find every produced tick stored exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tickfleet_e2e::{
    Kafka, RedisServer, Worker, WorkerSetup, assert_exact, create_topic, dump_logs, http_get,
    partition_leaders, produce, produce_in_background, produce_to_in_background, redis_url,
    shared_topic, signal, tickctl, total, wait_exit, wait_for, wait_verified,
};

const STORED: &str = "tickfleet_worker_ticks_stored_total";
const DUPLICATES: &str = "tickfleet_worker_ticks_duplicate_total";
const DEAD: &str = "tickfleet_worker_messages_dead_lettered_total";
const COMMITTED: &str = "tickfleet_worker_committed_offset";

fn report_counts(report: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap()
}

#[test]
fn poison_goes_to_the_dlq_with_its_reason_valid_ticks_are_stored_and_replay_works_after_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("reliability", 4);
    let dlq = format!("{topic}.dlq");
    let setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    let worker = Worker::start(&setup, 0);
    // 6000 ticks, and after every 100 one poison message: 60, ten of each kind.
    let report = produce(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count",
            "6000",
            "--assets",
            "20",
            "--poison-every",
            "100",
            "--seed",
            "3",
        ],
    );
    let expected: BTreeMap<String, u64> =
        serde_json::from_value(report_counts(&report)["poison"].clone()).unwrap();
    assert_eq!(expected.len(), 6, "{expected:?}");
    assert_eq!(expected.values().sum::<u64>(), 60);

    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(60),
    );
    assert_exact(&summary, 20, 6000);
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "60 dead letters counted",
        || (worker.metric(DEAD) == 60.0).then_some(()),
    );

    let (ok, out) = tickctl(&[
        "dlq",
        "list",
        "--json",
        "--brokers",
        &bootstrap,
        "--topic",
        &dlq,
    ]);
    assert!(ok);
    let letters: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for l in &letters {
        *by_reason
            .entry(l["reason"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert!(!l["error"].as_str().unwrap().is_empty(), "{l}");
        assert!(
            l["source"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{topic}/")),
            "{l}"
        );
    }
    assert_eq!(by_reason, expected, "dead letters by reason");

    // The fix: accept bigger messages. The oversized dead letters are valid ticks of asset POISON.
    // A rolling restart: the old worker drains and commits, so the new one re-reads (and re-dead-letters)
    // nothing.
    let mut worker = worker;
    signal(&worker.child, "TERM");
    let status = wait_exit(&mut worker.child, Duration::from_secs(30)).expect("worker drained");
    assert!(status.success(), "{}", worker.log_text());
    let mut fixed = setup.clone();
    fixed.args = vec!["--max-payload-bytes".into(), "200000".into()];
    let worker = Worker::start(&fixed, 1);
    let (ok, out) = tickctl(&[
        "dlq",
        "replay",
        "--brokers",
        &bootstrap,
        "--topic",
        &dlq,
        "--reason",
        "oversized",
    ]);
    assert!(ok);
    assert!(
        out.contains("replayed 10 dead letters, skipped 50"),
        "{out}"
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the 10 replayed ticks stored",
        || (worker.metric(STORED) == 10.0).then_some(()),
    );
    // Replaying again with the same group finds nothing new to replay. (Filtered by reason: a worker
    // that re-reads a poison message after a crash dead-letters it again, which is allowed.)
    let (ok, out) = tickctl(&[
        "dlq",
        "replay",
        "--brokers",
        &bootstrap,
        "--topic",
        &dlq,
        "--reason",
        "oversized",
    ]);
    assert!(ok);
    assert!(out.contains("replayed 0 dead letters"), "{out}");
}

/// Redis is down for 12 s: twice the workers' session timeout (6 s) and past the point where the
/// store retry's backoff reaches its 5 s ceiling (after about 6.4 s of failures), with a commit due
/// every 500 ms throughout. So a worker that stopped polling Kafka while its writes failed, gave up
/// on the store, or committed past what it could not store would show here as surely as in the 30 s
/// this outage lasted before (which cost 18 s more of the CI run, spent waiting).
#[test]
fn redis_down_12s_pauses_commits_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(&dir.path().join("redis"));
    let (bootstrap, topic) = shared_topic("reliability", 8);
    let setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis.url());
    let workers: Vec<Worker> = (0..2).map(|n| Worker::start(&setup, n)).collect();
    let producer = produce_to_in_background(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count", "60000", "--assets", "40", "--rate", "4000", "--seed", "11",
        ],
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "10k ticks stored",
        || (total(&workers, STORED) >= 10_000.0).then_some(()),
    );
    // The group must have settled before the outage: a rebalance during it moves partitions, and the
    // new owner's committed-offset gauge would count as a commit made while Redis was down.
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "both workers to own partitions",
        || {
            workers
                .iter()
                .all(|w| w.metric("tickfleet_worker_assigned_partitions") > 0.0)
                .then_some(())
        },
    );

    redis.kill();
    let down_at = Instant::now();
    wait_for(
        Duration::from_secs(15),
        Duration::from_millis(100),
        "both workers to report not ready",
        || {
            workers
                .iter()
                .all(|w| http_get(&w.admin, "/readyz").is_none())
                .then_some(())
        },
    );
    // Let in-flight commits of what was stored before the kill settle, then watch: no commit may move
    // while nothing can be stored.
    std::thread::sleep(Duration::from_secs(3));
    let committed = total(&workers, COMMITTED);
    let stored = total(&workers, STORED);
    while down_at.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            total(&workers, COMMITTED),
            committed,
            "an offset was committed while Redis was down"
        );
        assert!(
            workers
                .iter()
                .all(|w| http_get(&w.admin, "/readyz").is_none()),
            "ready while Redis is down"
        );
    }
    assert_eq!(total(&workers, STORED), stored);

    redis.start_again();
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "workers ready again",
        || {
            workers
                .iter()
                .all(|w| http_get(&w.admin, "/readyz").is_some())
                .then_some(())
        },
    );
    let report = producer.join().unwrap();
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(120),
    );
    assert_exact(&summary, 40, 60_000);
    assert!(
        total(&workers, COMMITTED) > committed,
        "commits resumed: {committed} before\n{}\n{}",
        workers
            .iter()
            .filter_map(|w| w.metrics())
            .collect::<Vec<_>>()
            .join("\n"),
        dump_logs(&workers)
    );
    let errors = total(&workers, "tickfleet_worker_store_errors_total");
    assert!(
        errors > 0.0,
        "the outage was seen as store errors\n{}",
        dump_logs(&workers)
    );
}

#[test]
fn broker_sigkilled_and_restarted_on_its_log_dirs_workers_reconnect_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A broker of this test's own: it is SIGKILLed (no flush, no controlled shutdown) and started again
    // on the same log dirs, so the ticks and committed offsets it had acknowledged come back from disk.
    let kafka = Kafka::start(&[]);
    create_topic(&kafka.bootstrap, &[], "ticks", 8, None);
    let setup = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis_url());
    let mut workers: Vec<Worker> = (0..2).map(|n| Worker::start(&setup, n)).collect();
    let producer = produce_in_background(
        &kafka.bootstrap,
        dir.path(),
        &[
            "--count", "60000", "--assets", "40", "--rate", "4000", "--seed", "13",
        ],
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "10k ticks stored",
        || (total(&workers, STORED) >= 10_000.0).then_some(()),
    );
    let committed = total(&workers, COMMITTED);
    let t = Instant::now();
    kafka.kill();
    std::thread::sleep(Duration::from_secs(10));
    let during = total(&workers, STORED);
    kafka.restart();
    eprintln!("broker back {:?} after the SIGKILL", t.elapsed());
    let report = producer.join().unwrap();
    eprintln!("producer done {:?} after the SIGKILL", t.elapsed());
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(120),
    );
    assert_exact(&summary, 40, 60_000);
    assert!(
        total(&workers, STORED) > during,
        "workers resumed after the restart"
    );
    assert!(
        committed > 0.0 && total(&workers, COMMITTED) > committed,
        "commits before the kill, and again after the restart\n{}",
        dump_logs(&workers)
    );
    for w in &mut workers {
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "a worker exited\n{}",
            w.log_text()
        );
    }
}

#[test]
fn three_brokers_rf3_acks_all_partition_leader_sigkilled_mid_stream_nothing_lost_nothing_doubled() {
    let dir = tempfile::tempdir().unwrap();
    // Three KRaft nodes (each broker and controller, one quorum); min.insync.replicas 2.
    let kafka = Kafka::start(&["--nodes", "3"]);
    create_topic(&kafka.bootstrap, &[], "ticks", 8, Some(3));
    create_topic(&kafka.bootstrap, &[], "ticks.dlq", 2, Some(3));
    let setup = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis_url());
    let mut workers: Vec<Worker> = (0..2).map(|n| Worker::start(&setup, n)).collect();
    let producer = produce_in_background(
        &kafka.bootstrap,
        dir.path(),
        &[
            "--count",
            "60000",
            "--assets",
            "40",
            "--rate",
            "4000",
            "--seed",
            "23",
            "--kafka-option",
            "acks=all",
        ],
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "10k ticks stored",
        || (total(&workers, STORED) >= 10_000.0).then_some(()),
    );
    // The leader of partition 0 (node id K is node-K) dies mid-stream.
    let victim = partition_leaders(&kafka.bootstrap, &[], "ticks")[0];
    assert!(victim >= 1, "partition 0 has a leader");
    kafka.kill_node(usize::try_from(victim).unwrap());
    let stored_at_kill = total(&workers, STORED);
    let leaders = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "partition 0 to be led by a surviving broker",
        || {
            let l = partition_leaders(&kafka.bootstrap, &[], "ticks");
            (l[0] >= 1 && l[0] != victim).then_some(l)
        },
    );
    eprintln!("broker {victim} SIGKILLed; leaders now {leaders:?}");
    let report = producer.join().unwrap();
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(120),
    );
    assert_exact(&summary, 40, 60_000);
    assert!(
        total(&workers, STORED) > stored_at_kill,
        "the workers carried on after the leader died"
    );
    for w in &mut workers {
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "a worker exited\n{}",
            w.log_text()
        );
    }
}

#[test]
fn sigkill_mid_batch_moves_partitions_and_redelivery_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("reliability", 8);
    let setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    // Worker 0 commits rarely, so when it is killed it holds stored-but-uncommitted ticks that the
    // survivors must receive again.
    let mut lazy = setup.clone();
    lazy.args = vec!["--commit-interval-ms".into(), "60000".into()];
    let mut workers = vec![
        Worker::start(&lazy, 0),
        Worker::start(&setup, 1),
        Worker::start(&setup, 2),
    ];
    let producer = produce_to_in_background(
        &bootstrap,
        &topic,
        dir.path(),
        &[
            "--count", "80000", "--assets", "50", "--rate", "8000", "--seed", "17",
        ],
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "worker 0 to store 5k ticks",
        || (workers[0].metric(STORED) >= 5_000.0).then_some(()),
    );
    signal(&workers[0].child, "KILL");
    let status = wait_exit(&mut workers[0].child, Duration::from_secs(5)).expect("killed");
    assert!(!status.success());

    let report = producer.join().unwrap();
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(120),
    );
    assert_exact(&summary, 50, 80_000);
    let redelivered = total(&workers[1..], DUPLICATES);
    assert!(
        redelivered > 0.0,
        "the survivors re-read worker 0's uncommitted ticks\n{}",
        dump_logs(&workers)
    );
    assert_eq!(
        total(&workers[1..], "tickfleet_worker_assigned_partitions"),
        8.0
    );
}

#[test]
fn drain_is_bounded_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(&dir.path().join("redis"));
    let (bootstrap, topic) = shared_topic("reliability", 4);
    // Two independent workers (each its own group and key prefix, so each reads every partition and
    // no rebalance is involved): one to run out its drain bound, one to get a second signal. Both
    // start on a fresh redis-server, so their first writes race each other's script load (this once
    // made a worker count ticks it had stored as duplicates: `writers_racing_a_script_load_…`).
    let start = |n| {
        let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis.url());
        setup.args = vec!["--drain-timeout-secs".into(), "4".into()];
        Worker::start(&setup, n)
    };
    let mut bounded = start(0);
    let mut impatient = start(1);
    produce(
        &bootstrap,
        &topic,
        dir.path(),
        &["--count", "2000", "--assets", "40"],
    );
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "both workers to store the first 2000 ticks",
        || {
            let both = [&bounded, &impatient]
                .iter()
                .all(|w| w.metric(STORED) >= 2000.0);
            both.then_some(())
        },
    );
    // With Redis gone and ticks in flight, a drain cannot finish: it must stop at its bound, not hang.
    redis.kill();
    produce(
        &bootstrap,
        &topic,
        dir.path(),
        &["--count", "2000", "--assets", "40", "--seed", "2"],
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "ticks held in flight",
        || {
            (bounded.metric("tickfleet_worker_in_flight_messages") > 0.0
                && impatient.metric("tickfleet_worker_in_flight_messages") > 0.0)
                .then_some(())
        },
    );

    signal(&bounded.child, "TERM");
    signal(&impatient.child, "TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        impatient.child.try_wait().unwrap().is_none(),
        "still draining after one signal"
    );
    signal(&impatient.child, "TERM");
    let status = wait_exit(&mut impatient.child, Duration::from_secs(2))
        .expect("second signal exits at once");
    assert_eq!(status.code(), Some(130), "{}", impatient.log_text());

    let status = wait_exit(&mut bounded.child, Duration::from_secs(15)).expect("drain bounded");
    let log = bounded.log_text();
    assert_eq!(
        status.code(),
        Some(1),
        "a drain cut short by its bound exits 1\n{log}"
    );
    assert!(log.contains("did not drain in time"), "{log}");
}

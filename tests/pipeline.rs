//! The core data path end to end, with the real binaries: `tickctl produce` → Apache Kafka (the run's
//! shared broker, a topic of each test's own) → `tickfleet-worker` processes in one consumer group → a
//! real redis-server, audited by `tickctl verify` (per asset: nothing lost, nothing doubled, order kept).
//! The scale-out test runs once per store (`--store redis|postgres|both`, PostgreSQL being the run's
//! shared server, each test in a schema of its own), with `tickctl verify` reading every store written.

use std::time::Duration;

use tickfleet_e2e::postgres::{Store, assert_psql_shows, postgres_url};
use tickfleet_e2e::{
    Worker, WorkerSetup, assert_exact, dump_logs, produce_to_in_background, redis_url,
    shared_topic, signal, total, verify_on, wait_exit, wait_for, wait_verified,
};
use tickfleet_store::postgres::schema::for_prefix as schema_of;

const TICKS: u64 = 100_000;
const STORED: &str = "tickfleet_worker_ticks_stored_total";
const ASSIGNED: &str = "tickfleet_worker_assigned_partitions";
/// 100k ticks over 50 assets at 10k/s: 10 s of traffic.
const LOAD: &[&str] = &[
    "--count", "100000", "--assets", "50", "--rate", "10000", "--seed", "7",
];

#[test]
fn one_then_three_workers_store_every_tick_exactly_once() {
    one_then_three_workers(Store::Redis);
}

#[test]
fn one_then_three_workers_store_every_tick_exactly_once_in_postgres() {
    one_then_three_workers(Store::Postgres);
}

#[test]
fn one_then_three_workers_store_every_tick_exactly_once_in_both_stores() {
    one_then_three_workers(Store::Both);
}

fn one_then_three_workers(store: Store) {
    let pg_url = if store.has_postgres() {
        postgres_url()
    } else {
        String::new()
    };
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic(&format!("pipeline-{}", store.name()), 8);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = store.args(&pg_url);
    let producer = produce_to_in_background(&bootstrap, &topic, dir.path(), LOAD);

    let mut workers = vec![Worker::start(&setup, 0)];
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the first worker to store 10k ticks",
        || (workers[0].metric(STORED) >= 10_000.0).then_some(()),
    );
    workers.push(Worker::start(&setup, 1));
    workers.push(Worker::start(&setup, 2));
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "partitions spread over three workers",
        || {
            workers
                .iter()
                .all(|w| w.metric(ASSIGNED) >= 1.0)
                .then_some(())
        },
    );

    let report = producer.join().unwrap();
    // Each tick is counted as stored by exactly one worker: the store's ZADD NX says whether it was new.
    wait_for(
        Duration::from_secs(120),
        Duration::from_millis(500),
        "all ticks stored",
        || (total(&workers, STORED) >= TICKS as f64).then_some(()),
    );
    for audit in store.audits(&pg_url) {
        let audit: Vec<&str> = audit.iter().map(String::as_str).collect();
        let (clean, summary) = verify_on(&report, &setup.redis_url, &setup.prefix, &audit);
        assert!(clean, "{audit:?}: {summary}\n{}", dump_logs(&workers));
        assert_exact(&summary, 50, TICKS);
    }
    if store.has_postgres() {
        assert_psql_shows(&pg_url, &schema_of(&setup.prefix), TICKS);
    }

    let assigned: Vec<f64> = workers.iter().map(|w| w.metric(ASSIGNED)).collect();
    assert_eq!(
        assigned.iter().sum::<f64>(),
        8.0,
        "all 8 partitions owned: {assigned:?}"
    );
    assert!(
        assigned.iter().all(|a| *a >= 1.0),
        "every worker owns partitions: {assigned:?}"
    );
    let stored: Vec<f64> = workers.iter().map(|w| w.metric(STORED)).collect();
    assert!(
        stored.iter().all(|s| *s > 0.0),
        "every worker stored ticks: {stored:?}"
    );
    assert_eq!(
        stored.iter().sum::<f64>(),
        TICKS as f64,
        "no tick counted as new twice: {stored:?}"
    );
}

#[test]
fn sigterm_mid_stream_drains_exits_zero_and_totals_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("pipeline", 8);
    let setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    let producer = produce_to_in_background(&bootstrap, &topic, dir.path(), LOAD);
    let mut workers: Vec<Worker> = (0..3).map(|n| Worker::start(&setup, n)).collect();

    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "30k ticks stored, every worker busy",
        || {
            (total(&workers, STORED) >= 30_000.0 && workers.iter().all(|w| w.metric(STORED) > 0.0))
                .then_some(())
        },
    );
    signal(&workers[0].child, "TERM");
    let status = wait_exit(&mut workers[0].child, Duration::from_secs(25)).unwrap_or_else(|| {
        panic!(
            "worker 0 did not exit within its drain bound\n{}",
            dump_logs(&workers)
        )
    });
    let log = workers[0].log_text();
    assert!(status.success(), "worker 0 exited with {status}\n{log}");
    assert!(
        log.contains("outcome=Clean"),
        "worker 0 did not drain cleanly:\n{log}"
    );
    assert!(
        log.contains("consumer closed"),
        "worker 0 did not close its consumer:\n{log}"
    );

    let report = producer.join().unwrap();
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(120),
    );
    assert_exact(&summary, 50, TICKS);
    // The survivors took over all 8 partitions.
    let assigned = total(&workers[1..], ASSIGNED);
    assert_eq!(assigned, 8.0, "{}", dump_logs(&workers));
}

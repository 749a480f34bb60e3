//! A PostgreSQL crash end to end, with the real binaries: `tickctl produce` → Apache Kafka →
//! `tickfleet-worker --store postgres|both` → a PostgreSQL of the test's own, crashed
//! (`pg_ctl -m immediate`) and started again mid-stream, audited by `tickctl verify` reading from
//! PostgreSQL; `psql` shows the ticks, the day partitions and the migrations.
//!
//! The same pipeline on every store with PostgreSQL the run's shared server is in `tests/pipeline.rs`
//! (one then three workers, `--store redis|postgres|both`), and a clean PostgreSQL restart among worker
//! kills and a broker restart in `tests/chaos.rs`.

use std::time::Duration;

use tickfleet_e2e::postgres::{Postgres, Store, assert_psql_shows};
use tickfleet_e2e::{
    Worker, WorkerSetup, assert_exact, dump_logs, produce_to_in_background, redis_url,
    shared_topic, total, verify_on, wait_for,
};
use tickfleet_store::postgres::schema::for_prefix as schema_of;

const STORED: &str = "tickfleet_worker_ticks_stored_total";
const STORE_ERRORS: &str = "tickfleet_worker_store_errors_total";

/// Produces `ticks` over `assets` while two workers store them with `--store kind` on `pg_url`;
/// `during` runs once the first 20% are stored. Returns the setup and the store errors the workers
/// met, after checking with `tickctl verify` (from PostgreSQL) that every tick is there once and the
/// workers counted each once.
fn run(
    kind: Store,
    pg_url: &str,
    ticks: u64,
    assets: u64,
    during: impl FnOnce(),
) -> (WorkerSetup, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic(&format!("pg-{}", kind.name()), 4);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = kind.args(pg_url);
    let load = [
        "--count".to_string(),
        ticks.to_string(),
        "--assets".into(),
        assets.to_string(),
        "--rate".into(),
        "5000".into(),
        "--seed".into(),
        "11".into(),
    ];
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let producer = produce_to_in_background(&bootstrap, &topic, dir.path(), &load);
    let workers = vec![Worker::start(&setup, 0), Worker::start(&setup, 1)];
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "a fifth of the ticks stored",
        || (total(&workers, STORED) >= (ticks / 5) as f64).then_some(()),
    );
    during();
    let report = producer.join().unwrap();
    wait_for(
        Duration::from_secs(120),
        Duration::from_millis(500),
        "all ticks stored",
        || (total(&workers, STORED) >= ticks as f64).then_some(()),
    );
    let verify_args = Store::Postgres.args(pg_url);
    let verify_args: Vec<&str> = verify_args.iter().map(String::as_str).collect();
    let (clean, summary) = verify_on(&report, &setup.redis_url, &setup.prefix, &verify_args);
    assert!(clean, "{summary}\n{}", dump_logs(&workers));
    assert_exact(&summary, assets, ticks);
    assert_eq!(
        total(&workers, STORED),
        ticks as f64,
        "no tick counted as new twice"
    );
    (setup, total(&workers, STORE_ERRORS))
}

#[test]
fn a_postgres_crash_mid_stream_loses_nothing_and_doubles_nothing() {
    let pg = Postgres::start();
    for kind in [Store::Postgres, Store::Both] {
        let (setup, errors) = run(kind, &pg.url, 30_000, 20, || pg.restart());
        // The crash was felt: writes failed (and were retried) while the server was down.
        assert!(
            errors > 0.0,
            "--store {}: no store error during the crash",
            kind.name()
        );
        assert_psql_shows(&pg.url, &schema_of(&setup.prefix), 30_000);
    }
}

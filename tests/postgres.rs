//! The PostgreSQL store end to end, with the real binaries: `tickctl produce` → Apache Kafka →
//! `tickfleet-worker --store postgres|both` → a real PostgreSQL (and redis-server), audited by
//! `tickctl verify` reading from PostgreSQL; `psql` shows the ticks, the day partitions and the
//! migrations. The restart test runs its own PostgreSQL and crashes it (`pg_ctl -m immediate`) mid-run.

use std::time::Duration;

use tickfleet_e2e::postgres::{Postgres, postgres_url, psql};
use tickfleet_e2e::{
    Worker, WorkerSetup, assert_exact, dump_logs, produce_to_in_background, redis_url,
    shared_topic, total, verify_on, wait_for,
};
use tickfleet_store::postgres::schema::for_prefix as schema_of;

const STORED: &str = "tickfleet_worker_ticks_stored_total";
const STORE_ERRORS: &str = "tickfleet_worker_store_errors_total";

fn store_args(kind: &str, url: &str) -> Vec<String> {
    ["--store", kind, "--postgres-url", url]
        .map(String::from)
        .to_vec()
}

/// Produces `ticks` over `assets` while two workers store them with `--store kind` on `pg_url`;
/// `during` runs once the first 20% are stored. Returns the setup and the store errors the workers
/// met, after checking with `tickctl verify` (from PostgreSQL) that every tick is there once and the
/// workers counted each once.
fn run(
    kind: &str,
    pg_url: &str,
    ticks: u64,
    assets: u64,
    during: impl FnOnce(),
) -> (WorkerSetup, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic(&format!("pg-{kind}"), 4);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = store_args(kind, pg_url);
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
    let verify_args = store_args("postgres", pg_url);
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

/// What `psql` shows of a pipeline's schema: ticks, partitions, migrations.
fn psql_shows(url: &str, schema: &str, ticks: u64) {
    let count = psql(url, &format!("SELECT count(*) FROM {schema}.ticks"));
    assert_eq!(count, [ticks.to_string()]);
    let partitions = psql(
        url,
        &format!(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = '{schema}.ticks'::regclass ORDER BY 1"
        ),
    );
    assert!(
        !partitions.is_empty() && partitions.iter().all(|p| p.starts_with("ticks_20")),
        "day partitions: {partitions:?}"
    );
    let migrations = psql(
        url,
        &format!("SELECT version, name FROM {schema}.schema_migrations ORDER BY version"),
    );
    assert_eq!(migrations, ["1|ticks"]);
}

#[test]
fn postgres_store_keeps_every_tick_once_and_psql_shows_them() {
    let url = postgres_url();
    let (setup, _) = run("postgres", &url, 20_000, 20, || {});
    psql_shows(&url, &schema_of(&setup.prefix), 20_000);
}

#[test]
fn both_stores_hold_every_tick_once() {
    let url = postgres_url();
    let (setup, _) = run("both", &url, 20_000, 20, || {});
    psql_shows(&url, &schema_of(&setup.prefix), 20_000);
    // Redis has them too: the same audit, reading Redis.
    let mut redis = redis::Client::open(setup.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:{{*}}:ticks", setup.prefix))
        .query(&mut redis)
        .unwrap();
    let stored: u64 = keys
        .iter()
        .map(|k| redis::cmd("ZCARD").arg(k).query::<u64>(&mut redis).unwrap())
        .sum();
    assert_eq!((keys.len(), stored), (20, 20_000));
}

#[test]
fn a_postgres_crash_mid_stream_loses_nothing_and_doubles_nothing() {
    let pg = Postgres::start();
    for kind in ["postgres", "both"] {
        let (setup, errors) = run(kind, &pg.url, 30_000, 20, || pg.restart());
        // The crash was felt: writes failed (and were retried) while the server was down.
        assert!(
            errors > 0.0,
            "--store {kind}: no store error during the crash"
        );
        psql_shows(&pg.url, &schema_of(&setup.prefix), 30_000);
    }
}

//! The chaos suite: 300k ticks over 100 assets into 8 partitions of an Apache Kafka broker of the test's
//! own while a seeded driver SIGKILLs and SIGTERMs workers, scales the group 1 → 4 → 2, restarts Redis
//! once (SIGKILL, then start on the same data) and SIGKILLs the broker once (then starts it on the same
//! log dirs). At the end `tickctl verify` must report 0 lost, 0 duplicated, order kept.
//!
//! It runs twice: with the classic consumer group protocol (cooperative-sticky), and with KIP-848's
//! `--group-protocol consumer`, where the broker assigns partitions and moves only those that change
//! owner, with no group-wide barrier. (On KIP-848 a broker restart fences members whose heartbeats were
//! late; their final commit is refused with UNKNOWN_MEMBER_ID, a hand-over the worker exits 0 on.)
//!
//! It runs on each store too (classic protocol): `--store postgres`, where PostgreSQL (a server of the
//! test's own) is restarted cleanly (`pg_ctl -m fast`: sessions ended, then down until a worker's write
//! has failed on it) in place of Redis, and `--store both`, where Redis is SIGKILLed and PostgreSQL
//! restarted, each once; `tickctl verify` audits every store written. (A PostgreSQL crash is
//! `tests/postgres.rs`.) These two keep what is about the store — its restarts, a worker SIGKILLed with
//! stored-but-uncommitted ticks that the next owner writes again, two workers SIGTERMed (each drains
//! and commits into it) — and leave the broker restart and the extra kills to the two Redis runs, which
//! prove those whatever the store (the worker's Kafka side knows no store): fewer ticks (150k on
//! PostgreSQL, 200k on both, at the same 5,000/s) and half the run each. Their store restarts come
//! first, while the producer still produces for certain.
//!
//! The seed is printed; `TICKFLEET_CHAOS_SEED=N` replays the same schedule (which workers, when, how
//! long; process timing on a shared machine still varies).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tickfleet_e2e::postgres::{Postgres, Store};
use tickfleet_e2e::{
    Kafka, RedisServer, Worker, WorkerSetup, assert_exact, create_topic, dump_logs,
    produce_in_background, signal, wait_exit, wait_for, wait_verified_on,
};

/// Ticks of the runs on Redis (60 s at 5,000/s: every event falls while they are produced).
const TICKS: u64 = 300_000;
const ASSETS: u64 = 100;
/// Production rate of every run.
const RATE: u64 = 5_000;

/// The workers alive now, and the numbering of the next one.
struct Fleet {
    setup: WorkerSetup,
    live: Vec<Worker>,
    gone: Vec<Worker>,
    next: usize,
    started: Instant,
}

impl Fleet {
    fn log(&self, what: &str) {
        eprintln!(
            "chaos [{:>5.1}s] {what} (live workers: {})",
            self.started.elapsed().as_secs_f64(),
            self.live.len()
        );
    }

    /// Whether some worker, alive or gone, logged a failed PostgreSQL write (the chaos schedule
    /// restarts PostgreSQL once, so any such line is from that restart).
    fn postgres_write_failed(&self) -> bool {
        self.live.iter().chain(&self.gone).any(|w| {
            w.log_text()
                .lines()
                .any(|l| l.contains("store write failed") && l.contains("postgres:"))
        })
    }

    fn add(&mut self) {
        self.live.push(Worker::start(&self.setup, self.next));
        self.next += 1;
    }

    fn kill(&mut self, rng: &mut StdRng) {
        let i = rng.random_range(0..self.live.len());
        let mut w = self.live.remove(i);
        signal(&w.child, "KILL");
        wait_exit(&mut w.child, Duration::from_secs(10)).expect("SIGKILLed worker gone");
        self.log(&format!("SIGKILLed {}", w.log.display()));
        self.gone.push(w);
    }

    fn terminate(&mut self, rng: &mut StdRng) {
        let i = rng.random_range(0..self.live.len());
        let mut w = self.live.remove(i);
        signal(&w.child, "TERM");
        let status = wait_exit(&mut w.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("SIGTERMed worker did not exit in time\n{}", w.log_text()));
        assert!(
            status.success(),
            "SIGTERMed worker exited with {status}\n{}",
            w.log_text()
        );
        self.log(&format!("SIGTERMed {} (exit 0)", w.log.display()));
        self.gone.push(w);
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    KillOne,
    TerminateOne,
    RestartRedis,
    RestartPostgres,
    BrokerRestart,
}

#[test]
fn chaos_loses_nothing_and_doubles_nothing() {
    chaos(&[], Store::Redis);
}

#[test]
fn chaos_on_the_kip848_consumer_group_protocol_loses_nothing_and_doubles_nothing() {
    chaos(&["--group-protocol", "consumer"], Store::Redis);
}

#[test]
fn chaos_on_postgres_loses_nothing_and_doubles_nothing() {
    chaos(&[], Store::Postgres);
}

#[test]
fn chaos_on_both_stores_loses_nothing_and_doubles_nothing() {
    chaos(&[], Store::Both);
}

/// One chaos run; `worker_args` are given to every worker, which write `store`.
fn chaos(worker_args: &[&str], store: Store) {
    let seed: u64 = std::env::var("TICKFLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed: {seed} (replay with TICKFLEET_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let pause = |rng: &mut StdRng, lo: u64, hi: u64| {
        std::thread::sleep(Duration::from_millis(rng.random_range(lo..hi)))
    };

    // The per-store runs' shorter schedule (see the module doc): their store restarts are over about
    // 30 s in at the latest (pauses of at most 6 + 7 + 7 s, Redis down at most 6 s, PostgreSQL down
    // until a write failed on it plus at most 2 s), and the SIGKILL at most 7 s later, while the
    // producer still produces: 30 s of ticks on PostgreSQL (one restart), 40 s on both.
    let ticks = match store {
        Store::Redis => TICKS,
        Store::Postgres => 150_000,
        Store::Both => 200_000,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(&dir.path().join("redis"));
    let pg = store.has_postgres().then(Postgres::start);
    let pg_url = pg.as_ref().map(|p| p.url.clone()).unwrap_or_default();
    let kafka = Kafka::start(&[]);
    create_topic(&kafka.bootstrap, &[], "ticks", 8, None);
    let mut setup = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis.url());
    setup.args = worker_args.iter().map(|a| a.to_string()).collect();
    setup.args.extend(store.args(&pg_url));
    let mut fleet = Fleet {
        setup: setup.clone(),
        live: Vec::new(),
        gone: Vec::new(),
        next: 0,
        started: Instant::now(),
    };
    let producer = produce_in_background(
        &kafka.bootstrap,
        dir.path(),
        &[
            "--count",
            &ticks.to_string(),
            "--assets",
            &ASSETS.to_string(),
            "--rate",
            &RATE.to_string(),
            "--seed",
            &seed.to_string(),
            // A stuck producer must fail the run well inside the test's time limit, not hang it.
            "--kafka-option",
            "message.timeout.ms=90000",
        ],
    );

    fleet.add();
    fleet.log("started 1 worker");
    pause(&mut rng, 3_000, 6_000);
    for _ in 0..3 {
        fleet.add();
    }
    fleet.log("scaled to 4");

    // The store restarts are those of the stores written. On Redis the whole schedule, shuffled; on
    // the other stores their restarts (shuffled) and then one SIGKILL.
    let mut events = Vec::new();
    if store != Store::Postgres {
        events.push(Event::RestartRedis);
    }
    if store.has_postgres() {
        events.push(Event::RestartPostgres);
    }
    if store == Store::Redis {
        events.extend([
            Event::KillOne,
            Event::TerminateOne,
            Event::BrokerRestart,
            Event::KillOne,
        ]);
        events.shuffle(&mut rng);
    } else {
        events.shuffle(&mut rng);
        events.push(Event::KillOne);
    }
    let (kills, terms) = match store {
        Store::Redis => (2, 1),
        Store::Postgres | Store::Both => (1, 0),
    };
    for event in events {
        pause(&mut rng, 3_000, 7_000);
        match event {
            Event::KillOne => {
                fleet.kill(&mut rng);
                fleet.add();
                fleet.log("replacement started");
            }
            Event::TerminateOne => {
                fleet.terminate(&mut rng);
                fleet.add();
                fleet.log("replacement started");
            }
            Event::RestartRedis => {
                redis.kill();
                fleet.log("Redis SIGKILLed");
                pause(&mut rng, 2_000, 6_000);
                redis.start_again();
                fleet.log("Redis back");
            }
            Event::RestartPostgres => {
                let pg = pg.as_ref().expect("a PostgreSQL for this store");
                pg.down("fast");
                fleet.log("PostgreSQL shut down (pg_ctl -m fast)");
                // Down until a worker's write has failed on it (the producer is still producing):
                // a fixed pause could fall where no worker wrote (the group rejoining after a broker
                // restart took ~15 s in one CI run), and the restart would then prove nothing.
                wait_for(
                    Duration::from_secs(60),
                    Duration::from_millis(200),
                    "a worker's PostgreSQL write failing while PostgreSQL is down",
                    || fleet.postgres_write_failed().then_some(()),
                );
                fleet.log("a PostgreSQL write failed");
                pause(&mut rng, 500, 2_000);
                pg.up();
                fleet.log("PostgreSQL back");
            }
            Event::BrokerRestart => {
                kafka.kill();
                fleet.log("broker SIGKILLed");
                pause(&mut rng, 3_000, 8_000);
                kafka.restart();
                fleet.log("broker back on its log dirs");
            }
        }
    }
    pause(&mut rng, 2_000, 5_000);
    fleet.terminate(&mut rng);
    fleet.terminate(&mut rng);
    fleet.log("scaled to 2");

    let report = producer.join().unwrap();
    fleet.log("producer done");
    for audit in store.audits(&pg_url) {
        let audit: Vec<&str> = audit.iter().map(String::as_str).collect();
        let summary = wait_verified_on(
            &report,
            &setup.redis_url,
            &setup.prefix,
            &audit,
            Duration::from_secs(240),
        );
        fleet.log(&format!("verify {audit:?}: {summary}"));
        assert!(
            summary["lost"] == 0 && summary["duplicated"] == 0,
            "seed {seed}: {summary}\n{}",
            dump_logs(&fleet.live)
        );
        assert_exact(&summary, ASSETS, ticks);
    }
    // (A PostgreSQL restart was felt by construction: it lasted until a write failed on it.)
    // The schedule really ran: its SIGKILLs and SIGTERMs and the 2 of the scale-down, and 2 workers
    // are left.
    assert_eq!((fleet.gone.len(), fleet.live.len()), (kills + terms + 2, 2));
}

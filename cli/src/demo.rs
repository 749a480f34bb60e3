//! `tickctl demo`: the whole pipeline on one machine, on embedded defaults.
//!
//! An in-process Kafka-protocol broker (librdkafka's mock cluster), the in-memory store (or `--redis`),
//! several workers in one consumer group, the gRPC api on a local port and the generator, with live
//! throughput — until Ctrl-C (or `--duration`). Then it stops the generator, lets the workers drain,
//! stops the api, and audits the store like `tickctl verify`: every produced tick stored once, in order.
//! With `--source EXCHANGE` the ticks come from a replay of that exchange's recorded-format trade stream
//! through the connector instead ([`crate::demo_source`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use prometheus::core::Collector;
use tickfleet_proto::Format;
use tickfleet_service::{CancellationToken, Health};
use tickfleet_store::{MemoryStore, RedisMode, Retention, StoreKind, StoreOptions, TickStore};
use tickfleet_worker::{KafkaOptions, Metrics, WorkerConfig};

use crate::dev_broker::DevBroker;
use crate::out::sayln;
use crate::produce::{Amount, Generator, Plan, produce};
use crate::verify;

/// Options of `tickctl demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use these Kafka bootstrap servers instead of the in-process broker (the topic must exist).
    #[arg(long)]
    brokers: Option<String>,
    /// Use this Redis instead of the in-memory store.
    #[arg(long)]
    redis: Option<String>,
    /// Key prefix in Redis (and, with --postgres, the PostgreSQL schema, '-' read as '_').
    #[arg(long, default_value = "tf-demo")]
    redis_prefix: String,
    /// Use this PostgreSQL (`postgres://USER@HOST:PORT/DB`) instead of the in-memory store; with
    /// --redis too, ticks go to both (Redis for the hot window and streams, PostgreSQL for history).
    #[arg(long)]
    postgres: Option<String>,
    /// With --redis: `standalone` (one server) or `cluster` (--redis takes comma-separated seed URLs).
    #[arg(long, value_enum, default_value_t = RedisMode::Standalone, requires = "redis")]
    redis_mode: RedisMode,
    /// Topic.
    #[arg(long, default_value = "ticks")]
    topic: String,
    /// Partitions of the topic on the in-process broker.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Workers (consumers in one group).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Assets.
    #[arg(long, default_value_t = 20)]
    assets: u32,
    /// Ticks per second produced; 0 = flat out.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Stop by itself after this many seconds (default: run until Ctrl-C); with --source, stop once the
    /// fixture is replayed and stored.
    #[arg(long)]
    duration: Option<f64>,
    /// Where the gRPC api listens (`tickctl latest|ticks|candles|ma|watch` talk to it).
    #[arg(long, default_value = "127.0.0.1:50051")]
    api_addr: std::net::SocketAddr,
    /// Where the REST/JSON api listens (`curl HOST:PORT/v1/prices/latest?symbol=A0000`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: std::net::SocketAddr,
    /// Instead of the generator, replay this exchange's recorded-format trade stream (BTC-USDT, ETH-USDT,
    /// SOL-USDT; the connector's test fixture) from a local WebSocket server through the real connector.
    /// Offline: nothing talks to the exchange.
    #[arg(long, value_enum)]
    source: Option<tickfleet_connector::Exchange>,
}

/// The id of the generator's first asset (what `Generator::new(n, "A", _)` names it).
fn generator_first_asset(assets: u32) -> String {
    Generator::new(assets.max(1), "A", 0)
        .first_asset_id()
        .to_owned()
}

pub(crate) fn counter_total(c: &prometheus::IntCounterVec) -> u64 {
    c.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let broker = match &args.brokers {
        Some(_) => None,
        None => Some(DevBroker::start(
            1,
            &[(args.topic.clone(), args.partitions)],
        )?),
    };
    let brokers = match (&args.brokers, &broker) {
        (Some(b), _) => b.clone(),
        (None, Some(dev)) => dev.bootstrap_servers(),
        (None, None) => unreachable!("a broker is started when none is given"),
    };
    let store_options = StoreOptions {
        kind: match (&args.redis, &args.postgres) {
            (Some(_), Some(_)) => StoreKind::Both,
            (None, Some(_)) => StoreKind::Postgres,
            _ => StoreKind::Redis,
        },
        redis: tickfleet_store::RedisOptions {
            redis_url: args.redis.clone().unwrap_or_default(),
            redis_prefix: args.redis_prefix.clone(),
            redis_mode: args.redis_mode,
            ..Default::default()
        },
        postgres_url: args.postgres.clone(),
        ..Default::default()
    };
    let store: Arc<dyn TickStore> = if args.redis.is_none() && args.postgres.is_none() {
        Arc::new(MemoryStore::new())
    } else {
        store_options.open(Retention::default())?
    };
    store.ping().await?;

    let stop = tickfleet_service::shutdown_on_signals();
    let workers_stop = CancellationToken::new();
    let api_stop = stop.child_token();
    let api = tickfleet_api::start(
        store.clone(),
        args.api_addr,
        tickfleet_api::ApiMetrics::new(&prometheus::Registry::new())?,
        Health::new(),
        api_stop.clone(),
        tickfleet_api::Options {
            drain_timeout: Duration::from_secs(10),
            http_addr: Some(args.http_addr),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (is another demo running? pick free ports with --api-addr and --http-addr)"
        )
    })?;
    let kafka = KafkaOptions::new(&brokers);
    let config = WorkerConfig {
        kafka: kafka.clone(),
        topic: args.topic.clone(),
        group: "tickfleet-demo".into(),
        group_protocol: "classic".into(),
        format: Format::Protobuf,
        dlq_topic: None,
        batch_size: 1000,
        batch_linger_ms: 20,
        commit_interval_ms: 500,
        drain_timeout_secs: 15,
        lane_capacity: 2000,
        max_payload_bytes: 64 * 1024,
        max_in_flight_bytes: 64 * 1024 * 1024,
        max_skew_ahead_secs: 300,
        max_skew_behind_secs: 365 * 86_400,
        store: store_options.clone(),
        replica_acks: Default::default(),
        retention_max_age_secs: None,
        retention_max_count: None,
        rollup_retention: Default::default(),
        admin_addr: "127.0.0.1:0".parse()?,
        log_format: "text".into(),
    };
    let mut workers = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..args.workers.max(1) {
        let m = Metrics::new();
        metrics.push(m.clone());
        let (config, store, stop) = (config.clone(), store.clone(), workers_stop.clone());
        workers.push(tokio::spawn(async move {
            tickfleet_worker::run(&config, store, None, m, Health::new(), stop).await
        }));
    }

    sayln!("tickfleet demo");
    sayln!(
        "  kafka   {brokers} (topic {}, {} partitions){}",
        args.topic,
        args.partitions,
        if broker.is_some() {
            ", in-process dev broker"
        } else {
            ""
        }
    );
    let mut stores = Vec::new();
    if let Some(u) = &args.redis {
        stores.push(format!("redis {u} prefix {}", args.redis_prefix));
    }
    if args.postgres.is_some() {
        stores.push(format!("postgres schema {}", store_options.schema()));
    }
    if stores.is_empty() {
        stores.push("in-memory".into());
    }
    sayln!("  store   {}", stores.join(" + "));
    sayln!(
        "  workers {} in group tickfleet-demo; {}",
        args.workers,
        match (args.source, args.rate) {
            (Some(e), _) => format!("source: the {} fixture (no generator)", e.name()),
            (None, 0) => format!("generator: {} assets at full speed", args.assets),
            (None, rate) => format!("generator: {} assets at {rate}/s", args.assets),
        }
    );
    let api_url = format!("http://{}", api.addr);
    let flag = if api.addr.to_string() == "127.0.0.1:50051" {
        String::new()
    } else {
        format!(" --api {api_url}")
    };
    let first = match args.source {
        Some(_) => crate::demo_source::SYMBOLS[0].to_owned(),
        None => generator_first_asset(args.assets),
    };
    sayln!("  api     {api_url} (gRPC tickfleet.v1.TickService, health, reflection)");
    let http = api.http_addr.unwrap_or(args.http_addr);
    sayln!("  rest    http://{http} (REST/JSON; live ticks as Server-Sent Events)");
    sayln!("  try, in another terminal:");
    for (cmd, what) in [
        (format!("tickctl watch {first}{flag}"), "live ticks"),
        (
            format!("tickctl latest{flag}"),
            "newest price of every asset",
        ),
        (
            format!("tickctl candles {first} --interval 5s{flag}"),
            "OHLCV candles",
        ),
        (
            format!("tickctl ma {first} --points 20{flag}"),
            "moving average and VWAP",
        ),
        (
            format!("grpcurl -plaintext {} list", api.addr),
            "the api, by reflection",
        ),
        (
            format!("curl 'http://{http}/v1/prices/latest?symbol={first}'"),
            "the newest price, as JSON",
        ),
        (
            format!("curl -N 'http://{http}/v1/ticks/stream?asset_ids={first}'"),
            "live ticks, as Server-Sent Events",
        ),
    ] {
        sayln!("    {cmd:<58} {what}");
    }
    sayln!("  Ctrl-C stops the generator, drains the workers, stops the api and audits the store.");

    let produce_stop = stop.child_token();
    if let Some(secs) = args.duration {
        let s = produce_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            s.cancel();
        });
    }
    let plan = Plan {
        topic: args.topic.clone(),
        format: Format::Protobuf,
        amount: Amount::UntilStopped,
        rate: args.rate,
        batch: 200,
        poison_every: None,
    };
    if let Some(exchange) = args.source {
        let replayed = crate::demo_source::replay(exchange, &kafka, &args.topic, &stop).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let stored = || {
            metrics
                .iter()
                .map(|m| counter_total(&m.stored))
                .sum::<u64>()
        };
        while stored() < replayed.expected_stored && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sayln!(
            "  produced {} trades ({} acknowledged), stored {} distinct ticks (the fixture holds {}); \
             query them now, Ctrl-C ends the demo",
            replayed.received,
            replayed.produced,
            stored(),
            replayed.expected_stored
        );
        if args.duration.is_none() {
            stop.cancelled().await;
        }
        workers_stop.cancel();
        for w in workers {
            w.await??;
        }
        api_stop.cancel();
        api.task.await??;
        let clean = stored() == replayed.expected_stored;
        drop(broker);
        return Ok(if clean {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let mut generator = Generator::new(args.assets, "A", rand::random());
    let stored = || {
        metrics
            .iter()
            .map(|m| counter_total(&m.stored))
            .sum::<u64>()
    };
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let report = produce(&kafka, &plan, &mut generator, &produce_stop, |sent| {
        if last.0.elapsed() >= Duration::from_secs(1) {
            let now = stored();
            let rate = (now - last.1) as f64 / last.0.elapsed().as_secs_f64();
            sayln!(
                "  {:>6.1}s  produced {sent:>9}  stored {now:>9}  ({rate:>8.0} ticks/s stored)",
                started.elapsed().as_secs_f64()
            );
            last = (Instant::now(), now);
        }
    })
    .await?;

    // Let the workers catch up with what was acknowledged, then drain them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored() < report.acknowledged && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers_stop.cancel();
    for w in workers {
        w.await??;
    }
    api_stop.cancel();
    api.task.await??;
    let audit = verify::audit(&report, store.as_ref()).await?;
    sayln!(
        "  produced {} ticks, stored {} (each once)",
        report.acknowledged,
        stored()
    );
    verify::print(&audit);
    drop(broker);
    Ok(if audit.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

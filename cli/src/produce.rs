//! `tickctl produce`: the load generator.
//!
//! Random-walk prices for N assets, keyed by asset id and partitioned with murmur2 (like the Java client),
//! at a target rate or flat out, for a count or a duration. At the end it prints — and with `--report`
//! writes as JSON — how many ticks each asset got and its last sequence number, so `tickctl verify` can
//! check the store against it. Sequence numbers start at 1 per asset and grow by 1.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::out::{errln, sayln};
use anyhow::{Context, bail};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tickfleet_proto::{Format, Tick};
use tickfleet_service::CancellationToken;
use tickfleet_worker::KafkaOptions;

/// Options of `tickctl produce`.
#[derive(Args, Debug, Clone)]
pub struct ProduceArgs {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaOptions,
    /// Topic to produce to.
    #[arg(long, env = "TICKFLEET_TOPIC", default_value = "ticks")]
    pub topic: String,
    /// Number of assets.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub assets: u32,
    /// Ticks to produce (when neither --count nor --duration is given: 10000).
    #[arg(long)]
    pub count: Option<u64>,
    /// Produce for this many seconds instead of a count.
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Target ticks per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Ticks generated and handed to the producer per step.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Payload format.
    #[arg(long, default_value = "protobuf")]
    pub format: Format,
    /// Seed of the random walk (printed when not given, so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of asset ids (`PREFIX0000`, `PREFIX0001`, …).
    #[arg(long, default_value = "A")]
    pub asset_prefix: String,
    /// Write the per-asset report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// After every N ticks also send one poison message (cycling through malformed, invalid price,
    /// key mismatch, missing asset id, bad timestamp, oversized), to exercise the dead-letter path.
    #[arg(long)]
    pub poison_every: Option<u64>,
}

/// What was produced: the input of `tickctl verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// Topic produced to.
    pub topic: String,
    /// Ticks acknowledged by the broker.
    pub acknowledged: u64,
    /// Ticks the broker did not acknowledge (a report with failures cannot be verified).
    pub failed: u64,
    /// Per asset: count and sequence numbers.
    pub assets: BTreeMap<String, AssetReport>,
    /// Poison messages sent, by the dead-letter reason the worker should give them.
    #[serde(default)]
    pub poison: BTreeMap<String, u64>,
}

/// One asset's part of a [`Report`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssetReport {
    /// Ticks produced.
    pub count: u64,
    /// First sequence number.
    pub first_seq: u64,
    /// Last sequence number.
    pub last_seq: u64,
}

/// Random-walk tick source.
pub struct Generator {
    rng: StdRng,
    assets: Vec<AssetState>,
    source: String,
}

struct AssetState {
    id: String,
    price: Decimal,
    seq: u64,
    last_ns: i64,
}

impl Generator {
    /// `n` assets starting at prices 100, 101, …; seeded.
    pub fn new(n: u32, prefix: &str, seed: u64) -> Self {
        let width = n.saturating_sub(1).max(1).ilog10() as usize + 1;
        let width = width.max(4);
        Generator {
            rng: StdRng::seed_from_u64(seed),
            assets: (0..n)
                .map(|i| AssetState {
                    id: format!("{prefix}{i:0width$}"),
                    price: Decimal::from(100 + i64::from(i % 900)),
                    seq: 0,
                    last_ns: 0,
                })
                .collect(),
            source: "tickctl".into(),
        }
    }

    /// The id of the first asset.
    pub fn first_asset_id(&self) -> &str {
        self.assets.first().map_or("", |a| a.id.as_str())
    }

    /// The next tick of a random asset: price moves by up to ±0.10% (4 decimals, never below 0.0001),
    /// event time is now (strictly increasing per asset), sequence number + 1.
    pub fn next_tick(&mut self) -> Tick {
        let i = self.rng.random_range(0..self.assets.len());
        let bps: i64 = self.rng.random_range(-10..=10);
        let size = Decimal::new(self.rng.random_range(1..=100_000), 2);
        let a = &mut self.assets[i];
        let step = (a.price * Decimal::new(bps, 4)).round_dp(4);
        a.price = (a.price + step).max(Decimal::new(1, 4));
        a.seq += 1;
        a.last_ns = now_ns().max(a.last_ns + 1);
        Tick {
            asset_id: a.id.clone(),
            price: a.price.normalize(),
            size: Some(size.normalize()),
            event_time_ns: a.last_ns,
            seq: a.seq,
            source: self.source.clone(),
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The poison message kinds `--poison-every` cycles through, by the dead-letter reason they must get.
pub const POISON_REASONS: [&str; 6] = [
    "malformed",
    "invalid_price",
    "key_mismatch",
    "invalid_asset_id",
    "invalid_timestamp",
    "oversized",
];

/// Poison message number `n`: (expected reason, key, payload). None of them is a valid tick.
pub fn poison(n: u64, format: Format) -> (&'static str, &'static str, Vec<u8>) {
    let reason = POISON_REASONS[(n % POISON_REASONS.len() as u64) as usize];
    let mut tick = Tick {
        asset_id: "POISON".into(),
        price: Decimal::ONE,
        size: None,
        event_time_ns: now_ns(),
        seq: n + 1,
        source: "tickctl-poison".into(),
    };
    let mut key = "POISON";
    match reason {
        "malformed" => {
            let payload = match format {
                // Field 1 claims 100 bytes and has 1.
                Format::Protobuf => vec![0x0a, 0x64, b'x'],
                Format::Json => br#"{"symbol": "POISON", "price": "#.to_vec(),
            };
            return (reason, key, payload);
        }
        "invalid_price" => tick.price = Decimal::NEGATIVE_ONE,
        "key_mismatch" => key = "NOT-POISON",
        "invalid_asset_id" => tick.asset_id.clear(),
        "invalid_timestamp" => tick.event_time_ns = -5,
        _ => tick.source = "x".repeat(70_000),
    }
    (reason, key, tick.encode(format))
}

/// Counts broker acknowledgements.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err((e, m)) => {
                tracing::error!(error = %e, partition = m.partition(), "tick not acknowledged");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Hands one message to the producer, waiting while its queue is full.
fn send(
    producer: &ThreadedProducer<Acks>,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("producing to {topic}: {e}"),
        }
    }
}

/// How long to produce.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// This many ticks.
    Count(u64),
    /// For this long.
    Duration(Duration),
    /// Until the stop token is cancelled.
    UntilStopped,
}

/// What to produce, where, how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Topic.
    pub topic: String,
    /// Payload format.
    pub format: Format,
    /// How much.
    pub amount: Amount,
    /// Ticks per second; 0 = flat out.
    pub rate: u64,
    /// Ticks per step.
    pub batch: u64,
    /// One poison message after every this many ticks.
    pub poison_every: Option<u64>,
}

/// Produces ticks from `generator` until the plan's amount is reached or `stop` is cancelled; waits for
/// every acknowledgement and returns the report. `on_progress` is called with the running total.
pub async fn produce(
    kafka: &KafkaOptions,
    plan: &Plan,
    generator: &mut Generator,
    stop: &CancellationToken,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<Report> {
    let Plan {
        topic,
        format,
        amount,
        rate,
        batch,
        poison_every,
    } = plan.clone();
    let topic = topic.as_str();
    let producer: ThreadedProducer<Acks> = kafka
        .client_config(&[
            ("partitioner", "murmur2_random"),
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "200000"),
            ("compression.type", "lz4"),
        ])
        .create_with_context(Acks::default())
        .context("creating the Kafka producer")?;
    let mut report = Report {
        topic: topic.to_owned(),
        ..Report::default()
    };
    let started = Instant::now();
    let mut sent: u64 = 0;
    loop {
        let remaining = match amount {
            Amount::Count(n) => n - sent,
            Amount::Duration(d) if started.elapsed() >= d => 0,
            _ => u64::MAX,
        };
        if remaining == 0 || stop.is_cancelled() {
            break;
        }
        for _ in 0..batch.min(remaining) {
            let tick = generator.next_tick();
            send(&producer, topic, &tick.asset_id, &tick.encode(format))?;
            let a = report.assets.entry(tick.asset_id.clone()).or_default();
            if a.count == 0 {
                a.first_seq = tick.seq;
            }
            a.count += 1;
            a.last_seq = tick.seq;
            sent += 1;
            if let Some(every) = poison_every.filter(|e| *e > 0 && sent.is_multiple_of(*e)) {
                let n = sent / every - 1;
                let (reason, key, payload) = poison(n, format);
                send(&producer, topic, key, &payload)?;
                *report.poison.entry(reason.to_owned()).or_default() += 1;
            }
        }
        on_progress(sent);
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    let flush = tokio::task::spawn_blocking(move || {
        // Longer than librdkafka's message.timeout.ms (300 s): every message is then either
        // acknowledged or reported failed, even across a broker outage on a loaded machine.
        let result = producer.flush(Duration::from_secs(330));
        (result, producer)
    });
    let (result, producer) = flush.await?;
    result.context("waiting for the broker to acknowledge every tick")?;
    report.acknowledged = producer.context().ok.load(Ordering::Relaxed);
    report.failed = producer.context().failed.load(Ordering::Relaxed);
    Ok(report)
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let amount = match (args.count, args.duration) {
        (Some(n), _) => Amount::Count(n),
        (None, Some(secs)) => Amount::Duration(Duration::from_secs_f64(secs)),
        (None, None) => Amount::Count(10_000),
    };
    errln!(
        "producing to {} on {} ({} assets, {:?}, rate {}, seed {seed})",
        args.topic,
        args.kafka.brokers,
        args.assets,
        amount,
        if args.rate == 0 {
            "max".to_string()
        } else {
            format!("{}/s", args.rate)
        }
    );
    let bar = match amount {
        Amount::Count(n) => indicatif::ProgressBar::new(n),
        _ => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} ticks [{elapsed_precise}] {per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let stop = tickfleet_service::shutdown_on_signals();
    let mut generator = Generator::new(args.assets, &args.asset_prefix, seed);
    let started = Instant::now();
    let plan = Plan {
        topic: args.topic.clone(),
        format: args.format,
        amount,
        rate: args.rate,
        batch: args.batch,
        poison_every: args.poison_every,
    };
    let report = produce(&args.kafka, &plan, &mut generator, &stop, |n| {
        bar.set_position(n)
    })
    .await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let sent: u64 =
        report.assets.values().map(|a| a.count).sum::<u64>() + report.poison.values().sum::<u64>();
    sayln!(
        "produced {sent} ticks over {} assets in {secs:.2}s ({:.0}/s): {} acknowledged, {} failed",
        report.assets.len(),
        sent as f64 / secs,
        report.acknowledged,
        report.failed
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        sayln!("report written to {}", path.display());
    }
    Ok(if report.failed == 0 && report.acknowledged == sent {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_numbers_each_asset_from_one_and_moves_time_forward() {
        let mut g = Generator::new(3, "X", 7);
        let mut last: BTreeMap<String, (u64, i64)> = BTreeMap::new();
        for _ in 0..3000 {
            let t = g.next_tick();
            assert!(t.price > Decimal::ZERO);
            let (seq, ns) = last.get(&t.asset_id).copied().unwrap_or((0, 0));
            assert_eq!(t.seq, seq + 1);
            assert!(t.event_time_ns > ns);
            last.insert(t.asset_id.clone(), (t.seq, t.event_time_ns));
        }
        assert_eq!(last.len(), 3);
        assert_eq!(last.keys().next().unwrap(), "X0000");
    }

    #[test]
    fn same_seed_same_walk() {
        let a: Vec<_> = {
            let mut g = Generator::new(5, "A", 42);
            (0..100)
                .map(|_| (g.next_tick().asset_id, g.next_tick().price))
                .collect()
        };
        let b: Vec<_> = {
            let mut g = Generator::new(5, "A", 42);
            (0..100)
                .map(|_| (g.next_tick().asset_id, g.next_tick().price))
                .collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn json_encoding_decodes_to_the_same_tick() {
        let mut g = Generator::new(2, "J", 1);
        let t = g.next_tick();
        let back = tickfleet_proto::decode_json(&t.encode(Format::Json)).unwrap();
        assert_eq!(back, t);
        let back = tickfleet_proto::decode_protobuf(&t.encode(Format::Protobuf)).unwrap();
        assert_eq!(back, t);
    }
}

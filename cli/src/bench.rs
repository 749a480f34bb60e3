//! `tickctl bench`: throughput and resource figures against a given broker and Redis.
//!
//! * `ingest` pre-produces N ticks (default 1M over 100 assets), then for each worker count starts that
//!   many real `tickfleet-worker` processes in a fresh consumer group and times them from their first
//!   stored tick until every offset is committed. It reports ticks/s, CPU seconds and peak RSS of the
//!   workers (from `/proc`, so Linux only), and the workers' batches: how many, their mean size and
//!   mean store-write latency (from their metrics).
//! * `consume` is the broker's raw consume rate with the same client library (librdkafka), no store:
//!   the ceiling on the Kafka side.
//! * `api` (load on a running api) is `crate::bench_api`, `rollups` is `crate::bench_rollups`.
//!
//! `scripts/bench.sh` runs these beside `redis-benchmark` (the store's ceiling) and a Python peer, and
//! writes the figures quoted in BENCHMARKS.md. No figure here is asserted by any test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tickfleet_proto::Format;
use tickfleet_service::CancellationToken;
use tickfleet_worker::KafkaOptions;

use crate::out::sayln;
use crate::produce::{Amount, Generator, Plan, produce};

/// Options of `tickctl bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time worker processes storing a pre-produced backlog.
    Ingest(IngestArgs),
    /// Time a bare librdkafka consumer reading the whole topic (no decoding, no store).
    Consume(ConsumeArgs),
    /// Load the gRPC api: K concurrent clients calling GetLatest or ListTicks for T seconds.
    Api(crate::bench_api::ApiBenchArgs),
    /// What candle rollups cost per written tick and save per candle query (one Redis, one asset).
    Rollups(crate::bench_rollups::RollupsBenchArgs),
}

#[derive(Args, Debug)]
struct IngestArgs {
    #[command(flatten)]
    kafka: KafkaOptions,
    /// Topic (must exist with the partitions you want).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Ticks to pre-produce.
    #[arg(long, default_value_t = 1_000_000)]
    ticks: u64,
    /// Assets.
    #[arg(long, default_value_t = 100)]
    assets: u32,
    /// Worker counts to time, one run each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// The tickfleet-worker binary [default: next to tickctl].
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Extra arguments for every worker (repeatable), e.g. --worker-arg=--batch-size=2000.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
    /// Use what is already in the topic instead of producing.
    #[arg(long)]
    skip_produce: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    #[command(flatten)]
    kafka: KafkaOptions,
    /// Topic.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One timed ingest run.
#[derive(Debug, Serialize)]
struct IngestRun {
    workers: usize,
    /// The Redis key prefix (and consumer group) of the run, for querying what it stored.
    prefix: String,
    ticks: i64,
    seconds: f64,
    ticks_per_second: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    /// Successful store writes (batches) of all workers, their mean size and mean latency (from the
    /// workers' `tickfleet_worker_batch_size_ticks` and `tickfleet_worker_store_write_seconds`).
    batches: f64,
    mean_batch_ticks: f64,
    mean_write_ms: f64,
}

/// Offsets of every partition of `topic`: (partition, low, high).
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut out = Vec::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            out.push((p.id(), low, high));
        }
    }
    if out.is_empty() {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(out)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// `name{partition="P"} VALUE` samples of one metric, by partition.
fn by_partition(text: &str, name: &str) -> BTreeMap<i32, f64> {
    let prefix = format!("{name}{{partition=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (p, rest) = rest.split_once('"')?;
            Some((p.parse().ok()?, rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The value of an unlabelled sample `name VALUE`, 0 when absent.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) and peak RSS (MiB) of a live process, from `/proc`.
fn proc_usage(pid: u32, clock_ticks: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let cpu =
        (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / clock_ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, hwm_kib / 1024.0))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct WorkerProc {
    child: Child,
    admin: String,
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let probe: BaseConsumer = args
        .kafka
        .client_config(&[("group.id", "tickctl-bench-probe")])
        .create()?;
    if !args.skip_produce {
        let plan = Plan {
            topic: args.topic.clone(),
            format: Format::Protobuf,
            amount: Amount::Count(args.ticks),
            rate: 0,
            batch: 10_000,
            poison_every: None,
        };
        let started = Instant::now();
        let mut generator = Generator::new(args.assets, "B", 1);
        let report = produce(
            &args.kafka,
            &plan,
            &mut generator,
            &CancellationToken::new(),
            |_| {},
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        sayln!(
            "produced {} ticks in {secs:.2}s ({:.0}/s)",
            report.acknowledged,
            report.acknowledged as f64 / secs
        );
    }
    let marks = watermarks(&probe, &args.topic)?;
    let total: i64 = marks.iter().map(|(_, low, high)| high - low).sum();
    if marks.iter().any(|(_, low, _)| *low > 0) {
        sayln!(
            "note: the broker has dropped old messages (low watermark > 0); timing the {total} it still has"
        );
    }
    let worker_bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("tickfleet-worker"),
    };
    let clock = clock_ticks();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let mut runs = Vec::new();
    for &n in &args.workers {
        let group = format!("bench-{stamp}-{n}");
        let mut procs = Vec::new();
        for i in 0..n {
            let admin = format!("127.0.0.1:{}", free_port()?);
            let child = Command::new(&worker_bin)
                .args([
                    "--brokers",
                    &args.kafka.brokers,
                    "--topic",
                    &args.topic,
                    "--group",
                    &group,
                ])
                .args([
                    "--redis-url",
                    &args.redis,
                    "--redis-prefix",
                    &group,
                    "--admin-addr",
                    &admin,
                ])
                .args(&args.worker_args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {} (worker {i})", worker_bin.display()))?;
            procs.push(WorkerProc { child, admin });
        }
        // Time from the moment every worker holds partitions (the group has formed) to the last commit;
        // ticks stored before that are not counted.
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first: Option<(Instant, f64)> = None;
        let finished = loop {
            if Instant::now() > deadline {
                bail!("{n} worker(s) did not finish in 10 minutes");
            }
            for p in &mut procs {
                if let Some(status) = p.child.try_wait()? {
                    bail!("a worker exited early ({status}); see its output above");
                }
            }
            let mut stored = 0.0;
            let mut all_assigned = true;
            let mut committed: BTreeMap<i32, f64> = BTreeMap::new();
            for p in &procs {
                let text = http_get(&p.admin, "/metrics");
                all_assigned &= text.as_deref().is_some_and(|t| {
                    metric_value(t, "tickfleet_worker_assigned_partitions") >= 1.0
                });
                if let Some(text) = text {
                    stored += by_partition(&text, "tickfleet_worker_ticks_stored_total")
                        .values()
                        .sum::<f64>();
                    for (part, off) in by_partition(&text, "tickfleet_worker_committed_offset") {
                        let e = committed.entry(part).or_insert(0.0);
                        *e = e.max(off);
                    }
                }
            }
            if first.is_none() && all_assigned {
                first = Some((Instant::now(), stored));
            }
            // Empty partitions have nothing to commit.
            let done = marks.iter().all(|(p, low, high)| {
                high <= low || committed.get(p).is_some_and(|c| *c as i64 >= *high)
            });
            if done {
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (start, already) = first.unwrap_or((finished, 0.0));
        let seconds = finished.duration_since(start).as_secs_f64().max(1e-3);
        let (mut cpu, mut rss) = (0.0, 0.0);
        for p in &procs {
            if let Some((c, r)) = proc_usage(p.child.id(), clock) {
                cpu += c;
                rss = f64::max(rss, r);
            }
        }
        let timed = total as f64 - already;
        let (mut batches, mut batch_ticks, mut write_seconds) = (0.0, 0.0, 0.0);
        for p in &procs {
            if let Some(text) = http_get(&p.admin, "/metrics") {
                batches += metric_value(
                    &text,
                    "tickfleet_worker_store_write_seconds_count{outcome=\"ok\"}",
                );
                write_seconds += metric_value(
                    &text,
                    "tickfleet_worker_store_write_seconds_sum{outcome=\"ok\"}",
                );
                batch_ticks += metric_value(&text, "tickfleet_worker_batch_size_ticks_sum");
            }
        }
        let per_batch = |x: f64| if batches > 0.0 { x / batches } else { 0.0 };
        let run = IngestRun {
            workers: n,
            prefix: group.clone(),
            ticks: total,
            seconds,
            ticks_per_second: timed / seconds,
            cpu_seconds: cpu,
            peak_rss_mib: rss,
            batches,
            mean_batch_ticks: per_batch(batch_ticks),
            mean_write_ms: per_batch(write_seconds) * 1000.0,
        };
        sayln!(
            "{n} worker(s): {total} ticks stored and committed; {:.0} ticks/s over {seconds:.2}s, {cpu:.1} CPU s, peak RSS {rss:.1} MiB; {batches:.0} batches, mean {:.0} ticks, {:.2} ms each",
            run.ticks_per_second,
            run.mean_batch_ticks,
            run.mean_write_ms
        );
        runs.push(run);
        for p in &procs {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(p.child.id().to_string())
                .status();
        }
        for mut p in procs {
            let _ = p.child.wait();
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&runs)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn consume(args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let consumer: BaseConsumer = args
        .kafka
        .client_config(&[
            ("group.id", "tickctl-bench-consume"),
            ("enable.auto.commit", "false"),
        ])
        .create()?;
    let marks = watermarks(&consumer, &args.topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, low, high) in &marks {
        if high > low {
            tpl.add_partition_offset(&args.topic, *p, Offset::Offset(*low))?;
            remaining.insert(*p, *high);
        }
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut messages, mut bytes) = (0u64, 0u64);
    while !remaining.is_empty() {
        match consumer.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                if remaining
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    remaining.remove(&m.partition());
                }
            }
            Some(Err(e)) => bail!("consuming {}: {e}", args.topic),
            None => bail!(
                "no message for 5 s; partitions left: {:?}",
                remaining.keys()
            ),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = messages as f64 / seconds;
    sayln!(
        "raw consume: {messages} messages ({bytes} payload bytes) in {seconds:.2}s: {rate:.0} msg/s"
    );
    if let Some(path) = &args.json {
        let result = serde_json::json!({"messages": messages, "seconds": seconds, "messages_per_second": rate});
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        BenchCommand::Api(a) => crate::bench_api::run(a).await,
        BenchCommand::Ingest(a) => ingest(a).await,
        BenchCommand::Consume(a) => tokio::task::spawn_blocking(move || consume(a)).await?,
        BenchCommand::Rollups(a) => crate::bench_rollups::run(a).await,
    }
}

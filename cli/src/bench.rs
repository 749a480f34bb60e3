//! `tickctl bench`: throughput and resource figures against a given broker and Redis.
//!
//! * `ingest` pre-produces N ticks (default 1M over 100 assets), then for each worker count starts that
//!   many real `tickfleet-worker` processes in a fresh consumer group and times them from their first
//!   stored tick until every offset is committed. It reports ticks/s, CPU seconds and peak RSS of the
//!   workers (from `/proc`, so Linux only), and the workers' batches: how many, their mean size and
//!   mean store-write latency (from their metrics).
//! * `consume` is the broker's raw consume rate with the same client library (librdkafka), no store:
//!   the ceiling on the Kafka side.
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
    Api(ApiBenchArgs),
    /// What candle rollups cost per written tick and save per candle query (one Redis, one asset).
    Rollups(crate::bench_rollups::RollupsBenchArgs),
}

#[derive(Args, Debug)]
struct ApiBenchArgs {
    /// The api's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    api: String,
    /// Which call: latest (GetLatest), ticks (ListTicks, --limit ticks per call), or rest-latest
    /// (`GET /v1/prices/latest` on the REST api at --http, one keep-alive HTTP/1.1 connection per
    /// client).
    #[arg(long, default_value = "latest", value_parser = ["latest", "ticks", "rest-latest"])]
    method: String,
    /// The api's REST address (host:port), for --method rest-latest.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Page size for ListTicks.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Concurrent clients (one HTTP/2 connection each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Target total request rate (open loop, spread over the clients); 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rps: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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

/// Latency percentile (0..=1) of sorted samples, in milliseconds.
fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}

/// A minimal HTTP/1.1 client on one keep-alive connection: what a REST client with a connection pool
/// of one does, and nothing a general client library would add to the measured latency.
struct Http1 {
    conn: tokio::io::BufReader<tokio::net::TcpStream>,
    host: String,
}

impl Http1 {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the REST api at {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Http1 {
            conn: tokio::io::BufReader::new(stream),
            host: addr.to_owned(),
        })
    }

    /// GETs `path` and reads the whole answer; its status.
    async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", self.host);
        self.conn.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.conn.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.conn.read_line(&mut line).await? == 0 {
                bail!("the REST api closed the connection");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.conn.read_exact(&mut body).await?;
        Ok(status)
    }
}

/// `s` percent-encoded for a query string.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn api_load(args: ApiBenchArgs) -> anyhow::Result<ExitCode> {
    use tickfleet_proto::v1::tick_service_client::TickServiceClient;
    use tickfleet_proto::v1::{GetLatestRequest, ListAssetsRequest, ListTicksRequest};

    let connect = || async {
        let channel = tonic::transport::Channel::from_shared(args.api.clone())?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.api))?;
        anyhow::Ok(TickServiceClient::new(channel))
    };
    let assets = connect()
        .await?
        .list_assets(ListAssetsRequest::default())
        .await?
        .into_inner()
        .asset_ids;
    if assets.is_empty() {
        bail!("the api has no assets to query");
    }
    let clients = args.clients.max(1);
    let duration = Duration::from_secs_f64(args.seconds);
    let per_client_interval =
        (args.rps > 0).then(|| Duration::from_secs_f64(clients as f64 / args.rps as f64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = connect().await?;
        let mut rest = if args.method == "rest-latest" {
            Some(Http1::connect(&args.http).await?)
        } else {
            None
        };
        let (assets, method, limit) = (assets.clone(), args.method.clone(), args.limit);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut ticker = per_client_interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut n = c;
            while started.elapsed() < duration {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let asset_id = assets[n % assets.len()].clone();
                n += 1;
                let sent = Instant::now();
                let ok = if let Some(rest) = rest.as_mut() {
                    let path = format!("/v1/prices/latest?symbol={}", percent(&asset_id));
                    matches!(rest.get(&path).await, Ok(200))
                } else if method == "latest" {
                    client
                        .get_latest(GetLatestRequest { asset_id })
                        .await
                        .is_ok()
                } else {
                    let request = ListTicksRequest {
                        asset_id,
                        limit,
                        ..Default::default()
                    };
                    client.list_ticks(request).await.is_ok()
                };
                if ok {
                    latencies.push(sent.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let result = serde_json::json!({
        "method": args.method,
        "clients": clients,
        "target_rps": args.rps,
        "seconds": seconds,
        "requests": latencies.len(),
        "errors": errors,
        "rps": latencies.len() as f64 / seconds,
        "p50_ms": percentile_ms(&latencies, 0.50),
        "p99_ms": percentile_ms(&latencies, 0.99),
        "p999_ms": percentile_ms(&latencies, 0.999),
    });
    sayln!(
        "api {} x{clients} clients{}: {:.0} rps, p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, {errors} errors",
        args.method,
        if args.rps > 0 {
            format!(" at {} rps target", args.rps)
        } else {
            String::new()
        },
        result["rps"].as_f64().unwrap_or(0.0),
        result["p50_ms"].as_f64().unwrap_or(0.0),
        result["p99_ms"].as_f64().unwrap_or(0.0),
        result["p999_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        BenchCommand::Api(a) => api_load(a).await,
        BenchCommand::Ingest(a) => ingest(a).await,
        BenchCommand::Consume(a) => tokio::task::spawn_blocking(move || consume(a)).await?,
        BenchCommand::Rollups(a) => crate::bench_rollups::run(a).await,
    }
}

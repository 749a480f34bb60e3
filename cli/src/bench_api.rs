//! `tickctl bench api`: load on a running api — K concurrent clients calling GetLatest or ListTicks
//! over gRPC, or `GET /v1/prices/latest` over REST on one keep-alive HTTP/1.1 connection each — for T
//! seconds; reports calls/s, latency percentiles and errors (optionally as JSON). No figure here is
//! asserted by any test; BENCHMARKS.md quotes runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::out::sayln;

/// Options of `tickctl bench api`.
#[derive(Args, Debug)]
pub struct ApiBenchArgs {
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

/// Runs the load and prints (and with `--json` writes) its figures; exit 1 when any call failed.
pub async fn run(args: ApiBenchArgs) -> anyhow::Result<ExitCode> {
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

//! `tickctl latest | ticks | candles | ma | assets | watch`: queries against the gRPC api.
//!
//! Readable tables on stdout by default; `--json` prints JSON instead (one document, or one object per
//! line for `watch`), with prices as exact decimal strings.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tickfleet_proto::v1::tick_service_client::TickServiceClient;
use tickfleet_proto::v1::{
    self, BatchGetLatestRequest, GetCandlesRequest, GetMovingAverageRequest, ListAssetsRequest,
    ListTicksRequest, StreamCandlesRequest, StreamTicksRequest, get_moving_average_request::Over,
    stream_candles_response, stream_ticks_response,
};
use tonic::transport::Channel;

use crate::out::{StdoutClosed, errln, outln};

/// Where the api is and how to print.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The api's gRPC address (`host:port` means `http://host:port`).
    #[arg(long, env = "TICKFLEET_API", default_value = "http://127.0.0.1:50051")]
    api: String,
    /// PEM CA that signed an `https://` api's certificate (default: the system's CAs).
    #[arg(long, env = "TICKFLEET_API_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The query commands.
#[derive(Subcommand, Debug)]
pub enum Query {
    /// Newest tick of each asset (all assets when none is named).
    Latest {
        #[command(flatten)]
        api: ApiArgs,
        /// Asset ids.
        assets: Vec<String>,
    },
    /// Stored ticks of one asset, oldest first, page by page.
    Ticks {
        #[command(flatten)]
        api: ApiArgs,
        /// Asset id.
        asset: String,
        #[command(flatten)]
        range: RangeArgs,
        /// Ticks per page (1..=10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue from a previous page's token.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow every page to the end of the range instead of printing one.
        #[arg(long)]
        all: bool,
    },
    /// OHLCV candles of one asset.
    Candles {
        #[command(flatten)]
        api: ApiArgs,
        /// Asset id.
        asset: String,
        /// Candle width: 1s, 5s, 1m, 5m, 1h, 1d, 250ms, …
        #[arg(long, short, default_value = "1m")]
        interval: String,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Simple moving average (and VWAP) of one asset's last ticks or last time window.
    Ma {
        #[command(flatten)]
        api: ApiArgs,
        /// Asset id.
        asset: String,
        /// Average the last N ticks.
        #[arg(long, conflicts_with = "window")]
        points: Option<u32>,
        /// Average the ticks in this window back from the newest tick (e.g. 1m).
        #[arg(long)]
        window: Option<String>,
    },
    /// Every asset id with ticks.
    Assets {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow ticks (or live candles) as they are stored, until Ctrl-C.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
        /// Asset ids (all assets when none is named).
        assets: Vec<String>,
        /// Show live candles of this width instead of ticks.
        #[arg(long)]
        candles: Option<String>,
        /// Stop after this many ticks or candle updates.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// A time range: `--since 5m`, or `--from`/`--to` as RFC 3339 or nanoseconds since the epoch.
#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Start (inclusive): RFC 3339 (2026-11-21T09:30:00Z) or ns since the epoch.
    #[arg(long, conflicts_with = "since")]
    from: Option<String>,
    /// End (exclusive): RFC 3339 or ns since the epoch.
    #[arg(long)]
    to: Option<String>,
    /// Start this long ago (e.g. 30s, 5m, 1h).
    #[arg(long)]
    since: Option<String>,
}

impl RangeArgs {
    fn resolve(&self) -> anyhow::Result<(Option<i64>, Option<i64>)> {
        let from = match (&self.from, &self.since) {
            (Some(f), _) => Some(parse_time(f)?),
            (None, Some(s)) => Some(now_ns() - parse_duration(s)?),
            (None, None) => None,
        };
        let to = self.to.as_deref().map(parse_time).transpose()?;
        Ok((from, to))
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

pub(crate) fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ns) = s.parse::<i64>() {
        return Ok(ns);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .with_context(|| format!("{s:?} is neither RFC 3339 nor nanoseconds since the epoch"))
}

fn parse_duration(s: &str) -> anyhow::Result<i64> {
    match tickfleet_service::parse_duration_ns(s) {
        Ok(ns) => Ok(ns),
        Err(tickfleet_service::Error::DurationOverflow(_)) => bail!("duration too long"),
        Err(_) => bail!("{s:?} is not a duration like 30s, 5m, 1h"),
    }
}

/// RFC 3339 with nanoseconds, UTC.
pub(crate) fn fmt_time(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

async fn connect(args: &ApiArgs) -> anyhow::Result<TickServiceClient<Channel>> {
    Ok(TickServiceClient::new(channel(args).await?))
}

/// A channel to the api at `args` (TLS for `https://`).
pub(crate) async fn channel(args: &ApiArgs) -> anyhow::Result<Channel> {
    let api = args.api.as_str();
    // `host:port` is taken as plaintext `http://host:port`, as grpcurl -plaintext does.
    let api = if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let api = api.as_str();
    let mut endpoint = Channel::from_shared(api.to_owned())
        .with_context(|| format!("bad --api address {api:?}"))?
        .connect_timeout(Duration::from_secs(5));
    if api.starts_with("https://") {
        let tls = match &args.ca_file {
            Some(path) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .context("TLS settings for the api")?;
    }
    endpoint.connect().await.with_context(|| {
        format!("cannot reach the api at {api} (is `tickctl demo` or tickfleet-api running?)")
    })
}

/// Turns a gRPC error into a one-line message with its code.
pub(crate) fn grpc(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn tick_json(t: &v1::Tick) -> Value {
    json!({
        "asset_id": t.asset_id,
        "price": t.price,
        "size": t.size,
        "event_time_ns": t.event_time_ns,
        "time": fmt_time(t.event_time_ns),
        "seq": t.seq,
        "source": t.source,
    })
}

fn tick_row(t: &v1::Tick) -> Vec<String> {
    vec![
        t.asset_id.clone(),
        t.price.clone(),
        t.size.clone().unwrap_or_default(),
        fmt_time(t.event_time_ns),
        t.seq.to_string(),
    ]
}

const TICK_HEADER: [&str; 5] = ["ASSET", "PRICE", "SIZE", "TIME", "SEQ"];

fn candle_json(c: &v1::Candle) -> Value {
    json!({
        "asset_id": c.asset_id,
        "start_ns": c.start_ns,
        "end_ns": c.end_ns,
        "start": fmt_time(c.start_ns),
        "open": c.open, "high": c.high, "low": c.low, "close": c.close,
        "volume": c.volume,
        "tick_count": c.tick_count,
        "closed": c.closed,
    })
}

fn candle_row(c: &v1::Candle) -> Vec<String> {
    vec![
        c.asset_id.clone(),
        fmt_time(c.start_ns),
        c.open.clone(),
        c.high.clone(),
        c.low.clone(),
        c.close.clone(),
        c.volume.clone(),
        c.tick_count.to_string(),
    ]
}

const CANDLE_HEADER: [&str; 8] = [
    "ASSET", "START", "OPEN", "HIGH", "LOW", "CLOSE", "VOLUME", "TICKS",
];

/// Prints rows as aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> Result<(), StdoutClosed> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", s.join("  ").trim_end())
    };
    line(header.to_vec())?;
    for r in rows {
        line(r.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

pub(crate) fn print_json(v: &Value) -> Result<(), StdoutClosed> {
    outln!("{v}")
}

/// Runs one query command.
pub async fn run(query: Query) -> anyhow::Result<ExitCode> {
    let args = match &query {
        Query::Latest { api, .. }
        | Query::Ticks { api, .. }
        | Query::Candles { api, .. }
        | Query::Ma { api, .. }
        | Query::Assets { api }
        | Query::Watch { api, .. } => api.clone(),
    };
    let mut client = connect(&args).await?;
    match query {
        Query::Latest { assets, .. } => {
            let assets = if assets.is_empty() {
                client
                    .list_assets(ListAssetsRequest {})
                    .await
                    .map_err(grpc)?
                    .into_inner()
                    .asset_ids
            } else {
                assets
            };
            if assets.is_empty() {
                if args.json {
                    print_json(&json!({"ticks": [], "missing": []}))?;
                } else {
                    outln!("no assets yet")?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let mut ticks = Vec::new();
            let mut missing = Vec::new();
            for chunk in assets.chunks(1000) {
                let r = client
                    .batch_get_latest(BatchGetLatestRequest {
                        asset_ids: chunk.to_vec(),
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                ticks.extend(r.ticks);
                missing.extend(r.missing);
            }
            if args.json {
                print_json(&json!({
                    "ticks": ticks.iter().map(tick_json).collect::<Vec<_>>(),
                    "missing": missing,
                }))?;
            } else {
                table(
                    &TICK_HEADER,
                    &ticks.iter().map(tick_row).collect::<Vec<_>>(),
                )?;
                for m in &missing {
                    errln!("{m}: no ticks");
                }
            }
            Ok(if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Query::Ticks {
            asset,
            api: _,
            range,
            limit,
            page_token,
            all,
        } => {
            let (from_ns, to_ns) = range.resolve()?;
            let mut token = page_token;
            let mut ticks = Vec::new();
            loop {
                let page = client
                    .list_ticks(ListTicksRequest {
                        asset_id: asset.clone(),
                        from_ns,
                        to_ns,
                        limit,
                        page_token: token,
                    })
                    .await
                    .map_err(grpc)?
                    .into_inner();
                ticks.extend(page.ticks);
                token = page.next_page_token;
                if !all || token.is_empty() {
                    break;
                }
            }
            if args.json {
                print_json(&json!({
                    "ticks": ticks.iter().map(tick_json).collect::<Vec<_>>(),
                    "next_page_token": token,
                }))?;
            } else {
                table(
                    &TICK_HEADER,
                    &ticks.iter().map(tick_row).collect::<Vec<_>>(),
                )?;
                if !token.is_empty() {
                    errln!("more: --page-token {token} (or --all)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Query::Candles {
            asset,
            api: _,
            interval,
            range,
        } => {
            let (from_ns, to_ns) = range.resolve()?;
            let candles = client
                .get_candles(GetCandlesRequest {
                    asset_id: asset,
                    interval,
                    from_ns,
                    to_ns,
                })
                .await
                .map_err(grpc)?
                .into_inner()
                .candles;
            if args.json {
                print_json(&json!({
                    "candles": candles.iter().map(candle_json).collect::<Vec<_>>(),
                }))?;
            } else {
                table(
                    &CANDLE_HEADER,
                    &candles.iter().map(candle_row).collect::<Vec<_>>(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Query::Ma {
            asset,
            api: _,
            points,
            window,
        } => {
            let over = match (points, window) {
                (_, Some(w)) => Over::Window(w),
                (Some(p), None) => Over::Points(p),
                (None, None) => Over::Points(20),
            };
            let r = client
                .get_moving_average(GetMovingAverageRequest {
                    asset_id: asset,
                    over: Some(over),
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if args.json {
                print_json(&json!({
                    "asset_id": r.asset_id,
                    "sma": r.sma,
                    "vwap": r.vwap,
                    "count": r.count,
                    "from_ns": r.from_ns,
                    "to_ns": r.to_ns,
                }))?;
            } else {
                table(
                    &["ASSET", "SMA", "VWAP", "TICKS", "FROM", "TO"],
                    &[vec![
                        r.asset_id.clone(),
                        r.sma.clone(),
                        r.vwap.clone().unwrap_or_else(|| "-".into()),
                        r.count.to_string(),
                        fmt_time(r.from_ns),
                        fmt_time(r.to_ns),
                    ]],
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Query::Assets { .. } => {
            let assets = client
                .list_assets(ListAssetsRequest {})
                .await
                .map_err(grpc)?
                .into_inner()
                .asset_ids;
            if args.json {
                print_json(&json!({ "asset_ids": assets }))?;
            } else {
                for a in assets {
                    outln!("{a}")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Query::Watch {
            assets,
            api: _,
            candles,
            count,
        } => watch(client, args.json, assets, candles, count).await,
    }
}

/// `tickctl watch`: prints each streamed tick (or candle update) as it comes, gaps on stderr (and as
/// `{"gap": …}` lines with `--json`). Ends on Ctrl-C, after `count` messages, or when the server ends
/// the stream (exit 0 when it ended cleanly).
async fn watch(
    mut client: TickServiceClient<Channel>,
    json: bool,
    assets: Vec<String>,
    candles: Option<String>,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let stop = tickfleet_service::shutdown_on_signals();
    let gap = |g: &v1::Gap| -> Result<(), StdoutClosed> {
        if json {
            print_json(&json!({"gap": {"missed": g.missed, "reason": g.reason}}))
        } else {
            errln!("-- gap: {} missed ({})", g.missed, g.reason);
            Ok(())
        }
    };
    let mut seen = 0u64;
    let done = |seen: u64| count.is_some_and(|c| seen >= c);
    match candles {
        None => {
            let mut stream = client
                .stream_ticks(StreamTicksRequest { asset_ids: assets })
                .await
                .map_err(grpc)?
                .into_inner();
            if !json {
                outln!("{}", TICK_HEADER.join("  "))?;
            }
            while !done(seen) {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.message() => m.map_err(grpc)?,
                };
                let Some(msg) = msg else { break };
                match msg.event {
                    Some(stream_ticks_response::Event::Tick(t)) => {
                        seen += 1;
                        if json {
                            print_json(&tick_json(&t))?;
                        } else {
                            outln!("{}", tick_row(&t).join("  "))?;
                        }
                    }
                    Some(stream_ticks_response::Event::Gap(g)) => gap(&g)?,
                    None => {}
                }
            }
        }
        Some(interval) => {
            let mut stream = client
                .stream_candles(StreamCandlesRequest {
                    asset_ids: assets,
                    interval,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if !json {
                outln!("{}  CLOSED", CANDLE_HEADER.join("  "))?;
            }
            while !done(seen) {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.message() => m.map_err(grpc)?,
                };
                let Some(msg) = msg else { break };
                match msg.event {
                    Some(stream_candles_response::Event::Candle(c)) => {
                        seen += 1;
                        if json {
                            print_json(&candle_json(&c))?;
                        } else {
                            outln!("{}  {}", candle_row(&c).join("  "), c.closed)?;
                        }
                    }
                    Some(stream_candles_response::Event::Gap(g)) => gap(&g)?,
                    None => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_parse() {
        assert_eq!(
            parse_time("1700000000000000000").unwrap(),
            1_700_000_000_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500_000_000
        );
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_duration("5m").unwrap(), 300_000_000_000);
        assert!(parse_duration("5").is_err());
        assert_eq!(
            fmt_time(1_700_000_000_500_000_000),
            "2023-11-14T22:13:20.500Z"
        );
    }
}

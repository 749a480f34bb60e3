//! `tickctl bench rollups`: what write-time rollups cost and what they buy, in one run on one Redis.
//!
//! 1. **Write cost.** The same batches of one asset's ticks are stored twice, one client, in fresh key
//!    prefixes: once with the raw-ticks-only script of the release before rollups
//!    (`bench_raw_write.lua`, one `EVALSHA` per batch), once with [`RedisStore::write_batch`] (prepare,
//!    exact candle arithmetic in Rust, compare-and-set write). Reported: ticks/s and the Redis server's
//!    CPU per tick (`INFO cpu` around each run), which is what bounds a fleet of workers on one Redis.
//! 2. **Query cost.** A day of `--ticks` ticks of one asset is stored (with rollups), then 1-minute
//!    candles over that day are asked of the api (in process, over gRPC on loopback) `--queries`
//!    times (p50, p99), and computed the way the api did before rollups — every raw tick read page by
//!    page (4096) and folded — `--raw-queries` times.
//!
//! No figure is asserted anywhere; BENCHMARKS.md quotes a run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rust_decimal::Decimal;
use tickfleet_api::calc::CandleSeries;
use tickfleet_proto::Tick;
use tickfleet_proto::v1::GetCandlesRequest;
use tickfleet_proto::v1::tick_service_client::TickServiceClient;
use tickfleet_service::{CancellationToken, Health};
use tickfleet_store::{RangeQuery, RedisStore, Retention, TickStore, member};

use crate::out::sayln;

const RAW_WRITE_LUA: &str = include_str!("bench_raw_write.lua");
const DAY_NS: i64 = 86_400 * 1_000_000_000;

/// Options of `tickctl bench rollups`.
#[derive(Args, Debug)]
pub struct RollupsBenchArgs {
    /// Redis URL (its data is not touched outside this run's key prefixes).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Ticks of the day the candle queries read.
    #[arg(long, default_value_t = 5_000_000)]
    ticks: u64,
    /// Ticks stored by each side of the write-cost comparison (the first of the day's).
    #[arg(long, default_value_t = 1_000_000)]
    write_ticks: u64,
    /// Ticks per batch (a worker lane's batch of one asset).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Candle queries served from rollups.
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// Candle computations from raw ticks (each reads the whole day).
    #[arg(long, default_value_t = 3)]
    raw_queries: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Ticks of asset `B0` spread evenly over one UTC day, a random walk in cents.
fn day_of_ticks(n: u64, day: i64) -> Vec<Tick> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut cents: i64 = 6_425_010;
    (0..n)
        .map(|i| {
            cents = (cents + rng.random_range(-50..=50)).max(1);
            Tick {
                asset_id: "B0".into(),
                price: Decimal::new(cents, 2),
                size: Some(Decimal::new(rng.random_range(1..100_000), 5)),
                event_time_ns: day + (i as i128 * DAY_NS as i128 / n as i128) as i64,
                seq: i + 1,
                source: "bench".into(),
            }
        })
        .collect()
}

async fn redis_cpu_secs(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user") + field("used_cpu_sys"))
}

/// One side of the write comparison: (ticks/s, Redis CPU µs per tick).
struct WriteCost {
    rate: f64,
    redis_us_per_tick: f64,
}

async fn raw_only(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    batches: &[&[Tick]],
) -> anyhow::Result<WriteCost> {
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(RAW_WRITE_LUA)
        .query_async(conn)
        .await?;
    let cpu = redis_cpu_secs(conn).await?;
    let started = Instant::now();
    let mut n = 0;
    for batch in batches {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha)
            .arg(2)
            .arg(format!("{prefix}:{{B0}}:ticks"))
            .arg(format!("{prefix}:{{B0}}:latest"))
            .arg(0)
            .arg(0)
            .arg(format!("{prefix}:{{B0}}:live"))
            .arg(0);
        for t in *batch {
            cmd.arg(member::score(t.event_time_ns))
                .arg(member::encode(t));
        }
        let added: usize = cmd.query_async(conn).await?;
        n += added;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = redis_cpu_secs(conn).await? - cpu;
    Ok(WriteCost {
        rate: n as f64 / secs,
        redis_us_per_tick: cpu * 1e6 / n.max(1) as f64,
    })
}

async fn with_rollups(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    batches: &[&[Tick]],
) -> anyhow::Result<WriteCost> {
    let cpu = redis_cpu_secs(conn).await?;
    let started = Instant::now();
    let mut n = 0;
    for batch in batches {
        n += store.write_batch(batch).await?.inserted;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = redis_cpu_secs(conn).await? - cpu;
    Ok(WriteCost {
        rate: n as f64 / secs,
        redis_us_per_tick: cpu * 1e6 / n.max(1) as f64,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Runs `tickctl bench rollups`.
pub async fn run(args: RollupsBenchArgs) -> anyhow::Result<ExitCode> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let mut conn = redis::Client::open(args.redis.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    // A recent whole day, so default rollup retention keeps everything.
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let day = now - now.rem_euclid(DAY_NS) - DAY_NS;

    // The write comparison stores the first ticks of the same day: the same density as the query's.
    let day_ticks = day_of_ticks(args.ticks, day);
    let first = &day_ticks[..(args.write_ticks.min(args.ticks) as usize)];
    sayln!(
        "1. write cost: {} ticks of one asset ({:.0} ticks/s of event time), batches of {}",
        first.len(),
        args.ticks as f64 / 86_400.0,
        args.batch
    );
    let batches: Vec<&[Tick]> = first.chunks(args.batch.max(1)).collect();
    let raw = raw_only(&mut conn, &format!("bench-raw-{stamp}"), &batches).await?;
    let store = RedisStore::open(
        &args.redis,
        &format!("bench-rollups-{stamp}"),
        Retention::default(),
    )?;
    let rolled = with_rollups(&mut conn, &store, &batches).await?;
    sayln!(
        "   raw ticks only (pre-rollup script): {:>9.0} ticks/s, Redis {:.2} µs CPU/tick",
        raw.rate,
        raw.redis_us_per_tick
    );
    sayln!(
        "   with rollups (write_batch):         {:>9.0} ticks/s, Redis {:.2} µs CPU/tick",
        rolled.rate,
        rolled.redis_us_per_tick
    );

    sayln!("2. query cost: a day of {} ticks of one asset", args.ticks);
    let store = Arc::new(RedisStore::open(
        &args.redis,
        &format!("bench-day-{stamp}"),
        Retention::default(),
    )?);
    let load = with_rollups(
        &mut conn,
        &store,
        &day_ticks.chunks(args.batch.max(1)).collect::<Vec<_>>(),
    )
    .await?;
    drop(day_ticks);
    sayln!(
        "   stored with rollups: {:.0} ticks/s, Redis {:.2} µs CPU/tick",
        load.rate,
        load.redis_us_per_tick
    );
    let stop = CancellationToken::new();
    let registry = prometheus::Registry::new();
    let running = tickfleet_api::start(
        store.clone(),
        "127.0.0.1:0".parse()?,
        tickfleet_api::ApiMetrics::new(&registry)?,
        Health::new(),
        stop.clone(),
        tickfleet_api::Options::default(),
    )
    .await?;
    let mut client = TickServiceClient::connect(format!("http://{}", running.addr)).await?;
    let request = GetCandlesRequest {
        asset_id: "B0".into(),
        interval: "1m".into(),
        from_ns: Some(day),
        to_ns: Some(day + DAY_NS),
    };
    let mut took = Vec::new();
    let mut candles = 0;
    for _ in 0..args.queries {
        let started = Instant::now();
        candles = client
            .get_candles(request.clone())
            .await?
            .into_inner()
            .candles
            .len();
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&took, 0.5), percentile(&took, 0.99));
    sayln!(
        "   GetCandles 1m over the day, from rollups: {candles} candles, p50 {p50:.2} ms, p99 {p99:.2} ms ({} queries)",
        args.queries
    );
    let mut raw_took = Vec::new();
    for _ in 0..args.raw_queries {
        let started = Instant::now();
        let mut series = CandleSeries::new(60_000_000_000, 10_000);
        let mut q = RangeQuery {
            from_ns: day,
            to_ns: day + DAY_NS,
            limit: 4096,
            after: None,
        };
        loop {
            let page = store.range("B0", &q).await?;
            series.extend(&page.ticks)?;
            match page.next {
                Some(next) => q.after = Some(next),
                None => break,
            }
        }
        anyhow::ensure!(
            series.finish().len() == candles,
            "raw and rollup candle counts differ"
        );
        raw_took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    raw_took.sort_by(f64::total_cmp);
    let raw_p50 = percentile(&raw_took, 0.5);
    sayln!(
        "   the same candles from raw ticks (the api before rollups): p50 {raw_p50:.0} ms, max {:.0} ms ({} runs)",
        raw_took.last().copied().unwrap_or(0.0),
        args.raw_queries
    );
    sayln!(
        "   ratio: {:.0}x faster; write cost: {:.0}% of raw-only ticks/s, {:+.0}% Redis CPU per tick",
        raw_p50 / p50.max(1e-9),
        100.0 * rolled.rate / raw.rate.max(1e-9),
        100.0 * (rolled.redis_us_per_tick / raw.redis_us_per_tick.max(1e-9) - 1.0)
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), running.task).await;
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "write_ticks": args.write_ticks,
            "batch": args.batch,
            "raw_only": {"ticks_per_s": raw.rate, "redis_us_per_tick": raw.redis_us_per_tick},
            "with_rollups": {"ticks_per_s": rolled.rate, "redis_us_per_tick": rolled.redis_us_per_tick},
            "day_ticks": args.ticks,
            "day_load": {"ticks_per_s": load.rate, "redis_us_per_tick": load.redis_us_per_tick},
            "candles": candles,
            "rollup_query_ms": {"p50": p50, "p99": p99, "n": args.queries},
            "raw_query_ms": {"p50": raw_p50, "max": raw_took.last(), "n": args.raw_queries},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

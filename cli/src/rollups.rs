//! `tickctl rollups rebuild`: recomputes candle rollups from the stored ticks — for data written before
//! rollups existed, or after a bug — through [`TickStore::rebuild_rollups`], which is idempotent and
//! safe while workers write (a day is replaced only if no tick was stored into it meanwhile).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use tickfleet_store::{Retention, RollupRetention, TickStore};

use crate::out::sayln;
use crate::query::parse_time;

/// Options of `tickctl rollups`.
#[derive(Args, Debug)]
pub struct RollupsArgs {
    #[command(subcommand)]
    command: RollupsCommand,
}

#[derive(Subcommand, Debug)]
enum RollupsCommand {
    /// Recompute the rollups of one asset (or every asset) over the UTC days overlapping
    /// [--from, --to) from its stored ticks. Days still being written to after a few attempts are
    /// reported and the command exits 1: run it again when they are quiet.
    Rebuild(RebuildArgs),
}

#[derive(Args, Debug)]
struct RebuildArgs {
    /// Only this asset (default: every asset).
    #[arg(long)]
    asset: Option<String>,
    /// From (RFC 3339 or ns since the epoch; default: each asset's first stored tick).
    #[arg(long)]
    from: Option<String>,
    /// To, exclusive (default: each asset's newest tick).
    #[arg(long)]
    to: Option<String>,
    /// The rollup retention the workers use (rebuilt candles older than it are dropped again).
    #[arg(long, env = "TICKFLEET_ROLLUP_RETENTION", default_value = "", value_parser = RollupRetention::parse)]
    rollup_retention: RollupRetention,
    /// The store.
    #[command(flatten)]
    redis: tickfleet_store::RedisOptions,
}

/// Runs `tickctl rollups …`.
pub async fn run(args: RollupsArgs) -> anyhow::Result<ExitCode> {
    let RollupsCommand::Rebuild(args) = args.command;
    let from = args
        .from
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(0);
    let to = args
        .to
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(i64::MAX);
    // Raw retention is the workers' business: a rebuild never removes a tick.
    let store = args
        .redis
        .open(Retention::default())?
        .with_rollup_retention(args.rollup_retention);
    let assets = match args.asset {
        Some(a) => vec![a],
        None => store.assets().await?,
    };
    let mut busy = 0;
    for asset in &assets {
        let s = store.rebuild_rollups(asset, from, to).await?;
        sayln!(
            "{asset}: {} days, {} ticks read, {} candles written{}",
            s.days,
            s.ticks,
            s.candles,
            if s.busy.is_empty() {
                String::new()
            } else {
                format!(", {} days busy (not rebuilt): {:?}", s.busy.len(), s.busy)
            }
        );
        busy += s.busy.len();
    }
    Ok(if busy == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

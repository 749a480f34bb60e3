//! `tickctl poll create | get | delete | quote`: provider polling jobs over the api's
//! `tickfleet.v1.PollService` (the jobs run in `tickfleet-connector poll`; the REST routes
//! `POST /v1/prices/poll` and `/v1/polls/{id}` are the same calls).
//!
//! A table on stdout by default; `--json` prints one JSON document, prices as exact decimal strings.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tickfleet_proto::v1::{
    self, CreatePollJobRequest, DeletePollJobRequest, GetPollJobRequest, GetQuoteRequest,
    poll_service_client::PollServiceClient,
};

use crate::out::outln;
use crate::query::{ApiArgs, channel, fmt_time, grpc, print_json, table};

/// `tickctl poll …`.
#[derive(Args, Debug)]
pub struct PollArgs {
    #[command(subcommand)]
    command: PollCommand,
}

/// The polling job commands.
#[derive(Subcommand, Debug)]
enum PollCommand {
    /// Create a job: poll `provider` for each symbol every `interval`; prints the job's id.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// finnhub, alphavantage or yahoo.
        #[arg(long)]
        provider: String,
        /// How often each symbol is polled (100ms..=1d, e.g. 5s, 1m).
        #[arg(long, default_value = "5s")]
        interval: String,
        /// Symbols, as the provider names them (AAPL, ^GSPC, EURUSD=X, BINANCE:BTCUSDT).
        #[arg(required = true)]
        symbols: Vec<String>,
    },
    /// Show a job and, per symbol, which connector holds its lease (and its fencing token) and the
    /// last quote.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// The job's id.
        id: String,
    },
    /// Delete a job: its symbols stop being polled within one lease renewal.
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        /// The job's id.
        id: String,
    },
    /// The cached quote of one symbol from one provider.
    Quote {
        #[command(flatten)]
        api: ApiArgs,
        /// finnhub, alphavantage or yahoo.
        #[arg(long)]
        provider: String,
        /// The symbol.
        symbol: String,
    },
}

fn job_json(j: &v1::PollJob) -> Value {
    json!({
        "id": j.id,
        "provider": j.provider,
        "symbols": j.symbols,
        "interval": j.interval,
        "created": fmt_time(j.created_ns),
        "status": j.status.iter().map(|s| json!({
            "symbol": s.symbol,
            "holder": s.holder,
            "fence": s.fence,
            "quote": s.quote.as_ref().map(quote_json),
        })).collect::<Vec<_>>(),
    })
}

fn quote_json(q: &v1::Quote) -> Value {
    json!({
        "provider": q.provider,
        "symbol": q.symbol,
        "price": q.price,
        "time": fmt_time(q.time_ns),
        "fetched": fmt_time(q.fetched_ns),
        "raw_id": q.raw_id,
    })
}

/// Runs one `poll` command.
pub async fn run(args: PollArgs) -> anyhow::Result<ExitCode> {
    let (PollCommand::Create { api, .. }
    | PollCommand::Get { api, .. }
    | PollCommand::Delete { api, .. }
    | PollCommand::Quote { api, .. }) = &args.command;
    let json = api.json;
    let mut client = PollServiceClient::new(channel(api).await?);
    match args.command {
        PollCommand::Create {
            provider,
            interval,
            symbols,
            ..
        } => {
            let job = client
                .create_poll_job(CreatePollJobRequest {
                    symbols,
                    interval,
                    provider,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                print_json(&job_json(&job))?;
            } else {
                outln!("{}", job.id)?;
            }
        }
        PollCommand::Get { id, .. } => {
            let job = client
                .get_poll_job(GetPollJobRequest { id })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                print_json(&job_json(&job))?;
            } else {
                outln!(
                    "job {}: {} every {}, created {}",
                    job.id,
                    job.provider,
                    job.interval,
                    fmt_time(job.created_ns)
                )?;
                let rows: Vec<Vec<String>> = job
                    .status
                    .iter()
                    .map(|s| {
                        let (price, time) = s.quote.as_ref().map_or_else(
                            || ("-".to_owned(), "-".to_owned()),
                            |q| (q.price.clone(), fmt_time(q.time_ns)),
                        );
                        let holder = if s.holder.is_empty() {
                            "-".to_owned()
                        } else {
                            s.holder.clone()
                        };
                        vec![s.symbol.clone(), holder, s.fence.to_string(), price, time]
                    })
                    .collect();
                table(&["SYMBOL", "HOLDER", "FENCE", "PRICE", "TIME"], &rows)?;
            }
        }
        PollCommand::Delete { id, .. } => {
            client
                .delete_poll_job(DeletePollJobRequest { id: id.clone() })
                .await
                .map_err(grpc)?;
            if json {
                print_json(&json!({ "deleted": id }))?;
            } else {
                outln!("deleted {id}")?;
            }
        }
        PollCommand::Quote {
            provider, symbol, ..
        } => {
            let q = client
                .get_quote(GetQuoteRequest { provider, symbol })
                .await
                .map_err(grpc)?
                .into_inner();
            if json {
                print_json(&quote_json(&q))?;
            } else {
                table(
                    &["SYMBOL", "PROVIDER", "PRICE", "TIME", "FETCHED", "RAW"],
                    &[vec![
                        q.symbol.clone(),
                        q.provider.clone(),
                        q.price.clone(),
                        fmt_time(q.time_ns),
                        fmt_time(q.fetched_ns),
                        q.raw_id.clone(),
                    ]],
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

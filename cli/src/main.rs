//! `tickctl`: the tickfleet command line — load generator, dev broker, local demo and store audit.

mod bench;
mod bench_api;
mod bench_rollups;
mod demo;
mod demo_source;
mod dev_broker;
mod dlq;
mod out;
mod polls;
mod produce;
mod query;
mod rollups;
mod verify;

use clap::{Parser, Subcommand};

/// tickfleet's command line: run the whole pipeline locally, query and watch it through the api, produce
/// ticks, run a dev Kafka broker, and check what the store holds.
#[derive(Parser, Debug)]
#[command(name = "tickctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole pipeline on this machine with embedded defaults: an in-process Kafka-protocol broker,
    /// the in-memory store (or --redis), several workers, the gRPC api and the generator, printing live
    /// throughput.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Query(query::Query),
    /// Produce random-walk ticks for N assets (the load generator).
    Produce(produce::ProduceArgs),
    /// Run an in-memory Kafka-protocol broker (librdkafka's mock cluster) for tests and laptops; prints its
    /// bootstrap servers and serves until SIGTERM/SIGINT.
    DevBroker(dev_broker::DevBrokerArgs),
    /// Check the store against a `produce --report`: per asset, no tick lost, none doubled, order kept.
    Verify(verify::VerifyArgs),
    /// List the dead-letter topic, or replay it after a fix.
    Dlq(dlq::DlqArgs),
    /// Measure: worker ingest throughput, CPU and memory; the broker's raw consume rate.
    Bench(bench::BenchArgs),
    /// Candle rollups in the store: `rebuild` recomputes them from the stored ticks.
    Rollups(rollups::RollupsArgs),
    /// Provider polling jobs (run by `tickfleet-connector poll`): create, get, delete, and cached
    /// quotes.
    Poll(polls::PollArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // tickctl talks to people on stdout; its logs stay at warnings unless RUST_LOG asks for more.
    tickfleet_service::init_tracing_with(false, "warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            out::errln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Query(q) => query::run(q).await,
            Command::Produce(args) => produce::run(args).await,
            Command::DevBroker(args) => dev_broker::run(args).await,
            Command::Verify(args) => verify::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Rollups(args) => rollups::run(args).await,
            Command::Poll(args) => polls::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        // The reader of stdout has gone (`tickctl watch … | head -3`): it took what it wanted.
        Err(e) if out::is_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            out::errln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

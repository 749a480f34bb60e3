//! `tickctl dev-broker`: librdkafka's mock cluster as a process.
//!
//! It speaks the Kafka protocol on loopback TCP ports, so any Kafka client (the worker, kcat, Python's
//! confluent-kafka) can use it. Its limits: topics are created here (`--topic NAME:PARTITIONS`), not
//! through the admin API; unknown topics auto-create with 4 partitions; about 5 MiB are kept per
//! partition; nothing is persisted; offset commits are refused while a rebalance is in progress.
//!
//! Outages on demand, for tests and drills: `kill -USR1 PID` takes every broker down (connections are
//! closed and refused), `kill -USR2 PID` brings them back; data and committed offsets survive.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::out::{errln, sayln};
use clap::Args;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Options of `tickctl dev-broker`.
#[derive(Args, Debug)]
pub struct DevBrokerArgs {
    /// Topics to create, `NAME:PARTITIONS` (repeatable).
    #[arg(long = "topic", default_value = "ticks:8", value_parser = parse_topic)]
    topics: Vec<(String, i32)>,
    /// Number of brokers in the cluster.
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Also write the bootstrap servers to this file (written atomically once the broker is up).
    #[arg(long)]
    bootstrap_file: Option<PathBuf>,
}

fn parse_topic(s: &str) -> Result<(String, i32), String> {
    let (name, partitions) = s.rsplit_once(':').unwrap_or((s, "8"));
    let partitions: i32 = partitions
        .parse()
        .map_err(|_| format!("{s:?}: partitions must be a number"))?;
    if name.is_empty() || partitions < 1 {
        return Err(format!(
            "{s:?}: expected NAME:PARTITIONS with PARTITIONS >= 1"
        ));
    }
    Ok((name.to_owned(), partitions))
}

/// A running mock cluster with its topics.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts a cluster of `brokers` brokers and creates `topics`.
    pub fn start(brokers: i32, topics: &[(String, i32)]) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(brokers)?;
        for (name, partitions) in topics {
            cluster.create_topic(name, *partitions, 1)?;
        }
        Ok(DevBroker { cluster })
    }

    /// The bootstrap servers list.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

pub async fn run(args: DevBrokerArgs) -> anyhow::Result<ExitCode> {
    let broker = DevBroker::start(args.brokers, &args.topics)?;
    let servers = broker.bootstrap_servers();
    if let Some(path) = &args.bootstrap_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{servers}\n"))?;
        std::fs::rename(&tmp, path)?;
    }
    sayln!("{servers}");
    // A closed stdout is no reason to stop the broker (sayln! ignored it too).
    let _ = std::io::stdout().flush();
    let topics: Vec<String> = args
        .topics
        .iter()
        .map(|(n, p)| format!("{n}:{p}"))
        .collect();
    tracing::info!(bootstrap = %servers, ?topics,
        "dev broker up; SIGTERM or SIGINT stops it, SIGUSR1/SIGUSR2 take it down/up");
    let stop = tickfleet_service::shutdown_on_signals();
    serve_outages(&broker, args.brokers, &stop).await?;
    drop(broker);
    Ok(ExitCode::SUCCESS)
}

/// Until `stop`: SIGUSR1 takes every broker down, SIGUSR2 brings them all back up.
#[cfg(unix)]
async fn serve_outages(
    broker: &DevBroker,
    brokers: i32,
    stop: &tickfleet_service::CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut down = signal(SignalKind::user_defined1())?;
    let mut up = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = down.recv() => {
                for id in 1..=brokers {
                    broker.cluster.broker_down(id)?;
                }
                errln!("dev-broker: all {brokers} broker(s) DOWN");
            }
            _ = up.recv() => {
                for id in 1..=brokers {
                    broker.cluster.broker_up(id)?;
                }
                errln!("dev-broker: all {brokers} broker(s) UP");
            }
        }
    }
}

#[cfg(not(unix))]
async fn serve_outages(
    _: &DevBroker,
    _: i32,
    stop: &tickfleet_service::CancellationToken,
) -> anyhow::Result<()> {
    stop.cancelled().await;
    Ok(())
}

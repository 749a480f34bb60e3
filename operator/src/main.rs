//! `tickfleet-operator`: runs the TickPipeline controller.
//!
//! Serves `/healthz`, `/readyz` and `/metrics` on the admin address, logs with `tracing` (text or
//! JSON), takes part in leader election on a Lease so only one replica reconciles, and shuts down
//! gracefully on SIGTERM/SIGINT (in-flight reconciles are cancelled, the Lease is released).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Parser, ValueEnum};
use kube::Client;
use kube::api::{Api, ListParams};
use tickfleet_operator::TickPipeline;
use tickfleet_operator::controller::{self, Context};
use tickfleet_operator::kafka::RdKafkaAdmin;
use tickfleet_operator::leader::{self, HoldEnd, LeaderElector, Leadership, LeaseConfig};
use tickfleet_operator::metrics::Metrics;
use tickfleet_service::{Health, init_tracing, serve_admin, shutdown_on_signals};
use tracing::{error, info};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The TickPipeline Kubernetes operator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Take part in leader election; turn off only when running a single replica.
    #[arg(long, env = "TICKFLEET_LEADER_ELECTION", action = ArgAction::Set, default_value_t = true)]
    leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(
        long,
        env = "TICKFLEET_LEASE_NAME",
        default_value = "tickfleet-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (the operator's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tickfleet-system")]
    lease_namespace: String,
    /// Identity in the election (the pod name, from the downward API); the host name and the
    /// process id when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a standby waits after it last saw the Lease change before it takes it over.
    #[arg(long, env = "TICKFLEET_LEASE_DURATION_SECS", default_value_t = leader::DEFAULT_LEASE_DURATION_SECS)]
    lease_duration_secs: u64,
    /// Seconds the leader keeps trying to renew before it stops reconciling and exits; below the
    /// lease duration. Default: 2/3 of the lease duration (10 s for 15 s).
    #[arg(long, env = "TICKFLEET_LEASE_RENEW_DEADLINE_SECS")]
    lease_renew_deadline_secs: Option<f64>,
    /// Seconds between renewals (and between a standby's reads of the Lease); below the renew
    /// deadline. Default: 2/15 of the lease duration (2 s for 15 s).
    #[arg(long, env = "TICKFLEET_LEASE_RETRY_SECS")]
    lease_retry_secs: Option<f64>,
}

impl Args {
    /// The Lease settings, or `None` when leader election is off.
    fn lease_config(&self) -> anyhow::Result<Option<LeaseConfig>> {
        if !self.leader_election {
            return Ok(None);
        }
        let secs = |what: &str, s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| anyhow::anyhow!("{what}: {s} is not a number of seconds"))
        };
        let mut cfg = LeaseConfig::derived(
            self.lease_name.clone(),
            self.lease_namespace.clone(),
            leader::identity(self.identity.clone()),
            Duration::from_secs(self.lease_duration_secs),
        );
        if let Some(s) = self.lease_renew_deadline_secs {
            cfg.renew_deadline = secs("--lease-renew-deadline-secs", s)?;
        }
        if let Some(s) = self.lease_retry_secs {
            cfg.retry_period = secs("--lease-retry-secs", s)?;
        }
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(cfg))
    }
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(run());
    // A Kafka call cancelled at shutdown may still hold a blocking thread until its own timeout
    // (librdkafka calls cannot be interrupted): do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(matches!(args.log_format, LogFormat::Json));
    let lease = args.lease_config()?;
    let shutdown = shutdown_on_signals();

    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).context("registering metrics")?;
    let health = Health::new();
    let (_, admin) = serve_admin(args.admin_addr, registry, health.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding admin address {}", args.admin_addr))?;

    let client = Client::try_default()
        .await
        .context("creating the Kubernetes client")?;
    Api::<TickPipeline>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .context("listing TickPipelines; is the CRD installed (manifests/crd.yaml)?")?;
    // ready = up and talking to the API server; a standby replica is ready too
    health.set_ready(true);

    let elector = lease.map(|cfg| LeaderElector::new(client.clone(), cfg));
    let Some(leadership) = Leadership::acquire(elector, &shutdown).await else {
        let _ = admin.await;
        return Ok(());
    };
    metrics.leader.set(1);

    // the controller stops gracefully on shutdown, and at once when leadership is lost;
    // reconciles in flight are cancelled then, not waited for
    let ctx = Arc::new(
        Context::new(client, Arc::new(RdKafkaAdmin::default()), metrics.clone())
            .with_shutdown(leadership.stop()),
    );
    info!("controller starting");
    let controller = controller::run(ctx, leadership.stop().cancelled_owned());
    if leadership.lead(controller).await == HoldEnd::Lost {
        metrics.leader.set(0);
        error!(
            "lost the leader lease: stopped reconciling; exiting so a fresh start rejoins the election"
        );
        std::process::exit(1);
    }
    metrics.leader.set(0);

    let lost = leadership.end().await == HoldEnd::Lost;
    shutdown.cancel();
    let _ = admin.await;
    if lost {
        error!("lost the leader lease; exiting so a fresh start rejoins the election");
        std::process::exit(1);
    }
    info!("stopped");
    Ok(())
}

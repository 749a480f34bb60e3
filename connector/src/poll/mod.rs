//! Provider polling jobs (`tickfleet-connector poll`): every replica runs the same job runner over the
//! jobs in Redis ([`tickfleet_store::jobs`]), and each (provider, symbol) pair is polled by exactly
//! one replica at a time.
//!
//! * **Leases.** Every `--scan-interval-ms` a runner lists the jobs and tries to take the lease of each
//!   pair nobody holds (a Redis lock with `--lease-ttl-ms` and a fencing token drawn with `INCR`). Its
//!   holder renews it every third of the TTL; if the holder dies, the lock expires and another
//!   replica's next scan takes it, so a pair is taken over within one TTL plus one scan interval of
//!   its holder's last renewal. A holder polls only while its lease is surely valid (half a TTL left,
//!   counted from when its last renewal was sent, and each request's deadline a tenth of a TTL before
//!   that), so its polls end before anyone else can take the lease; a failed renewal stops it at once.
//! * **A poll** asks the [`Provider`] for the symbol's quote, then *commits* it to Redis in one script
//!   that first checks the lease and its token (the fence): the raw response is kept with an id, the
//!   quote cached with `--cache-ttl-ms` (what `GET /v1/prices/latest?provider=` reads), and a *new*
//!   price (price or provider time changed) becomes the pair's next tick, pending. The runner produces
//!   it to Kafka (key = symbol, `source` = provider, headers `tickfleet-raw-id`, `tickfleet-fence`),
//!   waits for the acknowledgement and marks it produced; a runner taking a lease over first produces
//!   the pair's pending tick, if its last holder died in between. Each new price is one tick with the
//!   pair's next sequence number, so a tick produced twice is stored once.
//! * **Backoff per provider.** An error or a rate limit (429, Alpha Vantage's quota message) pauses
//!   every poll of that provider in this runner: for `Retry-After` when the provider sent one, else
//!   exponentially from `--backoff-min-ms` to `--backoff-max-ms` with jitter; a success resets it.
//! * **API keys** come from `FINNHUB_API_KEY` / `ALPHAVANTAGE_API_KEY` (a Secret in the cluster); they
//!   are sent to the provider only and never logged (request URLs are not logged either).
//!
//! Here: the flags, the metrics and the runner ([`run`]: scans the jobs, takes free leases, starts and
//! stops the pollers). Holding one lease and polling under it is `lease`; a poll's HTTP request and
//! the per-provider backoff are `fetch`.

mod fetch;
pub mod fixture;
mod lease;
pub mod provider;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use prometheus::{IntCounterVec, IntGauge, Opts};
use tickfleet_service::CancellationToken;
use tickfleet_store::jobs::{JobStore, Lease, Pair};
use tracing::{info, warn};

use crate::{Error, KafkaOptions, KafkaSink, Metrics, Readiness};
use fetch::{Gate, HttpClient, http_client};
use lease::run_pair;
pub use provider::{Provider, ProviderError, QuoteRequest, QuoteResponse};

/// Header of a polled tick's Kafka message: the id of the raw response it came from.
pub const RAW_ID_HEADER: &str = "tickfleet-raw-id";
/// Header of a polled tick's Kafka message: `HOLDER TOKEN` of the lease it was produced under.
pub const FENCE_HEADER: &str = "tickfleet-fence";

/// `tickfleet-connector poll`'s flags; each is also a `TICKFLEET_*` environment variable.
#[derive(Args, Debug, Clone)]
pub struct PollConfig {
    /// The Redis holding the jobs (the pipeline's store: same URL and prefix as its api).
    #[command(flatten)]
    pub redis: tickfleet_store::RedisOptions,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaOptions,
    /// Topic to produce to.
    #[arg(long, env = "TICKFLEET_TOPIC", default_value = "ticks")]
    pub topic: String,
    /// Payload format, the one the pipeline's workers read: protobuf (tickfleet.v1.Tick) or json.
    #[arg(long, env = "TICKFLEET_FORMAT", default_value = "protobuf")]
    pub format: tickfleet_proto::Format,
    /// This runner's id in the leases (no spaces) [default: $HOSTNAME, else connector-PID].
    #[arg(long, env = "TICKFLEET_POLL_HOLDER_ID")]
    pub holder_id: Option<String>,
    /// Lease TTL, in milliseconds: how long a dead holder keeps a pair from being polled.
    #[arg(long, env = "TICKFLEET_POLL_LEASE_TTL_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(300..))]
    pub lease_ttl_ms: u64,
    /// How often the jobs are listed and free leases tried, in milliseconds.
    #[arg(long, env = "TICKFLEET_POLL_SCAN_INTERVAL_MS", default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(50..))]
    pub scan_interval_ms: u64,
    /// How long a cached quote is served after its poll, in milliseconds.
    #[arg(long, env = "TICKFLEET_POLL_CACHE_TTL_MS", default_value_t = 60_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_ttl_ms: u64,
    /// First backoff after a provider error or rate limit without Retry-After, in milliseconds.
    #[arg(long, env = "TICKFLEET_POLL_BACKOFF_MIN_MS", default_value_t = 1_000)]
    pub backoff_min_ms: u64,
    /// Longest backoff, in milliseconds.
    #[arg(long, env = "TICKFLEET_POLL_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub backoff_max_ms: u64,
    /// Deadline of one provider request, in milliseconds.
    #[arg(long, env = "TICKFLEET_POLL_HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
    /// Finnhub's base URL.
    #[arg(long, env = "TICKFLEET_FINNHUB_URL")]
    pub finnhub_url: Option<String>,
    /// Alpha Vantage's base URL.
    #[arg(long, env = "TICKFLEET_ALPHAVANTAGE_URL")]
    pub alphavantage_url: Option<String>,
    /// Yahoo Finance's base URL.
    #[arg(long, env = "TICKFLEET_YAHOO_URL")]
    pub yahoo_url: Option<String>,
    /// Finnhub API key (from a Secret; never logged).
    #[arg(long, env = "FINNHUB_API_KEY", hide_env_values = true)]
    pub finnhub_api_key: Option<String>,
    /// Alpha Vantage API key (from a Secret; never logged).
    #[arg(long, env = "ALPHAVANTAGE_API_KEY", hide_env_values = true)]
    pub alphavantage_api_key: Option<String>,
    /// Upper bound on the shutdown drain (waiting for Kafka acknowledgements), in seconds.
    #[arg(long, env = "TICKFLEET_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Address of the admin endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "TICKFLEET_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "TICKFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl PollConfig {
    /// The holder id: `--holder-id`, else `$HOSTNAME` (the pod's name), else `connector-PID`.
    pub fn holder(&self) -> String {
        let id = self
            .holder_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("connector-{}", std::process::id()));
        id.replace(char::is_whitespace, "_")
    }

    fn base_url(&self, p: &dyn Provider) -> String {
        let url = match p.name() {
            "finnhub" => self.finnhub_url.clone(),
            "alphavantage" => self.alphavantage_url.clone(),
            _ => self.yahoo_url.clone(),
        };
        url.unwrap_or_else(|| p.default_base_url().to_owned())
            .trim_end_matches('/')
            .to_owned()
    }

    fn api_key(&self, p: &dyn Provider) -> Option<&str> {
        match p.name() {
            "finnhub" => self.finnhub_api_key.as_deref(),
            "alphavantage" => self.alphavantage_api_key.as_deref(),
            _ => None,
        }
    }

    fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

/// The job runner's metrics, beside the connector's (`tickfleet_connector_…`).
#[derive(Clone)]
pub struct PollMetrics {
    /// Polls by provider and outcome (`new`, `unchanged`, `fenced`, or a [`ProviderError::kind`]).
    pub polls: IntCounterVec,
    /// Leases this runner holds.
    pub leases: IntGauge,
    /// Leases lost (not renewed in time, or fenced off).
    pub leases_lost: IntGauge,
}

impl PollMetrics {
    /// Registers them in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> Self {
        let polls = IntCounterVec::new(
            Opts::new(
                "tickfleet_connector_polls_total",
                "Provider polls by outcome",
            ),
            &["provider", "outcome"],
        )
        .expect("valid metric");
        let leases = IntGauge::new(
            "tickfleet_connector_poll_leases",
            "(provider, symbol) leases this runner holds",
        )
        .expect("valid metric");
        let leases_lost = IntGauge::new(
            "tickfleet_connector_poll_leases_lost",
            "Leases this runner lost (expired or fenced off)",
        )
        .expect("valid metric");
        for m in [
            Box::new(polls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(leases.clone()),
            Box::new(leases_lost.clone()),
        ] {
            metrics.registry.register(m).expect("unique metric");
        }
        PollMetrics {
            polls,
            leases,
            leases_lost,
        }
    }
}

/// What every pair task shares.
struct Shared {
    config: PollConfig,
    holder: String,
    store: Arc<dyn JobStore>,
    sink: KafkaSink,
    client: HttpClient,
    gate: Gate,
    metrics: PollMetrics,
}

struct Held {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    interval: Arc<Mutex<Duration>>,
}

/// Runs the job runner until `shutdown`: scans the jobs, takes free leases, polls what it holds; on
/// shutdown stops polling, releases its leases and waits for Kafka to acknowledge what it produced.
pub async fn run(
    config: PollConfig,
    store: Arc<dyn JobStore>,
    sink: KafkaSink,
    metrics: PollMetrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let holder = config.holder();
    let shared = Arc::new(Shared {
        gate: Gate::new(
            Duration::from_millis(config.backoff_min_ms),
            Duration::from_millis(config.backoff_max_ms),
        ),
        client: http_client()?,
        holder,
        store,
        sink,
        metrics,
        config,
    });
    info!(holder = %shared.holder, ttl_ms = shared.config.lease_ttl_ms, "job runner started");
    let mut held: HashMap<Pair, Held> = HashMap::new();
    let scan = Duration::from_millis(shared.config.scan_interval_ms);
    while !shutdown.is_cancelled() {
        held.retain(|_, h| !h.task.is_finished());
        match shared.store.jobs().await {
            Ok(jobs) => {
                readiness.set_subscribed(true);
                let mut wanted: HashMap<Pair, Duration> = HashMap::new();
                for job in &jobs {
                    if provider::provider(&job.provider).is_none() {
                        continue;
                    }
                    for s in &job.symbols {
                        let every = Duration::from_millis(job.interval_ms.max(1));
                        wanted
                            .entry(Pair::new(&job.provider, s))
                            .and_modify(|d| *d = (*d).min(every))
                            .or_insert(every);
                    }
                }
                held.retain(|pair, h| {
                    let keep = wanted.contains_key(pair);
                    if !keep {
                        info!(%pair, "no job polls the pair any more; releasing");
                        h.stop.cancel();
                    }
                    keep
                });
                for (pair, every) in wanted {
                    if let Some(h) = held.get(&pair) {
                        *h.interval.lock().unwrap_or_else(|e| e.into_inner()) = every;
                        continue;
                    }
                    let sent = Instant::now();
                    match shared
                        .store
                        .acquire(&pair, &shared.holder, shared.config.lease_ttl())
                        .await
                    {
                        Ok(Some(token)) => {
                            info!(%pair, token, "lease taken; polling");
                            let lease = Lease {
                                holder: shared.holder.clone(),
                                token,
                            };
                            let stop = shutdown.child_token();
                            let interval = Arc::new(Mutex::new(every));
                            let task = tokio::spawn(run_pair(
                                shared.clone(),
                                pair.clone(),
                                lease,
                                sent,
                                interval.clone(),
                                stop.clone(),
                            ));
                            held.insert(
                                pair,
                                Held {
                                    stop,
                                    task,
                                    interval,
                                },
                            );
                        }
                        Ok(None) => {}
                        Err(e) => warn!(%pair, error = %e, "taking a lease failed"),
                    }
                }
            }
            Err(e) => {
                readiness.set_subscribed(false);
                warn!(error = %e, "listing the jobs failed");
            }
        }
        shared.metrics.leases.set(held.len() as i64);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(scan) => {}
        }
    }
    info!(
        leases = held.len(),
        "stopping: releasing leases, waiting for Kafka acknowledgements"
    );
    for (_, h) in held {
        h.stop.cancel();
        let _ = h.task.await;
    }
    shared.metrics.leases.set(0);
    use crate::Sink;
    shared
        .sink
        .flush(Duration::from_secs(shared.config.drain_timeout_secs))
        .await
}

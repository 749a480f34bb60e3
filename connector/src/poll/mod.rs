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

pub mod fixture;
pub mod provider;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounterVec, IntGauge, Opts};
use tickfleet_service::CancellationToken;
use tickfleet_store::jobs::{Commit, JobStore, Lease, Pair, Pending};
use tracing::{debug, info, warn};

use crate::{Backoff, Error, KafkaOptions, KafkaSink, Metrics, Readiness};
pub use provider::{Provider, ProviderError, QuoteRequest, QuoteResponse};

/// Header of a polled tick's Kafka message: the id of the raw response it came from.
pub const RAW_ID_HEADER: &str = "tickfleet-raw-id";
/// Header of a polled tick's Kafka message: `HOLDER TOKEN` of the lease it was produced under.
pub const FENCE_HEADER: &str = "tickfleet-fence";

/// Largest response body read (a quote is a few hundred bytes; Yahoo's chart a few kB).
const MAX_BODY: usize = 1 << 20;

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

/// Per-provider pauses after errors and rate limits (shared by every pair of the provider).
struct Gate {
    min: Duration,
    max: Duration,
    state: Mutex<HashMap<&'static str, (Backoff, Instant)>>,
}

impl Gate {
    fn open_at(&self, provider: &'static str) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.get(provider).map(|(_, until)| *until)
    }

    fn failed(&self, provider: &'static str, retry_after: Option<Duration>) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (backoff, until) = s.entry(provider).or_insert_with(|| {
            (
                Backoff {
                    min: self.min.max(Duration::from_millis(1)),
                    max: self.max.max(self.min),
                    attempt: 0,
                },
                Instant::now(),
            )
        });
        let wait = retry_after.unwrap_or_else(|| backoff.next());
        *until = (*until).max(Instant::now() + wait);
        wait
    }

    fn succeeded(&self, provider: &'static str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(provider);
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn http_client() -> Result<HttpClient, Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// `Retry-After`: seconds, or an HTTP date (as the time from now until it).
fn retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    let secs = at.timestamp() - chrono::Utc::now().timestamp();
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
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

impl Shared {
    /// One HTTP request of a poll (the URL may hold the key: it is not logged).
    async fn fetch(
        &self,
        p: &dyn Provider,
        symbol: &str,
        timeout: Duration,
    ) -> Result<QuoteResponse, ProviderError> {
        let req = p.request(symbol, self.config.api_key(p));
        let uri = format!("{}{}", self.config.base_url(p), req.path_and_query);
        let mut builder = hyper::Request::get(uri).header(
            hyper::header::USER_AGENT,
            concat!("tickfleet-connector/", env!("CARGO_PKG_VERSION")),
        );
        for (k, v) in &req.headers {
            builder = builder.header(*k, v);
        }
        let request = builder
            .body(Empty::new())
            .map_err(|_| ProviderError::Transport("bad request URL (symbol or base URL)".into()))?;
        let transport = |e: String| ProviderError::Transport(e);
        let deadline = tokio::time::Instant::now() + timeout;
        let res = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| transport("timed out".into()))?
            // the error's text names the host, never the path or headers
            .map_err(|e| transport(format!("{e}")))?;
        let status = res.status().as_u16();
        let retry = res
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body =
            tokio::time::timeout_at(deadline, Limited::new(res.into_body(), MAX_BODY).collect())
                .await
                .map_err(|_| transport("body timed out".into()))?
                .map_err(|e| transport(format!("body: {e}")))?
                .to_bytes();
        Ok(QuoteResponse {
            status,
            retry_after: retry,
            body: String::from_utf8_lossy(&body).into_owned(),
            fetched_ns: now_ns(),
        })
    }

    /// Produces a pending tick and marks it produced; `false` when the lease was lost meanwhile.
    async fn produce(
        &self,
        pair: &Pair,
        lease: &Lease,
        pending: &Pending,
        stop: &CancellationToken,
    ) -> Result<bool, Error> {
        let fence = format!("{} {}", lease.holder, lease.token);
        self.sink
            .deliver(
                &pending.tick,
                &[(RAW_ID_HEADER, &pending.raw_id), (FENCE_HEADER, &fence)],
                stop,
            )
            .await?;
        loop {
            match self.store.produced(pair, lease, pending.tick.seq).await {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    warn!(%pair, error = %e, "marking a tick produced failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Err(Error::Closed),
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }
}

/// Polls one pair while `lease` holds; returns when `stop` is cancelled or the lease is lost.
async fn run_pair(
    shared: Arc<Shared>,
    pair: Pair,
    lease: Lease,
    taken_at: Instant,
    interval: Arc<Mutex<Duration>>,
    stop: CancellationToken,
) {
    let Some(p) = provider::provider(&pair.provider) else {
        return;
    };
    let name = p.name();
    let lost = stop.child_token();
    let ttl = shared.config.lease_ttl();
    // The lease is surely ours until `valid_until`: the TTL counted from when the acquire (or the
    // last successful renewal) was *sent* — Redis started its TTL later than that. A poll starts only
    // with half a TTL of that left and must end a tenth of a TTL before it, so a holder whose renewals
    // stall stops polling before anyone else can take the lease: one poller per pair at a time.
    let valid_until = Arc::new(Mutex::new(taken_at + ttl));
    // renewal, every third of the TTL, on its own so a slow poll cannot let the lease lapse
    let renew = {
        let (shared, pair, lease, lost) =
            (shared.clone(), pair.clone(), lease.clone(), lost.clone());
        let valid_until = valid_until.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = lost.cancelled() => return,
                    () = tokio::time::sleep(ttl / 3) => {}
                }
                let sent = Instant::now();
                match shared.store.renew(&pair, &lease, ttl).await {
                    Ok(true) => *valid_until.lock().unwrap_or_else(|e| e.into_inner()) = sent + ttl,
                    Ok(false) => {
                        warn!(%pair, token = lease.token, "lease lost (expired and taken); stopping");
                        lost.cancel();
                        return;
                    }
                    Err(e) => warn!(%pair, error = %e, "renewing the lease failed; retrying"),
                }
            }
        })
    };
    let mut lost_it = false;
    // a taken-over pair may hold a tick its last holder committed and did not produce
    match shared.store.pending(&pair).await {
        Ok(Some(pending)) => {
            info!(%pair, seq = pending.tick.seq, "producing the previous holder's pending tick");
            lost_it = !matches!(
                shared.produce(&pair, &lease, &pending, &lost).await,
                Ok(true)
            );
        }
        Ok(None) => {}
        Err(e) => warn!(%pair, error = %e, "reading the pending tick failed"),
    }
    let mut next = Instant::now();
    while !lost_it && !lost.is_cancelled() {
        let at = shared.gate.open_at(name).map_or(next, |g| g.max(next));
        tokio::select! {
            () = lost.cancelled() => break,
            () = tokio::time::sleep_until(at.into()) => {}
        }
        if shared
            .gate
            .open_at(name)
            .is_some_and(|g| g > Instant::now())
        {
            continue; // another pair of the provider hit a limit meanwhile
        }
        let left = valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_duration_since(Instant::now());
        if left < ttl / 2 {
            // renewals are late: wait for one (or for the loss of the lease) before polling
            next = Instant::now() + ttl / 10;
            continue;
        }
        let every = *interval.lock().unwrap_or_else(|e| e.into_inner());
        next = Instant::now() + every;
        let timeout =
            Duration::from_millis(shared.config.http_timeout_ms.max(1)).min(left - ttl / 10);
        let observation = match shared.fetch(p.as_ref(), &pair.symbol, timeout).await {
            Ok(res) => p.read(&res),
            Err(e) => Err(e),
        };
        let o = match observation {
            Ok(o) => {
                shared.gate.succeeded(name);
                o
            }
            Err(e) => {
                let retry = match &e {
                    ProviderError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                let wait = shared.gate.failed(name, retry);
                shared
                    .metrics
                    .polls
                    .with_label_values(&[name, e.kind()])
                    .inc();
                warn!(%pair, reason = e.kind(), error = %e, backoff_ms = wait.as_millis() as u64, "poll failed; backing off");
                continue;
            }
        };
        let commit = shared
            .store
            .commit(
                &pair,
                &lease,
                &o,
                Duration::from_millis(shared.config.cache_ttl_ms),
            )
            .await;
        let outcome = match commit {
            Ok(Commit::Fenced) => {
                lost_it = true;
                "fenced"
            }
            Ok(Commit::Unchanged { .. }) => "unchanged",
            Ok(Commit::New(pending)) => {
                debug!(%pair, seq = pending.tick.seq, price = %pending.tick.price, "new price");
                lost_it = !matches!(
                    shared.produce(&pair, &lease, &pending, &lost).await,
                    Ok(true)
                );
                "new"
            }
            Err(e) => {
                warn!(%pair, error = %e, "committing a poll failed");
                "store_error"
            }
        };
        shared
            .metrics
            .polls
            .with_label_values(&[name, outcome])
            .inc();
    }
    lost.cancel();
    let _ = renew.await;
    if lost_it || !stop.is_cancelled() {
        shared.metrics.leases_lost.inc();
        warn!(%pair, token = lease.token, "stopped polling: lease lost");
    } else if let Err(e) = shared.store.release(&pair, &lease).await {
        warn!(%pair, error = %e, "releasing the lease failed (it expires by itself)");
    }
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
        gate: Gate {
            min: Duration::from_millis(config.backoff_min_ms),
            max: Duration::from_millis(config.backoff_max_ms),
            state: Mutex::default(),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past: now"
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let d = retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn a_rate_limit_pauses_the_provider_for_retry_after_and_a_success_resumes_it() {
        let gate = Gate {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            state: Mutex::default(),
        };
        assert_eq!(gate.open_at("finnhub"), None);
        let before = Instant::now();
        assert_eq!(
            gate.failed("finnhub", Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert!(gate.open_at("finnhub").unwrap() >= before + Duration::from_secs(30));
        assert_eq!(gate.open_at("yahoo"), None, "per provider");
        let w = gate.failed("yahoo", None);
        assert!(
            w >= Duration::from_millis(50) && w <= Duration::from_millis(100),
            "{w:?}"
        );
        let w = gate.failed("yahoo", None);
        assert!(
            w >= Duration::from_millis(100) && w <= Duration::from_millis(200),
            "doubles: {w:?}"
        );
        gate.succeeded("finnhub");
        assert_eq!(gate.open_at("finnhub"), None);
    }
}

//! What every tickfleet process (worker, api, operator, `tickctl demo`) shares:
//!
//! * [`shutdown_on_signals`]: shutdown as a value passed down. The first SIGTERM/SIGINT cancels the returned
//!   [`CancellationToken`]; every task watches it and drains. A second signal exits at once.
//! * [`init_tracing`]: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` (default `info`).
//! * [`Health`] and [`serve_admin`]: the admin HTTP endpoint with `/healthz` (liveness), `/readyz`
//!   (readiness) and `/metrics` (Prometheus text format).
//! * [`Readiness`]: readiness as a named set of checks (the store answers, ...) run every second.
//! * [`parse_duration_ns`]: durations as people type them (`250ms`, `30s`, `5m`, `1h`, `1d`).
//! * [`Symbol`]: the `BASE-QUOTE` symbol rule of the connector and the operator.
//! * [`LogFold`]: a failure that repeats is logged once, then with backoff (`kafka_log`, feature
//!   `kafka`: librdkafka's log lines and errors through it).
//! * `kafka` (feature `kafka`): the librdkafka client configuration of the worker, `tickctl` and
//!   the operator, from flags/variables (`KafkaOptions`) or a pipeline's spec (`KafkaConnection`).

mod duration;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kafka")]
pub mod kafka_log;
mod log_fold;
mod readiness;
mod symbol;

pub use duration::parse_duration_ns;
pub use log_fold::LogFold;
pub use readiness::{Failure, Readiness};
pub use symbol::{MAX_SYMBOL_PART, Symbol};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
pub use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What can go wrong in this crate: a duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not a whole number followed by `ms`, `s`, `m`, `h` or `d`.
    #[error("{0:?} is not a whole number followed by ms, s, m, h or d")]
    DurationUnit(String),
    /// A unit without a number, or a number too large for nanoseconds.
    #[error("{0:?} has no number")]
    DurationNumber(String),
    /// A duration longer than nanoseconds in an `i64` hold (about 292 years).
    #[error("{0:?} is too long a duration")]
    DurationOverflow(String),
}

/// Exit code used when a second signal cuts a drain short.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Returns a token cancelled by the first SIGTERM or SIGINT; a second one exits the process at once
/// with [`EXIT_SECOND_SIGNAL`]. Must be called inside a Tokio runtime.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let first = next_signal().await;
        info!(
            signal = first,
            "shutting down: draining (send the signal again to exit at once)"
        );
        cancel.cancel();
        let second = next_signal().await;
        warn!(signal = second, "second signal: exiting without draining");
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
    token
}

#[cfg(unix)]
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    // Signal streams are created once per call; a stream that cannot be created never fires.
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        Some(_) = async { term.as_mut()?.recv().await } => "SIGTERM",
        Some(_) = async { int.as_mut()?.recv().await } => "SIGINT",
        else => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "ctrl-c"
}

/// Sets up `tracing` output on stderr: human-readable text, or one JSON object per line when `json`.
/// The filter comes from `RUST_LOG` (default `info`). Calling it twice is harmless.
pub fn init_tracing(json: bool) {
    init_tracing_with(json, "info");
}

/// [`init_tracing`] with another default filter, for commands that should be quiet unless asked.
pub fn init_tracing_with(json: bool, default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Liveness and readiness of a process, shared between its tasks and the admin endpoint.
///
/// Readiness is the process's own flag ([`set_ready`](Self::set_ready): started, not draining) *and* no
/// failing named check ([`fail`](Self::fail) / [`pass`](Self::pass)). Each part of a process owns its
/// checks — the worker's store ping owns `store`, each partition's lane its own — so one part cannot
/// clear what another reported: a successful ping does not hide a stalled partition. `/readyz` names
/// every failing check in its body.
#[derive(Debug)]
pub struct Health {
    live: AtomicBool,
    ready: AtomicBool,
    /// Failing checks: name → why, e.g. `partition 3` → `partition 3 stalled: dead-letter topic unwritable`.
    failing: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// A gauge kept equal to readiness (1/0), so Prometheus can alert on it.
    ready_gauge: std::sync::OnceLock<prometheus::IntGauge>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            failing: std::sync::Mutex::default(),
            ready_gauge: std::sync::OnceLock::new(),
        }
    }
}

impl Health {
    /// Live, not yet ready.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn failing(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, String>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauge(&self) {
        if let Some(gauge) = self.ready_gauge.get() {
            gauge.set(i64::from(self.is_ready()));
        }
    }

    /// Marks the process itself ready (or not: starting, draining) to do its work; `/readyz` answers 200
    /// only when it is ready and no check fails.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.update_gauge();
    }

    /// Reports check `name` failing, with a one-line reason for `/readyz` (it replaces an earlier one).
    pub fn fail(&self, name: &str, why: impl Into<String>) {
        self.failing().insert(name.to_owned(), why.into());
        self.update_gauge();
    }

    /// Reports check `name` passing (again).
    pub fn pass(&self, name: &str) {
        if self.failing().remove(name).is_some() {
            self.update_gauge();
        }
    }

    /// Why the process is not ready — every failing check, `; `-separated — or `None` when it is.
    pub fn not_ready_because(&self) -> Option<String> {
        let failing = self.failing();
        if failing.is_empty() {
            return (!self.ready.load(Ordering::Relaxed)).then(|| "not started or stopping".into());
        }
        Some(failing.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// Keeps `gauge` equal to readiness from now on (1 ready, 0 not), e.g. `tickfleet_worker_ready`.
    /// Only the first gauge given is kept.
    pub fn mirror_ready(&self, gauge: prometheus::IntGauge) {
        gauge.set(i64::from(self.is_ready()));
        let _ = self.ready_gauge.set(gauge);
        // a set_ready racing with the line above may have missed the gauge: write it once more
        self.update_gauge();
    }

    /// Marks the process alive (or wedged); `/healthz` answers 200 only when live.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
    }

    /// Whether the process is ready: its own flag set and no check failing.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.failing().is_empty()
    }

    /// Whether the process is live.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    health: Arc<Health>,
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` until `shutdown` is cancelled.
///
/// Returns the bound address (useful with port 0) and the server task.
pub async fn serve_admin(
    addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { registry, health });
    info!(addr = %bound, "admin endpoint listening (/healthz, /readyz, /metrics)");
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((bound, task))
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not live\n")
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.not_ready_because() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&s.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            e.to_string().into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn admin_endpoint_reports_health_and_metrics() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("tickfleet_test_things_total", "things").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let ready = prometheus::IntGauge::new("tickfleet_test_ready", "ready").unwrap();
        registry.register(Box::new(ready.clone())).unwrap();
        let health = Health::new();
        health.mirror_ready(ready);
        let stop = CancellationToken::new();
        let (addr, task) = serve_admin(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            health.clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        assert!(
            get(addr, "/metrics")
                .await
                .contains("tickfleet_test_ready 0")
        );
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/metrics")
                .await
                .contains("tickfleet_test_ready 1")
        );
        // Named checks: each failing one is listed; one passing does not clear another.
        health.fail("store", "store unreachable");
        health.fail(
            "partition 3",
            "partition 3 stalled: dead-letter topic unwritable",
        );
        let body = get(addr, "/readyz").await;
        assert!(body.starts_with("HTTP/1.1 503"), "{body}");
        assert!(
            body.contains(
                "not ready: partition 3 stalled: dead-letter topic unwritable; store unreachable"
            ),
            "{body}"
        );
        assert!(
            get(addr, "/metrics")
                .await
                .contains("tickfleet_test_ready 0")
        );
        health.pass("store");
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.pass("partition 3");
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/metrics")
                .await
                .contains("tickfleet_test_ready 1")
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        health.set_live(false);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
        assert!(
            get(addr, "/metrics")
                .await
                .contains("tickfleet_test_things_total 3")
        );
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

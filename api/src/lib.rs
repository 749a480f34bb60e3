//! tickfleet's gRPC api, `tickfleet.v1.TickService`: queries over the ticks the workers stored (latest,
//! ranges with opaque page tokens, OHLCV candles, moving averages and VWAP, assets) and live streams of
//! the ticks they store from now on, plus `grpc.health.v1` and server reflection.
//!
//! * [`calc`]: exact decimal arithmetic (candles, averages) — no `f64` — folded tick by tick, so a
//!   range is computed page by page in constant memory.
//! * [`limits`]: per-replica bounds on concurrent calls and open streams (RESOURCE_EXHAUSTED beyond).
//! * [`ratelimit`]: per-client token buckets by route class, for gRPC and REST alike.
//! * [`service::Api`]: the handlers, over any [`TickStore`]; argument checks in [`validate`].
//! * [`polls`]: `tickfleet.v1.PollService`, provider polling jobs (run by `tickfleet-connector poll`)
//!   and their cached quotes, over the store's Redis.
//! * [`rest`]: the same queries as REST/JSON (and live ticks as Server-Sent Events), on a port of its
//!   own, answered by the same [`Api`] methods.
//! * [`start`]: binds and serves, with graceful shutdown; used by the `tickfleet-api` binary and by
//!   `tickctl demo`.
//!
//! Live streams read the store's live feed ([`TickStore::subscribe`]): with Redis that is pub/sub, so any
//! number of api replicas serve any client. Each stream has a bounded buffer ([`Options::stream_buffer`]
//! messages); a client that does not keep up loses the newest messages (for it alone; nobody else waits)
//! and then receives a `Gap` notice saying how many it missed.

pub mod calc;
pub mod limits;
pub mod metrics;
pub mod polls;
pub mod ratelimit;
pub mod rest;
mod rollups;
pub mod service;
mod stream;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tickfleet_proto::v1::poll_service_server::PollServiceServer;
use tickfleet_proto::v1::tick_service_server::TickServiceServer;
use tickfleet_service::{CancellationToken, Health, Readiness};
use tickfleet_store::TickStore;
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use metrics::ApiMetrics;
pub use service::Api;

/// The gRPC service name of [`Api`], as health checks and reflection know it.
pub const SERVICE_NAME: &str = "tickfleet.v1.TickService";

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bound on a graceful shutdown.
    pub drain_timeout: Duration,
    /// Messages buffered per stream client (see [`Api::with_stream_buffer`]).
    pub stream_buffer: usize,
    /// Serve TLS with this certificate and key instead of plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Bounds on concurrent calls and open streams.
    pub limits: limits::Limits,
    /// Deadline of each store call (see [`Api::with_store_timeout`]).
    pub store_timeout: Duration,
    /// Also serve the REST api ([`rest`]) on this address.
    pub http_addr: Option<SocketAddr>,
    /// Per-client rate limits (off by default).
    pub rate_limits: ratelimit::RateLimits,
    /// See [`Api::with_candles_immutable_after`].
    pub candles_immutable_after: Duration,
    /// The polling jobs' store ([`polls`]); `None` answers their methods with FAILED_PRECONDITION.
    pub jobs: Option<Arc<dyn tickfleet_store::JobStore>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drain_timeout: Duration::from_secs(30),
            stream_buffer: service::STREAM_BUFFER,
            tls: None,
            limits: limits::Limits::default(),
            store_timeout: service::STORE_TIMEOUT,
            http_addr: None,
            rate_limits: ratelimit::RateLimits::default(),
            candles_immutable_after: service::CANDLES_IMMUTABLE_AFTER,
            jobs: None,
        }
    }
}

/// A running api server.
pub struct Running {
    /// The address the gRPC server listens on.
    pub addr: SocketAddr,
    /// The address the REST api listens on, when it was asked for.
    pub http_addr: Option<SocketAddr>,
    /// Ends when the server has stopped: `Ok` after a clean drain.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Binds `addr` and serves the api, health and reflection until `shutdown` is cancelled.
///
/// Readiness (`health`, and the gRPC health status of [`SERVICE_NAME`] and of the server as a whole)
/// follows the store: serving while it answers a ping. On shutdown, in this order: health goes
/// NOT_SERVING, both listeners (gRPC and REST) close, live streams (gRPC and SSE) and health watches end
/// cleanly (status OK), in-flight calls and requests finish; if that takes longer than
/// [`Options::drain_timeout`] the task ends with an error.
pub async fn start(
    store: Arc<dyn TickStore>,
    addr: SocketAddr,
    metrics: ApiMetrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
    options: Options,
) -> anyhow::Result<Running> {
    let drain_timeout = options.drain_timeout;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the gRPC address {addr}"))?;
    let addr = listener.local_addr()?;
    let http = match options.http_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the REST address {a}"))?,
        ),
        None => None,
    };
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_status(&reporter, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tickfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tickfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let rate = ratelimit::RateLimiter::new(options.rate_limits, metrics.rate.clone());
    let api = Api::new(store.clone(), metrics, shutdown.clone())
        .with_rate_limiter(rate)
        .with_candles_immutable_after(options.candles_immutable_after)
        .with_stream_buffer(options.stream_buffer)
        .with_limits(options.limits)
        .with_store_timeout(options.store_timeout);
    let polls = polls::Polls::new(options.jobs.clone(), api.clone());

    let readiness = tokio::spawn(watch_store(
        store,
        health.clone(),
        reporter.clone(),
        shutdown.clone(),
    ));
    // The servers stop accepting only after health has gone NOT_SERVING.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_http = CancellationToken::new();
    let http = http.map(|listener| {
        let app = rest::router(api.clone(), polls.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let stop = stop_http.clone();
        info!(addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "REST api listening");
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        builder = builder.tls_config(tls).context("the api's TLS settings")?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(TickServiceServer::new(api))
        .add_service(PollServiceServer::new(polls))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = stop_rx.await;
            },
        );
    info!(%addr, "gRPC api listening ({SERVICE_NAME}, grpc.health.v1, reflection)");
    let task = tokio::spawn(async move {
        let mut server = std::pin::pin!(server);
        tokio::select! {
            r = &mut server => return r.context("gRPC server failed"),
            _ = shutdown.cancelled() => {}
        }
        health.set_ready(false);
        readiness.abort();
        set_status(&reporter, ServingStatus::NotServing).await;
        info!(
            timeout_s = drain_timeout.as_secs(),
            "draining: NOT_SERVING, no new connections, streams ending"
        );
        let _ = stop_tx.send(());
        stop_http.cancel();
        // Health Watch streams never end by themselves; dropping the statuses ends them (after they
        // delivered NOT_SERVING), so a client watching health cannot hold the drain up.
        let mut reporter = reporter;
        reporter.clear_service_status("").await;
        reporter.clear_service_status(SERVICE_NAME).await;
        let both = async move {
            let grpc = server.await;
            if let Some(http) = http {
                http.await
                    .context("REST server task failed")?
                    .context("REST server failed")?;
            }
            grpc.context("gRPC server failed")
        };
        match tokio::time::timeout(drain_timeout, both).await {
            Ok(r) => {
                r?;
                info!("drained");
                Ok(())
            }
            Err(_) => {
                warn!("drain timed out; calls still in flight were cut");
                anyhow::bail!("drain did not finish within {drain_timeout:?}")
            }
        }
    });
    Ok(Running {
        addr,
        http_addr,
        task,
    })
}

async fn set_status(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps readiness (`health` and the gRPC health statuses) in step with the api's checks:
/// `store`, the store answers a ping.
async fn watch_store(
    store: Arc<dyn TickStore>,
    health: Arc<Health>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    Readiness::new()
        .check("store", move || tickfleet_store::reachable(store.clone()))
        .run_with(health, shutdown, |ready| {
            let reporter = reporter.clone();
            async move {
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                set_status(&reporter, status).await;
            }
        })
        .await;
}

//! The tickfleet worker: consumes ticks from Kafka in one consumer group and stores them, each exactly
//! once in effect.
//!
//! * Kafka assigns partitions to worker processes (cooperative-sticky); all ticks of an asset share a
//!   partition because the message key is the asset id.
//! * In a process, each assigned partition has a lane ([`lane`]) that batches its messages in offset
//!   order and writes each batch with one store call, so partitions are worked concurrently and each
//!   asset's ticks are applied in order.
//! * An offset is committed only once every earlier message of its partition is stored (or
//!   dead-lettered). Kafka may redeliver after a crash or rebalance; the store's idempotent writes make
//!   that a no-op.
//! * Shutdown ([`run`]): stop fetching, drain every lane, commit, close the consumer (leaving the
//!   group) — bounded by the drain timeout. A drain that times out or whose final commit Kafka refuses
//!   is reported as such ([`Drain`]), and the binary exits 1.
//! * Crash-only on bugs: a lane that panics stops the process ([`Error::LanePanicked`]).

pub mod config;
mod consumer;
pub mod dlq;
mod error;
pub mod in_flight;
pub mod lane;
pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tickfleet_service::{CancellationToken, Health, Readiness};
use tickfleet_store::TickStore;
use tracing::{error, info, warn};

pub use config::{KafkaOptions, WorkerConfig};
pub use error::Error;
pub use metrics::Metrics;

use consumer::{DrainPlan, Lanes, WorkerContext, poll_loop};
use lane::{DeadLetterSink, LaneShared};

/// How a worker's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Everything consumed was stored and committed, and the consumer left the group.
    Clean,
    /// The drain timeout passed first; whatever was not stored was not committed either.
    TimedOut,
    /// Everything was stored, but Kafka refused the final commit or did not answer it within the drain
    /// timeout: the next owner re-reads from the previous commit (the store absorbs the redelivery).
    CommitFailed,
}

/// The readiness check the store ping owns.
const STORE_CHECK: &str = "store";

/// Runs a worker until `shutdown` is cancelled, then drains within [`WorkerConfig::drain_timeout`].
///
/// `dead_letters` defaults to the Kafka dead-letter topic when `None`.
pub async fn run(
    config: &WorkerConfig,
    store: Arc<dyn TickStore>,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<Drain, Error> {
    // librdkafka's lines of the consumer and the dead-letter producer, folded together: a broker
    // that is down is logged with backoff, not on every poll
    let kafka_logs = Arc::new(tickfleet_service::LogFold::default());
    let dead_letters = match dead_letters {
        Some(d) => d,
        None => Arc::new(dlq::KafkaDeadLetters::new(
            &config.kafka.client_config(&[]),
            &config.dlq_topic(),
            kafka_logs.clone(),
        )?),
    };
    health.fail(STORE_CHECK, "store not reached yet");
    health.mirror_ready(metrics.ready.clone());
    let drain_timeout = config.drain_timeout();
    let shared = LaneShared {
        store: store.clone(),
        dead_letters,
        metrics: metrics.clone(),
        health: health.clone(),
    };
    // Lanes get most of the drain budget; the final commit and leaving the group get the rest.
    let plan = Arc::new(DrainPlan {
        deadline: std::sync::OnceLock::new(),
        reserve: (drain_timeout / 4).min(Duration::from_secs(3)),
    });
    let lane_budget = drain_timeout.saturating_sub(plan.reserve);
    let lanes = Arc::new(Lanes::new(
        tokio::runtime::Handle::current(),
        shared,
        config.lane(),
        config.lane_capacity,
        usize::try_from(config.max_in_flight_bytes).unwrap_or(usize::MAX),
        &config.topic,
        lane_budget,
    ));
    let fatal = lanes.fatal.clone();
    let watched = lanes.clone();
    let refused = Arc::new(std::sync::Mutex::new(None));
    let consumer: BaseConsumer<WorkerContext> =
        config
            .consumer_config()
            .create_with_context(WorkerContext {
                lanes: lanes.clone(),
                refused: refused.clone(),
                logs: kafka_logs,
            })?;
    consumer.subscribe(&[&config.topic])?;
    health.set_ready(true);
    info!(topic = %config.topic, group = %config.group, brokers = %config.kafka.brokers, "worker started");

    let stop_polling = CancellationToken::new();
    // `released` says how the final drain and commit went; `closed`, that the poll thread ended (the
    // consumer left the group).
    let (released_tx, released_rx) = tokio::sync::oneshot::channel();
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
    let commit_every = Duration::from_millis(config.commit_interval_ms.max(10));
    let poll_stop = stop_polling.clone();
    let poll_plan = plan.clone();
    std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || {
            poll_loop(
                consumer,
                lanes,
                poll_stop,
                commit_every,
                poll_plan,
                released_tx,
            );
            let _ = closed_tx.send(());
        })
        .map_err(|e| Error::Internal(format!("starting the poll thread: {e}")))?;

    let readiness =
        tokio::spawn(readiness_checks(store, refused).run(health.clone(), shutdown.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = fatal.cancelled() => {
            // A lane panicked (logged where it happened). Crash-only: no drain, no further commit.
            health.set_ready(false);
            readiness.abort();
            let (partition, message) = watched.panicked().unwrap_or_default();
            return Err(Error::LanePanicked { partition, message });
        }
        ended = &mut closed_rx => {
            // Only a panic ends the poll thread before shutdown: fail, so the process is restarted.
            health.set_ready(false);
            readiness.abort();
            return Err(Error::Internal(format!("the Kafka poll thread stopped unexpectedly ({ended:?})")));
        }
    }
    health.set_ready(false);
    let started = Instant::now();
    let deadline = started + drain_timeout;
    let _ = plan.deadline.set(deadline);
    info!(timeout_s = drain_timeout.as_secs(), "draining");
    stop_polling.cancel();
    readiness.abort();
    let deadline = tokio::time::Instant::from_std(deadline);
    let outcome = match tokio::time::timeout_at(deadline, released_rx).await {
        Ok(Ok(released)) if released.drained && released.committed => {
            // Everything is stored and committed; leaving the group hands the partitions over now
            // rather than after the session timeout.
            if tokio::time::timeout_at(deadline, closed_rx).await.is_ok() {
                Drain::Clean
            } else {
                warn!("the consumer did not leave the group within the drain timeout");
                Drain::TimedOut
            }
        }
        Ok(Ok(released)) if released.drained => {
            error!(
                "drain stored everything but the final commit failed; the next owner re-reads from the previous commit"
            );
            Drain::CommitFailed
        }
        _ => {
            warn!("drain timed out; unstored messages were not committed and will be redelivered");
            Drain::TimedOut
        }
    };
    metrics.drain_seconds.set(started.elapsed().as_secs_f64());
    info!(
        ?outcome,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "drained"
    );
    Ok(outcome)
}

/// The worker's readiness checks: `store`, the store answers a ping; `kafka`, the brokers have not
/// refused the worker's login or TLS handshake since it last got partitions. Each check owns only its
/// own name in [`Health`], so a ping that passes cannot hide a stalled partition (each lane owns its own).
fn readiness_checks(
    store: Arc<dyn TickStore>,
    refused: Arc<std::sync::Mutex<Option<String>>>,
) -> Readiness {
    Readiness::new()
        .check(STORE_CHECK, move || {
            tickfleet_store::reachable(store.clone())
        })
        .check("kafka", move || {
            let refused = refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
            async move {
                match refused {
                    Some(reason) => Err(format!("kafka refused the worker: {reason}")),
                    None => Ok(()),
                }
            }
        })
}

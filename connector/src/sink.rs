//! Where ticks go: [`KafkaSink`] (idempotent producer, murmur2 partitioner, key = asset id, retried until
//! acknowledged), or any other [`Sink`] in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tickfleet_proto::{Format, Tick};
use tickfleet_service::Health;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::{Error, Metrics};

/// Receives every tick the connector makes.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Takes a tick; may wait when too many are in flight. Delivery is the sink's job from here on.
    async fn send(&self, tick: Tick) -> Result<(), Error>;
    /// Waits until every tick taken is delivered, at most `timeout`.
    async fn flush(&self, timeout: Duration) -> Result<(), Error>;
}

/// Readiness = subscribed to the venue and Kafka deliveries succeeding.
#[derive(Debug)]
pub struct Readiness {
    health: Arc<Health>,
    subscribed: AtomicBool,
    producing: AtomicBool,
}

impl Readiness {
    /// Not subscribed yet; producing until a delivery fails.
    pub fn new(health: Arc<Health>) -> Arc<Self> {
        Arc::new(Readiness {
            health,
            subscribed: AtomicBool::new(false),
            producing: AtomicBool::new(true),
        })
    }

    /// Records whether the venue subscription is up.
    pub fn set_subscribed(&self, up: bool) {
        self.subscribed.store(up, Ordering::Relaxed);
        self.update();
    }

    /// Records whether the last Kafka delivery succeeded.
    pub fn set_producing(&self, ok: bool) {
        self.producing.store(ok, Ordering::Relaxed);
        self.update();
    }

    fn update(&self) {
        self.health.set_ready(
            self.subscribed.load(Ordering::Relaxed) && self.producing.load(Ordering::Relaxed),
        );
    }
}

/// Most ticks handed to Kafka and not yet acknowledged; past it, reading the venue waits.
const MAX_IN_FLIGHT: usize = 100_000;

/// The Kafka producer.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: Arc<str>,
    format: Format,
    permits: Arc<Semaphore>,
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

impl KafkaSink {
    /// A producer from `config` (bootstrap servers and security already set) with idempotence on, the
    /// murmur2 partitioner (the Java client's, so keys land where every Kafka client puts them) and
    /// acks from all in-sync replicas.
    pub fn new(
        config: &rdkafka::ClientConfig,
        topic: &str,
        format: Format,
        metrics: Metrics,
        readiness: Arc<Readiness>,
    ) -> Result<Self, Error> {
        let producer: FutureProducer = config.create().map_err(Error::Kafka)?;
        Ok(KafkaSink {
            producer,
            topic: topic.into(),
            format,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            metrics,
            readiness,
        })
    }

    /// Produces `tick` with `headers` and waits for Kafka's acknowledgement, retrying a failed
    /// delivery (with backoff) until it is acknowledged or `stop` is cancelled ([`Error::Closed`]).
    /// The polling jobs use it: their next step (marking the tick produced) must follow the ack.
    pub async fn deliver(
        &self,
        tick: &Tick,
        headers: &[(&str, &str)],
        stop: &tickfleet_service::CancellationToken,
    ) -> Result<(), Error> {
        let payload = tick.encode(self.format);
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut h = OwnedHeaders::new_with_capacity(headers.len());
            for (key, value) in headers {
                h = h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&self.topic)
                .key(tick.asset_id.as_bytes())
                .payload(&payload)
                .headers(h);
            let sent = tokio::select! {
                () = stop.cancelled() => return Err(Error::Closed),
                r = self.producer.send(record, Timeout::Never) => r,
            };
            match sent {
                Ok(_) => {
                    self.metrics.trades_produced.inc();
                    self.readiness.set_producing(true);
                    return Ok(());
                }
                Err((e, _)) => {
                    self.metrics.delivery_retries.inc();
                    self.readiness.set_producing(false);
                    warn!(asset = %tick.asset_id, seq = tick.seq, error = %e, "Kafka delivery failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Err(Error::Closed),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The defaults the producer is created with (users' `--kafka-option`s override them).
    pub const DEFAULTS: &'static [(&'static str, &'static str)] = &[
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        // a delivery that has not succeeded in 30 s is reported to us and sent again (see `send`), so a
        // broker outage shows on /readyz and in the retry counter instead of waiting silently
        ("message.timeout.ms", "30000"),
    ];
}

#[async_trait]
impl Sink for KafkaSink {
    async fn send(&self, tick: Tick) -> Result<(), Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let format = self.format;
        let metrics = self.metrics.clone();
        let readiness = self.readiness.clone();
        metrics.in_flight.inc();
        tokio::spawn(async move {
            let payload = tick.encode(format);
            let mut backoff = Duration::from_millis(100);
            loop {
                let record = FutureRecord::to(&topic)
                    .key(tick.asset_id.as_bytes())
                    .payload(&payload);
                match producer.send(record, Timeout::Never).await {
                    Ok(_) => {
                        metrics.trades_produced.inc();
                        metrics.latency.observe(seconds_since(tick.event_time_ns));
                        readiness.set_producing(true);
                        break;
                    }
                    Err((e, _)) => {
                        metrics.delivery_retries.inc();
                        readiness.set_producing(false);
                        warn!(asset = %tick.asset_id, trade_id = tick.seq, error = %e, "Kafka delivery failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            metrics.in_flight.dec();
            drop(permit);
        });
        Ok(())
    }

    async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.permits.acquire_many(all)).await {
            Ok(Ok(_all)) => {
                let producer = self.producer.clone();
                tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5)))
                    .await
                    .map_err(|_| Error::Closed)?
                    .map_err(Error::Kafka)
            }
            _ => Err(Error::Drain(self.metrics.in_flight.get())),
        }
    }
}

/// Seconds from `event_time_ns` to now (0 when the venue's clock is ahead of ours).
fn seconds_since(event_time_ns: i64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let then = u128::try_from(event_time_ns).unwrap_or(0);
    // precision: f64 seconds is fine for a latency histogram (not a price)
    Duration::from_nanos(u64::try_from(now.saturating_sub(then)).unwrap_or(u64::MAX)).as_secs_f64()
}

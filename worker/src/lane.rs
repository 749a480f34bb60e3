//! One lane per assigned partition: take that partition's messages in offset order, decode them, write
//! each batch to the store with one call, dead-letter what cannot be decoded, and only then advance the
//! partition's *stored watermark* (the offset to commit). Nothing here knows about Kafka clients, so the
//! rules are unit-tested with the in-memory store and injected failures.
//!
//! Ordering: a lane handles one partition sequentially, and all ticks of an asset are on one partition,
//! so each asset's ticks are applied in order. Parallelism is one lane per assigned partition.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tickfleet_proto::{DecodeError, Format, Limits, Tick};
use tickfleet_service::Health;
use tickfleet_store::TickStore;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// A Kafka message, owned, as handed from the consumer thread to a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Source topic (shared: one allocation per consumer, not per message).
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Message key (the asset id).
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
}

/// Where messages that cannot become ticks go. [`crate::dlq::KafkaDeadLetters`] is the real one.
#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Durably records `record` with the reason it was rejected. `Ok` means it is safe to commit past it.
    async fn send(&self, record: &Record, error: &DecodeError) -> Result<(), String>;
}

/// Exponential backoff for retrying the store and the dead-letter topic.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// How a lane batches and decodes.
#[derive(Debug, Clone, Copy)]
pub struct LaneConfig {
    /// Most ticks in one store write.
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first message is in.
    pub linger: Duration,
    /// Payload format of the topic.
    pub format: Format,
    /// Validation limits.
    pub limits: Limits,
    /// Retry delays for the store and the dead-letter topic.
    pub backoff: Backoff,
}

/// What a lane shares with the consumer thread.
#[derive(Clone)]
pub struct LaneShared {
    /// The store ticks go to.
    pub store: Arc<dyn TickStore>,
    /// The dead-letter sink.
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Metrics.
    pub metrics: Metrics,
    /// Readiness: cleared while the store fails, set again when a write succeeds.
    pub health: Arc<Health>,
}

/// The offset up to which (exclusive) a partition's messages are durably handled: the offset to commit.
/// `-1` until the first batch is stored.
#[derive(Debug, Clone, Default)]
pub struct Watermark(Arc<AtomicI64>);

impl Watermark {
    /// No offset stored yet.
    pub fn new() -> Self {
        Watermark(Arc::new(AtomicI64::new(-1)))
    }

    /// The next offset to consume after everything stored, or `None` before the first batch.
    pub fn get(&self) -> Option<i64> {
        let v = self.0.load(Ordering::Acquire);
        (v >= 0).then_some(v)
    }

    fn advance_to(&self, next_offset: i64) {
        self.0.fetch_max(next_offset, Ordering::AcqRel);
    }
}

/// Runs a lane until `rx` is closed and everything received has been handled.
///
/// Store failures are retried with backoff for as long as it takes (the consumer thread stops feeding the
/// lane meanwhile, which pauses the partition); the drain deadline in [`crate::run`] bounds shutdown.
pub async fn run_lane(
    mut rx: mpsc::Receiver<Record>,
    watermark: Watermark,
    shared: LaneShared,
    config: LaneConfig,
) {
    let mut batch: Vec<Record> = Vec::with_capacity(config.batch_size);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.linger;
        while batch.len() < config.batch_size {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(r)) => batch.push(r),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        handle_batch(&batch, &shared, &config).await;
        let last = batch.last().map(|r| r.offset).unwrap_or(-1);
        shared.metrics.in_flight.sub(batch.len() as i64);
        watermark.advance_to(last + 1);
        batch.clear();
    }
}

/// Decodes, dead-letters and stores one batch; returns only when all of it is durably handled.
async fn handle_batch(batch: &[Record], shared: &LaneShared, config: &LaneConfig) {
    let now_ns = now_ns();
    let mut ticks: Vec<Tick> = Vec::with_capacity(batch.len());
    for record in batch {
        match tickfleet_proto::decode(
            config.format,
            record.key.as_deref(),
            &record.payload,
            record.offset,
            &config.limits,
            now_ns,
        ) {
            Ok(t) => ticks.push(t),
            Err(e) => {
                dead_letter(record, &e, shared, config).await;
            }
        }
    }
    if ticks.is_empty() {
        return;
    }
    let partition = batch[0].partition.to_string();
    let topic: &str = &batch[0].topic;
    let mut delay = config.backoff.initial;
    loop {
        let started = Instant::now();
        match shared.store.write_batch(&ticks).await {
            Ok(summary) => {
                shared
                    .metrics
                    .write_seconds
                    .with_label_values(&["ok"])
                    .observe(started.elapsed().as_secs_f64());
                shared.metrics.batch_size.observe(ticks.len() as f64);
                shared
                    .metrics
                    .stored
                    .with_label_values(&[topic, &partition])
                    .inc_by(summary.inserted as u64);
                shared
                    .metrics
                    .duplicates
                    .with_label_values(&[topic, &partition])
                    .inc_by(summary.duplicates as u64);
                if !shared.health.is_ready() {
                    debug!("store writes succeed again");
                }
                shared.health.set_ready(true);
                return;
            }
            Err(e) => {
                shared
                    .metrics
                    .write_seconds
                    .with_label_values(&["error"])
                    .observe(started.elapsed().as_secs_f64());
                shared
                    .metrics
                    .store_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                shared.health.set_ready(false);
                warn!(partition = %partition, ticks = ticks.len(), error = %e, retry_in_ms = delay.as_millis() as u64,
                    "store write failed; retrying (nothing is committed until it succeeds)");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.backoff.max);
            }
        }
    }
}

async fn dead_letter(
    record: &Record,
    error: &DecodeError,
    shared: &LaneShared,
    config: &LaneConfig,
) {
    let mut delay = config.backoff.initial;
    loop {
        match shared.dead_letters.send(record, error).await {
            Ok(()) => {
                shared
                    .metrics
                    .dead_lettered
                    .with_label_values(&[error.reason()])
                    .inc();
                debug!(
                    partition = record.partition,
                    offset = record.offset,
                    reason = error.reason(),
                    "dead-lettered"
                );
                return;
            }
            Err(e) => {
                warn!(partition = record.partition, offset = record.offset, error = %e,
                    retry_in_ms = delay.as_millis() as u64, "dead-letter write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.backoff.max);
            }
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use tickfleet_store::{MemoryStore, RangeQuery, StoreError, TickId, TickPage, WriteSummary};

    /// The in-memory store behind a switch that makes writes fail, counting calls.
    struct Flaky {
        inner: MemoryStore,
        fail_next: AtomicUsize,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl TickStore for Flaky {
        async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let fail = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(StoreError::Injected("redis is down".into()));
            }
            self.inner.write_batch(ticks).await
        }
        async fn latest(&self, a: &str) -> Result<Option<Tick>, StoreError> {
            self.inner.latest(a).await
        }
        async fn range(&self, a: &str, q: &RangeQuery) -> Result<TickPage, StoreError> {
            self.inner.range(a, q).await
        }
        async fn tail(&self, a: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
            self.inner.tail(a, n).await
        }
        async fn assets(&self) -> Result<Vec<String>, StoreError> {
            self.inner.assets().await
        }
        async fn subscribe(&self) -> Result<tickfleet_store::LiveFeed, StoreError> {
            self.inner.subscribe().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Dlq(Mutex<Vec<(i64, &'static str)>>);

    #[async_trait]
    impl DeadLetterSink for Dlq {
        async fn send(&self, record: &Record, error: &DecodeError) -> Result<(), String> {
            self.0.lock().unwrap().push((record.offset, error.reason()));
            Ok(())
        }
    }

    fn tick(asset: &str, seq: u64) -> Tick {
        Tick {
            asset_id: asset.into(),
            price: rust_decimal::Decimal::from_str("10.5").unwrap(),
            size: None,
            event_time_ns: 1_000 + seq as i64,
            seq,
            source: "t".into(),
        }
    }

    fn record(offset: i64, tick: &Tick) -> Record {
        Record {
            topic: "ticks".into(),
            partition: 3,
            offset,
            key: Some(tick.asset_id.as_bytes().to_vec()),
            payload: tick.to_protobuf(),
        }
    }

    struct Harness {
        store: Arc<Flaky>,
        dlq: Arc<Dlq>,
        health: Arc<Health>,
        tx: mpsc::Sender<Record>,
        watermark: Watermark,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(batch_size: usize, fail_first: usize) -> Harness {
        let store = Arc::new(Flaky {
            inner: MemoryStore::new(),
            fail_next: AtomicUsize::new(fail_first),
            calls: AtomicUsize::new(0),
        });
        let dlq = Arc::new(Dlq::default());
        let health = Health::new();
        let shared = LaneShared {
            store: store.clone(),
            dead_letters: dlq.clone(),
            metrics: Metrics::new(),
            health: health.clone(),
        };
        let config = LaneConfig {
            batch_size,
            linger: Duration::from_millis(5),
            format: Format::Protobuf,
            limits: Limits::default(),
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(4),
            },
        };
        let (tx, rx) = mpsc::channel(1024);
        let watermark = Watermark::new();
        let task = tokio::spawn(run_lane(rx, watermark.clone(), shared, config));
        Harness {
            store,
            dlq,
            health,
            tx,
            watermark,
            task,
        }
    }

    async fn ids(store: &Flaky, asset: &str) -> Vec<TickId> {
        let page = store
            .inner
            .range(asset, &RangeQuery::all(10_000))
            .await
            .unwrap();
        page.ticks.iter().map(Tick::id).collect()
    }

    #[tokio::test]
    async fn stores_everything_in_batches_then_advances_the_watermark() {
        let h = start(10, 0);
        let ticks: Vec<Tick> = (1..=35)
            .map(|i| tick(if i % 2 == 0 { "A" } else { "B" }, i))
            .collect();
        for (i, t) in ticks.iter().enumerate() {
            h.tx.send(record(100 + i as i64, t)).await.unwrap();
        }
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.store.inner.len(), 35);
        assert_eq!(h.watermark.get(), Some(135));
        // 35 messages in batches of at most 10: at least 4 writes, never one per tick.
        let calls = h.store.calls.load(Ordering::SeqCst);
        assert!((4..35).contains(&calls), "{calls} writes");
        let a = ids(&h.store, "A").await;
        assert_eq!(a.len(), 17);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn store_failures_are_retried_and_never_committed_past() {
        let h = start(100, 3);
        let t = tick("A", 1);
        h.tx.send(record(7, &t)).await.unwrap();
        // While the store fails, the watermark must not move and readiness drops.
        while h.store.calls.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(h.watermark.get(), None);
        assert!(!h.health.is_ready());
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(
            h.store.calls.load(Ordering::SeqCst),
            4,
            "3 failures then 1 success"
        );
        assert_eq!(h.watermark.get(), Some(8));
        assert_eq!(ids(&h.store, "A").await.len(), 1);
        assert!(h.health.is_ready());
    }

    #[tokio::test]
    async fn redelivery_after_a_crash_changes_nothing() {
        let h = start(4, 0);
        let ticks: Vec<Tick> = (1..=6).map(|i| tick("A", i)).collect();
        // First delivery, then the same offsets again (what the next owner reads after an uncommitted crash).
        for _round in 0..2 {
            for (i, t) in ticks.iter().enumerate() {
                h.tx.send(record(i as i64, t)).await.unwrap();
            }
        }
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.store.inner.len(), 6);
        assert_eq!(h.store.inner.latest("A").await.unwrap().unwrap().seq, 6);
    }

    #[tokio::test]
    async fn poison_messages_are_dead_lettered_and_passed() {
        let h = start(10, 0);
        let good = tick("A", 1);
        h.tx.send(record(0, &good)).await.unwrap();
        let mut garbage = record(1, &good);
        garbage.payload = b"\xff\xfe not protobuf".to_vec();
        h.tx.send(garbage).await.unwrap();
        let mut wrong_key = record(2, &tick("B", 2));
        wrong_key.key = Some(b"A".to_vec());
        h.tx.send(wrong_key).await.unwrap();
        h.tx.send(record(3, &tick("A", 3))).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(
            *h.dlq.0.lock().unwrap(),
            vec![(1, "malformed"), (2, "key_mismatch")]
        );
        assert_eq!(ids(&h.store, "A").await.len(), 2);
        assert_eq!(h.watermark.get(), Some(4));
    }

    #[tokio::test]
    async fn a_batch_of_only_poison_still_advances() {
        let h = start(10, 0);
        let mut r = record(41, &tick("A", 1));
        r.payload = vec![0xff];
        h.tx.send(r).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.watermark.get(), Some(42));
        assert_eq!(h.store.calls.load(Ordering::SeqCst), 0);
    }
}

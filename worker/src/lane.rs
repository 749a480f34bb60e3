//! One lane per assigned partition: take that partition's messages in offset order, decode them, write
//! each batch to the store with one call, dead-letter what cannot be stored, and only then advance the
//! partition's *stored watermark* (the offset to commit). Nothing here knows about Kafka clients, so the
//! rules are unit-tested with the in-memory store and injected failures.
//!
//! (Over 600 lines with its tests, about 400 of code: the tests are one a rule of the list below, each
//! against the lane as a whole; the byte budget shared by every lane is [`crate::in_flight`].)
//!
//! Ordering: a lane handles one partition sequentially, and all ticks of an asset are on one partition,
//! so each asset's ticks are applied in order. Parallelism is one lane per assigned partition.
//!
//! Failures, by what they are ([`StoreError::is_retriable`], [`Error::is_retriable`]):
//! * *Store unreachable* (retriable): the write is retried with backoff for as long as it takes; the
//!   lane's readiness check fails meanwhile and nothing past the batch is committed.
//! * *Store rejects the data* (permanent: `WRONGTYPE`, `NOPERM`, a script error): the batch is written
//!   again asset by asset, so only the assets the store refuses are affected; their ticks are
//!   dead-lettered with reason `store_rejected` and the store's message. Retrying them would stall the
//!   partition for ever.
//! * *Dead-letter topic unreachable* (retriable) or *unwritable* (permanent: missing, forbidden): the lane
//!   stops at that message — it does not move past a message it could not record — and reports it: its
//!   readiness check fails (`partition 3 stalled: dead-letter topic …`) until the send succeeds, and
//!   `tickfleet_worker_dead_letter_failures_total{reason}` counts every failed send. It tries again every
//!   few seconds, so fixing the topic resumes the partition without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tickfleet_proto::{Format, Limits, Tick};
use tickfleet_service::Health;
use tickfleet_store::{StoreError, TickStore};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::Error;
use crate::in_flight::Charge;
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
    /// Its share of the in-flight budget, given back when the record is dropped.
    pub charge: Charge,
}

impl Record {
    /// The bytes this message holds in memory (key and payload).
    pub fn size(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len)
    }
}

/// Where messages that cannot be stored go. [`crate::dlq::KafkaDeadLetters`] is the real one.
#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Durably records `record` with a short `reason` code and the full `message`. `Ok` means it is
    /// safe to commit past it.
    async fn send(&self, record: &Record, reason: &'static str, message: &str)
    -> Result<(), Error>;
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
    /// Readiness: each lane owns the check `partition N`, failing while it cannot make progress.
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

/// The readiness check a lane owns.
fn check_name(partition: i32) -> String {
    format!("partition {partition}")
}

/// Runs the lane of `partition` until `rx` is closed and everything received has been handled.
///
/// Retriable failures are retried with backoff for as long as it takes (the consumer thread stops
/// feeding the lane meanwhile, which pauses the partition); the drain deadline in [`crate::run`] bounds
/// shutdown.
pub async fn run_lane(
    partition: i32,
    mut rx: mpsc::Receiver<Record>,
    watermark: Watermark,
    shared: LaneShared,
    config: LaneConfig,
) {
    let lane = Lane {
        partition,
        check: check_name(partition),
        shared,
        config,
    };
    // A lane that is gone no longer holds readiness back — also when its task is aborted (a revoked
    // partition whose drain ran out of time), hence a guard rather than a call after the loop.
    let _release = ReleaseCheck {
        health: lane.shared.health.clone(),
        check: lane.check.clone(),
    };
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
        lane.handle_batch(&batch).await;
        let last = batch.last().map(|r| r.offset).unwrap_or(-1);
        watermark.advance_to(last + 1);
        batch.clear();
    }
}

/// Passes a lane's readiness check when the lane ends, however it ends.
struct ReleaseCheck {
    health: Arc<Health>,
    check: String,
}

impl Drop for ReleaseCheck {
    fn drop(&mut self) {
        self.health.pass(&self.check);
    }
}

struct Lane {
    partition: i32,
    check: String,
    shared: LaneShared,
    config: LaneConfig,
}

impl Lane {
    /// Decodes, dead-letters and stores one batch; returns only when all of it is durably handled.
    async fn handle_batch(&self, batch: &[Record]) {
        let now_ns = now_ns();
        // ticks[i] came from batch[from[i]]
        let mut ticks: Vec<Tick> = Vec::with_capacity(batch.len());
        let mut from: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match tickfleet_proto::decode(
                self.config.format,
                record.key.as_deref(),
                &record.payload,
                &self.config.limits,
                now_ns,
            ) {
                Ok(t) => {
                    ticks.push(t);
                    from.push(i);
                }
                Err(e) => self.dead_letter(record, e.reason(), &e.to_string()).await,
            }
        }
        if ticks.is_empty() {
            return;
        }
        let topic: &str = &batch[0].topic;
        let rejected = match self.write(topic, &ticks).await {
            Ok(()) => return,
            Err(e) => e,
        };
        // Permanent: find out which assets the store refuses, by writing each on its own.
        warn!(partition = self.partition, error = %rejected,
            "the store rejected a batch; writing it asset by asset to dead-letter only what it refuses");
        let mut by_asset: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, t) in ticks.iter().enumerate() {
            by_asset.entry(t.asset_id.as_str()).or_default().push(i);
        }
        for (asset, indices) in by_asset {
            let subset: Vec<Tick> = indices.iter().map(|&i| ticks[i].clone()).collect();
            if let Err(e) = self.write(topic, &subset).await {
                let message = e.to_string();
                warn!(partition = self.partition, asset, ticks = subset.len(), error = %message,
                    "the store rejected these ticks: dead-lettering them (store_rejected)");
                for &i in &indices {
                    self.dead_letter(&batch[from[i]], "store_rejected", &message)
                        .await;
                }
            }
        }
    }

    /// Writes `ticks`, retrying retriable failures for as long as it takes; returns the permanent
    /// rejection, if the store gives one.
    async fn write(&self, topic: &str, ticks: &[Tick]) -> Result<(), StoreError> {
        let shared = &self.shared;
        let partition = self.partition.to_string();
        let mut delay = self.config.backoff.initial;
        loop {
            let started = Instant::now();
            let result = shared.store.write_batch(ticks).await;
            let outcome = if result.is_ok() { "ok" } else { "error" };
            shared
                .metrics
                .write_seconds
                .with_label_values(&[outcome])
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(summary) => {
                    shared.metrics.batch_size.observe(ticks.len() as f64);
                    let labels = [topic, partition.as_str()];
                    shared
                        .metrics
                        .stored
                        .with_label_values(&labels)
                        .inc_by(summary.inserted as u64);
                    shared
                        .metrics
                        .duplicates
                        .with_label_values(&labels)
                        .inc_by(summary.duplicates as u64);
                    shared.health.pass(&self.check);
                    return Ok(());
                }
                Err(e) => {
                    shared
                        .metrics
                        .store_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                    if !e.is_retriable() {
                        // The store answered: it is reachable, it refuses this data.
                        shared.health.pass(&self.check);
                        return Err(e);
                    }
                    shared.health.fail(
                        &self.check,
                        format!("partition {partition}: store writes failing: {e}"),
                    );
                    warn!(partition = %partition, ticks = ticks.len(), error = %e, retry_in_ms = delay.as_millis() as u64,
                        "store write failed; retrying (nothing is committed until it succeeds)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.backoff.max);
                }
            }
        }
    }

    /// Sends one dead letter; returns only once it is written. While it cannot be, the partition does
    /// not move and says so (readiness, metric, log) — see the module docs.
    async fn dead_letter(&self, record: &Record, reason: &'static str, message: &str) {
        let shared = &self.shared;
        let mut delay = self.config.backoff.initial;
        let mut failed = false;
        loop {
            match shared.dead_letters.send(record, reason, message).await {
                Ok(()) => {
                    shared
                        .metrics
                        .dead_lettered
                        .with_label_values(&[reason])
                        .inc();
                    if failed {
                        shared.health.pass(&self.check);
                        warn!(
                            partition = record.partition,
                            offset = record.offset,
                            "dead-letter topic writable again: partition resumed"
                        );
                    }
                    debug!(
                        partition = record.partition,
                        offset = record.offset,
                        reason,
                        "dead-lettered"
                    );
                    return;
                }
                Err(e) => {
                    failed = true;
                    shared
                        .metrics
                        .dead_letter_failures
                        .with_label_values(&[e.reason()])
                        .inc();
                    let what = if e.is_retriable() {
                        "dead-letter topic unreachable"
                    } else {
                        "dead-letter topic unwritable"
                    };
                    shared.health.fail(
                        &self.check,
                        format!(
                            "partition {} stalled at offset {}: {what}: {e}",
                            record.partition, record.offset
                        ),
                    );
                    error!(partition = record.partition, offset = record.offset, reason, error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "dead-letter write failed: the partition stops here until it succeeds");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.backoff.max);
                }
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
    use tickfleet_store::{MemoryStore, RangeQuery, TickId, TickPage, WriteSummary};

    /// The in-memory store behind a switch that makes writes fail, counting calls; it also refuses, for
    /// good, every batch holding a tick of `reject`.
    struct Flaky {
        inner: MemoryStore,
        fail_next: AtomicUsize,
        calls: AtomicUsize,
        reject: Option<&'static str>,
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
            if let Some(bad) = self.reject
                && ticks.iter().any(|t| t.asset_id == bad)
            {
                return Err(StoreError::InjectedRejection(format!(
                    "WRONGTYPE {bad} is not a sorted set"
                )));
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
        async fn rollups(
            &self,
            a: &str,
            q: &tickfleet_store::RollupQuery,
        ) -> Result<tickfleet_store::RollupPage, StoreError> {
            self.inner.rollups(a, q).await
        }
        async fn rebuild_rollups(
            &self,
            a: &str,
            from: i64,
            to: i64,
        ) -> Result<tickfleet_store::RebuildSummary, StoreError> {
            self.inner.rebuild_rollups(a, from, to).await
        }
    }

    /// Records dead letters; the first `unwritable` sends fail as if the topic were missing.
    #[derive(Default)]
    struct Dlq {
        letters: Mutex<Vec<(i64, &'static str, String)>>,
        unwritable: AtomicUsize,
    }

    impl Dlq {
        fn reasons(&self) -> Vec<(i64, &'static str)> {
            let letters = self.letters.lock().unwrap();
            letters.iter().map(|(o, r, _)| (*o, *r)).collect()
        }
    }

    #[async_trait]
    impl DeadLetterSink for Dlq {
        async fn send(
            &self,
            record: &Record,
            reason: &'static str,
            message: &str,
        ) -> Result<(), Error> {
            let fail = self
                .unwritable
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(Error::DeadLetterUnwritable {
                    topic: "ticks.dlq".into(),
                    detail: "Broker: Unknown topic or partition".into(),
                });
            }
            let mut letters = self.letters.lock().unwrap();
            letters.push((record.offset, reason, message.to_owned()));
            Ok(())
        }
    }

    /// A minute ago, fixed for the whole test run (ticks must be within the default skew limits).
    static BASE_NS: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| now_ns() - 60_000_000_000);

    fn tick(asset: &str, seq: u64) -> Tick {
        Tick {
            asset_id: asset.into(),
            price: rust_decimal::Decimal::from_str("10.5").unwrap(),
            size: None,
            event_time_ns: *BASE_NS + seq as i64,
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
            charge: Charge::default(),
        }
    }

    struct Harness {
        store: Arc<Flaky>,
        dlq: Arc<Dlq>,
        health: Arc<Health>,
        metrics: Metrics,
        tx: mpsc::Sender<Record>,
        watermark: Watermark,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(batch_size: usize, fail_first: usize) -> Harness {
        start_with(batch_size, fail_first, None, 0)
    }

    fn start_with(
        batch_size: usize,
        fail_first: usize,
        reject: Option<&'static str>,
        dlq_unwritable: usize,
    ) -> Harness {
        let store = Arc::new(Flaky {
            inner: MemoryStore::new(),
            fail_next: AtomicUsize::new(fail_first),
            calls: AtomicUsize::new(0),
            reject,
        });
        let dlq = Arc::new(Dlq {
            unwritable: AtomicUsize::new(dlq_unwritable),
            ..Dlq::default()
        });
        let health = Health::new();
        health.set_ready(true);
        let metrics = Metrics::new();
        let shared = LaneShared {
            store: store.clone(),
            dead_letters: dlq.clone(),
            metrics: metrics.clone(),
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
        let task = tokio::spawn(run_lane(3, rx, watermark.clone(), shared, config));
        Harness {
            store,
            dlq,
            health,
            metrics,
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
        assert_eq!(h.dlq.reasons(), vec![(1, "malformed"), (2, "key_mismatch")]);
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

    #[tokio::test]
    async fn a_producer_retry_of_an_unnumbered_tick_is_stored_once() {
        let h = start(10, 0);
        let mut t = tick("A", 0);
        t.seq = 0; // no producer sequence number
        // The producer retried: the same message at offsets 5 and 9 (another tick in between).
        h.tx.send(record(5, &t)).await.unwrap();
        h.tx.send(record(6, &tick("A", 7))).await.unwrap();
        h.tx.send(record(9, &t)).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(
            ids(&h.store, "A").await.len(),
            2,
            "the retry is the same tick"
        );
        assert_eq!(
            h.metrics
                .duplicates
                .with_label_values(&["ticks", "3"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn unkeyed_and_mismatched_messages_are_dead_lettered_as_key_mismatch() {
        let h = start(10, 0);
        let mut unkeyed = record(0, &tick("A", 1));
        unkeyed.key = None;
        h.tx.send(unkeyed).await.unwrap();
        let mut other = record(1, &tick("A", 2));
        other.key = Some(b"B".to_vec());
        h.tx.send(other).await.unwrap();
        h.tx.send(record(2, &tick("A", 3))).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(
            h.dlq.reasons(),
            vec![(0, "key_mismatch"), (1, "key_mismatch")]
        );
        assert_eq!(ids(&h.store, "A").await.len(), 1);
    }

    /// Before, a tick without seq took its offset as seq: an unnumbered tick at offset 7 and a numbered
    /// tick with seq 7 at the same time got one identity, and a reader paging through the asset saw
    /// only one of them (a page ends at an identity, the next starts after it).
    #[tokio::test]
    async fn ticks_the_offset_identity_made_collide_are_both_stored() {
        let h = start(10, 0);
        let mut unnumbered = tick("A", 7);
        unnumbered.seq = 0;
        let mut numbered = tick("A", 7);
        numbered.price = rust_decimal::Decimal::from(99);
        h.tx.send(record(7, &unnumbered)).await.unwrap();
        h.tx.send(record(8, &numbered)).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        let mut seen = Vec::new();
        let mut q = RangeQuery::all(1);
        loop {
            let page = h.store.inner.range("A", &q).await.unwrap();
            seen.extend(page.ticks);
            match page.next {
                Some(next) => q.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_ne!(seen[0].id(), seen[1].id());
    }

    #[tokio::test]
    async fn a_store_rejection_dead_letters_only_the_refused_asset() {
        let h = start_with(10, 0, Some("BAD"), 0);
        h.tx.send(record(0, &tick("A", 1))).await.unwrap();
        h.tx.send(record(1, &tick("BAD", 1))).await.unwrap();
        h.tx.send(record(2, &tick("B", 1))).await.unwrap();
        h.tx.send(record(3, &tick("BAD", 2))).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(
            h.dlq.reasons(),
            vec![(1, "store_rejected"), (3, "store_rejected")]
        );
        let letters = h.dlq.letters.lock().unwrap().clone();
        assert!(letters[0].2.contains("WRONGTYPE"), "{letters:?}");
        assert_eq!(ids(&h.store, "A").await.len(), 1);
        assert_eq!(ids(&h.store, "B").await.len(), 1);
        assert_eq!(h.watermark.get(), Some(4), "the partition moves on");
        assert!(h.health.is_ready(), "a rejection is not an outage");
    }

    #[tokio::test]
    async fn an_unwritable_dead_letter_topic_stalls_the_partition_and_says_so() {
        let h = start_with(10, 0, None, usize::MAX);
        let mut poison = record(0, &tick("A", 1));
        poison.payload = vec![0xff];
        h.tx.send(poison).await.unwrap();
        h.tx.send(record(1, &tick("A", 2))).await.unwrap();
        let failures = || {
            h.metrics
                .dead_letter_failures
                .with_label_values(&["unwritable"])
                .get()
        };
        while failures() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Stopped at the poison message: nothing past it committed, nothing stored, not ready — and a
        // store ping passing does not make it ready.
        assert_eq!(h.watermark.get(), None);
        assert_eq!(h.store.calls.load(Ordering::SeqCst), 0);
        h.health.pass("store");
        assert!(!h.health.is_ready());
        let why = h.health.not_ready_because().unwrap();
        assert!(
            why.contains("partition 3 stalled at offset 0: dead-letter topic unwritable"),
            "{why}"
        );
        // The topic is fixed: the partition resumes by itself.
        h.dlq.unwritable.store(0, Ordering::SeqCst);
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.dlq.reasons(), vec![(0, "malformed")]);
        assert_eq!(h.watermark.get(), Some(2));
        assert!(h.health.is_ready());
    }

    #[tokio::test]
    async fn a_far_future_tick_is_dead_lettered_as_clock_skew() {
        let h = start(10, 0);
        let now = now_ns();
        let mut good = tick("A", 1);
        good.event_time_ns = now;
        let mut future = tick("A", 2);
        future.event_time_ns = now + 100 * 365 * 86_400 * 1_000_000_000;
        h.tx.send(record(0, &good)).await.unwrap();
        h.tx.send(record(1, &future)).await.unwrap();
        drop(h.tx);
        h.task.await.unwrap();
        assert_eq!(h.dlq.reasons(), vec![(1, "clock_skew")]);
        assert_eq!(h.store.inner.latest("A").await.unwrap().unwrap(), good);
    }
}

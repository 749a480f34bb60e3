//! The Kafka side of the worker: one thread owns the consumer, polls it, and hands each message to its
//! partition's lane; rebalance callbacks (which librdkafka runs on this same thread, inside `poll`) open
//! lanes for assigned partitions and, for revoked ones, drain the lane and commit before letting go.
//!
//! (Over 600 lines with its tests, about 560 of code: the lanes map, the poll loop and the lanes' side of
//! the rebalance callbacks keep one invariant — a partition's messages reach only its lane, and only its
//! watermark is committed — under one lock on one thread; split over files it would be harder to check,
//! not easier. What is apart from that invariant is apart: librdkafka's callbacks in [`context`], the
//! consumer as the lanes see it and the bounded final commit in [`partitions`].)
//!
//! Backpressure: when a lane's channel is full the message is held here and the partition is paused, so
//! librdkafka stops fetching it; it resumes once the lane catches up. Memory: every message polled is
//! charged to one process-wide byte budget ([`InFlight`], `--max-in-flight-bytes`) until its lane has
//! handled it; above the budget every partition is paused, and resumed once half of it is free. So the
//! worker holds at most the budget plus what was already polled when the pause took effect, plus
//! librdkafka's prefetch (`queued.max.messages.kbytes`) — whatever the number of partitions.
//!
//! Commits: only a lane's [`Watermark`] (every earlier offset stored or dead-lettered) is ever committed —
//! every commit interval, on revoke and on shutdown, always synchronously (one round trip per interval,
//! not per message), so the committed-offset metric reports what Kafka accepted.
//!
//! Faults: a rebalance error closes every lane (draining and committing what they stored), since the
//! assignment is then unknown; the next assignment opens them again. A lane that panics (a bug) cancels
//! the `fatal` token: the process exits non-zero without committing further (crash-only), and the
//! partition's next owner re-reads what was not committed, instead of this worker dropping the
//! partition's messages while it runs on.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::in_flight::InFlight;
use crate::lane::{LaneConfig, LaneShared, Record, Watermark, run_lane};

mod context;
mod partitions;

pub(crate) use context::WorkerContext;
pub(crate) use partitions::{BoundedCommits, Partitions};

/// How releasing partitions went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    /// Every lane stored what it held within the drain timeout.
    pub(crate) drained: bool,
    /// Kafka accepted the commit of their watermarks (or there was nothing to commit), or refused it
    /// only because the partitions are changing hands (the group is rebalancing, or it no longer counts
    /// this worker as the owner): their next owner re-reads from the previous commit, which the
    /// idempotent store absorbs. Any other refusal is a failed commit.
    pub(crate) committed: bool,
}

/// What Kafka said to a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Accepted (or there was nothing to commit).
    Accepted,
    /// Refused because the partitions are changing hands: the group is rebalancing (members joining or
    /// leaving: several workers stopping at once, a rolling restart), or the coordinator no longer
    /// counts this worker as a member or as the owner at this epoch (its session expired while the
    /// broker was unreachable or restarting; under KIP-848 a stale or fenced member epoch).
    HandOver,
    /// Refused for any other reason (broker unreachable, not authorized, …).
    Failed,
}

/// How long the poll thread waits for room in a full lane before pausing its partition.
const FULL_LANE_WAIT: Duration = Duration::from_millis(100);

/// The per-partition lanes of one consumer, shared by the poll loop and the rebalance callbacks.
pub(crate) struct Lanes {
    runtime: Handle,
    shared: LaneShared,
    config: LaneConfig,
    capacity: usize,
    topic: String,
    drain_timeout: Duration,
    map: Mutex<HashMap<i32, Lane>>,
    /// Bytes in flight over every lane, against the budget.
    pub(crate) in_flight: Arc<InFlight>,
    /// Whether every partition is paused because the in-flight budget is spent.
    over_budget: std::sync::atomic::AtomicBool,
    /// Cancelled when a lane panics: the process must stop.
    pub(crate) fatal: CancellationToken,
    /// The first lane panic: its partition and message.
    panicked: Arc<Mutex<Option<(i32, String)>>>,
}

struct Lane {
    tx: mpsc::Sender<Record>,
    /// Messages polled while the lane was full, in offset order; the partition is paused meanwhile.
    stash: VecDeque<Record>,
    paused: bool,
    watermark: Watermark,
    /// Last offset sent in a (synchronous) commit; back to -1 when Kafka refused it, so the next
    /// periodic commit sends it again.
    committed: i64,
    consumed: prometheus::IntCounter,
    task: JoinHandle<()>,
}

impl Lanes {
    pub(crate) fn new(
        runtime: Handle,
        shared: LaneShared,
        config: LaneConfig,
        capacity: usize,
        max_in_flight_bytes: usize,
        topic: &str,
        drain_timeout: Duration,
    ) -> Self {
        let in_flight = InFlight::new(max_in_flight_bytes, shared.metrics.clone());
        Lanes {
            runtime,
            shared,
            config,
            capacity: capacity.max(1),
            topic: topic.to_owned(),
            drain_timeout,
            map: Mutex::default(),
            in_flight,
            over_budget: std::sync::atomic::AtomicBool::new(false),
            fatal: CancellationToken::new(),
            panicked: Arc::default(),
        }
    }

    /// The partition and message of the first lane that panicked, if one did.
    pub(crate) fn panicked(&self) -> Option<(i32, String)> {
        self.panicked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Lane>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tpl(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        tpl
    }

    /// Starts lanes for newly assigned partitions.
    fn open(&self, partitions: &[i32]) {
        let mut map = self.lock();
        for &p in partitions {
            if map.contains_key(&p) {
                continue;
            }
            let (tx, rx) = mpsc::channel(self.capacity);
            let watermark = Watermark::new();
            let lane = run_lane(p, rx, watermark.clone(), self.shared.clone(), self.config);
            let fatal = self.fatal.clone();
            let panicked = self.panicked.clone();
            let task = self.runtime.spawn(async move {
                if let Err(panic) = std::panic::AssertUnwindSafe(lane).catch_unwind().await {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    error!(partition = p, panic = %message,
                        "lane panicked: stopping the worker (its partitions' next owner re-reads what was not committed)");
                    panicked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert((p, message));
                    fatal.cancel();
                }
            });
            let consumed = self
                .shared
                .metrics
                .consumed
                .with_label_values(&[&self.topic, &p.to_string()]);
            map.insert(
                p,
                Lane {
                    tx,
                    stash: VecDeque::new(),
                    paused: false,
                    watermark,
                    committed: -1,
                    consumed,
                    task,
                },
            );
        }
        self.shared
            .metrics
            .assigned_partitions
            .set(map.len() as i64);
        info!(partitions = ?partitions, assigned = map.len(), "partitions assigned");
    }

    /// Stops the lanes of `partitions`: no more input, let them store what they hold (bounded by the drain
    /// timeout), then commit their watermarks synchronously.
    fn retire(&self, consumer: &dyn Partitions, partitions: &[i32], why: &str) -> Released {
        let lanes: Vec<(i32, Lane)> = {
            let mut map = self.lock();
            let lanes = partitions
                .iter()
                .filter_map(|p| map.remove(p).map(|l| (*p, l)))
                .collect();
            self.shared
                .metrics
                .assigned_partitions
                .set(map.len() as i64);
            lanes
        };
        if lanes.is_empty() {
            return Released {
                drained: true,
                committed: true,
            };
        }
        for (p, _) in &lanes {
            // this worker no longer reports lag for them; their next owner does
            let _ = self
                .shared
                .metrics
                .consumer_lag
                .remove_label_values(&[&self.topic, &p.to_string()]);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        let mut offsets = Vec::new();
        for (p, lane) in lanes {
            // Held messages were never handed to the lane: dropping them uncommitted means the next owner
            // reads them again.
            drop(lane.stash);
            drop(lane.tx);
            tasks.push(lane.task);
            offsets.push((p, lane.watermark, lane.committed));
        }
        let timeout = self.drain_timeout;
        let drained = self.runtime.block_on(async {
            let all = futures::future::join_all(tasks.iter_mut());
            tokio::time::timeout(timeout, all).await.is_ok()
        });
        if !drained {
            warn!(
                why,
                timeout_s = timeout.as_secs(),
                "lanes did not drain in time; their unstored messages stay uncommitted"
            );
            for t in &tasks {
                t.abort();
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, watermark, committed) in &offsets {
            if let Some(w) = watermark.get().filter(|w| w > committed) {
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(w));
            }
        }
        let committed = self.commit(consumer, &tpl, why) != Commit::Failed;
        info!(why, partitions = ?partitions, drained, committed, elapsed_ms = started.elapsed().as_millis() as u64, "partitions released");
        Released { drained, committed }
    }

    /// Hands a polled message to its lane, or holds it (pausing the partition) when the lane is full.
    /// Returns whether the message was held.
    fn dispatch(&self, consumer: &dyn Partitions, record: Record) -> bool {
        let mut map = self.lock();
        let Some(lane) = map.get_mut(&record.partition) else {
            // Not ours (any more): leave it uncommitted for the partition's owner.
            debug!(
                partition = record.partition,
                "message for a partition not assigned here"
            );
            return false;
        };
        lane.consumed.inc();
        if !lane.stash.is_empty() {
            lane.stash.push_back(record);
            return true;
        }
        match lane.tx.try_send(record) {
            Ok(()) => false,
            Err(mpsc::error::TrySendError::Full(record)) => {
                // A busy lane usually frees room within one store write: wait for it briefly rather
                // than pausing, because a pause makes librdkafka drop what it prefetched for the
                // partition and fetch it again on resume. Only a lane that stays full (the store is
                // slow or down) gets its partition paused.
                let waited = self.runtime.block_on(async {
                    tokio::time::timeout(FULL_LANE_WAIT, lane.tx.reserve()).await
                });
                if let Ok(Ok(permit)) = waited {
                    permit.send(record);
                    return false;
                }
                let p = record.partition;
                lane.stash.push_back(record);
                if !lane.paused {
                    lane.paused = true;
                    if let Err(e) = consumer.pause(&self.tpl(&[p])) {
                        warn!(partition = p, error = %e, "pause failed");
                    }
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(record)) => {
                // Only a panicked lane closes while assigned; `fatal` stops the process.
                warn!(
                    partition = record.partition,
                    "lane stopped; message left uncommitted"
                );
                false
            }
        }
    }

    /// Moves held messages into lanes with room; resumes partitions whose backlog is gone.
    /// Returns whether any message is still held.
    fn flush_held(&self, consumer: &dyn Partitions) -> bool {
        let over_budget = self.over_budget.load(std::sync::atomic::Ordering::Relaxed);
        let mut map = self.lock();
        let mut any_held = false;
        for (p, lane) in map.iter_mut() {
            while let Some(record) = lane.stash.pop_front() {
                match lane.tx.try_send(record) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(record)) => {
                        lane.stash.push_front(record);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            // While over budget every partition stays paused; `enforce_budget` resumes them.
            if lane.stash.is_empty() && lane.paused && !over_budget {
                lane.paused = false;
                if let Err(e) = consumer.resume(&self.tpl(&[*p])) {
                    warn!(partition = p, error = %e, "resume failed");
                }
            }
            any_held |= !lane.stash.is_empty();
        }
        any_held
    }

    /// Pauses every partition once the bytes in flight exceed the budget, and resumes them (except those
    /// paused for a full lane) once at most half of it is used. Returns whether the budget is spent.
    fn enforce_budget(&self, consumer: &dyn Partitions) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = self.in_flight.bytes();
        let budget = self.in_flight.budget();
        let over = self.over_budget.load(Relaxed);
        if !over && bytes > budget {
            let assigned = self.assigned();
            if let Err(e) = consumer.pause(&self.tpl(&assigned)) {
                warn!(error = %e, "pause failed");
            }
            self.over_budget.store(true, Relaxed);
            debug!(
                bytes,
                budget, "in-flight budget spent: every partition paused"
            );
            return true;
        }
        if over && bytes <= budget / 2 {
            let mut map = self.lock();
            let free: Vec<i32> = map
                .iter_mut()
                .filter_map(|(p, l)| {
                    // A lane paused for being full whose held messages all went in while over
                    // budget (`flush_held` leaves it paused then, and holds nothing, so it is not
                    // called again) resumes now too: nothing else would resume it.
                    if l.paused && l.stash.is_empty() {
                        l.paused = false;
                    }
                    (!l.paused).then_some(*p)
                })
                .collect();
            drop(map);
            if let Err(e) = consumer.resume(&self.tpl(&free)) {
                warn!(error = %e, "resume failed");
            }
            self.over_budget.store(false, Relaxed);
            debug!(
                bytes,
                budget, "in-flight budget free again: partitions resumed"
            );
            return false;
        }
        over
    }

    /// Closes every lane after a rebalance error: the assignment is unknown, so nothing may keep
    /// running on a partition this worker might not own any more. Lanes drain and commit first.
    fn on_rebalance_error(&self, consumer: &dyn Partitions) -> Released {
        let assigned = self.assigned();
        warn!(partitions = ?assigned, "rebalance error: closing every lane until the next assignment");
        self.retire(consumer, &assigned, "rebalance_error")
    }

    /// Commits every partition whose watermark moved since its last commit.
    fn commit_stored(&self, consumer: &dyn Partitions) {
        let mut map = self.lock();
        let mut tpl = TopicPartitionList::new();
        for (p, lane) in map.iter_mut() {
            if let Some(w) = lane.watermark.get().filter(|w| *w > lane.committed) {
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(w));
                lane.committed = w;
            }
        }
        drop(map);
        if self.commit(consumer, &tpl, "periodic") != Commit::Accepted {
            self.forget_commits(&tpl);
        }
    }

    /// Commits `tpl` synchronously — one round trip per commit interval, not per message — so the
    /// committed-offset metric reports what Kafka accepted.
    fn commit(&self, consumer: &dyn Partitions, tpl: &TopicPartitionList, trigger: &str) -> Commit {
        if tpl.count() == 0 {
            return Commit::Accepted;
        }
        match consumer.commit_sync(tpl) {
            Ok(()) => {
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.shared
                            .metrics
                            .committed_offset
                            .with_label_values(&[e.topic(), &e.partition().to_string()])
                            .set(o);
                    }
                }
                Commit::Accepted
            }
            Err(e) => {
                self.shared
                    .metrics
                    .commit_failures
                    .with_label_values(&[trigger])
                    .inc();
                // Kafka refuses commits while partitions change hands: expected, and harmless since the
                // store's writes are idempotent. Anything else deserves a warning.
                if is_hand_over(&e) {
                    info!(trigger, error = %e, "commit refused: the partitions are changing hands; the next owner re-reads from the last commit (writes are idempotent)");
                    Commit::HandOver
                } else {
                    warn!(trigger, error = %e,
                        "commit refused; retried later, or the next owner re-reads from the last commit (writes are idempotent)");
                    Commit::Failed
                }
            }
        }
    }

    /// After a failed commit, makes the next `commit_stored` send those partitions again.
    fn forget_commits(&self, tpl: &TopicPartitionList) {
        let mut map = self.lock();
        for e in tpl.elements() {
            if let Some(lane) = map.get_mut(&e.partition()) {
                lane.committed = -1;
            }
        }
    }

    fn assigned(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Whether a commit was refused only because its partitions are changing hands. Classic protocol: the
/// group is rebalancing (`REBALANCE_IN_PROGRESS`), or this member's generation (`ILLEGAL_GENERATION`) or
/// membership (`UNKNOWN_MEMBER_ID`, a session that expired) is gone. KIP-848 (`group.protocol=consumer`):
/// `STALE_MEMBER_EPOCH` or `FENCED_MEMBER_EPOCH` — after a broker restart, members whose heartbeats were
/// late are fenced and their final commit is refused with `UNKNOWN_MEMBER_ID` — and librdkafka's own
/// `ASSIGNMENT_LOST`.
fn is_hand_over(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e,
        rdkafka::error::KafkaError::ConsumerCommit(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::UnknownMemberId
                | C::StaleMemberEpoch
                | C::FencedMemberEpoch
                | C::AssignmentLost
        )
    )
}

/// When and how a worker drains, shared by the runtime that decides to stop and the poll thread.
pub(crate) struct DrainPlan {
    /// Set (before `stop` is cancelled) to the instant the whole drain must be over by.
    pub(crate) deadline: std::sync::OnceLock<Instant>,
    /// The part of the drain bound kept for the final commit and leaving the group; the commit must
    /// be answered by `deadline - reserve / 2`.
    pub(crate) reserve: Duration,
}

/// The poll loop: runs on its own thread until `stop` is cancelled, then drains every lane, commits
/// within the drain plan's bound, reports how the release went on `released`, and closes the consumer
/// (which leaves the group).
pub(crate) fn poll_loop(
    consumer: BaseConsumer<WorkerContext>,
    lanes: Arc<Lanes>,
    stop: CancellationToken,
    commit_every: Duration,
    plan: Arc<DrainPlan>,
    released: tokio::sync::oneshot::Sender<Released>,
) {
    let mut last_commit = Instant::now();
    let mut polls: u32 = 0;
    let topic: Arc<str> = Arc::from(lanes.topic.as_str());
    let mut held = false;
    while !stop.is_cancelled() && !lanes.fatal.is_cancelled() {
        let timeout = if held {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        let polled = consumer.poll(timeout);
        let idle = polled.is_none();
        match polled {
            Some(Ok(m)) => {
                let key = m.key().map(<[u8]>::to_vec);
                let payload = m.payload().unwrap_or_default().to_vec();
                let size = payload.len() + key.as_ref().map_or(0, Vec::len);
                let record = Record {
                    topic: topic.clone(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key,
                    payload,
                    charge: lanes.in_flight.charge(size),
                };
                drop(m);
                held |= lanes.dispatch(&consumer, record);
                lanes.enforce_budget(&consumer);
            }
            Some(Err(e)) => {
                tickfleet_service::kafka_log::failure(
                    &consumer.context().logs,
                    "consumer",
                    &e,
                    "poll failed",
                );
            }
            None => {}
        }
        if held {
            held = lanes.flush_held(&consumer);
        }
        if idle || held {
            lanes.enforce_budget(&consumer);
        }
        // Reading the clock for every message shows up in profiles: look when idle or every 256 polls.
        polls = polls.wrapping_add(1);
        if (idle || polls.is_multiple_of(256)) && last_commit.elapsed() >= commit_every {
            lanes.commit_stored(&consumer);
            last_commit = Instant::now();
        }
    }
    if lanes.fatal.is_cancelled() {
        // Crash-only: commit nothing more, leave at once; the next owner re-reads from the last commit.
        return;
    }
    let assigned = lanes.assigned();
    info!(partitions = ?assigned, "draining: fetching stopped");
    if let Err(e) = Consumer::pause(&consumer, &lanes.tpl(&assigned)) {
        debug!(error = %e, "pause before drain failed");
    }
    let deadline = plan
        .deadline
        .get()
        .copied()
        .unwrap_or_else(|| Instant::now() + lanes.drain_timeout + plan.reserve);
    let bounded = BoundedCommits {
        consumer: Arc::new(consumer),
        until: deadline.checked_sub(plan.reserve / 2).unwrap_or(deadline),
    };
    let outcome = lanes.retire(&bounded, &assigned, "shutdown");
    if !outcome.committed {
        error!(partitions = ?assigned, "final commit failed: the next owner re-reads from the previous commit (writes are idempotent)");
    }
    let _ = released.send(outcome);
    // Dropping the consumer closes it: it leaves the group, so its partitions move at once. A commit
    // still waiting for Kafka holds it; it closes when that commit gives up.
    match Arc::try_unwrap(bounded.consumer) {
        Ok(consumer) => {
            drop(consumer);
            info!("consumer closed");
        }
        Err(_) => warn!(
            "the final commit is still waiting for Kafka: the consumer closes when it gives up"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaResult;
    use std::collections::BTreeSet;
    use std::str::FromStr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tickfleet_proto::{Format, Limits, Tick};
    use tickfleet_service::Health;
    use tickfleet_store::{
        LiveFeed, MemoryStore, RangeQuery, StoreError, TickPage, TickStore, WriteSummary,
    };

    use crate::Error;
    use crate::lane::{Backoff, DeadLetterSink};
    use crate::metrics::Metrics;

    /// Records what the lanes ask of the consumer; commits are refused with `refuse` while it is set.
    #[derive(Default)]
    struct FakeConsumer {
        commits: Mutex<Vec<Vec<(i32, i64)>>>,
        paused: Mutex<BTreeSet<i32>>,
        refuse: Mutex<Option<rdkafka::types::RDKafkaErrorCode>>,
        /// Commits wait (as librdkafka's do for a broker that is gone) while this is set.
        hang_commits: AtomicBool,
    }

    impl FakeConsumer {
        fn paused(&self) -> BTreeSet<i32> {
            self.paused.lock().unwrap().clone()
        }
    }

    impl Partitions for FakeConsumer {
        fn commit_sync(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            while self.hang_commits.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Some(code) = *self.refuse.lock().unwrap() {
                return Err(rdkafka::error::KafkaError::ConsumerCommit(code));
            }
            let offsets = tpl
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect();
            self.commits.lock().unwrap().push(offsets);
            Ok(())
        }
        fn pause(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            let mut paused = self.paused.lock().unwrap();
            paused.extend(tpl.elements().iter().map(|e| e.partition()));
            Ok(())
        }
        fn resume(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
            let mut paused = self.paused.lock().unwrap();
            for e in tpl.elements() {
                paused.remove(&e.partition());
            }
            Ok(())
        }
    }

    /// The in-memory store whose writes wait for permits of `gate` (and panic when `panic` is set).
    struct Gated {
        inner: MemoryStore,
        gate: tokio::sync::Semaphore,
        panic: bool,
    }

    #[async_trait::async_trait]
    impl TickStore for Gated {
        async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
            assert!(!self.panic, "injected lane bug");
            self.gate.acquire().await.expect("gate open").forget();
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
        async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
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

    struct NoDeadLetters;

    #[async_trait::async_trait]
    impl DeadLetterSink for NoDeadLetters {
        async fn send(&self, r: &Record, reason: &'static str, _: &str) -> Result<(), Error> {
            panic!("unexpected dead letter at {} ({reason})", r.offset)
        }
    }

    struct Setup {
        runtime: tokio::runtime::Runtime,
        lanes: Lanes,
        store: Arc<Gated>,
        consumer: FakeConsumer,
    }

    fn setup(permits: usize, panic: bool, budget: usize) -> Setup {
        setup_with(permits, panic, budget, 10_000)
    }

    /// [`setup`] with lanes of `capacity` messages.
    fn setup_with(permits: usize, panic: bool, budget: usize, capacity: usize) -> Setup {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(Gated {
            inner: MemoryStore::new(),
            gate: tokio::sync::Semaphore::new(permits),
            panic,
        });
        let shared = LaneShared {
            store: store.clone(),
            dead_letters: Arc::new(NoDeadLetters),
            metrics: Metrics::new(),
            health: Health::new(),
        };
        let config = LaneConfig {
            batch_size: 10,
            linger: Duration::from_millis(1),
            format: Format::Protobuf,
            limits: Limits::default(),
            backoff: Backoff::default(),
        };
        let lanes = Lanes::new(
            runtime.handle().clone(),
            shared,
            config,
            capacity,
            budget,
            "ticks",
            Duration::from_secs(10),
        );
        Setup {
            runtime,
            lanes,
            store,
            consumer: FakeConsumer::default(),
        }
    }

    /// A valid tick message of about `size` bytes for `partition` at `offset`.
    fn message(lanes: &Lanes, partition: i32, offset: i64, size: usize) -> Record {
        let asset = format!("A{partition}");
        let tick = Tick {
            asset_id: asset.clone(),
            price: rust_decimal::Decimal::from_str("1.5").unwrap(),
            size: None,
            event_time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i64,
            seq: offset as u64 + 1,
            source: "x".repeat(size.saturating_sub(40)),
        };
        let payload = tick.to_protobuf();
        let key = asset.into_bytes();
        Record {
            topic: "ticks".into(),
            partition,
            offset,
            charge: lanes.in_flight.charge(payload.len() + key.len()),
            key: Some(key),
            payload,
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_failed_final_commit_is_reported() {
        let s = setup(1000, false, 1 << 20);
        s.lanes.open(&[0]);
        s.lanes.dispatch(&s.consumer, message(&s.lanes, 0, 41, 100));
        *s.consumer.refuse.lock().unwrap() =
            Some(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure);
        let released = s.lanes.retire(&s.consumer, &[0], "shutdown");
        assert_eq!(
            released,
            Released {
                drained: true,
                committed: false
            }
        );
        assert_eq!(
            s.lanes
                .shared
                .metrics
                .commit_failures
                .with_label_values(&["shutdown"])
                .get(),
            1
        );
        // And a commit Kafka accepts is reported as such.
        *s.consumer.refuse.lock().unwrap() = None;
        s.lanes.open(&[1]);
        s.lanes.dispatch(&s.consumer, message(&s.lanes, 1, 7, 100));
        let released = s.lanes.retire(&s.consumer, &[1], "shutdown");
        assert!(released.drained && released.committed);
        assert_eq!(*s.consumer.commits.lock().unwrap(), vec![vec![(1, 8)]]);
        drop(s.runtime);
    }

    /// With the broker gone, librdkafka's synchronous commit does not return; the drain must still end
    /// within its bound and report the commit as failed (not as a drain that timed out).
    #[test]
    fn a_final_commit_kafka_never_answers_fails_at_its_bound() {
        let s = setup(1000, false, 1 << 20);
        let consumer = Arc::new(FakeConsumer::default());
        s.lanes.open(&[0]);
        s.lanes.dispatch(&*consumer, message(&s.lanes, 0, 41, 100));
        consumer.hang_commits.store(true, Ordering::SeqCst);
        let bounded = BoundedCommits {
            consumer: consumer.clone(),
            until: Instant::now() + Duration::from_millis(200),
        };
        let started = Instant::now();
        let released = s.lanes.retire(&bounded, &[0], "shutdown");
        assert_eq!(
            released,
            Released {
                drained: true,
                committed: false
            }
        );
        // A generous bound: the commit never returns on its own while it hangs.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        assert!(consumer.commits.lock().unwrap().is_empty());
        // The abandoned commit still goes through if Kafka answers later (the next owner would
        // otherwise re-read, which the store absorbs).
        consumer.hang_commits.store(false, Ordering::SeqCst);
        wait_until("the abandoned commit to go through", || {
            !consumer.commits.lock().unwrap().is_empty()
        });
        assert_eq!(*consumer.commits.lock().unwrap(), vec![vec![(0, 42)]]);
        drop(s.runtime);
    }

    #[test]
    fn a_final_commit_refused_because_the_partitions_changed_hands_is_a_hand_over() {
        use rdkafka::types::RDKafkaErrorCode as C;
        for (p, code) in [
            C::RebalanceInProgress,
            C::IllegalGeneration,
            C::UnknownMemberId,
            C::StaleMemberEpoch,
            C::FencedMemberEpoch,
            C::AssignmentLost,
        ]
        .into_iter()
        .enumerate()
        {
            let s = setup(1000, false, 1 << 20);
            let p = p as i32;
            s.lanes.open(&[p]);
            s.lanes.dispatch(&s.consumer, message(&s.lanes, p, 41, 100));
            *s.consumer.refuse.lock().unwrap() = Some(code);
            let released = s.lanes.retire(&s.consumer, &[p], "shutdown");
            assert_eq!(
                released,
                Released {
                    drained: true,
                    committed: true
                },
                "{code:?}"
            );
            // Still counted as a refused commit.
            let failures = &s.lanes.shared.metrics.commit_failures;
            assert_eq!(
                failures.with_label_values(&["shutdown"]).get(),
                1,
                "{code:?}"
            );
            drop(s.runtime);
        }
    }

    #[test]
    fn lanes_are_closed_on_a_rebalance_error() {
        let s = setup(1000, false, 1 << 20);
        s.lanes.open(&[0, 1]);
        s.lanes.dispatch(&s.consumer, message(&s.lanes, 0, 3, 100));
        s.lanes.dispatch(&s.consumer, message(&s.lanes, 1, 9, 100));
        let released = s.lanes.on_rebalance_error(&s.consumer);
        assert!(released.drained && released.committed);
        assert!(s.lanes.assigned().is_empty(), "every lane closed");
        let mut committed = s.consumer.commits.lock().unwrap().concat();
        committed.sort_unstable();
        assert_eq!(
            committed,
            vec![(0, 4), (1, 10)],
            "what they stored is committed"
        );
        // Messages for the closed partitions are not taken any more.
        assert!(!s.lanes.dispatch(&s.consumer, message(&s.lanes, 0, 4, 100)));
        assert_eq!(s.lanes.in_flight.bytes(), 0);
        drop(s.runtime);
    }

    #[test]
    fn a_lane_panic_stops_the_worker() {
        let s = setup(1000, true, 1 << 20);
        s.lanes.open(&[2]);
        s.lanes.dispatch(&s.consumer, message(&s.lanes, 2, 0, 100));
        wait_until("the fatal token", || s.lanes.fatal.is_cancelled());
        let (partition, message) = s.lanes.panicked().unwrap();
        assert_eq!(partition, 2);
        assert!(message.contains("injected lane bug"), "{message}");
        // Its message was given back, not silently dropped as handled: the watermark never moved.
        assert_eq!(s.lanes.in_flight.bytes(), 0);
        assert!(s.lanes.lock()[&2].watermark.get().is_none());
        drop(s.runtime);
    }

    #[test]
    fn in_flight_memory_is_bounded_in_bytes_across_partitions() {
        const BUDGET: usize = 20_000;
        const SIZE: usize = 1_000;
        // The store takes nothing until the gate opens: every message polled stays in flight.
        let s = setup(0, false, BUDGET);
        let partitions = [0, 1, 2, 3, 4, 5, 6, 7];
        s.lanes.open(&partitions);
        let mut next = [0i64; 8];
        let mut most = 0;
        // The poll loop's part: a paused partition yields nothing; after each message, the budget.
        for i in 0..400 {
            let p = partitions[i % partitions.len()];
            if s.consumer.paused().contains(&p) {
                continue;
            }
            let r = message(&s.lanes, p, next[p as usize], SIZE);
            next[p as usize] += 1;
            s.lanes.dispatch(&s.consumer, r);
            s.lanes.enforce_budget(&s.consumer);
            most = most.max(s.lanes.in_flight.bytes());
        }
        assert!(most > BUDGET, "the budget was reached ({most})");
        assert!(
            most <= BUDGET + SIZE + 100,
            "at most one message over: {most}"
        );
        assert_eq!(s.consumer.paused(), partitions.into_iter().collect());
        assert_eq!(
            s.lanes.shared.metrics.in_flight_bytes.get() as usize,
            s.lanes.in_flight.bytes()
        );
        // The store takes them: memory is given back and every partition resumes.
        s.store.gate.add_permits(1_000);
        wait_until("the lanes to store everything", || {
            s.lanes.in_flight.bytes() <= BUDGET / 2
        });
        s.lanes.enforce_budget(&s.consumer);
        assert!(s.consumer.paused().is_empty());
        wait_until("nothing in flight", || s.lanes.in_flight.bytes() == 0);
        assert_eq!(s.store.inner.len() as i64, next.iter().sum::<i64>());
        drop(s.runtime);
    }

    /// A partition paused because its lane was full, whose held messages all went into the lane while
    /// the in-flight budget was spent, resumes with the others once the budget is free again (it
    /// stayed paused for good: the poll loop calls `flush_held` only while something is held, and the
    /// budget's resume skipped partitions paused for a full lane).
    #[test]
    fn a_full_lane_pause_that_drains_while_over_budget_ends_with_it() {
        const BUDGET: usize = 8_000;
        const SIZE: usize = 1_000;
        let s = setup_with(0, false, BUDGET, 4);
        s.lanes.open(&[0, 1]);
        let mut sent = 0i64;
        // The store takes nothing: partition 0's lane fills and its next message is held.
        while !s
            .lanes
            .dispatch(&s.consumer, message(&s.lanes, 0, sent, SIZE))
        {
            sent += 1;
            assert!(sent < 100, "the lane never filled");
        }
        sent += 1;
        assert_eq!(s.consumer.paused(), BTreeSet::from([0]));
        // Over budget: every partition paused.
        assert!(
            s.lanes.enforce_budget(&s.consumer),
            "{}",
            s.lanes.in_flight.bytes()
        );
        assert_eq!(s.consumer.paused(), BTreeSet::from([0, 1]));
        // One batch stored: the held message goes into the lane while still over budget.
        s.store.gate.add_permits(1);
        wait_until("the held message to go into its lane", || {
            !s.lanes.flush_held(&s.consumer)
        });
        // Everything stored: the budget is free, and both partitions resume.
        s.store.gate.add_permits(1_000);
        wait_until("nothing in flight", || s.lanes.in_flight.bytes() == 0);
        assert!(!s.lanes.enforce_budget(&s.consumer));
        assert!(s.consumer.paused().is_empty(), "{:?}", s.consumer.paused());
        assert_eq!(s.store.inner.len() as i64, sent);
        drop(s.runtime);
    }
}

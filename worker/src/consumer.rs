//! The Kafka side of the worker: one thread owns the consumer, polls it, and hands each message to its
//! partition's lane; rebalance callbacks (which librdkafka runs on this same thread, inside `poll`) open
//! lanes for assigned partitions and, for revoked ones, drain the lane and commit before letting go.
//!
//! Backpressure: when a lane's channel is full the message is held here and the partition is paused, so
//! librdkafka stops fetching it; it resumes once the lane catches up. Memory stays bounded by the lane
//! capacity plus librdkafka's `queued.max.messages.kbytes`.
//!
//! Commits: only a lane's [`Watermark`] (every earlier offset stored or dead-lettered) is ever committed —
//! every commit interval, on revoke and on shutdown, always synchronously (one round trip per interval,
//! not per message), so the committed-offset metric reports what Kafka accepted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::lane::{LaneConfig, LaneShared, Record, Watermark, run_lane};

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
        topic: &str,
        drain_timeout: Duration,
    ) -> Self {
        Lanes {
            runtime,
            shared,
            config,
            capacity: capacity.max(1),
            topic: topic.to_owned(),
            drain_timeout,
            map: Mutex::default(),
        }
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
            let task = self.runtime.spawn(run_lane(
                rx,
                watermark.clone(),
                self.shared.clone(),
                self.config,
            ));
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
    /// timeout), then commit their watermarks synchronously. Returns whether every lane drained.
    fn retire<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
        why: &str,
    ) -> bool {
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
            return true;
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
            self.shared.metrics.in_flight.sub(lane.stash.len() as i64);
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
        self.commit(consumer, &tpl, why);
        info!(why, partitions = ?partitions, drained, elapsed_ms = started.elapsed().as_millis() as u64, "partitions released");
        drained
    }

    /// Hands a polled message to its lane, or holds it (pausing the partition) when the lane is full.
    /// Returns whether the message was held.
    fn dispatch<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, record: Record) -> bool {
        let mut map = self.lock();
        let Some(lane) = map.get_mut(&record.partition) else {
            // Not ours (any more): leave it uncommitted for the partition's owner.
            self.shared.metrics.in_flight.dec();
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
                self.shared.metrics.in_flight.dec();
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
    fn flush_held<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
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
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.shared.metrics.in_flight.dec()
                    }
                }
            }
            if lane.stash.is_empty() && lane.paused {
                lane.paused = false;
                if let Err(e) = consumer.resume(&self.tpl(&[*p])) {
                    warn!(partition = p, error = %e, "resume failed");
                }
            }
            any_held |= !lane.stash.is_empty();
        }
        any_held
    }

    /// Commits every partition whose watermark moved since its last commit.
    fn commit_stored<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let mut map = self.lock();
        let mut tpl = TopicPartitionList::new();
        for (p, lane) in map.iter_mut() {
            if let Some(w) = lane.watermark.get().filter(|w| *w > lane.committed) {
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(w));
                lane.committed = w;
            }
        }
        drop(map);
        if !self.commit(consumer, &tpl, "periodic") {
            self.forget_commits(&tpl);
        }
    }

    /// Commits `tpl` synchronously — one round trip per commit interval, not per message — so the
    /// committed-offset metric reports what Kafka accepted. Returns whether it was accepted.
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
        trigger: &str,
    ) -> bool {
        if tpl.count() == 0 {
            return true;
        }
        match consumer.commit(tpl, CommitMode::Sync) {
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
                true
            }
            Err(e) => {
                self.shared
                    .metrics
                    .commit_failures
                    .with_label_values(&[trigger])
                    .inc();
                // Kafka refuses commits while the group rebalances (members joining or leaving): expected,
                // and harmless since the store's writes are idempotent. Anything else deserves a warning.
                let rebalancing = matches!(
                    e,
                    rdkafka::error::KafkaError::ConsumerCommit(
                        rdkafka::types::RDKafkaErrorCode::RebalanceInProgress
                            | rdkafka::types::RDKafkaErrorCode::IllegalGeneration
                    )
                );
                if rebalancing {
                    info!(trigger, error = %e, "commit refused during a rebalance; the next owner re-reads from the last commit (writes are idempotent)");
                } else {
                    warn!(trigger, error = %e,
                        "commit refused; retried later, or the next owner re-reads from the last commit (writes are idempotent)");
                }
                false
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

/// librdkafka callbacks, run on the poll thread.
pub(crate) struct WorkerContext {
    pub(crate) lanes: Arc<Lanes>,
    /// Why the brokers refuse this worker (a failed SASL login or TLS handshake), until a partition
    /// assignment shows it is in again; the `kafka` readiness check reads it.
    pub(crate) refused: Arc<std::sync::Mutex<Option<String>>>,
}

/// Whether a client error means the brokers will not have this client (credentials or TLS), as
/// opposed to a broker being away for a while.
fn is_refusal(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(C::Authentication | C::SaslAuthenticationFailed | C::SSL)
    )
}

impl ClientContext for WorkerContext {
    /// librdkafka's client errors: logged as librdkafka's own default does; a refused login or TLS
    /// handshake also makes the worker not ready until the group takes it in.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if is_refusal(&error) {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            *refused = Some(reason.to_owned());
        }
        tracing::error!(error = %error, reason, "kafka client error");
    }

    /// librdkafka's statistics (every `statistics.interval.ms`, on the poll thread): the consumer lag of
    /// each assigned partition becomes `tickfleet_worker_consumer_lag_messages`.
    fn stats(&self, statistics: Statistics) {
        let assigned = self.lanes.assigned();
        let Some(topic) = statistics.topics.get(&self.lanes.topic) else {
            return;
        };
        for (p, lag) in partition_lags(topic, &assigned) {
            self.lanes
                .shared
                .metrics
                .consumer_lag
                .with_label_values(&[&self.lanes.topic, &p.to_string()])
                .set(lag);
        }
    }
}

/// The lag of each of `assigned` partitions that librdkafka knows the end of: messages after the committed
/// offset, or — before this group ever committed one — every message still in the partition (the worker
/// starts from the earliest offset, `auto.offset.reset=earliest`). Partitions whose high watermark is not
/// known yet are left out rather than reported as 0.
fn partition_lags(topic: &rdkafka::statistics::Topic, assigned: &[i32]) -> Vec<(i32, i64)> {
    assigned
        .iter()
        .filter_map(|p| {
            let s = topic.partitions.get(p)?;
            let lag = if s.consumer_lag >= 0 {
                s.consumer_lag
            } else if s.committed_offset < 0 && s.hi_offset >= 0 && s.lo_offset >= 0 {
                s.hi_offset - s.lo_offset
            } else {
                return None;
            };
            Some((*p, lag))
        })
        .collect()
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.lanes
                .shared
                .metrics
                .rebalances
                .with_label_values(&["revoke"])
                .inc();
            let lost = consumer.assignment_lost();
            info!(partitions = ?partitions_of(tpl), lost, "partitions revoked: draining them before letting go");
            self.lanes.retire(consumer, &partitions_of(tpl), "revoke");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.lanes
                    .shared
                    .metrics
                    .rebalances
                    .with_label_values(&["assign"])
                    .inc();
                self.lanes.open(&partitions_of(tpl));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// The poll loop: runs on its own thread until `stop` is cancelled, then drains every lane, commits and
/// closes the consumer (which leaves the group). Returns whether every lane drained in time.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<WorkerContext>,
    lanes: Arc<Lanes>,
    stop: CancellationToken,
    commit_every: Duration,
) -> bool {
    let mut last_commit = Instant::now();
    let mut polls: u32 = 0;
    let topic: Arc<str> = Arc::from(lanes.topic.as_str());
    let mut held = false;
    while !stop.is_cancelled() {
        let timeout = if held {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        let polled = consumer.poll(timeout);
        let idle = polled.is_none();
        match polled {
            Some(Ok(m)) => {
                let record = Record {
                    topic: topic.clone(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                };
                drop(m);
                lanes.shared.metrics.in_flight.inc();
                held |= lanes.dispatch(&consumer, record);
            }
            Some(Err(e)) => warn!(error = %e, "kafka consumer error"),
            None => {}
        }
        if held {
            held = lanes.flush_held(&consumer);
        }
        // Reading the clock for every message shows up in profiles: look when idle or every 256 polls.
        polls = polls.wrapping_add(1);
        if (idle || polls.is_multiple_of(256)) && last_commit.elapsed() >= commit_every {
            lanes.commit_stored(&consumer);
            last_commit = Instant::now();
        }
    }
    let assigned = lanes.assigned();
    info!(partitions = ?assigned, "draining: fetching stopped");
    if let Err(e) = consumer.pause(&lanes.tpl(&assigned)) {
        debug!(error = %e, "pause before drain failed");
    }
    let drained = lanes.retire(&consumer, &assigned, "shutdown");
    // Dropping the consumer closes it: it leaves the group, so its partitions move at once.
    drop(consumer);
    info!("consumer closed");
    drained
}

#[cfg(test)]
mod tests {
    use super::partition_lags;
    use rdkafka::statistics::{Partition, Topic};

    fn partition(p: i32, lo: i64, hi: i64, committed: i64, lag: i64) -> (i32, Partition) {
        (
            p,
            Partition {
                partition: p,
                lo_offset: lo,
                hi_offset: hi,
                committed_offset: committed,
                consumer_lag: lag,
                ..Partition::default()
            },
        )
    }

    #[test]
    fn lag_is_reported_for_assigned_partitions_whose_end_is_known() {
        let topic = Topic {
            partitions: [
                // committed: librdkafka's own lag
                partition(0, 0, 500, 200, 300),
                // never committed by this group: everything still in the partition
                partition(1, 100, 400, -1001, -1),
                // high watermark not fetched yet: unknown, not 0
                partition(2, -1001, -1001, -1001, -1),
                // not assigned here: another worker reports it
                partition(3, 0, 900, 10, 890),
                // librdkafka's internal "unassigned" partition
                partition(-1, -1001, -1001, -1001, -1),
            ]
            .into_iter()
            .collect(),
            ..Topic::default()
        };
        let mut lags = partition_lags(&topic, &[0, 1, 2]);
        lags.sort_unstable();
        assert_eq!(lags, vec![(0, 300), (1, 300)]);
    }
}

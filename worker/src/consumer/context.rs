//! librdkafka's callbacks into the worker ([`WorkerContext`]): its log lines and client errors
//! (folded; a refused login makes the worker not ready), its statistics (consumer lag per assigned
//! partition), and the rebalance callbacks, which open and retire the [`Lanes`].

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use tracing::{info, warn};

use super::Lanes;

/// librdkafka callbacks, run on the poll thread.
pub(crate) struct WorkerContext {
    pub(crate) lanes: Arc<Lanes>,
    /// Why the brokers refuse this worker (a failed SASL login or TLS handshake), until a partition
    /// assignment shows it is in again; the `kafka` readiness check reads it.
    pub(crate) refused: Arc<std::sync::Mutex<Option<String>>>,
    /// Folds librdkafka's log lines, its errors and poll errors: one backoff for all of them.
    pub(crate) logs: Arc<tickfleet_service::LogFold>,
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
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        tickfleet_service::kafka_log::log_line(&self.logs, "consumer", level, fac, log_message);
    }

    /// librdkafka's client errors, folded; a refused login or TLS handshake also makes the worker
    /// not ready until the group takes it in.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if is_refusal(&error) {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            *refused = Some(reason.to_owned());
        }
        tickfleet_service::kafka_log::failure(&self.logs, "consumer", &error, reason);
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
        if let Rebalance::Error(e) = rebalance {
            // rdkafka unassigns after this callback; the lanes must not outlive the assignment.
            warn!(error = %e, "rebalance error");
            self.lanes.on_rebalance_error(consumer);
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
            Rebalance::Revoke(_) | Rebalance::Error(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

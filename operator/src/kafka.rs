//! What the operator does in Kafka: make sure the topic has its partitions and its dead-letter topic
//! exists, and measure the consumer group's lag for autoscaling.
//!
//! Both sit behind the [`KafkaAdmin`] trait so the controller can be tested with a fake; the real
//! implementation, [`RdKafkaAdmin`], uses librdkafka. Lag is
//! `Σ over partitions (high watermark − committed offset)`, read with a consumer that joins no
//! group (it only asks the group coordinator for committed offsets), so measuring never triggers
//! a rebalance of the workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tickfleet_service::LogFold;
use tickfleet_service::kafka_log::FoldedLogs;

/// How to reach a pipeline's Kafka cluster, with credentials already read from their Secret (the
/// one librdkafka configuration every tickfleet client builds, in `tickfleet-service`).
pub use tickfleet_service::kafka::KafkaConnection;
pub use tickfleet_service::kafka::dead_letter_topic;

/// A failed Kafka operation.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// librdkafka reported an error.
    #[error("{0}")]
    Client(#[from] RdError),
    /// A topic-level operation failed on the broker.
    #[error("{op} topic {topic}: {code}")]
    Topic {
        /// What was attempted.
        op: &'static str,
        /// The topic.
        topic: String,
        /// Broker error code.
        code: RDKafkaErrorCode,
    },
    /// A blocking librdkafka call could not be run.
    #[error("kafka worker thread: {0}")]
    Join(String),
}

/// Consumer lag of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition id.
    pub partition: i32,
    /// Low watermark (first offset still stored).
    pub low: i64,
    /// High watermark (offset of the next message produced).
    pub high: i64,
    /// Offset committed by the group, `None` when it has none.
    pub committed: Option<i64>,
    /// Messages not yet consumed.
    pub lag: i64,
}

/// Consumer lag of a group over a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagReport {
    /// Sum over partitions.
    pub total: i64,
    /// Per partition, ordered by partition id.
    pub partitions: Vec<PartitionLag>,
}

/// Lag of one partition: `high − committed`. Without a committed offset, or with one below the
/// low watermark (retention deleted what it pointed at), the group starts from the low watermark
/// (the workers read from the earliest offset), so everything stored counts.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>) -> i64 {
    let from = match committed {
        Some(c) if c >= low => c,
        _ => low,
    };
    (high - from).max(0)
}

/// Kafka operations the operator needs.
#[async_trait]
pub trait KafkaAdmin: Send + Sync + 'static {
    /// Partitions of `topic`, `None` when it does not exist.
    async fn topic_partitions(
        &self,
        conn: &KafkaConnection,
        topic: &str,
    ) -> Result<Option<i32>, KafkaError>;
    /// Creates `topic` with `partitions` partitions; `replication` of `None` takes the broker default.
    async fn create_topic(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        partitions: i32,
        replication: Option<i32>,
    ) -> Result<(), KafkaError>;
    /// Grows `topic` to `total` partitions.
    async fn grow_topic(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        total: i32,
    ) -> Result<(), KafkaError>;
    /// Lag of `group` over every partition of `topic`.
    async fn consumer_lag(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        group: &str,
    ) -> Result<LagReport, KafkaError>;
}

/// What [`ensure_topic`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// The topic already had the declared partitions.
    Unchanged {
        /// Partitions.
        partitions: i32,
    },
    /// The topic was created.
    Created {
        /// Partitions.
        partitions: i32,
    },
    /// The topic was grown.
    Grown {
        /// Partitions before.
        from: i32,
        /// Partitions now.
        to: i32,
    },
    /// The topic has more partitions than declared; topics are never shrunk (Kafka cannot, and
    /// recreating it would lose data and break key-to-partition mapping).
    CannotShrink {
        /// Partitions the topic has.
        actual: i32,
        /// Partitions the spec declares.
        declared: i32,
    },
}

impl TopicOutcome {
    /// Partitions the topic has after the operation.
    pub fn partitions(self) -> i32 {
        match self {
            Self::Unchanged { partitions } | Self::Created { partitions } => partitions,
            Self::Grown { to, .. } => to,
            Self::CannotShrink { actual, .. } => actual,
        }
    }
}

/// Makes `topic` exist with at least `declared` partitions: creates it, grows it, or leaves it.
pub async fn ensure_topic(
    admin: &dyn KafkaAdmin,
    conn: &KafkaConnection,
    topic: &str,
    declared: i32,
    replication: Option<i32>,
) -> Result<TopicOutcome, KafkaError> {
    match admin.topic_partitions(conn, topic).await? {
        None => {
            admin
                .create_topic(conn, topic, declared, replication)
                .await?;
            Ok(TopicOutcome::Created {
                partitions: declared,
            })
        }
        Some(actual) if actual < declared => {
            admin.grow_topic(conn, topic, declared).await?;
            Ok(TopicOutcome::Grown {
                from: actual,
                to: declared,
            })
        }
        Some(actual) if actual > declared => Ok(TopicOutcome::CannotShrink { actual, declared }),
        Some(actual) => Ok(TopicOutcome::Unchanged { partitions: actual }),
    }
}

/// Makes the dead-letter topic of `topic` ([`dead_letter_topic`], where the workers send what they
/// cannot store) exist: created with `partitions` and `replication` (the pipeline's) when missing, else
/// left as it is — no consumer group shards by it, so its partition count matters to nobody and a
/// topic made by hand is kept. Returns the partitions it was created with, `None` when it existed.
pub async fn ensure_dead_letter_topic(
    admin: &dyn KafkaAdmin,
    conn: &KafkaConnection,
    topic: &str,
    partitions: i32,
    replication: Option<i32>,
) -> Result<Option<i32>, KafkaError> {
    let dlq = dead_letter_topic(topic);
    if admin.topic_partitions(conn, &dlq).await?.is_some() {
        return Ok(None);
    }
    match admin
        .create_topic(conn, &dlq, partitions, replication)
        .await
    {
        Ok(()) => Ok(Some(partitions)),
        // made meanwhile (by hand, or by another pipeline of the same topic): it exists
        Err(KafkaError::Topic {
            code: RDKafkaErrorCode::TopicAlreadyExists,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`KafkaAdmin`] on librdkafka. Clients are made per call: the operator calls it once per
/// reconcile of a pipeline, and pipelines may point at different clusters.
///
/// Every call is bounded by [`timeout`](Self::timeout) as a whole (a lag read is several broker
/// round trips, each given what is left), and librdkafka's log lines of all its clients are
/// folded ([`LogFold`]): an unreachable Kafka is logged with backoff, not once per connection
/// attempt of every client.
#[derive(Clone, Debug)]
pub struct RdKafkaAdmin {
    /// Bound on each call.
    pub timeout: Duration,
    logs: Arc<LogFold>,
}

impl Default for RdKafkaAdmin {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            logs: Arc::new(LogFold::default()),
        }
    }
}

/// What is left of `timeout` after `start`; an error when nothing is.
fn remaining(start: Instant, timeout: Duration, topic: &str) -> Result<Duration, KafkaError> {
    timeout
        .checked_sub(start.elapsed())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| KafkaError::Topic {
            op: "measure lag of",
            topic: topic.to_string(),
            code: RDKafkaErrorCode::RequestTimedOut,
        })
}

impl RdKafkaAdmin {
    fn config(&self, conn: &KafkaConnection) -> ClientConfig {
        let mut cfg = conn.client_config();
        cfg.set("client.id", "tickfleet-operator");
        // one bound for the client's own requests too
        let ms = self.timeout.as_millis().to_string();
        cfg.set("socket.timeout.ms", &ms);
        cfg
    }

    fn probe_consumer(
        &self,
        conn: &KafkaConnection,
        group: Option<&str>,
    ) -> Result<BaseConsumer<FoldedLogs>, KafkaError> {
        let mut cfg = self.config(conn);
        // never auto-create the topic by asking about it
        cfg.set("allow.auto.create.topics", "false");
        cfg.set("enable.auto.commit", "false");
        if let Some(g) = group {
            cfg.set("group.id", g);
        }
        Ok(cfg.create_with_context(FoldedLogs::new(self.logs.clone(), "operator"))?)
    }

    fn admin(&self, conn: &KafkaConnection) -> Result<AdminClient<FoldedLogs>, KafkaError> {
        Ok(self
            .config(conn)
            .create_with_context(FoldedLogs::new(self.logs.clone(), "operator"))?)
    }

    /// Runs `op` on a probe consumer; when it fails, hands librdkafka's queued log lines and errors
    /// to the folded logger first. rdkafka delivers those through the client's main queue, which
    /// only a poll serves, and these consumers are never polled: without this, a failure would
    /// be reported only as librdkafka's summary (`BrokerTransportFailure`) and the cause (a name
    /// that does not resolve, a refused connection, a TLS or SASL failure) would be dropped.
    fn probing<T>(
        consumer: &BaseConsumer<FoldedLogs>,
        op: impl FnOnce(&BaseConsumer<FoldedLogs>) -> Result<T, KafkaError>,
    ) -> Result<T, KafkaError> {
        let result = op(consumer);
        if result.is_err() {
            // each poll serves the events queued within 5 ms and returns early only on an error
            // event (already logged, folded, by the context); bounded however much is queued
            for _ in 0..64 {
                match consumer.poll(Duration::from_millis(5)) {
                    Some(Err(_)) => continue,
                    _ => break,
                }
            }
        }
        result
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, KafkaError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| KafkaError::Join(e.to_string()))?
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout))
    }
}

fn check_topic_results(
    op: &'static str,
    results: Vec<rdkafka::admin::TopicResult>,
) -> Result<(), KafkaError> {
    for r in results {
        if let Err((topic, code)) = r {
            return Err(KafkaError::Topic { op, topic, code });
        }
    }
    Ok(())
}

#[async_trait]
impl KafkaAdmin for RdKafkaAdmin {
    async fn topic_partitions(
        &self,
        conn: &KafkaConnection,
        topic: &str,
    ) -> Result<Option<i32>, KafkaError> {
        let topic = topic.to_string();
        let timeout = self.timeout;
        let consumer = self.probe_consumer(conn, None)?;
        Self::blocking(move || {
            Self::probing(&consumer, |consumer| {
                let md = consumer.fetch_metadata(Some(&topic), timeout)?;
                let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                    return Ok(None);
                };
                match t.error() {
                    None => Ok(Some(
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                    )),
                    Some(e) => {
                        let code = RDKafkaErrorCode::from(e);
                        if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                            Ok(None)
                        } else {
                            Err(KafkaError::Topic {
                                op: "describe",
                                topic,
                                code,
                            })
                        }
                    }
                }
            })
        })
        .await
    }

    async fn create_topic(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        partitions: i32,
        replication: Option<i32>,
    ) -> Result<(), KafkaError> {
        let admin = self.admin(conn)?;
        // -1: the broker's default.replication.factor (KIP-464)
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(replication.unwrap_or(-1)),
        );
        let results = admin.create_topics([&new], &self.options()).await?;
        check_topic_results("create", results)
    }

    async fn grow_topic(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        total: i32,
    ) -> Result<(), KafkaError> {
        let admin = self.admin(conn)?;
        let new = NewPartitions::new(topic, usize::try_from(total).unwrap_or(0));
        let results = admin.create_partitions([&new], &self.options()).await?;
        check_topic_results("grow", results)
    }

    async fn consumer_lag(
        &self,
        conn: &KafkaConnection,
        topic: &str,
        group: &str,
    ) -> Result<LagReport, KafkaError> {
        let topic = topic.to_string();
        let timeout = self.timeout;
        let consumer = self.probe_consumer(conn, Some(group))?;
        Self::blocking(move || {
            Self::probing(&consumer, |consumer| {
                // the whole read (metadata, offsets, one watermark request per partition) within
                // `timeout`
                let start = Instant::now();
                let md = consumer.fetch_metadata(Some(&topic), timeout)?;
                let mut ids: Vec<i32> = md
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                ids.sort_unstable();
                if ids.is_empty() {
                    return Err(KafkaError::Topic {
                        op: "measure lag of",
                        topic,
                        code: RDKafkaErrorCode::UnknownTopicOrPartition,
                    });
                }
                let mut tpl = TopicPartitionList::new();
                for id in &ids {
                    tpl.add_partition(&topic, *id);
                }
                let committed =
                    consumer.committed_offsets(tpl, remaining(start, timeout, &topic)?)?;
                let mut partitions = Vec::with_capacity(ids.len());
                for id in ids {
                    let (low, high) = consumer.fetch_watermarks(
                        &topic,
                        id,
                        remaining(start, timeout, &topic)?,
                    )?;
                    let committed =
                        committed
                            .find_partition(&topic, id)
                            .and_then(|e| match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            });
                    partitions.push(PartitionLag {
                        partition: id,
                        low,
                        high,
                        committed,
                        lag: partition_lag(low, high, committed),
                    });
                }
                Ok(LagReport {
                    total: partitions.iter().map(|p| p.lag).sum(),
                    partitions,
                })
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::FakeKafka as FakeAdmin;

    fn conn() -> KafkaConnection {
        KafkaConnection::plaintext("k:9092")
    }

    #[tokio::test]
    async fn creates_missing_topic() {
        let admin = FakeAdmin::default();
        let out = ensure_topic(&admin, &conn(), "ticks", 6, Some(3))
            .await
            .unwrap();
        assert_eq!(out, TopicOutcome::Created { partitions: 6 });
        assert_eq!(
            admin.calls(),
            vec!["describe ticks", "create ticks 6 Some(3)"]
        );
        assert_eq!(admin.topics.lock().unwrap()["ticks"], 6);
    }

    #[tokio::test]
    async fn creates_a_missing_dead_letter_topic_and_leaves_an_existing_one() {
        let admin = FakeAdmin::default();
        let out = ensure_dead_letter_topic(&admin, &conn(), "ticks", 6, Some(3))
            .await
            .unwrap();
        assert_eq!(out, Some(6));
        // the name the worker writes to by default
        assert_eq!(dead_letter_topic("ticks"), "ticks.dlq");
        assert_eq!(
            admin.calls(),
            vec!["describe ticks.dlq", "create ticks.dlq 6 Some(3)"]
        );
        // one made by hand with other partitions is kept: never grown, never shrunk
        admin.topics.lock().unwrap().insert("ticks.dlq".into(), 2);
        let out = ensure_dead_letter_topic(&admin, &conn(), "ticks", 6, None)
            .await
            .unwrap();
        assert_eq!(out, None);
        assert_eq!(admin.topics.lock().unwrap()["ticks.dlq"], 2);
        assert_eq!(admin.calls().len(), 3, "{:?}", admin.calls());
    }

    #[tokio::test]
    async fn grows_but_never_shrinks() {
        let admin = FakeAdmin::default();
        admin.topics.lock().unwrap().insert("ticks".into(), 4);
        let out = ensure_topic(&admin, &conn(), "ticks", 6, None)
            .await
            .unwrap();
        assert_eq!(out, TopicOutcome::Grown { from: 4, to: 6 });
        assert_eq!(out.partitions(), 6);
        let out = ensure_topic(&admin, &conn(), "ticks", 6, None)
            .await
            .unwrap();
        assert_eq!(out, TopicOutcome::Unchanged { partitions: 6 });
        let out = ensure_topic(&admin, &conn(), "ticks", 2, None)
            .await
            .unwrap();
        assert_eq!(
            out,
            TopicOutcome::CannotShrink {
                actual: 6,
                declared: 2
            }
        );
        assert_eq!(out.partitions(), 6);
        assert_eq!(
            admin.calls(),
            vec![
                "describe ticks",
                "grow ticks 6",
                "describe ticks",
                "describe ticks"
            ],
            "one change only"
        );
        assert_eq!(admin.topics.lock().unwrap()["ticks"], 6);
    }

    #[tokio::test]
    async fn grow_failure_is_reported() {
        let admin = FakeAdmin {
            fail_grow: true,
            ..FakeAdmin::default()
        };
        admin.topics.lock().unwrap().insert("ticks".into(), 2);
        let err = ensure_topic(&admin, &conn(), "ticks", 6, None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("grow topic ticks: {}", RDKafkaErrorCode::PolicyViolation)
        );
    }

    #[test]
    fn lag_of_a_partition() {
        assert_eq!(partition_lag(0, 100, Some(40)), 60);
        assert_eq!(partition_lag(0, 100, Some(100)), 0);
        assert_eq!(
            partition_lag(10, 100, None),
            90,
            "no commit: from the low watermark"
        );
        assert_eq!(
            partition_lag(50, 100, Some(20)),
            50,
            "commit below retention"
        );
        assert_eq!(partition_lag(0, 0, None), 0);
    }
}

//! The consumer as the lanes see it ([`Partitions`]: commit, pause, resume), and a consumer whose
//! commits give up at a deadline ([`BoundedCommits`], the final commit of a drain).

use std::sync::Arc;
use std::time::Instant;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;

/// What the lanes need from the Kafka consumer; a trait so the rules here are unit-tested without one.
pub(crate) trait Partitions {
    /// Commits `tpl` synchronously.
    fn commit_sync(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    /// Stops fetching `tpl`.
    fn pause(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
    /// Fetches `tpl` again.
    fn resume(&self, tpl: &TopicPartitionList) -> KafkaResult<()>;
}

/// A consumer whose commits give up at `until`: the final commit of a drain must fit in the drain
/// bound, and librdkafka's synchronous commit waits as long as the broker is away (with the broker
/// gone, a worker reported "drain timed out" rather than that its commit failed). The commit runs on a
/// thread of its own that is left to finish, holding the consumer, when the bound passes.
pub(crate) struct BoundedCommits<P> {
    /// The consumer.
    pub(crate) consumer: Arc<P>,
    /// When a commit not yet answered counts as failed.
    pub(crate) until: Instant,
}

impl<P: Partitions + Send + Sync + 'static> Partitions for BoundedCommits<P> {
    fn commit_sync(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode;
        let timed_out = || KafkaError::ConsumerCommit(RDKafkaErrorCode::OperationTimedOut);
        let (tx, rx) = std::sync::mpsc::channel();
        let consumer = self.consumer.clone();
        let tpl = tpl.clone();
        std::thread::Builder::new()
            .name("kafka-commit".into())
            .spawn(move || {
                let result = consumer.commit_sync(&tpl);
                // Let go of the consumer before answering: whoever got the answer may close it next
                // (`Arc::try_unwrap` at shutdown), and a clone still held here would make that fail.
                drop(consumer);
                let _ = tx.send(result);
            })
            .map_err(|_| timed_out())?;
        rx.recv_timeout(self.until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| Err(timed_out()))
    }
    fn pause(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        self.consumer.pause(tpl)
    }
    fn resume(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        self.consumer.resume(tpl)
    }
}

impl<C: ConsumerContext> Partitions for BaseConsumer<C> {
    fn commit_sync(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        self.commit(tpl, CommitMode::Sync)
    }
    fn pause(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::pause(self, tpl)
    }
    fn resume(&self, tpl: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::resume(self, tpl)
    }
}

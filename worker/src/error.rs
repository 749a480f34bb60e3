//! The worker's one error type. Every variant says whether trying again can help
//! ([`Error::is_retriable`]): the lanes retry what can pass and stop — loudly — on what cannot.

use tickfleet_store::StoreError;

/// What can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The dead-letter topic refused the message for good: it does not exist, this worker may not
    /// write it, or the message cannot be made to fit. Retrying the same send cannot help until an
    /// operator fixes the topic.
    #[error("dead-letter topic {topic} is unwritable: {detail}")]
    DeadLetterUnwritable {
        /// The dead-letter topic.
        topic: String,
        /// The producer's error.
        detail: String,
    },
    /// A dead-letter send failed for now (broker unreachable, timed out): worth retrying.
    #[error("dead-letter topic {topic} is unreachable: {detail}")]
    DeadLetterUnavailable {
        /// The dead-letter topic.
        topic: String,
        /// The producer's error.
        detail: String,
    },
    /// The store failed; see [`StoreError::is_retriable`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A partition's lane panicked (a bug): the process stops so the partition's next owner re-reads
    /// what this one had not committed (crash-only).
    #[error("the lane of partition {partition} panicked: {message}")]
    LanePanicked {
        /// Its partition.
        partition: i32,
        /// The panic message.
        message: String,
    },
    /// The worker's own machinery failed (a thread could not be started, the poll thread died).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Whether the same operation may succeed if tried again.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::DeadLetterUnavailable { .. } => true,
            Error::Store(e) => e.is_retriable(),
            Error::DeadLetterUnwritable { .. }
            | Error::Kafka(_)
            | Error::LanePanicked { .. }
            | Error::Internal(_) => false,
        }
    }

    /// A short, stable label for metrics (`tickfleet_worker_dead_letter_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::DeadLetterUnwritable { .. } => "unwritable",
            Error::DeadLetterUnavailable { .. } => "unavailable",
            Error::Store(_) => "store",
            Error::Kafka(_) => "kafka",
            Error::LanePanicked { .. } => "panic",
            Error::Internal(_) => "internal",
        }
    }
}

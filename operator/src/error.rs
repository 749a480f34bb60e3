//! The operator's one error type.

use crate::kafka::KafkaError;

/// Why a reconcile failed. Each variant has a short [`metric_label`](Error::metric_label) for the
/// failures counter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed (transient: retried with backoff).
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// A Kafka operation failed (transient: retried with backoff).
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A Secret the spec refers to could not be read.
    #[error("secret {name}: {reason}")]
    Secret {
        /// Secret name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The spec can't be acted on; reported as `Degraded` and not retried until the spec changes.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

impl Error {
    /// Label value of `tickfleet_operator_reconcile_failures_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Kafka(_) => "kafka",
            Self::Secret { .. } => "secret",
            Self::InvalidSpec(_) => "invalid_spec",
        }
    }
}

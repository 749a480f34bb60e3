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
    /// Every value [`metric_label`](Error::metric_label) returns; the failures counter starts each at
    /// 0, so `rate()` and `increase()` see the first failure of a kind too.
    pub const METRIC_LABELS: [&'static str; 4] = ["kube", "kafka", "secret", "invalid_spec"];

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

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn every_metric_label_is_listed() {
        let errors = [
            Error::Kafka(crate::kafka::KafkaError::Client(
                rdkafka::error::KafkaError::Canceled,
            )),
            Error::Secret {
                name: "s".into(),
                reason: "r".into(),
            },
            Error::InvalidSpec("x".into()),
        ];
        for e in &errors {
            assert!(Error::METRIC_LABELS.contains(&e.metric_label()), "{e}");
        }
        // kube::Error has no cheap constructor here; its label is checked by name
        assert!(Error::METRIC_LABELS.contains(&"kube"));
    }
}

//! librdkafka's log and error callbacks through `tracing`, folded ([`LogFold`]): while a broker
//! is down librdkafka reports the failure from every connection attempt and the consumer returns
//! it from every poll, so each would be a line every ~50 ms. Here every warning- or error-level
//! line of a client counts as one kind of failure ("kafka"): the first is written at once, the
//! following ones at growing intervals (1 s, 2 s, 4 s, … up to 60 s) with how many were folded in
//! (`folded`). Info lines (librdkafka writes few) and debug lines are written as they come.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use tracing::{debug, error, info, warn};

use crate::LogFold;

/// The fold key every Kafka failure of a client shares.
pub const KAFKA_FAILURE: &str = "kafka";

/// For `ClientContext::log`: one librdkafka log line of `client` (e.g. `"worker"`).
pub fn log_line(
    fold: &LogFold,
    client: &str,
    level: RDKafkaLogLevel,
    facility: &str,
    message: &str,
) {
    use RDKafkaLogLevel::{Alert, Critical, Debug, Emerg, Error, Info, Notice, Warning};
    match level {
        Emerg | Alert | Critical | Error => {
            if let Some(folded) = fold.admit(KAFKA_FAILURE) {
                error!(target: "librdkafka", client, facility, folded, "{message}");
            }
        }
        Warning => {
            if let Some(folded) = fold.admit(KAFKA_FAILURE) {
                warn!(target: "librdkafka", client, facility, folded, "{message}");
            }
        }
        Notice | Info => info!(target: "librdkafka", client, facility, "{message}"),
        Debug => debug!(target: "librdkafka", client, facility, "{message}"),
    }
}

/// For `ClientContext::error`, and for an error a poll returns: one failure of `client`.
pub fn failure(fold: &LogFold, client: &str, error: &KafkaError, reason: &str) {
    if let Some(folded) = fold.admit(KAFKA_FAILURE) {
        warn!(target: "librdkafka", client, error = %error, folded, "kafka: {reason}");
    }
}

/// A librdkafka client context that only folds its log lines and errors, for clients that need
/// no other callback (the operator's admin clients, the worker's dead-letter producer). Clients
/// given the same [`LogFold`] share one backoff.
#[derive(Clone, Debug)]
pub struct FoldedLogs {
    fold: std::sync::Arc<LogFold>,
    client: &'static str,
}

impl FoldedLogs {
    /// Logs of `client` (`"operator"`, `"dead-letter producer"`, …) folded by `fold`.
    pub fn new(fold: std::sync::Arc<LogFold>, client: &'static str) -> Self {
        Self { fold, client }
    }
}

impl rdkafka::ClientContext for FoldedLogs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.fold, self.client, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        failure(&self.fold, self.client, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for FoldedLogs {}

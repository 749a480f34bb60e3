//! The Kafka side of a reconcile: the connection (SASL credentials from an offered Secret), the
//! topic and its dead-letter topic (created or grown, never shrunk; Events for what changed), and
//! the consumer group's lag, measured at most once per [`LAG_INTERVAL`] unless autoscaling asks.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tracing::info;

use super::{Context, LAG_INTERVAL, key};
use crate::conditions::Problem;
use crate::crd::TickPipeline;
use crate::desired;
use crate::kafka::{
    KafkaConnection, KafkaError, LagReport, TopicOutcome, dead_letter_topic,
    ensure_dead_letter_topic, ensure_topic,
};
use crate::offer;
use crate::{Error, Result};

async fn secret_values(
    client: &Client,
    tp: &TickPipeline,
    ns: &str,
    name: &str,
    keys: [&str; 2],
) -> Result<[String; 2]> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let err = |reason: String| Error::Secret {
        name: name.to_string(),
        reason,
    };
    let secret = api.get(name).await.map_err(|e| err(e.to_string()))?;
    // the offer is checked on the very object whose data is used
    if let Err(why) = offer::verdict(Some(&secret.metadata), &tp.name_any()) {
        let refused = offer::Refused {
            secret: name.to_string(),
            fields: vec![offer::SASL_FIELD],
            why,
        };
        return Err(err(refused.message(tp)));
    }
    let mut data = secret.data.unwrap_or_default();
    let mut take = |key: &str| {
        let ByteString(bytes) = data
            .remove(key)
            .ok_or_else(|| err(format!("has no key {key}")))?;
        String::from_utf8(bytes).map_err(|_| err(format!("key {key} is not UTF-8")))
    };
    Ok([take(keys[0])?, take(keys[1])?])
}

/// The pipeline's Kafka connection, with SASL credentials read from their Secret, which must be
/// offered to the pipeline ([`crate::offer`]).
pub async fn kafka_connection(
    client: &Client,
    tp: &TickPipeline,
    ns: &str,
) -> Result<KafkaConnection> {
    let mut conn = KafkaConnection::plaintext(tp.spec.kafka.bootstrap_servers.clone());
    if let Some(auth) = &tp.spec.kafka.auth {
        conn.security_protocol = Some(auth.security_protocol.as_str().to_string());
        if let Some(sasl) = &auth.sasl {
            let s = &sasl.credentials_secret;
            conn.sasl_mechanism = Some(sasl.mechanism.as_str().to_string());
            let [user, password] =
                secret_values(client, tp, ns, &s.name, [&s.username_key, &s.password_key]).await?;
            conn.sasl_username = Some(user);
            conn.sasl_password = Some(password);
        }
    }
    Ok(conn)
}

/// What the topic step found: the topic's partitions once Kafka answered (`None` until then).
pub(super) struct Topics {
    /// Partitions the topic has (after creating or growing it).
    pub partitions: Option<i32>,
    /// Whether Kafka answered; the dead-letter topic and the lag are asked for only then (a
    /// second timeout against a broker that just failed would only delay the status).
    pub answered: bool,
}

/// Makes sure the topic has its partitions (create or grow, never shrink) and its dead-letter
/// topic exists; what cannot be done is added to `problems` (and the error to retry with to
/// `deferred`), what was changed is an Event.
pub(super) async fn ensure_topics(
    ctx: &Context,
    tp: &TickPipeline,
    conn: &KafkaConnection,
    problems: &mut Vec<Problem>,
    deferred: &mut Option<Error>,
) -> Topics {
    let spec = &tp.spec;
    let mut known_partitions = None;
    let mut kafka_answered = false;
    match ensure_topic(
        ctx.kafka.as_ref(),
        conn,
        &spec.kafka.topic,
        spec.kafka.partitions,
        spec.kafka.replication_factor,
    )
    .await
    {
        Ok(outcome) => {
            kafka_answered = true;
            known_partitions = Some(outcome.partitions());
            match outcome {
                TopicOutcome::Created { partitions } => {
                    info!(pipeline = %key(tp), topic = %spec.kafka.topic, partitions, "created topic");
                    ctx.events
                        .change(
                            tp,
                            "TopicCreated",
                            "CreateTopic",
                            format!(
                                "created topic {} with {partitions} partitions",
                                spec.kafka.topic
                            ),
                        )
                        .await;
                }
                TopicOutcome::Grown { from, to } => {
                    info!(pipeline = %key(tp), topic = %spec.kafka.topic, from, to, "grew topic");
                    ctx.events
                        .change(
                            tp,
                            "TopicGrown",
                            "GrowTopic",
                            format!(
                                "grew topic {} from {from} to {to} partitions",
                                spec.kafka.topic
                            ),
                        )
                        .await;
                }
                TopicOutcome::CannotShrink { actual, declared } => problems.push(Problem {
                    reason: "PartitionsCannotShrink".into(),
                    message: format!(
                        "topic {} has {actual} partitions, the spec declares {declared}; \
                             Kafka topics are never shrunk, running with {actual}",
                        spec.kafka.topic
                    ),
                    blocks_ready: false,
                }),
                TopicOutcome::Unchanged { .. } => {}
            }
        }
        Err(e) => {
            let message = format!(
                "could not ensure topic {} with {} partitions: {e}",
                spec.kafka.topic, spec.kafka.partitions
            );
            ctx.events
                .warning(
                    tp,
                    "KafkaUnreachable",
                    "EnsureTopic",
                    format!(
                        "{message} (bootstrap servers {})",
                        spec.kafka.bootstrap_servers
                    ),
                )
                .await;
            problems.push(Problem {
                reason: "TopicUnavailable".into(),
                message,
                blocks_ready: true,
            });
            *deferred = Some(e.into());
        }
    }

    // the dead-letter topic the workers write to; without it a malformed message stalls its partition
    if kafka_answered {
        let (topic, partitions) = (&spec.kafka.topic, spec.kafka.partitions);
        let dlq = dead_letter_topic(topic);
        match ensure_dead_letter_topic(
            ctx.kafka.as_ref(),
            conn,
            topic,
            partitions,
            spec.kafka.replication_factor,
        )
        .await
        {
            Ok(Some(partitions)) => {
                info!(pipeline = %key(tp), topic = %dlq, partitions, "created dead-letter topic");
                let message =
                    format!("created dead-letter topic {dlq} with {partitions} partitions");
                ctx.events
                    .change(tp, "TopicCreated", "CreateTopic", message)
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                problems.push(Problem {
                    reason: "DeadLetterTopicUnavailable".into(),
                    message: format!("could not ensure dead-letter topic {dlq}: {e}"),
                    blocks_ready: true,
                });
                deferred.get_or_insert(e.into());
            }
        }
    }

    Topics {
        partitions: known_partitions,
        answered: kafka_answered,
    }
}

/// Measures the lag when it is due (`force`: autoscaling asks at its own interval).
pub(super) async fn measure_lag(
    ctx: &Context,
    tp: &TickPipeline,
    conn: &KafkaConnection,
    force: bool,
) -> Option<Result<LagReport, KafkaError>> {
    if !ctx.lag_due(&key(tp), if force { Duration::ZERO } else { LAG_INTERVAL }) {
        return None;
    }
    let lag = ctx
        .kafka
        .consumer_lag(conn, &tp.spec.kafka.topic, &desired::consumer_group(tp))
        .await;
    if lag.is_err() {
        // not measured: the next reconcile (its own backoff bounds them) tries again rather than
        // leaving LAG empty for an interval (seen on a real broker: a topic created a moment ago
        // is not in the metadata yet)
        ctx.lag_measured.lock().expect("lag lock").remove(&key(tp));
    }
    Some(lag)
}

pub(super) fn lag_problem(e: &KafkaError, keeping: Option<i32>) -> Problem {
    Problem {
        reason: "LagUnavailable".into(),
        message: match keeping {
            Some(n) => format!("could not measure consumer lag, keeping {n} workers: {e}"),
            None => format!("could not measure consumer lag: {e}"),
        },
        blocks_ready: false,
    }
}

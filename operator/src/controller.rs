//! The reconcile loop.
//!
//! One reconcile of a `TickPipeline`:
//! 1. paused (annotation `tickfleet.io/paused: "true"`)? apply nothing; read the Deployments and
//!    the lag and write status (`Paused` says which generation waits to be applied);
//! 2. invalid spec? write `Degraded/InvalidSpec` and wait for the spec to change (no retry loop);
//! 3. check that every Secret the spec names was offered to the pipeline ([`crate::offer`]); a
//!    refused one is reported (`SecretNotOffered`, ...), never read, and keeps the Deployments
//!    that would reference it from being applied;
//! 4. make sure the Kafka topic has its partitions (create or grow, never shrink) and its dead-letter
//!    topic `<topic>.dlq` exists (created like it when missing);
//! 5. measure the group's lag (every pipeline, at most once per [`LAG_INTERVAL`]; with autoscaling
//!    at its poll interval) and, with autoscaling, decide the worker count;
//! 6. server-side apply every child (ConfigMap, worker Deployment, PDB, api Deployment, Service,
//!    one connector Deployment per source) with the field manager `tickfleet-operator` and an
//!    owner reference to the pipeline; delete the connector of a source removed from the spec;
//! 7. server-side apply the status: conditions computed from the Deployments' own status
//!    (see [`conditions::rollout`]), `observedGeneration` (the generation just applied), replicas,
//!    lag, partitions.
//!
//! What it did and what failed is also published as Kubernetes Events ([`crate::events`]).
//! Transient failures (API server, Kafka, Secrets) still write status where they can, then return
//! an error so [`error_policy`] requeues with exponential backoff. On shutdown a reconcile in
//! flight is dropped at its next await point (a Kafka call is not waited for), so the operator
//! stops within seconds whatever Kafka does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::autoscale;
use crate::conditions::{self, Observation, Problem, Rollout};
use crate::crd::{ReplicaStatus, SourceStatus, TickPipeline, TickPipelineStatus};
use crate::desired::{self, FIELD_MANAGER, MANAGED_BY};
use crate::events::Events;
use crate::kafka::{
    KafkaAdmin, KafkaConnection, KafkaError, LagReport, TopicOutcome, dead_letter_topic,
    ensure_dead_letter_topic, ensure_topic,
};
use crate::metrics::Metrics;
use crate::offer;
use crate::{Error, Result};

/// Requeue interval of a pipeline without autoscaling: keeps its lag (the `LAG` column) current
/// and catches drift in Kafka (a topic deleted by hand) that no Kubernetes watch reports. A
/// reconcile triggered sooner (a Deployment's status changed) measures the lag only when the last
/// measurement is older than this, so the cost per pipeline is at most one lag read (a metadata
/// request, one offset fetch and a watermark request per partition, each bounded by the Kafka
/// timeout) per interval.
pub const LAG_INTERVAL: Duration = Duration::from_secs(30);
/// First retry delay after a failure; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Longest retry delay while a Secret the spec names is missing, not offered or unreadable: the
/// operator may not watch Secrets (RBAC grants `get` by name only), so it looks again this often
/// and a Secret created after its pipeline is picked up within seconds, not minutes.
pub const SECRET_RETRY_MAX: Duration = Duration::from_secs(10);

/// What the reconciler needs, shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Kafka topic admin and lag reader.
    pub kafka: Arc<dyn KafkaAdmin>,
    /// Metrics.
    pub metrics: Metrics,
    /// Current time; a parameter so tests can fix it.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// Consecutive failures per pipeline (`namespace/name`), for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// When each pipeline's lag was last measured (`namespace/name`).
    pub lag_measured: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Kubernetes Events.
    pub events: Events,
    /// Cancelled on shutdown: reconciles in flight stop at once.
    pub shutdown: CancellationToken,
}

impl Context {
    /// A context using the system clock; Events name the pod (`POD_NAME`) as reporting instance.
    pub fn new(client: Client, kafka: Arc<dyn KafkaAdmin>, metrics: Metrics) -> Self {
        Self {
            events: Events::new(client.clone(), std::env::var("POD_NAME").ok()),
            client,
            kafka,
            metrics,
            clock: Arc::new(Timestamp::now),
            failures: Mutex::new(HashMap::new()),
            lag_measured: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        }
    }

    /// Reconciles in flight are dropped when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Whether the lag of `key` is due: never measured, or longer ago than `every`. Marks it
    /// measured now when it is.
    fn lag_due(&self, key: &str, every: Duration) -> bool {
        let mut measured = self.lag_measured.lock().expect("lag lock");
        let now = tokio::time::Instant::now();
        if measured
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < every)
        {
            return false;
        }
        measured.insert(key.to_string(), now);
        true
    }
}

/// Delay before retry number `failures` (1 = first retry): 5 s, 10 s, 20 s, ... up to 300 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

fn key(tp: &TickPipeline) -> String {
    format!("{}/{}", tp.namespace().unwrap_or_default(), tp.name_any())
}

/// Reconciles one pipeline (the `Controller`'s reconciler).
pub async fn reconcile(tp: Arc<TickPipeline>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx.metrics.duration.start_timer();
    if tp.metadata.deletion_timestamp.is_some() {
        // being deleted: the garbage collector removes the children (with `--cascade=foreground`
        // it waits for them); applying them again would re-create them and the deletion would
        // never finish (seen on the real cluster)
        ctx.lag_measured.lock().expect("lag lock").remove(&key(&tp));
        return Ok(Action::await_change());
    }
    let result = tokio::select! {
        r = reconcile_inner(&tp, &ctx) => r,
        () = ctx.shutdown.cancelled() => {
            info!(pipeline = %key(&tp), "shutting down: reconcile cancelled");
            return Ok(Action::await_change());
        }
    };
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failures lock")
            .remove(&key(&tp));
    }
    result
}

/// The `Controller`'s error policy: counts the failure and requeues with exponential backoff.
pub fn error_policy(tp: Arc<TickPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(error);
    let n = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let n = failures.entry(key(&tp)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = match error {
        Error::Secret { .. } => backoff(n).min(SECRET_RETRY_MAX),
        _ => backoff(n),
    };
    warn!(pipeline = %key(&tp), error = %error, retry_in_secs = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

async fn write_status(
    ctx: &Context,
    tp: &TickPipeline,
    ns: &str,
    status: &TickPipelineStatus,
) -> Result<()> {
    let api: Api<TickPipeline> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": "tickfleet.io/v1alpha1",
        "kind": "TickPipeline",
        "status": status,
    });
    api.patch_status(
        &tp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

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

/// Reads a Deployment (`None` when it does not exist yet).
async fn get_deployment(client: &Client, ns: &str, name: &str) -> Result<Option<Deployment>> {
    Ok(Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?)
}

fn observe(d: Option<&Deployment>) -> (Rollout, ReplicaStatus) {
    match d {
        Some(d) => conditions::rollout(d),
        None => (
            Rollout::Waiting("the Deployment does not exist yet".into()),
            ReplicaStatus::default(),
        ),
    }
}

/// Deletes a Deployment; one that is already gone is fine.
async fn delete_deployment(client: &Client, ns: &str, name: &str) -> Result<()> {
    match Api::<Deployment>::namespaced(client.clone(), ns)
        .delete(name, &Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A source's status line from its connector Deployment's rollout.
fn source_status(base: SourceStatus, rollout: &Rollout, pods: ReplicaStatus) -> SourceStatus {
    SourceStatus {
        pods,
        message: match rollout {
            Rollout::Complete => "Complete".into(),
            Rollout::Waiting(m) | Rollout::Stalled(m) => m.clone(),
        },
        ..base
    }
}

/// Measures the lag when it is due (`force`: autoscaling asks at its own interval).
async fn measure_lag(
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

fn lag_problem(e: &KafkaError, keeping: Option<i32>) -> Problem {
    Problem {
        reason: "LagUnavailable".into(),
        message: match keeping {
            Some(n) => format!("could not measure consumer lag, keeping {n} workers: {e}"),
            None => format!("could not measure consumer lag: {e}"),
        },
        blocks_ready: false,
    }
}

/// A paused pipeline: nothing is applied and Kafka is not changed, but what runs is reported (the
/// Deployments as they are, the lag), and `Paused` says which generation waits.
async fn reconcile_paused(
    tp: &TickPipeline,
    ctx: &Context,
    ns: &str,
    now: &Time,
) -> Result<Action> {
    let old = tp.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let names = desired::Names::of(tp);
    let worker = get_deployment(&ctx.client, ns, &names.worker).await?;
    let api = get_deployment(&ctx.client, ns, &names.api).await?;
    let (workers_rollout, workers) = observe(worker.as_ref());
    let (api_rollout, api) = observe(api.as_ref());
    // the connectors that were applied (a source added or removed while paused waits too)
    let mut source_obs = Vec::new();
    let mut source_lines = Vec::new();
    for applied in &old.sources {
        let d = get_deployment(&ctx.client, ns, &applied.deployment).await?;
        let (rollout, pods) = observe(d.as_ref());
        source_lines.push(source_status(applied.clone(), &rollout, pods.clone()));
        source_obs.push((applied.name.clone(), rollout, pods));
    }
    let mut problems = Vec::new();
    if let Ok(conn) = kafka_connection(&ctx.client, tp, ns).await {
        match measure_lag(ctx, tp, &conn, false).await {
            Some(Ok(report)) => status.lag = Some(report.total),
            Some(Err(e)) => problems.push(lag_problem(&e, None)),
            None => {}
        }
    }
    let obs = Observation {
        problems,
        workers,
        workers_rollout,
        api,
        api_rollout,
        capped: None,
        sources: source_obs,
    };
    // what runs is observed (Ready, Progressing); the topic and the spec are not looked at while
    // paused, so Degraded and WorkersCapped stay as they were
    let mut wanted: Vec<_> = conditions::wanted(&obs)
        .into_iter()
        .filter(|w| [conditions::READY, conditions::PROGRESSING].contains(&w.type_))
        .collect();
    wanted.push(conditions::paused(
        old.observed_generation,
        tp.metadata.generation,
    ));
    status.conditions = conditions::merge(&old.conditions, &wanted, now, tp.metadata.generation);
    status.workers = obs.workers.clone();
    status.api = obs.api.clone();
    status.sources = source_lines;
    let was_paused = old
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::PAUSED && c.status == "True");
    if !was_paused {
        ctx.events
            .change(
                tp,
                "Paused",
                "Pause",
                format!(
                    "annotation {}=\"true\": the operator applies nothing and leaves the topic alone until it is removed",
                    crate::crd::PAUSED_ANNOTATION
                ),
            )
            .await;
    }
    write_status(ctx, tp, ns, &status).await?;
    ctx.metrics.pipeline(
        ns,
        &tp.name_any(),
        status.lag,
        obs.workers.desired,
        obs.workers.ready,
    );
    // the Deployments are watched; the requeue keeps the lag current
    Ok(Action::requeue(LAG_INTERVAL))
}

async fn reconcile_inner(tp: &TickPipeline, ctx: &Context) -> Result<Action> {
    let Some(ns) = tp.namespace() else {
        // a namespaced kind always has one; nothing can be written without it
        return Err(Error::InvalidSpec(
            "the TickPipeline has no namespace".into(),
        ));
    };
    let name = tp.name_any();
    let now = Time((ctx.clock)());
    let generation = tp.metadata.generation;
    let old = tp.status.clone().unwrap_or_default();
    let mut status = old.clone();

    if tp.paused() {
        info!(pipeline = %key(tp), "paused: leaving children and topic alone");
        return reconcile_paused(tp, ctx, &ns, &now).await;
    }
    let was_paused = old
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::PAUSED && c.status == "True");
    if was_paused {
        ctx.events
            .change(
                tp,
                "Resumed",
                "Resume",
                format!(
                    "annotation {} removed: applying generation {}",
                    crate::crd::PAUSED_ANNOTATION,
                    generation.unwrap_or_default()
                ),
            )
            .await;
    }

    if let Err(message) = desired::validate(tp) {
        warn!(pipeline = %key(tp), %message, "invalid spec");
        ctx.metrics.failure(&Error::InvalidSpec(message.clone()));
        ctx.events
            .warning(tp, "InvalidSpec", "Validate", message.clone())
            .await;
        let problem = Problem {
            reason: "InvalidSpec".into(),
            message,
            blocks_ready: true,
        };
        let obs = Observation {
            problems: vec![problem],
            workers: old.workers.clone(),
            api: old.api.clone(),
            ..Observation::default()
        };
        // nothing was applied: observedGeneration stays at what the children were made from
        status.conditions =
            conditions::merge(&old.conditions, &conditions::wanted(&obs), &now, generation);
        write_status(ctx, tp, &ns, &status).await?;
        // a spec change bumps the generation and triggers the next reconcile
        return Ok(Action::await_change());
    }

    let spec = &tp.spec;
    let mut problems = Vec::new();
    let mut deferred: Option<Error> = None;

    // Secrets: only those offered to this pipeline are read or referenced (crate::offer)
    let offers = offer::check(&ctx.client, tp, &ns).await;
    for refused in &offers.refused {
        let message = refused.message(tp);
        warn!(pipeline = %key(tp), secret = %refused.secret, reason = refused.reason(), "secret refused");
        ctx.events
            .warning(tp, refused.reason(), "ReadSecret", message.clone())
            .await;
        problems.push(Problem {
            reason: refused.reason().into(),
            message: message.clone(),
            blocks_ready: true,
        });
        deferred.get_or_insert(Error::Secret {
            name: refused.secret.clone(),
            reason: message,
        });
    }
    let sasl_refused = spec
        .kafka
        .auth
        .as_ref()
        .and_then(|a| a.sasl.as_ref())
        .is_some_and(|s| !offers.allows(&s.credentials_secret.name));

    // Kafka: topic, then lag (not at all without the credentials: already reported)
    let conn = if sasl_refused {
        None
    } else {
        match kafka_connection(&ctx.client, tp, &ns).await {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(Problem {
                    reason: "KafkaCredentialsUnavailable".into(),
                    message: e.to_string(),
                    blocks_ready: true,
                });
                deferred = Some(e);
                None
            }
        }
    };
    // what the topic has; until Kafka answers, the last known count (or the declared one)
    let mut known_partitions = None;
    let mut kafka_answered = false;
    if let Some(conn) = &conn {
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
                deferred = Some(e.into());
            }
        }
    }

    // the dead-letter topic the workers write to; without it a malformed message stalls its partition
    if let Some(conn) = conn.as_ref().filter(|_| kafka_answered) {
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

    let partitions = known_partitions
        .or(old.partitions)
        .unwrap_or(spec.kafka.partitions);
    let autoscaling = spec.workers.autoscaling.as_ref().filter(|a| a.enabled);
    // lag: measured for every pipeline (the LAG column), when Kafka answered the topic request
    // (a second timeout against a broker that just failed would only delay the status)
    let lag = match &conn {
        Some(conn) if kafka_answered => measure_lag(ctx, tp, conn, autoscaling.is_some()).await,
        _ => None,
    };
    let mut capped = None;
    let mut why = format!("spec.workers.replicas is {}", spec.workers.replicas);
    let requested = match autoscaling {
        None => {
            status.autoscaling = None;
            match lag {
                Some(Ok(report)) => status.lag = Some(report.total),
                Some(Err(e)) => problems.push(lag_problem(&e, None)),
                None => {}
            }
            spec.workers.replicas
        }
        Some(a) => {
            let current = old
                .autoscaling
                .as_ref()
                .map_or(old.workers.desired.max(a.min_replicas), |s| s.desired);
            match lag {
                Some(Ok(report)) => {
                    let history = old
                        .autoscaling
                        .as_ref()
                        .map(|s| s.recommendations.clone())
                        .unwrap_or_default();
                    let decision = autoscale::decide(&autoscale::Input {
                        lag: report.total,
                        spec: a,
                        partitions,
                        current,
                        now: now.0,
                        history: &history,
                    });
                    capped = decision.capped;
                    status.lag = Some(report.total);
                    let desired = decision.status.desired;
                    why = format!(
                        "autoscaling ({}): lag {} with a target of {} per worker",
                        decision.status.reason, report.total, a.target_lag_per_worker
                    );
                    status.autoscaling = Some(decision.status);
                    desired
                }
                Some(Err(e)) => {
                    // keep the last decision: scaling blind is worse than not scaling
                    problems.push(lag_problem(&e, Some(current)));
                    deferred.get_or_insert(e.into());
                    current
                }
                // no connection or no topic: already reported
                None => current,
            }
        }
    };
    if let Some(Problem { message, .. }) = problems.iter().find(|p| p.reason == "LagUnavailable") {
        ctx.events
            .warning(tp, "KafkaUnreachable", "MeasureLag", message.clone())
            .await;
    }
    let (workers, capped_now) = desired::cap_workers(requested, partitions);
    if capped.is_none() && capped_now {
        capped = Some((requested, partitions));
    }
    if capped_now {
        why = format!("{why}, capped at the topic's {partitions} partitions");
    }

    // children, config first so new pods find it
    let children = desired::desired(tp, workers);
    apply(&ctx.client, &ns, &children.config_map).await?;
    // a Deployment whose pods would reference a Secret not offered is not applied (one that
    // exists keeps its last applied spec)
    let worker = match offers.allow_deployment(&children.worker) {
        true => Some(apply(&ctx.client, &ns, &children.worker).await?),
        false => None,
    };
    apply(&ctx.client, &ns, &children.worker_pdb).await?;
    let api = match offers.allow_deployment(&children.api) {
        true => Some(apply(&ctx.client, &ns, &children.api).await?),
        false => None,
    };
    apply(&ctx.client, &ns, &children.api_service).await?;
    // connectors: one Deployment per source (held back like the others when a Secret it needs
    // is not offered)
    let mut applied_sources = Vec::new();
    for (source, d) in spec.sources.iter().zip(&children.sources) {
        let applied = match offers.allow_deployment(d) {
            true => Some(apply(&ctx.client, &ns, d).await?),
            false => None,
        };
        applied_sources.push((source, d.metadata.name.clone().unwrap_or_default(), applied));
    }
    // a source removed from the spec: its connector goes (found by the name status recorded)
    for gone in old.sources.iter().filter(|s| {
        !applied_sources
            .iter()
            .any(|(_, name, _)| *name == s.deployment)
    }) {
        delete_deployment(&ctx.client, &ns, &gone.deployment).await?;
        info!(pipeline = %key(tp), source = %gone.name, deployment = %gone.deployment, "removed source");
        ctx.events
            .change(
                tp,
                "SourceRemoved",
                "DeleteConnector",
                format!(
                    "source {} is no longer in the spec: deleted its connector {}",
                    gone.name, gone.deployment
                ),
            )
            .await;
    }

    // scaled: the worker count applied differs from the one applied before (a Deployment held
    // back for a Secret not offered was not scaled)
    if worker.is_some() && old.observed_generation.is_some() && old.workers.desired != workers {
        info!(pipeline = %key(tp), from = old.workers.desired, to = workers, %why, "scaled workers");
        ctx.events
            .change(
                tp,
                "Scaled",
                "Scale",
                format!(
                    "workers scaled from {} to {workers}: {why}",
                    old.workers.desired
                ),
            )
            .await;
    }

    // a Deployment not applied (a Secret it needs is not offered) keeps what was reported before
    let held = |old: &ReplicaStatus| {
        (
            Rollout::Waiting("not applied: a Secret it needs is not offered".into()),
            old.clone(),
        )
    };
    let (workers_rollout, worker_pods) = worker
        .as_ref()
        .map_or_else(|| held(&old.workers), conditions::rollout);
    let (api_rollout, api_pods) = api
        .as_ref()
        .map_or_else(|| held(&old.api), conditions::rollout);
    let mut source_obs = Vec::new();
    let mut source_lines = Vec::new();
    for (source, deployment, applied) in applied_sources {
        let base = SourceStatus {
            name: source.name().to_string(),
            exchange: source.exchange.as_str().to_string(),
            symbols: i32::try_from(source.symbols.len()).unwrap_or(i32::MAX),
            deployment,
            ..SourceStatus::default()
        };
        let (rollout, pods) = match &applied {
            Some(d) => conditions::rollout(d),
            None => held(
                &old.sources
                    .iter()
                    .find(|s| s.deployment == base.deployment)
                    .map(|s| s.pods.clone())
                    .unwrap_or_default(),
            ),
        };
        source_obs.push((base.name.clone(), rollout.clone(), pods.clone()));
        source_lines.push(source_status(base, &rollout, pods));
    }
    let obs = Observation {
        problems,
        workers: worker_pods,
        workers_rollout,
        api: api_pods,
        api_rollout,
        capped,
        sources: source_obs,
    };
    status.conditions =
        conditions::merge(&old.conditions, &conditions::wanted(&obs), &now, generation);
    // the children now are this generation's
    status.observed_generation = generation;
    status.workers = obs.workers.clone();
    status.api = obs.api.clone();
    status.partitions = known_partitions.or(old.partitions);
    status.sources = source_lines;
    status.selector = Some(desired::worker_selector_string(tp));
    write_status(ctx, tp, &ns, &status).await?;
    ctx.metrics.pipeline(
        &ns,
        &name,
        status.lag,
        obs.workers.desired,
        obs.workers.ready,
    );

    if let Some(e) = deferred {
        return Err(e);
    }
    Ok(Action::requeue(match autoscaling {
        Some(a) => Duration::from_secs(a.poll_interval_seconds.max(5).unsigned_abs()),
        None => LAG_INTERVAL,
    }))
}

/// Runs the controller until `shutdown` resolves: watches TickPipelines everywhere and the
/// children it manages (selected by `app.kubernetes.io/managed-by=tickfleet-operator`, so it does
/// not cache every ConfigMap of the cluster), and reconciles on any change.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(
        Api::<TickPipeline>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<ConfigMap>::all(client.clone()), children.clone())
    .owns(Api::<Deployment>::all(client.clone()), children.clone())
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<PodDisruptionBudget>::all(client), children)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(pipeline = %obj, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "reconcile error"),
        }
    })
    .await;
}

#[cfg(test)]
mod secret_tests;
#[cfg(test)]
mod tests;

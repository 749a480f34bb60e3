//! The reconcile loop.
//!
//! One reconcile of a `TickPipeline`:
//! 1. paused (annotation `tickfleet.io/paused: "true"`)? write only the `Paused` condition;
//! 2. invalid spec? write `Degraded/InvalidSpec` and wait for the spec to change (no retry loop);
//! 3. check that every Secret the spec names was offered to the pipeline ([`crate::offer`]); a
//!    refused one is reported (`SecretNotOffered`, ...), never read, and keeps the Deployments
//!    that would reference it from being applied;
//! 4. make sure the Kafka topic has its partitions (create or grow, never shrink);
//! 5. with autoscaling, measure the group's lag and decide the worker count;
//! 6. server-side apply every child (ConfigMap, worker Deployment, PDB, api Deployment, Service)
//!    with the field manager `tickfleet-operator` and an owner reference to the pipeline;
//! 7. server-side apply the status (conditions, `observedGeneration`, replicas, lag, partitions).
//!
//! Transient failures (API server, Kafka, Secrets) still write status where they can, then return
//! an error so [`error_policy`] requeues with exponential backoff.

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
use tracing::{info, warn};

use crate::autoscale;
use crate::conditions::{self, Observation, Problem};
use crate::crd::{ReplicaStatus, TickPipeline, TickPipelineStatus};
use crate::desired::{self, FIELD_MANAGER, MANAGED_BY};
use crate::kafka::{KafkaAdmin, KafkaConnection, TopicOutcome, ensure_topic};
use crate::metrics::Metrics;
use crate::offer;
use crate::{Error, Result};

/// Requeue interval when nothing needs polling: catches drift in Kafka (a topic deleted by hand)
/// that no Kubernetes watch reports.
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failure; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

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
}

impl Context {
    /// A context using the system clock.
    pub fn new(client: Client, kafka: Arc<dyn KafkaAdmin>, metrics: Metrics) -> Self {
        Self {
            client,
            kafka,
            metrics,
            clock: Arc::new(Timestamp::now),
            failures: Mutex::new(HashMap::new()),
        }
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
    let result = reconcile_inner(&tp, &ctx).await;
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
    let delay = backoff(n);
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

/// Pods of a Deployment as the API server reported them.
pub fn replica_status(d: &Deployment) -> ReplicaStatus {
    let st = d.status.clone().unwrap_or_default();
    ReplicaStatus {
        desired: d.spec.replicas.unwrap_or(1),
        current: st.replicas.unwrap_or(0),
        ready: st.ready_replicas.unwrap_or(0),
    }
}

/// Whether a Deployment is still rolling out: its controller has not seen the newest spec, or not
/// every pod runs the newest template yet, or old pods are still there.
pub fn rolling_out(d: &Deployment) -> bool {
    let desired = d.spec.replicas.unwrap_or(1);
    let Some(st) = &d.status else {
        return desired > 0;
    };
    let updated = st.updated_replicas.unwrap_or(0);
    st.observed_generation < d.metadata.generation
        || updated < desired
        || st.replicas.unwrap_or(0) > updated
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
    status.observed_generation = generation;

    if tp.paused() {
        info!(pipeline = %key(tp), "paused: leaving children and topic alone");
        status.conditions =
            conditions::merge(&old.conditions, &[conditions::paused()], &now, generation);
        write_status(ctx, tp, &ns, &status).await?;
        return Ok(Action::await_change());
    }

    if let Err(message) = desired::validate(tp) {
        warn!(pipeline = %key(tp), %message, "invalid spec");
        ctx.metrics.failure(&Error::InvalidSpec(message.clone()));
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
                known_partitions = Some(outcome.partitions());
                match outcome {
                    TopicOutcome::Created { partitions } => {
                        info!(pipeline = %key(tp), topic = %spec.kafka.topic, partitions, "created topic");
                    }
                    TopicOutcome::Grown { from, to } => {
                        info!(pipeline = %key(tp), topic = %spec.kafka.topic, from, to, "grew topic");
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
                problems.push(Problem {
                    reason: "TopicUnavailable".into(),
                    message: format!(
                        "could not ensure topic {} with {} partitions: {e}",
                        spec.kafka.topic, spec.kafka.partitions
                    ),
                    blocks_ready: true,
                });
                deferred = Some(e.into());
            }
        }
    }

    let partitions = known_partitions
        .or(old.partitions)
        .unwrap_or(spec.kafka.partitions);
    let autoscaling = spec.workers.autoscaling.as_ref().filter(|a| a.enabled);
    let mut capped = None;
    let requested = match autoscaling {
        None => {
            status.autoscaling = None;
            spec.workers.replicas
        }
        Some(a) => {
            let current = old
                .autoscaling
                .as_ref()
                .map_or(old.workers.desired.max(a.min_replicas), |s| s.desired);
            let lag = match &conn {
                Some(conn) => Some(
                    ctx.kafka
                        .consumer_lag(conn, &spec.kafka.topic, &desired::consumer_group(tp))
                        .await,
                ),
                // no connection: already reported as KafkaCredentialsUnavailable
                None => None,
            };
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
                    status.autoscaling = Some(decision.status);
                    desired
                }
                Some(Err(e)) => {
                    // keep the last decision: scaling blind is worse than not scaling
                    problems.push(Problem {
                        reason: "LagUnavailable".into(),
                        message: format!(
                            "could not measure consumer lag, keeping {current} workers: {e}"
                        ),
                        blocks_ready: false,
                    });
                    deferred.get_or_insert(e.into());
                    current
                }
                None => current,
            }
        }
    };
    let (workers, capped_now) = desired::cap_workers(requested, partitions);
    if capped.is_none() && capped_now {
        capped = Some((requested, partitions));
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

    let obs = Observation {
        problems,
        workers: worker
            .as_ref()
            .map_or_else(|| old.workers.clone(), replica_status),
        workers_rolling: worker.as_ref().is_some_and(rolling_out),
        api: api.as_ref().map_or_else(|| old.api.clone(), replica_status),
        api_rolling: api.as_ref().is_some_and(rolling_out),
        capped,
    };
    status.conditions =
        conditions::merge(&old.conditions, &conditions::wanted(&obs), &now, generation);
    status.workers = obs.workers.clone();
    status.api = obs.api.clone();
    status.partitions = known_partitions.or(old.partitions);
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
        None => RESYNC,
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

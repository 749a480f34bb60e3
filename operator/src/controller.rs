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
//!    one connector Deployment per source, the poll connector with `spec.polling`) with the field
//!    manager `tickfleet-operator` and an owner reference to the pipeline; delete the connector of
//!    a source removed from the spec, and the poll connector when `spec.polling` is removed;
//! 7. server-side apply the status: conditions computed from the Deployments' own status
//!    (see [`conditions::rollout`]), `observedGeneration` (the generation just applied), replicas,
//!    lag, partitions.
//!
//! Step 1 is [`paused`], 3 and 4 and the lag of 5 [`topics`], the worker count of 5 [`scale`],
//! 6 and the observation of 7 [`children`]; this module runs them in order and writes the status.
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
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
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

use crate::conditions::{self, Observation, Problem};
use crate::crd::{TickPipeline, TickPipelineStatus};
use crate::desired::{self, FIELD_MANAGER, MANAGED_BY};
use crate::events::Events;
use crate::kafka::KafkaAdmin;
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
        return paused::reconcile_paused(tp, ctx, &ns, &now).await;
    }
    paused::resumed(ctx, tp, &old).await;

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
        match topics::kafka_connection(&ctx.client, tp, &ns).await {
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
    let topic = match &conn {
        Some(conn) => topics::ensure_topics(ctx, tp, conn, &mut problems, &mut deferred).await,
        None => topics::Topics {
            partitions: None,
            answered: false,
        },
    };
    let partitions = topic
        .partitions
        .or(old.partitions)
        .unwrap_or(spec.kafka.partitions);
    let autoscaling = spec.workers.autoscaling.as_ref().filter(|a| a.enabled);
    // lag: measured for every pipeline (the LAG column), when Kafka answered the topic request
    // (a second timeout against a broker that just failed would only delay the status)
    let lag = match &conn {
        Some(conn) if topic.answered => {
            topics::measure_lag(ctx, tp, conn, autoscaling.is_some()).await
        }
        _ => None,
    };
    let workers = scale::worker_count(
        ctx,
        tp,
        autoscaling,
        lag,
        partitions,
        &old,
        &mut status,
        &now,
        &mut problems,
        &mut deferred,
    )
    .await;
    let applied = children::apply_children(ctx, tp, &ns, &offers, &old, workers.count).await?;
    scale::scaled_event(ctx, tp, &old, &workers, applied.worker.is_some()).await;
    let (obs, source_lines, polling_line) =
        children::observe_applied(&applied, &old, problems, workers.capped);
    status.conditions =
        conditions::merge(&old.conditions, &conditions::wanted(&obs), &now, generation);
    // the children now are this generation's
    status.observed_generation = generation;
    status.workers = obs.workers.clone();
    status.api = obs.api.clone();
    status.partitions = topic.partitions.or(old.partitions);
    status.sources = source_lines;
    status.polling = polling_line;
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

mod children;
mod paused;
mod scale;
mod topics;

pub use topics::kafka_connection;

#[cfg(test)]
mod polling_tests;
#[cfg(test)]
mod secret_tests;
#[cfg(test)]
mod tests;

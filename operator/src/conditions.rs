//! Status conditions of a `TickPipeline` and how they change.
//!
//! The operator always reports the same set of condition types, so `kubectl wait
//! --for=condition=Ready` and dashboards find them. A condition's `lastTransitionTime` changes only
//! when its `status` changes (tools such as `kubectl wait` and kapp rely on that); reason, message
//! and `observedGeneration` are refreshed on every write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use k8s_openapi::api::apps::v1::Deployment;

use crate::crd::ReplicaStatus;

/// All pods of the pipeline are ready and nothing blocks it.
pub const READY: &str = "Ready";
/// A Deployment of the pipeline is rolling out.
pub const PROGRESSING: &str = "Progressing";
/// Something needs attention: an invalid spec, a topic that can't be created or grown, Kafka not
/// reachable.
pub const DEGRADED: &str = "Degraded";
/// The pause annotation is set; the operator writes nothing but status.
pub const PAUSED: &str = "Paused";
/// More workers were asked for than the topic has partitions; the extra ones are not run.
pub const WORKERS_CAPPED: &str = "WorkersCapped";

/// A condition the operator wants to report, before timestamps are decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable details.
    pub message: String,
}

impl Wanted {
    fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: if status { "True" } else { "False" },
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// A problem that makes the pipeline `Degraded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason, e.g. `InvalidSpec`, `TopicUnavailable`, `PartitionsCannotShrink`.
    pub reason: String,
    /// What is wrong and what to do.
    pub message: String,
    /// Whether it stops the pipeline from working (and so makes `Ready` false).
    pub blocks_ready: bool,
}

/// Where a Deployment's rollout stands, read from the Deployment's own status the way
/// `kubectl rollout status` reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Rollout {
    /// Every pod runs the current spec and is available.
    #[default]
    Complete,
    /// Still going: the Deployment controller has not seen the newest spec, pods of the current
    /// spec are missing or not yet available, or old pods are still there. The message says which.
    Waiting(String),
    /// The Deployment's `Progressing` condition says `ProgressDeadlineExceeded`: pods are not
    /// coming up (image, scheduling, crash loop). Its message.
    Stalled(String),
}

/// The rollout state and pod counts of a Deployment, from its `status`.
pub fn rollout(d: &Deployment) -> (Rollout, ReplicaStatus) {
    let desired = d.spec.replicas.unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let pods = ReplicaStatus {
        desired,
        current: st.replicas.unwrap_or(0),
        ready: st.ready_replicas.unwrap_or(0),
        updated: st.updated_replicas.unwrap_or(0),
        available: st.available_replicas.unwrap_or(0),
    };
    let stalled = st.conditions.iter().flatten().find(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.status.as_deref() == Some("False")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let state = if d.status.is_none() || st.observed_generation < d.metadata.generation {
        Rollout::Waiting("the Deployment controller has not seen the current spec yet".into())
    } else if let Some(c) = stalled {
        Rollout::Stalled(
            c.message
                .clone()
                .unwrap_or_else(|| "progress deadline exceeded".into()),
        )
    } else if pods.updated < desired {
        Rollout::Waiting(format!(
            "{} of {desired} pods run the current spec",
            pods.updated
        ))
    } else if pods.current > pods.updated {
        Rollout::Waiting(format!(
            "{} old pods still terminating",
            pods.current - pods.updated
        ))
    } else if pods.available < desired {
        Rollout::Waiting(format!("{} of {desired} pods available", pods.available))
    } else {
        Rollout::Complete
    };
    (state, pods)
}

/// What the operator observed in one reconcile, the input of [`wanted`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Problems found, most important first.
    pub problems: Vec<Problem>,
    /// Worker pods.
    pub workers: ReplicaStatus,
    /// The worker Deployment's rollout.
    pub workers_rollout: Rollout,
    /// Api pods.
    pub api: ReplicaStatus,
    /// The api Deployment's rollout.
    pub api_rollout: Rollout,
    /// `(asked, partitions)` when more workers were asked for than partitions exist.
    pub capped: Option<(i32, i32)>,
    /// Each source's connector: `(source name, rollout, pods)`.
    pub sources: Vec<(String, Rollout, ReplicaStatus)>,
    /// The poll connector, with `spec.polling`: its rollout and pods.
    pub polling: Option<(Rollout, ReplicaStatus)>,
}

/// Conditions for a pipeline that is not paused: `Ready` when nothing blocks it and every worker,
/// api and connector pod (source and poll connectors) runs the current spec and is available; `Progressing` while either Deployment
/// rolls out (from the Deployments' own status); `Degraded` with every problem found.
pub fn wanted(obs: &Observation) -> Vec<Wanted> {
    let blocking = obs.problems.iter().find(|p| p.blocks_ready);
    let not_up = |pods: &ReplicaStatus, rollout: &Rollout| {
        pods.available < pods.desired || *rollout != Rollout::Complete
    };
    let ready = if let Some(p) = blocking {
        Wanted::new(READY, false, &p.reason, p.message.clone())
    } else if not_up(&obs.workers, &obs.workers_rollout) {
        Wanted::new(
            READY,
            false,
            "WorkersNotReady",
            format!(
                "{} of {} workers available ({} ready, {} run the current spec)",
                obs.workers.available, obs.workers.desired, obs.workers.ready, obs.workers.updated
            ),
        )
    } else if not_up(&obs.api, &obs.api_rollout) {
        Wanted::new(
            READY,
            false,
            "ApiNotReady",
            format!(
                "{} of {} api pods available ({} ready, {} run the current spec)",
                obs.api.available, obs.api.desired, obs.api.ready, obs.api.updated
            ),
        )
    } else if let Some((name, pods, _)) = obs
        .sources
        .iter()
        .map(|(name, rollout, pods)| (name, pods, rollout))
        .find(|(_, pods, rollout)| not_up(pods, rollout))
    {
        Wanted::new(
            READY,
            false,
            "SourceNotReady",
            format!(
                "source {name}: {} of {} connector pods available (a connector is ready while it \
                 is subscribed to the venue and producing to Kafka)",
                pods.available, pods.desired
            ),
        )
    } else if let Some((_, pods)) = obs
        .polling
        .as_ref()
        .filter(|(rollout, pods)| not_up(pods, rollout))
    {
        Wanted::new(
            READY,
            false,
            "PollingNotReady",
            format!(
                "{} of {} poll connector pods available (a poll connector is ready while it reads \
                 the jobs from Redis and its Kafka deliveries succeed)",
                pods.available, pods.desired
            ),
        )
    } else {
        let mut parts = vec![
            format!("{} workers", obs.workers.available),
            format!("{} api pods", obs.api.available),
        ];
        if !obs.sources.is_empty() {
            parts.push(format!("{} source connectors", obs.sources.len()));
        }
        if let Some((_, pods)) = &obs.polling {
            parts.push(format!("{} poll connector pods", pods.available));
        }
        let last = parts.pop().unwrap_or_default();
        Wanted::new(
            READY,
            true,
            "AllReplicasReady",
            format!("{} and {last} available", parts.join(", ")),
        )
    };
    let rollouts: Vec<(String, &Rollout)> = [
        ("workers".to_string(), &obs.workers_rollout),
        ("api".to_string(), &obs.api_rollout),
    ]
    .into_iter()
    .chain(
        obs.sources
            .iter()
            .map(|(name, rollout, _)| (format!("source {name}"), rollout)),
    )
    .chain(
        obs.polling
            .iter()
            .map(|(rollout, _)| ("polling".to_string(), rollout)),
    )
    .collect();
    let stalled = rollouts.iter().find_map(|(which, r)| match r {
        Rollout::Stalled(m) => Some(format!("{which}: {m}")),
        _ => None,
    });
    let waiting: Vec<String> = rollouts
        .iter()
        .filter_map(|(which, r)| match r {
            Rollout::Waiting(m) => Some(format!("{which}: {m}")),
            _ => None,
        })
        .collect();
    let progressing = if blocking.is_some_and(|p| p.reason == "InvalidSpec") {
        Wanted::new(
            PROGRESSING,
            false,
            "InvalidSpec",
            "waiting for a valid spec",
        )
    } else if let Some(m) = stalled {
        Wanted::new(PROGRESSING, false, "ProgressDeadlineExceeded", m)
    } else if !waiting.is_empty() {
        Wanted::new(PROGRESSING, true, "RollingOut", waiting.join("; "))
    } else {
        Wanted::new(
            PROGRESSING,
            false,
            "RolloutComplete",
            "all pods run the current spec and are available",
        )
    };
    let degraded = match obs.problems.first() {
        Some(first) => Wanted::new(
            DEGRADED,
            true,
            &first.reason,
            obs.problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None => Wanted::new(DEGRADED, false, "AsExpected", "no problems found"),
    };
    let capped = match obs.capped {
        Some((asked, partitions)) => Wanted::new(
            WORKERS_CAPPED,
            true,
            "MoreWorkersThanPartitions",
            format!(
                "{asked} workers asked for but the topic has {partitions} partitions; running {partitions} \
                 (a worker beyond the partition count would have nothing to read)"
            ),
        ),
        None => Wanted::new(
            WORKERS_CAPPED,
            false,
            "WithinPartitions",
            "workers do not exceed partitions",
        ),
    };
    vec![
        ready,
        progressing,
        degraded,
        Wanted::new(PAUSED, false, "NotPaused", "reconciling normally"),
        capped,
    ]
}

/// The `Paused` condition of a paused pipeline. `applied` is the generation the children were
/// last made from (`status.observedGeneration`), `current` the pipeline's generation: when they
/// differ, the message says that the newer spec waits for the pause to end. The other conditions
/// keep describing what runs (the Deployments as they are).
pub fn paused(applied: Option<i64>, current: Option<i64>) -> Wanted {
    let annotation = crate::crd::PAUSED_ANNOTATION;
    let pending = match (applied, current) {
        (Some(a), Some(c)) if a < c => format!(
            "; generation {c} is not applied (children are from generation {a}) and will be \
             when the annotation is removed"
        ),
        (None, Some(c)) => {
            format!("; generation {c} is not applied and will be when the annotation is removed")
        }
        _ => "; nothing is pending".to_string(),
    };
    Wanted::new(
        PAUSED,
        true,
        "PausedByAnnotation",
        format!(
            "annotation {annotation}=\"true\": children and the topic are left as they are{pending}"
        ),
    )
}

/// Merges wanted conditions into the existing ones: a condition keeps its `lastTransitionTime`
/// while its status is unchanged and gets `now` when the status changes or it is new. Existing
/// conditions of other types are kept. Every written condition carries `generation`.
pub fn merge(
    existing: &[Condition],
    wanted: &[Wanted],
    now: &Time,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing.to_vec();
    for w in wanted {
        let last_transition_time = match existing.iter().find(|c| c.type_ == w.type_) {
            Some(old) if old.status == w.status => old.last_transition_time.clone(),
            _ => now.clone(),
        };
        let cond = Condition {
            type_: w.type_.to_string(),
            status: w.status.to_string(),
            reason: w.reason.clone(),
            message: w.message.clone(),
            last_transition_time,
            observed_generation: generation,
        };
        match out.iter_mut().find(|c| c.type_ == w.type_) {
            Some(slot) => *slot = cond,
            None => out.push(cond),
        }
    }
    out
}

#[cfg(test)]
mod tests;

//! Status conditions of a `TickPipeline` and how they change.
//!
//! The operator always reports the same set of condition types, so `kubectl wait
//! --for=condition=Ready` and dashboards find them. A condition's `lastTransitionTime` changes only
//! when its `status` changes (tools such as `kubectl wait` and kapp rely on that); reason, message
//! and `observedGeneration` are refreshed on every write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

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

/// What the operator observed in one reconcile, the input of [`wanted`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Problems found, most important first.
    pub problems: Vec<Problem>,
    /// Worker pods.
    pub workers: ReplicaStatus,
    /// Whether the worker Deployment is rolling out.
    pub workers_rolling: bool,
    /// Api pods.
    pub api: ReplicaStatus,
    /// Whether the api Deployment is rolling out.
    pub api_rolling: bool,
    /// `(asked, partitions)` when more workers were asked for than partitions exist.
    pub capped: Option<(i32, i32)>,
}

/// Conditions for a pipeline that is not paused.
pub fn wanted(obs: &Observation) -> Vec<Wanted> {
    let blocking = obs.problems.iter().find(|p| p.blocks_ready);
    let ready = if let Some(p) = blocking {
        Wanted::new(READY, false, &p.reason, p.message.clone())
    } else if obs.workers.ready < obs.workers.desired {
        Wanted::new(
            READY,
            false,
            "WorkersNotReady",
            format!(
                "{} of {} workers ready",
                obs.workers.ready, obs.workers.desired
            ),
        )
    } else if obs.api.ready < obs.api.desired {
        Wanted::new(
            READY,
            false,
            "ApiNotReady",
            format!("{} of {} api pods ready", obs.api.ready, obs.api.desired),
        )
    } else {
        Wanted::new(
            READY,
            true,
            "AllReplicasReady",
            format!(
                "{} workers and {} api pods ready",
                obs.workers.ready, obs.api.ready
            ),
        )
    };
    let progressing = if blocking.is_some_and(|p| p.reason == "InvalidSpec") {
        Wanted::new(
            PROGRESSING,
            false,
            "InvalidSpec",
            "waiting for a valid spec",
        )
    } else if obs.workers_rolling || obs.api_rolling {
        let which = match (obs.workers_rolling, obs.api_rolling) {
            (true, true) => "workers and api are",
            (true, false) => "workers are",
            _ => "api is",
        };
        Wanted::new(
            PROGRESSING,
            true,
            "RollingOut",
            format!("{which} rolling out"),
        )
    } else {
        Wanted::new(
            PROGRESSING,
            false,
            "RolloutComplete",
            "all pods run the current spec",
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

/// The `Paused` condition of a paused pipeline; the other conditions are kept as they were,
/// since a paused operator looks at nothing.
pub fn paused() -> Wanted {
    Wanted::new(
        PAUSED,
        true,
        "PausedByAnnotation",
        format!(
            "annotation {}=\"true\": children and the topic are left as they are",
            crate::crd::PAUSED_ANNOTATION
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
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn find<'a>(c: &'a [Condition], ty: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == ty).unwrap()
    }

    fn healthy() -> Observation {
        Observation {
            workers: ReplicaStatus {
                desired: 3,
                current: 3,
                ready: 3,
            },
            api: ReplicaStatus {
                desired: 1,
                current: 1,
                ready: 1,
            },
            ..Observation::default()
        }
    }

    #[test]
    fn healthy_pipeline_is_ready_and_stable() {
        let w = wanted(&healthy());
        let types: Vec<_> = w
            .iter()
            .map(|w| (w.type_, w.status, w.reason.as_str()))
            .collect();
        assert_eq!(
            types,
            vec![
                (READY, "True", "AllReplicasReady"),
                (PROGRESSING, "False", "RolloutComplete"),
                (DEGRADED, "False", "AsExpected"),
                (PAUSED, "False", "NotPaused"),
                (WORKERS_CAPPED, "False", "WithinPartitions"),
            ]
        );
    }

    #[test]
    fn missing_workers_make_it_unready_and_rolling_is_progressing() {
        let mut obs = healthy();
        obs.workers.ready = 1;
        obs.workers_rolling = true;
        let w = wanted(&obs);
        assert_eq!(w[0].status, "False");
        assert_eq!(w[0].reason, "WorkersNotReady");
        assert_eq!(w[0].message, "1 of 3 workers ready");
        assert_eq!((w[1].status, w[1].reason.as_str()), ("True", "RollingOut"));
        assert_eq!(w[1].message, "workers are rolling out");
    }

    #[test]
    fn blocking_problem_is_degraded_and_unready() {
        let mut obs = healthy();
        obs.problems.push(Problem {
            reason: "TopicUnavailable".into(),
            message: "creating topic ticks: broker down".into(),
            blocks_ready: true,
        });
        obs.problems.push(Problem {
            reason: "LagUnavailable".into(),
            message: "reading lag: broker down".into(),
            blocks_ready: false,
        });
        let w = wanted(&obs);
        assert_eq!(
            (w[0].status, w[0].reason.as_str()),
            ("False", "TopicUnavailable")
        );
        assert_eq!(
            (w[2].status, w[2].reason.as_str()),
            ("True", "TopicUnavailable")
        );
        assert_eq!(
            w[2].message,
            "creating topic ticks: broker down; reading lag: broker down"
        );
    }

    #[test]
    fn non_blocking_problem_keeps_ready() {
        let mut obs = healthy();
        obs.problems.push(Problem {
            reason: "PartitionsCannotShrink".into(),
            message: "topic has 8 partitions, spec asks for 4; topics are never shrunk".into(),
            blocks_ready: false,
        });
        let w = wanted(&obs);
        assert_eq!(w[0].status, "True");
        assert_eq!(
            (w[2].status, w[2].reason.as_str()),
            ("True", "PartitionsCannotShrink")
        );
    }

    #[test]
    fn capped_workers_are_explained() {
        let mut obs = healthy();
        obs.capped = Some((10, 3));
        let w = wanted(&obs);
        assert_eq!(
            (w[4].status, w[4].reason.as_str()),
            ("True", "MoreWorkersThanPartitions")
        );
        assert!(
            w[4].message
                .starts_with("10 workers asked for but the topic has 3 partitions")
        );
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let first = merge(&[], &wanted(&healthy()), &t(100), Some(1));
        assert!(first.iter().all(|c| c.last_transition_time == t(100)));
        assert!(first.iter().all(|c| c.observed_generation == Some(1)));

        // same statuses, new message and generation: times stay
        let mut obs = healthy();
        obs.workers = ReplicaStatus {
            desired: 4,
            current: 4,
            ready: 4,
        };
        let second = merge(&first, &wanted(&obs), &t(200), Some(2));
        assert_eq!(find(&second, READY).last_transition_time, t(100));
        assert_eq!(
            find(&second, READY).message,
            "4 workers and 1 api pods ready"
        );
        assert_eq!(find(&second, READY).observed_generation, Some(2));

        // Ready flips: its time moves, the others' don't
        obs.workers.ready = 2;
        let third = merge(&second, &wanted(&obs), &t(300), Some(2));
        assert_eq!(find(&third, READY).last_transition_time, t(300));
        assert_eq!(find(&third, READY).status, "False");
        assert_eq!(find(&third, DEGRADED).last_transition_time, t(100));
        assert_eq!(third.len(), 5);
    }

    #[test]
    fn pausing_changes_only_paused() {
        let before = merge(&[], &wanted(&healthy()), &t(100), Some(1));
        let after = merge(&before, &[paused()], &t(500), Some(2));
        assert_eq!(find(&after, PAUSED).status, "True");
        assert_eq!(find(&after, PAUSED).reason, "PausedByAnnotation");
        assert_eq!(find(&after, PAUSED).last_transition_time, t(500));
        assert_eq!(find(&after, READY), find(&before, READY));
        assert_eq!(after.len(), 5);
    }
}

//! How many workers a reconcile applies: `spec.workers.replicas`, or with autoscaling the
//! decision from the measured lag ([`crate::autoscale`]); never more than the topic's partitions.
//! A change of the count applied is a `Scaled` Event saying from, to and why.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tracing::info;

use super::topics::lag_problem;
use super::{Context, key};
use crate::Error;
use crate::autoscale;
use crate::conditions::Problem;
use crate::crd::{AutoscalingSpec, TickPipeline, TickPipelineStatus};
use crate::desired;
use crate::kafka::{KafkaError, LagReport};

/// The worker count to apply, and why.
pub(super) struct Workers {
    /// Workers to apply.
    pub count: i32,
    /// `(requested, partitions)` when more were asked for than the topic has partitions.
    pub capped: Option<(i32, i32)>,
    /// Why this count, for the `Scaled` Event.
    pub why: String,
}

/// Decides the worker count from the spec, or with `autoscaling` from `lag` (`None`: not
/// measured this time). Writes `status.lag` and `status.autoscaling`; a lag that could not be
/// measured is a problem (and, with autoscaling, the error to retry with) and a Warning Event.
#[allow(clippy::too_many_arguments)]
pub(super) async fn worker_count(
    ctx: &Context,
    tp: &TickPipeline,
    autoscaling: Option<&AutoscalingSpec>,
    lag: Option<Result<LagReport, KafkaError>>,
    partitions: i32,
    old: &TickPipelineStatus,
    status: &mut TickPipelineStatus,
    now: &Time,
    problems: &mut Vec<Problem>,
    deferred: &mut Option<Error>,
) -> Workers {
    let spec = &tp.spec;
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

    Workers {
        count: workers,
        capped,
        why,
    }
}

/// A `Scaled` Event when the worker count applied differs from the one applied before (a
/// Deployment held back for a Secret not offered, `applied` false, was not scaled).
pub(super) async fn scaled_event(
    ctx: &Context,
    tp: &TickPipeline,
    old: &TickPipelineStatus,
    workers: &Workers,
    applied: bool,
) {
    let (workers, why) = (workers.count, &workers.why);
    if applied && old.observed_generation.is_some() && old.workers.desired != workers {
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
}

//! A paused pipeline (annotation `tickfleet.io/paused: "true"`): nothing is applied and Kafka is
//! not changed, but what runs is still reported, and the pause and the resume are Events.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};

use super::children::{polling_status, source_status};
use super::topics::{kafka_connection, lag_problem, measure_lag};
use super::{Context, LAG_INTERVAL, write_status};
use crate::Result;
use crate::conditions::{self, Observation, Rollout};
use crate::crd::{ReplicaStatus, TickPipeline, TickPipelineStatus};
use crate::desired;

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

/// A paused pipeline: nothing is applied and Kafka is not changed, but what runs is reported (the
/// Deployments as they are, the lag), and `Paused` says which generation waits.
pub(super) async fn reconcile_paused(
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
    // the poll connector that was applied (one added or removed while paused waits too)
    let mut polling_line = None;
    let mut polling_obs = None;
    if let Some(applied) = &old.polling {
        let d = get_deployment(&ctx.client, ns, &applied.deployment).await?;
        let (rollout, pods) = observe(d.as_ref());
        polling_line = Some(polling_status(&applied.deployment, &rollout, pods.clone()));
        polling_obs = Some((rollout, pods));
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
        polling: polling_obs,
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
    status.polling = polling_line;
    if !was_paused(&old) {
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

/// Whether the last status written said the pipeline was paused.
fn was_paused(old: &TickPipelineStatus) -> bool {
    old.conditions
        .iter()
        .any(|c| c.type_ == conditions::PAUSED && c.status == "True")
}

/// A `Resumed` Event when the last status said paused (the annotation was removed).
pub(super) async fn resumed(ctx: &Context, tp: &TickPipeline, old: &TickPipelineStatus) {
    if !was_paused(old) {
        return;
    }
    ctx.events
        .change(
            tp,
            "Resumed",
            "Resume",
            format!(
                "annotation {} removed: applying generation {}",
                crate::crd::PAUSED_ANNOTATION,
                tp.metadata.generation.unwrap_or_default()
            ),
        )
        .await;
}

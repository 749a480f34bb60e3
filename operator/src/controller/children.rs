//! Applying a pipeline's children and reading back what they report: server-side apply of the
//! ConfigMap, worker Deployment, PDB, api Deployment, Service and one connector Deployment per
//! source and the poll connector (a Deployment whose pods would reference a Secret not offered is
//! held back), deletion of the connector of a source removed from the spec and of the poll
//! connector when `spec.polling` is removed, and the [`Observation`] of the applied Deployments
//! the conditions are computed from.

use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::Api;
use tracing::info;

use super::{Context, apply, key};
use crate::Result;
use crate::conditions::{self, Observation, Problem, Rollout};
use crate::crd::{
    PollingStatus, ReplicaStatus, SourceSpec, SourceStatus, TickPipeline, TickPipelineStatus,
};
use crate::desired;
use crate::offer::Offers;

/// The Deployments as the API server answered their apply; `None`: held back (a Secret its pods
/// would reference is not offered).
pub(super) struct Applied<'a> {
    /// The worker Deployment.
    pub worker: Option<Deployment>,
    /// The api Deployment.
    pub api: Option<Deployment>,
    /// Each source, its connector Deployment's name, and the Deployment.
    pub sources: Vec<(&'a SourceSpec, String, Option<Deployment>)>,
    /// With `spec.polling`: the poll connector Deployment's name, and the Deployment.
    pub polling: Option<(String, Option<Deployment>)>,
}

/// Applies every child of `tp` with `workers` workers (config first, so new pods find it) and
/// deletes the connector of each source `old` lists that the spec no longer has.
pub(super) async fn apply_children<'a>(
    ctx: &Context,
    tp: &'a TickPipeline,
    ns: &str,
    offers: &Offers,
    old: &TickPipelineStatus,
    workers: i32,
) -> Result<Applied<'a>> {
    let spec = &tp.spec;
    let children = desired::desired(tp, workers);
    apply(&ctx.client, ns, &children.config_map).await?;
    // a Deployment whose pods would reference a Secret not offered is not applied (one that
    // exists keeps its last applied spec)
    let worker = match offers.allow_deployment(&children.worker) {
        true => Some(apply(&ctx.client, ns, &children.worker).await?),
        false => None,
    };
    apply(&ctx.client, ns, &children.worker_pdb).await?;
    let api = match offers.allow_deployment(&children.api) {
        true => Some(apply(&ctx.client, ns, &children.api).await?),
        false => None,
    };
    apply(&ctx.client, ns, &children.api_service).await?;
    // connectors: one Deployment per source (held back like the others when a Secret it needs
    // is not offered)
    let mut applied_sources = Vec::new();
    for (source, d) in spec.sources.iter().zip(&children.sources) {
        let applied = match offers.allow_deployment(d) {
            true => Some(apply(&ctx.client, ns, d).await?),
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
        delete_deployment(&ctx.client, ns, &gone.deployment).await?;
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
    // the poll connector (held back the same way: its pods would reference an API key's Secret)
    let polling = match &children.polling {
        Some(d) => Some((
            d.metadata.name.clone().unwrap_or_default(),
            match offers.allow_deployment(d) {
                true => Some(apply(&ctx.client, ns, d).await?),
                false => None,
            },
        )),
        None => None,
    };
    // `spec.polling` removed: its Deployment goes (found by the name status recorded); the jobs
    // stay in Redis for a poll connector deployed again
    if let Some(gone) = old.polling.as_ref().filter(|p| {
        polling
            .as_ref()
            .is_none_or(|(name, _)| *name != p.deployment)
    }) {
        delete_deployment(&ctx.client, ns, &gone.deployment).await?;
        info!(pipeline = %key(tp), deployment = %gone.deployment, "removed the poll connector");
        ctx.events
            .change(
                tp,
                "PollingRemoved",
                "DeletePollConnector",
                format!(
                    "spec.polling is no longer set: deleted the poll connector {} (the jobs stay \
                     in Redis)",
                    gone.deployment
                ),
            )
            .await;
    }

    Ok(Applied {
        worker,
        api,
        sources: applied_sources,
        polling,
    })
}

/// What the applied Deployments report, with `problems` and `capped`, the status line of each
/// source and the poll connector's. A Deployment held back keeps what `old` reported of it.
pub(super) fn observe_applied(
    applied: &Applied<'_>,
    old: &TickPipelineStatus,
    problems: Vec<Problem>,
    capped: Option<(i32, i32)>,
) -> (Observation, Vec<SourceStatus>, Option<PollingStatus>) {
    // a Deployment not applied (a Secret it needs is not offered) keeps what was reported before
    let held = |old: &ReplicaStatus| {
        (
            Rollout::Waiting("not applied: a Secret it needs is not offered".into()),
            old.clone(),
        )
    };
    let (workers_rollout, worker_pods) = applied
        .worker
        .as_ref()
        .map_or_else(|| held(&old.workers), conditions::rollout);
    let (api_rollout, api_pods) = applied
        .api
        .as_ref()
        .map_or_else(|| held(&old.api), conditions::rollout);
    let mut source_obs = Vec::new();
    let mut source_lines = Vec::new();
    for (source, deployment, d) in &applied.sources {
        let base = SourceStatus {
            name: source.name().to_string(),
            exchange: source.exchange.as_str().to_string(),
            symbols: i32::try_from(source.symbols.len()).unwrap_or(i32::MAX),
            deployment: deployment.clone(),
            ..SourceStatus::default()
        };
        let (rollout, pods) = match d {
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
    let mut polling_line = None;
    let polling_obs = applied.polling.as_ref().map(|(deployment, d)| {
        let (rollout, pods) = match d {
            Some(d) => conditions::rollout(d),
            None => held(
                &old.polling
                    .as_ref()
                    .filter(|p| p.deployment == *deployment)
                    .map(|p| p.pods.clone())
                    .unwrap_or_default(),
            ),
        };
        polling_line = Some(polling_status(deployment, &rollout, pods.clone()));
        (rollout, pods)
    });
    let obs = Observation {
        problems,
        workers: worker_pods,
        workers_rollout,
        api: api_pods,
        api_rollout,
        capped,
        sources: source_obs,
        polling: polling_obs,
    };
    (obs, source_lines, polling_line)
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

/// The poll connector's status line from its Deployment's rollout.
pub(super) fn polling_status(
    deployment: &str,
    rollout: &Rollout,
    pods: ReplicaStatus,
) -> PollingStatus {
    PollingStatus {
        deployment: deployment.to_string(),
        pods,
        message: rollout_message(rollout),
    }
}

fn rollout_message(rollout: &Rollout) -> String {
    match rollout {
        Rollout::Complete => "Complete".into(),
        Rollout::Waiting(m) | Rollout::Stalled(m) => m.clone(),
    }
}

/// A source's status line from its connector Deployment's rollout.
pub(super) fn source_status(
    base: SourceStatus,
    rollout: &Rollout,
    pods: ReplicaStatus,
) -> SourceStatus {
    SourceStatus {
        pods,
        message: rollout_message(rollout),
        ..base
    }
}

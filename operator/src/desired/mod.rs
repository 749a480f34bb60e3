//! Pure functions from a [`TickPipeline`] to the objects it should have.
//!
//! Nothing here talks to Kubernetes or Kafka, so every rule (names, labels, env vars, probes,
//! security settings, owner references, the config hash) is unit-tested directly. The controller
//! applies what these functions return with server-side apply.
//!
//! By concern: [`validate`] (what the CRD schema may not have caught), `config` (the ConfigMap,
//! the consumer group and the config hash), `secrets` (Secret references: env vars and mounted
//! files), `pod` (the pod template every component shares), `workloads` (the Deployments, the
//! Service and the PodDisruptionBudget), `polling` (the poll connector's Deployment); this module
//! holds names, labels and [`desired`], which puts them together.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::TickPipeline;

mod config;
mod pod;
mod polling;
mod secrets;
#[cfg(test)]
mod testing;
mod validate;
mod workloads;

pub use config::{config_data, config_hash, config_map, consumer_group};
pub use polling::poll_deployment;
pub use secrets::{
    GRPC_TLS_DIR, REDIS_CA_DIR, REDIS_CLIENT_TLS_DIR, SECRET_FILE_MODE, SecretMount, secret_env,
    secret_mounts,
};
pub use validate::validate;
pub use workloads::{
    api_deployment, api_service, cap_workers, source_deployment, worker_deployment, worker_pdb,
};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "tickfleet-operator";
/// Pod template annotation holding a hash of the pipeline config, so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "tickfleet.io/config-hash";
/// Label value of `app.kubernetes.io/managed-by` on every child; the operator watches only these.
pub const MANAGED_BY: &str = "tickfleet-operator";
/// Port of the worker's admin server (`/healthz`, `/readyz`, `/metrics`).
pub const WORKER_ADMIN_PORT: i32 = 9090;
/// Port of the api's admin server.
pub const API_ADMIN_PORT: i32 = 9091;
/// Port of a connector's admin server.
pub const CONNECTOR_ADMIN_PORT: i32 = 9092;
/// Pod label naming the source a connector pod reads (part of its Deployment's selector, so the
/// connector Deployments of one pipeline never select each other's pods).
pub const SOURCE_LABEL: &str = "tickfleet.io/source";
/// Component of the poll connector (`tickfleet-connector poll`, from `spec.polling`): a component
/// of its own, so its Deployment's selector never matches the source connectors' pods.
pub const POLL_COMPONENT: &str = "poller";
/// User and group the tickfleet image runs as.
pub const IMAGE_UID: i64 = 65532;
/// Seconds a worker pod gets beyond its drain bound before it is killed, so a drain that uses its
/// whole budget still finishes its final flush and commit.
pub const GRACE_MARGIN_SECONDS: i64 = 15;
/// Longest pipeline name: the longest child name (`<name>-config`) must stay a 63-character DNS label.
pub const MAX_NAME_LEN: usize = 56;

/// Names of a pipeline's children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// ConfigMap with the pipeline config.
    pub config: String,
    /// Worker Deployment and its PodDisruptionBudget.
    pub worker: String,
    /// Api Deployment and Service.
    pub api: String,
}

impl Names {
    /// Children names derived from the pipeline name.
    pub fn of(tp: &TickPipeline) -> Self {
        let name = tp.name_any();
        Self {
            config: format!("{name}-config"),
            worker: format!("{name}-worker"),
            api: format!("{name}-api"),
        }
    }

    /// The connector Deployment of the source named `source`.
    pub fn source(tp: &TickPipeline, source: &str) -> String {
        format!("{}-source-{source}", tp.name_any())
    }

    /// The poll connector Deployment.
    pub fn poll(tp: &TickPipeline) -> String {
        format!("{}-poll", tp.name_any())
    }
}

/// Labels shared by every child of a pipeline.
pub fn common_labels(tp: &TickPipeline) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tickfleet".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), tp.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ])
}

/// Labels selecting the pods of one component (`worker` or `api`).
pub fn selector_labels(tp: &TickPipeline, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tickfleet".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), tp.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
    ])
}

/// The worker selector as a label-selector string, published in status for the `scale` subresource.
pub fn worker_selector_string(tp: &TickPipeline) -> String {
    selector_labels(tp, "worker")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn component_labels(tp: &TickPipeline, component: &str) -> BTreeMap<String, String> {
    let mut labels = common_labels(tp);
    labels.insert(
        "app.kubernetes.io/component".to_string(),
        component.to_string(),
    );
    labels
}

/// Owner reference making the pipeline the controller of a child, so deleting the pipeline
/// garbage-collects its children and `Controller::owns` maps child events back to it. `None` when
/// the pipeline has no uid (not yet stored). `blockOwnerDeletion: true`, so a foreground deletion
/// of the pipeline (`kubectl delete --cascade=foreground`) ends only once its children are gone;
/// under the OwnerReferencesPermissionEnforcement admission plugin that needs `update` on
/// `tickpipelines/finalizers`, which the operator's RBAC grants.
pub fn owner_reference(tp: &TickPipeline) -> Option<OwnerReference> {
    tp.controller_owner_ref(&()).map(|mut owner| {
        // `kubectl delete --cascade=foreground` (and the garbage collector's foreground
        // deletion) waits for children that block their owner's deletion
        owner.block_owner_deletion = Some(true);
        owner
    })
}

fn child_meta(tp: &TickPipeline, name: &str, component: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: tp.namespace(),
        labels: Some(match component {
            Some(c) => component_labels(tp, c),
            None => common_labels(tp),
        }),
        owner_references: owner_reference(tp).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Every child of a pipeline, in the order the controller applies them (config first, so pods
/// that start find it).
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// Pipeline config.
    pub config_map: ConfigMap,
    /// Workers.
    pub worker: Deployment,
    /// Worker disruption budget.
    pub worker_pdb: PodDisruptionBudget,
    /// Query api.
    pub api: Deployment,
    /// Query api Service.
    pub api_service: Service,
    /// One connector Deployment per source, in spec order.
    pub sources: Vec<Deployment>,
    /// The poll connector, when `spec.polling` is set.
    pub polling: Option<Deployment>,
}

/// All children of `tp` with `worker_replicas` workers (the caller caps it at the partitions).
pub fn desired(tp: &TickPipeline, worker_replicas: i32) -> Children {
    let data = config_data(tp);
    Children {
        config_map: config_map(tp),
        worker: worker_deployment(tp, worker_replicas, &config_hash(tp, "worker", &data)),
        worker_pdb: worker_pdb(tp),
        api: api_deployment(tp, &config_hash(tp, "api", &data)),
        api_service: api_service(tp),
        sources: tp
            .spec
            .sources
            .iter()
            .map(|s| source_deployment(tp, s, &config_hash(tp, "connector", &data)))
            .collect(),
        polling: tp
            .spec
            .polling
            .as_ref()
            .map(|p| poll_deployment(tp, p, &config_hash(tp, POLL_COMPONENT, &data))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pipeline;

    #[test]
    fn every_child_is_owned_by_the_pipeline() {
        let tp = pipeline();
        let c = desired(&tp, 2);
        let owners = [
            c.config_map.metadata.owner_references,
            c.worker.metadata.owner_references,
            c.worker_pdb.metadata.owner_references,
            c.api.metadata.owner_references,
            c.api_service.metadata.owner_references,
        ];
        assert!(c.sources.is_empty(), "no sources, no connectors");
        assert!(c.polling.is_none(), "no polling, no poll connector");
        for o in owners {
            let o = o.expect("owner reference");
            assert_eq!(o.len(), 1);
            assert_eq!(o[0].kind, "TickPipeline");
            assert_eq!(o[0].api_version, "tickfleet.io/v1alpha1");
            assert_eq!(o[0].name, "btc");
            assert_eq!(o[0].uid, "6b0e4a57-0d0c-4b37-9c2f-6a51d6e1f0aa");
            assert_eq!(o[0].controller, Some(true));
            // a foreground deletion of the pipeline waits for its children
            assert_eq!(o[0].block_owner_deletion, Some(true));
        }
    }
}

//! The workloads of a pipeline: the worker Deployment (capped at the topic's partitions) and its
//! PodDisruptionBudget, the api Deployment and its Service.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerPort, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{ComponentPod, component_deployment, plain_env};
use super::{
    API_ADMIN_PORT, GRACE_MARGIN_SECONDS, Names, WORKER_ADMIN_PORT, child_meta, selector_labels,
};
use crate::crd::TickPipeline;

/// Worker count to run for a wish of `requested`: never more than the topic's partitions, since a
/// worker beyond that would own no partition. Returns the count and whether it was capped.
pub fn cap_workers(requested: i32, partitions: i32) -> (i32, bool) {
    let requested = requested.max(0);
    if requested > partitions {
        (partitions.max(0), true)
    } else {
        (requested, false)
    }
}

/// The worker Deployment running `replicas` workers (already capped at the partition count).
pub fn worker_deployment(tp: &TickPipeline, replicas: i32, hash: &str) -> Deployment {
    let workers = &tp.spec.workers;
    component_deployment(
        tp,
        &Names::of(tp).worker,
        hash,
        ComponentPod {
            component: "worker",
            binary: "tickfleet-worker",
            admin_port: WORKER_ADMIN_PORT,
            extra_ports: vec![],
            extra_env: vec![],
            resources: workers.resources.clone(),
            grace_seconds: i64::from(workers.drain_timeout_seconds) + GRACE_MARGIN_SECONDS,
            replicas,
        },
    )
}

/// The api Deployment.
pub fn api_deployment(tp: &TickPipeline, hash: &str) -> Deployment {
    let api = &tp.spec.api;
    component_deployment(
        tp,
        &Names::of(tp).api,
        hash,
        ComponentPod {
            component: "api",
            binary: "tickfleet-api",
            admin_port: API_ADMIN_PORT,
            extra_ports: vec![ContainerPort {
                name: Some("grpc".to_string()),
                container_port: api.port,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            }],
            extra_env: vec![plain_env(
                "TICKFLEET_GRPC_ADDR",
                format!("0.0.0.0:{}", api.port),
            )],
            resources: api.resources.clone(),
            grace_seconds: 30,
            replicas: api.replicas,
        },
    )
}

/// The api Service (gRPC).
pub fn api_service(tp: &TickPipeline) -> Service {
    let api = &tp.spec.api;
    Service {
        metadata: child_meta(tp, &Names::of(tp).api, Some("api")),
        spec: Some(ServiceSpec {
            type_: Some(api.service_type.as_str().to_string()),
            selector: Some(selector_labels(tp, "api")),
            ports: Some(vec![ServicePort {
                name: Some("grpc".to_string()),
                port: api.port,
                target_port: Some(IntOrString::String("grpc".to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// PodDisruptionBudget letting voluntary disruptions (node drains) take one worker at a time, so
/// partitions move to the remaining workers gradually. `maxUnavailable` rather than `minAvailable`
/// so a single-worker pipeline does not block node drains forever.
pub fn worker_pdb(tp: &TickPipeline) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(tp, &Names::of(tp).worker, Some("worker")),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(tp, "worker")),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::testing::env_of;
    use crate::desired::{config_data, worker_selector_string};
    use crate::fixtures::pipeline;

    #[test]
    fn drain_timeout_sets_grace_period() {
        let mut tp = pipeline();
        tp.spec.workers.drain_timeout_seconds = 120;
        let d = worker_deployment(&tp, 1, "h");
        let pod = d.spec.template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(135));
        assert_eq!(config_data(&tp)["TICKFLEET_DRAIN_TIMEOUT_SECS"], "120");
    }

    #[test]
    fn api_deployment_and_service_expose_grpc() {
        let mut tp = pipeline();
        tp.spec.api.port = 6000;
        tp.spec.api.replicas = 2;
        tp.spec.api.service_type = crate::crd::ServiceType::LoadBalancer;
        let d = api_deployment(&tp, "h");
        assert_eq!(d.metadata.name.as_deref(), Some("btc-api"));
        let spec = &d.spec;
        assert_eq!(spec.replicas, Some(2));
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            c.command.as_ref().unwrap()[0],
            "/usr/local/bin/tickfleet-api"
        );
        let ports: Vec<_> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, vec![("admin".into(), 9091), ("grpc".into(), 6000)]);
        let env = env_of(&d);
        assert!(env.contains(&plain_env("TICKFLEET_GRPC_ADDR", "0.0.0.0:6000".into())));
        assert!(env.contains(&plain_env("TICKFLEET_ADMIN_ADDR", "0.0.0.0:9091".into())));
        let svc = api_service(&tp);
        let s = svc.spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(s.ports.as_ref().unwrap()[0].port, 6000);
        assert_eq!(s.selector.unwrap(), selector_labels(&tp, "api"));
    }

    #[test]
    fn pdb_selects_workers_one_at_a_time() {
        let tp = pipeline();
        let pdb = worker_pdb(&tp);
        let s = pdb.spec.unwrap();
        assert_eq!(s.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            s.selector.unwrap().match_labels.unwrap(),
            selector_labels(&tp, "worker")
        );
        assert_eq!(
            worker_selector_string(&tp),
            "app.kubernetes.io/component=worker,app.kubernetes.io/instance=btc,app.kubernetes.io/name=tickfleet"
        );
    }

    #[test]
    fn workers_never_exceed_partitions() {
        assert_eq!(cap_workers(3, 6), (3, false));
        assert_eq!(cap_workers(6, 6), (6, false));
        assert_eq!(cap_workers(10, 6), (6, true));
        assert_eq!(cap_workers(0, 6), (0, false));
        assert_eq!(cap_workers(-1, 6), (0, false));
    }
}

//! The pod template every component (worker, api, source and poll connectors) shares: a locked-down container that reads the
//! pipeline config, HTTP probes on the admin port, a writable `/tmp`, and rolling updates that
//! never take a pod away before its replacement is ready.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CONFIG_HASH_ANNOTATION, IMAGE_UID, Names, SOURCE_LABEL, child_meta, component_labels,
    secret_env, secret_mounts, selector_labels,
};
use crate::crd::TickPipeline;

pub(super) fn plain_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, initial_delay: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("admin".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        initial_delay_seconds: Some(initial_delay),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(IMAGE_UID),
        run_as_group: Some(IMAGE_UID),
        fs_group: Some(IMAGE_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

fn tmp_volume() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        VolumeMount {
            name: "tmp".to_string(),
            mount_path: "/tmp".to_string(),
            ..VolumeMount::default()
        },
    )
}

fn rolling_no_unavailable() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".to_string()),
        rolling_update: Some(RollingUpdateDeployment {
            max_unavailable: Some(IntOrString::Int(0)),
            max_surge: Some(IntOrString::Int(1)),
        }),
    }
}

fn pod_annotations(hash: &str, admin_port: i32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_string(), hash.to_string()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), admin_port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ])
}

/// What differs between the worker's pods, the api's and a connector's.
pub(super) struct ComponentPod<'a> {
    pub(super) component: &'a str,
    /// The source a connector reads ([`SOURCE_LABEL`] on its pods and in its selector).
    pub(super) source: Option<&'a str>,
    pub(super) binary: &'a str,
    /// Arguments of the binary (a subcommand); none when empty.
    pub(super) args: Vec<String>,
    pub(super) admin_port: i32,
    pub(super) extra_ports: Vec<ContainerPort>,
    pub(super) extra_env: Vec<EnvVar>,
    pub(super) resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    pub(super) grace_seconds: i64,
    pub(super) replicas: i32,
}

pub(super) fn component_deployment(
    tp: &TickPipeline,
    name: &str,
    hash: &str,
    c: ComponentPod<'_>,
) -> Deployment {
    let names = Names::of(tp);
    let (volume, mount) = tmp_volume();
    let mut volumes = vec![volume];
    let mut mounts = vec![mount];
    let mut env = vec![plain_env(
        "TICKFLEET_ADMIN_ADDR",
        format!("0.0.0.0:{}", c.admin_port),
    )];
    env.extend(c.extra_env);
    env.extend(secret_env(tp, c.component));
    for m in secret_mounts(tp, c.component) {
        volumes.push(m.volume);
        mounts.push(m.mount);
        env.extend(m.env);
    }
    let mut ports = vec![ContainerPort {
        name: Some("admin".to_string()),
        container_port: c.admin_port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }];
    ports.extend(c.extra_ports);
    let container = Container {
        name: c.component.to_string(),
        image: Some(tp.spec.image.clone()),
        image_pull_policy: tp.spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![format!("/usr/local/bin/{}", c.binary)]),
        args: (!c.args.is_empty()).then_some(c.args),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: names.config.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(env),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 10)),
        resources: c.resources,
        security_context: Some(container_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut selector = selector_labels(tp, c.component);
    if let Some(source) = c.source {
        selector.insert(SOURCE_LABEL.to_string(), source.to_string());
    }
    let mut pod_labels = component_labels(tp, c.component);
    pod_labels.extend(selector.clone());
    let mut metadata = child_meta(tp, name, Some(c.component));
    if let Some(source) = c.source {
        metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(SOURCE_LABEL.to_string(), source.to_string());
    }
    Deployment {
        metadata,
        spec: DeploymentSpec {
            replicas: Some(c.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(rolling_no_unavailable()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations(hash, c.admin_port)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(c.grace_seconds),
                    security_context: Some(pod_security_context()),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::testing::{env_of, pod_labels_of};
    use crate::desired::worker_deployment;
    use crate::fixtures::pipeline;

    #[test]
    fn worker_deployment_rolls_safely_and_runs_locked_down() {
        let tp = pipeline();
        let d = worker_deployment(&tp, 3, "abc");
        let spec = &d.spec;
        assert_eq!(spec.replicas, Some(3));
        let ru = spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        let pod = spec.template.spec.as_ref().unwrap();
        // drain bound 30 s, so the kubelet must wait longer than that
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        assert!(pod.termination_grace_period_seconds.unwrap() > 30);
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        let c = &pod.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap()[0],
            "/usr/local/bin/tickfleet-worker"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("admin"), 9090)
        );
        let ann = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "9090");
        assert_eq!(ann[CONFIG_HASH_ANNOTATION], "abc");
        let env = env_of(&d);
        assert!(env.contains(&plain_env("TICKFLEET_ADMIN_ADDR", "0.0.0.0:9090".into())));
        // selector labels are on the pods, or the Deployment would be rejected
        let sel = spec.selector.match_labels.as_ref().unwrap();
        let labels = pod_labels_of(&d);
        for (k, v) in sel {
            assert_eq!(labels.get(k), Some(v));
        }
    }
}

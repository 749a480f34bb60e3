//! Pure functions from a [`TickPipeline`] to the objects it should have.
//!
//! Nothing here talks to Kubernetes or Kafka, so every rule (names, labels, env vars, probes,
//! security settings, owner references, the config hash) is unit-tested directly. The controller
//! applies what these functions return with server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::{SecurityProtocol, TickPipeline};

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
/// User and group the tickfleet image runs as.
pub const IMAGE_UID: i64 = 65532;
/// Seconds a worker pod gets beyond its drain bound before it is killed, so a drain that uses its
/// whole budget still finishes its final flush and commit.
pub const GRACE_MARGIN_SECONDS: i64 = 15;
/// Longest pipeline name: the longest child name (`<name>-config`) must stay a 63-character DNS label.
pub const MAX_NAME_LEN: usize = 56;
/// Directory of the api's gRPC certificate (`tls.crt`) and key (`tls.key`), from `spec.api.tls`.
pub const GRPC_TLS_DIR: &str = "/etc/tickfleet/grpc-tls";
/// Directory of the Redis CA (`ca.crt`), from `spec.store.redis.tls.caSecretRef`.
pub const REDIS_CA_DIR: &str = "/etc/tickfleet/redis-ca";
/// Directory of the Redis client certificate (`tls.crt`) and key (`tls.key`), from
/// `spec.store.redis.tls.clientCertSecretName`.
pub const REDIS_CLIENT_TLS_DIR: &str = "/etc/tickfleet/redis-client-tls";
/// Mode of files mounted from Secrets: readable by their owner (root) and the pod's `fsGroup` (the
/// image's group, which the containers run as), by no one else.
pub const SECRET_FILE_MODE: i32 = 0o440;

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
}

/// Checks what the CRD schema may not have caught (objects stored under an older schema, rules the
/// API server only checks when its CEL support is on). Returns a message a user can act on.
pub fn validate(tp: &TickPipeline) -> Result<(), String> {
    let mut problems = Vec::new();
    let spec = &tp.spec;
    let name = tp.name_any();
    if name.len() > MAX_NAME_LEN {
        problems.push(format!(
            "metadata.name must be at most {MAX_NAME_LEN} characters"
        ));
    }
    if tp.namespace().is_none() {
        problems.push("the TickPipeline has no namespace".to_string());
    }
    if spec.image.trim().is_empty() {
        problems.push("image must not be empty".to_string());
    }
    if spec.kafka.bootstrap_servers.trim().is_empty() {
        problems.push("kafka.bootstrapServers must not be empty".to_string());
    }
    if spec.kafka.topic.is_empty() {
        problems.push("kafka.topic must not be empty".to_string());
    }
    if spec.kafka.partitions < 1 {
        problems.push("kafka.partitions must be at least 1".to_string());
    }
    if let Some(auth) = &spec.kafka.auth {
        let sasl_protocol = matches!(
            auth.security_protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        if sasl_protocol != auth.sasl.is_some() {
            problems.push(
                "kafka.auth.sasl must be set exactly when securityProtocol is SASL_PLAINTEXT or SASL_SSL".to_string(),
            );
        }
    }
    let redis = &spec.store.redis;
    match (&redis.url, &redis.url_secret_ref) {
        (Some(url), None) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                problems.push("store.redis.url must start with redis:// or rediss://".to_string());
            }
        }
        (None, Some(_)) => {}
        _ => problems
            .push("set exactly one of store.redis.url and store.redis.urlSecretRef".to_string()),
    }
    if let Some(tls) = &redis.tls {
        if redis
            .url
            .as_ref()
            .is_some_and(|u| !u.starts_with("rediss://"))
        {
            problems.push("store.redis.tls needs a rediss:// url".to_string());
        }
        match (&tls.ca_secret_ref, &tls.client_cert_secret_name) {
            (None, None) => problems
                .push("store.redis.tls needs caSecretRef or clientCertSecretName".to_string()),
            (ca, client) => {
                if ca
                    .as_ref()
                    .is_some_and(|r| r.name.is_empty() || r.key.is_empty())
                {
                    problems.push("store.redis.tls.caSecretRef needs a name and a key".to_string());
                }
                if client.as_ref().is_some_and(|n| n.is_empty()) {
                    problems
                        .push("store.redis.tls.clientCertSecretName must not be empty".to_string());
                }
            }
        }
    }
    if spec.workers.replicas < 0 {
        problems.push("workers.replicas must not be negative".to_string());
    }
    if spec.workers.drain_timeout_seconds < 1 {
        problems.push("workers.drainTimeoutSeconds must be at least 1".to_string());
    }
    if let Some(a) = &spec.workers.autoscaling {
        if a.min_replicas < 1 {
            problems.push("workers.autoscaling.minReplicas must be at least 1".to_string());
        }
        if a.max_replicas < a.min_replicas {
            problems
                .push("workers.autoscaling.maxReplicas must be at least minReplicas".to_string());
        }
        if a.target_lag_per_worker < 1 {
            problems.push("workers.autoscaling.targetLagPerWorker must be at least 1".to_string());
        }
    }
    if spec.api.replicas < 0 {
        problems.push("api.replicas must not be negative".to_string());
    }
    if !(1..=65535).contains(&spec.api.port) {
        problems.push("api.port must be between 1 and 65535".to_string());
    }
    if spec
        .api
        .tls
        .as_ref()
        .is_some_and(|t| t.secret_name.is_empty())
    {
        problems.push("api.tls.secretName must not be empty".to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Consumer group of the workers: the spec's, or `tickfleet.<namespace>.<name>` so two pipelines
/// never share a group by accident.
pub fn consumer_group(tp: &TickPipeline) -> String {
    tp.spec.kafka.consumer_group.clone().unwrap_or_else(|| {
        format!(
            "tickfleet.{}.{}",
            tp.namespace().unwrap_or_default(),
            tp.name_any()
        )
    })
}

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
/// the pipeline has no uid (not yet stored). `blockOwnerDeletion` is left unset: setting it needs
/// `update` on `tickpipelines/finalizers` under the OwnerReferencesPermissionEnforcement admission
/// plugin, and background deletion works without it.
pub fn owner_reference(tp: &TickPipeline) -> Option<OwnerReference> {
    tp.controller_owner_ref(&())
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

/// The worker configuration as `TICKFLEET_*` environment variables (no secrets: those come from
/// Secret references in the pod spec).
pub fn config_data(tp: &TickPipeline) -> BTreeMap<String, String> {
    let spec = &tp.spec;
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        data.insert(k.to_string(), v);
    };
    put("TICKFLEET_BROKERS", spec.kafka.bootstrap_servers.clone());
    put("TICKFLEET_TOPIC", spec.kafka.topic.clone());
    put("TICKFLEET_GROUP", consumer_group(tp));
    put(
        "TICKFLEET_FORMAT",
        match spec.kafka.format {
            crate::crd::MessageFormat::Protobuf => "protobuf".to_string(),
            crate::crd::MessageFormat::Json => "json".to_string(),
        },
    );
    put("TICKFLEET_REDIS_PREFIX", spec.store.key_prefix.clone());
    if let Some(url) = &spec.store.redis.url {
        put("TICKFLEET_REDIS_URL", url.clone());
    }
    if let Some(r) = &spec.store.retention {
        if let Some(age) = r.max_age_seconds {
            put("TICKFLEET_RETENTION_MAX_AGE_SECS", age.to_string());
        }
        if let Some(count) = r.max_count {
            put("TICKFLEET_RETENTION_MAX_COUNT", count.to_string());
        }
    }
    if let Some(size) = spec.workers.batch_size {
        put("TICKFLEET_BATCH_SIZE", size.to_string());
    }
    if let Some(linger) = spec.workers.batch_linger_ms {
        put("TICKFLEET_BATCH_LINGER_MS", linger.to_string());
    }
    put(
        "TICKFLEET_DRAIN_TIMEOUT_SECS",
        spec.workers.drain_timeout_seconds.to_string(),
    );
    put("TICKFLEET_LOG_FORMAT", spec.log_format.as_str().to_string());
    if let Some(auth) = &spec.kafka.auth {
        put(
            "TICKFLEET_KAFKA_SECURITY_PROTOCOL",
            auth.security_protocol.as_str().to_string(),
        );
        if let Some(sasl) = &auth.sasl {
            put(
                "TICKFLEET_KAFKA_SASL_MECHANISM",
                sasl.mechanism.as_str().to_string(),
            );
        }
    }
    data
}

/// Hex SHA-256 (first 16 bytes) of the config data and the Secret references of a component's
/// pods (`worker` or `api`: env vars and mounted files), as a pod template annotation: any change
/// to either changes the template and so rolls the pods. A pipeline without mounted Secrets hashes
/// as it did before they existed, so upgrading the operator does not roll its pods.
pub fn config_hash(tp: &TickPipeline, component: &str, data: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    for (k, v) in data {
        hasher.update(k.as_bytes());
        hasher.update([0]);
        hasher.update(v.as_bytes());
        hasher.update([0]);
    }
    for env in secret_env(tp) {
        if let Some(sel) = env.value_from.and_then(|v| v.secret_key_ref) {
            hasher.update(env.name.as_bytes());
            hasher.update([0]);
            hasher.update(sel.name.as_bytes());
            hasher.update([0]);
            hasher.update(sel.key.as_bytes());
            hasher.update([0]);
        }
    }
    for m in secret_mounts(tp, component) {
        let Some(secret) = m.volume.secret else {
            continue;
        };
        hasher.update(m.volume.name.as_bytes());
        hasher.update([0]);
        hasher.update(secret.secret_name.unwrap_or_default().as_bytes());
        hasher.update([0]);
        for item in secret.items.unwrap_or_default() {
            hasher.update(item.key.as_bytes());
            hasher.update([0]);
            hasher.update(item.path.as_bytes());
            hasher.update([0]);
        }
        hasher.update(m.mount.mount_path.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The ConfigMap with the pipeline config.
pub fn config_map(tp: &TickPipeline) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(tp, &Names::of(tp).config, None),
        data: Some(config_data(tp)),
        ..ConfigMap::default()
    }
}

fn secret_env_var(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Environment variables read from Secrets: the Redis URL when given by reference, and the Kafka
/// SASL credentials.
pub fn secret_env(tp: &TickPipeline) -> Vec<EnvVar> {
    let mut env = Vec::new();
    if let Some(r) = &tp.spec.store.redis.url_secret_ref {
        env.push(secret_env_var("TICKFLEET_REDIS_URL", &r.name, &r.key));
    }
    if let Some(sasl) = tp.spec.kafka.auth.as_ref().and_then(|a| a.sasl.as_ref()) {
        let s = &sasl.credentials_secret;
        env.push(secret_env_var(
            "TICKFLEET_KAFKA_SASL_USERNAME",
            &s.name,
            &s.username_key,
        ));
        env.push(secret_env_var(
            "TICKFLEET_KAFKA_SASL_PASSWORD",
            &s.name,
            &s.password_key,
        ));
    }
    env
}

/// A Secret mounted read-only as files, with the environment variables naming those files.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretMount {
    /// Secret volume projecting only the keys the binary reads.
    pub volume: Volume,
    /// Read-only mount of the volume.
    pub mount: VolumeMount,
    /// `TICKFLEET_*_FILE` variables with the paths of the files (paths only, never contents).
    pub env: Vec<EnvVar>,
}

/// Mounts `secret` at `dir` with `files` as (Secret key, file name, env var naming the file).
fn secret_mount(
    volume: &str,
    secret: &str,
    dir: &str,
    files: &[(&str, &str, &str)],
) -> SecretMount {
    SecretMount {
        volume: Volume {
            name: volume.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_string()),
                items: Some(
                    files
                        .iter()
                        .map(|(key, path, _)| KeyToPath {
                            key: (*key).to_string(),
                            path: (*path).to_string(),
                            ..KeyToPath::default()
                        })
                        .collect(),
                ),
                default_mode: Some(SECRET_FILE_MODE),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        mount: VolumeMount {
            name: volume.to_string(),
            mount_path: dir.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        env: files
            .iter()
            .map(|(_, path, var)| plain_env(var, format!("{dir}/{path}")))
            .collect(),
    }
}

/// Secrets mounted as files into a component's pods (`worker` or `api`): the Redis CA and client
/// certificate (both), the gRPC certificate (api only). The operator only references them; it
/// never reads them.
pub fn secret_mounts(tp: &TickPipeline, component: &str) -> Vec<SecretMount> {
    let mut mounts = Vec::new();
    if let Some(tls) = &tp.spec.store.redis.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            mounts.push(secret_mount(
                "redis-ca",
                &ca.name,
                REDIS_CA_DIR,
                &[(&ca.key, "ca.crt", "TICKFLEET_REDIS_CA_FILE")],
            ));
        }
        if let Some(name) = &tls.client_cert_secret_name {
            mounts.push(secret_mount(
                "redis-client-tls",
                name,
                REDIS_CLIENT_TLS_DIR,
                &[
                    ("tls.crt", "tls.crt", "TICKFLEET_REDIS_CLIENT_CERT_FILE"),
                    ("tls.key", "tls.key", "TICKFLEET_REDIS_CLIENT_KEY_FILE"),
                ],
            ));
        }
    }
    if component == "api"
        && let Some(tls) = &tp.spec.api.tls
    {
        mounts.push(secret_mount(
            "grpc-tls",
            &tls.secret_name,
            GRPC_TLS_DIR,
            &[
                ("tls.crt", "tls.crt", "TICKFLEET_GRPC_TLS_CERT_FILE"),
                ("tls.key", "tls.key", "TICKFLEET_GRPC_TLS_KEY_FILE"),
            ],
        ));
    }
    mounts
}

fn plain_env(name: &str, value: String) -> EnvVar {
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

struct ComponentPod<'a> {
    component: &'a str,
    binary: &'a str,
    admin_port: i32,
    extra_ports: Vec<ContainerPort>,
    extra_env: Vec<EnvVar>,
    resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    grace_seconds: i64,
    replicas: i32,
}

fn component_deployment(
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
    env.extend(secret_env(tp));
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
    let selector = selector_labels(tp, c.component);
    let mut pod_labels = component_labels(tp, c.component);
    pod_labels.extend(selector.clone());
    Deployment {
        metadata: child_meta(tp, name, Some(c.component)),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pipeline;

    fn env_of(d: &Deployment) -> Vec<EnvVar> {
        d.spec.template.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap()
    }

    #[test]
    fn config_map_holds_worker_settings() {
        let tp = pipeline();
        let cm = config_map(&tp);
        let data = cm.data.unwrap();
        assert_eq!(data["TICKFLEET_BROKERS"], "kafka-0:9092,kafka-1:9092");
        assert_eq!(data["TICKFLEET_TOPIC"], "ticks");
        assert_eq!(data["TICKFLEET_GROUP"], "tickfleet.markets.btc");
        assert_eq!(data["TICKFLEET_FORMAT"], "protobuf");
        assert_eq!(data["TICKFLEET_REDIS_URL"], "redis://redis:6379");
        assert_eq!(data["TICKFLEET_REDIS_PREFIX"], "tf");
        assert_eq!(data["TICKFLEET_DRAIN_TIMEOUT_SECS"], "30");
        assert_eq!(data["TICKFLEET_LOG_FORMAT"], "json");
        assert!(
            !data.contains_key("TICKFLEET_ADMIN_ADDR"),
            "set per container"
        );
        assert!(!data.contains_key("TICKFLEET_KAFKA_SASL_PASSWORD"));
        assert_eq!(cm.metadata.name.as_deref(), Some("btc-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("markets"));
    }

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
        for o in owners {
            let o = o.expect("owner reference");
            assert_eq!(o.len(), 1);
            assert_eq!(o[0].kind, "TickPipeline");
            assert_eq!(o[0].api_version, "tickfleet.io/v1alpha1");
            assert_eq!(o[0].name, "btc");
            assert_eq!(o[0].uid, "6b0e4a57-0d0c-4b37-9c2f-6a51d6e1f0aa");
            assert_eq!(o[0].controller, Some(true));
            // not set: with OwnerReferencesPermissionEnforcement it would need `update` on
            // tickpipelines/finalizers, which background garbage collection does not need
            assert_eq!(o[0].block_owner_deletion, None);
        }
    }

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
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in sel {
            assert_eq!(labels.get(k), Some(v));
        }
    }

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
    fn config_change_changes_the_hash_and_the_pod_template() {
        let tp = pipeline();
        let before = desired(&tp, 1);
        let mut changed = tp.clone();
        changed.spec.store.key_prefix = "other".into();
        let after = desired(&changed, 1);
        let h = |d: &Deployment| {
            d.spec
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        assert_ne!(h(&before.worker), h(&after.worker));
        assert_ne!(h(&before.api), h(&after.api));
        // and it is stable for an unchanged spec
        assert_eq!(h(&before.worker), h(&desired(&tp, 5).worker));
        assert_eq!(h(&before.worker).len(), 32);
    }

    #[test]
    fn secrets_are_referenced_never_copied() {
        let mut tp = pipeline();
        tp.spec.store.redis = crate::crd::RedisSpec {
            url: None,
            url_secret_ref: Some(crate::crd::SecretKeyRef {
                name: "redis-auth".into(),
                key: "url".into(),
            }),
            tls: None,
        };
        tp.spec.kafka.auth = Some(crate::crd::KafkaAuth {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl: Some(crate::crd::SaslSpec {
                mechanism: crate::crd::SaslMechanism::ScramSha512,
                credentials_secret: crate::crd::CredentialsSecretRef {
                    name: "kafka-creds".into(),
                    username_key: "user".into(),
                    password_key: "pass".into(),
                },
            }),
        });
        assert_eq!(validate(&tp), Ok(()));
        let data = config_data(&tp);
        assert!(!data.contains_key("TICKFLEET_REDIS_URL"));
        assert_eq!(data["TICKFLEET_KAFKA_SECURITY_PROTOCOL"], "SASL_SSL");
        assert_eq!(data["TICKFLEET_KAFKA_SASL_MECHANISM"], "SCRAM-SHA-512");
        for d in [worker_deployment(&tp, 1, "h"), api_deployment(&tp, "h")] {
            let env = env_of(&d);
            let find = |n: &str| env.iter().find(|e| e.name == n).cloned().unwrap();
            assert_eq!(
                find("TICKFLEET_REDIS_URL"),
                secret_env_var("TICKFLEET_REDIS_URL", "redis-auth", "url")
            );
            assert_eq!(
                find("TICKFLEET_KAFKA_SASL_USERNAME"),
                secret_env_var("TICKFLEET_KAFKA_SASL_USERNAME", "kafka-creds", "user")
            );
            assert_eq!(
                find("TICKFLEET_KAFKA_SASL_PASSWORD"),
                secret_env_var("TICKFLEET_KAFKA_SASL_PASSWORD", "kafka-creds", "pass")
            );
        }
        // switching the Secret rolls the pods too
        let mut other = tp.clone();
        other.spec.store.redis.url_secret_ref.as_mut().unwrap().name = "redis-auth-2".into();
        assert_ne!(
            config_hash(&tp, "worker", &config_data(&tp)),
            config_hash(&other, "worker", &config_data(&other))
        );
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

    #[test]
    fn validation_reports_each_problem() {
        assert_eq!(validate(&pipeline()), Ok(()));
        let mut tp = pipeline();
        tp.spec.store.redis.url = Some("http://redis".into());
        tp.spec.workers.autoscaling = Some(crate::crd::AutoscalingSpec {
            enabled: true,
            min_replicas: 4,
            max_replicas: 2,
            target_lag_per_worker: 1000,
            scale_down_stabilization_seconds: 300,
            poll_interval_seconds: 30,
        });
        let err = validate(&tp).unwrap_err();
        assert_eq!(
            err,
            "store.redis.url must start with redis:// or rediss://; \
             workers.autoscaling.maxReplicas must be at least minReplicas"
        );
        let mut both = pipeline();
        both.spec.store.redis.url_secret_ref = Some(crate::crd::SecretKeyRef {
            name: "s".into(),
            key: "k".into(),
        });
        assert_eq!(
            validate(&both).unwrap_err(),
            "set exactly one of store.redis.url and store.redis.urlSecretRef"
        );
        let mut sasl = pipeline();
        sasl.spec.kafka.auth = Some(crate::crd::KafkaAuth {
            security_protocol: SecurityProtocol::SaslPlaintext,
            sasl: None,
        });
        assert!(validate(&sasl).unwrap_err().contains("kafka.auth.sasl"));
    }

    fn pod_of(d: &Deployment) -> &PodSpec {
        d.spec.template.spec.as_ref().unwrap()
    }

    fn hash_of(d: &Deployment) -> String {
        d.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    }

    fn volume<'a>(pod: &'a PodSpec, name: &str) -> Option<&'a Volume> {
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == name)
    }

    fn mount<'a>(pod: &'a PodSpec, name: &str) -> Option<&'a VolumeMount> {
        pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == name)
    }

    fn items(v: &Volume) -> Vec<(String, String)> {
        v.secret
            .as_ref()
            .unwrap()
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect()
    }

    /// The Secret volume `name` of `pod`: its Secret, projected keys, mode and optionality.
    fn assert_secret_volume(pod: &PodSpec, name: &str, secret: &str, want: &[(&str, &str)]) {
        let v = volume(pod, name).unwrap_or_else(|| panic!("no volume {name}"));
        let src = v.secret.as_ref().expect("a Secret volume");
        assert_eq!(src.secret_name.as_deref(), Some(secret));
        assert_eq!(src.default_mode, Some(0o440));
        assert_eq!(
            src.optional,
            Some(false),
            "a missing Secret must keep the pod from starting"
        );
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect();
        assert_eq!(items(v), want);
    }

    fn tls_pipeline() -> TickPipeline {
        let mut tp = pipeline();
        tp.spec.store.redis = crate::crd::RedisSpec {
            url: None,
            url_secret_ref: Some(crate::crd::SecretKeyRef {
                name: "redis-auth".into(),
                key: "url".into(),
            }),
            tls: Some(crate::crd::RedisTlsSpec {
                ca_secret_ref: Some(crate::crd::SecretKeyRef {
                    name: "redis-ca".into(),
                    key: "ca.pem".into(),
                }),
                client_cert_secret_name: Some("redis-client".into()),
            }),
        };
        tp.spec.api.tls = Some(crate::crd::ApiTlsSpec {
            secret_name: "btc-api-cert".into(),
        });
        tp
    }

    /// Env vars set from literals, other than the admin and gRPC addresses.
    fn file_env(d: &Deployment) -> BTreeMap<String, String> {
        env_of(d)
            .into_iter()
            .filter(|e| e.name.ends_with("_FILE"))
            .map(|e| {
                assert!(e.value_from.is_none(), "{} is a literal path", e.name);
                (e.name, e.value.unwrap())
            })
            .collect()
    }

    #[test]
    fn api_tls_mounts_the_certificate_secret_into_the_api_only() {
        let mut tp = pipeline();
        let plain = desired(&tp, 2);
        tp.spec.api.tls = Some(crate::crd::ApiTlsSpec {
            secret_name: "btc-api-cert".into(),
        });
        assert_eq!(validate(&tp), Ok(()));
        let c = desired(&tp, 2);
        let pod = pod_of(&c.api);
        assert_secret_volume(
            pod,
            "grpc-tls",
            "btc-api-cert",
            &[("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
        );
        let m = mount(pod, "grpc-tls").unwrap();
        assert_eq!(m.mount_path, "/etc/tickfleet/grpc-tls");
        assert_eq!(m.read_only, Some(true));
        assert_eq!(
            m.sub_path, None,
            "a directory mount, so kubelet can update renewed files"
        );
        assert_eq!(
            file_env(&c.api),
            BTreeMap::from([
                (
                    "TICKFLEET_GRPC_TLS_CERT_FILE".to_string(),
                    "/etc/tickfleet/grpc-tls/tls.crt".to_string()
                ),
                (
                    "TICKFLEET_GRPC_TLS_KEY_FILE".to_string(),
                    "/etc/tickfleet/grpc-tls/tls.key".to_string()
                ),
            ])
        );
        // still locked down, /tmp still there, probes still HTTP on the admin port
        let container = &pod.containers[0];
        assert_eq!(
            container
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        assert!(mount(pod, "tmp").is_some());
        for probe in [&container.readiness_probe, &container.liveness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.port, IntOrString::String("admin".into()));
            assert_eq!(get.scheme, None);
        }
        // the workers neither get the certificate nor roll for it; the ConfigMap does not change
        assert_eq!(c.worker, plain.worker);
        assert_eq!(c.config_map, plain.config_map);
        assert_ne!(hash_of(&c.api), hash_of(&plain.api));
        // another Secret rolls the api pods
        let mut other = tp.clone();
        other.spec.api.tls.as_mut().unwrap().secret_name = "btc-api-cert-2".into();
        assert_ne!(hash_of(&desired(&other, 2).api), hash_of(&c.api));
    }

    #[test]
    fn redis_tls_mounts_ca_and_client_certificate_into_workers_and_api() {
        let tp = tls_pipeline();
        assert_eq!(validate(&tp), Ok(()));
        let c = desired(&tp, 2);
        for d in [&c.worker, &c.api] {
            let pod = pod_of(d);
            assert_secret_volume(pod, "redis-ca", "redis-ca", &[("ca.pem", "ca.crt")]);
            assert_secret_volume(
                pod,
                "redis-client-tls",
                "redis-client",
                &[("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
            );
            for (name, dir) in [
                ("redis-ca", "/etc/tickfleet/redis-ca"),
                ("redis-client-tls", "/etc/tickfleet/redis-client-tls"),
            ] {
                let m = mount(pod, name).unwrap();
                assert_eq!((m.mount_path.as_str(), m.read_only), (dir, Some(true)));
            }
            let env = file_env(d);
            assert_eq!(
                env["TICKFLEET_REDIS_CA_FILE"],
                "/etc/tickfleet/redis-ca/ca.crt"
            );
            assert_eq!(
                env["TICKFLEET_REDIS_CLIENT_CERT_FILE"],
                "/etc/tickfleet/redis-client-tls/tls.crt"
            );
            assert_eq!(
                env["TICKFLEET_REDIS_CLIENT_KEY_FILE"],
                "/etc/tickfleet/redis-client-tls/tls.key"
            );
            // every volume is mounted, and no two mounts share a path
            let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
            let paths: std::collections::BTreeSet<_> =
                mounts.iter().map(|m| &m.mount_path).collect();
            assert_eq!(paths.len(), mounts.len());
            assert_eq!(mounts.len(), pod.volumes.as_ref().unwrap().len());
        }
        assert_eq!(
            file_env(&c.worker).len(),
            3,
            "no gRPC certificate for workers"
        );
        assert_eq!(file_env(&c.api).len(), 5);
        assert!(volume(pod_of(&c.worker), "grpc-tls").is_none());
        // the URL (with its password) still comes from its Secret
        assert!(env_of(&c.worker).contains(&secret_env_var(
            "TICKFLEET_REDIS_URL",
            "redis-auth",
            "url"
        )));
        // only the CA or only the client certificate
        let mut ca_only = tp.clone();
        ca_only
            .spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .client_cert_secret_name = None;
        let w = worker_deployment(&ca_only, 1, "h");
        assert_eq!(
            file_env(&w).keys().collect::<Vec<_>>(),
            ["TICKFLEET_REDIS_CA_FILE"]
        );
        assert!(volume(pod_of(&w), "redis-client-tls").is_none());
        let mut client_only = tp.clone();
        client_only
            .spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .ca_secret_ref = None;
        assert_eq!(validate(&client_only), Ok(()));
        let w = worker_deployment(&client_only, 1, "h");
        assert_eq!(
            file_env(&w).keys().collect::<Vec<_>>(),
            [
                "TICKFLEET_REDIS_CLIENT_CERT_FILE",
                "TICKFLEET_REDIS_CLIENT_KEY_FILE"
            ]
        );
    }

    #[test]
    fn tls_secrets_are_referenced_never_copied() {
        let tp = tls_pipeline();
        let c = desired(&tp, 2);
        // the ConfigMap is exactly the one without TLS: no paths, no Secret names, no contents
        let mut no_tls = tp.clone();
        no_tls.spec.store.redis.tls = None;
        no_tls.spec.api.tls = None;
        assert_eq!(c.config_map, desired(&no_tls, 2).config_map);
        // every env var is a literal the operator knows without reading a Secret, or a reference
        for d in [&c.worker, &c.api] {
            for e in env_of(d) {
                match (&e.value, &e.value_from) {
                    (Some(v), None) => assert!(
                        v.starts_with("0.0.0.0:") || v.starts_with("/etc/tickfleet/"),
                        "{} = {v}",
                        e.name
                    ),
                    (None, Some(from)) => assert!(from.secret_key_ref.is_some(), "{}", e.name),
                    _ => panic!("{} is neither a literal nor a reference", e.name),
                }
            }
        }
    }

    #[test]
    fn switching_a_tls_secret_rolls_the_pods_that_mount_it() {
        let tp = tls_pipeline();
        let data = config_data(&tp);
        let base = (
            config_hash(&tp, "worker", &data),
            config_hash(&tp, "api", &data),
        );
        let mut ca_name = tp.clone();
        ca_name
            .spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .ca_secret_ref
            .as_mut()
            .unwrap()
            .name = "redis-ca-2".into();
        let mut ca_key = tp.clone();
        ca_key
            .spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .ca_secret_ref
            .as_mut()
            .unwrap()
            .key = "other.pem".into();
        let mut client = tp.clone();
        client
            .spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .client_cert_secret_name = Some("redis-client-2".into());
        for changed in [ca_name, ca_key, client] {
            assert_ne!(config_hash(&changed, "worker", &data), base.0);
            assert_ne!(config_hash(&changed, "api", &data), base.1);
        }
        let mut api_cert = tp.clone();
        api_cert.spec.api.tls.as_mut().unwrap().secret_name = "other".into();
        assert_eq!(config_hash(&api_cert, "worker", &data), base.0);
        assert_ne!(config_hash(&api_cert, "api", &data), base.1);
        // without any mounted Secret both components hash as before (no roll on operator upgrade)
        let plain = pipeline();
        let plain_data = config_data(&plain);
        assert_eq!(
            config_hash(&plain, "worker", &plain_data),
            config_hash(&plain, "api", &plain_data)
        );
    }

    #[test]
    fn tls_validation_reports_each_problem() {
        let mut tp = tls_pipeline();
        tp.spec.store.redis.url = Some("redis://redis:6379".into());
        tp.spec.store.redis.url_secret_ref = None;
        assert_eq!(
            validate(&tp).unwrap_err(),
            "store.redis.tls needs a rediss:// url"
        );
        tp.spec.store.redis.url = Some("rediss://redis:6380".into());
        assert_eq!(validate(&tp), Ok(()));
        tp.spec.store.redis.tls = Some(crate::crd::RedisTlsSpec {
            ca_secret_ref: None,
            client_cert_secret_name: None,
        });
        tp.spec.api.tls.as_mut().unwrap().secret_name = String::new();
        assert_eq!(
            validate(&tp).unwrap_err(),
            "store.redis.tls needs caSecretRef or clientCertSecretName; \
             api.tls.secretName must not be empty"
        );
        tp.spec.store.redis.tls = Some(crate::crd::RedisTlsSpec {
            ca_secret_ref: Some(crate::crd::SecretKeyRef {
                name: "ca".into(),
                key: String::new(),
            }),
            client_cert_secret_name: Some(String::new()),
        });
        tp.spec.api.tls = None;
        assert_eq!(
            validate(&tp).unwrap_err(),
            "store.redis.tls.caSecretRef needs a name and a key; \
             store.redis.tls.clientCertSecretName must not be empty"
        );
    }

    /// The file variables the operator sets are ones the binaries read (the packaging check only
    /// covers manifests and the chart).
    #[test]
    fn file_env_vars_are_read_by_the_binaries() {
        let store = include_str!("../../store/src/redis/options.rs");
        let api = include_str!("../../api/src/main.rs");
        let tp = tls_pipeline();
        for (d, sources) in [
            (worker_deployment(&tp, 1, "h"), vec![store]),
            (api_deployment(&tp, "h"), vec![store, api]),
        ] {
            for name in file_env(&d).keys() {
                let needle = format!("env = \"{name}\"");
                assert!(
                    sources.iter().any(|s| s.contains(&needle)),
                    "no binary reads {name}"
                );
            }
        }
    }

    #[test]
    fn explicit_consumer_group_wins() {
        let mut tp = pipeline();
        tp.spec.kafka.consumer_group = Some("legacy".into());
        assert_eq!(consumer_group(&tp), "legacy");
    }
}

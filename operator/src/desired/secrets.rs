//! Secrets a pipeline's pods use, by reference only: env vars read from Secrets (the Redis URL,
//! the Kafka SASL credentials) and Secrets mounted as files (TLS certificates and keys). Each
//! component gets only the Secrets it uses. The controller applies a Deployment only when every
//! Secret it references was offered to the pipeline ([`crate::offer`]).

use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, KeyToPath, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};

use super::POLL_COMPONENT;
use super::pod::plain_env;
use crate::crd::TickPipeline;

/// Directory of the api's gRPC certificate (`tls.crt`) and key (`tls.key`), from `spec.api.tls`.
pub const GRPC_TLS_DIR: &str = "/etc/tickfleet/grpc-tls";
/// Directory of the Redis CA (`ca.crt`), from `spec.store.redis.tls.caSecretRef`.
pub const REDIS_CA_DIR: &str = "/etc/tickfleet/redis-ca";
/// Directory of the Redis client certificate (`tls.crt`) and key (`tls.key`), from
/// `spec.store.redis.tls.clientCertSecretName`.
pub const REDIS_CLIENT_TLS_DIR: &str = "/etc/tickfleet/redis-client-tls";
/// Directory of the PostgreSQL CA (`ca.crt`), from `spec.store.postgres.caSecretRef`.
pub const POSTGRES_CA_DIR: &str = "/etc/tickfleet/postgres-ca";
/// Mode of files mounted from Secrets: readable by their owner (root) and the pod's `fsGroup` (the
/// image's group, which the containers run as), by no one else.
pub const SECRET_FILE_MODE: i32 = 0o440;

pub(super) fn secret_env_var(name: &str, secret: &str, key: &str) -> EnvVar {
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

/// Whether a component's pods talk to Redis: workers and api (the store) and the poll connector
/// (the jobs, leases and quote cache); the source connectors do not.
fn uses_redis(component: &str) -> bool {
    matches!(component, "worker" | "api" | POLL_COMPONENT)
}

/// Whether a component's pods talk to PostgreSQL: workers and api.
fn uses_postgres(component: &str) -> bool {
    matches!(component, "worker" | "api")
}

/// Whether a component's pods talk to Kafka: everything but the api.
fn uses_kafka(component: &str) -> bool {
    component != "api"
}

/// Environment variables a component's pods (`worker`, `api`, `connector` or [`POLL_COMPONENT`])
/// read from Secrets: the Redis URL when given by reference (workers, api, poll connector), the
/// PostgreSQL URL (workers and api), the Kafka SASL credentials (all but the api) and the
/// providers' API keys (poll connector). Each component gets only what it uses.
pub fn secret_env(tp: &TickPipeline, component: &str) -> Vec<EnvVar> {
    let mut env = Vec::new();
    if uses_redis(component)
        && let Some(r) = &tp.spec.store.redis.url_secret_ref
    {
        env.push(secret_env_var("TICKFLEET_REDIS_URL", &r.name, &r.key));
    }
    if uses_postgres(component)
        && let Some(pg) = &tp.spec.store.postgres
    {
        let r = &pg.url_secret_ref;
        env.push(secret_env_var("TICKFLEET_POSTGRES_URL", &r.name, &r.key));
    }
    if uses_kafka(component)
        && let Some(sasl) = tp.spec.kafka.auth.as_ref().and_then(|a| a.sasl.as_ref())
    {
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
    if component == POLL_COMPONENT
        && let Some(polling) = &tp.spec.polling
    {
        for (var, provider) in [
            ("FINNHUB_API_KEY", &polling.providers.finnhub),
            ("ALPHAVANTAGE_API_KEY", &polling.providers.alpha_vantage),
        ] {
            if let Some(r) = provider.as_ref().map(|p| &p.api_key_secret_ref) {
                env.push(secret_env_var(var, &r.name, &r.key));
            }
        }
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

/// Secrets mounted as files into a component's pods: the Redis CA and client certificate (workers,
/// api and the poll connector), the PostgreSQL CA (workers and api), the gRPC certificate (api
/// only); source connectors get none. The operator only references them; it never reads them.
pub fn secret_mounts(tp: &TickPipeline, component: &str) -> Vec<SecretMount> {
    let mut mounts = Vec::new();
    if uses_redis(component)
        && let Some(tls) = &tp.spec.store.redis.tls
    {
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
    if uses_postgres(component)
        && let Some(ca) = tp
            .spec
            .store
            .postgres
            .as_ref()
            .and_then(|pg| pg.ca_secret_ref.as_ref())
    {
        mounts.push(secret_mount(
            "postgres-ca",
            &ca.name,
            POSTGRES_CA_DIR,
            &[(&ca.key, "ca.crt", "TICKFLEET_POSTGRES_CA_FILE")],
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use crate::crd::SecurityProtocol;
    use crate::desired::testing::{env_of, hash_of, pod_of, tls_pipeline};
    use crate::desired::{
        api_deployment, config_data, config_hash, desired, validate, worker_deployment,
    };
    use crate::fixtures::pipeline;

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
    fn a_postgres_history_store_is_wired_into_workers_and_api_from_its_secret() {
        let mut tp = pipeline();
        tp.spec.store.postgres = Some(crate::crd::PostgresSpec {
            url_secret_ref: crate::crd::SecretKeyRef {
                name: "pg-auth".into(),
                key: "url".into(),
            },
            ca_secret_ref: Some(crate::crd::SecretKeyRef {
                name: "pg-ca".into(),
                key: "ca.pem".into(),
            }),
            schema: Some("history".into()),
            retention_days: Some(400),
        });
        assert_eq!(validate(&tp), Ok(()));
        let data = config_data(&tp);
        assert_eq!(data["TICKFLEET_STORE"], "both");
        assert_eq!(data["TICKFLEET_POSTGRES_SCHEMA"], "history");
        assert_eq!(data["TICKFLEET_POSTGRES_RETENTION_DAYS"], "400");
        assert!(!data.contains_key("TICKFLEET_POSTGRES_URL"));
        for d in [worker_deployment(&tp, 1, "h"), api_deployment(&tp, "h")] {
            let env = env_of(&d);
            assert!(
                env.contains(&secret_env_var("TICKFLEET_POSTGRES_URL", "pg-auth", "url")),
                "{env:?}"
            );
            // The CA is a file from its Secret (the key projected as ca.crt), named by path.
            assert!(
                env.contains(&plain_env(
                    "TICKFLEET_POSTGRES_CA_FILE",
                    format!("{POSTGRES_CA_DIR}/ca.crt")
                )),
                "{env:?}"
            );
            let pod = pod_of(&d);
            let source = volume(pod, "postgres-ca").unwrap().secret.as_ref().unwrap();
            assert_eq!(source.secret_name.as_deref(), Some("pg-ca"));
            assert_eq!(source.items.as_ref().unwrap()[0].key, "ca.pem");
            assert_eq!(
                mount(pod, "postgres-ca").unwrap().mount_path,
                POSTGRES_CA_DIR
            );
        }
        assert!(
            crate::offer::secret_uses(&tp)
                .iter()
                .any(|u| u.secret == "pg-auth" && u.field == "spec.store.postgres.urlSecretRef")
        );
        assert!(
            crate::offer::secret_uses(&tp)
                .iter()
                .any(|u| u.secret == "pg-ca" && u.field == "spec.store.postgres.caSecretRef")
        );
        // without it, nothing of PostgreSQL
        let data = config_data(&pipeline());
        assert!(!data.contains_key("TICKFLEET_STORE"));
    }

    #[test]
    fn secrets_are_referenced_never_copied() {
        let mut tp = pipeline();
        tp.spec.store.redis = crate::crd::RedisSpec {
            url: None,
            mode: None,
            min_replica_acks: None,
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
        }
        let worker = env_of(&worker_deployment(&tp, 1, "h"));
        let find = |n: &str| worker.iter().find(|e| e.name == n).cloned().unwrap();
        assert_eq!(
            find("TICKFLEET_KAFKA_SASL_USERNAME"),
            secret_env_var("TICKFLEET_KAFKA_SASL_USERNAME", "kafka-creds", "user")
        );
        assert_eq!(
            find("TICKFLEET_KAFKA_SASL_PASSWORD"),
            secret_env_var("TICKFLEET_KAFKA_SASL_PASSWORD", "kafka-creds", "pass")
        );
        // the api does not talk to Kafka: no Kafka credentials in its pods
        assert!(
            env_of(&api_deployment(&tp, "h"))
                .iter()
                .all(|e| !e.name.starts_with("TICKFLEET_KAFKA_SASL"))
        );
        // switching the Secret rolls the pods too
        let mut other = tp.clone();
        other.spec.store.redis.url_secret_ref.as_mut().unwrap().name = "redis-auth-2".into();
        assert_ne!(
            config_hash(&tp, "worker", &config_data(&tp)),
            config_hash(&other, "worker", &config_data(&other))
        );
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

    /// The file variables the operator sets are ones the binaries read (the packaging check only
    /// covers manifests and the chart).
    #[test]
    fn file_env_vars_are_read_by_the_binaries() {
        let store = include_str!("../../../store/src/redis/options.rs");
        let api = include_str!("../../../api/src/main.rs");
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
}

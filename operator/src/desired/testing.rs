//! Helpers the tests of the `desired` modules share.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{EnvVar, PodSpec};

use super::CONFIG_HASH_ANNOTATION;
use crate::crd::TickPipeline;
use crate::fixtures::pipeline;

pub(super) fn env_of(d: &Deployment) -> Vec<EnvVar> {
    d.spec.template.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap()
}

pub(super) fn pod_of(d: &Deployment) -> &PodSpec {
    d.spec.template.spec.as_ref().unwrap()
}

/// The labels of a Deployment's pod template (what its selector and others' must tell apart).
pub(super) fn pod_labels_of(d: &Deployment) -> &std::collections::BTreeMap<String, String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap()
}

pub(super) fn hash_of(d: &Deployment) -> String {
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

pub(super) fn tls_pipeline() -> TickPipeline {
    let mut tp = pipeline();
    tp.spec.store.redis = crate::crd::RedisSpec {
        url: None,
        mode: None,
        min_replica_acks: None,
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

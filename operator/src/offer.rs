//! Secret offers: a pipeline uses only the Secrets that were offered to it.
//!
//! A `TickPipeline` names Secrets in several fields: the Kafka SASL credentials (read by the
//! operator, for topic admin and lag, and by the workers), the Redis URL, the Redis CA and client
//! certificate, the api's gRPC certificate and the polling providers' API keys (referenced by the
//! pods). Without a check, anyone
//! allowed to create a TickPipeline in a namespace could make the operator read, or make the
//! pipeline's pods load, any Secret of that namespace and send it to a broker or Redis of their
//! choosing: the operator would be a confused deputy, using its own and the pods' access for them.
//!
//! So a Secret is used only when whoever controls it has offered it: the annotation
//! [`ALLOWED_PIPELINES_ANNOTATION`] on the Secret names the TickPipelines, in the Secret's own
//! namespace, that may use it (comma-separated), or is `*` for every pipeline of that namespace.
//! A spec can only name Secrets of its own namespace (the fields carry no namespace), so an offer
//! never crosses namespaces.
//!
//! [`check`] reads the metadata (never the data) of every Secret the spec names
//! ([`secret_uses`]) and sorts them into offered and refused. The controller reads the data of the
//! Kafka SASL Secret only when it is offered (and checks the offer again on the object it read),
//! and applies a Deployment only when every Secret its pod spec references ([`pod_secrets`]) was
//! found offered — a second line that also covers a reference the field list might miss.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::{Client, ResourceExt};

use crate::crd::TickPipeline;

/// Annotation on a Secret that offers it to TickPipelines of its namespace: their names,
/// comma-separated (`btc,eth`), or `*` for all of them.
pub const ALLOWED_PIPELINES_ANNOTATION: &str = "tickfleet.io/allowed-pipelines";

/// A field of a pipeline's spec that names a Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    /// The Secret's name (in the pipeline's namespace).
    pub secret: String,
    /// Path of the field, e.g. `spec.kafka.auth.sasl.credentialsSecret`.
    pub field: &'static str,
}

/// Field of the Kafka SASL credentials, the one Secret the operator itself reads.
pub const SASL_FIELD: &str = "spec.kafka.auth.sasl.credentialsSecret";

/// Every Secret the spec names, in spec order (a Secret named by two fields appears twice).
pub fn secret_uses(tp: &TickPipeline) -> Vec<SecretUse> {
    let spec = &tp.spec;
    let mut uses = Vec::new();
    let mut add = |secret: &str, field| {
        uses.push(SecretUse {
            secret: secret.to_string(),
            field,
        });
    };
    if let Some(sasl) = spec.kafka.auth.as_ref().and_then(|a| a.sasl.as_ref()) {
        add(&sasl.credentials_secret.name, SASL_FIELD);
    }
    let redis = &spec.store.redis;
    if let Some(r) = &redis.url_secret_ref {
        add(&r.name, "spec.store.redis.urlSecretRef");
    }
    if let Some(tls) = &redis.tls {
        if let Some(ca) = &tls.ca_secret_ref {
            add(&ca.name, "spec.store.redis.tls.caSecretRef");
        }
        if let Some(name) = &tls.client_cert_secret_name {
            add(name, "spec.store.redis.tls.clientCertSecretName");
        }
    }
    if let Some(pg) = &spec.store.postgres {
        add(&pg.url_secret_ref.name, "spec.store.postgres.urlSecretRef");
        if let Some(ca) = &pg.ca_secret_ref {
            add(&ca.name, "spec.store.postgres.caSecretRef");
        }
    }
    if let Some(tls) = &spec.api.tls {
        add(&tls.secret_name, "spec.api.tls.secretName");
    }
    if let Some(providers) = spec.polling.as_ref().map(|p| &p.providers) {
        if let Some(p) = &providers.finnhub {
            add(
                &p.api_key_secret_ref.name,
                "spec.polling.providers.finnhub.apiKeySecretRef",
            );
        }
        if let Some(p) = &providers.alpha_vantage {
            add(
                &p.api_key_secret_ref.name,
                "spec.polling.providers.alphaVantage.apiKeySecretRef",
            );
        }
    }
    uses
}

/// What a Secret's annotation says about one pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Offered to this pipeline (by name or by `*`).
    Offered,
    /// No offer at all (no annotation, or an empty one).
    NotOffered,
    /// Offered to these other pipelines only.
    OfferedToOthers(Vec<String>),
}

/// Reads the offer annotation of a Secret for pipeline `pipeline`. Names are compared exactly;
/// spaces around the commas are ignored.
pub fn offer(meta: &ObjectMeta, pipeline: &str) -> Offer {
    let value = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOWED_PIPELINES_ANNOTATION));
    let names: Vec<String> = value
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if names.iter().any(|n| n == "*" || n == pipeline) {
        Offer::Offered
    } else if names.is_empty() {
        Offer::NotOffered
    } else {
        Offer::OfferedToOthers(names)
    }
}

/// Why a Secret may not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The Secret does not exist.
    NotFound,
    /// It exists but is offered to no pipeline.
    NotOffered,
    /// It is offered to other pipelines only.
    OfferedToOthers(Vec<String>),
    /// Its metadata could not be read (the API server's answer).
    Unreadable(String),
}

/// A Secret the pipeline names but may not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The Secret's name.
    pub secret: String,
    /// The spec fields naming it.
    pub fields: Vec<&'static str>,
    /// Why.
    pub why: Refusal,
}

impl Refused {
    /// CamelCase condition reason.
    pub fn reason(&self) -> &'static str {
        match self.why {
            Refusal::NotFound => "SecretNotFound",
            Refusal::NotOffered | Refusal::OfferedToOthers(_) => "SecretNotOffered",
            Refusal::Unreadable(_) => "SecretUnreadable",
        }
    }

    /// What is wrong and what to do, for a condition message.
    pub fn message(&self, tp: &TickPipeline) -> String {
        let name = tp.name_any();
        let ns = tp.namespace().unwrap_or_default();
        let what = format!(
            "secret {ns}/{} (named by {})",
            self.secret,
            self.fields.join(", ")
        );
        let hint = format!(
            "offer it with: kubectl annotate -n {ns} secret {} {ALLOWED_PIPELINES_ANNOTATION}={name}",
            self.secret
        );
        match &self.why {
            Refusal::NotFound => format!("{what} does not exist"),
            Refusal::NotOffered => format!(
                "{what} is not offered to pipeline {name}: it has no {ALLOWED_PIPELINES_ANNOTATION} annotation; {hint}"
            ),
            Refusal::OfferedToOthers(others) => format!(
                "{what} is offered to pipelines {} only, not to {name}; add {name} to its {ALLOWED_PIPELINES_ANNOTATION} annotation",
                others.join(",")
            ),
            Refusal::Unreadable(e) => format!("{what} could not be checked: {e}"),
        }
    }
}

/// The outcome of [`check`]: which named Secrets the pipeline may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offers {
    /// Secrets found offered to the pipeline.
    pub offered: BTreeSet<String>,
    /// Secrets refused, in spec order.
    pub refused: Vec<Refused>,
}

impl Offers {
    /// Sorts `uses` by the verdict `verdict` gives for each distinct Secret.
    pub fn sort(uses: &[SecretUse], mut verdict: impl FnMut(&str) -> Result<(), Refusal>) -> Self {
        let mut fields: BTreeMap<&str, Vec<&'static str>> = BTreeMap::new();
        let mut order = Vec::new();
        for u in uses {
            let entry = fields.entry(u.secret.as_str()).or_default();
            if entry.is_empty() {
                order.push(u.secret.as_str());
            }
            entry.push(u.field);
        }
        let mut out = Self::default();
        for secret in order {
            match verdict(secret) {
                Ok(()) => {
                    out.offered.insert(secret.to_string());
                }
                Err(why) => out.refused.push(Refused {
                    secret: secret.to_string(),
                    fields: fields.remove(secret).unwrap_or_default(),
                    why,
                }),
            }
        }
        out
    }

    /// Whether `secret` was found offered.
    pub fn allows(&self, secret: &str) -> bool {
        self.offered.contains(secret)
    }

    /// Whether every Secret the pods of `d` would reference was found offered.
    pub fn allow_deployment(&self, d: &Deployment) -> bool {
        d.spec
            .template
            .spec
            .as_ref()
            .is_none_or(|pod| pod_secrets(pod).iter().all(|s| self.allows(s)))
    }
}

/// The verdict on a Secret's metadata (`None`: it does not exist) for `pipeline`.
pub fn verdict(meta: Option<&ObjectMeta>, pipeline: &str) -> Result<(), Refusal> {
    let Some(meta) = meta else {
        return Err(Refusal::NotFound);
    };
    match offer(meta, pipeline) {
        Offer::Offered => Ok(()),
        Offer::NotOffered => Err(Refusal::NotOffered),
        Offer::OfferedToOthers(others) => Err(Refusal::OfferedToOthers(others)),
    }
}

/// Checks the offer of every Secret `tp` names, reading only their metadata.
pub async fn check(client: &Client, tp: &TickPipeline, ns: &str) -> Offers {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let uses = secret_uses(tp);
    let pipeline = tp.name_any();
    let mut verdicts = BTreeMap::new();
    for u in &uses {
        if verdicts.contains_key(&u.secret) {
            continue;
        }
        let v = match api.get_metadata_opt(&u.secret).await {
            Ok(meta) => verdict(meta.as_ref().map(|m| &m.metadata), &pipeline),
            Err(e) => Err(Refusal::Unreadable(e.to_string())),
        };
        verdicts.insert(u.secret.clone(), v);
    }
    Offers::sort(&uses, |s| {
        verdicts.remove(s).unwrap_or(Err(Refusal::NotFound))
    })
}

/// Every Secret a pod spec references: env vars from Secret keys, `envFrom` Secrets, Secret and
/// projected volumes, and image pull Secrets, of all containers (init and ephemeral included).
pub fn pod_secrets(pod: &PodSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut env = Vec::new();
    let mut env_from = Vec::new();
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        env.extend(c.env.iter().flatten());
        env_from.extend(c.env_from.iter().flatten());
    }
    for c in pod.ephemeral_containers.iter().flatten() {
        env.extend(c.env.iter().flatten());
        env_from.extend(c.env_from.iter().flatten());
    }
    for e in env {
        if let Some(sel) = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
        {
            out.insert(sel.name.clone());
        }
    }
    for f in env_from {
        if let Some(s) = &f.secret_ref {
            out.insert(s.name.clone());
        }
    }
    for v in pod.volumes.iter().flatten() {
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_ref()) {
            out.insert(name.clone());
        }
        for source in v
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .into_iter()
            .flatten()
        {
            if let Some(s) = &source.secret {
                out.insert(s.name.clone());
            }
        }
    }
    for r in pod.image_pull_secrets.iter().flatten() {
        out.insert(r.name.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pipeline_with_every_secret;

    fn annotated(value: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            annotations: value
                .map(|v| [(ALLOWED_PIPELINES_ANNOTATION.to_string(), v.to_string())].into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn the_annotation_names_pipelines_or_all_of_them() {
        for (value, want) in [
            (Some("btc"), Offer::Offered),
            (Some("*"), Offer::Offered),
            (Some("eth, btc"), Offer::Offered),
            (Some(" btc ,"), Offer::Offered),
            (None, Offer::NotOffered),
            (Some(""), Offer::NotOffered),
            (Some(" , "), Offer::NotOffered),
            (Some("eth"), Offer::OfferedToOthers(vec!["eth".into()])),
            (
                Some("btc-2,BTC,btc*"),
                Offer::OfferedToOthers(vec!["btc-2".into(), "BTC".into(), "btc*".into()]),
            ),
        ] {
            assert_eq!(offer(&annotated(value), "btc"), want, "{value:?}");
        }
        // a label of that name is not an offer
        let labelled = ObjectMeta {
            labels: Some([(ALLOWED_PIPELINES_ANNOTATION.to_string(), "btc".to_string())].into()),
            ..ObjectMeta::default()
        };
        assert_eq!(offer(&labelled, "btc"), Offer::NotOffered);
        assert_eq!(verdict(None, "btc"), Err(Refusal::NotFound));
    }

    #[test]
    fn every_secret_a_desired_pod_references_is_one_the_spec_names() {
        let tp = pipeline_with_every_secret();
        let named: BTreeSet<String> = secret_uses(&tp).into_iter().map(|u| u.secret).collect();
        let children = crate::desired::desired(&tp, 2);
        let pod = |d: &Deployment| pod_secrets(d.spec.template.spec.as_ref().unwrap());
        let worker = pod(&children.worker);
        let api = pod(&children.api);
        assert_eq!(
            worker,
            ["kafka-creds", "redis-ca", "redis-client", "redis-url"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            api,
            ["api-cert", "redis-ca", "redis-client", "redis-url"]
                .map(String::from)
                .into(),
            "no Kafka credentials for the api"
        );
        let referenced: BTreeSet<String> = worker.union(&api).cloned().collect();
        assert_eq!(referenced, named, "the field list and the pods agree");
        // so with everything offered both Deployments pass, and with one refused, those using it don't
        let all = Offers::sort(&secret_uses(&tp), |_| Ok(()));
        assert!(all.allow_deployment(&children.worker) && all.allow_deployment(&children.api));
        let no_ca = Offers::sort(&secret_uses(&tp), |s| {
            if s == "api-cert" {
                Err(Refusal::NotOffered)
            } else {
                Ok(())
            }
        });
        assert!(no_ca.allow_deployment(&children.worker));
        assert!(!no_ca.allow_deployment(&children.api));
    }

    #[test]
    fn pod_secrets_finds_every_kind_of_reference() {
        use k8s_openapi::api::core::v1::{
            Container, EnvFromSource, LocalObjectReference, ProjectedVolumeSource, SecretEnvSource,
            SecretProjection, Volume, VolumeProjection,
        };
        let pod = PodSpec {
            init_containers: Some(vec![Container {
                env_from: Some(vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "env-from".into(),
                        ..SecretEnvSource::default()
                    }),
                    ..EnvFromSource::default()
                }]),
                ..Container::default()
            }]),
            volumes: Some(vec![Volume {
                name: "p".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        secret: Some(SecretProjection {
                            name: "projected".into(),
                            ..SecretProjection::default()
                        }),
                        ..VolumeProjection::default()
                    }]),
                    ..ProjectedVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            image_pull_secrets: Some(vec![LocalObjectReference {
                name: "pull".into(),
            }]),
            ..PodSpec::default()
        };
        assert_eq!(
            pod_secrets(&pod),
            ["env-from", "projected", "pull"].map(String::from).into()
        );
    }

    #[test]
    fn a_secret_named_twice_is_checked_once_and_reported_with_both_fields() {
        let mut tp = pipeline_with_every_secret();
        tp.spec
            .store
            .redis
            .tls
            .as_mut()
            .unwrap()
            .client_cert_secret_name = Some("api-cert".into());
        let mut asked = Vec::new();
        let offers = Offers::sort(&secret_uses(&tp), |s| {
            asked.push(s.to_string());
            if s == "api-cert" {
                Err(Refusal::OfferedToOthers(vec!["eth".into()]))
            } else {
                Ok(())
            }
        });
        assert_eq!(asked, ["kafka-creds", "redis-url", "redis-ca", "api-cert"]);
        assert_eq!(offers.refused.len(), 1);
        let refused = &offers.refused[0];
        assert_eq!(
            refused.fields,
            [
                "spec.store.redis.tls.clientCertSecretName",
                "spec.api.tls.secretName"
            ]
        );
        assert_eq!(
            refused.message(&tp),
            "secret markets/api-cert (named by spec.store.redis.tls.clientCertSecretName, \
             spec.api.tls.secretName) is offered to pipelines eth only, not to btc; add btc to its \
             tickfleet.io/allowed-pipelines annotation"
        );
        assert_eq!(refused.reason(), "SecretNotOffered");
    }
}

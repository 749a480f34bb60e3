//! The poll connector (`spec.polling`): one Deployment of `tickfleet-connector poll`.

use k8s_openapi::api::apps::v1::Deployment;

use super::pod::{ComponentPod, component_deployment, plain_env};
use super::{CONNECTOR_ADMIN_PORT, GRACE_MARGIN_SECONDS, Names, POLL_COMPONENT};
use crate::crd::{PollingSpec, TickPipeline};

/// The poll connector Deployment (`spec.polling`): `replicas` pods of `tickfleet-connector poll`
/// over the pipeline's Redis (URL, prefix, mode and TLS files as the workers get them) and Kafka
/// (topic, format, brokers, security protocol from the ConfigMap, SASL credentials from their
/// Secret, as the source connectors get them). The providers' API keys are environment variables
/// from their Secrets (`FINNHUB_API_KEY`, `ALPHAVANTAGE_API_KEY`; the connector never logs them),
/// the base URLs and timings literals.
///
/// Several replicas are safe and need no coordination from the operator: each (provider, symbol)
/// is polled under a Redis lease with a fencing token, so a rollout (a new pod before an old one
/// stops) or a dead pod moves pairs between replicas without a pair being polled twice at once.
/// Each pod's holder id is its name (`$HOSTNAME`).
pub fn poll_deployment(tp: &TickPipeline, polling: &PollingSpec, hash: &str) -> Deployment {
    let mut env = Vec::new();
    let providers = &polling.providers;
    for (name, url) in [
        (
            "TICKFLEET_FINNHUB_URL",
            providers.finnhub.as_ref().and_then(|p| p.base_url.as_ref()),
        ),
        (
            "TICKFLEET_ALPHAVANTAGE_URL",
            providers
                .alpha_vantage
                .as_ref()
                .and_then(|p| p.base_url.as_ref()),
        ),
        (
            "TICKFLEET_YAHOO_URL",
            providers.yahoo.as_ref().and_then(|p| p.base_url.as_ref()),
        ),
    ] {
        if let Some(url) = url {
            env.push(plain_env(name, url.clone()));
        }
    }
    for (name, value) in [
        ("TICKFLEET_POLL_LEASE_TTL_MS", polling.lease_ttl_ms),
        ("TICKFLEET_POLL_SCAN_INTERVAL_MS", polling.scan_interval_ms),
        ("TICKFLEET_POLL_CACHE_TTL_MS", polling.cache_ttl_ms),
        ("TICKFLEET_POLL_HTTP_TIMEOUT_MS", polling.http_timeout_ms),
        ("TICKFLEET_POLL_BACKOFF_MIN_MS", polling.backoff_min_ms),
        ("TICKFLEET_POLL_BACKOFF_MAX_MS", polling.backoff_max_ms),
    ] {
        if let Some(v) = value {
            env.push(plain_env(name, v.to_string()));
        }
    }
    component_deployment(
        tp,
        &Names::poll(tp),
        hash,
        ComponentPod {
            component: POLL_COMPONENT,
            source: None,
            binary: "tickfleet-connector",
            args: vec!["poll".to_string()],
            admin_port: CONNECTOR_ADMIN_PORT,
            extra_ports: vec![],
            extra_env: env,
            resources: polling.resources.clone(),
            grace_seconds: i64::from(tp.spec.workers.drain_timeout_seconds) + GRACE_MARGIN_SECONDS,
            replicas: polling.replicas,
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::desired::testing::{env_of, hash_of, pod_labels_of, pod_of};
    use crate::desired::{SOURCE_LABEL, config_data, desired, secret_env, selector_labels};
    use crate::fixtures::{pipeline, pipeline_with_every_secret, with_polling};
    use crate::offer::{Offers, Refusal, pod_secrets, secret_uses};

    fn secret_ref(d: &Deployment, var: &str) -> Option<(String, String)> {
        env_of(d)
            .into_iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from)
            .and_then(|v| v.secret_key_ref)
            .map(|s| (s.name, s.key))
    }

    #[test]
    fn the_poll_connector_runs_poll_replicas_with_the_pipelines_redis_kafka_and_keys() {
        let mut tp = with_polling(pipeline_with_every_secret());
        tp.spec.sources = serde_json::from_value(serde_json::json!([
            {"exchange": "binance", "symbols": ["BTC-USDT"]}
        ]))
        .unwrap();
        let children = desired(&tp, 2);
        let d = children.polling.as_ref().expect("a poll connector");
        assert_eq!(d.metadata.name.as_deref(), Some("btc-poll"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("markets"));
        assert_eq!(d.spec.replicas, Some(3), "several replicas: the lease");
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("TickPipeline", "btc", Some(true))
        );
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "poller");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "tickfleet-operator");
        // its selector matches its own pods only, never a source connector's (nor the reverse)
        let selector = d.spec.selector.match_labels.clone().unwrap();
        assert_eq!(selector, selector_labels(&tp, "poller"));
        let source_pods = pod_labels_of(&children.sources[0]);
        assert!(selector.iter().any(|(k, v)| source_pods.get(k) != Some(v)));
        let source_selector = children.sources[0]
            .spec
            .selector
            .match_labels
            .clone()
            .unwrap();
        assert!(source_selector.contains_key(SOURCE_LABEL));
        let own_pods = pod_labels_of(d);
        assert!(
            source_selector
                .iter()
                .any(|(k, v)| own_pods.get(k) != Some(v))
        );

        let pod = pod_of(d);
        let c = &pod.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap(),
            &vec!["/usr/local/bin/tickfleet-connector".to_string()]
        );
        assert_eq!(c.args.as_ref().unwrap(), &vec!["poll".to_string()]);
        // the probes are HTTP on the admin port, which the connector serves at TICKFLEET_ADMIN_ADDR
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("admin"), 9092)
        );
        for (probe, path) in [
            (&c.readiness_probe, "/readyz"),
            (&c.liveness_probe, "/healthz"),
        ] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("admin".into())
            );
        }
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        // the topic, brokers, format, Redis URL/prefix/mode from the pipeline's ConfigMap
        let from = c.env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap();
        assert_eq!(from.name, "btc-config");

        let env = env_of(d);
        for (k, v) in [
            ("TICKFLEET_ADMIN_ADDR", "0.0.0.0:9092"),
            ("TICKFLEET_ALPHAVANTAGE_URL", "https://av-proxy.internal"),
            (
                "TICKFLEET_YAHOO_URL",
                "http://yahoo-fixture.markets.svc:8099",
            ),
            ("TICKFLEET_POLL_LEASE_TTL_MS", "5000"),
        ] {
            assert!(env.contains(&plain_env(k, v.into())), "{k} in {env:?}");
        }
        for unset in ["TICKFLEET_FINNHUB_URL", "TICKFLEET_POLL_SCAN_INTERVAL_MS"] {
            assert!(!env.iter().any(|e| e.name == unset), "{unset}: the default");
        }
        // the API keys: references to their Secrets, nothing else carries them
        assert_eq!(
            secret_ref(d, "FINNHUB_API_KEY"),
            Some(("finnhub-key".into(), "token".into()))
        );
        assert_eq!(
            secret_ref(d, "ALPHAVANTAGE_API_KEY"),
            Some(("av-key".into(), "key".into()))
        );
        // Redis and Kafka exactly as the workers get them (URL and SASL from the Secrets, the
        // Redis TLS files mounted the same way); no PostgreSQL, no api certificate
        let worker_secret_env: Vec<_> = secret_env(&tp, "worker");
        let poll_secret_env: Vec<_> = env
            .iter()
            .filter(|e| e.value_from.is_some() && !e.name.ends_with("_API_KEY"))
            .cloned()
            .collect();
        assert_eq!(poll_secret_env, worker_secret_env);
        let worker_pod = pod_of(&children.worker);
        assert_eq!(pod.volumes, worker_pod.volumes);
        assert_eq!(c.volume_mounts, worker_pod.containers[0].volume_mounts);
        let files = |env: &[k8s_openapi::api::core::v1::EnvVar]| -> Vec<_> {
            env.iter()
                .filter(|e| e.name.ends_with("_FILE"))
                .cloned()
                .collect()
        };
        assert_eq!(files(&env), files(&env_of(&children.worker)));
        assert_eq!(
            pod_secrets(pod),
            [
                "av-key",
                "finnhub-key",
                "kafka-creds",
                "redis-ca",
                "redis-client",
                "redis-url"
            ]
            .map(String::from)
            .into()
        );
        // the workers and api do not get the keys, and do not change when polling is added
        let without = desired(&pipeline_with_every_secret(), 2);
        assert_eq!(children.worker, without.worker);
        assert_eq!(children.api, without.api);
        assert_eq!(children.config_map, without.config_map);
    }

    #[test]
    fn the_api_keys_are_used_only_when_their_secrets_are_offered() {
        let tp = with_polling(pipeline());
        let uses = secret_uses(&tp);
        let fields: Vec<_> = uses.iter().map(|u| (u.secret.as_str(), u.field)).collect();
        assert_eq!(
            fields,
            vec![
                (
                    "finnhub-key",
                    "spec.polling.providers.finnhub.apiKeySecretRef"
                ),
                (
                    "av-key",
                    "spec.polling.providers.alphaVantage.apiKeySecretRef"
                )
            ]
        );
        let children = desired(&tp, 2);
        let poll = children.polling.as_ref().unwrap();
        let named: BTreeSet<String> = uses.iter().map(|u| u.secret.clone()).collect();
        assert_eq!(
            pod_secrets(pod_of(poll)),
            named,
            "the field list and the pod agree"
        );
        let all = Offers::sort(&uses, |_| Ok(()));
        assert!(all.allow_deployment(poll));
        let no_av = Offers::sort(&uses, |s| match s {
            "av-key" => Err(Refusal::NotOffered),
            _ => Ok(()),
        });
        assert!(
            !no_av.allow_deployment(poll),
            "no pod with a key it may not use"
        );
        assert!(no_av.allow_deployment(&children.worker) && no_av.allow_deployment(&children.api));
    }

    #[test]
    fn a_changed_key_secret_or_setting_rolls_the_poll_connector_only() {
        let tp = with_polling(pipeline());
        let base = desired(&tp, 2);
        let poll_hash = |tp: &TickPipeline| hash_of(desired(tp, 2).polling.as_ref().unwrap());
        let mut other_key = tp.clone();
        other_key
            .spec
            .polling
            .as_mut()
            .unwrap()
            .providers
            .finnhub
            .as_mut()
            .unwrap()
            .api_key_secret_ref
            .name = "finnhub-key-2".into();
        assert_ne!(poll_hash(&other_key), poll_hash(&tp));
        assert_eq!(desired(&other_key, 2).worker, base.worker);
        // a setting is a literal of the pod template: a change rolls the pods by itself
        let mut scan = tp.clone();
        scan.spec.polling.as_mut().unwrap().scan_interval_ms = Some(250);
        let after = desired(&scan, 2);
        let p = after.polling.as_ref().unwrap();
        assert_ne!(
            p.spec.template,
            base.polling.as_ref().unwrap().spec.template
        );
        assert!(env_of(p).contains(&plain_env("TICKFLEET_POLL_SCAN_INTERVAL_MS", "250".into())));
        // a pipeline change the poller reads from the ConfigMap rolls it too
        let mut prefix = tp.clone();
        prefix.spec.store.key_prefix = "other".into();
        assert_ne!(poll_hash(&prefix), poll_hash(&tp));
        assert_eq!(hash_of(base.polling.as_ref().unwrap()).len(), 32);
        assert_eq!(
            config_data(&tp),
            config_data(&pipeline()),
            "nothing of polling in the ConfigMap"
        );
    }

    /// Every variable the poll connector's pods get is one `tickfleet-connector poll` reads: its own
    /// flags, Kafka's and Redis' (the ConfigMap's are checked for the workers).
    #[test]
    fn every_env_var_of_the_poll_connector_is_read_by_tickfleet_connector_poll() {
        let sources = [
            include_str!("../../../connector/src/poll/mod.rs"),
            include_str!("../../../service/src/kafka.rs"),
            include_str!("../../../store/src/redis/options.rs"),
        ];
        let mut tp = with_polling(pipeline_with_every_secret());
        let p = tp.spec.polling.as_mut().unwrap();
        p.scan_interval_ms = Some(200);
        p.cache_ttl_ms = Some(30_000);
        p.http_timeout_ms = Some(2_000);
        p.backoff_min_ms = Some(500);
        p.backoff_max_ms = Some(60_000);
        p.providers.finnhub.as_mut().unwrap().base_url = Some("http://fixture:8099".into());
        let d = desired(&tp, 1).polling.unwrap();
        let env = env_of(&d);
        assert_eq!(env.len(), 18, "{env:?}");
        for e in env {
            let needle = format!("env = \"{}\"", e.name);
            assert!(
                sources.iter().any(|s| s.contains(&needle)),
                "tickfleet-connector poll reads no {}",
                e.name
            );
        }
    }
}

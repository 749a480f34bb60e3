//! The pipeline config: the ConfigMap every component reads its `TICKFLEET_*` settings from, the
//! consumer group, and the hash that rolls the pods when either the config or a Secret reference
//! changes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::{Names, child_meta, secret_env, secret_mounts};
use crate::crd::TickPipeline;

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
    put(
        "TICKFLEET_REDIS_MODE",
        spec.store
            .redis
            .mode
            .unwrap_or_default()
            .as_str()
            .to_string(),
    );
    if let Some(pg) = &spec.store.postgres {
        put("TICKFLEET_STORE", "both".to_string());
        if let Some(schema) = &pg.schema {
            put("TICKFLEET_POSTGRES_SCHEMA", schema.clone());
        }
        if let Some(days) = pg.retention_days {
            put("TICKFLEET_POSTGRES_RETENTION_DAYS", days.to_string());
        }
    }
    if let Some(acks) = spec.store.redis.min_replica_acks {
        put("TICKFLEET_REDIS_MIN_REPLICA_ACKS", acks.to_string());
    }
    if let Some(r) = &spec.store.retention {
        if let Some(age) = r.max_age_seconds {
            put("TICKFLEET_RETENTION_MAX_AGE_SECS", age.to_string());
        }
        if let Some(count) = r.max_count {
            put("TICKFLEET_RETENTION_MAX_COUNT", count.to_string());
        }
    }
    if let Some(r) = spec
        .store
        .rollup_retention
        .as_ref()
        .and_then(|r| r.env_value())
    {
        put("TICKFLEET_ROLLUP_RETENTION", r);
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
    if let Some(ahead) = spec.workers.max_skew_ahead_seconds {
        put("TICKFLEET_MAX_SKEW_AHEAD_SECS", ahead.to_string());
    }
    if let Some(behind) = spec.workers.max_skew_behind_seconds {
        put("TICKFLEET_MAX_SKEW_BEHIND_SECS", behind.to_string());
    }
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
    for env in secret_env(tp, component) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::testing::{hash_of, tls_pipeline};
    use crate::desired::{CONFIG_HASH_ANNOTATION, desired};
    use crate::fixtures::pipeline;

    #[test]
    fn a_cluster_store_reaches_workers_and_api() {
        let mut tp = pipeline();
        tp.spec.store.redis.url = Some("redis://r-0:6379,redis://r-1:6379".into());
        tp.spec.store.redis.mode = Some(crate::crd::RedisMode::Cluster);
        tp.spec.store.redis.min_replica_acks = Some(1);
        let data = config_map(&tp).data.unwrap();
        assert_eq!(
            data["TICKFLEET_REDIS_URL"],
            "redis://r-0:6379,redis://r-1:6379"
        );
        assert_eq!(data["TICKFLEET_REDIS_MODE"], "cluster");
        assert_eq!(data["TICKFLEET_REDIS_MIN_REPLICA_ACKS"], "1");
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
        assert_eq!(data["TICKFLEET_REDIS_MODE"], "standalone");
        assert!(!data.contains_key("TICKFLEET_REDIS_MIN_REPLICA_ACKS"));
        assert_eq!(data["TICKFLEET_DRAIN_TIMEOUT_SECS"], "30");
        assert_eq!(data["TICKFLEET_LOG_FORMAT"], "json");
        assert!(
            !data.contains_key("TICKFLEET_ADMIN_ADDR"),
            "set per container"
        );
        assert!(!data.contains_key("TICKFLEET_KAFKA_SASL_PASSWORD"));
        // unset: the worker's own defaults (5 minutes ahead, 365 days behind)
        assert!(!data.contains_key("TICKFLEET_MAX_SKEW_AHEAD_SECS"));
        assert!(!data.contains_key("TICKFLEET_MAX_SKEW_BEHIND_SECS"));
        assert_eq!(cm.metadata.name.as_deref(), Some("btc-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("markets"));
    }

    /// The config hash on the worker pod template (a change rolls the workers).
    fn worker_hash(tp: &TickPipeline) -> String {
        desired(tp, 1)
            .worker
            .spec
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    }

    #[test]
    fn the_pipelines_skew_limits_reach_the_workers() {
        let mut tp = pipeline();
        tp.spec.workers.max_skew_ahead_seconds = Some(60);
        tp.spec.workers.max_skew_behind_seconds = Some(86_400);
        let cm = desired(&tp, 1).config_map;
        let data = cm.data.as_ref().unwrap();
        assert_eq!(data["TICKFLEET_MAX_SKEW_AHEAD_SECS"], "60");
        assert_eq!(data["TICKFLEET_MAX_SKEW_BEHIND_SECS"], "86400");
        // the workers read the ConfigMap as their environment, and a changed limit rolls them
        let mut wider = tp.clone();
        wider.spec.workers.max_skew_ahead_seconds = Some(600);
        assert_ne!(worker_hash(&tp), worker_hash(&wider));
    }

    #[test]
    fn the_pipelines_rollup_retention_reaches_the_workers() {
        let mut tp = pipeline();
        assert!(!config_data(&tp).contains_key("TICKFLEET_ROLLUP_RETENTION"));
        tp.spec.store.rollup_retention = Some(crate::crd::RollupRetentionSpec {
            one_second_max_age_seconds: Some(86_400),
            one_day_max_age_seconds: Some(0),
            ..Default::default()
        });
        let data = desired(&tp, 1).config_map.data.unwrap();
        // the worker's --rollup-retention syntax; bases not named keep the worker's default
        assert_eq!(data["TICKFLEET_ROLLUP_RETENTION"], "1s=86400s,1d=forever");
        let mut longer = tp.clone();
        longer.spec.store.rollup_retention = Some(crate::crd::RollupRetentionSpec {
            one_second_max_age_seconds: Some(2 * 86_400),
            ..Default::default()
        });
        assert_ne!(
            worker_hash(&tp),
            worker_hash(&longer),
            "a changed retention rolls the workers"
        );
        // an empty object sets nothing
        longer.spec.store.rollup_retention = Some(Default::default());
        assert!(!config_data(&longer).contains_key("TICKFLEET_ROLLUP_RETENTION"));
    }

    #[test]
    fn config_change_changes_the_hash_and_the_pod_template() {
        let tp = pipeline();
        let before = desired(&tp, 1);
        let mut changed = tp.clone();
        changed.spec.store.key_prefix = "other".into();
        let after = desired(&changed, 1);
        let h = hash_of;
        assert_ne!(h(&before.worker), h(&after.worker));
        assert_ne!(h(&before.api), h(&after.api));
        // and it is stable for an unchanged spec
        assert_eq!(h(&before.worker), h(&desired(&tp, 5).worker));
        assert_eq!(h(&before.worker).len(), 32);
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
    fn explicit_consumer_group_wins() {
        let mut tp = pipeline();
        tp.spec.kafka.consumer_group = Some("legacy".into());
        assert_eq!(consumer_group(&tp), "legacy");
    }
}

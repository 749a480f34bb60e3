//! The example in `manifests/example-pipeline.yaml` must be a valid TickPipeline: it parses into
//! the Rust type, every field it sets is a field of the type (no typo silently dropped), and the
//! operator's own validation accepts it.

use serde_json::Value;
use tickfleet_operator::TickPipeline;
use tickfleet_operator::desired::validate;

/// Whether every key/value in `part` is present in `whole` (arrays compared element-wise).
fn included(part: &Value, whole: &Value, path: &str) -> Result<(), String> {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => {
            for (k, v) in p {
                let sub = format!("{path}.{k}");
                let Some(wv) = w.get(k) else {
                    return Err(format!("{sub} is not a TickPipeline field"));
                };
                included(v, wv, &sub)?;
            }
            Ok(())
        }
        (Value::Array(p), Value::Array(w)) if p.len() == w.len() => {
            for (i, (pv, wv)) in p.iter().zip(w).enumerate() {
                included(pv, wv, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (p, w) if p == w => Ok(()),
        (p, w) => Err(format!("{path}: {p} became {w}")),
    }
}

/// Reads `manifests/FILE`, checks that it parses into a TickPipeline with every field it sets
/// known, and that the operator's validation accepts it once `kubectl apply -n` has put it in a
/// namespace.
fn valid_example(file: &str) -> TickPipeline {
    let path = format!("{}/../manifests/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("read example");
    let raw: Value = serde_saphyr::from_str(&text).expect("yaml");
    let mut tp: TickPipeline = serde_json::from_value(raw.clone()).expect("a TickPipeline");
    let round_trip = serde_json::to_value(&tp).expect("serialize");
    included(&raw, &round_trip, "").expect("every field is known");
    tp.metadata.namespace = Some("markets".into());
    assert_eq!(validate(&tp), Ok(()), "{file}");
    tp
}

#[test]
fn example_pipeline_is_valid() {
    let tp = valid_example("example-pipeline.yaml");
    assert!(
        tp.spec
            .workers
            .autoscaling
            .as_ref()
            .is_some_and(|a| a.enabled)
    );
}

/// `manifests/example-pipeline-cluster.yaml`: a pipeline on a Redis Cluster, valid and with the
/// cluster settings it shows.
#[test]
fn cluster_example_pipeline_is_valid() {
    let tp = valid_example("example-pipeline-cluster.yaml");
    let redis = &tp.spec.store.redis;
    assert_eq!(
        redis.mode,
        Some(tickfleet_operator::crd::RedisMode::Cluster)
    );
    assert_eq!(redis.min_replica_acks, Some(1));
    assert_eq!(redis.url.as_deref().unwrap().split(',').count(), 3);
}

/// `manifests/example-pipeline-postgres.yaml`: Redis plus PostgreSQL history, valid, its URL from a
/// Secret.
#[test]
fn postgres_example_pipeline_is_valid() {
    let tp = valid_example("example-pipeline-postgres.yaml");
    let pg = tp.spec.store.postgres.as_ref().unwrap();
    assert_eq!(pg.url_secret_ref.name, "tickfleet-postgres");
    assert_eq!(pg.schema.as_deref(), Some("history"));
    assert_eq!(pg.retention_days, Some(400));
}

#[test]
fn typo_in_a_field_is_caught() {
    let raw: Value = serde_json::json!({
        "apiVersion": "tickfleet.io/v1alpha1", "kind": "TickPipeline", "metadata": {"name": "x"},
        "spec": {"image": "i", "kafka": {"bootstrapServers": "k:9092", "topic": "t", "partitions": 1,
                 "partitons": 2}, "store": {"redis": {"url": "redis://r"}}}
    });
    let tp: TickPipeline =
        serde_json::from_value(raw.clone()).expect("parses: serde ignores unknown fields");
    let err = included(&raw, &serde_json::to_value(&tp).unwrap(), "").unwrap_err();
    assert_eq!(err, ".spec.kafka.partitons is not a TickPipeline field");
}

/// The TLS fields as `operator/README.md` and the commented example spell them.
#[test]
fn tls_fields_parse_as_documented() {
    let raw: Value = serde_json::json!({
        "apiVersion": "tickfleet.io/v1alpha1", "kind": "TickPipeline",
        "metadata": {"name": "btc", "namespace": "markets"},
        "spec": {"image": "i", "kafka": {"bootstrapServers": "k:9092", "topic": "t", "partitions": 1},
                 "store": {"redis": {"urlSecretRef": {"name": "redis-auth", "key": "url"},
                                     "tls": {"caSecretRef": {"name": "redis-ca", "key": "ca.crt"},
                                             "clientCertSecretName": "redis-client"}}},
                 "api": {"tls": {"secretName": "btc-api-tls"}}}
    });
    let tp: TickPipeline = serde_json::from_value(raw.clone()).expect("a TickPipeline");
    included(&raw, &serde_json::to_value(&tp).unwrap(), "").expect("every field is known");
    assert_eq!(validate(&tp), Ok(()));
    let redis_tls = tp.spec.store.redis.tls.as_ref().expect("redis tls");
    assert_eq!(
        redis_tls.client_cert_secret_name.as_deref(),
        Some("redis-client")
    );
    assert_eq!(
        tp.spec.api.tls.as_ref().map(|t| t.secret_name.as_str()),
        Some("btc-api-tls")
    );
}

/// `manifests/example-pipeline-polling.yaml`: a pipeline with the poll connector, valid, its API
/// keys from Secrets.
#[test]
fn polling_example_pipeline_is_valid() {
    let tp = valid_example("example-pipeline-polling.yaml");
    let polling = tp.spec.polling.as_ref().expect("spec.polling");
    assert_eq!(polling.replicas, 2);
    let finnhub = polling.providers.finnhub.as_ref().expect("finnhub");
    assert_eq!(finnhub.api_key_secret_ref.name, "finnhub-api-key");
    assert!(polling.providers.yahoo.is_some());
    let d = tickfleet_operator::desired::desired(&tp, 2)
        .polling
        .expect("a poll connector");
    assert_eq!(d.metadata.name.as_deref(), Some("btc-quotes-poll"));
}

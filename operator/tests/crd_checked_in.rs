//! The checked-in CRD must be exactly what `crdgen` prints, so the schema the API server enforces
//! matches the Rust types. Regenerate with:
//! `cargo run -p tickfleet-operator --bin crdgen > manifests/crd.yaml`

use std::process::Command;

#[test]
fn checked_in_crd_matches_crdgen() {
    let out = Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .output()
        .expect("run crdgen");
    assert!(
        out.status.success(),
        "crdgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("utf-8 yaml");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let checked_in = std::fs::read_to_string(path).expect("read manifests/crd.yaml");
    if generated != checked_in {
        let first_diff = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "lengths differ".to_string(),
                |i| format!("first difference at line {}", i + 1),
            );
        panic!(
            "manifests/crd.yaml is out of date ({first_diff}); regenerate with \
             `cargo run -p tickfleet-operator --bin crdgen > manifests/crd.yaml`"
        );
    }
}

#[test]
fn crd_declares_scale_subresource_and_short_name() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "tp");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(
        v["subresources"]["scale"]["specReplicasPath"],
        ".spec.workers.replicas"
    );
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    for want in ["Ready", "Workers", "Lag", "Age"] {
        assert!(columns.contains(&want), "missing column {want}");
    }
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|r| r.as_str().expect("str"))
        .collect();
    assert_eq!(required, vec!["image", "kafka", "store"]);
    assert_eq!(
        spec["properties"]["kafka"]["properties"]["format"]["enum"],
        serde_json::json!(["protobuf", "json"])
    );
}

#[test]
fn autoscaling_disabled_needs_nothing_else() {
    // seen on a real apiserver: `autoscaling: {enabled: false}` was rejected because maxReplicas
    // and targetLagPerWorker were required
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let a = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["workers"]["properties"]["autoscaling"];
    assert_eq!(a["required"], serde_json::Value::Null, "{a}");
    let rules: Vec<&str> = a["x-kubernetes-validations"]
        .as_array()
        .expect("CEL rules")
        .iter()
        .map(|r| r["rule"].as_str().expect("rule"))
        .collect();
    assert!(
        rules.contains(&"!self.enabled || (has(self.maxReplicas) && has(self.targetLagPerWorker))"),
        "{rules:?}"
    );
    let spec: tickfleet_operator::crd::AutoscalingSpec =
        serde_json::from_value(serde_json::json!({"enabled": false}))
            .expect("enabled: false alone");
    assert!(!spec.enabled);
    let mut tp = tickfleet_operator::TickPipeline::new(
        "btc",
        serde_json::from_value(serde_json::json!({
            "image": "i", "kafka": {"bootstrapServers": "k:9092", "topic": "t", "partitions": 4},
            "store": {"redis": {"url": "redis://r:6379"}},
            "workers": {"replicas": 2, "autoscaling": {"enabled": false}}
        }))
        .expect("spec"),
    );
    tp.metadata.namespace = Some("markets".into());
    assert_eq!(tickfleet_operator::desired::validate(&tp), Ok(()));
}

/// The skew limits reach the worker as seconds it turns into 64-bit nanoseconds: the API server
/// refuses 0 (every tick a nanosecond ahead would be dead-lettered) and anything that overflows.
#[test]
fn crd_bounds_the_skew_limits() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let workers = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["workers"]["properties"];
    for field in ["maxSkewAheadSeconds", "maxSkewBehindSeconds"] {
        assert_eq!(workers[field]["type"], "integer", "{field}");
        assert_eq!(workers[field]["minimum"], 1.0, "{field}");
        assert_eq!(workers[field]["maximum"], 9_223_372_036.0, "{field}");
    }
}

#[test]
fn redis_mode_and_replica_acks_are_validated_by_the_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let redis = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["store"]["properties"]["redis"];
    assert_eq!(
        redis["properties"]["mode"]["enum"],
        serde_json::json!(["standalone", "cluster"])
    );
    assert_eq!(
        redis["properties"]["minReplicaAcks"]["minimum"].as_f64(),
        Some(0.0)
    );
    let rules: Vec<&str> = redis["x-kubernetes-validations"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["rule"].as_str().expect("rule"))
        .collect();
    // The rule that spans fields: seeds need cluster mode (which takes TLS files like one server).
    assert!(
        rules.contains(
            &"!has(self.url) || !self.url.contains(',') || (has(self.mode) && self.mode == 'cluster')"
        ),
        "{rules:?}"
    );
    assert!(
        !rules
            .iter()
            .any(|r| r.contains("self.tls") && r.contains("cluster")),
        "{rules:?}"
    );
}

/// Issue 19 (seen on the real API server v1.28): the CRD was refused — "estimated rule cost
/// exceeds budget by factor of 8.1x" for the `sources` CEL rules — because the strings they
/// compare (a source's exchange, its symbols) had no `maxLength`, so the API server priced each
/// comparison at the largest request. Every list and string those rules walk is bounded.
#[test]
fn the_sources_cel_rules_walk_only_bounded_lists_and_strings() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let sources = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["sources"];
    assert!(
        sources["x-kubernetes-validations"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    );
    assert!(sources["maxItems"].as_u64().is_some(), "sources: maxItems");
    let source = &sources["items"]["properties"];
    for field in ["name", "exchange"] {
        assert!(
            source[field]["maxLength"].as_u64().is_some(),
            "sources[].{field}: maxLength"
        );
    }
    assert!(
        source["symbols"]["maxItems"].as_u64().is_some(),
        "symbols: maxItems"
    );
    assert!(
        source["symbols"]["items"]["maxLength"].as_u64().is_some(),
        "symbols[]: maxLength"
    );
}

/// `store.rollupRetention` is four optional ages in seconds, none negative (0 keeps for ever); a
/// pipeline that sets some of them is valid and reaches the workers' ConfigMap.
#[test]
fn crd_declares_rollup_retention_per_base() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let r = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["store"]["properties"]["rollupRetention"];
    assert_eq!(r["type"], "object", "{r}");
    assert_eq!(r["required"], serde_json::Value::Null, "{r}");
    for field in [
        "oneSecondMaxAgeSeconds",
        "oneMinuteMaxAgeSeconds",
        "oneHourMaxAgeSeconds",
        "oneDayMaxAgeSeconds",
    ] {
        assert_eq!(r["properties"][field]["type"], "integer", "{field}");
        assert_eq!(r["properties"][field]["minimum"], 0.0, "{field}");
    }
    let mut tp = tickfleet_operator::TickPipeline::new(
        "btc",
        serde_json::from_value(serde_json::json!({
            "image": "i", "kafka": {"bootstrapServers": "k:9092", "topic": "t", "partitions": 4},
            "store": {"redis": {"url": "redis://r:6379"},
                      "rollupRetention": {"oneSecondMaxAgeSeconds": 86400, "oneHourMaxAgeSeconds": 0}},
        }))
        .expect("spec"),
    );
    tp.metadata.namespace = Some("markets".into());
    assert_eq!(tickfleet_operator::desired::validate(&tp), Ok(()));
    let data = tickfleet_operator::desired::config_data(&tp);
    assert_eq!(data["TICKFLEET_ROLLUP_RETENTION"], "1s=86400s,1h=forever");
}

/// `spec.polling`: replicas, providers (Finnhub and Alpha Vantage need a key's Secret, Yahoo takes
/// none), base URLs that must be HTTP(S), and the backoff bounds' rule that spans two fields.
#[test]
fn crd_declares_polling_with_keys_from_secrets_and_a_backoff_rule() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd.yaml");
    let crd: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).expect("read crd")).expect("yaml");
    let polling = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["polling"];
    let p = &polling["properties"];
    assert_eq!(p["replicas"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(p["replicas"]["default"], 1);
    assert_eq!(
        p["leaseTtlMs"]["minimum"].as_f64(),
        Some(300.0),
        "the connector's floor"
    );
    assert_eq!(p["scanIntervalMs"]["minimum"].as_f64(), Some(50.0));
    let providers = &p["providers"]["properties"];
    for keyed in ["finnhub", "alphaVantage"] {
        let k = &providers[keyed];
        assert_eq!(
            k["required"],
            serde_json::json!(["apiKeySecretRef"]),
            "{keyed}"
        );
        assert_eq!(
            k["properties"]["apiKeySecretRef"]["required"],
            serde_json::json!(["key", "name"]),
            "{keyed}"
        );
        assert_eq!(k["properties"]["baseUrl"]["pattern"], "^https?://");
    }
    assert_eq!(
        providers["yahoo"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["baseUrl"],
        "Yahoo takes no key"
    );
    let rules: Vec<&str> = polling["x-kubernetes-validations"]
        .as_array()
        .expect("CEL rules")
        .iter()
        .map(|r| r["rule"].as_str().expect("rule"))
        .collect();
    assert_eq!(
        rules,
        [
            "(has(self.backoffMinMs) ? self.backoffMinMs : 1000) <= (has(self.backoffMaxMs) ? self.backoffMaxMs : 300000)"
        ]
    );
}

//! Checks of a pipeline that the CRD schema may not have caught.

use kube::ResourceExt;

use super::MAX_NAME_LEN;
use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{MAX_SOURCE_SYMBOLS, PollingSpec, SecurityProtocol, SourceSpec, TickPipeline};
use tickfleet_service::Symbol;

/// Largest skew limit a worker can apply: the seconds a 64-bit nanosecond clock difference holds.
const MAX_SKEW_SECONDS: i64 = i64::MAX / 1_000_000_000;

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
    let cluster = redis.mode == Some(crate::crd::RedisMode::Cluster);
    if !cluster && redis.url.as_ref().is_some_and(|u| u.contains(',')) {
        problems
            .push("several comma-separated store.redis.url seeds need mode: cluster".to_string());
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
    for (field, limit) in [
        ("maxSkewAheadSeconds", spec.workers.max_skew_ahead_seconds),
        ("maxSkewBehindSeconds", spec.workers.max_skew_behind_seconds),
    ] {
        if limit.is_some_and(|s| !(1..=MAX_SKEW_SECONDS).contains(&s)) {
            problems.push(format!(
                "workers.{field} must be between 1 and {MAX_SKEW_SECONDS}"
            ));
        }
    }
    if let Some(r) = &spec.store.rollup_retention {
        for (_, field, age) in r.ages() {
            if age.is_some_and(|a| a < 0) {
                problems.push(format!(
                    "store.rollupRetention.{field} must not be negative (0 keeps for ever)"
                ));
            }
        }
    }
    // `autoscaling: {enabled: false}` needs nothing else
    if let Some(a) = spec.workers.autoscaling.as_ref().filter(|a| a.enabled) {
        if a.min_replicas < 1 {
            problems.push("workers.autoscaling.minReplicas must be at least 1".to_string());
        }
        if a.max_replicas < 1 {
            problems.push(
                "workers.autoscaling.maxReplicas is required when autoscaling is enabled"
                    .to_string(),
            );
        } else if a.max_replicas < a.min_replicas {
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
    if !(1..=65535).contains(&spec.api.http_port) {
        problems.push("api.httpPort must be between 1 and 65535".to_string());
    } else if spec.api.http_port == spec.api.port {
        problems.push("api.httpPort must differ from api.port".to_string());
    } else if spec.api.http_port == super::API_ADMIN_PORT {
        problems.push(format!(
            "api.httpPort must differ from the admin port {}",
            super::API_ADMIN_PORT
        ));
    }
    if spec
        .api
        .tls
        .as_ref()
        .is_some_and(|t| t.secret_name.is_empty())
    {
        problems.push("api.tls.secretName must not be empty".to_string());
    }
    validate_sources(&spec.sources, &mut problems);
    if let Some(polling) = &spec.polling {
        validate_polling(polling, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A DNS label of at most 20 characters (a source's name, part of its Deployment's name).
fn is_source_name(s: &str) -> bool {
    (1..=20).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_sources(sources: &[SourceSpec], problems: &mut Vec<String>) {
    if sources.len() > 16 {
        problems.push("at most 16 sources".to_string());
    }
    let mut names = BTreeSet::new();
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for source in sources {
        let name = source.name();
        if !is_source_name(name) {
            problems.push(format!(
                "sources: name {name:?} must be 1-20 lower-case letters, digits or '-'"
            ));
        }
        if !names.insert(name) {
            problems.push(format!(
                "sources: two sources are named {name:?} (a source's name defaults to its exchange)"
            ));
        }
        if source.symbols.is_empty() || source.symbols.len() > MAX_SOURCE_SYMBOLS {
            problems.push(format!("sources.{name}: 1 to {MAX_SOURCE_SYMBOLS} symbols"));
        }
        for symbol in &source.symbols {
            if !Symbol::is_canonical(symbol) {
                problems.push(format!(
                    "sources.{name}: symbol {symbol:?} is not BASE-QUOTE in upper case (e.g. BTC-USDT)"
                ));
            } else if let Some(first) = owner.insert(symbol, name) {
                problems.push(if first == name {
                    format!("sources.{name}: symbol {symbol} is listed twice")
                } else {
                    format!(
                        "sources: symbol {symbol} is in both {first} and {name}; one pipeline takes each asset from one venue"
                    )
                });
            }
        }
        if source
            .ws_url
            .as_ref()
            .is_some_and(|u| !(u.starts_with("ws://") || u.starts_with("wss://")))
        {
            problems.push(format!(
                "sources.{name}: wsUrl must start with ws:// or wss://"
            ));
        }
    }
}

/// The connector's defaults of `--backoff-min-ms` and `--backoff-max-ms`.
const BACKOFF_DEFAULTS_MS: (i64, i64) = (1_000, 300_000);

fn validate_polling(polling: &PollingSpec, problems: &mut Vec<String>) {
    if !(0..=64).contains(&polling.replicas) {
        problems.push("polling.replicas must be between 0 and 64".to_string());
    }
    let providers = &polling.providers;
    let keyed = [
        ("finnhub", providers.finnhub.as_ref()),
        ("alphaVantage", providers.alpha_vantage.as_ref()),
    ];
    for (name, p) in keyed {
        let Some(p) = p else { continue };
        let r = &p.api_key_secret_ref;
        if r.name.is_empty() || r.key.is_empty() {
            problems.push(format!(
                "polling.providers.{name}.apiKeySecretRef needs a name and a key"
            ));
        }
    }
    let urls = keyed
        .iter()
        .map(|(name, p)| (*name, p.and_then(|p| p.base_url.as_ref())))
        .chain([(
            "yahoo",
            providers.yahoo.as_ref().and_then(|p| p.base_url.as_ref()),
        )]);
    for (name, url) in urls {
        if url.is_some_and(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            problems.push(format!(
                "polling.providers.{name}.baseUrl must start with http:// or https://"
            ));
        }
    }
    for (field, value, min, max) in [
        ("leaseTtlMs", polling.lease_ttl_ms, 300, 3_600_000),
        ("scanIntervalMs", polling.scan_interval_ms, 50, 3_600_000),
        ("cacheTtlMs", polling.cache_ttl_ms, 1, 86_400_000),
        ("httpTimeoutMs", polling.http_timeout_ms, 1, 600_000),
        ("backoffMinMs", polling.backoff_min_ms, 1, 86_400_000),
        ("backoffMaxMs", polling.backoff_max_ms, 1, 86_400_000),
    ] {
        if value.is_some_and(|v| !(min..=max).contains(&v)) {
            problems.push(format!("polling.{field} must be between {min} and {max}"));
        }
    }
    let (min, max) = BACKOFF_DEFAULTS_MS;
    if polling.backoff_max_ms.unwrap_or(max) < polling.backoff_min_ms.unwrap_or(min) {
        problems.push(
            "polling.backoffMaxMs must be at least backoffMinMs (defaults 300000 and 1000)"
                .to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::testing::tls_pipeline;
    use crate::fixtures::pipeline;

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

    #[test]
    fn skew_limits_must_be_positive_and_fit_a_nanosecond_clock() {
        let mut tp = pipeline();
        tp.spec.workers.max_skew_ahead_seconds = Some(1);
        tp.spec.workers.max_skew_behind_seconds = Some(MAX_SKEW_SECONDS);
        assert_eq!(validate(&tp), Ok(()));
        tp.spec.workers.max_skew_ahead_seconds = Some(0);
        tp.spec.workers.max_skew_behind_seconds = Some(MAX_SKEW_SECONDS + 1);
        assert_eq!(
            validate(&tp).unwrap_err(),
            "workers.maxSkewAheadSeconds must be between 1 and 9223372036; \
             workers.maxSkewBehindSeconds must be between 1 and 9223372036"
        );
    }

    #[test]
    fn rollup_retention_must_not_be_negative() {
        let mut tp = pipeline();
        tp.spec.store.rollup_retention = Some(crate::crd::RollupRetentionSpec {
            one_second_max_age_seconds: Some(0),
            one_hour_max_age_seconds: Some(3_600),
            ..Default::default()
        });
        assert_eq!(validate(&tp), Ok(()));
        tp.spec.store.rollup_retention = Some(crate::crd::RollupRetentionSpec {
            one_minute_max_age_seconds: Some(-1),
            ..Default::default()
        });
        assert_eq!(
            validate(&tp).unwrap_err(),
            "store.rollupRetention.oneMinuteMaxAgeSeconds must not be negative (0 keeps for ever)"
        );
    }

    #[test]
    fn the_http_port_must_be_free_and_in_range() {
        let mut tp = pipeline();
        tp.spec.api.http_port = tp.spec.api.port;
        assert_eq!(
            validate(&tp).unwrap_err(),
            "api.httpPort must differ from api.port"
        );
        tp.spec.api.http_port = 9091;
        assert_eq!(
            validate(&tp).unwrap_err(),
            "api.httpPort must differ from the admin port 9091"
        );
        tp.spec.api.http_port = 0;
        assert_eq!(
            validate(&tp).unwrap_err(),
            "api.httpPort must be between 1 and 65535"
        );
        tp.spec.api.http_port = 8081;
        assert_eq!(validate(&tp), Ok(()));
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

    #[test]
    fn cluster_mode_rules_span_the_url_and_take_tls() {
        let mut tp = pipeline();
        tp.spec.store.redis.url = Some("redis://a:6379,redis://b:6379".into());
        assert_eq!(
            validate(&tp).unwrap_err(),
            "several comma-separated store.redis.url seeds need mode: cluster"
        );
        tp.spec.store.redis.mode = Some(crate::crd::RedisMode::Cluster);
        assert_eq!(validate(&tp), Ok(()));
        let mut tls = tls_pipeline();
        tls.spec.store.redis.mode = Some(crate::crd::RedisMode::Cluster);
        // A private CA and client certificate work on a cluster too (every node, the same files).
        assert_eq!(validate(&tls), Ok(()));
    }

    fn source(name: Option<&str>, exchange: crate::crd::Exchange, symbols: &[&str]) -> SourceSpec {
        SourceSpec {
            name: name.map(Into::into),
            exchange,
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            ws_url: None,
            resources: None,
        }
    }

    #[test]
    fn sources_are_checked_like_the_crd_checks_them() {
        use crate::crd::Exchange::{Binance, Kraken};
        let mut tp = pipeline();
        tp.spec.sources = vec![
            source(None, Binance, &["BTC-USDT", "ETH-USDT"]),
            source(None, Kraken, &["SOL-USD"]),
        ];
        assert_eq!(validate(&tp), Ok(()));
        // malformed symbols, a symbol in two sources, a name used twice, a bad URL
        tp.spec.sources = vec![
            source(None, Binance, &["btc-usdt", "BTCUSDT", "ETH-USDT"]),
            source(Some("spare"), Binance, &["ETH-USDT"]),
            source(Some("Bad_Name"), Kraken, &["SOL-USD", "SOL-USD"]),
            source(Some("binance"), Kraken, &["XRP-USD"]),
        ];
        tp.spec.sources[0].ws_url = Some("http://proxy".into());
        assert_eq!(
            validate(&tp).unwrap_err(),
            "sources.binance: symbol \"btc-usdt\" is not BASE-QUOTE in upper case (e.g. BTC-USDT); \
             sources.binance: symbol \"BTCUSDT\" is not BASE-QUOTE in upper case (e.g. BTC-USDT); \
             sources.binance: wsUrl must start with ws:// or wss://; \
             sources: symbol ETH-USDT is in both binance and spare; one pipeline takes each asset from one venue; \
             sources: name \"Bad_Name\" must be 1-20 lower-case letters, digits or '-'; \
             sources.Bad_Name: symbol SOL-USD is listed twice; \
             sources: two sources are named \"binance\" (a source's name defaults to its exchange)"
        );
        // an empty source
        tp.spec.sources = vec![source(Some("b2"), Binance, &[])];
        assert_eq!(
            validate(&tp).unwrap_err(),
            format!("sources.b2: 1 to {MAX_SOURCE_SYMBOLS} symbols")
        );
    }

    #[test]
    fn polling_is_checked_like_the_crd_checks_it() {
        let mut tp = crate::fixtures::with_polling(pipeline());
        assert_eq!(validate(&tp), Ok(()));
        let p = tp.spec.polling.as_mut().unwrap();
        p.replicas = -1;
        p.providers.finnhub.as_mut().unwrap().api_key_secret_ref.key = String::new();
        p.providers.yahoo.as_mut().unwrap().base_url = Some("ftp://yahoo".into());
        p.lease_ttl_ms = Some(100);
        p.backoff_min_ms = Some(2_000);
        p.backoff_max_ms = Some(1_000);
        assert_eq!(
            validate(&tp).unwrap_err(),
            "polling.replicas must be between 0 and 64; \
             polling.providers.finnhub.apiKeySecretRef needs a name and a key; \
             polling.providers.yahoo.baseUrl must start with http:// or https://; \
             polling.leaseTtlMs must be between 300 and 3600000; \
             polling.backoffMaxMs must be at least backoffMinMs (defaults 300000 and 1000)"
        );
        // a backoff minimum above the default maximum needs a maximum too
        let p = tp.spec.polling.as_mut().unwrap();
        *p = serde_json::from_value(serde_json::json!({"backoffMinMs": 600000})).unwrap();
        assert_eq!(p.replicas, 1, "one pod unless asked for more");
        assert_eq!(
            validate(&tp).unwrap_err(),
            "polling.backoffMaxMs must be at least backoffMinMs (defaults 300000 and 1000)"
        );
    }
}

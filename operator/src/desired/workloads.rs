//! The workloads of a pipeline: the worker Deployment (capped at the topic's partitions) and its
//! PodDisruptionBudget, the api Deployment and its Service, one connector Deployment per source (the
//! poll connector's is in `polling`).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerPort, EnvVar, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{ComponentPod, component_deployment, plain_env};
use super::{
    API_ADMIN_PORT, CONNECTOR_ADMIN_PORT, GRACE_MARGIN_SECONDS, Names, WORKER_ADMIN_PORT,
    child_meta, selector_labels,
};
use crate::crd::{SourceSpec, TickPipeline};

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

/// The worker Deployment running `replicas` workers (already capped at the partition count).
pub fn worker_deployment(tp: &TickPipeline, replicas: i32, hash: &str) -> Deployment {
    let workers = &tp.spec.workers;
    component_deployment(
        tp,
        &Names::of(tp).worker,
        hash,
        ComponentPod {
            component: "worker",
            source: None,
            binary: "tickfleet-worker",
            args: vec![],
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
            source: None,
            binary: "tickfleet-api",
            args: vec![],
            admin_port: API_ADMIN_PORT,
            extra_ports: vec![
                ContainerPort {
                    name: Some("grpc".to_string()),
                    container_port: api.port,
                    protocol: Some("TCP".to_string()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("http".to_string()),
                    container_port: api.http_port,
                    protocol: Some("TCP".to_string()),
                    ..ContainerPort::default()
                },
            ],
            extra_env: api_env(tp),
            resources: api.resources.clone(),
            grace_seconds: 30,
            replicas: api.replicas,
        },
    )
}

/// The api container's own settings: its addresses, when set its rate limits, and the late-tick
/// horizon of its immutable candles from the workers' skew-behind limit (plus a day of margin).
fn api_env(tp: &TickPipeline) -> Vec<EnvVar> {
    let api = &tp.spec.api;
    let mut env = vec![
        plain_env("TICKFLEET_GRPC_ADDR", format!("0.0.0.0:{}", api.port)),
        plain_env("TICKFLEET_HTTP_ADDR", format!("0.0.0.0:{}", api.http_port)),
    ];
    if let Some(behind) = tp.spec.workers.max_skew_behind_seconds {
        env.push(plain_env(
            "TICKFLEET_CANDLES_IMMUTABLE_AFTER_SECS",
            behind.saturating_add(86_400).to_string(),
        ));
    }
    if let Some(r) = &api.rate_limit {
        let max_clients = r.max_clients.map(|n| n.to_string());
        for (name, value) in [
            ("TICKFLEET_RATE_LIMIT_READS", &r.reads),
            ("TICKFLEET_RATE_LIMIT_RANGES", &r.ranges),
            ("TICKFLEET_RATE_LIMIT_STREAMS", &r.streams),
            ("TICKFLEET_RATE_LIMIT_WRITES", &r.writes),
            ("TICKFLEET_RATE_LIMIT_KEY_HEADER", &r.key_header),
            ("TICKFLEET_RATE_LIMIT_MAX_CLIENTS", &max_clients),
        ] {
            if let Some(v) = value {
                env.push(plain_env(name, v.clone()));
            }
        }
    }
    env
}

/// The connector Deployment of one source: one pod reading the venue's trade stream and producing
/// to the pipeline's topic in the pipeline's format (`TICKFLEET_TOPIC`, `TICKFLEET_FORMAT` and the
/// Kafka settings come from the ConfigMap, the SASL credentials from their Secret).
///
/// One replica: a venue's stream cannot be split between pods. During a rollout the new pod starts
/// before the old one stops (`maxSurge` 1, `maxUnavailable` 0), so for a moment both produce the
/// same trades; that costs nothing, since a trade's identity is the venue's trade id and the store
/// keeps it once. A hot standby would work the same way (a second pod on the same symbols, twice
/// the Kafka traffic, no gap when one dies), which is why none is needed for correctness.
pub fn source_deployment(tp: &TickPipeline, source: &SourceSpec, hash: &str) -> Deployment {
    let mut env = vec![
        plain_env("TICKFLEET_EXCHANGE", source.exchange.as_str().to_string()),
        plain_env("TICKFLEET_SYMBOLS", source.symbols.join(",")),
    ];
    if let Some(url) = &source.ws_url {
        env.push(plain_env("TICKFLEET_WS_URL", url.clone()));
    }
    component_deployment(
        tp,
        &Names::source(tp, source.name()),
        hash,
        ComponentPod {
            component: "connector",
            source: Some(source.name()),
            binary: "tickfleet-connector",
            args: vec![],
            admin_port: CONNECTOR_ADMIN_PORT,
            extra_ports: vec![],
            extra_env: env,
            resources: source.resources.clone(),
            grace_seconds: i64::from(tp.spec.workers.drain_timeout_seconds) + GRACE_MARGIN_SECONDS,
            replicas: 1,
        },
    )
}

/// The api Service: gRPC (`grpc`) and REST (`http`).
pub fn api_service(tp: &TickPipeline) -> Service {
    let api = &tp.spec.api;
    Service {
        metadata: child_meta(tp, &Names::of(tp).api, Some("api")),
        spec: Some(ServiceSpec {
            type_: Some(api.service_type.as_str().to_string()),
            selector: Some(selector_labels(tp, "api")),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".to_string()),
                    port: api.port,
                    target_port: Some(IntOrString::String("grpc".to_string())),
                    protocol: Some("TCP".to_string()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("http".to_string()),
                    port: api.http_port,
                    target_port: Some(IntOrString::String("http".to_string())),
                    protocol: Some("TCP".to_string()),
                    ..ServicePort::default()
                },
            ]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::testing::env_of;
    use crate::desired::{config_data, worker_selector_string};
    use crate::fixtures::pipeline;

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
    fn rate_limits_pass_through_to_the_api_pods() {
        let mut tp = pipeline();
        tp.spec.api.rate_limit = Some(crate::crd::RateLimitSpec {
            reads: Some("100/s:200".into()),
            streams: Some("off".into()),
            key_header: Some("x-api-key".into()),
            max_clients: Some(5000),
            ..Default::default()
        });
        let env = env_of(&api_deployment(&tp, "h"));
        for (name, value) in [
            ("TICKFLEET_RATE_LIMIT_READS", "100/s:200"),
            ("TICKFLEET_RATE_LIMIT_STREAMS", "off"),
            ("TICKFLEET_RATE_LIMIT_KEY_HEADER", "x-api-key"),
            ("TICKFLEET_RATE_LIMIT_MAX_CLIENTS", "5000"),
        ] {
            assert!(env.contains(&plain_env(name, value.into())), "{name}");
        }
        assert!(!env.iter().any(|e| e.name == "TICKFLEET_RATE_LIMIT_RANGES"));
        // Immutable candles wait for the workers' skew-behind limit (and a day), unset = the api's
        // default for the workers' default.
        assert!(
            !env.iter()
                .any(|e| e.name == "TICKFLEET_CANDLES_IMMUTABLE_AFTER_SECS")
        );
        tp.spec.workers.max_skew_behind_seconds = Some(3600);
        let env = env_of(&api_deployment(&tp, "h"));
        assert!(env.contains(&plain_env(
            "TICKFLEET_CANDLES_IMMUTABLE_AFTER_SECS",
            "90000".into()
        )));
    }

    #[test]
    fn api_deployment_and_service_expose_grpc_and_http() {
        let mut tp = pipeline();
        tp.spec.api.port = 6000;
        tp.spec.api.http_port = 6080;
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
        assert_eq!(
            ports,
            vec![
                ("admin".into(), 9091),
                ("grpc".into(), 6000),
                ("http".into(), 6080)
            ]
        );
        let env = env_of(&d);
        assert!(env.contains(&plain_env("TICKFLEET_GRPC_ADDR", "0.0.0.0:6000".into())));
        assert!(env.contains(&plain_env("TICKFLEET_HTTP_ADDR", "0.0.0.0:6080".into())));
        assert!(env.contains(&plain_env("TICKFLEET_ADMIN_ADDR", "0.0.0.0:9091".into())));
        assert!(
            env.iter()
                .all(|e| !e.name.starts_with("TICKFLEET_RATE_LIMIT")),
            "no rate limits unless asked for"
        );
        let svc = api_service(&tp);
        let s = svc.spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        let ports: Vec<_> = s
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p.name.clone().unwrap(),
                    p.port,
                    p.target_port.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            vec![
                ("grpc".into(), 6000, IntOrString::String("grpc".into())),
                ("http".into(), 6080, IntOrString::String("http".into()))
            ]
        );
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
    fn each_source_is_one_locked_down_connector_pod_with_only_the_kafka_secrets() {
        use crate::desired::SOURCE_LABEL;
        let mut tp = crate::fixtures::pipeline_with_every_secret();
        tp.spec.sources = serde_json::from_value(serde_json::json!([
            {"exchange": "binance", "symbols": ["BTC-USDT", "ETH-USDT"]},
            {"name": "kraken-eu", "exchange": "kraken", "symbols": ["SOL-USD"],
             "wsUrl": "wss://proxy.internal/kraken"}
        ]))
        .unwrap();
        let children = crate::desired::desired(&tp, 2);
        assert_eq!(children.sources.len(), 2);
        let d = &children.sources[1];
        assert_eq!(d.metadata.name.as_deref(), Some("btc-source-kraken-eu"));
        assert_eq!(d.spec.replicas, Some(1), "a venue's stream is not split");
        let selector = d.spec.selector.match_labels.clone().unwrap();
        assert_eq!(selector[SOURCE_LABEL], "kraken-eu");
        assert_eq!(selector["app.kubernetes.io/component"], "connector");
        // the two connectors never select each other's pods
        let other = children.sources[0]
            .spec
            .selector
            .match_labels
            .clone()
            .unwrap();
        assert_eq!(other[SOURCE_LABEL], "binance");
        assert_ne!(selector, other);
        let pod = d.spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.command.as_ref().unwrap()[0],
            "/usr/local/bin/tickfleet-connector"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_user,
            Some(65532)
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        let env = env_of(d);
        for (k, v) in [
            ("TICKFLEET_EXCHANGE", "kraken"),
            ("TICKFLEET_SYMBOLS", "SOL-USD"),
            ("TICKFLEET_WS_URL", "wss://proxy.internal/kraken"),
            ("TICKFLEET_ADMIN_ADDR", "0.0.0.0:9092"),
        ] {
            assert!(env.contains(&plain_env(k, v.into())), "{k} in {env:?}");
        }
        assert!(
            !env_of(&children.sources[0])
                .iter()
                .any(|e| e.name == "TICKFLEET_WS_URL"),
            "the venue's public endpoint unless wsUrl is set"
        );
        // Kafka credentials yes; the Redis URL, Redis TLS files and the api certificate no
        let secret_vars: Vec<&str> = env
            .iter()
            .filter(|e| e.value_from.is_some())
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            secret_vars,
            vec![
                "TICKFLEET_KAFKA_SASL_USERNAME",
                "TICKFLEET_KAFKA_SASL_PASSWORD"
            ]
        );
        let volumes: Vec<&str> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, vec!["tmp"]);
        // the topic, brokers and format come from the pipeline's ConfigMap, as for the workers
        let from = c.env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap();
        assert_eq!(from.name, "btc-config");
        assert_eq!(config_data(&tp)["TICKFLEET_FORMAT"], "protobuf");
    }
}

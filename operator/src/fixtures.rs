//! Test helpers: sample pipelines and a mocked Kubernetes API server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{
    ApiSpec, KafkaSpec, LogFormat, MessageFormat, RedisSpec, StoreSpec, TickPipeline,
    TickPipelineSpec, WorkersSpec,
};

/// A valid pipeline `markets/btc` with uid and generation, as the API server would hand it over.
pub fn pipeline() -> TickPipeline {
    let mut tp = TickPipeline::new(
        "btc",
        TickPipelineSpec {
            kafka: KafkaSpec {
                bootstrap_servers: "kafka-0:9092,kafka-1:9092".into(),
                topic: "ticks".into(),
                partitions: 6,
                replication_factor: None,
                consumer_group: None,
                format: MessageFormat::Protobuf,
                auth: None,
            },
            store: StoreSpec {
                redis: RedisSpec {
                    url: Some("redis://redis:6379".into()),
                    url_secret_ref: None,
                },
                key_prefix: "tf".into(),
                retention: None,
            },
            workers: WorkersSpec {
                replicas: 2,
                ..WorkersSpec::default()
            },
            api: ApiSpec::default(),
            image: "ghcr.io/tickfleet/tickfleet:0.1.0".into(),
            image_pull_policy: None,
            log_format: LogFormat::Json,
        },
    );
    tp.metadata = ObjectMeta {
        name: Some("btc".into()),
        namespace: Some("markets".into()),
        uid: Some("6b0e4a57-0d0c-4b37-9c2f-6a51d6e1f0aa".into()),
        generation: Some(3),
        resource_version: Some("1000".into()),
        ..ObjectMeta::default()
    };
    tp
}

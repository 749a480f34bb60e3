//! Issue 11 #5, the confused deputy: a pipeline may use only Secrets offered to it. Reconciles
//! against the mocked API server, asserting which Secrets were read and which children applied.

use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::crd::{
    CredentialsSecretRef, KafkaAuth, SaslMechanism, SaslSpec, SecurityProtocol, TickPipelineStatus,
};
use crate::fixtures::{
    ApiServer, EVERY_SECRET, FakeKafka, Recorded, pipeline, pipeline_with_every_secret,
};
use crate::offer::ALLOWED_PIPELINES_ANNOTATION;

const SECRETS: &str = "/api/v1/namespaces/markets/secrets";
const WORKER: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-worker";
const API: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-api";
const STATUS: &str = "/apis/tickfleet.io/v1alpha1/namespaces/markets/tickpipelines/btc/status";

/// A Secret with a username and password, offered by `annotation` (none when `None`).
pub(super) fn secret(name: &str, annotation: Option<&str>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("markets".into()),
            annotations: annotation
                .map(|a| [(ALLOWED_PIPELINES_ANNOTATION.to_string(), a.to_string())].into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [
                ("username".to_string(), ByteString(b"payments".to_vec())),
                ("password".to_string(), ByteString(b"hunter2".to_vec())),
            ]
            .into(),
        ),
        ..Secret::default()
    }
}

/// `btc`, pointed at a broker of the author's choosing with the SASL Secret `creds`.
fn sasl_pipeline(creds: &str) -> TickPipeline {
    let mut tp = pipeline();
    tp.spec.kafka.bootstrap_servers = "attacker.example:9092".into();
    tp.spec.kafka.auth = Some(KafkaAuth {
        security_protocol: SecurityProtocol::SaslPlaintext,
        sasl: Some(SaslSpec {
            mechanism: SaslMechanism::Plain,
            credentials_secret: CredentialsSecretRef {
                name: creds.into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        }),
    });
    tp
}

async fn reconcile_with(
    tp: &TickPipeline,
    secrets: Vec<Secret>,
    kafka: Arc<FakeKafka>,
) -> (Result<Action>, Vec<Recorded>) {
    let server = ApiServer::serving(tp, secrets);
    let (client, log) = server.start();
    let ctx = Context::test(client, kafka);
    let res = reconcile(Arc::new(tp.clone()), ctx).await;
    let log = log.lock().unwrap().clone();
    (res, log)
}

fn applied(log: &[Recorded], path: &str) -> bool {
    log.iter()
        .any(|r| r.method == "PATCH" && r.uri.starts_with(&format!("{path}?")))
}

/// Secret GETs: `(name, whether the whole object was asked for rather than its metadata)`.
fn secret_reads(log: &[Recorded]) -> Vec<(String, bool)> {
    log.iter()
        .filter(|r| r.method == "GET" && r.uri.starts_with(SECRETS))
        .map(|r| {
            let name = r.uri.rsplit('/').next().unwrap().to_string();
            let metadata_only = r
                .accept
                .as_deref()
                .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
            (name, !metadata_only)
        })
        .collect()
}

fn status(log: &[Recorded]) -> TickPipelineStatus {
    let last = log
        .iter()
        .rev()
        .find(|r| r.uri.starts_with(STATUS))
        .expect("a status write");
    serde_json::from_value(last.body["status"].clone()).unwrap()
}

fn degraded(log: &[Recorded]) -> (String, String) {
    let st = status(log);
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(c.status, "True", "{c:?}");
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
    (c.reason.clone(), c.message.clone())
}

/// Every env var and volume of a Deployment body that names `secret`.
fn references(log: &[Recorded], path: &str, secret: &str) -> bool {
    log.iter()
        .filter(|r| r.method == "PATCH" && r.uri.starts_with(&format!("{path}?")))
        .any(|r| r.body.to_string().contains(&format!("\"{secret}\"")))
}

#[tokio::test]
async fn secret_not_offered_is_never_read_nor_sent_to_the_pipelines_broker() {
    // issue 11 #5: `payments-db` belongs to another app of the namespace; the pipeline's author
    // names it as SASL credentials for a broker they run
    let tp = sasl_pipeline("payments-db");
    let kafka = Arc::new(FakeKafka::default());
    let (res, log) = reconcile_with(&tp, vec![secret("payments-db", None)], kafka.clone()).await;
    assert_eq!(res.expect_err("refused").metric_label(), "secret");
    assert_eq!(
        secret_reads(&log),
        vec![("payments-db".to_string(), false)],
        "its metadata only, never its data"
    );
    assert!(kafka.calls().is_empty(), "nothing sent to the broker");
    assert!(
        !applied(&log, WORKER),
        "no worker Deployment referencing it: {:?}",
        log.iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    assert!(!references(&log, API, "payments-db"), "nor an api one");
    let (reason, message) = degraded(&log);
    assert_eq!(reason, "SecretNotOffered");
    assert_eq!(
        message,
        "secret markets/payments-db (named by spec.kafka.auth.sasl.credentialsSecret) is not \
         offered to pipeline btc: it has no tickfleet.io/allowed-pipelines annotation; offer it \
         with: kubectl annotate -n markets secret payments-db tickfleet.io/allowed-pipelines=btc"
    );
}

#[tokio::test]
async fn secret_offered_to_other_pipelines_is_refused() {
    let tp = sasl_pipeline("eth-creds");
    let kafka = Arc::new(FakeKafka::default());
    let (res, log) = reconcile_with(
        &tp,
        vec![secret("eth-creds", Some("eth, eth-backfill"))],
        kafka.clone(),
    )
    .await;
    assert!(res.is_err());
    assert!(kafka.calls().is_empty());
    assert!(!applied(&log, WORKER));
    let (reason, message) = degraded(&log);
    assert_eq!(reason, "SecretNotOffered");
    assert!(
        message.contains("is offered to pipelines eth,eth-backfill only, not to btc"),
        "{message}"
    );
}

#[tokio::test]
async fn missing_secret_is_refused_as_not_found() {
    let tp = sasl_pipeline("kafka-creds");
    let (res, log) = reconcile_with(&tp, vec![], Arc::new(FakeKafka::default())).await;
    assert!(res.is_err());
    assert!(!applied(&log, WORKER));
    let (reason, message) = degraded(&log);
    assert_eq!(reason, "SecretNotFound");
    assert_eq!(
        message,
        "secret markets/kafka-creds (named by spec.kafka.auth.sasl.credentialsSecret) does not exist"
    );
}

#[tokio::test]
async fn offered_sasl_secret_is_read_and_used() {
    for annotation in ["btc", "*", " eth , btc "] {
        let tp = sasl_pipeline("kafka-creds");
        let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
        let (res, log) = reconcile_with(
            &tp,
            vec![secret("kafka-creds", Some(annotation))],
            kafka.clone(),
        )
        .await;
        res.unwrap_or_else(|e| panic!("{annotation:?}: {e}"));
        assert_eq!(
            secret_reads(&log),
            vec![
                ("kafka-creds".to_string(), false),
                ("kafka-creds".to_string(), true)
            ],
            "checked by metadata, then read for topic admin"
        );
        // the topic, then the lag (measured for every pipeline)
        assert_eq!(
            kafka.calls(),
            vec![
                "describe ticks",
                "describe ticks.dlq",
                "lag ticks tickfleet.markets.btc"
            ]
        );
        assert!(references(&log, WORKER, "kafka-creds"));
        assert!(
            !references(&log, API, "kafka-creds"),
            "the api does not talk to Kafka: it gets no Kafka credentials"
        );
        let st = status(&log);
        let d = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(d.status, "False", "{annotation:?}: {d:?}");
    }
}

#[tokio::test]
async fn every_secret_the_pods_reference_must_be_offered() {
    // all offered: everything applied
    let tp = pipeline_with_every_secret();
    let all: Vec<Secret> = EVERY_SECRET
        .iter()
        .map(|n| secret(n, Some("btc")))
        .collect();
    let (res, log) = reconcile_with(&tp, all, Arc::new(FakeKafka::with_topic("ticks", 6))).await;
    res.expect("all offered");
    assert!(applied(&log, WORKER) && applied(&log, API));
    let metadata_checks: Vec<String> = secret_reads(&log)
        .into_iter()
        .filter(|(_, whole)| !whole)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(metadata_checks, EVERY_SECRET.to_vec(), "each checked once");

    // one at a time not offered: the Deployments whose pods would reference it are not applied
    for (refused, worker_refs, api_refs) in [
        ("redis-url", true, true),
        ("redis-ca", true, true),
        ("redis-client", true, true),
        ("api-cert", false, true),
        ("kafka-creds", true, false),
    ] {
        let secrets = EVERY_SECRET
            .iter()
            .map(|n| secret(n, (*n != refused).then_some("btc")))
            .collect();
        let (res, log) =
            reconcile_with(&tp, secrets, Arc::new(FakeKafka::with_topic("ticks", 6))).await;
        assert!(res.is_err(), "{refused}");
        assert_eq!(applied(&log, WORKER), !worker_refs, "{refused}: worker");
        assert_eq!(applied(&log, API), !api_refs, "{refused}: api");
        assert!(!references(&log, WORKER, refused) && !references(&log, API, refused));
        let (reason, message) = degraded(&log);
        assert_eq!(reason, "SecretNotOffered", "{refused}");
        assert!(
            message.starts_with(&format!("secret markets/{refused} ")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn unreadable_secret_metadata_is_refused() {
    let tp = sasl_pipeline("kafka-creds");
    let server = ApiServer {
        pipeline: Some(tp.clone()),
        fail: vec![("GET", format!("{SECRETS}/kafka-creds"), 500)],
        ..ApiServer::default()
    };
    let kafka = Arc::new(FakeKafka::default());
    let (client, log) = server.start();
    let res = reconcile(Arc::new(tp.clone()), Context::test(client, kafka.clone())).await;
    let log = log.lock().unwrap().clone();
    assert!(res.is_err());
    assert!(kafka.calls().is_empty());
    assert!(!applied(&log, WORKER));
    let (reason, message) = degraded(&log);
    assert_eq!(reason, "SecretUnreadable");
    assert!(message.contains("could not be checked"), "{message}");
}

#[tokio::test]
async fn sasl_read_checks_the_offer_on_the_object_it_read() {
    // kafka_connection is safe on its own: an offer withdrawn between the check and the read
    let tp = sasl_pipeline("kafka-creds");
    let server = ApiServer {
        secrets: [("kafka-creds".to_string(), secret("kafka-creds", None))].into(),
        ..ApiServer::default()
    };
    let (client, _) = server.start();
    let err = kafka_connection(&client, &tp, "markets")
        .await
        .expect_err("not offered");
    assert!(
        err.to_string().contains("is not offered to pipeline btc"),
        "{err}"
    );
}

/// Issue 19 (seen on the real cluster): a pipeline whose Secret was not offered showed only
/// `Scaled 0 → 1` Events, one per retry, and nothing about the Secret, although no worker was
/// applied. The refusal is a Warning Event naming the Secret and the fix; nothing was scaled.
#[tokio::test]
async fn a_secret_not_offered_is_a_warning_event_and_a_held_deployment_is_not_scaled() {
    let mut tp = pipeline_with_every_secret();
    // what a first failed reconcile leaves: generation observed, nothing applied yet
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(1),
        ..TickPipelineStatus::default()
    });
    let secrets = EVERY_SECRET
        .iter()
        .map(|n| secret(n, (*n != "redis-ca").then_some("btc")))
        .collect();
    let (res, log) =
        reconcile_with(&tp, secrets, Arc::new(FakeKafka::with_topic("ticks", 6))).await;
    assert!(res.is_err());
    assert!(!applied(&log, WORKER));
    let events: Vec<(String, String, String)> = log
        .iter()
        .filter(|r| {
            r.uri
                .starts_with("/apis/events.k8s.io/v1/namespaces/markets/events")
        })
        .map(|r| {
            let s = |k: &str| r.body[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"))
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let (kind, reason, note) = &events[0];
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Warning", "SecretNotOffered")
    );
    assert!(
        note.starts_with("secret markets/redis-ca ") && note.contains("kubectl annotate"),
        "{note}"
    );
}

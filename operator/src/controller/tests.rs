//! Reconcile tests against a mocked API server, asserting the exact requests made.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::controller::Action;
use serde_json::json;

use super::*;
use crate::crd::{AutoscalingSpec, ReplicaStatus, SourceStatus, TickPipelineStatus};
use crate::fixtures::{ApiServer, FakeKafka, Recorded, now, pipeline, pods};

const APPLY: &str = "?&force=true&fieldManager=tickfleet-operator";
pub(super) const CM: &str = "/api/v1/namespaces/markets/configmaps/btc-config";
pub(super) const WORKER: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-worker";
pub(super) const PDB: &str = "/apis/policy/v1/namespaces/markets/poddisruptionbudgets/btc-worker";
pub(super) const API: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-api";
pub(super) const SVC: &str = "/api/v1/namespaces/markets/services/btc-api";
pub(super) const STATUS: &str =
    "/apis/tickfleet.io/v1alpha1/namespaces/markets/tickpipelines/btc/status";
pub(super) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/markets/events";

/// The requests made, Events left out (see [`events_of`]).
fn uris(log: &[Recorded]) -> Vec<String> {
    log.iter()
        .filter(|r| !r.uri.starts_with(EVENTS))
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect()
}

/// The Events published: `(type, reason, note)`.
pub(super) fn events_of(log: &[Recorded]) -> Vec<(String, String, String)> {
    log.iter()
        .filter(|r| r.uri.starts_with(EVENTS))
        .map(|r| {
            assert_eq!(r.method, "POST", "a new Event");
            assert_eq!(r.body["regarding"]["kind"], "TickPipeline");
            assert_eq!(r.body["regarding"]["name"], "btc");
            assert_eq!(r.body["reportingController"], "tickfleet.io/operator");
            assert_eq!(r.body["reportingInstance"], "op-0");
            let s = |k: &str| r.body[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"))
        })
        .collect()
}

fn requests(log: &[Recorded]) -> Vec<&Recorded> {
    log.iter().filter(|r| !r.uri.starts_with(EVENTS)).collect()
}

pub(super) fn patch(path: &str) -> String {
    format!("PATCH {path}{APPLY}")
}

fn all_applies() -> Vec<String> {
    [CM, WORKER, PDB, API, SVC, STATUS]
        .iter()
        .map(|p| patch(p))
        .collect()
}

pub(super) fn status_of(log: &[Recorded]) -> TickPipelineStatus {
    let last = *requests(log).last().expect("a request");
    assert_eq!(last.uri, format!("{STATUS}{APPLY}"));
    assert_eq!(last.body["apiVersion"], "tickfleet.io/v1alpha1");
    assert_eq!(last.body["kind"], "TickPipeline");
    serde_json::from_value(last.body["status"].clone()).expect("status body")
}

pub(super) fn cond<'a>(s: &'a TickPipelineStatus, ty: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == ty)
        .unwrap_or_else(|| panic!("no {ty} condition"))
}

pub(super) fn ready_status(replicas: i32) -> DeploymentStatus {
    DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(replicas),
        updated_replicas: Some(replicas),
        ready_replicas: Some(replicas),
        available_replicas: Some(replicas),
        ..DeploymentStatus::default()
    }
}

/// Sets the pause annotation on `tp`.
pub(super) fn pause(tp: &mut TickPipeline) {
    tp.metadata.annotations = Some(
        [(
            crate::crd::PAUSED_ANNOTATION.to_string(),
            "true".to_string(),
        )]
        .into(),
    );
}

pub(super) async fn run(
    server: ApiServer,
    kafka: Arc<FakeKafka>,
    tp: &TickPipeline,
) -> (Result<Action>, Vec<Recorded>, Arc<Context>) {
    let (client, log) = server.start();
    let ctx = Context::test(client, kafka);
    let res = reconcile(Arc::new(tp.clone()), ctx.clone()).await;
    let log = log.lock().unwrap().clone();
    (res, log, ctx)
}

fn server_for(tp: &TickPipeline) -> ApiServer {
    ApiServer {
        pipeline: Some(tp.clone()),
        ..ApiServer::default()
    }
}

/// [`server_for`] with the worker Deployment reporting 2 ready pods and the api 1.
fn ready_server(tp: &TickPipeline) -> ApiServer {
    let mut server = server_for(tp);
    server
        .deployment_status
        .insert("btc-worker".into(), ready_status(2));
    server
        .deployment_status
        .insert("btc-api".into(), ready_status(1));
    server
}

#[tokio::test]
async fn applies_every_child_with_owner_reference_then_status() {
    let tp = pipeline();
    let kafka = Arc::new(FakeKafka::default());
    *kafka.lag.lock().unwrap() = Some(1234);
    let (res, log, _) = run(server_for(&tp), kafka.clone(), &tp).await;
    assert_eq!(res.expect("reconcile"), Action::requeue(LAG_INTERVAL));
    assert_eq!(uris(&log), all_applies());
    // the topic did not exist: created with the declared partitions, broker-default replication;
    // the lag is measured without autoscaling too (the LAG column)
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "create ticks 6 None",
            "describe ticks.dlq",
            "create ticks.dlq 6 None",
            "lag ticks tickfleet.markets.btc"
        ]
    );
    assert_eq!(
        events_of(&log),
        vec![
            (
                "Normal".into(),
                "TopicCreated".into(),
                "created topic ticks with 6 partitions".into()
            ),
            (
                "Normal".into(),
                "TopicCreated".into(),
                "created dead-letter topic ticks.dlq with 6 partitions".into()
            )
        ]
    );
    let log: Vec<Recorded> = requests(&log).into_iter().cloned().collect();

    // each child body is exactly the desired object, sent as a server-side apply
    let want = desired::desired(&tp, 2);
    let bodies = [
        serde_json::to_value(&want.config_map).unwrap(),
        serde_json::to_value(&want.worker).unwrap(),
        serde_json::to_value(&want.worker_pdb).unwrap(),
        serde_json::to_value(&want.api).unwrap(),
        serde_json::to_value(&want.api_service).unwrap(),
    ];
    for (req, body) in log.iter().zip(bodies) {
        assert_eq!(
            req.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(req.body, body, "{}", req.uri);
        assert_eq!(
            req.body["metadata"]["ownerReferences"],
            json!([{
                "apiVersion": "tickfleet.io/v1alpha1",
                "kind": "TickPipeline",
                "name": "btc",
                "uid": "6b0e4a57-0d0c-4b37-9c2f-6a51d6e1f0aa",
                "controller": true,
                "blockOwnerDeletion": true,
            }]),
            "{}",
            req.uri
        );
    }
    assert_eq!(log[1].body["spec"]["replicas"], 2);

    // status: observedGeneration, conditions stamped with now, replicas from the Deployments
    let st = status_of(&log);
    assert_eq!(st.observed_generation, Some(3));
    assert_eq!(st.partitions, Some(6));
    assert_eq!(st.lag, Some(1234));
    assert_eq!(
        st.workers,
        ReplicaStatus {
            desired: 2,
            ..ReplicaStatus::default()
        }
    );
    assert_eq!(
        st.api,
        ReplicaStatus {
            desired: 1,
            ..ReplicaStatus::default()
        }
    );
    assert_eq!(
        st.selector.as_deref(),
        Some(
            "app.kubernetes.io/component=worker,app.kubernetes.io/instance=btc,app.kubernetes.io/name=tickfleet"
        )
    );
    let summary: Vec<_> = st
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("Ready", "False", "WorkersNotReady"),
            ("Progressing", "True", "RollingOut"),
            ("Degraded", "False", "AsExpected"),
            ("Paused", "False", "NotPaused"),
            ("WorkersCapped", "False", "WithinPartitions"),
        ]
    );
    for c in &st.conditions {
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, Time(now()));
    }
}

#[tokio::test]
async fn ready_deployments_make_the_pipeline_ready_keeping_transition_times() {
    let mut tp = pipeline();
    // an earlier reconcile left Degraded=False at an older time; Ready was False
    let earlier = Time(Timestamp::from_second(1_700_000_000).unwrap());
    let old_cond = |ty: &str, status: &str, reason: &str| Condition {
        type_: ty.into(),
        status: status.into(),
        reason: reason.into(),
        message: String::new(),
        last_transition_time: earlier.clone(),
        observed_generation: Some(2),
    };
    tp.status = Some(TickPipelineStatus {
        conditions: vec![
            old_cond("Ready", "False", "WorkersNotReady"),
            old_cond("Degraded", "False", "AsExpected"),
        ],
        ..TickPipelineStatus::default()
    });
    let server = ready_server(&tp);
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    let (res, log, ctx) = run(server, kafka.clone(), &tp).await;
    res.expect("reconcile");
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "describe ticks.dlq",
            "lag ticks tickfleet.markets.btc"
        ],
        "topic already right: no change"
    );
    assert!(events_of(&log).is_empty(), "nothing changed: no Event");
    let st = status_of(&log);
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllReplicasReady")
    );
    assert_eq!(ready.last_transition_time, Time(now()), "status changed");
    let degraded = cond(&st, "Degraded");
    assert_eq!(
        degraded.last_transition_time, earlier,
        "status unchanged: time kept"
    );
    assert_eq!(degraded.observed_generation, Some(3));
    assert_eq!(cond(&st, "Progressing").reason, "RolloutComplete");
    assert_eq!(st.workers, pods(2));
    assert_eq!(
        ctx.metrics
            .workers_ready
            .with_label_values(&["markets", "btc"])
            .get(),
        2
    );
    assert_eq!(ctx.metrics.reconciles.get(), 1);
}

#[tokio::test]
async fn paused_pipeline_applies_nothing_and_reports_what_runs() {
    let mut tp = pipeline();
    pause(&mut tp);
    // applied at generation 2 with 2 workers; generation 3 (5 workers) came while paused
    tp.spec.workers.replicas = 5;
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(2),
        workers: ReplicaStatus {
            desired: 2,
            ..ReplicaStatus::default()
        },
        ..TickPipelineStatus::default()
    });
    let server = ready_server(&tp);
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    *kafka.lag.lock().unwrap() = Some(77);
    let (res, log, _) = run(server, kafka.clone(), &tp).await;
    assert_eq!(res.expect("reconcile"), Action::requeue(LAG_INTERVAL));
    // reads only: the Deployments as they are, and the lag
    assert_eq!(
        uris(&log),
        vec![format!("GET {WORKER}"), format!("GET {API}"), patch(STATUS)]
    );
    assert_eq!(
        kafka.calls(),
        vec!["lag ticks tickfleet.markets.btc"],
        "nothing changed in Kafka"
    );
    let st = status_of(&log);
    assert_eq!(
        st.observed_generation,
        Some(2),
        "generation 3 is not applied: observedGeneration stays"
    );
    let paused = cond(&st, "Paused");
    assert_eq!(
        (paused.status.as_str(), paused.reason.as_str()),
        ("True", "PausedByAnnotation")
    );
    assert!(
        paused
            .message
            .contains("generation 3 is not applied (children are from generation 2)"),
        "{}",
        paused.message
    );
    // what runs is reported: both workers ready, not the frozen "0 of 1"
    assert_eq!(st.workers, pods(2));
    assert_eq!(st.api, pods(1));
    assert_eq!(st.lag, Some(77));
    assert_eq!(cond(&st, "Ready").status, "True");
    assert_eq!(cond(&st, "Progressing").reason, "RolloutComplete");
    assert_eq!(
        st.conditions.len(),
        3,
        "Degraded and WorkersCapped not observed"
    );
    assert_eq!(
        events_of(&log)
            .iter()
            .map(|e| e.1.as_str())
            .collect::<Vec<_>>(),
        vec!["Paused"]
    );

    // still paused next time: no second Paused Event
    let mut again = tp.clone();
    again.status = Some(st);
    let mut server = server_for(&again);
    server
        .deployment_status
        .insert("btc-worker".into(), ready_status(2));
    let (_, log, _) = run(server, kafka, &again).await;
    assert!(events_of(&log).is_empty());
    let st = status_of(&log);
    assert_eq!(st.api.desired, 0, "the api Deployment is gone: reported");
    assert_eq!(cond(&st, "Ready").reason, "ApiNotReady");
}

#[tokio::test]
async fn invalid_spec_is_degraded_without_retry_loop() {
    let mut tp = pipeline();
    tp.spec.store.redis.url = Some("http://redis:6379".into());
    let kafka = Arc::new(FakeKafka::default());
    let (res, log, ctx) = run(server_for(&tp), kafka.clone(), &tp).await;
    // not an error: retrying cannot fix a spec; the next spec change triggers a reconcile
    assert_eq!(res.expect("reconcile"), Action::await_change());
    assert_eq!(uris(&log), vec![patch(STATUS)], "no child is touched");
    assert!(kafka.calls().is_empty());
    let st = status_of(&log);
    assert_eq!(st.observed_generation, None, "nothing was applied");
    assert_eq!(
        events_of(&log),
        vec![(
            "Warning".into(),
            "InvalidSpec".into(),
            "store.redis.url must start with redis:// or rediss://".into()
        )]
    );
    let degraded = cond(&st, "Degraded");
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "InvalidSpec");
    assert_eq!(
        degraded.message,
        "store.redis.url must start with redis:// or rediss://"
    );
    assert_eq!(cond(&st, "Ready").status, "False");
    assert_eq!(cond(&st, "Progressing").reason, "InvalidSpec");
    assert_eq!(
        ctx.metrics
            .failures
            .with_label_values(&["invalid_spec"])
            .get(),
        1
    );
}

#[tokio::test]
async fn more_workers_than_partitions_are_capped_and_explained() {
    let mut tp = pipeline();
    tp.spec.workers.replicas = 10;
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    let (res, log, _) = run(server_for(&tp), kafka, &tp).await;
    res.expect("reconcile");
    assert_eq!(uris(&log), all_applies());
    assert_eq!(log[1].body["spec"]["replicas"], 6);
    let st = status_of(&log);
    let capped = cond(&st, "WorkersCapped");
    assert_eq!(
        (capped.status.as_str(), capped.reason.as_str()),
        ("True", "MoreWorkersThanPartitions")
    );
    assert!(
        capped
            .message
            .starts_with("10 workers asked for but the topic has 6 partitions")
    );
    assert_eq!(st.workers.desired, 6);
}

#[tokio::test]
async fn grows_topic_and_reports_when_it_cannot_shrink() {
    let tp = pipeline();
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 4));
    let (res, log, _) = run(server_for(&tp), kafka.clone(), &tp).await;
    res.expect("reconcile");
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "grow ticks 6",
            "describe ticks.dlq",
            "lag ticks tickfleet.markets.btc"
        ]
    );
    assert_eq!(
        events_of(&log),
        vec![(
            "Normal".into(),
            "TopicGrown".into(),
            "grew topic ticks from 4 to 6 partitions".into()
        )]
    );

    let kafka = Arc::new(FakeKafka::with_topic("ticks", 12));
    let (res, log, _) = run(server_for(&tp), kafka.clone(), &tp).await;
    res.expect("a bigger topic still works");
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "describe ticks.dlq",
            "lag ticks tickfleet.markets.btc"
        ]
    );
    let st = status_of(&log);
    assert_eq!(st.partitions, Some(12));
    let degraded = cond(&st, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "PartitionsCannotShrink")
    );
}

#[tokio::test]
async fn kafka_failure_degrades_then_requeues_with_backoff() {
    let tp = pipeline();
    let kafka = Arc::new(FakeKafka {
        fail_describe: true,
        ..FakeKafka::default()
    });
    let (res, log, ctx) = run(server_for(&tp), kafka.clone(), &tp).await;
    let err = res.expect_err("transient failure is an error");
    assert_eq!(err.metric_label(), "kafka");
    assert_eq!(
        kafka.calls(),
        vec!["describe ticks"],
        "no lag read from a broker that just failed"
    );
    let events = events_of(&log);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].0.as_str(), events[0].1.as_str()),
        ("Warning", "KafkaUnreachable")
    );
    assert!(
        events[0]
            .2
            .contains("bootstrap servers kafka-0:9092,kafka-1:9092"),
        "{}",
        events[0].2
    );
    // children are still kept in shape, and status says what is wrong
    assert_eq!(uris(&log), all_applies());
    let st = status_of(&log);
    let degraded = cond(&st, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "TopicUnavailable")
    );
    assert_eq!(cond(&st, "Ready").reason, "TopicUnavailable");
    assert_eq!(st.partitions, None, "not known: not reported");
    assert_eq!(
        requests(&log)[1].body["spec"]["replicas"],
        2,
        "capped by the declared partitions"
    );

    let tp = Arc::new(tp);
    let delays: Vec<Action> = (0..4)
        .map(|_| error_policy(tp.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [5, 10, 20, 40]
            .map(|s| Action::requeue(Duration::from_secs(s)))
            .to_vec()
    );
    assert_eq!(ctx.metrics.failures.with_label_values(&["kafka"]).get(), 4);
}

#[tokio::test]
async fn a_dead_letter_topic_that_cannot_be_created_keeps_the_pipeline_not_ready() {
    let tp = pipeline();
    let kafka = Arc::new(FakeKafka {
        fail_create: true,
        ..FakeKafka::default()
    });
    kafka.topics.lock().unwrap().insert("ticks".into(), 6);
    let (res, log, _) = run(server_for(&tp), kafka.clone(), &tp).await;
    let err = res.expect_err("retried with backoff");
    assert_eq!(err.metric_label(), "kafka");
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "describe ticks.dlq",
            "create ticks.dlq 6 None",
            "lag ticks tickfleet.markets.btc"
        ]
    );
    // the workers are still applied (a DLQ made by hand later is found on the next reconcile)
    assert_eq!(uris(&log), all_applies());
    let st = status_of(&log);
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "DeadLetterTopicUnavailable")
    );
    assert!(
        cond(&st, "Degraded")
            .message
            .contains("could not ensure dead-letter topic ticks.dlq"),
        "{:?}",
        cond(&st, "Degraded")
    );
    assert_eq!(st.partitions, Some(6));
}

#[tokio::test]
async fn api_server_error_is_returned_for_retry() {
    let tp = pipeline();
    let mut server = server_for(&tp);
    server.fail.push(("PATCH", WORKER.into(), 500));
    let (res, log, _) = run(server, Arc::new(FakeKafka::with_topic("ticks", 6)), &tp).await;
    assert_eq!(res.expect_err("500").metric_label(), "kube");
    assert_eq!(
        uris(&log),
        vec![patch(CM), patch(WORKER)],
        "stops at the failing apply"
    );
}

#[tokio::test]
async fn autoscaling_sizes_workers_from_lag() {
    let mut tp = pipeline();
    tp.spec.workers.autoscaling = Some(AutoscalingSpec {
        enabled: true,
        min_replicas: 1,
        max_replicas: 10,
        target_lag_per_worker: 1000,
        scale_down_stabilization_seconds: 300,
        poll_interval_seconds: 15,
    });
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    *kafka.lag.lock().unwrap() = Some(4500);
    let (res, log, ctx) = run(server_for(&tp), kafka.clone(), &tp).await;
    assert_eq!(
        res.expect("reconcile"),
        Action::requeue(Duration::from_secs(15))
    );
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "describe ticks.dlq",
            "lag ticks tickfleet.markets.btc"
        ]
    );
    assert_eq!(log[1].body["spec"]["replicas"], 5, "ceil(4500 / 1000)");
    let st = status_of(&log);
    assert_eq!(st.lag, Some(4500));
    let a = st.autoscaling.expect("autoscaling status");
    assert_eq!(
        (a.lag, a.target_lag_per_worker, a.recommended, a.desired),
        (4500, 1000, 5, 5)
    );
    assert_eq!(a.reason, "ScaleUp");
    assert_eq!(
        ctx.metrics.lag.with_label_values(&["markets", "btc"]).get(),
        4500
    );

    // lag unreadable next time: keep 5 workers, say why, retry with backoff
    let mut again = tp.clone();
    again.status = Some(TickPipelineStatus {
        autoscaling: Some(a),
        ..TickPipelineStatus::default()
    });
    *kafka.fail_lag.lock().unwrap() = true;
    let (res, log, _) = run(server_for(&again), kafka, &again).await;
    assert_eq!(res.expect_err("lag failure").metric_label(), "kafka");
    assert_eq!(requests(&log)[1].body["spec"]["replicas"], 5);
    assert_eq!(events_of(&log)[0].1, "KafkaUnreachable");
    let st = status_of(&log);
    assert_eq!(cond(&st, "Degraded").reason, "LagUnavailable");
    assert_eq!(
        cond(&st, "Ready").status,
        "False",
        "pods not ready in this mock"
    );
}

#[tokio::test]
async fn sasl_credentials_come_from_the_secret() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let mut tp = pipeline();
    tp.spec.kafka.auth = Some(crate::crd::KafkaAuth {
        security_protocol: crate::crd::SecurityProtocol::SaslSsl,
        sasl: Some(crate::crd::SaslSpec {
            mechanism: crate::crd::SaslMechanism::Plain,
            credentials_secret: crate::crd::CredentialsSecretRef {
                name: "kafka-creds".into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        }),
    });
    let mut server = server_for(&tp);
    server.secrets.insert(
        "kafka-creds".into(),
        Secret {
            data: Some(
                [
                    ("username".to_string(), ByteString(b"ops".to_vec())),
                    ("password".to_string(), ByteString(b"s3cret".to_vec())),
                ]
                .into(),
            ),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(
                    [(
                        crate::offer::ALLOWED_PIPELINES_ANNOTATION.to_string(),
                        "btc".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Secret::default()
        },
    );
    let (client, log) = server.start();
    let conn = kafka_connection(&client, &tp, "markets")
        .await
        .expect("connection");
    assert_eq!(conn.sasl_username.as_deref(), Some("ops"));
    assert_eq!(conn.sasl_password.as_deref(), Some("s3cret"));
    assert_eq!(conn.sasl_mechanism.as_deref(), Some("PLAIN"));
    assert_eq!(conn.security_protocol.as_deref(), Some("SASL_SSL"));
    let reqs: Vec<String> = uris(&log.lock().unwrap());
    assert_eq!(
        reqs,
        vec!["GET /api/v1/namespaces/markets/secrets/kafka-creds"]
    );

    // a missing Secret: Degraded, retried; the children not using it are still applied
    // (controller/secret_tests.rs covers refusals in detail)
    let (res, log, _) = run(server_for(&tp), Arc::new(FakeKafka::default()), &tp).await;
    assert_eq!(res.expect_err("no secret").metric_label(), "secret");
    assert_eq!(log[0].uri, "/api/v1/namespaces/markets/secrets/kafka-creds");
    let st = status_of(&log);
    assert_eq!(cond(&st, "Degraded").reason, "SecretNotFound");
    assert_eq!(
        uris(&log)[1..],
        [CM, PDB, API, SVC, STATUS].map(patch),
        "no worker Deployment: its pods would reference the missing Secret"
    );
}

#[tokio::test]
async fn pods_of_the_current_spec_that_are_not_available_are_still_progressing() {
    // what was seen on a real cluster: 4 pods created, all Pending, and the pipeline said
    // Progressing=False "all pods run the current spec"
    let mut tp = pipeline();
    tp.spec.workers.replicas = 4;
    let mut server = server_for(&tp);
    server.deployment_status.insert(
        "btc-worker".into(),
        DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(4),
            updated_replicas: Some(4),
            unavailable_replicas: Some(4),
            ..DeploymentStatus::default()
        },
    );
    server
        .deployment_status
        .insert("btc-api".into(), ready_status(1));
    let (res, log, _) = run(server, Arc::new(FakeKafka::with_topic("ticks", 6)), &tp).await;
    res.expect("reconcile");
    let st = status_of(&log);
    let progressing = cond(&st, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "RollingOut")
    );
    assert_eq!(progressing.message, "workers: 0 of 4 pods available");
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        (
            "False",
            "0 of 4 workers available (0 ready, 4 run the current spec)"
        )
    );
}

#[tokio::test]
async fn lag_is_measured_for_every_pipeline_at_most_once_per_interval() {
    let tp = pipeline();
    assert!(tp.spec.workers.autoscaling.is_none());
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    *kafka.lag.lock().unwrap() = Some(500);
    let (client, log) = server_for(&tp).start();
    let ctx = Context::test(client, kafka.clone());
    reconcile(Arc::new(tp.clone()), ctx.clone())
        .await
        .expect("first");
    // a Deployment status change triggers another reconcile right away (of the pipeline with
    // the status just written): no second lag read, the measured lag is kept
    let mut again = tp.clone();
    again.status = Some(status_of(&log.lock().unwrap()));
    reconcile(Arc::new(again), ctx.clone())
        .await
        .expect("second");
    assert_eq!(
        kafka.calls(),
        vec![
            "describe ticks",
            "describe ticks.dlq",
            "lag ticks tickfleet.markets.btc",
            "describe ticks",
            "describe ticks.dlq"
        ]
    );
    let log = log.lock().unwrap().clone();
    assert_eq!(
        status_of(&log).lag,
        Some(500),
        "LAG shown without autoscaling"
    );
    assert_eq!(
        ctx.metrics.lag.with_label_values(&["markets", "btc"]).get(),
        500
    );
}

/// Issue 19 (seen on the real cluster): a Secret created a few seconds after its pipeline was
/// picked up 87 s later (the exponential backoff). Waiting for a Secret is retried every 10 s at
/// most.
#[tokio::test]
async fn a_missing_secret_is_looked_for_again_within_10s() {
    let tp = Arc::new(pipeline());
    let (client, _log) = server_for(&tp).start();
    let ctx = Context::test(client, Arc::new(FakeKafka::default()));
    let err = Error::Secret {
        name: "redis-ca".into(),
        reason: "does not exist".into(),
    };
    let delays: Vec<Action> = (0..6)
        .map(|_| error_policy(tp.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [5, 10, 10, 10, 10, 10]
            .map(|s| Action::requeue(Duration::from_secs(s)))
            .to_vec()
    );
}

/// Issue 19 (seen on the real cluster): `kubectl delete tp --cascade=foreground` never finished:
/// the operator re-applied the children the garbage collector was deleting. A pipeline being
/// deleted is left alone: no call to the API server or to Kafka.
#[tokio::test]
async fn a_pipeline_being_deleted_is_not_reapplied() {
    let mut tp = pipeline();
    tp.metadata.deletion_timestamp = Some(Time(now()));
    tp.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    let (client, log) = server_for(&tp).start();
    let ctx = Context::test(client, kafka.clone());
    reconcile(Arc::new(tp), ctx).await.expect("reconcile");
    let log = log.lock().unwrap().clone();
    assert!(
        log.is_empty(),
        "{:?}",
        log.iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    assert!(kafka.calls().is_empty(), "{:?}", kafka.calls());
}

/// Issue 19 (seen on the real cluster): LAG stayed empty for the first interval when the first
/// measurement failed. A failed measurement does not count: the next reconcile measures again.
#[tokio::test]
async fn a_failed_lag_measurement_is_retried_at_the_next_reconcile() {
    let tp = pipeline();
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    *kafka.fail_lag.lock().unwrap() = true;
    let (client, log) = server_for(&tp).start();
    let ctx = Context::test(client, kafka.clone());
    reconcile(Arc::new(tp.clone()), ctx.clone())
        .await
        .expect("first");
    assert_eq!(status_of(&log.lock().unwrap()).lag, None);
    *kafka.fail_lag.lock().unwrap() = false;
    *kafka.lag.lock().unwrap() = Some(42);
    let mut again = tp.clone();
    again.status = Some(status_of(&log.lock().unwrap()));
    reconcile(Arc::new(again), ctx.clone())
        .await
        .expect("second");
    let lags = kafka
        .calls()
        .iter()
        .filter(|c| c.starts_with("lag "))
        .count();
    assert_eq!(lags, 2, "{:?}", kafka.calls());
    assert_eq!(status_of(&log.lock().unwrap()).lag, Some(42));
}

#[tokio::test]
async fn scaling_is_an_event_with_from_to_and_why() {
    let mut tp = pipeline();
    tp.spec.workers.replicas = 3;
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(2),
        workers: pods(2),
        ..TickPipelineStatus::default()
    });
    let (res, log, _) = run(
        server_for(&tp),
        Arc::new(FakeKafka::with_topic("ticks", 6)),
        &tp,
    )
    .await;
    res.expect("reconcile");
    assert_eq!(
        events_of(&log),
        vec![(
            "Normal".into(),
            "Scaled".into(),
            "workers scaled from 2 to 3: spec.workers.replicas is 3".into()
        )]
    );
    // asking for more than partitions: the why says it was capped
    tp.spec.workers.replicas = 9;
    let (_, log, _) = run(
        server_for(&tp),
        Arc::new(FakeKafka::with_topic("ticks", 6)),
        &tp,
    )
    .await;
    assert_eq!(
        events_of(&log)[0].2,
        "workers scaled from 2 to 6: spec.workers.replicas is 9, capped at the topic's 6 partitions"
    );
}

#[tokio::test]
async fn repeated_kafka_failures_are_one_event_per_interval() {
    let tp = Arc::new(pipeline());
    let kafka = Arc::new(FakeKafka {
        fail_describe: true,
        ..FakeKafka::default()
    });
    let (client, log) = server_for(&tp).start();
    let ctx = Context::test(client, kafka);
    for _ in 0..5 {
        reconcile(tp.clone(), ctx.clone())
            .await
            .expect_err("kafka down");
    }
    let log = log.lock().unwrap().clone();
    let events = events_of(&log);
    assert_eq!(events.len(), 1, "5 retries, one Event: {events:?}");
    assert_eq!(events[0].1, "KafkaUnreachable");
}

#[tokio::test]
async fn shutdown_cancels_a_reconcile_waiting_on_kafka() {
    let tp = Arc::new(pipeline());
    let kafka = Arc::new(FakeKafka {
        hang: true,
        ..FakeKafka::default()
    });
    let (client, log) = server_for(&tp).start();
    let ctx = Context::test(client, kafka.clone());
    let running = tokio::spawn(reconcile(tp, ctx.clone()));
    // the reconcile is inside the Kafka call that never answers
    while kafka.calls().is_empty() {
        tokio::task::yield_now().await;
    }
    ctx.shutdown.cancel();
    let res = running.await.expect("reconcile task");
    assert_eq!(
        res.expect("a cancelled reconcile is not a failure"),
        Action::await_change()
    );
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing written after the cancel"
    );
}

fn with_sources(sources: serde_json::Value) -> TickPipeline {
    let mut tp = pipeline();
    tp.spec.sources = serde_json::from_value(sources).expect("sources");
    tp
}

const BINANCE: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-source-binance";

#[tokio::test]
async fn a_pipeline_with_a_binance_source_gets_a_connector_deployment() {
    let tp = with_sources(json!([{"exchange": "binance", "symbols": ["BTC-USDT", "ETH-USDT"]}]));
    let mut server = ready_server(&tp);
    server
        .deployment_status
        .insert("btc-source-binance".into(), ready_status(1));
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    let (res, log, _) = run(server, kafka, &tp).await;
    res.expect("reconcile");
    let mut want = all_applies();
    want.insert(5, patch(BINANCE));
    assert_eq!(uris(&log), want, "the connector is applied after the api");
    // its body is exactly the desired connector Deployment, owned by the pipeline
    let sent = requests(&log)[5].clone();
    let desired = desired::desired(&tp, 2);
    assert_eq!(
        sent.body,
        serde_json::to_value(&desired.sources[0]).unwrap()
    );
    let pod = &sent.body["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["command"],
        json!(["/usr/local/bin/tickfleet-connector"])
    );
    assert_eq!(
        sent.body["metadata"]["ownerReferences"][0]["kind"],
        "TickPipeline"
    );
    let st = status_of(&log);
    assert_eq!(
        st.sources,
        vec![SourceStatus {
            name: "binance".into(),
            exchange: "binance".into(),
            symbols: 2,
            deployment: "btc-source-binance".into(),
            pods: pods(1),
            message: "Complete".into(),
        }]
    );
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllReplicasReady")
    );
    assert_eq!(
        ready.message,
        "2 workers, 1 api pods and 1 source connectors available"
    );
}

#[tokio::test]
async fn a_connector_that_is_not_subscribed_keeps_the_pipeline_unready() {
    let tp = with_sources(json!([{"exchange": "binance", "symbols": ["BTC-USDT"]}]));
    let mut server = ready_server(&tp);
    // the pod runs but is not ready: the venue is unreachable, so it is not subscribed
    server.deployment_status.insert(
        "btc-source-binance".into(),
        DeploymentStatus {
            ready_replicas: Some(0),
            available_replicas: Some(0),
            ..ready_status(1)
        },
    );
    let (res, log, _) = run(server, Arc::new(FakeKafka::with_topic("ticks", 6)), &tp).await;
    res.expect("reconcile");
    let st = status_of(&log);
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SourceNotReady")
    );
    assert!(
        ready
            .message
            .starts_with("source binance: 0 of 1 connector pods available")
    );
    assert_eq!(st.sources[0].message, "0 of 1 pods available");
    assert_eq!(
        cond(&st, "Progressing").message,
        "source binance: 0 of 1 pods available"
    );
}

#[tokio::test]
async fn a_source_removed_from_the_spec_loses_its_connector() {
    let mut tp = with_sources(json!([{"exchange": "binance", "symbols": ["BTC-USDT"]}]));
    // applied before: binance and kraken; the spec now has binance only
    let line = |name: &str| SourceStatus {
        name: name.into(),
        exchange: name.into(),
        symbols: 1,
        deployment: format!("btc-source-{name}"),
        pods: pods(1),
        message: "Complete".into(),
    };
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(2),
        sources: vec![line("binance"), line("kraken")],
        ..TickPipelineStatus::default()
    });
    let (res, log, _) = run(
        server_for(&tp),
        Arc::new(FakeKafka::with_topic("ticks", 6)),
        &tp,
    )
    .await;
    res.expect("reconcile");
    let mut want = all_applies();
    want.insert(5, patch(BINANCE));
    want.insert(
        6,
        "DELETE /apis/apps/v1/namespaces/markets/deployments/btc-source-kraken?".into(),
    );
    assert_eq!(uris(&log), want);
    assert!(
        events_of(&log).contains(&(
            "Normal".into(),
            "SourceRemoved".into(),
            "source kraken is no longer in the spec: deleted its connector btc-source-kraken"
                .into()
        )),
        "{:?}",
        events_of(&log)
    );
    let st = status_of(&log);
    let names: Vec<_> = st.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["binance"]);
}

#[tokio::test]
async fn a_paused_pipeline_reports_its_connectors_without_touching_them() {
    let mut tp = with_sources(json!([]));
    pause(&mut tp);
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(2),
        sources: vec![SourceStatus {
            name: "kraken".into(),
            exchange: "kraken".into(),
            symbols: 3,
            deployment: "btc-source-kraken".into(),
            ..SourceStatus::default()
        }],
        ..TickPipelineStatus::default()
    });
    let mut server = server_for(&tp);
    server
        .deployment_status
        .insert("btc-source-kraken".into(), ready_status(1));
    let (res, log, _) = run(server, Arc::new(FakeKafka::with_topic("ticks", 6)), &tp).await;
    res.expect("reconcile");
    // the source left the spec while paused: its connector is read, not deleted
    assert_eq!(
        uris(&log),
        vec![
            format!("GET {WORKER}"),
            format!("GET {API}"),
            "GET /apis/apps/v1/namespaces/markets/deployments/btc-source-kraken".to_string(),
            patch(STATUS)
        ]
    );
    let st = status_of(&log);
    assert_eq!(st.sources[0].pods, pods(1));
    assert_eq!(st.sources[0].symbols, 3);
}

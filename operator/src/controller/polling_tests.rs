//! The poll connector (`spec.polling`) against the mocked API server: created, updated, pruned,
//! reported, and held back while an API key's Secret is not offered.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

use super::secret_tests::secret;
use super::tests::{
    API, CM, EVENTS, PDB, STATUS, SVC, WORKER, cond, events_of, patch, pause,
    ready_status as ready, status_of,
};
use super::*;
use crate::crd::{PollingStatus, TickPipelineStatus};
use crate::fixtures::{ApiServer, FakeKafka, Recorded, pipeline, pods, with_polling};

const POLL: &str = "/apis/apps/v1/namespaces/markets/deployments/btc-poll";
const SECRETS: &str = "/api/v1/namespaces/markets/secrets/";

/// The API server of `tp` with workers, api and (at `poll`) the poll connector reporting their
/// pods, and `secrets`.
fn server(tp: &TickPipeline, poll: DeploymentStatus, secrets: Vec<Secret>) -> ApiServer {
    let mut server = ApiServer::serving(tp, secrets);
    for (name, st) in [
        ("btc-worker", ready(2)),
        ("btc-api", ready(1)),
        ("btc-poll", poll),
    ] {
        server.deployment_status.insert(name.into(), st);
    }
    server
}

/// The two key Secrets, offered: `finnhub-key` to `btc`, `av-key` to every pipeline.
fn offered() -> Vec<Secret> {
    vec![
        secret("finnhub-key", Some("btc")),
        secret("av-key", Some("*")),
    ]
}

async fn run(server: ApiServer, tp: &TickPipeline) -> (Result<Action>, Vec<Recorded>) {
    let kafka = Arc::new(FakeKafka::with_topic("ticks", 6));
    let (res, log, _) = super::tests::run(server, kafka, tp).await;
    (res, log)
}

/// The writes made (applies and deletes), Events left out.
fn writes(log: &[Recorded]) -> Vec<String> {
    log.iter()
        .filter(|r| r.method != "GET" && !r.uri.starts_with(EVENTS))
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect()
}

fn body_of<'a>(log: &'a [Recorded], path: &str) -> &'a serde_json::Value {
    &log.iter()
        .find(|r| r.method == "PATCH" && r.uri.starts_with(&format!("{path}?")))
        .unwrap_or_else(|| panic!("no apply of {path}"))
        .body
}

/// A condition as `(status, reason, message)`.
fn summary(st: &TickPipelineStatus, ty: &str) -> (String, String, String) {
    let c = cond(st, ty);
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// Events as `(reason, note)`.
fn notes(log: &[Recorded]) -> Vec<(String, String)> {
    events_of(log)
        .into_iter()
        .map(|(_, reason, note)| (reason, note))
        .collect()
}

#[tokio::test]
async fn a_pipeline_with_polling_gets_its_poll_connector_applied_and_reported() {
    let tp = with_polling(pipeline());
    let (res, log) = run(server(&tp, ready(3), offered()), &tp).await;
    assert_eq!(res.expect("reconcile"), Action::requeue(LAG_INTERVAL));
    assert_eq!(
        writes(&log),
        [CM, WORKER, PDB, API, SVC, POLL, STATUS].map(patch),
        "applied after the api, with the operator's field manager"
    );
    // only the key Secrets' metadata was read, never their data
    let reads: Vec<_> = log
        .iter()
        .filter(|r| r.uri.starts_with(SECRETS))
        .map(|r| {
            assert!(
                r.accept
                    .as_deref()
                    .is_some_and(|a| a.contains("as=PartialObjectMetadata")),
                "{}",
                r.uri
            );
            r.uri.trim_start_matches(SECRETS).to_string()
        })
        .collect();
    assert_eq!(reads, ["finnhub-key", "av-key"]);
    // the body is exactly the desired Deployment, owned by the pipeline
    let sent = body_of(&log, POLL);
    let want = desired::desired(&tp, 2).polling.unwrap();
    assert_eq!(*sent, serde_json::to_value(&want).unwrap());
    assert_eq!(sent["spec"]["replicas"], 3);
    assert_eq!(sent["metadata"]["ownerReferences"][0]["name"], "btc");
    assert_eq!(
        sent["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["poll"])
    );
    let st = status_of(&log);
    assert_eq!(
        st.polling,
        Some(PollingStatus {
            deployment: "btc-poll".into(),
            pods: pods(3),
            message: "Complete".into(),
        })
    );
    assert_eq!(
        summary(&st, "Ready"),
        (
            "True".into(),
            "AllReplicasReady".into(),
            "2 workers, 1 api pods and 3 poll connector pods available".into()
        )
    );
    assert_eq!(summary(&st, "Degraded").0, "False");
}

#[tokio::test]
async fn a_poll_connector_without_ready_pods_keeps_the_pipeline_unready() {
    let tp = with_polling(pipeline());
    // the pods run but are not ready: Redis or Kafka unreachable
    let poll = DeploymentStatus {
        ready_replicas: Some(1),
        available_replicas: Some(1),
        ..ready(3)
    };
    let (res, log) = run(server(&tp, poll, offered()), &tp).await;
    res.expect("reconcile");
    let st = status_of(&log);
    let (status, reason, message) = summary(&st, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PollingNotReady")
    );
    assert!(
        message.starts_with("1 of 3 poll connector pods available"),
        "{message}"
    );
    assert_eq!(
        summary(&st, "Progressing").2,
        "polling: 1 of 3 pods available"
    );
    assert_eq!(st.polling.unwrap().message, "1 of 3 pods available");
}

/// The status of a pipeline whose poll connector ran 3 of 3 pods at its last reconcile.
fn running_poll_connector() -> TickPipelineStatus {
    TickPipelineStatus {
        observed_generation: Some(2),
        polling: Some(PollingStatus {
            deployment: "btc-poll".into(),
            pods: pods(3),
            message: "Complete".into(),
        }),
        ..TickPipelineStatus::default()
    }
}

#[tokio::test]
async fn a_changed_polling_spec_is_applied_over_the_running_poll_connector() {
    let mut tp = with_polling(pipeline());
    tp.status = Some(running_poll_connector());
    let p = tp.spec.polling.as_mut().unwrap();
    p.replicas = 5;
    p.providers.finnhub.as_mut().unwrap().api_key_secret_ref.key = "token-2".into();
    p.providers.yahoo = None;
    let (res, log) = run(server(&tp, ready(3), offered()), &tp).await;
    res.expect("reconcile");
    // the same Deployment applied again with the new spec; nothing deleted
    assert_eq!(
        writes(&log),
        [CM, WORKER, PDB, API, SVC, POLL, STATUS].map(patch)
    );
    let sent = body_of(&log, POLL);
    assert_eq!(sent["spec"]["replicas"], 5);
    let env = sent["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(env.contains(&json!({
        "name": "FINNHUB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "finnhub-key", "key": "token-2", "optional": false}}
    })));
    assert!(!env.iter().any(|e| e["name"] == "TICKFLEET_YAHOO_URL"));
    // the Deployment reports 3 of the 5 pods: rolling out
    let st = status_of(&log);
    assert_eq!(summary(&st, "Ready").1, "PollingNotReady");
    assert_eq!(st.polling.unwrap().pods.desired, 5);
}

#[tokio::test]
async fn removing_polling_deletes_the_poll_connector() {
    let mut tp = pipeline();
    tp.status = Some(running_poll_connector());
    let (res, log) = run(server(&tp, ready(3), vec![]), &tp).await;
    res.expect("reconcile");
    assert_eq!(
        writes(&log),
        vec![
            patch(CM),
            patch(WORKER),
            patch(PDB),
            patch(API),
            patch(SVC),
            format!("DELETE {POLL}?"),
            patch(STATUS)
        ]
    );
    assert!(
        notes(&log).contains(&(
            "PollingRemoved".into(),
            "spec.polling is no longer set: deleted the poll connector btc-poll (the jobs stay in Redis)"
                .into()
        )),
        "{:?}",
        notes(&log)
    );
    let st = status_of(&log);
    assert_eq!(st.polling, None);
    assert_eq!(
        summary(&st, "Ready"),
        (
            "True".into(),
            "AllReplicasReady".into(),
            "2 workers and 1 api pods available".into()
        )
    );
    // and once it is gone (status no longer lists it), nothing is deleted again
    let mut again = tp.clone();
    again.status = Some(st);
    let (_, log) = run(server(&again, ready(3), vec![]), &again).await;
    assert!(!writes(&log).iter().any(|w| w.starts_with("DELETE")));
}

#[tokio::test]
async fn a_key_secret_not_offered_keeps_the_poll_connector_from_being_deployed() {
    let tp = with_polling(pipeline());
    for (secrets, reason, message) in [
        (
            vec![secret("finnhub-key", Some("btc")), secret("av-key", None)],
            "SecretNotOffered",
            "secret markets/av-key (named by spec.polling.providers.alphaVantage.apiKeySecretRef) \
             is not offered to pipeline btc: it has no tickfleet.io/allowed-pipelines annotation; \
             offer it with: kubectl annotate -n markets secret av-key \
             tickfleet.io/allowed-pipelines=btc",
        ),
        (
            vec![
                secret("finnhub-key", Some("eth")),
                secret("av-key", Some("btc")),
            ],
            "SecretNotOffered",
            "secret markets/finnhub-key (named by spec.polling.providers.finnhub.apiKeySecretRef) \
             is offered to pipelines eth only, not to btc; add btc to its \
             tickfleet.io/allowed-pipelines annotation",
        ),
        (
            vec![secret("finnhub-key", Some("btc"))],
            "SecretNotFound",
            "secret markets/av-key (named by spec.polling.providers.alphaVantage.apiKeySecretRef) \
             does not exist",
        ),
    ] {
        let (res, log) = run(server(&tp, ready(3), secrets), &tp).await;
        // looked for again soon (the Secret may be offered or created any time)
        assert_eq!(res.expect_err("refused").metric_label(), "secret");
        // nothing references the key: no poll connector; the rest of the pipeline is applied
        assert_eq!(
            writes(&log),
            [CM, WORKER, PDB, API, SVC, STATUS].map(patch),
            "{reason}"
        );
        let st = status_of(&log);
        assert_eq!(
            summary(&st, "Degraded"),
            ("True".into(), reason.into(), message.into())
        );
        let (ready, ready_reason, _) = summary(&st, "Ready");
        assert_eq!((ready.as_str(), ready_reason.as_str()), ("False", reason));
        assert_eq!(
            st.polling,
            Some(PollingStatus {
                deployment: "btc-poll".into(),
                pods: Default::default(),
                message: "not applied: a Secret it needs is not offered".into(),
            })
        );
        assert!(
            notes(&log)
                .iter()
                .any(|(r, note)| r == reason && note == message),
            "{:?}",
            notes(&log)
        );
    }
}

#[tokio::test]
async fn a_paused_pipeline_reports_its_poll_connector_without_touching_it() {
    let mut tp = pipeline();
    pause(&mut tp);
    tp.status = Some(TickPipelineStatus {
        observed_generation: Some(2),
        polling: Some(PollingStatus {
            deployment: "btc-poll".into(),
            ..PollingStatus::default()
        }),
        ..TickPipelineStatus::default()
    });
    let (res, log) = run(server(&tp, ready(2), vec![]), &tp).await;
    res.expect("reconcile");
    // polling left the spec while paused: the poll connector is read, not deleted
    assert_eq!(writes(&log), vec![patch(STATUS)]);
    assert!(log.iter().any(|r| r.method == "GET" && r.uri == POLL));
    assert_eq!(status_of(&log).polling.unwrap().pods, pods(2));
}

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
                    mode: None,
                    min_replica_acks: None,
                    url_secret_ref: None,
                    tls: None,
                },
                key_prefix: "tf".into(),
                retention: None,
                rollup_retention: None,
                postgres: None,
            },
            workers: WorkersSpec {
                replicas: 2,
                ..WorkersSpec::default()
            },
            api: ApiSpec::default(),
            image: "ghcr.io/tickfleet/tickfleet:0.1.0".into(),
            image_pull_policy: None,
            log_format: LogFormat::Json,
            sources: vec![],
            polling: None,
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

/// `n` pods of a Deployment, all current, ready, updated and available.
pub fn pods(n: i32) -> crate::crd::ReplicaStatus {
    crate::crd::ReplicaStatus {
        desired: n,
        current: n,
        ready: n,
        updated: n,
        available: n,
    }
}

/// The Secrets [`pipeline_with_every_secret`] names, in spec order.
pub const EVERY_SECRET: [&str; 5] = [
    "kafka-creds",
    "redis-url",
    "redis-ca",
    "redis-client",
    "api-cert",
];

/// [`pipeline`] naming every kind of Secret, each a different one: Kafka SASL credentials
/// `kafka-creds` (keys `username`, `password`), the Redis URL `redis-url`, the Redis CA
/// `redis-ca` and client certificate `redis-client`, and the api certificate `api-cert`.
pub fn pipeline_with_every_secret() -> TickPipeline {
    use crate::crd::{
        ApiTlsSpec, CredentialsSecretRef, KafkaAuth, RedisTlsSpec, SaslMechanism, SaslSpec,
        SecretKeyRef, SecurityProtocol,
    };
    let mut tp = pipeline();
    tp.spec.kafka.auth = Some(KafkaAuth {
        security_protocol: SecurityProtocol::SaslSsl,
        sasl: Some(SaslSpec {
            mechanism: SaslMechanism::ScramSha512,
            credentials_secret: CredentialsSecretRef {
                name: "kafka-creds".into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        }),
    });
    tp.spec.store.redis.url = None;
    tp.spec.store.redis.url_secret_ref = Some(SecretKeyRef {
        name: "redis-url".into(),
        key: "url".into(),
    });
    tp.spec.store.redis.tls = Some(RedisTlsSpec {
        ca_secret_ref: Some(SecretKeyRef {
            name: "redis-ca".into(),
            key: "ca.crt".into(),
        }),
        client_cert_secret_name: Some("redis-client".into()),
    });
    tp.spec.api.tls = Some(ApiTlsSpec {
        secret_name: "api-cert".into(),
    });
    tp
}

/// `tp` with `spec.polling`: 3 poll connector pods, Finnhub's key in Secret `finnhub-key` (key
/// `token`), Alpha Vantage's in `av-key` (key `key`) with a proxy as base URL, Yahoo at a fixture
/// server, a 5 s lease.
pub fn with_polling(mut tp: TickPipeline) -> TickPipeline {
    tp.spec.polling = Some(
        serde_json::from_value(serde_json::json!({
            "replicas": 3,
            "providers": {
                "finnhub": {"apiKeySecretRef": {"name": "finnhub-key", "key": "token"}},
                "alphaVantage": {"apiKeySecretRef": {"name": "av-key", "key": "key"},
                                 "baseUrl": "https://av-proxy.internal"},
                "yahoo": {"baseUrl": "http://yahoo-fixture.markets.svc:8099"}
            },
            "leaseTtlMs": 5000
        }))
        .expect("polling spec"),
    );
    tp
}

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::pin_mut;
use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{Value, json};
use tower_test::mock;

use crate::controller::Context;
use crate::kafka::{KafkaAdmin, KafkaConnection, KafkaError, LagReport};
use crate::metrics::Metrics;

/// The fixed "now" of controller tests.
pub fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("valid timestamp")
}

/// A fake Kafka cluster: topic partition counts, a lag to report, and a log of every call.
#[derive(Default)]
pub struct FakeKafka {
    /// Topic → partitions.
    pub topics: Mutex<BTreeMap<String, i32>>,
    /// Calls made, as `op topic args`.
    pub calls: Mutex<Vec<String>>,
    /// Lag `consumer_lag` reports (0 when `None`).
    pub lag: Mutex<Option<i64>>,
    /// Make `consumer_lag` fail (broker unreachable).
    pub fail_lag: Mutex<bool>,
    /// Make `topic_partitions` fail (broker unreachable).
    pub fail_describe: bool,
    /// Make `grow_topic` fail (e.g. a policy forbids it).
    pub fail_grow: bool,
    /// Make `create_topic` fail (e.g. the operator may not create topics).
    pub fail_create: bool,
    /// Make `topic_partitions` never answer (a broker that accepts connections and says
    /// nothing), to test that shutdown does not wait for Kafka.
    pub hang: bool,
}

impl FakeKafka {
    /// A cluster that has `topic` with `partitions` partitions, and its dead-letter topic.
    pub fn with_topic(topic: &str, partitions: i32) -> Self {
        let f = Self::default();
        f.topics.lock().unwrap().insert(topic.into(), partitions);
        f.topics
            .lock()
            .unwrap()
            .insert(crate::kafka::dead_letter_topic(topic), partitions);
        f
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

fn broker_down(op: &'static str, topic: &str) -> KafkaError {
    KafkaError::Topic {
        op,
        topic: topic.into(),
        code: RDKafkaErrorCode::BrokerTransportFailure,
    }
}

#[async_trait]
impl KafkaAdmin for FakeKafka {
    async fn topic_partitions(
        &self,
        _: &KafkaConnection,
        topic: &str,
    ) -> Result<Option<i32>, KafkaError> {
        self.log(format!("describe {topic}"));
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.fail_describe {
            return Err(broker_down("describe", topic));
        }
        Ok(self.topics.lock().unwrap().get(topic).copied())
    }
    async fn create_topic(
        &self,
        _: &KafkaConnection,
        topic: &str,
        partitions: i32,
        replication: Option<i32>,
    ) -> Result<(), KafkaError> {
        self.log(format!("create {topic} {partitions} {replication:?}"));
        if self.fail_create {
            return Err(KafkaError::Topic {
                op: "create",
                topic: topic.into(),
                code: RDKafkaErrorCode::TopicAuthorizationFailed,
            });
        }
        self.topics.lock().unwrap().insert(topic.into(), partitions);
        Ok(())
    }
    async fn grow_topic(
        &self,
        _: &KafkaConnection,
        topic: &str,
        total: i32,
    ) -> Result<(), KafkaError> {
        self.log(format!("grow {topic} {total}"));
        if self.fail_grow {
            return Err(KafkaError::Topic {
                op: "grow",
                topic: topic.into(),
                code: RDKafkaErrorCode::PolicyViolation,
            });
        }
        self.topics.lock().unwrap().insert(topic.into(), total);
        Ok(())
    }
    async fn consumer_lag(
        &self,
        _: &KafkaConnection,
        topic: &str,
        group: &str,
    ) -> Result<LagReport, KafkaError> {
        self.log(format!("lag {topic} {group}"));
        if *self.fail_lag.lock().unwrap() {
            return Err(broker_down("measure lag of", topic));
        }
        Ok(LagReport {
            total: self.lag.lock().unwrap().unwrap_or(0),
            partitions: vec![],
        })
    }
}

/// One request the mocked API server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// `Accept` header (`...;as=PartialObjectMetadata;...` for a metadata-only read).
    pub accept: Option<String>,
    /// JSON body (`Null` when empty).
    pub body: Value,
}

/// A mocked Kubernetes API server (a `tower-test` service behind a real `kube::Client`). It
/// records every request and answers like the API server would: server-side applies echo the
/// applied object (Deployments with the configured status), a status apply returns the pipeline
/// with that status, Secrets come from a map (only their metadata when that is all the client
/// asks for), requests matching `fail` get the given error status, requests matching `hang` are
/// never answered, and one Lease is kept like the API server keeps it: created, read and replaced
/// with `resourceVersion` checks (`409 Conflict` for a stale one); deleting a Deployment succeeds.
#[derive(Default)]
pub struct ApiServer {
    /// The pipeline being reconciled (returned by status patches).
    pub pipeline: Option<crate::TickPipeline>,
    /// Deployment name → status reported in apply responses.
    pub deployment_status: HashMap<String, DeploymentStatus>,
    /// Secret name → Secret.
    pub secrets: HashMap<String, Secret>,
    /// The Lease at the start (`GET .../leases/NAME` is 404 while there is none).
    pub lease: Option<k8s_openapi::api::coordination::v1::Lease>,
    /// `(after, lease)`: another replica writes `lease` (with the next `resourceVersion`) that
    /// long after [`ApiServer::start`]; reads see it from then on, and a watch of the Lease gets
    /// it as a `MODIFIED` event at that moment (the watch then ends; one with nothing left to
    /// send is held open without events).
    pub lease_changes: Vec<(
        std::time::Duration,
        k8s_openapi::api::coordination::v1::Lease,
    )>,
    /// `(method, path prefix, status code)`: matching requests fail with that code.
    pub fail: Vec<(&'static str, String, u16)>,
    /// `(method, path prefix)`: matching requests are never answered (a hung API server).
    pub hang: Vec<(&'static str, String)>,
}

fn status_response(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        _ => "InternalError",
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(body: &Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

impl ApiServer {
    /// A server holding `tp` and `secrets` (by name), and nothing else yet.
    pub fn serving(tp: &crate::TickPipeline, secrets: Vec<Secret>) -> Self {
        ApiServer {
            pipeline: Some(tp.clone()),
            secrets: secrets
                .into_iter()
                .map(|s| (s.metadata.name.clone().unwrap(), s))
                .collect(),
            ..ApiServer::default()
        }
    }

    /// Create and replace of the Lease, with the API server's optimistic concurrency.
    fn write_lease(&mut self, method: &str, body: &Value) -> Response<Body> {
        use k8s_openapi::api::coordination::v1::Lease;
        let Ok(mut lease) = serde_json::from_value::<Lease>(body.clone()) else {
            return status_response(StatusCode::BAD_REQUEST, "not a Lease");
        };
        let stored = self
            .lease
            .as_ref()
            .map(|l| l.metadata.resource_version.clone());
        match (method, stored) {
            ("POST", Some(_)) => return status_response(StatusCode::CONFLICT, "already exists"),
            ("PUT", None) => return status_response(StatusCode::NOT_FOUND, "no lease"),
            ("PUT", Some(version)) if version != lease.metadata.resource_version => {
                return status_response(StatusCode::CONFLICT, "the object has been modified");
            }
            _ => {}
        }
        let next = stored_version(self.lease.as_ref()) + 1;
        lease.metadata.resource_version = Some(next.to_string());
        let answer = serde_json::to_value(&lease).unwrap();
        self.lease = Some(lease);
        ok(&answer)
    }

    /// Stores the [`Self::lease_changes`] due at `now`, each with the next version.
    fn apply_lease_changes(&mut self, start: tokio::time::Instant, now: tokio::time::Instant) {
        while let Some((after, _)) = self.lease_changes.first() {
            if start + *after > now {
                break;
            }
            let (_, mut lease) = self.lease_changes.remove(0);
            lease.metadata.resource_version =
                Some((stored_version(self.lease.as_ref()) + 1).to_string());
            self.lease = Some(lease);
        }
    }

    /// The next lease change as its watch event, and when it is due.
    fn next_lease_event(
        &self,
        start: tokio::time::Instant,
    ) -> Option<(tokio::time::Instant, Value)> {
        let (after, lease) = self.lease_changes.first()?;
        let mut lease = lease.clone();
        lease.metadata.resource_version =
            Some((stored_version(self.lease.as_ref()) + 1).to_string());
        Some((
            start + *after,
            json!({"type": "MODIFIED", "object": serde_json::to_value(&lease).unwrap()}),
        ))
    }

    fn answer(&mut self, method: &str, path: &str, accept: &str, body: &Value) -> Response<Body> {
        if let Some((_, _, code)) = self
            .fail
            .iter()
            .find(|(m, p, _)| *m == method && path.starts_with(p.as_str()))
        {
            return status_response(StatusCode::from_u16(*code).unwrap(), "injected failure");
        }
        let name = path.rsplit('/').next().unwrap_or_default();
        match method {
            "PATCH" if path.ends_with("/status") => {
                let mut tp =
                    serde_json::to_value(self.pipeline.as_ref().expect("pipeline")).unwrap();
                tp["status"] = body["status"].clone();
                ok(&tp)
            }
            "PATCH" if path.contains("/deployments/") => {
                let mut d = body.clone();
                d["metadata"]["generation"] = json!(1);
                if let Some(st) = self.deployment_status.get(name) {
                    d["status"] = serde_json::to_value(st).unwrap();
                }
                ok(&d)
            }
            "POST" | "PUT" if path.contains("/leases") => self.write_lease(method, body),
            "DELETE" if path.contains("/deployments/") => ok(&json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            })),
            "PATCH" | "POST" | "PUT" => ok(body),
            "GET" if path.contains("/deployments/") => match self.deployment_status.get(name) {
                Some(st) => ok(&json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "namespace": "markets", "generation": 1},
                    "spec": {"replicas": st.replicas, "selector": {}, "template": {}},
                    "status": st,
                })),
                None => status_response(
                    StatusCode::NOT_FOUND,
                    &format!("deployments.apps \"{name}\" not found"),
                ),
            },
            "GET" if path.contains("/leases/") => match &self.lease {
                Some(l) => ok(&serde_json::to_value(l).unwrap()),
                None => status_response(
                    StatusCode::NOT_FOUND,
                    &format!("leases \"{name}\" not found"),
                ),
            },
            "GET" if path.contains("/secrets/") => match self.secrets.get(name) {
                Some(s) if accept.contains("as=PartialObjectMetadata") => ok(&json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": serde_json::to_value(&s.metadata).unwrap(),
                })),
                Some(s) => ok(&serde_json::to_value(s).unwrap()),
                None => status_response(
                    StatusCode::NOT_FOUND,
                    &format!("secrets \"{name}\" not found"),
                ),
            },
            _ => status_response(StatusCode::NOT_FOUND, "not mocked"),
        }
    }

    /// Starts serving; returns a client talking to it and the log of received requests.
    pub fn start(mut self) -> (Client, Arc<Mutex<Vec<Recorded>>>) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let log = Arc::new(Mutex::new(Vec::new()));
        let recorded = log.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            pin_mut!(handle);
            let mut hung = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                self.apply_lease_changes(start, tokio::time::Instant::now());
                let method = request.method().to_string();
                let uri = request.uri().to_string();
                let path = request.uri().path().to_string();
                let lease_watch =
                    method == "GET" && path.ends_with("/leases") && uri.contains("watch=true");
                let [content_type, accept] = [http::header::CONTENT_TYPE, http::header::ACCEPT]
                    .map(|name| {
                        request
                            .headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_string())
                    });
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let hang = self
                    .hang
                    .iter()
                    .any(|(m, p)| *m == method && path.starts_with(p.as_str()));
                let event = lease_watch.then(|| self.next_lease_event(start)).flatten();
                let response = (!hang && !lease_watch).then(|| {
                    self.answer(&method, &path, accept.as_deref().unwrap_or_default(), &body)
                });
                recorded.lock().unwrap().push(Recorded {
                    method,
                    uri,
                    content_type,
                    accept,
                    body,
                });
                if let Some((due, event)) = event {
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        send.send_response(Response::builder().body(Body::from(line)).unwrap());
                    });
                    continue;
                }
                match response {
                    Some(response) => send.send_response(response),
                    // kept, so the client waits instead of seeing the connection drop
                    None => hung.push(send),
                }
            }
        });
        (Client::new(service, "default"), log)
    }
}

fn stored_version(lease: Option<&k8s_openapi::api::coordination::v1::Lease>) -> u64 {
    lease
        .and_then(|l| l.metadata.resource_version.as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Context {
    /// A context on a mocked API server and a fake Kafka, with unregistered metrics and the
    /// clock fixed at [`now`].
    pub fn test(client: Client, kafka: Arc<FakeKafka>) -> Arc<Self> {
        let registry = prometheus::Registry::new();
        Arc::new(Self {
            kafka,
            metrics: Metrics::new(&registry).expect("metrics"),
            clock: Arc::new(now),
            failures: Mutex::new(HashMap::new()),
            lag_measured: Mutex::new(HashMap::new()),
            events: crate::events::Events::new(client.clone(), Some("op-0".into())),
            client,
            shutdown: tokio_util::sync::CancellationToken::new(),
        })
    }
}

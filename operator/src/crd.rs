// Over 600 lines because it is the schema of one custom resource: spec and status types with their
// serde/schema attributes and no logic, so every field of the CRD is in one file.
//! The `TickPipeline` custom resource (group `tickfleet.io`, version `v1alpha1`).
//!
//! One `TickPipeline` describes one stream of ticks: the Kafka topic it is read from, the Redis it is
//! written to, and how many worker and api pods serve it. The operator turns it into a ConfigMap,
//! Deployments, a Service and a PodDisruptionBudget, and makes sure the topic exists.
//!
//! Validation that the API server can do is declared here (minimums, enums, required fields, CEL
//! rules for cross-field constraints), so `kubectl apply` of a bad spec is rejected with a readable
//! message. The operator checks the same constraints again in [`crate::desired::validate`], because
//! an object may predate the current schema.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation that pauses a pipeline: while it is `"true"` the operator writes no child object and
/// changes nothing in Kafka; it only reports a `Paused` condition.
pub const PAUSED_ANNOTATION: &str = "tickfleet.io/paused";

/// Desired state of a tick pipeline: Kafka source, Redis store, workers and query api.
// clippy reads the repeated `type_ = "integer"` of two printcolumns as a duplicated attribute
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tickfleet.io",
    version = "v1alpha1",
    kind = "TickPipeline",
    namespaced,
    shortname = "tp",
    status = "TickPipelineStatus",
    doc = "A stream of market price ticks read from a Kafka topic and stored in Redis by a fleet of workers.",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 56")
        .message("metadata.name must be at most 56 characters (children are named <name>-config etc.)"),
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.workers.current",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether all workers and api pods are ready"
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".status.workers.ready",
        description = "Ready worker pods"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.workers.desired",
        description = "Worker pods the operator asks for",
        priority = "1"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.lag",
        description = "Total consumer lag in messages"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TickPipelineSpec {
    /// Where ticks are read from.
    pub kafka: KafkaSpec,
    /// Where ticks are written to.
    pub store: StoreSpec,
    /// The worker fleet that moves ticks from Kafka to Redis.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// The gRPC query api in front of Redis.
    #[serde(default)]
    pub api: ApiSpec,
    /// Container image holding all tickfleet binaries (`tickfleet-worker`, `tickfleet-api`, ...).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy for the worker and api containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Log format of the worker and api processes.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Exchange trade streams that put ticks on the topic: each source runs as one connector
    /// Deployment (`tickfleet-connector`, one pod). Each symbol comes from one source only, so an
    /// asset's ticks come from one venue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(s, self.filter(t, (has(t.name) ? t.name : t.exchange) == (has(s.name) ? s.name : s.exchange)).size() == 1)"
    ).message("two sources have the same name (a source's name defaults to its exchange): give each a distinct name"))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(s, s.symbols.all(x, self.filter(t, x in t.symbols).size() == 1))"
    ).message("a symbol is in two sources: one pipeline takes each asset from one venue"))]
    pub sources: Vec<SourceSpec>,
    /// Provider polling jobs: when set, the operator runs `tickfleet-connector poll` (one
    /// Deployment, `<pipeline>-poll`) over the pipeline's Redis and Kafka, which runs the jobs
    /// created with `POST /v1/prices/poll` (or `CreatePollJob`) on the api. Removing the field
    /// removes the Deployment; the jobs stay in Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling: Option<PollingSpec>,
}

/// The poll connector: `tickfleet-connector poll` replicas polling the market-data providers'
/// quote endpoints for the jobs stored in the pipeline's Redis, each new price produced to the
/// pipeline's topic as a tick. Several replicas are safe: each (provider, symbol) is polled by one
/// replica at a time, under a Redis lease with a TTL and a fencing token, and a dead replica's pairs
/// are taken over when its lease expires.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.backoffMinMs) ? self.backoffMinMs : 1000) <= (has(self.backoffMaxMs) ? self.backoffMaxMs : 300000)"
).message("backoffMaxMs must be at least backoffMinMs (defaults 300000 and 1000)"))]
pub struct PollingSpec {
    /// Poll connector pods.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,
    /// API keys and base URLs of the providers. A job for a provider that needs a key (Finnhub)
    /// and has none here is refused by the provider and backed off; Alpha Vantage without a key
    /// uses its `demo` key, which answers for a few symbols only.
    #[serde(default)]
    pub providers: PollProvidersSpec,
    /// Lease TTL in milliseconds (`--lease-ttl-ms`, 10000 when unset): how long a dead replica's
    /// pairs wait before another replica takes them over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 300, max = 3_600_000))]
    pub lease_ttl_ms: Option<i64>,
    /// How often each replica lists the jobs and tries the free leases, in milliseconds
    /// (`--scan-interval-ms`, 1000 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50, max = 3_600_000))]
    pub scan_interval_ms: Option<i64>,
    /// How long a polled quote is served by `GET /v1/prices/latest?provider=`, in milliseconds
    /// (`--cache-ttl-ms`, 60000 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400_000))]
    pub cache_ttl_ms: Option<i64>,
    /// Deadline of one provider request, in milliseconds (`--http-timeout-ms`, 10000 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600_000))]
    pub http_timeout_ms: Option<i64>,
    /// First pause of a provider after an error or a rate limit without `Retry-After`, in
    /// milliseconds (`--backoff-min-ms`, 1000 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400_000))]
    pub backoff_min_ms: Option<i64>,
    /// Longest pause of a provider, in milliseconds (`--backoff-max-ms`, 300000 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400_000))]
    pub backoff_max_ms: Option<i64>,
    /// Compute resources of a poll connector container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// The providers the poll connector knows, each optional.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PollProvidersSpec {
    /// Finnhub (`/api/v1/quote`; the key is sent in the `X-Finnhub-Token` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finnhub: Option<KeyedProviderSpec>,
    /// Alpha Vantage (`GLOBAL_QUOTE`; the key is a query parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_vantage: Option<KeyedProviderSpec>,
    /// Yahoo Finance (the chart endpoint; no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yahoo: Option<OpenProviderSpec>,
}

/// A provider that takes an API key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyedProviderSpec {
    /// Secret key holding the API key, given to the poll connector pods as an environment
    /// variable from the Secret (never in the pod spec's literals, never logged). The Secret must be
    /// offered to the pipeline: annotation `tickfleet.io/allowed-pipelines` naming it, or `*`;
    /// until it is, the poll connector is not deployed.
    pub api_key_secret_ref: SecretKeyRef,
    /// Base URL instead of the provider's (a proxy, a fixture server), `http://` or `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub base_url: Option<String>,
}

/// A provider without an API key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OpenProviderSpec {
    /// Base URL instead of the provider's (a proxy, a fixture server), `http://` or `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub base_url: Option<String>,
}

/// Longest number of symbols one source reads (one WebSocket connection; bounded so the CRD's
/// cross-source CEL rule stays within the API server's cost budget).
pub const MAX_SOURCE_SYMBOLS: usize = 64;

/// One exchange trade stream, run by one connector pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Name of the source, unique in the pipeline; its Deployment is `<pipeline>-source-<name>`.
    /// Defaults to the exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: Option<String>,
    /// The venue.
    #[schemars(extend("maxLength" = 16))]
    pub exchange: Exchange,
    /// Symbols as `BASE-QUOTE` in upper case (e.g. `BTC-USDT`): the asset ids and Kafka keys of
    /// the ticks; the connector maps them to the venue's spelling.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(max = 33), pattern(r"^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub symbols: Vec<String>,
    /// WebSocket URL instead of the venue's public endpoint (a proxy, a mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^wss?://"))]
    pub ws_url: Option<String>,
    /// Compute resources of the connector container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl SourceSpec {
    /// The source's name: its `name`, or the exchange's.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.exchange.as_str())
    }
}

/// Venues a source can read (the `tickfleet-connector --exchange` values).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Exchange {
    /// Binance spot, `<symbol>@trade` streams.
    Binance,
    /// Coinbase Exchange, `matches` channel.
    Coinbase,
    /// Kraken WebSocket v2, `trade` channel.
    Kraken,
}

impl Exchange {
    /// The `TICKFLEET_EXCHANGE` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Binance => "binance",
            Self::Coinbase => "coinbase",
            Self::Kraken => "kraken",
        }
    }
}

/// Kafka source of a pipeline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list of bootstrap brokers.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Topic holding the ticks.
    #[schemars(length(min = 1, max = 249), pattern(r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Partitions the topic must have. The operator creates the topic with this many partitions or
    /// grows it to this many; it never shrinks a topic. Workers never outnumber partitions.
    #[schemars(range(min = 1, max = 100000))]
    pub partitions: i32,
    /// Replication factor used when the operator creates the topic; the broker default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32767))]
    pub replication_factor: Option<i32>,
    /// Consumer group of the workers; `tickfleet.<namespace>.<name>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub consumer_group: Option<String>,
    /// Encoding of the messages on the topic.
    #[serde(default)]
    pub format: MessageFormat,
    /// How to connect and authenticate; plaintext without authentication when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<KafkaAuth>,
}

/// Encoding of tick messages on the topic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    /// Protocol Buffers (`tickfleet.v1.Tick`).
    #[default]
    Protobuf,
    /// JSON objects.
    Json,
}

/// Kafka connection security and credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.sasl) == (self.securityProtocol == 'SASL_PLAINTEXT' || self.securityProtocol == 'SASL_SSL')"
).message("sasl must be set exactly when securityProtocol is SASL_PLAINTEXT or SASL_SSL"))]
pub struct KafkaAuth {
    /// librdkafka `security.protocol`.
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism and credentials; required for the SASL protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslSpec>,
}

/// librdkafka `security.protocol` values.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS without SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }
}

/// SASL mechanism and where its credentials live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SaslSpec {
    /// librdkafka `sasl.mechanism`.
    pub mechanism: SaslMechanism,
    /// Secret (in the pipeline's namespace) holding the username and password, read by the
    /// operator (topic admin, lag) and given to the workers. It must be offered to this pipeline:
    /// annotation `tickfleet.io/allowed-pipelines` on the Secret naming the pipeline (or `*`).
    pub credentials_secret: CredentialsSecretRef,
}

/// librdkafka `sasl.mechanism` values.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    /// `PLAIN`
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A Secret holding a username and a password under two keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Secret name, in the pipeline's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key of the username.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// One key of a Secret in the pipeline's namespace. The Secret must be offered to the pipeline:
/// annotation `tickfleet.io/allowed-pipelines` on it naming the pipeline, comma-separated, or `*`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Redis store of a pipeline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    /// How to reach Redis.
    pub redis: RedisSpec,
    /// Prefix of every key the pipeline writes.
    #[serde(default = "default_key_prefix")]
    #[schemars(length(min = 1, max = 64))]
    pub key_prefix: String,
    /// How long ticks are kept; unbounded when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// How long the candle rollups are kept, per base interval (`TICKFLEET_ROLLUP_RETENTION` of the
    /// workers). Separate from `retention`, which never removes a rollup; when unset the workers keep
    /// 1-second candles 7 days, 1-minute candles 400 days, hourly and daily candles for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollup_retention: Option<RollupRetentionSpec>,
    /// PostgreSQL for history beside Redis: when set, workers write every batch to both before they
    /// commit (`TICKFLEET_STORE=both`) and the api reads ranges from PostgreSQL. Redis stays the hot
    /// window and carries the live streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
}

/// PostgreSQL history store of a pipeline.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Secret key holding the URL, `postgres://USER:PASSWORD@HOST:PORT/DB` (the Secret must be
    /// offered to the pipeline: annotation `tickfleet.io/allowed-pipelines`). TLS follows its
    /// `sslmode` (`?sslmode=verify-full` to check the server's certificate and name).
    pub url_secret_ref: SecretKeyRef,
    /// Secret key holding the CA certificate (PEM) of the server's certificate, for a private CA:
    /// mounted into the workers and api and used as the URL's `sslrootcert`
    /// (`TICKFLEET_POSTGRES_CA_FILE`); the system CAs are used when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Schema of the pipeline's tables, created and migrated by the workers; the key prefix (with
    /// every character other than letters, digits and `_` as `_`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 50),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub schema: Option<String>,
    /// Drop day partitions whose ticks are all older than this many days; all history is kept when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub retention_days: Option<u32>,
}

fn default_key_prefix() -> String {
    "tf".into()
}

/// Redis address, given inline or from a Secret (use the Secret when the URL carries a password),
/// and the TLS files for a `rediss://` URL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.url) != has(self.urlSecretRef)")
    .message("set exactly one of redis.url and redis.urlSecretRef"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.tls) || !has(self.url) || self.url.startsWith('rediss://')"
).message("redis.tls needs a rediss:// url"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.url) || !self.url.contains(',') || (has(self.mode) && self.mode == 'cluster')"
).message("several comma-separated redis.url seeds need mode: cluster"))]
pub struct RedisSpec {
    /// `redis://` or `rediss://` URL; with `mode: cluster`, one or more comma-separated seed URLs of
    /// the cluster's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^rediss?://"))]
    pub url: Option<String>,
    /// `standalone` (one Redis server; the default) or `cluster` (a Redis Cluster, reached through the
    /// seed URLs) — `TICKFLEET_REDIS_MODE` of the workers and the api.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RedisMode>,
    /// Replicas that must acknowledge each batch (`WAIT`) before the workers commit its offsets
    /// (`TICKFLEET_REDIS_MIN_REPLICA_ACKS`); 0 when unset: the primary's answer is enough. A shard
    /// with fewer replicas in sync takes no writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub min_replica_acks: Option<u32>,
    /// Secret key holding the URL (the Secret must be offered to the pipeline: annotation
    /// `tickfleet.io/allowed-pipelines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// TLS files for a `rediss://` URL, mounted from Secrets into the worker and api pods. Not
    /// needed when the server's certificate is signed by a public CA and it does not check clients.
    /// With `mode: cluster` the same files serve every node of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTlsSpec>,
}

/// Which kind of Redis deployment the store is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis server.
    #[default]
    Standalone,
    /// A Redis Cluster.
    Cluster,
}

impl RedisMode {
    /// The value of `TICKFLEET_REDIS_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        }
    }
}

/// Private CA and client certificate for Redis over TLS. The Secrets are mounted read-only into
/// the worker and api pods (the operator reads only their metadata) and must be offered to the
/// pipeline (annotation `tickfleet.io/allowed-pipelines` naming it, or `*`); a key that is missing
/// keeps the pods from starting.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.caSecretRef) || has(self.clientCertSecretName)")
    .message("redis.tls needs caSecretRef or clientCertSecretName (leave tls out to use the system CAs)"))]
pub struct RedisTlsSpec {
    /// Secret key holding the PEM CA certificate(s) that signed the Redis server's certificate
    /// (`TICKFLEET_REDIS_CA_FILE`); the system CAs are used when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`) with the client certificate for
    /// Redis servers that verify clients (mutual TLS; `TICKFLEET_REDIS_CLIENT_CERT_FILE` and
    /// `TICKFLEET_REDIS_CLIENT_KEY_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_cert_secret_name: Option<String>,
}

/// Retention of stored ticks; both limits apply when both are set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Drop ticks older than this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_age_seconds: Option<i64>,
    /// Keep at most this many ticks per asset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_count: Option<i64>,
}

/// Retention of the candle rollups, per base interval: each age is counted back from the asset's
/// newest tick (bounded by the worker's clock), like raw retention. A base left out keeps the workers'
/// default; 0 keeps its candles for ever.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollupRetentionSpec {
    /// Drop 1-second candles older than this many seconds (default 604800, 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub one_second_max_age_seconds: Option<i64>,
    /// Drop 1-minute candles older than this many seconds (default 34560000, 400 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub one_minute_max_age_seconds: Option<i64>,
    /// Drop 1-hour candles older than this many seconds (default: kept for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub one_hour_max_age_seconds: Option<i64>,
    /// Drop 1-day candles older than this many seconds (default: kept for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub one_day_max_age_seconds: Option<i64>,
}

impl RollupRetentionSpec {
    /// The bases that are set, as `(label, field, seconds)` in base order.
    pub fn ages(&self) -> [(&'static str, &'static str, Option<i64>); 4] {
        [
            (
                "1s",
                "oneSecondMaxAgeSeconds",
                self.one_second_max_age_seconds,
            ),
            (
                "1m",
                "oneMinuteMaxAgeSeconds",
                self.one_minute_max_age_seconds,
            ),
            ("1h", "oneHourMaxAgeSeconds", self.one_hour_max_age_seconds),
            ("1d", "oneDayMaxAgeSeconds", self.one_day_max_age_seconds),
        ]
    }

    /// The workers' `TICKFLEET_ROLLUP_RETENTION` (`1s=604800s,1h=forever`; 0 is `forever`), or `None`
    /// when no base is set.
    pub fn env_value(&self) -> Option<String> {
        let parts: Vec<String> = self
            .ages()
            .into_iter()
            .filter_map(|(label, _, age)| {
                age.map(|a| match a {
                    0 => format!("{label}=forever"),
                    a => format!("{label}={a}s"),
                })
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(","))
    }
}

/// The worker fleet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// Worker pods when autoscaling is off. This is the field behind the `scale` subresource, so
    /// `kubectl scale` and external autoscalers (HPA, KEDA) drive it. Capped at the partition count.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Built-in lag-based autoscaling; when enabled it decides the worker count instead of `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Ticks per Redis write batch (worker default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub batch_size: Option<i32>,
    /// Longest wait before a partial batch is written, in milliseconds (worker default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub batch_linger_ms: Option<i32>,
    /// Bound on a worker's drain at shutdown; the pod's grace period is set longer than this.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: i32,
    /// Ticks dated more than this many seconds after the worker's clock are dead-lettered with
    /// reason `clock_skew`, so one bad producer clock cannot pin `latest` or empty the retention
    /// window (`TICKFLEET_MAX_SKEW_AHEAD_SECS`; the worker's default when unset: 300). At most
    /// 9223372036, the seconds a 64-bit count of nanoseconds holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9_223_372_036_i64))]
    pub max_skew_ahead_seconds: Option<i64>,
    /// Ticks dated more than this many seconds before the worker's clock are dead-lettered with
    /// reason `clock_skew` (`TICKFLEET_MAX_SKEW_BEHIND_SECS`; the worker's default when unset:
    /// 31536000, 365 days). At most 9223372036.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9_223_372_036_i64))]
    pub max_skew_behind_seconds: Option<i64>,
    /// Compute resources of a worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            autoscaling: None,
            batch_size: None,
            batch_linger_ms: None,
            drain_timeout_seconds: default_drain_timeout(),
            max_skew_ahead_seconds: None,
            max_skew_behind_seconds: None,
            resources: None,
        }
    }
}

fn default_one() -> i32 {
    1
}
fn default_drain_timeout() -> i32 {
    30
}

/// Lag-based autoscaling of the workers:
/// `desired = clamp(ceil(lag / targetLagPerWorker), minReplicas, maxReplicas)`, capped at the
/// partition count, with scale-down held back by a stabilisation window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.maxReplicas) || self.maxReplicas >= self.minReplicas")
    .message("maxReplicas must be at least minReplicas"))]
#[x_kube(validation = kube::core::Rule::new("!self.enabled || (has(self.maxReplicas) && has(self.targetLagPerWorker))")
    .message("maxReplicas and targetLagPerWorker are required when autoscaling is enabled"))]
pub struct AutoscalingSpec {
    /// Whether the operator scales the workers; `workers.replicas` applies when false.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Fewest workers.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    /// Most workers (required when enabled).
    #[serde(default)]
    #[schemars(range(min = 1), transform = no_default)]
    pub max_replicas: i32,
    /// Consumer lag (messages) one worker is expected to keep up with (required when enabled).
    #[serde(default)]
    #[schemars(range(min = 1), transform = no_default)]
    pub target_lag_per_worker: i64,
    /// A scale-down only goes to the highest recommendation of this many past seconds, so a
    /// briefly low lag does not remove workers that are needed again a minute later.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i64,
    /// How often the lag is measured, in seconds.
    #[serde(default = "default_poll")]
    #[schemars(range(min = 5, max = 3600))]
    pub poll_interval_seconds: i64,
}

/// Drops the `default` schemars derives from `#[serde(default)]`: 0 would break the field's own
/// minimum, which the API server checks (and absent is what the CEL rule tests for).
fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

fn default_true() -> bool {
    true
}
fn default_stabilization() -> i64 {
    300
}
fn default_poll() -> i64 {
    30
}

/// The query api (gRPC and REST).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Api pods.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// gRPC port of the pods and the Service.
    #[serde(default = "default_grpc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// REST/JSON port (the same queries, live ticks as Server-Sent Events) of the pods and the
    /// Service; plain HTTP.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// Type of the api Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Compute resources of an api container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Serve gRPC over TLS; plaintext gRPC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTlsSpec>,
    /// Per-client rate limits of the api pods (gRPC and REST alike); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// Per-client token buckets by route class, each `COUNT/UNIT[:BURST]` (UNIT `s`, `m` or `h`, e.g.
/// `100/s:200`) or `off`; passed to the api pods as `TICKFLEET_RATE_LIMIT_*`. A refused call is
/// RESOURCE_EXHAUSTED on gRPC and 429 with `Retry-After` on REST. Each replica limits on its own:
/// with N replicas behind the Service a client may get up to N times the rate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Cheap reads: latest prices, assets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(off|[1-9][0-9]*/[smh](:[1-9][0-9]*)?)$"))]
    pub reads: Option<String>,
    /// Range reads: ticks, candles, moving averages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(off|[1-9][0-9]*/[smh](:[1-9][0-9]*)?)$"))]
    pub ranges: Option<String>,
    /// Opening live streams (gRPC and Server-Sent Events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(off|[1-9][0-9]*/[smh](:[1-9][0-9]*)?)$"))]
    pub streams: Option<String>,
    /// Writes (polling jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(off|[1-9][0-9]*/[smh](:[1-9][0-9]*)?)$"))]
    pub writes: Option<String>,
    /// Request header (gRPC metadata) naming the client, e.g. `x-api-key`; the peer address when
    /// unset or absent from a request. Keys are not verified: use it behind a gateway that
    /// authenticates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100), pattern(r"^[A-Za-z0-9-]+$"))]
    pub key_header: Option<String>,
    /// Most clients tracked per route class and replica (default 100000); beyond it new clients
    /// share one bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_clients: Option<i64>,
}

impl Default for ApiSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            port: default_grpc_port(),
            http_port: default_http_port(),
            service_type: ServiceType::default(),
            resources: None,
            tls: None,
            rate_limit: None,
        }
    }
}

/// gRPC over TLS for the api.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiTlsSpec {
    /// `kubernetes.io/tls` Secret (keys `tls.crt`, `tls.key`; e.g. issued by cert-manager) in the
    /// pipeline's namespace, mounted read-only into the api pods (the operator reads only its
    /// metadata). It must be offered to the pipeline: annotation `tickfleet.io/allowed-pipelines`
    /// naming it, or `*`. A renewed certificate is picked up when the api pods restart.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

fn default_grpc_port() -> i32 {
    50051
}

fn default_http_port() -> i32 {
    8080
}

/// Kubernetes Service types the api can be exposed with.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Container image pull policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when missing on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Log format of tickfleet processes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    #[default]
    Json,
}

impl LogFormat {
    /// The `TICKFLEET_LOG_FORMAT` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Observed state of a pipeline, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TickPipelineStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `Paused` and `WorkersCapped`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Worker pods.
    #[serde(default)]
    pub workers: ReplicaStatus,
    /// Api pods.
    #[serde(default)]
    pub api: ReplicaStatus,
    /// Total consumer lag of the group over the topic's partitions, in messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Partitions the topic has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Label selector of the worker pods, for the `scale` subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Inputs and outcome of the last autoscaling decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// The connector of each source, as its Deployment reports it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStatus>,
    /// The poll connector (`spec.polling`), as its Deployment reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling: Option<PollingStatus>,
}

/// How the poll connector runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PollingStatus {
    /// Its Deployment.
    pub deployment: String,
    /// Poll connector pods (ready means it reads the jobs from Redis and its Kafka deliveries
    /// succeed).
    #[serde(default)]
    pub pods: ReplicaStatus,
    /// Where its rollout stands (`Complete`, or what it waits for).
    #[serde(default)]
    pub message: String,
}

/// How one source's connector runs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The source's name.
    pub name: String,
    /// Its exchange.
    pub exchange: String,
    /// Symbols it reads.
    pub symbols: i32,
    /// Its connector Deployment.
    pub deployment: String,
    /// Connector pods (ready means subscribed to the venue and producing to Kafka).
    #[serde(default)]
    pub pods: ReplicaStatus,
    /// Where its rollout stands (`Complete`, or what it waits for).
    #[serde(default)]
    pub message: String,
}

/// Pods of a Deployment, as its own status reports them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pods the operator asks for.
    #[serde(default)]
    pub desired: i32,
    /// Pods that exist.
    #[serde(default)]
    pub current: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready: i32,
    /// Pods that run the current pod template.
    #[serde(default)]
    pub updated: i32,
    /// Pods that have been ready for the Deployment's `minReadySeconds`.
    #[serde(default)]
    pub available: i32,
}

/// Inputs and outcome of the autoscaler, kept in status so the decision can be checked and so the
/// stabilisation window survives operator restarts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Lag the decision was based on.
    pub lag: i64,
    /// `targetLagPerWorker` used.
    pub target_lag_per_worker: i64,
    /// `ceil(lag / targetLagPerWorker)` clamped to min, max and partitions.
    pub recommended: i32,
    /// Worker count decided after the scale-down stabilisation window.
    pub desired: i32,
    /// Why `desired` is what it is (`ScaleUp`, `ScaleDown`, `Stable`, `ScaleDownStabilized`).
    pub reason: String,
    /// When the lag was measured.
    pub time: Time,
    /// Recommendations within the stabilisation window, newest last.
    #[serde(default)]
    pub recommendations: Vec<Recommendation>,
}

/// One past autoscaler recommendation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// When it was made.
    pub time: Time,
    /// Workers recommended.
    pub replicas: i32,
}

impl TickPipeline {
    /// Whether the pause annotation is set to `"true"`.
    pub fn paused(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PAUSED_ANNOTATION))
            .is_some_and(|v| v == "true")
    }
}

//! Where ticks live once the worker has them: the [`TickStore`] trait and its implementations.
//!
//! * [`RedisStore`]: the production store. Every key of one asset shares the Redis Cluster hash tag
//!   `{asset}`; ticks sit in a sorted set scored by event time (µs) whose members encode the tick's
//!   identity, so writing a tick twice is a no-op; a latest-tick key only moves forward in event time; a
//!   batch costs one pipelined round trip. See [`redis`] for the layout.
//! * [`PostgresStore`]: history in PostgreSQL, one table partitioned by day; alone, or beside Redis as
//!   [`TieredStore`] (Redis for the hot window and live streams, PostgreSQL for history).
//! * [`MemoryStore`]: the same semantics in process memory, for unit tests and the embedded demo.
//! * [`jobs`]: provider polling jobs, their leases (a lock with a TTL and a fencing token), cached quotes
//!   and raw responses ([`JobStore`]: [`RedisJobs`], [`MemoryJobs`]).
//!
//! All keep write-time candle rollups ([`rollup`]) in the same atomic write (PostgreSQL computes them
//! from its ticks in SQL), and all pass one conformance suite (`store/tests/conformance.rs`), run
//! against a real `redis-server`, a real Redis Cluster and a real PostgreSQL.

pub mod jobs;
pub mod live;
pub mod member;
mod memory;
#[cfg(feature = "clap")]
mod options;
pub mod postgres;
pub mod redis;
pub mod rollup;
mod tiered;

use async_trait::async_trait;
use std::time::Duration;

pub use jobs::{JobStore, MemoryJobs, RedisJobs};
pub use live::{LIVE_BUFFER, LiveBatch, LiveEvent, LiveFeed};
pub use memory::MemoryStore;
#[cfg(feature = "clap")]
pub use options::{StoreKind, StoreOptions};
pub use postgres::PostgresStore;
pub use redis::{RedisMode, RedisSettings, RedisStore, RedisTls};
#[cfg(feature = "clap")]
pub use redis::{RedisOptions, ReplicaAckOptions};
pub use rollup::{
    Base, Candle, Overflow, RebuildSummary, RollupPage, RollupQuery, RollupRetention,
};
pub use tickfleet_proto::{Tick, TickId};
pub use tiered::TieredStore;

/// The largest page [`TickStore::range`] returns, whatever the caller asks for.
pub const MAX_PAGE: usize = 10_000;

/// A durable, idempotent home for ticks.
///
/// Every write is idempotent: a tick is identified by (asset, event time, sequence number) plus its
/// payload, and writing it again changes nothing, including derived values such as [`latest`](Self::latest).
#[async_trait]
pub trait TickStore: Send + Sync + 'static {
    /// Writes a batch of ticks (any assets, any order). When this returns `Ok`, every tick is stored.
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError>;

    /// The tick with the greatest [`TickId`] ever written for `asset_id`, if any.
    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError>;

    /// One page of `asset_id`'s ticks in `[from_ns, to_ns)`, in [`TickId`] order.
    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError>;

    /// The newest `n` ticks of `asset_id` (at most [`MAX_PAGE`]), in [`TickId`] order.
    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError>;

    /// Every asset id that has ever been written, sorted.
    async fn assets(&self) -> Result<Vec<String>, StoreError>;

    /// Subscribes to every asset's newly stored ticks (see [`live`]). When this returns, the
    /// subscription is in place: every tick stored afterwards is announced to it.
    async fn subscribe(&self) -> Result<LiveFeed, StoreError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// One page of `asset_id`'s rollup candles of `query.base` starting in `[from_ns, to_ns)`, in time
    /// order, with the asset's write version at the time of the read (see [`rollup`]).
    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError>;

    /// Recomputes `asset_id`'s rollups of the UTC days overlapping `[from_ns, to_ns)` from its stored
    /// ticks (for data written before rollups existed, or after a bug). Idempotent, and safe while
    /// workers write: a day is replaced only if no tick was stored into it meanwhile, else it is tried
    /// again and, if it stays busy, listed in [`RebuildSummary::busy`]. Buckets at or below the asset's
    /// retention horizon (raw ticks gone) are left as they are.
    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError>;
}

/// The readiness check of a process that works on a store: `Ok` while `store` answers a ping, else
/// why not (`store unreachable: ...`).
pub async fn reachable(store: std::sync::Arc<dyn TickStore>) -> Result<(), String> {
    store
        .ping()
        .await
        .map_err(|e| format!("store unreachable: {e}"))
}

/// What a [`TickStore::write_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Ticks that were not stored before.
    pub inserted: usize,
    /// Ticks that were already stored (redeliveries); they changed nothing.
    pub duplicates: usize,
}

impl std::ops::AddAssign for WriteSummary {
    fn add_assign(&mut self, other: Self) {
        self.inserted += other.inserted;
        self.duplicates += other.duplicates;
    }
}

/// A time range query with keyset paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeQuery {
    /// Inclusive lower bound on event time (ns).
    pub from_ns: i64,
    /// Exclusive upper bound on event time (ns).
    pub to_ns: i64,
    /// Page size, clamped to `1..=`[`MAX_PAGE`].
    pub limit: usize,
    /// Continue after this tick (from [`TickPage::next`]); `None` starts at `from_ns`.
    pub after: Option<TickId>,
}

impl RangeQuery {
    /// All of time, first page of `limit`.
    pub fn all(limit: usize) -> Self {
        RangeQuery {
            from_ns: 0,
            to_ns: i64::MAX,
            limit,
            after: None,
        }
    }

    fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE)
    }
}

/// One page of a [`TickStore::range`] answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickPage {
    /// The ticks, in [`TickId`] order.
    pub ticks: Vec<Tick>,
    /// Where the next page starts, when there are more ticks in the range.
    pub next: Option<TickId>,
}

/// How long ticks are kept, per asset. Both limits may apply; `None` keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Drop ticks older than this, measured back from the asset's newest event time bounded by the
    /// writer's clock: `min(newest, now) - max_age`. The newest tick (not the clock alone), so replaying
    /// old data does not erase it as it lands; bounded by the clock, so one tick dated in the future
    /// cannot push the rest of the asset's history out of the window.
    pub max_age: Option<Duration>,
    /// Keep at most this many ticks per asset (the newest).
    pub max_count: Option<u64>,
}

/// The writer's clock in µs since the epoch (the unit of sorted-set scores), for retention.
fn clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A store failure. [`is_retriable`](StoreError::is_retriable) tells a failure that can pass (Redis
/// unreachable, loading, failing over, out of memory) from a permanent rejection of the data itself
/// (a key of the wrong type, an ACL that forbids it, a script error): retrying the latter never helps.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed, could not be reached, or refused the command; see [`StoreError::is_retriable`].
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// Redis could not be reached to set up a connection (a cluster's slot map could not be read, say):
    /// always retriable, whatever the server answered.
    #[error("redis unreachable: {0}")]
    Connect(::redis::RedisError),
    /// Fewer replicas than required acknowledged a write within the timeout (`WAIT`): the write is
    /// on the primary but not yet as durable as asked, so the call failed (retriable).
    #[error("only {acked} of {wanted} required replicas acknowledged the write within {timeout:?}")]
    Replication {
        /// Replicas required (`--redis-min-replica-acks`).
        wanted: u32,
        /// Replicas that acknowledged.
        acked: u32,
        /// How long `WAIT` waited.
        timeout: Duration,
    },
    /// PostgreSQL failed, could not be reached, or refused the statement; see
    /// [`StoreError::is_retriable`].
    #[error("postgres: {}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// Stored data could not be read back as a tick.
    #[error("corrupt stored tick {key}: {detail}")]
    Corrupt {
        /// The key holding it.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// The store is misconfigured (say, a TLS file cannot be read).
    #[error("store configuration: {0}")]
    Config(String),
    /// A transient failure injected by a test double (retriable).
    #[error("injected failure: {0}")]
    Injected(String),
    /// A permanent rejection injected by a test double.
    #[error("injected rejection: {0}")]
    InjectedRejection(String),
    /// A rollup candle of the asset cannot hold the batch's sums (permanent: the same ticks always
    /// overflow it).
    #[error("rollup of {asset}: {overflow}")]
    Overflow {
        /// The asset.
        asset: String,
        /// Which sum.
        overflow: Overflow,
    },
    /// Other writers kept changing the asset between this write's read and its compare-and-set
    /// (retriable: the next attempt reads again).
    #[error("asset {0} changed under every one of this write's attempts")]
    Contended(String),
}

impl StoreError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Redis(e) if !redis_error_is_retriable(e) => "rejected",
            StoreError::Redis(_) | StoreError::Connect(_) => "redis",
            StoreError::Postgres(e) if !postgres::postgres_error_is_retriable(e) => "rejected",
            StoreError::Postgres(_) => "postgres",
            StoreError::Replication { .. } => "replication",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Config(_) => "config",
            StoreError::Injected(_) => "injected",
            StoreError::InjectedRejection(_) => "rejected",
            StoreError::Overflow { .. } => "overflow",
            StoreError::Contended(_) => "contended",
        }
    }

    /// Whether the same call may succeed later: `true` for connection, availability and capacity
    /// problems, `false` when the store refuses this data for good.
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Redis(e) => redis_error_is_retriable(e),
            StoreError::Postgres(e) => postgres::postgres_error_is_retriable(e),
            StoreError::Injected(_)
            | StoreError::Connect(_)
            | StoreError::Replication { .. }
            | StoreError::Contended(_) => true,
            StoreError::Overflow { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Config(_)
            | StoreError::InjectedRejection(_) => false,
        }
    }
}

/// Whether a Redis error can pass by itself. An error reply names its kind in its first word: those
/// that say "not now" are retriable, every other error reply is a refusal of the command as sent
/// (`WRONGTYPE`, `NOPERM`, `ERR` from a script, …). A pipeline's error lists each failed command's
/// reply: it is retriable when any of them is (a per-asset retry then sorts out the rest). Errors
/// without a reply — I/O, timeouts, a failed handshake or AUTH — are the store being unreachable, and
/// retriable.
fn redis_error_is_retriable(e: &::redis::RedisError) -> bool {
    use ::redis::ErrorKind;
    match e.clone().into_server_errors() {
        Some(replies) if !replies.is_empty() => replies.iter().any(|(_, reply)| {
            matches!(
                reply.code(),
                // loading, failing over, cluster resharding, a lost script (RedisStore loads it again),
                // out of memory, a long script running, a failed disk save (writes are refused until it
                // works), too few replicas: all pass
                "LOADING"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "MOVED"
                    | "ASK"
                    | "NOSCRIPT"
                    | "OOM"
                    | "BUSY"
                    | "MISCONF"
                    | "NOREPLICAS"
            )
        }),
        _ => !matches!(
            e.kind(),
            ErrorKind::UnexpectedReturnType | ErrorKind::Client | ErrorKind::InvalidClientConfig
        ),
    }
}

#[async_trait]
impl<S: TickStore + ?Sized> TickStore for std::sync::Arc<S> {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        (**self).write_batch(ticks).await
    }
    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        (**self).latest(asset_id).await
    }
    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        (**self).range(asset_id, query).await
    }
    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        (**self).tail(asset_id, n).await
    }
    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        (**self).assets().await
    }
    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        (**self).subscribe().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }
    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError> {
        (**self).rollups(asset_id, query).await
    }
    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        (**self).rebuild_rollups(asset_id, from_ns, to_ns).await
    }
}

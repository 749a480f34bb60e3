//! [`RedisStore`]: ticks in one Redis server or in a Redis Cluster ([`RedisMode`]).
//!
//! Every key of one asset shares the hash tag `{ASSET}`, so all of them live in one hash slot and one
//! script call can touch them all, on one server or on a cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `PREFIX:{ASSET}:ticks` | sorted set | one member per tick, scored by event time in µs |
//! | `PREFIX:{ASSET}:latest` | string | the member of the tick with the greatest (event time, seq) |
//! | `PREFIX:{ASSET}:ver` | string | the asset's write version: every write that changes it bumps it |
//! | `PREFIX:{ASSET}:horizon` | string | the id (39 digits) of the newest tick retention removed |
//! | `PREFIX:{ASSET}:rollup:1s` (`1m`, `1h`, `1d`) | sorted set | one candle per bucket, scored by its start in s |
//! | `PREFIX:assets:{NN}` | set | the asset ids of index bucket NN (`00`..`15`, FNV-1a of the id mod 16) |
//! | `PREFIX:{ASSET}:live` | pub/sub channel | the ticks each batch added: `{"v": version, "m": [members]}` |
//!
//! A member is `TIME(19 digits)SEQ(20 digits)|price|size|source`, so equal ticks are equal members and a
//! redelivered tick adds nothing. A rollup member is [`Candle::encode`](crate::Candle::encode)'s text.
//!
//! **A batch write is a compare-and-set** (in [`rollups`]). (1) `prepare.lua` per asset (read only):
//! `ZMSCORE` says which ticks are new (not stored, not repeated, above the horizon), and it returns the
//! rollup candles those ticks fall into and the asset's version. (2) The new candles are computed in Rust
//! with `rust_decimal` ([`rollup::fold_new`](crate::rollup::fold_new)) — Redis Lua numbers are doubles,
//! which cannot add decimal prices exactly, and exact decimal arithmetic written in Lua would cost Redis
//! far more CPU per tick than a second round trip costs — and `write.lua` per asset stores the new ticks
//! (one variadic `ZADD` per 1000), the candles, moves `latest` only forward, applies raw and rollup
//! retention and bumps the version, all only if the version (and what else the caller assumed) still
//! holds; plus one `SADD` per index bucket for the assets this store has not indexed yet. In the steady
//! state (1) is skipped: a store assumes what its own last write of the asset left, and `write.lua`
//! checks it, so a batch is one round trip. An asset whose assumption failed (another writer, say
//! during a consumer-group rebalance, or a redelivery) is read and tried again, up to
//! [`WRITE_ATTEMPTS`] times; an asset whose ticks were all stored already writes nothing (with replica
//! acks it still sends an empty `write.lua`, so its `WAIT` covers the earlier attempt's writes).
//!
//! Every script touches only keys under one asset's `{ASSET}` tag, so no call touches two slots: on one
//! server each round trip is one pipeline, on a cluster each asset's call (a `prepare.lua`, a
//! `write.lua`) is its own single-slot pipeline to its slot's primary, all at once (see [`conn`]), and
//! with `min_replica_acks` every write part ends with `WAIT`.
//!
//! **The asset index** is 16 sets, not one: on a cluster they spread over the primaries, and a store
//! adds an asset to its bucket only the first time it writes that asset (the index then changes only
//! when a new asset appears), so no key is written by every batch of the fleet. An asset is indexed in
//! the same call that first stores its ticks; [`assets`](crate::TickStore::assets) reads the 16 buckets
//! (and the single `PREFIX:assets` set of earlier versions, so their data stays listed).
//!
//! Scripts are loaded on first use and again after a `NOSCRIPT` (a restarted or newly promoted Redis
//! forgets them): only the parts that got `NOSCRIPT` are sent again. The live feed is described in
//! [`live`].

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Value};

use crate::live::LiveFeed;
use crate::member;
use crate::rollup::{Base, RebuildSummary, RollupPage, RollupQuery, RollupRetention};
use crate::{MAX_PAGE, RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

mod conn;
mod jobs;
mod live;
#[cfg(feature = "clap")]
mod options;
mod rollups;
pub use conn::RedisMode;
use conn::{Acks, Conn};
pub use jobs::RedisJobs;
#[cfg(feature = "clap")]
pub use options::{RedisOptions, ReplicaAckOptions};

const PREPARE_LUA: &str = include_str!("prepare.lua");
const WRITE_LUA: &str = include_str!("write.lua");
const RANGE_LUA: &str = include_str!("range.lua");
const REBUILD_LUA: &str = include_str!("rebuild.lua");

/// How often a batch write reads and tries again an asset that other writers keep changing.
pub const WRITE_ATTEMPTS: u32 = 20;
/// How often a rebuild tries a day that workers keep writing to before it reports it busy.
pub const REBUILD_ATTEMPTS: u32 = 5;

/// How many sets the asset index is split into (part of the key layout: changing it moves assets).
pub const ASSET_BUCKETS: u64 = 16;

/// TLS material for `rediss://` (all PEM).
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificate(s) to trust instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and private key, for servers that verify clients.
    pub client_cert_and_key: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_and_key.is_some())
            .finish()
    }
}

/// How to reach Redis, beyond its URL(s): see [`RedisStore::connect`].
#[derive(Debug, Clone, Default)]
pub struct RedisSettings {
    /// One server or a cluster.
    pub mode: RedisMode,
    /// TLS material for `rediss://` (the server, or every node of the cluster).
    pub tls: Option<RedisTls>,
    /// Replicas that must acknowledge each write (`WAIT`) before it counts as stored; 0 = the primary's
    /// answer is enough.
    pub min_replica_acks: u32,
    /// How long a write waits for those acknowledgements before it fails (retriable). Unused at 0 acks;
    /// zero means 1 ms (`WAIT` with 0 would wait for ever).
    pub replica_ack_timeout: Duration,
}

/// A [`TickStore`] on Redis: one server or a Redis Cluster.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// Clients of the server or of each seed node, for the live feed's pub/sub connection.
    pubsub_clients: Vec<Client>,
    live: Arc<tokio::sync::Mutex<Option<crate::live::LiveHub>>>,
    /// Assets this store has added to the index (so it adds each once).
    indexed: Arc<Mutex<HashSet<String>>>,
    prefix: String,
    retention: Retention,
    rollup_retention: RollupRetention,
    /// Per asset, what this store's last write of it left (see [`rollups::Known`]).
    cache: Arc<Mutex<std::collections::HashMap<String, rollups::Known>>>,
    acks: Option<Acks>,
    prepare_sha: String,
    write_sha: String,
    range_sha: String,
    rebuild_sha: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the connection: its URL may carry a password.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .field("acks", &self.acks)
            .finish_non_exhaustive()
    }
}

impl RedisTls {
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client_cert_and_key.clone().map(|(cert, key)| {
                redis::ClientTlsConfig {
                    client_cert: cert,
                    client_key: key,
                }
            }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

fn client(url: &str, tls: Option<&RedisTls>) -> Result<Client, StoreError> {
    Ok(match tls {
        Some(tls) => Client::build_with_tls(url, tls.certificates())?,
        None => Client::open(url)?,
    })
}

/// Makes ring the process's rustls crypto provider unless one is set already: rustls picks one from
/// its crate features only when exactly one is compiled in, which depends on what else a binary links.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is then set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The index bucket of an asset: FNV-1a (64 bit) of its id, mod [`ASSET_BUCKETS`]. Stable across
/// versions and platforms (it is part of the key layout).
fn bucket(asset: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in asset.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % ASSET_BUCKETS
}

impl RedisStore {
    /// Connects lazily to `url` (`redis://[:password@]host:port[/db]`); keys start with `prefix`.
    ///
    /// No connection is made here: the first command connects, and the connection is re-established
    /// after failures, so a worker can start before Redis does.
    pub fn open(url: &str, prefix: &str, retention: Retention) -> Result<Self, StoreError> {
        Self::connect(url, prefix, retention, RedisSettings::default())
    }

    /// [`open`](Self::open) for `rediss://` URLs with a private CA and/or a client certificate (mTLS).
    /// With `tls` `None`, a `rediss://` server must present a certificate the system trusts.
    pub fn open_tls(
        url: &str,
        prefix: &str,
        retention: Retention,
        tls: Option<RedisTls>,
    ) -> Result<Self, StoreError> {
        let settings = RedisSettings {
            tls,
            ..RedisSettings::default()
        };
        Self::connect(url, prefix, retention, settings)
    }

    /// Connects lazily to one server at `urls`, or (in [`RedisMode::Cluster`]) to the cluster that
    /// the comma-separated seed URLs `urls` belong to (any one answering is enough; every seed has the
    /// same password). `rediss://` URLs are TLS (rustls): certificates are checked against the
    /// system's CAs, or only against `settings.tls`'s CA when it has one, and its client certificate is
    /// presented when it has one — on one server and on every node of a cluster alike.
    pub fn connect(
        urls: &str,
        prefix: &str,
        retention: Retention,
        settings: RedisSettings,
    ) -> Result<Self, StoreError> {
        install_crypto_provider();
        let (conn, pubsub_clients) = match settings.mode {
            RedisMode::Standalone => {
                let c = client(urls, settings.tls.as_ref())?;
                (Conn::standalone(c.clone())?, vec![c])
            }
            RedisMode::Cluster => {
                let seeds: Vec<String> = urls
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect();
                if seeds.is_empty() {
                    return Err(StoreError::Config("no Redis Cluster seed URL".into()));
                }
                let clients = seeds
                    .iter()
                    .map(|u| client(u, settings.tls.as_ref()))
                    .collect::<Result<Vec<_>, _>>()?;
                (Conn::cluster(&seeds, settings.tls.as_ref())?, clients)
            }
        };
        Ok(RedisStore {
            conn,
            pubsub_clients,
            live: Arc::default(),
            indexed: Arc::default(),
            prefix: prefix.to_owned(),
            retention,
            rollup_retention: RollupRetention::default(),
            cache: Arc::default(),
            acks: (settings.min_replica_acks > 0).then_some(Acks {
                replicas: settings.min_replica_acks,
                timeout: settings.replica_ack_timeout,
            }),
            prepare_sha: redis::Script::new(PREPARE_LUA).get_hash().to_owned(),
            write_sha: redis::Script::new(WRITE_LUA).get_hash().to_owned(),
            range_sha: redis::Script::new(RANGE_LUA).get_hash().to_owned(),
            rebuild_sha: redis::Script::new(REBUILD_LUA).get_hash().to_owned(),
        })
    }

    /// Sets how long rollups are kept (default [`RollupRetention::default`]).
    pub fn with_rollup_retention(mut self, retention: RollupRetention) -> Self {
        self.rollup_retention = retention;
        self
    }

    /// The polling jobs, leases and quotes under this store's prefix, on its connection.
    pub fn jobs(&self) -> RedisJobs {
        RedisJobs::new(self.conn.clone(), &self.prefix)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One server or a cluster.
    pub fn mode(&self) -> RedisMode {
        match self.conn {
            Conn::Standalone(_) => RedisMode::Standalone,
            Conn::Cluster { .. } => RedisMode::Cluster,
        }
    }

    fn ticks_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:ticks", self.prefix)
    }

    fn latest_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:latest", self.prefix)
    }

    fn version_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:ver", self.prefix)
    }

    fn horizon_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:horizon", self.prefix)
    }

    fn rollup_key(&self, asset: &str, base: Base) -> String {
        format!("{}:{{{asset}}}:rollup:{}", self.prefix, base.label())
    }

    fn rollup_ages(&self) -> [u64; 4] {
        Base::ALL.map(|b| self.rollup_retention.max_age_secs(b))
    }

    /// The index bucket set holding `asset`.
    fn bucket_key(&self, bucket: u64) -> String {
        format!("{}:assets:{{{bucket:02}}}", self.prefix)
    }

    /// The single asset set of versions before the bucketed index (read, never written).
    fn legacy_assets_key(&self) -> String {
        format!("{}:assets", self.prefix)
    }

    fn live_channel(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:live", self.prefix)
    }

    /// Runs `parts`; when some got `NOSCRIPT` (Redis lost the scripts: a restart, a promoted
    /// replica, `SCRIPT FLUSH`), loads every script and sends again only those parts. Another client's
    /// `SCRIPT LOAD` can land between the commands of one call, so the other parts may be written
    /// already; sending them again would count their ticks as duplicates.
    async fn exec_with_scripts(
        &self,
        parts: &[redis::Pipeline],
        acks: Option<Acks>,
    ) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut outcomes = self.conn.exec(parts, acks).await?;
        let lost: Vec<usize> = (0..outcomes.len())
            .filter(|&i| matches!(&outcomes[i], Err(e) if conn::is_noscript_err(e)))
            .collect();
        if !lost.is_empty() {
            self.conn
                .load_scripts(&[PREPARE_LUA, WRITE_LUA, RANGE_LUA, REBUILD_LUA])
                .await?;
            let again: Vec<redis::Pipeline> = lost.iter().map(|&i| parts[i].clone()).collect();
            for (i, outcome) in lost.into_iter().zip(self.conn.exec(&again, acks).await?) {
                outcomes[i] = outcome;
            }
        }
        conn::first_failure(outcomes)
    }

    fn decode(&self, asset: &str, m: &str) -> Result<Tick, StoreError> {
        member::decode(asset, m).map_err(|detail| StoreError::Corrupt {
            key: self.ticks_key(asset),
            detail,
        })
    }
}

fn reply<T: redis::FromRedisValue>(v: Option<Value>) -> Result<T, StoreError> {
    let v = v.ok_or_else(|| StoreError::Corrupt {
        key: "reply".into(),
        detail: "missing reply".into(),
    })?;
    Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
}

#[async_trait]
impl TickStore for RedisStore {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        self.write(ticks).await
    }

    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        let m: Option<String> = self
            .conn
            .query(redis::cmd("GET").arg(self.latest_key(asset_id)))
            .await?;
        m.map(|m| self.decode(asset_id, &m)).transpose()
    }

    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        if query.from_ns >= query.to_ns {
            return Ok(TickPage::default());
        }
        let limit = query.page_size();
        let after = query.after.map(member::encode_id).unwrap_or_default();
        let from_score = match query.after {
            Some(a) => member::score(a.event_time_ns.max(query.from_ns)),
            None => member::score(query.from_ns),
        };
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(&self.range_sha)
            .arg(1)
            .arg(self.ticks_key(asset_id))
            .arg(from_score)
            .arg(member::score(query.to_ns))
            .arg(member::encode_time(query.from_ns))
            .arg(member::encode_time(query.to_ns))
            .arg(after)
            .arg(limit + 1);
        let replies = self.exec_with_scripts(&[pipe], None).await?;
        let members: Vec<String> = reply(
            replies
                .into_iter()
                .next()
                .and_then(|r| r.into_iter().next()),
        )?;
        let mut page = TickPage::default();
        for m in members.iter().take(limit) {
            page.ticks.push(self.decode(asset_id, m)?);
        }
        if members.len() > limit {
            page.next = page.ticks.last().map(Tick::id);
        }
        Ok(page)
    }

    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        let n = n.min(MAX_PAGE);
        if n == 0 {
            return Ok(Vec::new());
        }
        // Rank order is tick-id order: scores are µs and, within a µs, members sort by their id prefix.
        let members: Vec<String> = self
            .conn
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.ticks_key(asset_id))
                    .arg(-(n as i64))
                    .arg(-1),
            )
            .await?;
        members.iter().map(|m| self.decode(asset_id, m)).collect()
    }

    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        let (clients, prefix) = (self.pubsub_clients.clone(), self.prefix.clone());
        crate::live::subscribe(&self.live, "redis", move || {
            live::connect(clients.clone(), prefix.clone())
        })
        .await
    }

    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        let keys = (0..ASSET_BUCKETS)
            .map(|b| self.bucket_key(b))
            .chain(std::iter::once(self.legacy_assets_key()));
        let parts: Vec<redis::Pipeline> = keys
            .map(|k| {
                let mut pipe = redis::pipe();
                pipe.cmd("SMEMBERS").arg(k);
                pipe
            })
            .collect();
        let mut assets = BTreeSet::new();
        for r in conn::first_failure(self.conn.exec(&parts, None).await?)? {
            let members: Vec<String> = reply(r.into_iter().next())?;
            assets.extend(members);
        }
        Ok(assets.into_iter().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.conn.ping().await
    }

    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError> {
        self.read_rollups(asset_id, query).await
    }

    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        self.rebuild(asset_id, from_ns, to_ns).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_buckets_are_stable_and_spread() {
        // Part of the key layout: these must never change.
        assert_eq!(bucket(""), 0xcbf2_9ce4_8422_2325 % ASSET_BUCKETS);
        assert_eq!(bucket("BTC-USD"), bucket("BTC-USD"));
        let used: BTreeSet<u64> = (0..100).map(|i| bucket(&format!("ASSET-{i}"))).collect();
        assert_eq!(
            used.len() as u64,
            ASSET_BUCKETS,
            "100 assets use every bucket"
        );
    }
}

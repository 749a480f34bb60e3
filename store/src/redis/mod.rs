//! [`RedisStore`]: ticks in one Redis server or in a Redis Cluster ([`RedisMode`]).
//!
//! Every key of one asset shares the hash tag `{ASSET}`, so all of them live in one hash slot and one
//! script call can touch them all, on one server or on a cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `PREFIX:{ASSET}:ticks` | sorted set | one member per tick, scored by event time in µs |
//! | `PREFIX:{ASSET}:latest` | string | the member of the tick with the greatest (event time, seq) |
//! | `PREFIX:assets:{NN}` | set | the asset ids of index bucket NN (`00`..`15`, FNV-1a of the id mod 16) |
//! | `PREFIX:{ASSET}:live` | pub/sub channel | the ticks each batch added, as a JSON array of members |
//!
//! A member is `TIME(19 digits)SEQ(20 digits)|price|size|source`, so equal ticks are equal members and a
//! redelivered tick adds nothing. A batch is one `EVALSHA` of `write.lua` per asset (which asks
//! `ZMSCORE` which members are stored already, adds the rest with one variadic `ZADD`, moves `latest`
//! only forward, and applies retention), plus one `SADD` per index bucket for the assets this store has
//! not indexed yet. No call touches two slots; on one server the whole batch is one pipeline, on a
//! cluster each asset's call goes to its slot's primary, all at once (see [`conn`]).
//!
//! **The asset index** is 16 sets, not one: on a cluster they spread over the primaries, and a store
//! adds an asset to its bucket only the first time it writes that asset (the index then changes only
//! when a new asset appears), so no key is written by every batch of the fleet. An asset is indexed in
//! the same call that first stores its ticks; [`assets`](crate::TickStore::assets) reads the 16 buckets
//! (and the single `PREFIX:assets` set of earlier versions, so their data stays listed).
//!
//! Scripts are loaded on first use and again after a `NOSCRIPT` (a restarted or newly promoted Redis
//! forgets them). The live feed is described in [`live`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Value};
use tokio::sync::broadcast;

use crate::live::{LIVE_BUFFER, LiveFeed};
use crate::member;
use crate::{MAX_PAGE, RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

mod conn;
mod live;
#[cfg(feature = "clap")]
mod options;
pub use conn::RedisMode;
use conn::{Acks, Conn};
#[cfg(feature = "clap")]
pub use options::{RedisOptions, ReplicaAckOptions};

const WRITE_LUA: &str = include_str!("write.lua");
const RANGE_LUA: &str = include_str!("range.lua");

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
    /// TLS material for `rediss://` (one server only; see [`RedisStore::connect`]).
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
    live: Arc<tokio::sync::Mutex<Option<live::LiveHub>>>,
    /// Assets this store has added to the index (so it adds each once).
    indexed: Arc<Mutex<HashSet<String>>>,
    prefix: String,
    retention: Retention,
    acks: Option<Acks>,
    write_sha: String,
    range_sha: String,
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

fn client(url: &str, tls: Option<&RedisTls>) -> Result<Client, StoreError> {
    Ok(match tls {
        Some(tls) => Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: tls.client_cert_and_key.clone().map(|(cert, key)| {
                    redis::ClientTlsConfig {
                        client_cert: cert,
                        client_key: key,
                    }
                }),
                root_cert: tls.ca_pem.clone(),
            },
        )?,
        None => Client::open(url)?,
    })
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
    /// same password). Cluster mode takes `rediss://` seeds whose certificates the system trusts, but
    /// no private CA or client certificate: the Redis client supports those on a cluster only with
    /// rustls, and this build uses the system's OpenSSL.
    pub fn connect(
        urls: &str,
        prefix: &str,
        retention: Retention,
        settings: RedisSettings,
    ) -> Result<Self, StoreError> {
        let (conn, pubsub_clients) = match settings.mode {
            RedisMode::Standalone => {
                let c = client(urls, settings.tls.as_ref())?;
                (Conn::standalone(c.clone())?, vec![c])
            }
            RedisMode::Cluster => {
                if settings.tls.is_some() {
                    return Err(StoreError::Config(
                        "a private CA or client certificate is not supported in cluster mode \
                         (rediss:// seeds with certificates the system trusts are)"
                            .into(),
                    ));
                }
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
                    .map(|u| client(u, None))
                    .collect::<Result<Vec<_>, _>>()?;
                (Conn::cluster(&seeds)?, clients)
            }
        };
        Ok(RedisStore {
            conn,
            pubsub_clients,
            live: Arc::default(),
            indexed: Arc::default(),
            prefix: prefix.to_owned(),
            retention,
            acks: (settings.min_replica_acks > 0).then_some(Acks {
                replicas: settings.min_replica_acks,
                timeout: settings.replica_ack_timeout,
            }),
            write_sha: redis::Script::new(WRITE_LUA).get_hash().to_owned(),
            range_sha: redis::Script::new(RANGE_LUA).get_hash().to_owned(),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn ticks_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:ticks", self.prefix)
    }

    fn latest_key(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:latest", self.prefix)
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
    /// replica, `SCRIPT FLUSH`), loads both scripts and sends again only those parts. Another client's
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
            self.conn.load_scripts(&[WRITE_LUA, RANGE_LUA]).await?;
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
        if ticks.is_empty() {
            return Ok(WriteSummary::default());
        }
        let mut by_asset: BTreeMap<&str, Vec<&Tick>> = BTreeMap::new();
        for t in ticks {
            by_asset.entry(t.asset_id.as_str()).or_default().push(t);
        }
        let max_age_us = self
            .retention
            .max_age
            .map_or(0, |a| u64::try_from(a.as_micros()).unwrap_or(u64::MAX));
        let max_count = self.retention.max_count.unwrap_or(0);
        let now_us = crate::clock_us();
        // One part per asset (its slot), then one per index bucket with assets not indexed yet.
        let mut parts = Vec::with_capacity(by_asset.len() + 1);
        for (asset, ticks) in &by_asset {
            let mut pipe = redis::pipe();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(&self.write_sha)
                .arg(2)
                .arg(self.ticks_key(asset))
                .arg(self.latest_key(asset))
                .arg(max_age_us)
                .arg(max_count)
                .arg(self.live_channel(asset))
                .arg(now_us);
            for t in ticks {
                cmd.arg(member::score(t.event_time_ns))
                    .arg(member::encode(t));
            }
            parts.push(pipe);
        }
        let new: Vec<&str> = {
            let indexed = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
            by_asset
                .keys()
                .copied()
                .filter(|a| !indexed.contains(*a))
                .collect()
        };
        let mut buckets: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
        for a in &new {
            buckets.entry(bucket(a)).or_default().insert(a);
        }
        for (b, assets) in &buckets {
            let mut pipe = redis::pipe();
            pipe.cmd("SADD").arg(self.bucket_key(*b)).arg(assets);
            parts.push(pipe);
        }
        let replies = self.exec_with_scripts(&parts, self.acks).await?;
        if !new.is_empty() {
            let mut indexed = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
            indexed.extend(new.iter().map(|a| (*a).to_owned()));
        }
        let mut inserted = 0;
        for r in replies.into_iter().take(by_asset.len()) {
            inserted += reply::<usize>(r.into_iter().next())?;
        }
        Ok(WriteSummary {
            inserted,
            duplicates: ticks.len() - inserted,
        })
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
        let mut hub = self.live.lock().await;
        if let Some(h) = hub.as_ref().filter(|h| !h.task.is_finished()) {
            return Ok(LiveFeed::new(h.tx.subscribe()));
        }
        let (tx, rx) = broadcast::channel(LIVE_BUFFER);
        // The first connection is made here, so a caller learns at once when Redis is unreachable.
        let pubsub = live::connect(&self.pubsub_clients, &self.prefix).await?;
        let task = tokio::spawn(live::run(
            self.pubsub_clients.clone(),
            self.prefix.clone(),
            pubsub,
            tx.clone(),
        ));
        *hub = Some(live::LiveHub { tx, task });
        Ok(LiveFeed::new(rx))
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

//! [`RedisStore`]: ticks in Redis, laid out for Redis Cluster.
//!
//! Keys of one asset share the hash tag `{ASSET}`, so one Lua script can touch all of them on a cluster:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `PREFIX:{ASSET}:ticks` | sorted set | one member per tick, scored by event time in µs |
//! | `PREFIX:{ASSET}:latest` | string | the member of the tick with the greatest (event time, seq) |
//! | `PREFIX:assets` | set | every asset id written |
//!
//! A member is `TIME(19 digits)SEQ(20 digits)|price|size|source`, so equal ticks are equal members and
//! `ZADD NX` of a redelivered tick is a no-op. A batch is one pipeline: one `EVALSHA` of `write.lua` per
//! asset (which adds with `ZADD NX`, moves `latest` only forward, and applies retention) plus one `SADD`.
//! Scripts are loaded on first use and again after a `NOSCRIPT` (a restarted Redis forgets them).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{Client, ErrorKind, RedisError, ServerErrorKind};

use crate::member;
use crate::{RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

const WRITE_LUA: &str = include_str!("write.lua");
const RANGE_LUA: &str = include_str!("range.lua");

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

/// A [`TickStore`] on Redis (standalone; the key layout is ready for Redis Cluster).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    retention: Retention,
    write_sha: String,
    range_sha: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the connection: its URL may carry a password.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects lazily to `url` (`redis://[:password@]host:port[/db]`); keys start with `prefix`.
    ///
    /// No connection is made here: the first command connects, and the connection is re-established
    /// after failures, so a worker can start before Redis does.
    pub fn open(url: &str, prefix: &str, retention: Retention) -> Result<Self, StoreError> {
        Self::open_tls(url, prefix, retention, None)
    }

    /// [`open`](Self::open) for `rediss://` URLs with a private CA and/or a client certificate (mTLS).
    /// With `tls` `None`, a `rediss://` server must present a certificate the system trusts.
    pub fn open_tls(
        url: &str,
        prefix: &str,
        retention: Retention,
        tls: Option<RedisTls>,
    ) -> Result<Self, StoreError> {
        let client = match tls {
            Some(tls) => Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: tls
                        .client_cert_and_key
                        .map(|(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert,
                            client_key: key,
                        }),
                    root_cert: tls.ca_pem,
                },
            )?,
            None => Client::open(url)?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;

        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            retention,
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

    fn assets_key(&self) -> String {
        format!("{}:assets", self.prefix)
    }

    /// Runs a pipeline; after a `NOSCRIPT` loads both scripts and runs it once more (it is idempotent).
    async fn query_with_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                for src in [WRITE_LUA, RANGE_LUA] {
                    let _: String = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(src)
                        .query_async(&mut conn)
                        .await?;
                }
                Ok(pipe.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    fn decode(&self, asset: &str, m: &str) -> Result<Tick, StoreError> {
        member::decode(asset, m).map_err(|detail| StoreError::Corrupt {
            key: self.ticks_key(asset),
            detail,
        })
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
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
        let mut pipe = redis::pipe();
        for (asset, ticks) in &by_asset {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(&self.write_sha)
                .arg(2)
                .arg(self.ticks_key(asset))
                .arg(self.latest_key(asset))
                .arg(max_age_us)
                .arg(max_count);
            for t in ticks {
                cmd.arg(member::score(t.event_time_ns))
                    .arg(member::encode(t));
            }
        }
        pipe.cmd("SADD")
            .arg(self.assets_key())
            .arg(by_asset.keys().collect::<Vec<_>>())
            .ignore();
        let added: Vec<usize> = self.query_with_scripts(&pipe).await?;
        let inserted = added.iter().sum();
        Ok(WriteSummary {
            inserted,
            duplicates: ticks.len() - inserted,
        })
    }

    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        let mut conn = self.conn.clone();
        let m: Option<String> = redis::cmd("GET")
            .arg(self.latest_key(asset_id))
            .query_async(&mut conn)
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
        let (members,): (Vec<String>,) = self.query_with_scripts(&pipe).await?;
        let mut page = TickPage::default();
        for m in members.iter().take(limit) {
            page.ticks.push(self.decode(asset_id, m)?);
        }
        if members.len() > limit {
            page.next = page.ticks.last().map(Tick::id);
        }
        Ok(page)
    }

    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut assets: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.assets_key())
            .query_async(&mut conn)
            .await?;
        assets.sort();
        Ok(assets)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

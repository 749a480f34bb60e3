//! [`RedisStore`]: ticks in one Redis server.
//!
//! Keys of one asset share the hash tag `{ASSET}`, so on a Redis Cluster one Lua script could touch all of
//! them; the store itself talks to a single server (no cluster client, no cluster tests yet):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `PREFIX:{ASSET}:ticks` | sorted set | one member per tick, scored by event time in µs |
//! | `PREFIX:{ASSET}:latest` | string | the member of the tick with the greatest (event time, seq) |
//! | `PREFIX:assets` | set | every asset id written |
//! | `PREFIX:{ASSET}:live` | pub/sub channel | the ticks each batch added, as a JSON array of members |
//!
//! A member is `TIME(19 digits)SEQ(20 digits)|price|size|source`, so equal ticks are equal members and a
//! redelivered tick adds nothing. A batch is one pipeline: one `EVALSHA` of `write.lua` per asset (which
//! asks `ZMSCORE` which members are stored already, adds the rest with one variadic `ZADD`, moves `latest`
//! only forward, and applies retention) plus one `SADD`.
//! Scripts are loaded on first use and again after a `NOSCRIPT` (a restarted Redis forgets them).
//!
//! **Live feed.** `write.lua` publishes the members it newly added on the asset's live channel, inside
//! the same atomic script, so a tick is announced once, only after it is stored, and a redelivered batch
//! announces nothing. [`RedisStore::subscribe`](crate::TickStore::subscribe) shares one pub/sub connection
//! (`PSUBSCRIBE PREFIX:{*}:live`) among all feeds of the store; if that connection breaks it reconnects
//! with backoff and reports a [`LiveEvent::Gap`] (`reconnected`), since announcements made meanwhile are
//! lost (Redis pub/sub is fire-and-forget).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::live::{LIVE_BUFFER, LiveBatch, LiveEvent, LiveFeed};
use crate::member;
use crate::{MAX_PAGE, RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

#[cfg(feature = "clap")]
mod options;
#[cfg(feature = "clap")]
pub use options::RedisOptions;

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
    client: Client,
    conn: ConnectionManager,
    live: Arc<tokio::sync::Mutex<Option<LiveHub>>>,
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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;

        Ok(RedisStore {
            client,
            conn,
            live: Arc::default(),
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

    fn live_channel(&self, asset: &str) -> String {
        format!("{}:{{{asset}}}:live", self.prefix)
    }

    /// The asset of a live channel name, if it is one of this store's.
    fn asset_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(prefix)?
            .strip_prefix(":{")?
            .strip_suffix("}:live")
    }

    /// Runs a one-command pipeline; after a `NOSCRIPT` loads both scripts and runs it once more.
    async fn query_with_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                self.load_scripts(&mut conn).await?;
                Ok(pipe.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    /// Loads both Lua scripts (Redis forgets them on a restart or `SCRIPT FLUSH`).
    async fn load_scripts(
        &self,
        conn: &mut redis::aio::ConnectionManager,
    ) -> Result<(), StoreError> {
        for src in [WRITE_LUA, RANGE_LUA] {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query_async(conn)
                .await?;
        }
        Ok(())
    }

    fn decode(&self, asset: &str, m: &str) -> Result<Tick, StoreError> {
        member::decode(asset, m).map_err(|detail| StoreError::Corrupt {
            key: self.ticks_key(asset),
            detail,
        })
    }
}

/// The shared pub/sub connection of a store's live feeds.
struct LiveHub {
    tx: broadcast::Sender<LiveEvent>,
    task: tokio::task::JoinHandle<()>,
}

/// Escapes Redis glob characters, so a prefix matches only itself in a pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

async fn live_connect(client: &Client, prefix: &str) -> Result<redis::aio::PubSub, StoreError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .psubscribe(format!("{}:{{*}}:live", glob_escape(prefix)))
        .await?;
    Ok(pubsub)
}

/// Forwards live messages to the feeds until none is left; reconnects (reporting a gap) when the
/// connection breaks.
async fn live_loop(
    client: Client,
    prefix: String,
    mut pubsub: redis::aio::PubSub,
    tx: broadcast::Sender<LiveEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        {
            let mut messages = pubsub.on_message();
            // Checked every few seconds too, so an idle feed with no listener left goes away.
            loop {
                let msg = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await
                {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(_) if tx.receiver_count() == 0 => return,
                    Err(_) => continue,
                };
                if tx.receiver_count() == 0 {
                    return;
                }
                backoff = Duration::from_millis(100);
                let Some(asset) = RedisStore::asset_of_channel(&prefix, msg.get_channel_name())
                else {
                    continue;
                };
                match decode_live(asset, msg.get_payload_bytes()) {
                    Ok(batch) => {
                        let _ = tx.send(LiveEvent::Ticks(Arc::new(batch)));
                    }
                    Err(e) => warn!(asset, error = %e, "undecodable live message skipped"),
                }
            }
        }
        warn!("live feed connection lost; reconnecting");
        loop {
            if tx.receiver_count() == 0 {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match live_connect(&client, &prefix).await {
                Ok(p) => {
                    pubsub = p;
                    info!("live feed reconnected");
                    let _ = tx.send(LiveEvent::Gap {
                        missed: 0,
                        reason: "reconnected",
                    });
                    break;
                }
                Err(e) => warn!(error = %e, "live feed reconnect failed"),
            }
        }
    }
}

/// Decodes a live message: a JSON array of members of `asset`.
fn decode_live(asset: &str, payload: &[u8]) -> Result<LiveBatch, String> {
    let members: Vec<String> = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let mut ticks = members
        .iter()
        .map(|m| member::decode(asset, m))
        .collect::<Result<Vec<_>, _>>()?;
    ticks.sort_by_key(Tick::id);
    Ok(LiveBatch {
        asset_id: asset.to_owned(),
        ticks,
    })
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
        let now_us = crate::clock_us();
        let by_asset: Vec<(&str, Vec<&Tick>)> = by_asset.into_iter().collect();
        // One EVALSHA per asset, each answered on its own: when Redis has lost the script (a restart,
        // `SCRIPT FLUSH`), only the assets that got NOSCRIPT are sent again after loading it. Another
        // client's `SCRIPT LOAD` can land between the commands of this pipeline, so some assets may
        // already be written; sending those again would count their ticks as duplicates.
        let mut pending: Vec<usize> = (0..by_asset.len()).collect();
        let mut inserted = 0;
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &pending {
                let (asset, ticks) = &by_asset[i];
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
            }
            pipe.cmd("SADD")
                .arg(self.assets_key())
                .arg(pending.iter().map(|&i| by_asset[i].0).collect::<Vec<_>>());
            let mut conn = self.conn.clone();
            let mut answers: Vec<redis::RedisResult<usize>> = pipe.query_async(&mut conn).await?;
            // SADD's answer (the count of new assets) is not the batch's
            answers.pop().transpose()?;
            let mut noscript = Vec::new();
            for (&i, answer) in pending.iter().zip(answers) {
                match answer {
                    Ok(n) => inserted += n,
                    Err(e) if is_noscript(&e) && attempt == 0 => noscript.push(i),
                    Err(e) => return Err(e.into()),
                }
            }
            if noscript.is_empty() {
                break;
            }
            self.load_scripts(&mut conn).await?;
            pending = noscript;
        }
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

    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        let n = n.min(MAX_PAGE);
        if n == 0 {
            return Ok(Vec::new());
        }
        // Rank order is tick-id order: scores are µs and, within a µs, members sort by their id prefix.
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.ticks_key(asset_id))
            .arg(-(n as i64))
            .arg(-1)
            .query_async(&mut conn)
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
        let pubsub = live_connect(&self.client, &self.prefix).await?;
        let task = tokio::spawn(live_loop(
            self.client.clone(),
            self.prefix.clone(),
            pubsub,
            tx.clone(),
        ));
        *hub = Some(LiveHub { tx, task });
        Ok(LiveFeed::new(rx))
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

//! The live feed of [`RedisStore`](super::RedisStore): one shared pub/sub connection per store.
//!
//! `write.lua` publishes each batch's new members with `PUBLISH` on `PREFIX:{ASSET}:live`, inside the
//! same atomic script that stores them, with the asset version that write made (`{"v": version, "m":
//! [members]}`), so a live candle seeded from rollups read at version v takes only later batches. The
//! feed listens with `PSUBSCRIBE PREFIX:{*}:live`.
//!
//! On a Redis Cluster this is classic (not sharded) pub/sub: a node relays every `PUBLISH` to every
//! other node over the cluster bus, so one subscription on any node (a replica too) hears every asset,
//! and a tick is still announced atomically with its write, once. The cost is that every node carries
//! every announcement (see ARCHITECTURE.md). The connection goes to the first seed that answers; when it
//! breaks, the feed reconnects (to the next seed that answers) with backoff and reports a
//! [`LiveEvent::Gap`] (`reconnected`), since announcements made meanwhile are lost (Redis pub/sub is
//! fire-and-forget).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::live::{LiveBatch, LiveEvent};
use crate::{StoreError, Tick, member};

/// The shared pub/sub connection of a store's live feeds.
pub(super) struct LiveHub {
    pub(super) tx: broadcast::Sender<LiveEvent>,
    pub(super) task: tokio::task::JoinHandle<()>,
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

/// The asset of a live channel name, if it is one of this store's.
fn asset_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix("}:live")
}

/// Subscribes through the first of `clients` that answers.
pub(super) async fn connect(
    clients: &[Client],
    prefix: &str,
) -> Result<redis::aio::PubSub, StoreError> {
    let mut last = None;
    for client in clients {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .psubscribe(format!("{}:{{*}}:live", glob_escape(prefix)))
                .await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match attempt.await {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => StoreError::Redis(e),
        None => StoreError::Config("no Redis URL".into()),
    })
}

/// Forwards live messages to the feeds until none is left; reconnects (reporting a gap) when the
/// connection breaks.
pub(super) async fn run(
    clients: Vec<Client>,
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
                let Some(asset) = asset_of_channel(&prefix, msg.get_channel_name()) else {
                    continue;
                };
                match decode(asset, msg.get_payload_bytes()) {
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
            match connect(&clients, &prefix).await {
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

/// A live message: the version the write made and the members it added.
#[derive(serde::Deserialize)]
struct LiveMessage {
    v: u64,
    m: Vec<String>,
}

/// Decodes a live message of `asset` (see [`LiveMessage`]).
fn decode(asset: &str, payload: &[u8]) -> Result<LiveBatch, String> {
    let LiveMessage { v, m: members } =
        serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let mut ticks = members
        .iter()
        .map(|m| member::decode(asset, m))
        .collect::<Result<Vec<_>, _>>()?;
    ticks.sort_by_key(Tick::id);
    Ok(LiveBatch {
        asset_id: asset.to_owned(),
        ticks,
        version: v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_asset_under_this_prefix_only() {
        assert_eq!(asset_of_channel("tf", "tf:{BTC}:live"), Some("BTC"));
        assert_eq!(asset_of_channel("tf", "other:{BTC}:live"), None);
        assert_eq!(asset_of_channel("tf", "tf:{BTC}:ticks"), None);
        assert_eq!(glob_escape("a*b[c]"), "a\\*b\\[c\\]");
    }
}

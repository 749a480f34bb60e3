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
//! [`LiveEvent::Gap`] (`reconnected`: [`crate::live`]), since announcements made meanwhile are lost
//! (Redis pub/sub is fire-and-forget).

use std::sync::Arc;

use futures::StreamExt;
use redis::Client;
use tracing::warn;

use crate::live::{Events, LiveBatch, LiveEvent};
use crate::{StoreError, Tick, member};

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

/// Subscribes through the first of `clients` that answers: the live events of this store's assets
/// (the relay in [`crate::live`] reconnects when the stream ends).
pub(super) async fn connect(clients: Vec<Client>, prefix: String) -> Result<Events, StoreError> {
    let mut last = None;
    for client in &clients {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .psubscribe(format!("{}:{{*}}:live", glob_escape(&prefix)))
                .await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match attempt.await {
            Ok(pubsub) => {
                let events = pubsub.into_on_message().filter_map(move |msg| {
                    let event =
                        asset_of_channel(&prefix, msg.get_channel_name()).and_then(|asset| {
                            match decode(asset, msg.get_payload_bytes()) {
                                Ok(batch) => Some(LiveEvent::Ticks(Arc::new(batch))),
                                Err(e) => {
                                    warn!(asset, error = %e, "undecodable live message skipped");
                                    None
                                }
                            }
                        });
                    futures::future::ready(event)
                });
                return Ok(events.boxed());
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => StoreError::Redis(e),
        None => StoreError::Config("no Redis URL".into()),
    })
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

//! The live feed of [`PostgresStore`](super::PostgresStore): one `LISTEN` connection per store.
//!
//! `write.sql` announces each batch's new ticks with `pg_notify` on the channel `SCHEMA_live`, in the
//! same transaction that stores them, so PostgreSQL delivers the announcement once the write commits
//! and never for a write that failed. A payload is `{"a": ASSET, "v": V, "m": [members], "skipped": N}`, at most
//! ~7 KB (NOTIFY's limit is 8000 bytes; `v` is the asset's write version the batch made): a batch's members are split over several notifications, and a
//! tick too big to announce is counted in `skipped` and reported as a [`LiveEvent::Gap`] (`oversized`).
//! When the connection breaks, the feed reconnects with backoff and reports a gap (`reconnected`):
//! notifications sent meanwhile are not kept for it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;
use tracing::{info, warn};

use crate::live::{LiveBatch, LiveEvent};
use crate::{StoreError, Tick, member};

/// The shared listening connection of a store's live feeds.
pub(super) struct LiveHub {
    pub(super) tx: broadcast::Sender<LiveEvent>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// A `LISTEN`ing connection: its notifications arrive on `rx`; `None` there means it closed.
pub(super) struct Listener {
    _client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<Option<String>>,
}

/// Connects and listens on `channel`. When this returns, every later notification reaches the
/// listener.
pub(super) async fn listen(url: &str, channel: &str) -> Result<Listener, StoreError> {
    let (client, mut connection) = super::schema::open(url).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(Some(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "PostgreSQL live connection failed");
                    break;
                }
            }
        }
        let _ = tx.send(None);
    });
    // The channel name is the store's schema (checked to be a plain identifier) + "_live".
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    Ok(Listener {
        _client: client,
        rx,
    })
}

/// Forwards notifications to the feeds until none is left; reconnects (reporting a gap) when the
/// connection breaks.
pub(super) async fn run(
    url: String,
    channel: String,
    mut listener: Listener,
    tx: broadcast::Sender<LiveEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        loop {
            let payload =
                match tokio::time::timeout(Duration::from_secs(5), listener.rx.recv()).await {
                    Ok(Some(Some(p))) => p,
                    Ok(_) => break,
                    Err(_) if tx.receiver_count() == 0 => return,
                    Err(_) => continue,
                };
            if tx.receiver_count() == 0 {
                return;
            }
            backoff = Duration::from_millis(100);
            match decode(&payload) {
                Ok((batch, skipped)) => {
                    if !batch.ticks.is_empty() {
                        let _ = tx.send(LiveEvent::Ticks(Arc::new(batch)));
                    }
                    if skipped > 0 {
                        let _ = tx.send(LiveEvent::Gap {
                            missed: skipped,
                            reason: "oversized",
                        });
                    }
                }
                Err(e) => warn!(error = %e, "undecodable live notification skipped"),
            }
        }
        warn!("PostgreSQL live feed connection lost; reconnecting");
        loop {
            if tx.receiver_count() == 0 {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match listen(&url, &channel).await {
                Ok(l) => {
                    listener = l;
                    info!("PostgreSQL live feed reconnected");
                    let _ = tx.send(LiveEvent::Gap {
                        missed: 0,
                        reason: "reconnected",
                    });
                    break;
                }
                Err(e) => warn!(error = %e, "PostgreSQL live feed reconnect failed"),
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Note {
    a: String,
    v: u64,
    m: Vec<String>,
    #[serde(default)]
    skipped: u64,
}

/// Decodes a notification: the batch of new ticks it carries and how many it had to leave out.
fn decode(payload: &str) -> Result<(LiveBatch, u64), String> {
    let note: Note = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    let mut ticks = note
        .m
        .iter()
        .map(|m| member::decode(&note.a, m))
        .collect::<Result<Vec<_>, _>>()?;
    ticks.sort_by_key(Tick::id);
    Ok((
        LiveBatch {
            asset_id: note.a,
            ticks,
            version: note.v,
        },
        note.skipped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_decode_to_batches_in_id_order() {
        let tick = |seq: u64, price: &str, size: Option<&str>, source: &str| Tick {
            asset_id: "BTC".into(),
            price: price.parse().unwrap(),
            size: size.map(|s| s.parse().unwrap()),
            event_time_ns: seq as i64 * 10,
            seq,
            source: source.into(),
        };
        let (a, b) = (tick(1, "1", None, ""), tick(2, "2", Some("1"), "x"));
        let payload = serde_json::json!({
            "a": "BTC", "v": 7, "m": [member::encode(&b), member::encode(&a)], "skipped": 1
        })
        .to_string();
        let payload = payload.as_str();
        let (batch, skipped) = decode(payload).unwrap();
        assert_eq!((batch.asset_id.as_str(), batch.version), ("BTC", 7));
        assert_eq!(batch.ticks, vec![a, b]);
        assert_eq!(skipped, 1);
        assert!(decode("{\"a\":\"BTC\"}").is_err());
    }
}

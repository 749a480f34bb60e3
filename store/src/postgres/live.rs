//! The live feed of [`PostgresStore`](super::PostgresStore): one `LISTEN` connection per store.
//!
//! `write.sql` announces each batch's new ticks with `pg_notify` on the channel `SCHEMA_live`, in the
//! same transaction that stores them, so PostgreSQL delivers the announcement once the write commits
//! and never for a write that failed. A payload is `{"a": ASSET, "v": V, "m": [members], "skipped": N}`, at most
//! ~7 KB (NOTIFY's limit is 8000 bytes; `v` is the asset's write version the batch made): a batch's members are split over several notifications, and a
//! tick too big to announce is counted in `skipped` and reported as a [`LiveEvent::Gap`] (`oversized`).
//! When the connection breaks, the feed reconnects with backoff and reports a gap (`reconnected`:
//! [`crate::live`]): notifications sent meanwhile are not kept for it.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tracing::warn;

use crate::live::{Events, LiveBatch, LiveEvent};
use crate::{StoreError, Tick, member};

/// Connects and listens on `channel`: the events of its notifications, until the connection closes
/// (the relay in [`crate::live`] reconnects then). When this returns, every later notification
/// reaches the stream.
pub(super) async fn listen(url: String, channel: String) -> Result<Events, StoreError> {
    let (client, mut connection) = super::schema::open(&url).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
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
    });
    // The channel name is the store's schema (checked to be a plain identifier) + "_live".
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await?;
    // The stream owns the client, so the connection lives as long as the stream.
    let payloads = futures::stream::unfold((client, rx), |(client, mut rx)| async move {
        let payload = rx.recv().await?;
        Some((payload, (client, rx)))
    });
    Ok(payloads
        .flat_map(|payload| futures::stream::iter(events(&payload)))
        .boxed())
}

/// The events of one notification: its new ticks, and a gap for the ticks it had to leave out.
fn events(payload: &str) -> Vec<LiveEvent> {
    let mut out = Vec::new();
    match decode(payload) {
        Ok((batch, skipped)) => {
            if !batch.ticks.is_empty() {
                out.push(LiveEvent::Ticks(Arc::new(batch)));
            }
            if skipped > 0 {
                out.push(LiveEvent::Gap {
                    missed: skipped,
                    reason: "oversized",
                });
            }
        }
        Err(e) => warn!(error = %e, "undecodable live notification skipped"),
    }
    out
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

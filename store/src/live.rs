//! Live feed: the ticks a store has just stored, as they are stored.
//!
//! Every implementation announces each *new* tick once, after the batch holding it is applied: a
//! redelivered batch stores nothing new and announces nothing. Announcements are one [`LiveBatch`] per
//! asset per written batch, fanned out to every [`LiveFeed`] through a bounded broadcast buffer of
//! [`LIVE_BUFFER`] batches. A feed that falls further behind than that does not slow anyone down: it
//! skips ahead and reports a [`LiveEvent::Gap`].
//!
//! The stores with a server (Redis pub/sub, PostgreSQL `LISTEN`) share one connection among all of a
//! store's feeds: [`subscribe`] starts one relay task per store, which forwards the connection's
//! events and, when it breaks, reconnects with backoff and reports a gap (`reconnected`), since what
//! was announced meanwhile is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{StoreError, Tick};

/// How many live batches a store buffers for its slowest feed before that feed skips ahead.
pub const LIVE_BUFFER: usize = 4096;

/// The new ticks of one asset from one stored batch, in tick-id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBatch {
    /// The asset.
    pub asset_id: String,
    /// Its ticks that were not stored before, in [`TickId`](crate::TickId) order.
    pub ticks: Vec<Tick>,
    /// The asset's write version this batch made: a [`RollupPage`](crate::RollupPage) read at this
    /// version or later already holds these ticks.
    pub version: u64,
}

/// What a [`LiveFeed`] yields.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// Newly stored ticks of one asset.
    Ticks(Arc<LiveBatch>),
    /// Some live batches may have been missed.
    Gap {
        /// How many batches were skipped, when known (0 = unknown).
        missed: u64,
        /// Why: `lagged` (this feed fell behind) or `reconnected` (the store's feed was interrupted).
        reason: &'static str,
    },
}

/// A subscription to every asset's newly stored ticks (see the [module docs](self)).
#[derive(Debug)]
pub struct LiveFeed {
    rx: broadcast::Receiver<LiveEvent>,
}

impl LiveFeed {
    /// A feed reading from a store's broadcast channel.
    pub fn new(rx: broadcast::Receiver<LiveEvent>) -> Self {
        LiveFeed { rx }
    }

    /// The next event; `None` once the store's feed has closed for good.
    pub async fn recv(&mut self) -> Option<LiveEvent> {
        match self.rx.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(LiveEvent::Gap {
                missed,
                reason: "lagged",
            }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// A live connection's events, decoded; the stream ends when the connection does.
pub(crate) type Events = BoxStream<'static, LiveEvent>;

/// The relay of a store's live feeds: the sender they subscribe to and the task feeding it.
pub(crate) struct LiveHub {
    tx: broadcast::Sender<LiveEvent>,
    task: tokio::task::JoinHandle<()>,
}

/// Reconnect backoff: from `BACKOFF_MIN`, doubling, at most `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle relay checks whether any feed is left.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// A feed of the store whose relay is `hub`, starting the relay when none runs. `connect` opens the
/// store's live connection (`store` names it in logs); the first connection is made here, so the
/// caller learns at once when the store is unreachable.
pub(crate) async fn subscribe<C, Fut>(
    hub: &tokio::sync::Mutex<Option<LiveHub>>,
    store: &'static str,
    mut connect: C,
) -> Result<LiveFeed, StoreError>
where
    C: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Events, StoreError>> + Send + 'static,
{
    let mut hub = hub.lock().await;
    if let Some(h) = hub.as_ref().filter(|h| !h.task.is_finished()) {
        return Ok(LiveFeed::new(h.tx.subscribe()));
    }
    let (tx, rx) = broadcast::channel(LIVE_BUFFER);
    let events = connect().await?;
    let task = tokio::spawn(relay(store, tx.clone(), events, connect));
    *hub = Some(LiveHub { tx, task });
    Ok(LiveFeed::new(rx))
}

/// Forwards `events` to the feeds until none is left; when the connection ends, reconnects with
/// `connect` (backoff) and reports a gap.
async fn relay<C, Fut>(
    store: &'static str,
    tx: broadcast::Sender<LiveEvent>,
    mut events: Events,
    mut connect: C,
) where
    C: FnMut() -> Fut,
    Fut: Future<Output = Result<Events, StoreError>>,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        loop {
            let event = match tokio::time::timeout(IDLE_CHECK, events.next()).await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(_) if tx.receiver_count() == 0 => return,
                Err(_) => continue,
            };
            if tx.receiver_count() == 0 {
                return;
            }
            backoff = BACKOFF_MIN;
            let _ = tx.send(event);
        }
        warn!(store, "live feed connection lost; reconnecting");
        loop {
            if tx.receiver_count() == 0 {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match connect().await {
                Ok(e) => {
                    events = e;
                    info!(store, "live feed reconnected");
                    let _ = tx.send(LiveEvent::Gap {
                        missed: 0,
                        reason: "reconnected",
                    });
                    break;
                }
                Err(e) => warn!(store, error = %e, "live feed reconnect failed"),
            }
        }
    }
}

/// Groups `ticks` (already known to be new) by asset, each group in tick-id order, with the version
/// `version_of(asset)` the write made.
pub(crate) fn batches(ticks: Vec<Tick>, version_of: impl Fn(&str) -> u64) -> Vec<LiveBatch> {
    let mut by_asset: std::collections::BTreeMap<String, Vec<Tick>> = Default::default();
    for t in ticks {
        by_asset.entry(t.asset_id.clone()).or_default().push(t);
    }
    by_asset
        .into_iter()
        .map(|(asset_id, mut ticks)| {
            ticks.sort_by_key(Tick::id);
            let version = version_of(&asset_id);
            LiveBatch {
                asset_id,
                ticks,
                version,
            }
        })
        .collect()
}

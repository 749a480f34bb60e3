//! Live feed: the ticks a store has just stored, as they are stored.
//!
//! Every implementation announces each *new* tick once, after the batch holding it is applied: a
//! redelivered batch stores nothing new and announces nothing. Announcements are one [`LiveBatch`] per
//! asset per written batch, fanned out to every [`LiveFeed`] through a bounded broadcast buffer of
//! [`LIVE_BUFFER`] batches. A feed that falls further behind than that does not slow anyone down: it
//! skips ahead and reports a [`LiveEvent::Gap`].

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::Tick;

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

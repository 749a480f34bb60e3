//! [`MemoryStore`]: the [`TickStore`] semantics in process memory.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::live::{self, LIVE_BUFFER, LiveEvent, LiveFeed};
use crate::member::{self, ID_LEN};
use crate::{MAX_PAGE, RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

/// An in-memory [`TickStore`]: the mocked datastore of the worker's unit tests and the embedded default
/// of `tickctl demo`. It stores the same member strings as [`RedisStore`](crate::RedisStore) in the same
/// order, so both stores agree on identity, ordering, latest and retention. Its live feed is an
/// in-process broadcast channel.
#[derive(Debug)]
pub struct MemoryStore {
    retention: Retention,
    assets: Mutex<BTreeMap<String, Series>>,
    live: broadcast::Sender<LiveEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_retention(Retention::default())
    }
}

#[derive(Debug, Default)]
struct Series {
    members: BTreeSet<String>,
    latest: Option<String>,
}

impl MemoryStore {
    /// An empty store that keeps everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with a retention policy.
    pub fn with_retention(retention: Retention) -> Self {
        MemoryStore {
            retention,
            assets: Mutex::default(),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    /// Total ticks held, over all assets.
    pub fn len(&self) -> usize {
        self.lock().values().map(|s| s.members.len()).sum()
    }

    /// Whether no tick is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Series>> {
        // A panic while holding the lock cannot leave a half-applied tick (each insert is one call),
        // so a poisoned lock's data is still consistent.
        self.assets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Series {
    fn apply_retention(&mut self, retention: &Retention, now_us: i64) {
        if let Some(max_age) = retention.max_age {
            // Never counted from later than the writer's clock (see `Retention::max_age`).
            let newest = self.members.last().map(|m| score_of(m).min(now_us));
            if let Some(newest) = newest {
                let cutoff = newest - i64::try_from(max_age.as_micros()).unwrap_or(i64::MAX);
                while self.members.first().is_some_and(|m| score_of(m) < cutoff) {
                    self.members.pop_first();
                }
            }
        }
        if let Some(max) = retention.max_count {
            while self.members.len() as u64 > max {
                self.members.pop_first();
            }
        }
    }
}

fn score_of(member: &str) -> i64 {
    member[..19].parse::<i64>().map(member::score).unwrap_or(0)
}

#[async_trait]
impl TickStore for MemoryStore {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        let mut assets = self.lock();
        let mut summary = WriteSummary::default();
        let mut touched = BTreeSet::new();
        let mut new = Vec::new();
        for tick in ticks {
            let series = assets.entry(tick.asset_id.clone()).or_default();
            let m = member::encode(tick);
            let newer = series
                .latest
                .as_deref()
                .is_none_or(|cur| m[..ID_LEN] > cur[..ID_LEN]);
            if newer {
                series.latest = Some(m.clone());
            }
            if series.members.insert(m) {
                summary.inserted += 1;
                new.push(tick.clone());
            } else {
                summary.duplicates += 1;
            }
            touched.insert(tick.asset_id.as_str());
        }
        let now_us = crate::clock_us();
        for asset in touched {
            if let Some(series) = assets.get_mut(asset) {
                series.apply_retention(&self.retention, now_us);
            }
        }
        // Announced while the lock is still held, so feeds see batches in the order they were applied.
        // `send` only fails when nobody listens, which is fine.
        for batch in live::batches(new) {
            let _ = self.live.send(LiveEvent::Ticks(batch.into()));
        }
        drop(assets);
        Ok(summary)
    }

    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        let assets = self.lock();
        let Some(m) = assets.get(asset_id).and_then(|s| s.latest.as_deref()) else {
            return Ok(None);
        };
        member::decode(asset_id, m)
            .map(Some)
            .map_err(|detail| StoreError::Corrupt {
                key: asset_id.to_owned(),
                detail,
            })
    }

    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        let assets = self.lock();
        let Some(series) = assets.get(asset_id) else {
            return Ok(TickPage::default());
        };
        let start = match query.after {
            // '}' sorts after the '|' that follows every member's id, so this skips all of `after`'s members.
            Some(after) => member::encode_id(after) + "}",
            None => member::encode_time(query.from_ns),
        };
        let start = start.max(member::encode_time(query.from_ns));
        let end = member::encode_time(query.to_ns);
        if start >= end {
            return Ok(TickPage::default());
        }
        let limit = query.page_size();
        let mut page = TickPage::default();
        for m in series.members.range::<str, _>((
            Bound::Included(start.as_str()),
            Bound::Excluded(end.as_str()),
        )) {
            let tick = member::decode(asset_id, m).map_err(|detail| StoreError::Corrupt {
                key: asset_id.to_owned(),
                detail,
            })?;
            if page.ticks.len() == limit {
                page.next = page.ticks.last().map(Tick::id);
                break;
            }
            page.ticks.push(tick);
        }
        Ok(page)
    }

    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        let assets = self.lock();
        let Some(series) = assets.get(asset_id) else {
            return Ok(Vec::new());
        };
        let mut out = series
            .members
            .iter()
            .rev()
            .take(n.min(MAX_PAGE))
            .map(|m| {
                member::decode(asset_id, m).map_err(|detail| StoreError::Corrupt {
                    key: asset_id.to_owned(),
                    detail,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().keys().cloned().collect())
    }

    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        Ok(LiveFeed::new(self.live.subscribe()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

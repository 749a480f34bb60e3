//! [`MemoryStore`]: the [`TickStore`] semantics in process memory.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::live::{self, LIVE_BUFFER, LiveEvent, LiveFeed};
use crate::member::{self, ID_LEN};
use crate::rollup::{self, Base, Candle, RebuildSummary, RollupPage, RollupQuery, RollupRetention};
use crate::{MAX_PAGE, RangeQuery, Retention, StoreError, Tick, TickPage, TickStore, WriteSummary};

/// An in-memory [`TickStore`]: the mocked datastore of the worker's unit tests and the embedded default
/// of `tickctl demo`. It stores the same member strings as [`RedisStore`](crate::RedisStore) in the same
/// order, so both stores agree on identity, ordering, latest and retention, and computes rollups with
/// the same code ([`rollup::fold_new`]) under the same rules. Its live feed is an in-process broadcast
/// channel.
#[derive(Debug)]
pub struct MemoryStore {
    retention: Retention,
    rollup_retention: RollupRetention,
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
    /// The id (39 digits) of the newest tick retention removed: ticks at or below it count as stored.
    horizon: Option<String>,
    /// Bumped by every write that changed the asset.
    version: u64,
    /// Per base (in [`Base::ALL`] order), candles by start (ns).
    rollups: [BTreeMap<i64, Candle>; 4],
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
            rollup_retention: RollupRetention::default(),
            assets: Mutex::default(),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    /// Sets how long rollups are kept (default [`RollupRetention::default`]).
    pub fn with_rollup_retention(mut self, retention: RollupRetention) -> Self {
        self.rollup_retention = retention;
        self
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
                    self.forget_first();
                }
            }
        }
        if let Some(max) = retention.max_count {
            while self.members.len() as u64 > max {
                self.forget_first();
            }
        }
    }

    /// Drops the oldest tick, moving the horizon up to it.
    fn forget_first(&mut self) {
        if let Some(m) = self.members.pop_first() {
            let id = m[..ID_LEN].to_owned();
            if self.horizon.as_ref().is_none_or(|h| id > *h) {
                self.horizon = Some(id);
            }
        }
    }

    /// Event time (ns) of the horizon.
    fn horizon_ns(&self) -> Option<i64> {
        self.horizon.as_ref().and_then(|h| h[..19].parse().ok())
    }

    /// Drops the rollups older than `retention` allows.
    fn apply_rollup_retention(&mut self, retention: &RollupRetention, now_ns: i64) {
        let Some(newest) = self
            .latest
            .as_ref()
            .and_then(|l| l[..19].parse::<i64>().ok())
        else {
            return;
        };
        for base in Base::ALL {
            if let Some(cutoff) = retention.cutoff_ns(base, newest, now_ns) {
                let level = &mut self.rollups[base.index()];
                *level = level.split_off(&cutoff);
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
        let mut by_asset: BTreeMap<&str, Vec<&Tick>> = BTreeMap::new();
        for tick in ticks {
            by_asset
                .entry(tick.asset_id.as_str())
                .or_default()
                .push(tick);
        }
        let mut new = Vec::new();
        let now_us = crate::clock_us();
        for (asset, ticks) in by_asset {
            let series = assets.entry(asset.to_owned()).or_default();
            let mut fresh: Vec<&Tick> = Vec::new();
            let mut members = BTreeSet::new();
            for tick in ticks {
                let m = member::encode(tick);
                let newer = series
                    .latest
                    .as_deref()
                    .is_none_or(|cur| m[..ID_LEN] > cur[..ID_LEN]);
                if newer {
                    series.latest = Some(m.clone());
                }
                let above_horizon = series.horizon.as_deref().is_none_or(|h| m[..ID_LEN] > *h);
                if above_horizon && !series.members.contains(&m) && !members.contains(&m) {
                    members.insert(m.clone());
                    fresh.push(tick);
                } else {
                    summary.duplicates += 1;
                }
            }
            if fresh.is_empty() {
                continue;
            }
            // Rollups first: an overflow refuses the asset's batch before anything of it is stored.
            let candles = rollup::fold_new(&fresh, |base, start| {
                series.rollups[base.index()].get(&start).cloned()
            })
            .map_err(|overflow| StoreError::Overflow {
                asset: asset.to_owned(),
                overflow,
            })?;
            for (base, c) in candles {
                series.rollups[base.index()].insert(c.start_ns, c);
            }
            summary.inserted += fresh.len();
            series.members.extend(members);
            series.version += 1;
            series.apply_retention(&self.retention, now_us);
            series.apply_rollup_retention(&self.rollup_retention, now_us.saturating_mul(1_000));
            new.extend(fresh.into_iter().cloned());
        }
        // Announced while the lock is still held, so feeds see batches in the order they were applied.
        // `send` only fails when nobody listens, which is fine.
        for batch in live::batches(new, |a| assets.get(a).map_or(0, |s| s.version)) {
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

    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError> {
        let assets = self.lock();
        let Some(series) = assets.get(asset_id) else {
            return Ok(RollupPage::default());
        };
        let mut page = RollupPage {
            version: series.version,
            ..RollupPage::default()
        };
        if query.from_ns >= query.to_ns {
            return Ok(page);
        }
        let limit = query.limit.clamp(1, MAX_PAGE);
        for (start, c) in series.rollups[query.base.index()].range(query.from_ns..query.to_ns) {
            if page.candles.len() == limit {
                page.next = Some(*start);
                break;
            }
            page.candles.push(c.clone());
        }
        Ok(page)
    }

    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        let mut assets = self.lock();
        let mut summary = RebuildSummary::default();
        let Some(series) = assets.get_mut(asset_id) else {
            return Ok(summary);
        };
        // The days from the first stored tick's (or `from_ns`'s) to the newest tick's, as Redis does.
        let day = Base::Day.ns();
        let (Some(first), Some(newest)) = (
            series
                .members
                .first()
                .map(|m| m[..19].parse::<i64>().unwrap_or(0)),
            series
                .latest
                .as_ref()
                .map(|m| m[..19].parse::<i64>().unwrap_or(0)),
        ) else {
            return Ok(summary);
        };
        let from = Base::Day.bucket(from_ns.max(first));
        let end = to_ns.min(newest.saturating_add(1));
        let to = match Base::Day.bucket(end) {
            start if start == end => end,
            start => start.saturating_add(day),
        };
        if from >= to {
            return Ok(summary);
        }
        let horizon = series.horizon_ns();
        let mut ticks = Vec::new();
        for m in series.members.range::<str, _>((
            Bound::Included(member::encode_time(from).as_str()),
            Bound::Excluded(member::encode_time(to).as_str()),
        )) {
            ticks.push(
                member::decode(asset_id, m).map_err(|detail| StoreError::Corrupt {
                    key: asset_id.to_owned(),
                    detail,
                })?,
            );
        }
        let candles =
            rollup::from_raw(&ticks, horizon).map_err(|overflow| StoreError::Overflow {
                asset: asset_id.to_owned(),
                overflow,
            })?;
        summary.ticks = ticks.len() as u64;
        summary.days = usize::try_from((to - from) / day).unwrap_or(usize::MAX);
        // Replace every bucket of those days that starts above the horizon.
        let first = horizon.map_or(from, |h| from.max(h.saturating_add(1)));
        for level in &mut series.rollups {
            let keep_after = level.split_off(&to);
            let mut kept = level.split_off(&first);
            kept.clear();
            level.extend(keep_after);
        }
        summary.candles = candles.len();
        for (base, c) in candles {
            series.rollups[base.index()].insert(c.start_ns, c);
        }
        series.version += 1;
        series.apply_rollup_retention(
            &self.rollup_retention,
            crate::clock_us().saturating_mul(1_000),
        );
        Ok(summary)
    }
}

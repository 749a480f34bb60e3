//! The parts of [`RedisStore`] that keep rollups: the batch write (a compare-and-set, see the
//! [module docs](super)), rollup reads and rebuilds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{REBUILD_ATTEMPTS, RedisStore, WRITE_ATTEMPTS};
use crate::member;
use crate::rollup::{self, Base, Candle, RebuildSummary, RollupPage, RollupQuery};
use crate::{MAX_PAGE, RangeQuery, StoreError, Tick, TickStore, WriteSummary};

/// Whole seconds at or after `ns`: the first bucket start (s) of a range starting at `ns`.
fn ceil_secs(ns: i64) -> i64 {
    let s = ns.div_euclid(1_000_000_000);
    if ns.rem_euclid(1_000_000_000) == 0 {
        s
    } else {
        s + 1
    }
}

/// What `prepare.lua` answers: version, newness flags, bases and members of the candles.
type Prepared = (String, Vec<i64>, Vec<i64>, Vec<String>);

/// Most assets whose last write a store remembers (see [`Known`]); past it, it forgets them all.
const MAX_CACHED_ASSETS: usize = 100_000;

/// What a write may assume about an asset: its version and the candles it holds (of the buckets it
/// names; a bucket not named is assumed empty, and `write.lua` checks it is). From `prepare.lua`, or
/// from this store's own last write of the asset — a worker owns its assets' partitions, so normally
/// nobody else wrote since, and the next batch needs one round trip, not two.
#[derive(Clone, Debug)]
pub(super) struct Known {
    version: String,
    candles: std::collections::HashMap<(Base, i64), Candle>,
    /// From `prepare.lua`: which of the batch's ticks are new. `None`: assume all are (checked).
    fresh: Option<Vec<bool>>,
}

/// `ticks` without repeats (a tick repeated in a batch counts once).
fn dedup(ticks: Vec<&Tick>) -> Vec<&Tick> {
    let mut seen = std::collections::HashSet::new();
    ticks
        .into_iter()
        .filter(|t| seen.insert((t.id(), member::encode(t))))
        .collect()
}

fn base_of(n: i64) -> Option<Base> {
    usize::try_from(n - 1)
        .ok()
        .and_then(|i| Base::ALL.get(i).copied())
}

impl RedisStore {
    /// A [`Known`] from `prepare.lua`'s answer for `ticks` of `asset`.
    fn known_from(&self, asset: &str, p: Prepared, ticks: &[&Tick]) -> Result<Known, StoreError> {
        let (version, flags, bases, members) = p;
        if flags.len() != ticks.len() {
            return Err(StoreError::Corrupt {
                key: self.ticks_key(asset),
                detail: format!(
                    "prepare.lua answered {} flags for {} ticks",
                    flags.len(),
                    ticks.len()
                ),
            });
        }
        let mut candles = std::collections::HashMap::new();
        for (b, m) in bases.iter().zip(&members) {
            let base = base_of(*b).ok_or_else(|| StoreError::Corrupt {
                key: self.rollup_key(asset, Base::Second),
                detail: format!("prepare.lua named base {b}"),
            })?;
            let c = Candle::decode(m, base).map_err(|detail| StoreError::Corrupt {
                key: self.rollup_key(asset, base),
                detail,
            })?;
            candles.insert((base, c.start_ns), c);
        }
        Ok(Known {
            version,
            candles,
            fresh: Some(flags.into_iter().map(|f| f == 1).collect()),
        })
    }

    /// Adds `write.lua` for `asset` to `pipe` (see the script for the contract).
    #[allow(clippy::too_many_arguments)]
    fn push_write(
        &self,
        pipe: &mut redis::Pipeline,
        asset: &str,
        version: &str,
        now_us: i64,
        fresh: &[&Tick],
        empty: &[(Base, i64)],
        candles: &[(Base, Candle)],
    ) {
        let max_age_us = self
            .retention
            .max_age
            .map_or(0, |a| u64::try_from(a.as_micros()).unwrap_or(u64::MAX));
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(&self.write_sha)
            .arg(8)
            .arg(self.ticks_key(asset))
            .arg(self.latest_key(asset))
            .arg(self.version_key(asset))
            .arg(self.horizon_key(asset));
        for base in Base::ALL {
            cmd.arg(self.rollup_key(asset, base));
        }
        cmd.arg(version)
            .arg(max_age_us)
            .arg(self.retention.max_count.unwrap_or(0))
            .arg(self.live_channel(asset))
            .arg(now_us)
            .arg(&self.rollup_ages()[..])
            .arg(fresh.len())
            .arg(empty.len());
        for t in fresh {
            cmd.arg(member::score(t.event_time_ns))
                .arg(member::encode(t));
        }
        for (base, start) in empty {
            cmd.arg(base.index() + 1)
                .arg(start.div_euclid(1_000_000_000));
        }
        for (base, c) in candles {
            cmd.arg(base.index() + 1)
                .arg(c.start_ns.div_euclid(1_000_000_000))
                .arg(c.encode());
        }
    }

    /// The `prepare.lua` call of `ticks` of `asset`: one single-slot part.
    fn prepare_part(&self, asset: &str, ticks: &[&Tick]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(&self.prepare_sha)
            .arg(7)
            .arg(self.ticks_key(asset))
            .arg(self.version_key(asset))
            .arg(self.horizon_key(asset));
        for base in Base::ALL {
            cmd.arg(self.rollup_key(asset, base));
        }
        for t in ticks {
            cmd.arg(member::encode(t));
        }
        pipe
    }

    /// [`TickStore::write_batch`] (see the [module docs](super)).
    pub(super) async fn write(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        if ticks.is_empty() {
            return Ok(WriteSummary::default());
        }
        let mut by_asset: BTreeMap<&str, Vec<&Tick>> = BTreeMap::new();
        for t in ticks {
            by_asset.entry(t.asset_id.as_str()).or_default().push(t);
        }
        // Assets this store has not added to the index yet: added by the first attempt's call.
        let unindexed: Vec<&str> = {
            let indexed = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
            by_asset
                .keys()
                .copied()
                .filter(|a| !indexed.contains(*a))
                .collect()
        };
        let mut inserted = 0;
        let mut pending: Vec<(&str, Vec<&Tick>)> = by_asset.into_iter().collect();
        let mut delay = Duration::from_millis(1);
        for attempt in 0..WRITE_ATTEMPTS {
            // What each asset's write may assume: from this store's own last write of it, or read.
            let mut known: Vec<Option<Known>> = {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                pending
                    .iter()
                    .map(|(a, _)| (attempt == 0).then(|| cache.get(*a).cloned()).flatten())
                    .collect()
            };
            let unknown: Vec<usize> = (0..pending.len()).filter(|&i| known[i].is_none()).collect();
            if !unknown.is_empty() {
                // One read-only part per asset (its slot); no replica acks needed for a read.
                let parts: Vec<redis::Pipeline> = unknown
                    .iter()
                    .map(|&i| self.prepare_part(pending[i].0, &pending[i].1))
                    .collect();
                let prepared = self.exec_with_scripts(&parts, None).await?;
                for (&i, r) in unknown.iter().zip(prepared) {
                    let p: Prepared = super::reply(r.into_iter().next())?;
                    known[i] = Some(self.known_from(pending[i].0, p, &pending[i].1)?);
                }
            }
            let now_us = crate::clock_us();
            // One write part per asset (its slot), then one SADD part per index bucket.
            let mut parts = Vec::new();
            let mut written = Vec::new();
            for ((asset, ticks), known) in pending.iter().zip(known) {
                let Some(known) = known else { continue };
                // Fresh: all the batch's ticks (once each) when assumed from the last write, the new
                // ones when read.
                let fresh: Vec<&Tick> = match &known.fresh {
                    Some(flags) => ticks
                        .iter()
                        .zip(flags)
                        .filter(|(_, f)| **f)
                        .map(|(t, _)| *t)
                        .collect(),
                    None => ticks.clone(),
                };
                // Nothing new: nothing to write — except with replica acks, where an empty write.lua
                // still goes out, so the `WAIT` after it covers an earlier attempt's writes of these
                // ticks (one whose own `WAIT` fell short) before they count as stored.
                if fresh.is_empty() && self.acks.is_none() {
                    continue;
                }
                let fresh = dedup(fresh);
                let mut empty = Vec::new();
                let candles = rollup::fold_new(&fresh, |base, start| {
                    let c = known.candles.get(&(base, start)).cloned();
                    if c.is_none() {
                        empty.push((base, start));
                    }
                    c
                })
                .map_err(|overflow| StoreError::Overflow {
                    asset: (*asset).to_owned(),
                    overflow,
                })?;
                let mut pipe = redis::pipe();
                self.push_write(
                    &mut pipe,
                    asset,
                    &known.version,
                    now_us,
                    &fresh,
                    &empty,
                    &candles,
                );
                parts.push(pipe);
                // What the next write of the asset may assume: the candles this one stores (or, when
                // it stores none, those it was given).
                let after = if candles.is_empty() {
                    known.candles
                } else {
                    candles
                        .into_iter()
                        .map(|(b, c)| ((b, c.start_ns), c))
                        .collect()
                };
                written.push((*asset, fresh.len(), after));
            }
            let indexing = attempt == 0 && !unindexed.is_empty();
            if indexing {
                let mut buckets: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
                for a in &unindexed {
                    buckets.entry(super::bucket(a)).or_default().insert(a);
                }
                for (b, assets) in &buckets {
                    let mut pipe = redis::pipe();
                    pipe.cmd("SADD").arg(self.bucket_key(*b)).arg(assets);
                    parts.push(pipe);
                }
            }
            // Each part is answered on its own: after NOSCRIPT only the parts that got it are sent
            // again (another client's SCRIPT LOAD can land between the parts, so others may be written
            // already; sending those again would find their ticks stored and count them as duplicates).
            let replies = if parts.is_empty() {
                // A retry whose assets all turned out to be stored already has nothing to send.
                Vec::new()
            } else {
                self.exec_with_scripts(&parts, self.acks).await?
            };
            if indexing {
                let mut indexed = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
                indexed.extend(unindexed.iter().map(|a| (*a).to_owned()));
            }
            // The SADD parts' answers (how many assets were new to a bucket) are not the batch's.
            let versions: Vec<i64> = replies
                .into_iter()
                .take(written.len())
                .map(|r| super::reply::<i64>(r.into_iter().next()))
                .collect::<Result<_, _>>()?;
            let mut again = Vec::new();
            {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() > MAX_CACHED_ASSETS {
                    cache.clear();
                }
                for ((asset, n, candles), v) in written.into_iter().zip(versions) {
                    if v < 0 {
                        cache.remove(asset);
                        again.push(asset);
                    } else {
                        inserted += n;
                        cache.insert(
                            asset.to_owned(),
                            Known {
                                version: v.to_string(),
                                candles,
                                fresh: None,
                            },
                        );
                    }
                }
            }
            if again.is_empty() {
                return Ok(WriteSummary {
                    inserted,
                    duplicates: ticks.len() - inserted,
                });
            }
            pending.retain(|(a, _)| again.contains(a));
            // The first retry reads at once (the assumption from the last write was stale); later
            // ones back off (another writer is busy with the asset).
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(50));
            }
        }
        Err(StoreError::Contended(
            pending
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(","),
        ))
    }

    /// [`TickStore::rollups`].
    pub(super) async fn read_rollups(
        &self,
        asset_id: &str,
        query: &RollupQuery,
    ) -> Result<RollupPage, StoreError> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        // One transaction (one slot: both keys carry the asset's tag), so the version is the one the
        // candles were read at.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(self.version_key(asset_id))
            .cmd("ZRANGE")
            .arg(self.rollup_key(asset_id, query.base))
            .arg(ceil_secs(query.from_ns))
            .arg(format!("({}", ceil_secs(query.to_ns)))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1);
        let (version, members): (Option<u64>, Vec<String>) =
            self.conn.query_pipeline(&pipe).await?;
        let mut page = RollupPage {
            version: version.unwrap_or(0),
            ..RollupPage::default()
        };
        if query.from_ns >= query.to_ns {
            return Ok(page);
        }
        for m in &members {
            let c = Candle::decode(m, query.base).map_err(|detail| StoreError::Corrupt {
                key: self.rollup_key(asset_id, query.base),
                detail,
            })?;
            if page.candles.len() == limit {
                page.next = Some(c.start_ns);
                break;
            }
            page.candles.push(c);
        }
        Ok(page)
    }

    /// [`TickStore::rebuild_rollups`].
    pub(super) async fn rebuild(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        let mut summary = RebuildSummary::default();
        let Some(latest) = self.latest(asset_id).await? else {
            return Ok(summary);
        };
        // From the first stored tick's day (or `from_ns`'s) to the newest tick's.
        let first = self
            .range(asset_id, &RangeQuery::all(1))
            .await?
            .ticks
            .first()
            .map_or(latest.event_time_ns, |t| t.event_time_ns);
        let day_ns = Base::Day.ns();
        let mut day = Base::Day.bucket(from_ns.max(first));
        let end = to_ns.min(latest.event_time_ns.saturating_add(1));
        while day < end {
            match self.rebuild_day(asset_id, day, &mut summary).await? {
                true => summary.days += 1,
                false => summary.busy.push(day),
            }
            day = day.saturating_add(day_ns);
        }
        Ok(summary)
    }

    /// Rebuilds one day (see [`TickStore::rebuild_rollups`]); `false` when it stayed busy.
    async fn rebuild_day(
        &self,
        asset: &str,
        day: i64,
        summary: &mut RebuildSummary,
    ) -> Result<bool, StoreError> {
        let day_s = day.div_euclid(1_000_000_000);
        let end = day.saturating_add(Base::Day.ns());
        let mut delay = Duration::from_millis(10);
        for _ in 0..REBUILD_ATTEMPTS {
            // What the day looks like before its ticks are read: the compare-and-set checks it is unchanged.
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("ZRANGE")
                .arg(self.rollup_key(asset, Base::Day))
                .arg(day_s)
                .arg(day_s)
                .arg("BYSCORE")
                .cmd("GET")
                .arg(self.horizon_key(asset));
            let (day_candle, horizon): (Vec<String>, Option<String>) =
                self.conn.query_pipeline(&pipe).await?;
            let horizon_ns = horizon
                .as_ref()
                .and_then(|h| h.get(..19)?.parse::<i64>().ok());
            let mut ticks = Vec::new();
            let mut q = RangeQuery {
                from_ns: day,
                to_ns: end,
                limit: MAX_PAGE,
                after: None,
            };
            loop {
                let page = self.range(asset, &q).await?;
                ticks.extend(page.ticks);
                match page.next {
                    Some(next) => q.after = Some(next),
                    None => break,
                }
            }
            let candles =
                rollup::from_raw(&ticks, horizon_ns).map_err(|overflow| StoreError::Overflow {
                    asset: asset.to_owned(),
                    overflow,
                })?;
            let first_s = horizon_ns.map_or(day_s, |h| day_s.max(h.div_euclid(1_000_000_000) + 1));
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&self.rebuild_sha)
                .arg(7)
                .arg(self.version_key(asset))
                .arg(self.horizon_key(asset));
            for base in Base::ALL {
                cmd.arg(self.rollup_key(asset, base));
            }
            cmd.arg(self.latest_key(asset))
                .arg(day_candle.first().map_or("", String::as_str))
                .arg(horizon.as_deref().unwrap_or(""))
                .arg(day_s)
                .arg(first_s)
                .arg(end.div_euclid(1_000_000_000))
                .arg(crate::clock_us())
                .arg(&self.rollup_ages()[..]);
            for (base, c) in &candles {
                cmd.arg(base.index() + 1)
                    .arg(c.start_ns.div_euclid(1_000_000_000))
                    .arg(c.encode());
            }
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            let replies = self.exec_with_scripts(&[pipe], self.acks).await?;
            let v: i64 = super::reply(
                replies
                    .into_iter()
                    .next()
                    .and_then(|r| r.into_iter().next()),
            )?;
            if v >= 0 {
                summary.ticks += ticks.len() as u64;
                summary.candles += candles.len();
                return Ok(true);
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        Ok(false)
    }
}

//! Write-time candle rollups: per asset, one OHLCV candle per bucket at each [`Base`] interval, kept by
//! the same atomic write that stores the ticks.
//!
//! **Base intervals: 1 s, 1 min, 1 h, 1 d.** Every interval a market-data user asks for in whole
//! seconds, minutes, hours or days (5 s, 15 min, 4 h, 7 d, …) is a multiple of one of them, so a
//! candle of any such interval is a merge of at most 60 (24 for hours → days) candles of the next
//! smaller base, never of raw ticks. A write touches one bucket per base per asset and batch (ticks of
//! one batch are close in time), so the cost per tick stays small; a finer base (100 ms) would multiply
//! storage tenfold for intervals few ask for, a coarser ladder (no 1 h) would make a 4 h candle cost 240
//! merges.
//!
//! **Exact arithmetic, in Rust.** A candle holds open/close (with the id of their tick, so a late tick
//! finds its place by event time, not arrival), high, low, volume (Σ size), turnover (Σ price × size,
//! for VWAP), the sum of prices (for averages), the largest price scale and the tick count, all as
//! [`Decimal`]s. Redis Lua numbers are doubles, so the stores never add in Lua: the Redis store reads the
//! buckets a batch's new ticks fall into, computes the new candles here, and writes ticks and candles in
//! one script that first checks the asset's version is the one it read (compare-and-set; see
//! [`crate::redis`]). Both stores use [`fold_new`], so they compute the same candles from the same ticks.
//!
//! **Only new ticks count.** The write script decides which ticks are new (not stored, not repeated in
//! the batch, newer than the asset's retention horizon); only those reach a candle, so a redelivered
//! batch changes nothing. A tick at or below the *horizon* — the newest tick that raw-tick retention ever
//! removed — is treated as already stored: once its raw copy is gone the store cannot tell a
//! redelivery from a new tick, and retention would remove it again at once anyway.
//!
//! **Retention.** Rollups have their own retention per base ([`RollupRetention`]), counted like raw
//! retention from the asset's newest tick (bounded by the writer's clock); raw retention never touches a
//! rollup, so a candle whose ticks were retained away stays as it was.
//!
//! (Over 600 lines with its tests, about 510 of code: the candle arithmetic both stores share — bases,
//! buckets, folding new ticks, merging to any interval, retention — is one unit, so that the stores
//! cannot compute different candles from the same ticks.)

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use tickfleet_proto::{Tick, TickId};

/// One of the intervals candles are kept at as ticks are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Base {
    /// 1 second.
    Second,
    /// 1 minute.
    Minute,
    /// 1 hour.
    Hour,
    /// 1 day (UTC).
    Day,
}

impl Base {
    /// Every base, smallest first.
    pub const ALL: [Base; 4] = [Base::Second, Base::Minute, Base::Hour, Base::Day];

    /// Width in seconds.
    pub const fn secs(self) -> i64 {
        match self {
            Base::Second => 1,
            Base::Minute => 60,
            Base::Hour => 3_600,
            Base::Day => 86_400,
        }
    }

    /// Width in nanoseconds.
    pub const fn ns(self) -> i64 {
        self.secs() * 1_000_000_000
    }

    /// `1s`, `1m`, `1h`, `1d`: how intervals are written, and the last part of the rollup's key.
    pub const fn label(self) -> &'static str {
        match self {
            Base::Second => "1s",
            Base::Minute => "1m",
            Base::Hour => "1h",
            Base::Day => "1d",
        }
    }

    /// Position in [`Base::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Base::Second => 0,
            Base::Minute => 1,
            Base::Hour => 2,
            Base::Day => 3,
        }
    }

    /// The largest base that divides `interval_ns`, if any (5 s → 1 s, 15 min → 1 min, 4 h → 1 h,
    /// 7 d → 1 d; 250 ms → none).
    pub fn dividing(interval_ns: i64) -> Option<Base> {
        Base::ALL
            .into_iter()
            .rev()
            .find(|b| interval_ns > 0 && interval_ns % b.ns() == 0)
    }

    /// Start (ns) of the bucket of this base holding `t_ns`.
    pub fn bucket(self, t_ns: i64) -> i64 {
        bucket_start(t_ns, self.ns())
    }
}

/// Start of the epoch-aligned bucket of width `interval_ns` holding `t_ns`.
pub fn bucket_start(t_ns: i64, interval_ns: i64) -> i64 {
    t_ns - t_ns.rem_euclid(interval_ns)
}

/// A decimal sum or product left `Decimal`'s range (96-bit integers): the candle cannot hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decimal overflow computing the {0}")]
pub struct Overflow(pub &'static str);

/// One OHLCV candle: the ticks of `[start_ns, end_ns)`, added in any order, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candle {
    /// Bucket start (ns).
    pub start_ns: i64,
    /// Bucket end (ns, exclusive).
    pub end_ns: i64,
    open: (TickId, Decimal),
    close: (TickId, Decimal),
    /// Highest price.
    pub high: Decimal,
    /// Lowest price.
    pub low: Decimal,
    /// Σ size over the ticks that have one.
    pub volume: Decimal,
    /// Σ price × size over the ticks that have a size (VWAP = turnover / volume).
    pub turnover: Decimal,
    /// Σ price (the simple average is price_sum / count).
    pub price_sum: Decimal,
    /// The most decimal places of any price added (averages round relative to it).
    pub price_scale: u32,
    /// Ticks added.
    pub count: u64,
}

/// The greater of two decimals; of two equal ones (`1.5` and `1.50`) the one of greater scale, so the
/// result does not depend on the order ticks are added in.
fn greater(a: Decimal, b: Decimal) -> Decimal {
    match a.cmp(&b) {
        std::cmp::Ordering::Less => b,
        std::cmp::Ordering::Greater => a,
        std::cmp::Ordering::Equal if b.scale() > a.scale() => b,
        std::cmp::Ordering::Equal => a,
    }
}

fn lesser(a: Decimal, b: Decimal) -> Decimal {
    match a.cmp(&b) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal if b.scale() > a.scale() => b,
        std::cmp::Ordering::Equal => a,
    }
}

fn add(a: Decimal, b: Decimal, what: &'static str) -> Result<Decimal, Overflow> {
    a.checked_add(b).ok_or(Overflow(what))
}

impl Candle {
    /// A candle of the bucket of width `interval_ns` that `tick` falls in, holding just `tick`.
    pub fn new(tick: &Tick, interval_ns: i64) -> Result<Self, Overflow> {
        let start_ns = bucket_start(tick.event_time_ns, interval_ns);
        let size = tick.size.unwrap_or_default();
        Ok(Candle {
            start_ns,
            end_ns: start_ns.saturating_add(interval_ns),
            open: (tick.id(), tick.price),
            close: (tick.id(), tick.price),
            high: tick.price,
            low: tick.price,
            volume: size,
            turnover: tick
                .price
                .checked_mul(size)
                .ok_or(Overflow("price × size"))?,
            price_sum: tick.price,
            price_scale: tick.price.scale(),
            count: 1,
        })
    }

    /// A candle of `[start_ns, end_ns)` whose first and last ticks are `open` and `close` (id, price),
    /// with high and low from those two and no sums yet: for a store that aggregates the rest itself
    /// (PostgreSQL, in SQL) and then sets the public fields.
    pub fn spanning(
        start_ns: i64,
        end_ns: i64,
        open: (TickId, Decimal),
        close: (TickId, Decimal),
    ) -> Candle {
        Candle {
            start_ns,
            end_ns,
            open,
            close,
            high: greater(open.1, close.1),
            low: lesser(open.1, close.1),
            volume: Decimal::ZERO,
            turnover: Decimal::ZERO,
            price_sum: Decimal::ZERO,
            price_scale: 0,
            count: 0,
        }
    }

    /// Adds a tick of the same bucket. Order does not matter: open and close go by tick id.
    pub fn add(&mut self, tick: &Tick) -> Result<(), Overflow> {
        let one = Candle::new(tick, self.end_ns - self.start_ns)?;
        self.merge(&one)
    }

    /// Merges a candle of the same ticks' bucket or of a bucket inside this one (a 1 s candle into a
    /// 1 min one). The ticks of both must be distinct.
    pub fn merge(&mut self, other: &Candle) -> Result<(), Overflow> {
        let mut next = self.clone();
        if other.open.0 < next.open.0 {
            next.open = other.open;
        }
        if other.close.0 > next.close.0 {
            next.close = other.close;
        }
        next.high = greater(next.high, other.high);
        next.low = lesser(next.low, other.low);
        next.volume = add(next.volume, other.volume, "candle volume")?;
        next.turnover = add(next.turnover, other.turnover, "sum of price × size")?;
        next.price_sum = add(next.price_sum, other.price_sum, "sum of prices")?;
        next.price_scale = next.price_scale.max(other.price_scale);
        next.count += other.count;
        *self = next;
        Ok(())
    }

    /// This candle's sums as the candle of the wider bucket of width `interval_ns` holding it.
    pub fn widened(&self, interval_ns: i64) -> Candle {
        let start_ns = bucket_start(self.start_ns, interval_ns);
        Candle {
            start_ns,
            end_ns: start_ns.saturating_add(interval_ns),
            ..self.clone()
        }
    }

    /// Opening price.
    pub fn open(&self) -> Decimal {
        self.open.1
    }

    /// Closing price.
    pub fn close(&self) -> Decimal {
        self.close.1
    }

    /// The id of the first tick (least event time, then seq).
    pub fn open_id(&self) -> TickId {
        self.open.0
    }

    /// The id of the last tick.
    pub fn close_id(&self) -> TickId {
        self.close.0
    }

    /// The stored text form: `START(19 digits)|OPEN_ID|open|CLOSE_ID|close|high|low|volume|turnover|
    /// price_sum|price_scale|count` (ids as the 39 digits of a tick member). The start leads, so a
    /// candle's member sorts by time and names its bucket.
    pub fn encode(&self) -> String {
        format!(
            "{:019}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.start_ns.max(0),
            crate::member::encode_id(self.open.0),
            self.open.1,
            crate::member::encode_id(self.close.0),
            self.close.1,
            self.high,
            self.low,
            self.volume,
            self.turnover,
            self.price_sum,
            self.price_scale,
            self.count
        )
    }

    /// Parses [`encode`](Self::encode)'s form back, for a candle of `base`.
    pub fn decode(s: &str, base: Base) -> Result<Candle, String> {
        let bad = |what: &str| format!("rollup {s:?}: {what}");
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 12 {
            return Err(bad("not 12 fields"));
        }
        let dec = |i: usize| Decimal::from_str(f[i]).map_err(|_| bad("bad decimal"));
        let id = |i: usize| -> Result<TickId, String> {
            let t = f[i];
            if t.len() != crate::member::ID_LEN || !t.is_ascii() {
                return Err(bad("bad id"));
            }
            Ok(TickId {
                event_time_ns: t[..19].parse().map_err(|_| bad("bad id time"))?,
                seq: t[19..].parse().map_err(|_| bad("bad id seq"))?,
            })
        };
        let start_ns: i64 = f[0].parse().map_err(|_| bad("bad start"))?;
        Ok(Candle {
            start_ns,
            end_ns: start_ns.saturating_add(base.ns()),
            open: (id(1)?, dec(2)?),
            close: (id(3)?, dec(4)?),
            high: dec(5)?,
            low: dec(6)?,
            volume: dec(7)?,
            turnover: dec(8)?,
            price_sum: dec(9)?,
            price_scale: f[10].parse().map_err(|_| bad("bad scale"))?,
            count: f[11].parse().map_err(|_| bad("bad count"))?,
        })
    }
}

/// The candles that change when `new` ticks (all of one asset, each new, any order) are stored: for
/// each base, each bucket they fall in, `existing(base, bucket_start_ns)` merged with them. Returned in
/// base order, then time order.
pub fn fold_new(
    new: &[&Tick],
    mut existing: impl FnMut(Base, i64) -> Option<Candle>,
) -> Result<Vec<(Base, Candle)>, Overflow> {
    // Ticks into 1 s candles first, then each level from the one below: a batch's ticks are merged once.
    let mut level: std::collections::BTreeMap<i64, Candle> = Default::default();
    for t in new {
        let start = Base::Second.bucket(t.event_time_ns);
        match level.get_mut(&start) {
            Some(c) => c.add(t)?,
            None => {
                level.insert(start, Candle::new(t, Base::Second.ns())?);
            }
        }
    }
    let mut out = Vec::new();
    for base in Base::ALL {
        if base != Base::Second {
            let mut wider: std::collections::BTreeMap<i64, Candle> = Default::default();
            for c in level.values() {
                let w = c.widened(base.ns());
                match wider.get_mut(&w.start_ns) {
                    Some(acc) => acc.merge(&w)?,
                    None => {
                        wider.insert(w.start_ns, w);
                    }
                }
            }
            level = wider;
        }
        for (start, delta) in &level {
            let candle = match existing(base, *start) {
                Some(mut c) => {
                    c.merge(delta)?;
                    c
                }
                None => delta.clone(),
            };
            out.push((base, candle));
        }
    }
    Ok(out)
}

/// How long rollups are kept, per base, counted back from the asset's newest tick (bounded by the
/// writer's clock, as for raw ticks); `None` keeps them for ever. Separate from raw
/// [`Retention`](crate::Retention), which never removes a rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupRetention {
    /// Per base, in [`Base::ALL`] order.
    pub max_age: [Option<Duration>; 4],
}

impl Default for RollupRetention {
    /// 1 s candles for 7 days, 1 min for 400 days, 1 h and 1 d for ever: a year of daily or hourly
    /// candles outlives any sensible raw retention, and the 1 s level (up to 86,400 candles per asset and
    /// day) is bounded.
    fn default() -> Self {
        const DAY: u64 = 86_400;
        RollupRetention {
            max_age: [
                Some(Duration::from_secs(7 * DAY)),
                Some(Duration::from_secs(400 * DAY)),
                None,
                None,
            ],
        }
    }
}

impl RollupRetention {
    /// Keeps every rollup for ever.
    pub const FOREVER: RollupRetention = RollupRetention { max_age: [None; 4] };

    /// The age limit of `base` in whole seconds, 0 for none.
    pub fn max_age_secs(&self, base: Base) -> u64 {
        self.max_age[base.index()].map_or(0, |d| d.as_secs().max(1))
    }

    /// Parses `1s=7d,1m=400d,1h=forever`: bases not named keep their default.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = RollupRetention::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (base, age) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not BASE=AGE (e.g. 1s=7d)"))?;
            let base = Base::ALL
                .into_iter()
                .find(|b| b.label() == base)
                .ok_or_else(|| format!("{base:?} is not a base interval (1s, 1m, 1h, 1d)"))?;
            out.max_age[base.index()] = match age {
                "forever" => None,
                age => {
                    let secs = parse_age_secs(age).ok_or_else(|| {
                        format!("{age:?} is not a whole number of s, m, h or d, or \"forever\"")
                    })?;
                    Some(Duration::from_secs(secs))
                }
            };
        }
        Ok(out)
    }

    /// The first bucket start (ns) of `base` kept when the asset's newest tick is at `newest_ns` and
    /// the clock at `now_ns`; `None` keeps all.
    pub fn cutoff_ns(&self, base: Base, newest_ns: i64, now_ns: i64) -> Option<i64> {
        let age = self.max_age_secs(base);
        (age > 0).then(|| {
            // Whole seconds, as the Redis script counts.
            let newest_s = newest_ns.min(now_ns).div_euclid(1_000_000_000);
            newest_s
                .saturating_sub(i64::try_from(age).unwrap_or(i64::MAX))
                .saturating_mul(1_000_000_000)
        })
    }
}

fn parse_age_secs(s: &str) -> Option<u64> {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(unit).filter(|&s| s > 0)
}

/// A query for one page of an asset's rollups of one base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupQuery {
    /// The base.
    pub base: Base,
    /// Candles starting at or after this (ns).
    pub from_ns: i64,
    /// Candles starting before this (ns).
    pub to_ns: i64,
    /// Page size, clamped to `1..=`[`MAX_PAGE`](crate::MAX_PAGE).
    pub limit: usize,
}

/// One page of rollups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupPage {
    /// In time order.
    pub candles: Vec<Candle>,
    /// Where the next page starts (`from_ns` of the next query), when there are more.
    pub next: Option<i64>,
    /// The asset's write version when the page was read: every stored batch that changed the asset
    /// made it greater, and its live batch carries the version it made
    /// ([`LiveBatch::version`](crate::LiveBatch::version)), so a reader knows which live batches a page
    /// already holds.
    pub version: u64,
}

/// What a [`TickStore::rebuild_rollups`](crate::TickStore::rebuild_rollups) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildSummary {
    /// Days (UTC) recomputed.
    pub days: usize,
    /// Candles written, over all bases.
    pub candles: usize,
    /// Raw ticks read.
    pub ticks: u64,
    /// Start (ns) of each day that was being written to throughout every attempt, and so was left as
    /// it was (run again when it is quiet).
    pub busy: Vec<i64>,
}

/// All candles of every base computed from `ticks` (each once, any order) whose bucket starts after
/// `horizon_ns` (buckets at or below the horizon lost raw ticks to retention and are not recomputed).
pub fn from_raw<'a>(
    ticks: impl IntoIterator<Item = &'a Tick>,
    horizon_ns: Option<i64>,
) -> Result<Vec<(Base, Candle)>, Overflow> {
    let ticks: Vec<&Tick> = ticks.into_iter().collect();
    let all = fold_new(&ticks, |_, _| None)?;
    Ok(all
        .into_iter()
        .filter(|(_, c)| horizon_ns.is_none_or(|h| c.start_ns > h))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tick(t: i64, seq: u64, price: &str, size: Option<&str>) -> Tick {
        Tick {
            asset_id: "A".into(),
            price: d(price),
            size: size.map(d),
            event_time_ns: t,
            seq,
            source: String::new(),
        }
    }

    #[test]
    fn bases_divide_the_intervals_people_ask_for() {
        let s = 1_000_000_000;
        assert_eq!(Base::dividing(5 * s), Some(Base::Second));
        assert_eq!(Base::dividing(15 * 60 * s), Some(Base::Minute));
        assert_eq!(Base::dividing(4 * 3600 * s), Some(Base::Hour));
        assert_eq!(Base::dividing(7 * 86_400 * s), Some(Base::Day));
        assert_eq!(Base::dividing(90 * s), Some(Base::Second));
        assert_eq!(Base::dividing(s / 4), None);
        assert_eq!(Base::dividing(1_500_000_000), None);
        assert_eq!(Base::dividing(0), None);
    }

    #[test]
    fn candles_round_trip_through_their_text_form() {
        let mut c = Candle::new(
            &tick(1_700_000_000_123_456_789, 7, "101.25", Some("0.5")),
            Base::Minute.ns(),
        )
        .unwrap();
        c.add(&tick(1_700_000_000_000_000_001, 3, "99.125", None))
            .unwrap();
        let text = c.encode();
        assert_eq!(Candle::decode(&text, Base::Minute).unwrap(), c);
        assert_eq!(
            (c.open(), c.close(), c.count),
            (d("99.125"), d("101.25"), 2)
        );
        assert_eq!(
            (c.turnover, c.price_sum, c.price_scale),
            (d("50.625"), d("200.375"), 3)
        );
        for bad in ["", "1|2", &text.replace("|101.25|", "|x|")] {
            assert!(Candle::decode(bad, Base::Minute).is_err(), "{bad}");
        }
    }

    #[test]
    fn folding_is_the_same_in_any_grouping_and_order() {
        let s = 1_000_000_000;
        let ticks: Vec<Tick> = (0..500)
            .map(|i: i64| {
                tick(
                    i * s / 3 + 59 * s,
                    i as u64,
                    &format!("{}.{}", 100 + i % 7, i % 10),
                    (i % 3 != 0).then_some("0.25"),
                )
            })
            .collect();
        let all: Vec<&Tick> = ticks.iter().collect();
        let whole = fold_new(&all, |_, _| None).unwrap();
        // The same ticks in two batches, the second merged into the first's candles, reversed.
        let (a, b) = all.split_at(211);
        let first = fold_new(a, |_, _| None).unwrap();
        let mut rev: Vec<&Tick> = b.to_vec();
        rev.reverse();
        let second = fold_new(&rev, |base, start| {
            first
                .iter()
                .find(|(b2, c)| *b2 == base && c.start_ns == start)
                .map(|(_, c)| c.clone())
        })
        .unwrap();
        let mut merged: Vec<(Base, Candle)> = first
            .into_iter()
            .filter(|(b1, c)| {
                !second
                    .iter()
                    .any(|(b2, c2)| b1 == b2 && c.start_ns == c2.start_ns)
            })
            .chain(second.clone())
            .collect();
        merged.sort_by_key(|(b, c)| (*b, c.start_ns));
        assert_eq!(merged, whole);
        assert_eq!(whole.iter().filter(|(b, _)| *b == Base::Day).count(), 1);
        let day = &whole.iter().find(|(b, _)| *b == Base::Day).unwrap().1;
        assert_eq!(day.count, 500);
    }

    #[test]
    fn retention_parses_and_rejects() {
        let r = RollupRetention::parse("1s=2d, 1h=30d,1d=forever").unwrap();
        assert_eq!(r.max_age_secs(Base::Second), 2 * 86_400);
        assert_eq!(r.max_age_secs(Base::Minute), 400 * 86_400);
        assert_eq!(r.max_age_secs(Base::Hour), 30 * 86_400);
        assert_eq!(r.max_age_secs(Base::Day), 0);
        // What the operator renders from spec.store.rollupRetention (seconds; 0 is forever).
        let r = RollupRetention::parse("1s=86400s,1m=0s,1d=forever");
        assert!(
            r.is_err(),
            "0s is not an age: the operator renders 0 as forever"
        );
        let r = RollupRetention::parse("1s=86400s,1d=forever").unwrap();
        assert_eq!(r.max_age_secs(Base::Second), 86_400);
        assert_eq!(r.max_age_secs(Base::Day), 0);
        for bad in ["1s", "2s=1d", "1s=1x", "1s=0d", "1s=-1d"] {
            assert!(RollupRetention::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Exact arithmetic over ticks: intervals, candles, simple moving average and VWAP. No `f64` anywhere:
//! prices are [`Decimal`]s and so is everything computed from them.
//!
//! Division (averages) is the only inexact step: a quotient is rounded half-to-even to
//! [`AVG_EXTRA_DP`] more decimal places than the most precise input (at most 28), then trailing zeros
//! are dropped — so `[100, 101, 99, 102, 98]` averages to exactly `100`.

use rust_decimal::{Decimal, RoundingStrategy};
use tickfleet_proto::Tick;
use tickfleet_service::{Error as DurationError, parse_duration_ns};
use tickfleet_store::{Base, Overflow as StoreOverflow};

/// Decimal places an average keeps beyond its most precise input.
pub const AVG_EXTRA_DP: u32 = 8;

/// The longest candle interval served from raw ticks (one that is not a whole number of seconds).
pub const MAX_INTERVAL_NS: i64 = 86_400 * 1_000_000_000;

/// The longest candle interval served from rollups (a whole number of seconds).
pub const MAX_ROLLUP_INTERVAL_NS: i64 = 366 * MAX_INTERVAL_NS;

/// Parses an interval such as `1s`, `5s`, `1m`, `15m`, `4h`, `1d`, `7d` or `250ms` into nanoseconds: a
/// duration ([`parse_duration_ns`]) more than 0 and, for a whole number of seconds (served from
/// rollups), at most [`MAX_ROLLUP_INTERVAL_NS`], else at most [`MAX_INTERVAL_NS`].
pub fn parse_interval(s: &str) -> Result<i64, String> {
    match parse_duration_ns(s) {
        Ok(ns) if ns > 0 && ns <= MAX_INTERVAL_NS => Ok(ns),
        Ok(ns) if ns > 0 && ns <= MAX_ROLLUP_INTERVAL_NS && Base::dividing(ns).is_some() => Ok(ns),
        Err(DurationError::DurationUnit(_)) => Err(format!(
            "interval {s:?} is not a whole number followed by ms, s, m, h or d (e.g. 1s, 5m, 1h)"
        )),
        Err(DurationError::DurationNumber(_)) => {
            Err(format!("interval {s:?} has no number (e.g. 1s, 5m, 1h)"))
        }
        _ => Err(format!(
            "interval {s:?} must be more than 0 and at most 366d (at most 1d unless a whole number of seconds)"
        )),
    }
}

pub use tickfleet_store::rollup::bucket_start;

/// Why candles or an average could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalcError {
    /// An arithmetic overflow (`Decimal` holds 96-bit integers; sums of huge values can exceed it).
    #[error("decimal overflow computing the {0}")]
    Overflow(&'static str),
    /// The range holds more candles than the caller allows.
    #[error("the range holds more than {0} candles")]
    TooManyCandles(usize),
}

use CalcError::Overflow;

/// One candle being built from ticks (or rollup candles) given in any order, each exactly once: the
/// store's [`Candle`], so a candle computed here from raw ticks and one kept by the store at write time
/// are the same arithmetic.
pub use tickfleet_store::Candle as CandleAcc;

impl From<StoreOverflow> for CalcError {
    fn from(o: StoreOverflow) -> Self {
        CalcError::Overflow(o.0)
    }
}

/// Candles built from ticks (or smaller rollup candles) fed one at a time (page by page from the store),
/// holding only the candles themselves: memory grows with the number of candles (at most `max`), never
/// with the number of ticks.
///
/// Ticks may come in any order, each once; in tick-id order (as the store pages them) each tick costs
/// O(1), as only the newest candle is touched.
#[derive(Debug, Clone)]
pub struct CandleSeries {
    interval_ns: i64,
    max: usize,
    /// In time order; the last one is the newest.
    candles: Vec<CandleAcc>,
}

impl CandleSeries {
    /// An empty series of candles `interval_ns` wide, of at most `max` candles.
    pub fn new(interval_ns: i64, max: usize) -> Self {
        CandleSeries {
            interval_ns,
            max,
            candles: Vec::new(),
        }
    }

    /// Adds one tick; fails on overflow or when it would start candle number `max + 1`.
    pub fn add(&mut self, tick: &Tick) -> Result<(), CalcError> {
        self.merge(&CandleAcc::new(tick, self.interval_ns)?)
    }

    /// Adds the ticks of a candle whose bucket lies inside one of this series' (a 1 s rollup candle
    /// into 5 s candles); fails like [`add`](Self::add).
    pub fn merge(&mut self, part: &CandleAcc) -> Result<(), CalcError> {
        let start = bucket_start(part.start_ns, self.interval_ns);
        let at = match self.candles.last() {
            Some(last) if last.start_ns == start => self.candles.len() - 1,
            Some(last) if last.start_ns < start => self.candles.len(),
            None => 0,
            Some(_) => match self.candles.binary_search_by_key(&start, |c| c.start_ns) {
                Ok(i) => i,
                Err(i) => i,
            },
        };
        let full = self.candles.len() >= self.max;
        match self.candles.get_mut(at) {
            Some(c) if c.start_ns == start => Ok(c.merge(part)?),
            _ if full => Err(CalcError::TooManyCandles(self.max)),
            _ => {
                self.candles.insert(at, part.widened(self.interval_ns));
                Ok(())
            }
        }
    }

    /// Adds a page of ticks.
    pub fn extend<'a>(
        &mut self,
        ticks: impl IntoIterator<Item = &'a Tick>,
    ) -> Result<(), CalcError> {
        ticks.into_iter().try_for_each(|t| self.add(t))
    }

    /// The candles, in time order; empty buckets have no candle.
    pub fn finish(self) -> Vec<CandleAcc> {
        self.candles
    }
}

/// Candles of `ticks` (any order, each once) in buckets of `interval_ns`, in time order; empty buckets
/// have no candle.
pub fn candles<'a>(
    ticks: impl IntoIterator<Item = &'a Tick>,
    interval_ns: i64,
) -> Result<Vec<CandleAcc>, CalcError> {
    let mut series = CandleSeries::new(interval_ns, usize::MAX);
    series.extend(ticks)?;
    Ok(series.finish())
}

/// Simple moving average and VWAP of some ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Average {
    /// Mean price.
    pub sma: Decimal,
    /// Σ(price·size)/Σsize over ticks with a size, when that sum is not 0.
    pub vwap: Option<Decimal>,
    /// Ticks averaged.
    pub count: u64,
    /// Event time of the oldest tick averaged (ns).
    pub from_ns: i64,
    /// Event time of the newest tick averaged (ns).
    pub to_ns: i64,
}

/// The running sums of an average, fed one tick at a time (page by page): constant memory whatever
/// the number of ticks.
#[derive(Debug, Clone, Default)]
pub struct AverageAcc {
    sum: Decimal,
    pv: Decimal,
    volume: Decimal,
    price_dp: u32,
    count: u64,
    from_ns: i64,
    to_ns: i64,
}

impl AverageAcc {
    /// Adds one tick.
    pub fn add(&mut self, t: &Tick) -> Result<(), CalcError> {
        self.sum = self
            .sum
            .checked_add(t.price)
            .ok_or(Overflow("sum of prices"))?;
        self.price_dp = self.price_dp.max(t.price.scale());
        if let Some(size) = t.size {
            let v = t.price.checked_mul(size).ok_or(Overflow("price × size"))?;
            self.pv = self
                .pv
                .checked_add(v)
                .ok_or(Overflow("sum of price × size"))?;
            self.volume = self
                .volume
                .checked_add(size)
                .ok_or(Overflow("sum of sizes"))?;
        }
        if self.count == 0 || t.event_time_ns < self.from_ns {
            self.from_ns = t.event_time_ns;
        }
        if self.count == 0 || t.event_time_ns > self.to_ns {
            self.to_ns = t.event_time_ns;
        }
        self.count += 1;
        Ok(())
    }

    /// Adds every tick of a rollup candle, from its sums.
    pub fn merge(&mut self, c: &CandleAcc) -> Result<(), CalcError> {
        self.sum = self
            .sum
            .checked_add(c.price_sum)
            .ok_or(Overflow("sum of prices"))?;
        self.price_dp = self.price_dp.max(c.price_scale);
        self.pv = self
            .pv
            .checked_add(c.turnover)
            .ok_or(Overflow("sum of price × size"))?;
        self.volume = self
            .volume
            .checked_add(c.volume)
            .ok_or(Overflow("sum of sizes"))?;
        let (first, last) = (c.open_id().event_time_ns, c.close_id().event_time_ns);
        if self.count == 0 || first < self.from_ns {
            self.from_ns = first;
        }
        if self.count == 0 || last > self.to_ns {
            self.to_ns = last;
        }
        self.count += c.count;
        Ok(())
    }

    /// Adds the ticks summed in another accumulator.
    pub fn absorb(&mut self, o: &AverageAcc) -> Result<(), CalcError> {
        if o.count == 0 {
            return Ok(());
        }
        self.sum = self
            .sum
            .checked_add(o.sum)
            .ok_or(Overflow("sum of prices"))?;
        self.pv = self
            .pv
            .checked_add(o.pv)
            .ok_or(Overflow("sum of price × size"))?;
        self.volume = self
            .volume
            .checked_add(o.volume)
            .ok_or(Overflow("sum of sizes"))?;
        self.price_dp = self.price_dp.max(o.price_dp);
        if self.count == 0 || o.from_ns < self.from_ns {
            self.from_ns = o.from_ns;
        }
        if self.count == 0 || o.to_ns > self.to_ns {
            self.to_ns = o.to_ns;
        }
        self.count += o.count;
        Ok(())
    }

    /// The average; `None` when no tick was added.
    pub fn finish(&self) -> Result<Option<Average>, CalcError> {
        if self.count == 0 {
            return Ok(None);
        }
        let sma = divide(self.sum, Decimal::from(self.count), self.price_dp)?;
        let vwap = if self.volume.is_zero() {
            None
        } else {
            Some(divide(self.pv, self.volume, self.price_dp)?)
        };
        Ok(Some(Average {
            sma,
            vwap,
            count: self.count,
            from_ns: self.from_ns,
            to_ns: self.to_ns,
        }))
    }
}

/// Averages `ticks`; `None` when there are none.
pub fn average(ticks: &[Tick]) -> Result<Option<Average>, CalcError> {
    let mut acc = AverageAcc::default();
    ticks.iter().try_for_each(|t| acc.add(t))?;
    acc.finish()
}

/// `a / b` rounded half-to-even to `dp + AVG_EXTRA_DP` places, trailing zeros dropped.
fn divide(a: Decimal, b: Decimal, dp: u32) -> Result<Decimal, CalcError> {
    let q = a.checked_div(b).ok_or(Overflow("average"))?;
    Ok(q.round_dp_with_strategy(
        (dp + AVG_EXTRA_DP).min(28),
        RoundingStrategy::MidpointNearestEven,
    )
    .normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

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
    fn intervals_parse_and_reject_what_they_should() {
        assert_eq!(parse_interval("1s"), Ok(1_000_000_000));
        assert_eq!(parse_interval("5m"), Ok(300_000_000_000));
        assert_eq!(parse_interval("1h"), Ok(3_600_000_000_000));
        assert_eq!(parse_interval("250ms"), Ok(250_000_000));
        assert_eq!(parse_interval("1d"), Ok(MAX_INTERVAL_NS));
        // Longer intervals are served from rollups, so they must be whole seconds.
        assert_eq!(parse_interval("7d"), Ok(7 * MAX_INTERVAL_NS));
        assert_eq!(parse_interval("366d"), Ok(MAX_ROLLUP_INTERVAL_NS));
        for bad in [
            "",
            "s",
            "0s",
            "1",
            "1x",
            "-1s",
            "1.5s",
            "367d",
            "86400001ms",
            "99999999999999999999h",
            "1 s",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_moving_average_of_the_issue_example_is_exactly_100() {
        let ticks: Vec<Tick> = ["100", "101", "99", "102", "98"]
            .iter()
            .enumerate()
            .map(|(i, p)| tick(i as i64, i as u64, p, None))
            .collect();
        let avg = average(&ticks).unwrap().unwrap();
        assert_eq!(avg.sma.to_string(), "100");
        assert_eq!(avg.vwap, None);
        assert_eq!(avg.count, 5);
    }

    #[test]
    fn averages_round_half_to_even_at_a_documented_place() {
        // 1/3 with 2-dp inputs: 2 + 8 = 10 places.
        let ticks = [
            tick(1, 1, "0.01", None),
            tick(2, 2, "0", None),
            tick(3, 3, "0", None),
        ];
        // Prices must be > 0 in real data; the arithmetic does not care.
        assert_eq!(
            average(&ticks).unwrap().unwrap().sma.to_string(),
            "0.0033333333"
        );
    }

    #[test]
    fn vwap_uses_only_ticks_with_a_size() {
        let ticks = [
            tick(1, 1, "10", Some("1")),
            tick(2, 2, "20", Some("3")),
            tick(3, 3, "1000", None),
        ];
        let avg = average(&ticks).unwrap().unwrap();
        assert_eq!(avg.vwap.unwrap().to_string(), "17.5"); // (10 + 60) / 4
        assert_eq!(avg.sma.to_string(), "343.33333333"); // 1030 / 3 to 8 places
        let zero = [tick(1, 1, "10", Some("0"))];
        assert_eq!(average(&zero).unwrap().unwrap().vwap, None);
        assert_eq!(average(&[]).unwrap(), None);
    }

    #[test]
    fn candles_are_exact_whatever_the_order_of_their_ticks() {
        let s = 1_000_000_000;
        let ticks = vec![
            tick(10 * s + 1, 1, "100", Some("1")),
            tick(10 * s + 5, 2, "105", Some("2")),
            tick(10 * s + 7, 3, "95", None),
            tick(10 * s + 9, 4, "101", Some("0.5")),
            tick(11 * s, 5, "200", None),
            tick(13 * s + 3, 6, "7", Some("1")),
        ];
        let mut shuffled = ticks.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        for input in [&ticks, &shuffled] {
            let c = candles(input.iter(), s).unwrap();
            assert_eq!(c.len(), 3, "no candle for the empty 12 s bucket");
            assert_eq!((c[0].start_ns, c[0].end_ns), (10 * s, 11 * s));
            assert_eq!(
                (c[0].open(), c[0].high, c[0].low, c[0].close()),
                (d("100"), d("105"), d("95"), d("101"))
            );
            assert_eq!((c[0].volume, c[0].count), (d("3.5"), 4));
            assert_eq!(
                (c[1].start_ns, c[1].open(), c[1].volume),
                (11 * s, d("200"), d("0"))
            );
            assert_eq!(
                (c[2].start_ns, c[2].close(), c[2].count),
                (13 * s, d("7"), 1)
            );
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let max = Decimal::MAX.to_string();
        let ticks = [tick(1, 1, &max, Some(&max)), tick(2, 2, &max, Some(&max))];
        assert!(average(&ticks).is_err());
        assert!(candles(ticks.iter(), 10).is_err());
    }

    #[test]
    fn a_series_fed_page_by_page_equals_one_computed_at_once_and_stops_at_its_limit() {
        let s = 1_000_000_000;
        let ticks: Vec<Tick> = (0..1000)
            .map(|i| {
                tick(
                    i * s / 7,
                    i as u64,
                    &format!("{}.{}", 100 + i % 13, i % 10),
                    Some("0.5"),
                )
            })
            .collect();
        let whole = candles(ticks.iter(), s).unwrap();
        assert_eq!(whole.len(), 143);
        let mut series = CandleSeries::new(s, 143);
        for page in ticks.chunks(64) {
            series.extend(page).unwrap();
        }
        assert_eq!(series.finish(), whole);
        // Out of order too (a late tick for an older candle).
        let mut reversed = CandleSeries::new(s, 143);
        reversed.extend(ticks.iter().rev()).unwrap();
        assert_eq!(reversed.finish(), whole);
        let mut capped = CandleSeries::new(s, 142);
        assert_eq!(capped.extend(&ticks), Err(CalcError::TooManyCandles(142)));
        let mut acc = AverageAcc::default();
        for page in ticks.chunks(64) {
            page.iter().try_for_each(|t| acc.add(t)).unwrap();
        }
        let avg = acc.finish().unwrap().unwrap();
        assert_eq!(Some(avg.clone()), average(&ticks).unwrap());
        assert_eq!((avg.count, avg.from_ns, avg.to_ns), (1000, 0, 999 * s / 7));
    }
}

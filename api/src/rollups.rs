//! Reading the store's write-time rollups: candles page by page, and window averages covered by as few
//! rollup candles as fit.

use tickfleet_store::{Base, Candle as Rollup, RollupQuery};
use tonic::Status;

use crate::calc::{self, AverageAcc};
use crate::service::{Api, calc_error};

impl Api {
    /// Feeds every rollup candle of `base` of `asset_id` starting in `[from, to)`, in time order, to
    /// `fold`, one page at a time; returns the write versions of the first and the last page.
    pub(crate) async fn fold_rollups(
        &self,
        asset_id: &str,
        base: Base,
        from: i64,
        to: i64,
        mut fold: impl FnMut(&[Rollup]) -> Result<(), Status>,
    ) -> Result<(u64, u64), Status> {
        let mut q = RollupQuery {
            base,
            from_ns: from,
            to_ns: to,
            limit: tickfleet_store::MAX_PAGE,
        };
        let mut first = None;
        loop {
            let page = self
                .store_call("rollups", self.store.rollups(asset_id, &q))
                .await?;
            let first = *first.get_or_insert(page.version);
            fold(&page.candles)?;
            match page.next {
                Some(next) => q.from_ns = next,
                None => return Ok((first, page.version)),
            }
        }
    }

    /// Adds every tick of `asset_id` in `[from, to)` to `acc`, where no stored tick is newer than
    /// `to - 1`: whole rollup candles where they fit, raw ticks only for the part of the oldest second
    /// that the window cuts.
    pub(crate) async fn window_average(
        &self,
        asset_id: &str,
        from: i64,
        to: i64,
        acc: &mut AverageAcc,
    ) -> Result<(), Status> {
        let second = Base::Second.ns();
        let ceil = |t: i64| match calc::bucket_start(t, second) {
            s if s == t => t,
            s => s.saturating_add(second),
        };
        let (first_whole, end) = (ceil(from), ceil(to));
        let mut raw = AverageAcc::default();
        let mut add = |page: &[Rollup]| {
            page.iter()
                .try_for_each(|c| acc.merge(c))
                .map_err(calc_error)
        };
        if first_whole > from {
            // The second holding `from`: whole if it starts inside the window, else only part of it.
            let cut = first_whole - second;
            let mut partial = None;
            self.fold_rollups(asset_id, Base::Second, cut, first_whole, |page| {
                partial = page.first().cloned();
                Ok(())
            })
            .await?;
            match partial {
                Some(c) if c.open_id().event_time_ns >= from && first_whole <= end => {
                    add(std::slice::from_ref(&c))?
                }
                Some(c) if c.close_id().event_time_ns >= from => {
                    self.fold_range(asset_id, from, first_whole.min(to), |page| {
                        page.iter().try_for_each(|t| raw.add(t)).map_err(calc_error)
                    })
                    .await?;
                }
                _ => {}
            }
        }
        for (base, a, z) in ladder(first_whole, end) {
            self.fold_rollups(asset_id, base, a, z, &mut add).await?;
        }
        acc.absorb(&raw).map_err(calc_error)
    }
}

/// `[from, to)` (whole seconds) as runs of rollup buckets, each run of one base, as few candles as fit:
/// 1 s candles up to the first whole minute, minutes up to the first whole hour, … and down again.
pub(crate) fn ladder(from: i64, to: i64) -> Vec<(Base, i64, i64)> {
    let fits = |b: Base, at: i64| at % b.ns() == 0 && at.saturating_add(b.ns()) <= to;
    let mut out: Vec<(Base, i64, i64)> = Vec::new();
    let mut at = from;
    while at < to {
        let base = Base::ALL
            .into_iter()
            .rev()
            .find(|b| fits(*b, at))
            .unwrap_or(Base::Second);
        let next = at.saturating_add(base.ns());
        match out.last_mut() {
            Some((b, _, z)) if *b == base && *z == at => *z = next,
            _ => out.push((base, at, next)),
        }
        at = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_covers_its_range_with_few_candles() {
        let s = Base::Second.ns();
        let from = 86_400 * s * 100 + 3_599 * s - 5 * s; // 5 s before 01:00 minus an hour's tail
        let to = from + 2 * 86_400 * s + 7 * s;
        let runs = ladder(from, to);
        let mut at = from;
        let mut candles = 0;
        for (base, a, z) in &runs {
            assert_eq!(*a, at, "contiguous");
            assert_eq!((z - a) % base.ns(), 0);
            assert_eq!(a % base.ns(), 0, "aligned");
            candles += (z - a) / base.ns();
            at = *z;
        }
        assert_eq!(at, to);
        assert!(
            candles < 2 * (60 + 60 + 24) + 2,
            "{candles} candles: {runs:?}"
        );
        assert_eq!(ladder(0, 5 * s), vec![(Base::Second, 0, 5 * s)]);
        assert!(ladder(7 * s, 7 * s).is_empty());
    }
}

//! `tickctl verify`: audits the store against a `tickctl produce` report.
//!
//! For every asset in the report it reads all stored ticks (in stored order: event time, then sequence)
//! and checks that the sequence numbers are exactly `first_seq..=last_seq`: none missing (lost), none
//! twice (duplicated), and never decreasing along the stored order (order kept).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tickfleet_store::{RangeQuery, Retention, TickStore};

use crate::out::sayln;
use crate::produce::Report;

/// Options of `tickctl verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The JSON report written by `tickctl produce --report`.
    #[arg(long)]
    report: PathBuf,
    /// The store.
    #[command(flatten)]
    store: tickfleet_store::StoreOptions,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The outcome of an audit.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Audit {
    /// Assets in the report.
    pub assets: usize,
    /// Ticks the report says were produced.
    pub expected: u64,
    /// Ticks of those assets found in the store.
    pub stored: u64,
    /// Produced sequence numbers missing from the store.
    pub lost: u64,
    /// Stored ticks whose sequence number was already seen for the asset.
    pub duplicated: u64,
    /// Places where the sequence number went down along the stored order.
    pub out_of_order: u64,
    /// Stored ticks with sequence numbers outside the report's range.
    pub unexpected: u64,
    /// The first few problems, for people.
    pub problems: Vec<String>,
}

impl Audit {
    /// No loss, no duplicate, order kept, nothing unexpected.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Checks `store` against `report`.
pub async fn audit(report: &Report, store: &dyn TickStore) -> anyhow::Result<Audit> {
    let mut audit = Audit {
        assets: report.assets.len(),
        ..Audit::default()
    };
    for (asset, expect) in &report.assets {
        audit.expected += expect.count;
        let span = (expect.last_seq + 1).saturating_sub(expect.first_seq) as usize;
        let mut seen = vec![false; span];
        let mut previous: Option<u64> = None;
        let mut query = RangeQuery::all(tickfleet_store::MAX_PAGE);
        loop {
            let page = store.range(asset, &query).await?;
            for tick in &page.ticks {
                audit.stored += 1;
                if let Some(prev) = previous
                    && tick.seq < prev
                {
                    audit.out_of_order += 1;
                    audit.problem(format!("{asset}: seq {} stored after seq {prev}", tick.seq));
                }
                previous = Some(tick.seq);
                let Some(slot) = tick
                    .seq
                    .checked_sub(expect.first_seq)
                    .and_then(|i| seen.get_mut(i as usize))
                else {
                    audit.unexpected += 1;
                    audit.problem(format!("{asset}: unexpected seq {}", tick.seq));
                    continue;
                };
                if *slot {
                    audit.duplicated += 1;
                    audit.problem(format!("{asset}: seq {} stored twice", tick.seq));
                }
                *slot = true;
            }
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        let missing = seen.iter().filter(|s| !**s).count() as u64;
        if missing > 0 {
            audit.lost += missing;
            let first = seen.iter().position(|s| !*s).unwrap_or(0) as u64 + expect.first_seq;
            audit.problem(format!(
                "{asset}: {missing} ticks missing (first: seq {first})"
            ));
        }
    }
    Ok(audit)
}

/// Prints an audit for people.
pub fn print(audit: &Audit) {
    sayln!(
        "verify: {} assets, {} expected, {} stored: {} lost, {} duplicated, {} out of order, {} unexpected -> {}",
        audit.assets,
        audit.expected,
        audit.stored,
        audit.lost,
        audit.duplicated,
        audit.out_of_order,
        audit.unexpected,
        if audit.is_clean() { "OK" } else { "FAILED" }
    );
    for p in &audit.problems {
        sayln!("  {p}");
    }
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read(&args.report)
        .with_context(|| format!("reading {}", args.report.display()))?;
    let report: Report = serde_json::from_slice(&text)
        .with_context(|| format!("parsing {}", args.report.display()))?;
    if report.failed > 0 {
        anyhow::bail!(
            "the report records {} unacknowledged ticks; it cannot be verified",
            report.failed
        );
    }
    let store = args.store.open(Retention::default())?;
    let audit = audit(&report, &store).await?;
    if args.json {
        sayln!("{}", serde_json::to_string_pretty(&audit)?);
    } else {
        print(&audit);
    }
    Ok(if audit.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::produce::{AssetReport, Generator};
    use tickfleet_store::MemoryStore;

    fn report_of(ticks: &[tickfleet_store::Tick]) -> Report {
        let mut r = Report::default();
        for t in ticks {
            let a = r.assets.entry(t.asset_id.clone()).or_insert(AssetReport {
                count: 0,
                first_seq: t.seq,
                last_seq: 0,
            });
            a.count += 1;
            a.last_seq = t.seq;
        }
        r
    }

    #[tokio::test]
    async fn clean_store_passes_and_every_defect_is_counted() {
        let mut g = Generator::new(4, "V", 3);
        let ticks: Vec<_> = (0..400).map(|_| g.next_tick()).collect();
        let report = report_of(&ticks);

        let store = MemoryStore::new();
        store.write_batch(&ticks).await.unwrap();
        let a = audit(&report, &store).await.unwrap();
        assert!(a.is_clean(), "{a:?}");
        assert_eq!((a.expected, a.stored), (400, 400));

        // Lose 3 ticks.
        let store = MemoryStore::new();
        store.write_batch(&ticks[3..]).await.unwrap();
        let a = audit(&report, &store).await.unwrap();
        assert_eq!((a.lost, a.duplicated, a.out_of_order), (3, 0, 0));
        assert!(!a.is_clean());

        // A tick stored twice under a different time (a non-idempotent writer would do this).
        let store = MemoryStore::new();
        store.write_batch(&ticks).await.unwrap();
        let mut dup = ticks[10].clone();
        dup.event_time_ns += 1;
        store.write_batch(&[dup]).await.unwrap();
        let a = audit(&report, &store).await.unwrap();
        // One nanosecond later still sorts right after the original: a duplicate, not a reordering.
        assert_eq!((a.lost, a.duplicated, a.out_of_order), (0, 1, 0));

        // Order broken: a later seq stored with an earlier time.
        let store = MemoryStore::new();
        let mut swapped = ticks.clone();
        let (i, j) = {
            let first = &swapped[0].asset_id;
            let j = swapped.iter().rposition(|t| &t.asset_id == first).unwrap();
            (0, j)
        };
        let (ti, tj) = (swapped[i].event_time_ns, swapped[j].event_time_ns);
        swapped[i].event_time_ns = tj;
        swapped[j].event_time_ns = ti;
        store.write_batch(&swapped).await.unwrap();
        let a = audit(&report, &store).await.unwrap();
        assert_eq!(a.lost + a.duplicated, 0);
        assert!(a.out_of_order >= 1, "{a:?}");
    }
}

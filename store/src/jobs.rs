//! Provider polling jobs and what their runners share: the [`JobStore`] trait, with [`RedisJobs`]
//! (production: every api and connector replica sees the same jobs, locks and quotes) and
//! [`MemoryJobs`] (unit tests, the embedded demo).
//!
//! * **Jobs** `{id, provider, symbols, interval}` are created and deleted through the api and read by
//!   the connectors' job runners.
//! * **Leases.** Each (provider, symbol) pair is polled by one runner at a time: it holds the pair's
//!   lease, a lock with a TTL that its holder renews. Taking a free lease draws a *fencing token* from a
//!   counter that only grows (Redis `INCR`), so every holding has a token greater than any before it.
//! * **Commits are fenced.** What a poll found is [`commit`](JobStore::commit)ted only if the caller still
//!   holds the lease with that token: the raw response is kept (the last [`RAW_KEPT`] per pair, each
//!   with an id), the quote cached with a TTL (what `GET /v1/prices/latest?provider=` reads), and, when
//!   the price is new, the pair's next tick is recorded as *pending* with the next sequence number. A
//!   stale holder (its lease expired and was taken over) is refused and produces nothing.
//! * **Nothing lost, nothing doubled.** A runner produces the pending tick to Kafka and then marks it
//!   [`produced`](JobStore::produced). A runner that takes a lease over first produces the pair's pending
//!   tick, if any (its holder may have died between the commit and the Kafka acknowledgement): the same
//!   tick, same sequence number, so the store keeps it once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{StoreError, Tick};

pub use crate::redis::RedisJobs;

/// The providers a job may name (`tickfleet-connector poll` implements each).
pub const PROVIDERS: &[&str] = &["finnhub", "alphavantage", "yahoo"];

/// Raw responses kept per (provider, symbol) pair (older ones are trimmed).
pub const RAW_KEPT: usize = 1000;

/// A polling job: poll `provider` for each of `symbols` every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollJob {
    /// The job's id (assigned by the api).
    pub id: String,
    /// The provider: `finnhub`, `alphavantage` or `yahoo`.
    pub provider: String,
    /// The provider's symbols, as the provider spells them (`AAPL`, `IBM`).
    pub symbols: Vec<String>,
    /// Time between two polls of one symbol, in milliseconds.
    pub interval_ms: u64,
    /// When the job was created, ns since the epoch.
    pub created_ns: i64,
}

/// A (provider, symbol) pair: what a lease covers and a quote is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    /// The provider.
    pub provider: String,
    /// The provider's symbol.
    pub symbol: String,
}

impl Pair {
    /// The pair of `provider` and `symbol`.
    pub fn new(provider: &str, symbol: &str) -> Self {
        Pair {
            provider: provider.to_owned(),
            symbol: symbol.to_owned(),
        }
    }
}

impl std::fmt::Display for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.provider, self.symbol)
    }
}

/// Who holds a pair's lease, with which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's id (one per runner process).
    pub holder: String,
    /// The fencing token drawn when the lease was taken.
    pub token: u64,
}

/// One provider answer, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The price, exact.
    pub price: Decimal,
    /// The provider's time of the price, ns since the epoch (for Alpha Vantage: the trading day).
    pub provider_time_ns: i64,
    /// The event time the tick gets: the provider's time when it is finer than a day, else the fetch time.
    pub event_time_ns: i64,
    /// When the response arrived, ns since the epoch.
    pub fetched_ns: i64,
    /// The response body, as received.
    pub raw: String,
}

/// The cached quote of a pair: the newest poll's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The provider.
    pub provider: String,
    /// The provider's symbol.
    pub symbol: String,
    /// The price, exact.
    pub price: Decimal,
    /// The price's time (the tick's event time), ns since the epoch.
    pub time_ns: i64,
    /// When it was fetched, ns since the epoch.
    pub fetched_ns: i64,
    /// The id of the raw response it came from.
    pub raw_id: String,
}

/// A tick a commit recorded and a runner has to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The tick (asset id = the symbol, source = the provider).
    pub tick: Tick,
    /// The raw response it came from.
    pub raw_id: String,
}

/// What a [`JobStore::commit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The caller no longer holds the lease with its token: nothing was written.
    Fenced,
    /// Kept and cached; the price is the one already produced (or pending).
    Unchanged {
        /// The raw response's id.
        raw_id: String,
    },
    /// Kept and cached, and a new price: this tick is now pending.
    New(Pending),
}

/// Where jobs, leases, cached quotes and raw responses live. Every method is one atomic step.
#[async_trait]
pub trait JobStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new job (its id must be new).
    async fn create_job(&self, job: &PollJob) -> Result<(), StoreError>;
    /// The job with this id.
    async fn job(&self, id: &str) -> Result<Option<PollJob>, StoreError>;
    /// Deletes a job; `false` when there was none.
    async fn delete_job(&self, id: &str) -> Result<bool, StoreError>;
    /// Every job, sorted by id.
    async fn jobs(&self) -> Result<Vec<PollJob>, StoreError>;

    /// Takes the pair's lease for `ttl` if nobody holds it: `Some(token)`, a token greater than any
    /// drawn before for this pair.
    async fn acquire(
        &self,
        pair: &Pair,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError>;
    /// Extends the lease by `ttl` if `lease` still holds it; `false` when it was lost.
    async fn renew(&self, pair: &Pair, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives the lease up if `lease` still holds it.
    async fn release(&self, pair: &Pair, lease: &Lease) -> Result<(), StoreError>;
    /// Who holds the pair's lease now.
    async fn holder(&self, pair: &Pair) -> Result<Option<Lease>, StoreError>;

    /// Records a poll's answer if `lease` still holds the pair (see the module docs); the quote is
    /// cached for `cache_ttl`.
    async fn commit(
        &self,
        pair: &Pair,
        lease: &Lease,
        observation: &Observation,
        cache_ttl: Duration,
    ) -> Result<Commit, StoreError>;
    /// The pair's tick that was committed and not yet marked produced.
    async fn pending(&self, pair: &Pair) -> Result<Option<Pending>, StoreError>;
    /// Marks the pending tick with `seq` as produced, if `lease` still holds the pair; `false` when
    /// fenced off (the next holder produces it again, which the store's idempotence absorbs).
    async fn produced(&self, pair: &Pair, lease: &Lease, seq: u64) -> Result<bool, StoreError>;

    /// The pair's cached quote, while its TTL lasts.
    async fn quote(&self, pair: &Pair) -> Result<Option<Quote>, StoreError>;
    /// A kept raw response of the pair, by id.
    async fn raw(&self, pair: &Pair, raw_id: &str) -> Result<Option<String>, StoreError>;
}

/// The tick of the pair's `seq`-th new price.
pub(crate) fn pair_tick(pair: &Pair, price: Decimal, event_time_ns: i64, seq: u64) -> Tick {
    Tick {
        asset_id: pair.symbol.clone(),
        price,
        size: None,
        event_time_ns,
        seq,
        source: pair.provider.clone(),
    }
}

#[derive(Debug, Default)]
struct PairState {
    lease: Option<(Lease, Instant)>,
    fence: u64,
    quote: Option<(Quote, Instant)>,
    raw: Vec<(String, String)>,
    raw_seq: u64,
    /// (price, provider time) of the last new price, its seq, and the pending tick
    last: Option<(Decimal, i64)>,
    seq: u64,
    pending: Option<Pending>,
}

impl PairState {
    fn lease_held(&self, lease: &Lease) -> bool {
        matches!(&self.lease, Some((l, until)) if l == lease && *until > Instant::now())
    }
}

/// [`JobStore`] in process memory (one process: unit tests and the embedded demo).
#[derive(Debug, Default)]
pub struct MemoryJobs {
    jobs: Mutex<HashMap<String, PollJob>>,
    pairs: Mutex<HashMap<Pair, PairState>>,
}

impl MemoryJobs {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_pair<T>(&self, pair: &Pair, f: impl FnOnce(&mut PairState) -> T) -> T {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        f(pairs.entry(pair.clone()).or_default())
    }
}

#[async_trait]
impl JobStore for MemoryJobs {
    async fn create_job(&self, job: &PollJob) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }
    async fn job(&self, id: &str) -> Result<Option<PollJob>, StoreError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(jobs.get(id).cloned())
    }
    async fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(jobs.remove(id).is_some())
    }
    async fn jobs(&self) -> Result<Vec<PollJob>, StoreError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<PollJob> = jobs.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn acquire(
        &self,
        pair: &Pair,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.with_pair(pair, |s| {
            if matches!(&s.lease, Some((_, until)) if *until > Instant::now()) {
                return None;
            }
            s.fence += 1;
            let lease = Lease {
                holder: holder.to_owned(),
                token: s.fence,
            };
            s.lease = Some((lease, Instant::now() + ttl));
            Some(s.fence)
        }))
    }
    async fn renew(&self, pair: &Pair, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.with_pair(pair, |s| {
            if !s.lease_held(lease) {
                return false;
            }
            s.lease = Some((lease.clone(), Instant::now() + ttl));
            true
        }))
    }
    async fn release(&self, pair: &Pair, lease: &Lease) -> Result<(), StoreError> {
        self.with_pair(pair, |s| {
            if s.lease_held(lease) {
                s.lease = None;
            }
        });
        Ok(())
    }
    async fn holder(&self, pair: &Pair) -> Result<Option<Lease>, StoreError> {
        Ok(self.with_pair(pair, |s| match &s.lease {
            Some((l, until)) if *until > Instant::now() => Some(l.clone()),
            _ => None,
        }))
    }

    async fn commit(
        &self,
        pair: &Pair,
        lease: &Lease,
        o: &Observation,
        cache_ttl: Duration,
    ) -> Result<Commit, StoreError> {
        Ok(self.with_pair(pair, |s| {
            if !s.lease_held(lease) {
                return Commit::Fenced;
            }
            s.raw_seq += 1;
            let raw_id = format!("{}-0", s.raw_seq);
            s.raw.push((raw_id.clone(), o.raw.clone()));
            if s.raw.len() > RAW_KEPT {
                s.raw.remove(0);
            }
            let price = o.price.normalize();
            s.quote = Some((
                Quote {
                    provider: pair.provider.clone(),
                    symbol: pair.symbol.clone(),
                    price,
                    time_ns: o.event_time_ns,
                    fetched_ns: o.fetched_ns,
                    raw_id: raw_id.clone(),
                },
                Instant::now() + cache_ttl,
            ));
            if s.last == Some((price, o.provider_time_ns)) {
                return Commit::Unchanged { raw_id };
            }
            s.last = Some((price, o.provider_time_ns));
            s.seq += 1;
            let pending = Pending {
                tick: pair_tick(pair, price, o.event_time_ns, s.seq),
                raw_id,
            };
            s.pending = Some(pending.clone());
            Commit::New(pending)
        }))
    }
    async fn pending(&self, pair: &Pair) -> Result<Option<Pending>, StoreError> {
        Ok(self.with_pair(pair, |s| s.pending.clone()))
    }
    async fn produced(&self, pair: &Pair, lease: &Lease, seq: u64) -> Result<bool, StoreError> {
        Ok(self.with_pair(pair, |s| {
            if !s.lease_held(lease) {
                return false;
            }
            if s.pending.as_ref().is_some_and(|p| p.tick.seq == seq) {
                s.pending = None;
            }
            true
        }))
    }

    async fn quote(&self, pair: &Pair) -> Result<Option<Quote>, StoreError> {
        Ok(self.with_pair(pair, |s| match &s.quote {
            Some((q, until)) if *until > Instant::now() => Some(q.clone()),
            _ => None,
        }))
    }
    async fn raw(&self, pair: &Pair, raw_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.with_pair(pair, |s| {
            s.raw
                .iter()
                .find(|(id, _)| id == raw_id)
                .map(|(_, body)| body.clone())
        }))
    }
}

//! Per-client rate limits: one token bucket per (route class, client), the same for the gRPC and the
//! REST api (REST handlers call the gRPC methods, which ask [`RateLimiter::check`] before any work).
//!
//! * **Client**: the value of the API key header when one is configured (`--rate-limit-key-header`)
//!   and the request carries it, else the peer's IP address (not its port: every connection has a new
//!   one). tickfleet does not verify keys: keying on them is meant for an api behind a gateway that
//!   authenticates them (behind such a proxy every request has the proxy's address). Clients are kept
//!   as keyed 64-bit hashes, never as the key itself.
//! * **Route class** ([`Class`]): cheap reads, range reads (ticks, candles, averages), stream opens and
//!   writes (jobs), each with its own rate and burst ([`Rate`], e.g. `100/s:200`) or none.
//! * **Bucket**: the generic cell rate algorithm, an exact token bucket kept as one number per client
//!   (the time its bucket will be full again). A refused call gets the time until one token is back
//!   (`retry-after`, whole seconds rounded up): RESOURCE_EXHAUSTED on gRPC, 429 with `Retry-After` on
//!   REST.
//! * **Memory** is bounded: a bucket that has refilled is the same as no bucket, so idle ones are
//!   dropped (swept every [`SWEEP_EVERY`] and whenever the table is full); at most `max_clients`
//!   buckets per class are kept, and while the table is full of active clients, new clients share one
//!   overflow bucket per class, so a flood of made-up client ids is limited as one client instead of
//!   growing the table or escaping the limit.
//!
//! Off by default: behind a load balancer or ingress every client has the proxy's address, so a
//! default per-address limit would throttle all clients together; the per-replica bounds of
//! [`crate::limits`] already protect the replica itself.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tonic::Status;

/// Default of [`RateLimits::max_clients`].
pub const MAX_CLIENTS: usize = 100_000;
/// How often idle buckets are dropped (also whenever a class's table is full).
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The gRPC metadata key (and REST header) a refusal carries: whole seconds to wait.
pub const RETRY_AFTER: &str = "retry-after";

/// A route class: the calls that share one rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Cheap reads: `GetLatest`, `BatchGetLatest`, `ListAssets`, `GetPollJob`, `GetQuote`.
    Reads,
    /// Reads over a range of ticks: `ListTicks`, `GetCandles`, `GetMovingAverage`.
    Ranges,
    /// Opening a live stream: `StreamTicks`, `StreamCandles` (and their SSE routes).
    Streams,
    /// Calls that change state (polling jobs): every other method.
    Writes,
}

impl Class {
    /// Every class, in the order of [`RateLimits::rates`].
    pub const ALL: [Class; 4] = [Class::Reads, Class::Ranges, Class::Streams, Class::Writes];

    /// The class of a gRPC method.
    pub fn of(method: &str) -> Class {
        match method {
            "GetLatest" | "BatchGetLatest" | "ListAssets" | "GetPollJob" | "GetQuote" => {
                Class::Reads
            }
            "ListTicks" | "GetCandles" | "GetMovingAverage" => Class::Ranges,
            "StreamTicks" | "StreamCandles" => Class::Streams,
            _ => Class::Writes,
        }
    }

    /// The metric label and the flag suffix (`--rate-limit-reads`).
    pub fn label(self) -> &'static str {
        match self {
            Class::Reads => "reads",
            Class::Ranges => "ranges",
            Class::Streams => "streams",
            Class::Writes => "writes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A rate and a burst: `COUNT/UNIT[:BURST]` with UNIT `s`, `m` or `h` (`100/s`, `600/m:50`); the
/// burst (most calls at once after an idle spell) defaults to COUNT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls per `per`.
    pub count: u32,
    /// The period of `count`.
    pub per: Duration,
    /// Bucket size.
    pub burst: u32,
}

impl Rate {
    /// Time for one token to come back.
    fn emission(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count)).max(1) as u64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            3600 => "h",
            60 => "m",
            _ => "s",
        };
        write!(f, "{}/{unit}:{}", self.count, self.burst)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected COUNT/UNIT[:BURST] (UNIT s, m or h), e.g. 100/s:200");
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        let burst = match burst {
            Some(b) => b.trim().parse().map_err(|_| bad())?,
            None => count,
        };
        if count == 0 || burst == 0 {
            return Err(format!(
                "{s:?}: COUNT and BURST must be at least 1 (use off for no limit)"
            ));
        }
        Ok(Rate { count, per, burst })
    }
}

/// Parses a flag value: `off` (or empty) for no limit, else a [`Rate`].
pub fn parse_rate(s: &str) -> Result<Option<Rate>, String> {
    match s.trim() {
        "" | "off" => Ok(None),
        s => s.parse().map(Some),
    }
}

/// The configuration of a [`RateLimiter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    /// The rate of each class (index: [`Class::ALL`]); `None` = not limited.
    pub rates: [Option<Rate>; 4],
    /// The API key header (lower-case) that names the client; unset = the peer address.
    pub key_header: Option<String>,
    /// Most buckets kept per class.
    pub max_clients: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            rates: [None; 4],
            key_header: None,
            max_clients: MAX_CLIENTS,
        }
    }
}

/// Who is calling, as the limiter knows them: a keyed hash of the API key or the peer IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allowed,
    /// Refused: retry after this long.
    Limited(Duration),
}

/// The limiter's metrics: `tickfleet_api_rate_limit_total{class,outcome}` (`allowed`, `limited`;
/// counted only for limited classes) and `tickfleet_api_rate_limit_clients{class}` (buckets kept).
#[derive(Clone, Debug)]
pub struct RateMetrics {
    decisions: IntCounterVec,
    clients: IntGaugeVec,
}

impl RateMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = RateMetrics {
            decisions: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_rate_limit_total",
                    "Rate-limit decisions of limited route classes, by class and outcome",
                ),
                &["class", "outcome"],
            )?,
            clients: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_api_rate_limit_clients",
                    "Token buckets held (clients seen recently), by route class",
                ),
                &["class"],
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.clients.clone()))?;
        Ok(m)
    }

    fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry")
    }
}

#[derive(Default)]
struct Table {
    /// Per client: when its bucket is full again (ns since the limiter's epoch).
    full_at: HashMap<ClientId, u64>,
    /// The shared bucket of new clients while the table is full.
    overflow: u64,
    last_sweep: u64,
}

/// The per-client token buckets of one api replica (cheap to clone: shared).
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    limits: RateLimits,
    tables: [Mutex<Table>; 4],
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    metrics: RateMetrics,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(RateLimits::default(), RateMetrics::unregistered())
    }
}

impl RateLimiter {
    /// A limiter with `limits`, counting into `metrics`.
    pub fn new(limits: RateLimits, metrics: RateMetrics) -> Self {
        Self::with_epoch(limits, metrics, Instant::now())
    }

    fn with_epoch(limits: RateLimits, metrics: RateMetrics, epoch: Instant) -> Self {
        let limits = RateLimits {
            max_clients: limits.max_clients.max(1),
            key_header: limits.key_header.map(|h| h.to_ascii_lowercase()),
            ..limits
        };
        RateLimiter {
            inner: Arc::new(Inner {
                limits,
                tables: Default::default(),
                hasher: Default::default(),
                epoch,
                metrics,
            }),
        }
    }

    /// The configuration.
    pub fn limits(&self) -> &RateLimits {
        &self.inner.limits
    }

    /// The client of a call: `key` (the API key header's value) when a key header is configured and
    /// the call carries it, else the peer's IP.
    pub fn client(&self, key: Option<&[u8]>, peer: Option<IpAddr>) -> ClientId {
        let mut h = self.inner.hasher.build_hasher();
        match (self.inner.limits.key_header.as_ref().and(key), peer) {
            (Some(key), _) => (0u8, key).hash(&mut h),
            (None, Some(ip)) => (1u8, ip).hash(&mut h),
            (None, None) => 2u8.hash(&mut h),
        }
        ClientId(h.finish())
    }

    /// The client of a gRPC call (REST calls carry theirs, see [`crate::rest::Caller`]).
    pub fn client_of<T>(&self, req: &tonic::Request<T>) -> ClientId {
        if let Some(id) = req.extensions().get::<ClientId>() {
            return *id;
        }
        let key = self
            .inner
            .limits
            .key_header
            .as_ref()
            .and_then(|h| req.metadata().get(h.as_str()))
            .map(|v| v.as_bytes());
        self.client(key, req.remote_addr().map(|a: SocketAddr| a.ip()))
    }

    /// Takes a token of `client`'s bucket of `class`: `Ok` when there was one, else
    /// RESOURCE_EXHAUSTED saying when to retry (also as `retry-after` metadata).
    #[allow(clippy::result_large_err)]
    pub fn check(&self, class: Class, client: ClientId) -> Result<(), Status> {
        let Some(rate) = self.inner.limits.rates[class.index()] else {
            return Ok(());
        };
        match self.decide(class, client, Instant::now()) {
            Decision::Allowed => Ok(()),
            Decision::Limited(wait) => {
                let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
                let mut status = Status::resource_exhausted(format!(
                    "rate limit of {} calls exceeded for this client ({rate}, --rate-limit-{}); retry in {secs} s",
                    class.label(),
                    class.label()
                ));
                status
                    .metadata_mut()
                    .insert(RETRY_AFTER, secs.to_string().parse().expect("digits"));
                Err(status)
            }
        }
    }

    /// The decision at `now` (the clock is a parameter so tests need no sleeps).
    pub fn decide(&self, class: Class, client: ClientId, now: Instant) -> Decision {
        let Some(rate) = self.inner.limits.rates[class.index()] else {
            return Decision::Allowed;
        };
        let now = now.saturating_duration_since(self.inner.epoch).as_nanos() as u64;
        let t = rate.emission();
        let tolerance = t.saturating_mul(u64::from(rate.burst) - 1);
        let max = self.inner.limits.max_clients;
        let mut table = self.inner.tables[class.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now.saturating_sub(table.last_sweep) >= SWEEP_EVERY.as_nanos() as u64
            || (table.full_at.len() >= max && !table.full_at.contains_key(&client))
        {
            table.full_at.retain(|_, full_at| *full_at > now);
            table.last_sweep = now;
        }
        let room = table.full_at.len() < max;
        let Table {
            full_at, overflow, ..
        } = &mut *table;
        let slot = match full_at.get_mut(&client) {
            Some(slot) => slot,
            None if room => full_at.entry(client).or_insert(now),
            None => overflow,
        };
        // GCRA: the call conforms unless the bucket would be full only after now + tolerance.
        let tat = (*slot).max(now);
        let decision = if tat - now > tolerance {
            Decision::Limited(Duration::from_nanos(tat - tolerance - now))
        } else {
            *slot = tat + t;
            Decision::Allowed
        };
        let held = table.full_at.len();
        drop(table);
        let m = &self.inner.metrics;
        m.clients
            .with_label_values(&[class.label()])
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        let outcome = match decision {
            Decision::Allowed => "allowed",
            Decision::Limited(_) => "limited",
        };
        m.decisions
            .with_label_values(&[class.label(), outcome])
            .inc();
        decision
    }

    /// Buckets held for `class`.
    pub fn clients(&self, class: Class) -> usize {
        self.inner.tables[class.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .full_at
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, max_clients: usize) -> (RateLimiter, Instant, RateMetrics) {
        let epoch = Instant::now();
        let metrics = RateMetrics::unregistered();
        let limits = RateLimits {
            rates: [Some(rate.parse().unwrap()), None, None, None],
            key_header: Some("X-Api-Key".into()),
            max_clients,
        };
        (
            RateLimiter::with_epoch(limits, metrics.clone(), epoch),
            epoch,
            metrics,
        )
    }

    fn ms(epoch: Instant, ms: u64) -> Instant {
        epoch + Duration::from_millis(ms)
    }

    #[test]
    fn a_burst_then_one_call_per_refill() {
        // 10/s with a burst of 3: three at once, then one every 100 ms.
        let (l, epoch, metrics) = limiter("10/s:3", 100);
        let c = l.client(Some(b"k1"), None);
        for _ in 0..3 {
            assert_eq!(l.decide(Class::Reads, c, epoch), Decision::Allowed);
        }
        assert_eq!(
            l.decide(Class::Reads, c, epoch),
            Decision::Limited(Duration::from_millis(100))
        );
        assert_eq!(
            l.decide(Class::Reads, c, ms(epoch, 40)),
            Decision::Limited(Duration::from_millis(60))
        );
        assert_eq!(l.decide(Class::Reads, c, ms(epoch, 100)), Decision::Allowed);
        assert!(matches!(
            l.decide(Class::Reads, c, ms(epoch, 100)),
            Decision::Limited(_)
        ));
        // After a long idle spell the bucket is full again: a burst of 3, not more.
        let later = ms(epoch, 60_000);
        for _ in 0..3 {
            assert_eq!(l.decide(Class::Reads, c, later), Decision::Allowed);
        }
        assert!(matches!(
            l.decide(Class::Reads, c, later),
            Decision::Limited(_)
        ));
        let count = |o| metrics.decisions.with_label_values(&["reads", o]).get();
        assert_eq!((count("allowed"), count("limited")), (7, 4));
    }

    #[test]
    fn clients_and_classes_have_buckets_of_their_own() {
        let (l, epoch, _) = limiter("1/m", 100);
        let a = l.client(Some(b"a"), None);
        let b = l.client(Some(b"b"), None);
        let ip = |s: &str| l.client(None, Some(s.parse().unwrap()));
        assert_eq!(l.decide(Class::Reads, a, epoch), Decision::Allowed);
        assert!(matches!(
            l.decide(Class::Reads, a, epoch),
            Decision::Limited(d) if d == Duration::from_secs(60)
        ));
        assert_eq!(l.decide(Class::Reads, b, epoch), Decision::Allowed);
        assert_eq!(
            l.decide(Class::Reads, ip("10.0.0.1"), epoch),
            Decision::Allowed
        );
        assert_eq!(
            l.decide(Class::Reads, ip("10.0.0.2"), epoch),
            Decision::Allowed
        );
        assert!(matches!(
            l.decide(Class::Reads, ip("10.0.0.1"), epoch),
            Decision::Limited(_)
        ));
        // The key wins over the address; another class is not limited.
        assert_eq!(l.client(Some(b"a"), Some("10.0.0.1".parse().unwrap())), a);
        assert_eq!(l.decide(Class::Ranges, a, epoch), Decision::Allowed);
        // Without a configured key header the key is ignored: the address names the client.
        let no_key = RateLimiter::default();
        assert_eq!(
            no_key.client(Some(b"a"), Some("10.0.0.1".parse().unwrap())),
            no_key.client(Some(b"b"), Some("10.0.0.1".parse().unwrap()))
        );
    }

    #[test]
    fn idle_buckets_are_evicted_and_a_flood_of_clients_is_bounded() {
        let (l, epoch, _) = limiter("10/s:2", 3);
        let id = |n: u32| l.client(Some(n.to_string().as_bytes()), None);
        for n in 0..3 {
            assert_eq!(l.decide(Class::Reads, id(n), epoch), Decision::Allowed);
        }
        assert_eq!(l.clients(Class::Reads), 3);
        // The table is full of active clients: new ones share the overflow bucket (burst 2), so a
        // flood of fresh ids neither grows the table nor escapes the limit.
        assert_eq!(l.decide(Class::Reads, id(100), epoch), Decision::Allowed);
        assert_eq!(l.decide(Class::Reads, id(101), epoch), Decision::Allowed);
        for n in 102..1_000 {
            assert!(matches!(
                l.decide(Class::Reads, id(n), epoch),
                Decision::Limited(_)
            ));
        }
        assert_eq!(l.clients(Class::Reads), 3);
        // Known clients keep their own buckets meanwhile.
        assert_eq!(l.decide(Class::Reads, id(0), epoch), Decision::Allowed);
        // 100 ms later clients 1 and 2 have refilled (full = same as no bucket): a new client takes
        // a freed place. Client 0 (two calls) is still not full, so it is kept.
        let t = ms(epoch, 100);
        assert_eq!(l.decide(Class::Reads, id(5000), t), Decision::Allowed);
        assert_eq!(l.clients(Class::Reads), 2);
        // The periodic sweep drops every idle bucket even when the table is not full.
        l.decide(Class::Reads, id(0), ms(epoch, 10_000) + SWEEP_EVERY);
        assert_eq!(l.clients(Class::Reads), 1);
    }

    #[test]
    fn rates_parse_and_refusals_say_when_to_retry() {
        assert_eq!(
            "600/m:50".parse::<Rate>().unwrap(),
            Rate {
                count: 600,
                per: Duration::from_secs(60),
                burst: 50
            }
        );
        assert_eq!("5/s".parse::<Rate>().unwrap().burst, 5);
        assert_eq!(parse_rate("off").unwrap(), None);
        for bad in ["5", "5/d", "0/s", "5/s:0", "x/s", "5/s:y"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let (l, _, _) = limiter("1/h", 10);
        let c = l.client(None, None);
        l.check(Class::Reads, c).unwrap();
        let refused = l.check(Class::Reads, c).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("--rate-limit-reads"),
            "{}",
            refused.message()
        );
        let secs: u64 = refused
            .metadata()
            .get(RETRY_AFTER)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3590..=3600).contains(&secs), "{secs}");
        // Unlimited classes always pass.
        for _ in 0..100 {
            l.check(Class::Streams, c).unwrap();
        }
    }
}

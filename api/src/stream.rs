//! The live streams, `StreamTicks` and `StreamCandles`, over the store's live feed.
//!
//! Each stream is a task of its own that reads the feed, filters it to the stream's assets and sends
//! without ever waiting (a full client buffer drops messages for that client alone and reports a gap).
//!
//! **Live candles** are kept incrementally: per asset, the open candle and the last [`KEEP_CLOSED`]
//! closed ones, each updated by the live ticks of its bucket. A candle the stream holds no state for (its
//! first tick on this stream, or a late tick for an older bucket) is seeded once from the store: for an
//! interval that is a whole number of seconds, from the write-time rollups (at most a few dozen rollup
//! candles, whatever the ticks), tagged with the asset's write version it was read at, so live batches
//! of that version or older (already in it) are skipped and later ones added; for other intervals
//! (`250ms`), from the raw ticks, page by page, remembering the ids it read. Streams that need the same
//! seed at the same time (say 50 clients of one asset's `1d` candles, all woken by the same tick) share
//! one read ([`Seeds`]). Nothing is ever read again for a candle the stream already holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tickfleet_proto::v1::{
    self, Candle, StreamCandlesResponse, StreamTicksResponse, stream_candles_response,
    stream_ticks_response,
};
use tickfleet_proto::{Tick, TickId};
use tickfleet_service::CancellationToken;
use tickfleet_store::{Base, LiveEvent};
use tokio::sync::{OnceCell, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};
use tracing::warn;

use crate::calc::{self, CandleAcc, CandleSeries};
use crate::limits::Bound;
use crate::metrics::ApiMetrics;
use crate::ratelimit::ClientId;
use crate::service::{Api, calc_error, candle};
use crate::validate;

/// Closed candles a `StreamCandles` keeps per asset, so late ticks for them update them in place.
pub const KEEP_CLOSED: usize = 8;

/// Most ids a seeded candle remembers to skip when they arrive live (see [`Seeded::skip`]).
pub const MAX_SEED_SKIP: usize = 100_000;

impl Api {
    /// Validates a stream's assets, takes a slot of the stream limit, subscribes, and counts the stream
    /// as active until `run` ends.
    pub(crate) async fn open_stream<M: Send + 'static>(
        &self,
        method: &'static str,
        client: Option<ClientId>,
        asset_ids: &[String],
        run: impl FnOnce(StreamCtx<M>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status> {
        let started = Instant::now();
        if let Some(client) = client {
            self.admit(method, client)?;
        }
        if let Err(status) = validate::asset_ids("asset_ids", asset_ids, true) {
            self.metrics.finished(method, status.code());
            return Err(status);
        }
        let slot = match self.limits.try_acquire(Bound::Streams) {
            Ok(slot) => slot,
            Err(status) => return Err(self.rejected(method, Bound::Streams, status)),
        };
        let opened = self.store_call("subscribe", self.store.subscribe()).await;
        self.metrics
            .duration_of(method)
            .observe(started.elapsed().as_secs_f64());
        let feed = match opened {
            Ok(feed) => feed,
            Err(status) => {
                self.metrics.finished(method, status.code());
                return Err(status);
            }
        };
        let (tx, rx) = mpsc::channel(self.stream_buffer);
        let ctx = StreamCtx {
            method,
            feed,
            filter: (!asset_ids.is_empty()).then(|| asset_ids.iter().cloned().collect()),
            tx,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            pending_gap: None,
        };
        let active = self.metrics.active_streams.with_label_values(&[method]);
        active.inc();
        let fut = run(ctx);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            fut.await;
            drop(slot);
            active.dec();
            metrics.finished(method, tonic::Code::Ok);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a stream task works with.
pub(crate) struct StreamCtx<M> {
    method: &'static str,
    feed: tickfleet_store::LiveFeed,
    filter: Option<HashSet<String>>,
    tx: mpsc::Sender<Result<M, Status>>,
    metrics: ApiMetrics,
    shutdown: CancellationToken,
    /// A gap to report before the next message: (messages missed, reason).
    pending_gap: Option<(u64, &'static str)>,
}

/// Why a stream task stops.
enum Next {
    Event(LiveEvent),
    Stop,
}

impl<M: Send + 'static> StreamCtx<M> {
    /// The next live event for this stream, or `Stop` on shutdown, client gone or feed closed.
    async fn next(&mut self) -> Next {
        loop {
            let ev = tokio::select! {
                _ = self.shutdown.cancelled() => return Next::Stop,
                _ = self.tx.closed() => return Next::Stop,
                ev = self.feed.recv() => ev,
            };
            match ev {
                None => return Next::Stop,
                Some(LiveEvent::Ticks(b))
                    if self
                        .filter
                        .as_ref()
                        .is_some_and(|f| !f.contains(&b.asset_id)) => {}
                Some(ev) => return Next::Event(ev),
            }
        }
    }

    /// Runs `work` unless the stream ends first (shutdown or client gone): `None` then.
    async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            _ = self.tx.closed() => None,
            v = work => Some(v),
        }
    }

    /// Notes a gap to report (reasons of the feed itself).
    fn gap(&mut self, reason: &'static str) {
        let missed = self.pending_gap.map_or(0, |g| g.0);
        self.pending_gap = Some((missed, reason));
    }

    /// Sends a message without ever waiting: when the client's buffer is full the message is dropped
    /// and counted, and a gap notice goes out first once there is room. `false` when the client is gone.
    fn send(&mut self, msg: M, gap: impl Fn(u64, &'static str) -> M) -> bool {
        if let Some((missed, reason)) = self.pending_gap {
            match self.tx.try_send(Ok(gap(missed, reason))) {
                Ok(()) => self.pending_gap = None,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.drop_one();
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(Ok(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.drop_one();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn drop_one(&mut self) {
        self.metrics.dropped.with_label_values(&[self.method]).inc();
        let missed = match self.pending_gap {
            Some((n, "client_slow")) => n + 1,
            _ => 1,
        };
        self.pending_gap = Some((missed, "client_slow"));
    }
}

fn tick_gap(missed: u64, reason: &'static str) -> StreamTicksResponse {
    StreamTicksResponse {
        event: Some(stream_ticks_response::Event::Gap(v1::Gap {
            missed,
            reason: reason.into(),
        })),
    }
}

fn candle_gap(missed: u64, reason: &'static str) -> StreamCandlesResponse {
    StreamCandlesResponse {
        event: Some(stream_candles_response::Event::Gap(v1::Gap {
            missed,
            reason: reason.into(),
        })),
    }
}

fn feed_gap_reason(reason: &'static str) -> &'static str {
    match reason {
        "lagged" => "server_lagged",
        _ => "feed_reconnected",
    }
}

pub(crate) async fn stream_ticks(mut ctx: StreamCtx<StreamTicksResponse>) {
    while let Next::Event(ev) = ctx.next().await {
        match ev {
            LiveEvent::Gap { reason, .. } => ctx.gap(feed_gap_reason(reason)),
            LiveEvent::Ticks(batch) => {
                for t in &batch.ticks {
                    let msg = StreamTicksResponse {
                        event: Some(stream_ticks_response::Event::Tick(t.into())),
                    };
                    if !ctx.send(msg, tick_gap) {
                        return;
                    }
                }
            }
        }
    }
}

/// A candle seeded from the store.
#[derive(Clone, Debug)]
pub(crate) struct Seeded {
    /// Every stored tick of the bucket, the live tick that asked for the seed included.
    acc: CandleAcc,
    /// Seeded from rollups: the asset's write version they were read at. Live batches of this version
    /// or older are in `acc` already.
    version: u64,
    /// Seeded from raw ticks: ids read from the store that are newer than that live tick: they may still
    /// arrive live (they were stored after the stream subscribed) and are then skipped, so no tick counts
    /// twice. Normally a handful; at most [`MAX_SEED_SKIP`].
    skip: Arc<HashSet<TickId>>,
}

/// One candle of a `StreamCandles`.
struct LiveCandle {
    acc: CandleAcc,
    version: u64,
    skip: Arc<HashSet<TickId>>,
}

impl LiveCandle {
    /// Whether the live tick `id` of a batch of `version` is in this candle already.
    fn holds(&self, version: u64, id: TickId) -> bool {
        version <= self.version || self.skip.contains(&id)
    }
}

impl From<Seeded> for LiveCandle {
    fn from(s: Seeded) -> Self {
        LiveCandle {
            acc: s.acc,
            version: s.version,
            skip: s.skip,
        }
    }
}

/// Seeds in progress, shared by every stream of the replica: streams that need the same candle seeded
/// for the same live tick wait for one scan instead of making one each.
#[derive(Clone, Default)]
pub(crate) struct Seeds {
    flights: Arc<Mutex<HashMap<SeedKey, Flight>>>,
}

/// (asset, interval, live tick that asked for it).
type SeedKey = (String, i64, TickId);
type Flight = Arc<OnceCell<Result<Seeded, Status>>>;

impl Api {
    /// The candle of `first`'s bucket as the store holds it (`first` included), read page by page; one
    /// scan for every stream asking at the same time.
    async fn seed(&self, asset: &str, interval: i64, first: &Tick) -> Result<Seeded, Status> {
        let key = (asset.to_owned(), interval, first.id());
        let flight: Flight = {
            let mut flights = self.seeds.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let seeded = flight
            .get_or_init(|| async {
                match Base::dividing(interval) {
                    Some(base) => self.rollup_candle(asset, base, interval, first).await,
                    None => self.scan_candle(asset, interval, first).await,
                }
            })
            .await
            .clone();
        let mut flights = self.seeds.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(&key);
        }
        seeded
    }

    /// The candle of `first`'s bucket composed from the rollups of `base`, at one write version.
    async fn rollup_candle(
        &self,
        asset: &str,
        base: Base,
        interval: i64,
        first: &Tick,
    ) -> Result<Seeded, Status> {
        let start = calc::bucket_start(first.event_time_ns, interval);
        let mut last = None;
        // A bucket of more than one page of rollups (intervals of over 10000 s not a whole number of
        // minutes) may see a write between its pages: read again until one version covers it all.
        for _ in 0..3 {
            let mut series = CandleSeries::new(interval, 1);
            let versions = self
                .fold_rollups(asset, base, start, start.saturating_add(interval), |page| {
                    page.iter()
                        .try_for_each(|c| series.merge(c))
                        .map_err(calc_error)
                })
                .await?;
            let acc = series.finish().pop().ok_or_else(|| {
                Status::unavailable("the store holds no rollup of the tick it announced")
            })?;
            last = Some(Seeded {
                acc,
                version: versions.1,
                skip: Arc::default(),
            });
            if versions.0 == versions.1 {
                break;
            }
        }
        last.ok_or_else(|| Status::internal("unreachable: no seed attempt"))
    }

    async fn scan_candle(
        &self,
        asset: &str,
        interval: i64,
        first: &Tick,
    ) -> Result<Seeded, Status> {
        let start = calc::bucket_start(first.event_time_ns, interval);
        let mut series = CandleSeries::new(interval, 1);
        let mut skip = HashSet::new();
        let mut overflowed = false;
        self.fold_range(asset, start, start.saturating_add(interval), |page| {
            series.extend(page).map_err(calc_error)?;
            for t in page.iter().filter(|t| t.id() > first.id()) {
                if skip.len() < MAX_SEED_SKIP {
                    skip.insert(t.id());
                } else {
                    overflowed = true;
                }
            }
            Ok(())
        })
        .await?;
        if overflowed {
            warn!(
                asset,
                limit = MAX_SEED_SKIP,
                "a seeded live candle holds more stored ticks newer than its first live tick than it can remember; those arriving live again may count twice"
            );
        }
        let acc = series.finish().pop().ok_or_else(|| {
            Status::unavailable("the store does not (yet) hold the tick it announced")
        })?;
        Ok(Seeded {
            acc,
            version: 0,
            skip: Arc::new(skip),
        })
    }
}

/// What a `StreamCandles` holds per asset: the newest candles, oldest first, at most `KEEP_CLOSED + 1`.
type Recent = VecDeque<LiveCandle>;

pub(crate) async fn stream_candles(
    api: Api,
    interval: i64,
    mut ctx: StreamCtx<StreamCandlesResponse>,
) {
    let mut live: HashMap<String, Recent> = HashMap::new();
    while let Next::Event(ev) = ctx.next().await {
        let batch = match ev {
            LiveEvent::Gap { reason, .. } => {
                // Ticks may be missing from the live candles: start them again from the store.
                live.clear();
                ctx.gap(feed_gap_reason(reason));
                continue;
            }
            LiveEvent::Ticks(batch) => batch,
        };
        let asset = batch.asset_id.as_str();
        let recent = live.entry(asset.to_owned()).or_default();
        // Starts of the candles this batch changed (the newest is always sent).
        let mut changed: Vec<i64> = Vec::new();
        for t in &batch.ticks {
            let bucket = calc::bucket_start(t.event_time_ns, interval);
            if let Some(c) = recent.iter_mut().find(|c| c.acc.start_ns == bucket) {
                if c.holds(batch.version, t.id()) {
                    continue;
                }
                if let Err(e) = c.acc.add(t) {
                    warn!(asset, error = %e, "live candle overflow");
                    recent.clear();
                    ctx.gap("overflow");
                    break;
                }
            } else if let Some(newest) = recent.back().filter(|c| bucket > c.acc.start_ns) {
                // A later candle starts and the newest one is closed (sent once more, marked so).
                // Every tick of the new bucket is stored after this subscription began (the ticks of
                // one asset are stored in order), so it arrives live: no seeding.
                if !changed.contains(&newest.acc.start_ns) {
                    changed.push(newest.acc.start_ns);
                }
                let acc = match CandleAcc::new(t, interval) {
                    Ok(acc) => acc,
                    Err(e) => {
                        warn!(asset, error = %e, "live candle overflow");
                        recent.clear();
                        ctx.gap("overflow");
                        break;
                    }
                };
                recent.push_back(LiveCandle {
                    acc,
                    version: 0,
                    skip: Arc::default(),
                });
            } else {
                // The first tick of this asset on this stream, or a late one for a candle older than
                // those kept: seed that candle from the store, once.
                let seeded = match ctx.unless_stopped(api.seed(asset, interval, t)).await {
                    None => return,
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        warn!(asset, error = %e, "cannot seed a live candle from the store");
                        ctx.gap("store_unavailable");
                        continue;
                    }
                };
                let at = recent.partition_point(|c| c.acc.start_ns < bucket);
                recent.insert(at, seeded.into());
            }
            if !changed.contains(&bucket) {
                changed.push(bucket);
            }
        }
        let newest = recent.back().map(|c| c.acc.start_ns);
        changed.sort_unstable();
        let mut out: Vec<Candle> = changed
            .iter()
            .filter(|b| Some(**b) != newest)
            .filter_map(|b| recent.iter().find(|c| c.acc.start_ns == *b))
            .map(|c| candle(asset, &c.acc, true))
            .collect();
        if let Some(c) = recent.back() {
            out.push(candle(asset, &c.acc, false));
        }
        while recent.len() > KEEP_CLOSED + 1 {
            recent.pop_front();
        }
        for c in out {
            let msg = StreamCandlesResponse {
                event: Some(stream_candles_response::Event::Candle(c)),
            };
            if !ctx.send(msg, candle_gap) {
                return;
            }
        }
    }
}

// Over 600 lines because tonic wants the whole TickService in one impl: the handlers, and the
// live-stream plumbing (StreamCtx, stream_ticks, stream_candles) only they use.
//! The `tickfleet.v1.TickService` implementation over any [`TickStore`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tickfleet_proto::v1::{
    self, BatchGetLatestRequest, BatchGetLatestResponse, Candle, GetCandlesRequest,
    GetCandlesResponse, GetLatestRequest, GetLatestResponse, GetMovingAverageRequest,
    GetMovingAverageResponse, ListAssetsRequest, ListAssetsResponse, ListTicksRequest,
    ListTicksResponse, StreamCandlesRequest, StreamCandlesResponse, StreamTicksRequest,
    StreamTicksResponse, get_moving_average_request::Over, stream_candles_response,
    stream_ticks_response, tick_service_server::TickService,
};
use tickfleet_proto::{Tick, TickId};
use tickfleet_service::CancellationToken;
use tickfleet_store::{LiveEvent, RangeQuery, StoreError, TickStore};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::calc::{self, CandleAcc};
use crate::metrics::ApiMetrics;
use crate::validate::{self, PageToken};

/// Most candles one `GetCandles` answer holds.
pub const MAX_CANDLES: usize = 10_000;
/// Most ticks one query may read to compute candles or a windowed average; beyond it the range must be
/// narrowed (this bounds the work any single call can ask of the store).
pub const MAX_SCAN: usize = 1_000_000;
/// Default of [`Api::with_stream_buffer`].
pub const STREAM_BUFFER: usize = 8192;

/// The gRPC service.
#[derive(Clone)]
pub struct Api {
    store: Arc<dyn TickStore>,
    metrics: ApiMetrics,
    shutdown: CancellationToken,
    stream_buffer: usize,
}

impl Api {
    /// A service over `store`; its streams end when `shutdown` is cancelled.
    pub fn new(
        store: Arc<dyn TickStore>,
        metrics: ApiMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Api {
            store,
            metrics,
            shutdown,
            stream_buffer: STREAM_BUFFER,
        }
    }

    /// Sets how many messages each stream buffers for its client (at least 1). When a client's buffer
    /// is full, newer messages are dropped for that client alone and it gets a gap notice once there
    /// is room: a slow client never slows the feed or other clients down.
    pub fn with_stream_buffer(mut self, messages: usize) -> Self {
        self.stream_buffer = messages.max(1);
        self
    }

    /// Runs a unary handler: honours the client's deadline and records the metrics.
    async fn unary<T>(
        &self,
        method: &'static str,
        deadline: Option<Duration>,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = match deadline {
            // A little early (by up to 10 ms), so this answer (DEADLINE_EXCEEDED, as the gRPC spec asks)
            // wins over the transport's own timer, which answers CANCELLED.
            Some(d) => tokio::time::timeout(d - (d / 4).min(Duration::from_millis(10)), work)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "{method} did not finish within the client's deadline of {d:?}"
                    )))
                }),
            None => work.await,
        };
        self.metrics
            .duration_of(method)
            .observe(started.elapsed().as_secs_f64());
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.finished(method, code);
        result.map(Response::new)
    }

    /// Fails with NOT_FOUND unless `asset_id` has ticks; returns its latest.
    async fn known(&self, asset_id: &str) -> Result<Tick, Status> {
        validate::asset_id("asset_id", asset_id)?;
        self.store
            .latest(asset_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| Status::not_found(format!("asset {asset_id:?} has no ticks")))
    }

    /// Reads every tick of `asset_id` in `[from, to)`, failing when there are more than `cap`.
    async fn scan(
        &self,
        asset_id: &str,
        from: i64,
        to: i64,
        cap: usize,
    ) -> Result<Vec<Tick>, Status> {
        let mut out = Vec::new();
        let mut q = RangeQuery {
            from_ns: from,
            to_ns: to,
            limit: tickfleet_store::MAX_PAGE,
            after: None,
        };
        loop {
            let page = self.store.range(asset_id, &q).await.map_err(store_error)?;
            out.extend(page.ticks);
            if out.len() > cap {
                return Err(Status::invalid_argument(format!(
                    "the range holds more than {cap} ticks; narrow from_ns/to_ns (or the window)"
                )));
            }
            match page.next {
                Some(next) => q.after = Some(next),
                None => return Ok(out),
            }
        }
    }

    async fn candles(&self, r: GetCandlesRequest) -> Result<GetCandlesResponse, Status> {
        let interval = calc::parse_interval(&r.interval).map_err(Status::invalid_argument)?;
        let (from, to) = validate::time_range(r.from_ns, r.to_ns)?;
        let latest = self.known(&r.asset_id).await?;
        // Whole buckets only: from rounds down, to rounds up (and stops after the newest tick).
        let from = calc::bucket_start(from, interval);
        let to = to.min(latest.event_time_ns.saturating_add(1));
        let to = match calc::bucket_start(to, interval) {
            start if start == to => to,
            start => start.saturating_add(interval),
        };
        if r.from_ns.is_some() && (to.saturating_sub(from) / interval) as usize > MAX_CANDLES {
            return Err(Status::invalid_argument(format!(
                "[from_ns, to_ns) spans more than {MAX_CANDLES} intervals of {}; narrow it or use a longer interval",
                r.interval
            )));
        }
        let ticks = self.scan(&r.asset_id, from, to, MAX_SCAN).await?;
        let candles =
            calc::candles(&ticks, interval).map_err(|e| Status::out_of_range(e.to_string()))?;
        if candles.len() > MAX_CANDLES {
            return Err(Status::invalid_argument(format!(
                "the range holds more than {MAX_CANDLES} candles; set from_ns/to_ns or use a longer interval"
            )));
        }
        Ok(GetCandlesResponse {
            candles: candles
                .iter()
                .map(|c| candle(&r.asset_id, c, false))
                .collect(),
        })
    }

    async fn moving_average(
        &self,
        r: GetMovingAverageRequest,
    ) -> Result<GetMovingAverageResponse, Status> {
        validate::asset_id("asset_id", &r.asset_id)?;
        let ticks = match &r.over {
            None => {
                return Err(Status::invalid_argument(
                    "set points (the last N ticks) or window (e.g. \"1m\")",
                ));
            }
            Some(Over::Points(p)) if *p == 0 || *p > validate::MAX_PAGE => {
                return Err(Status::invalid_argument(format!(
                    "points is {p}; it must be 1..={}",
                    validate::MAX_PAGE
                )));
            }
            Some(Over::Points(p)) => {
                self.known(&r.asset_id).await?;
                self.store
                    .tail(&r.asset_id, *p as usize)
                    .await
                    .map_err(store_error)?
            }
            Some(Over::Window(w)) => {
                let window = calc::parse_interval(w)
                    .map_err(|e| Status::invalid_argument(format!("window: {e}")))?;
                let newest = self.known(&r.asset_id).await?.event_time_ns;
                let to = newest.saturating_add(1);
                self.scan(&r.asset_id, (to - window).max(0), to, MAX_SCAN)
                    .await?
            }
        };
        let avg = calc::average(&ticks)
            .map_err(|e| Status::out_of_range(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("asset {:?} has no ticks", r.asset_id)))?;
        Ok(GetMovingAverageResponse {
            asset_id: r.asset_id,
            sma: avg.sma.to_string(),
            vwap: avg.vwap.map(|v| v.to_string()),
            count: avg.count,
            from_ns: ticks.first().map_or(0, |t| t.event_time_ns),
            to_ns: ticks.last().map_or(0, |t| t.event_time_ns),
        })
    }

    /// Validates a stream's assets, subscribes, and counts the stream as active until `run` ends.
    async fn open_stream<M: Send + 'static>(
        &self,
        method: &'static str,
        asset_ids: &[String],
        run: impl FnOnce(StreamCtx<M>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status> {
        let started = Instant::now();
        let opened = async {
            validate::asset_ids("asset_ids", asset_ids, true)?;
            self.store.subscribe().await.map_err(store_error)
        }
        .await;
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
            active.dec();
            metrics.finished(method, tonic::Code::Ok);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a stream task works with.
struct StreamCtx<M> {
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

async fn stream_ticks(mut ctx: StreamCtx<StreamTicksResponse>) {
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

/// The live candle of one asset in a `StreamCandles`.
struct LiveCandle {
    acc: CandleAcc,
    /// Ticks read from the store when the candle was seeded that may still arrive live (ids at or after
    /// the first live tick): skipped when they do, so no tick counts twice.
    seeded: HashSet<TickId>,
}

async fn stream_candles(api: Api, interval: i64, mut ctx: StreamCtx<StreamCandlesResponse>) {
    let mut live: HashMap<String, LiveCandle> = HashMap::new();
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
        let mut out: Vec<Candle> = Vec::new();
        let mut late_buckets = std::collections::BTreeSet::new();
        for t in &batch.ticks {
            let bucket = calc::bucket_start(t.event_time_ns, interval);
            match live.get_mut(asset) {
                Some(c) if bucket == c.acc.start_ns => {
                    if !c.seeded.remove(&t.id()) && c.acc.add(t).is_err() {
                        live.remove(asset);
                        ctx.gap("overflow");
                    }
                }
                Some(c) if bucket < c.acc.start_ns => {
                    late_buckets.insert(bucket);
                }
                Some(c) => {
                    // A later candle starts: the current one is final. Every tick of the new bucket is
                    // stored after this subscription began, so it arrives live: no seeding needed.
                    out.retain(|o| o.start_ns != c.acc.start_ns);
                    out.push(candle(asset, &c.acc, true));
                    *c = LiveCandle {
                        acc: CandleAcc::new(t, interval),
                        seeded: HashSet::new(),
                    };
                }
                None => match seed(&api, asset, t, interval).await {
                    Ok(c) => {
                        live.insert(asset.to_owned(), c);
                    }
                    Err(e) => {
                        warn!(asset, error = %e, "cannot seed a live candle from the store");
                        ctx.gap("store_unavailable");
                    }
                },
            }
        }
        if let Some(c) = live.get(asset) {
            out.push(candle(asset, &c.acc, false));
        }
        // Ticks for a candle already closed (out of order): recompute it from the store, exactly.
        for bucket in late_buckets {
            match api
                .scan(asset, bucket, bucket.saturating_add(interval), MAX_SCAN)
                .await
                .and_then(|ticks| {
                    calc::candles(&ticks, interval).map_err(|e| Status::out_of_range(e.to_string()))
                }) {
                Ok(cs) => out.extend(cs.iter().map(|c| candle(asset, c, true))),
                Err(e) => warn!(asset, error = %e, "cannot recompute a late candle"),
            }
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

/// Starts the live candle of `first`'s bucket from the store (which already holds `first`).
async fn seed(api: &Api, asset: &str, first: &Tick, interval: i64) -> Result<LiveCandle, Status> {
    let start = calc::bucket_start(first.event_time_ns, interval);
    let ticks = api
        .scan(asset, start, start.saturating_add(interval), MAX_SCAN)
        .await?;
    let mut acc = CandleAcc::new(first, interval);
    let mut seeded = HashSet::new();
    for t in ticks.iter().filter(|t| t.id() != first.id()) {
        acc.add(t)
            .map_err(|e| Status::out_of_range(e.to_string()))?;
        if t.id() > first.id() {
            seeded.insert(t.id());
        }
    }
    Ok(LiveCandle { acc, seeded })
}

fn candle(asset: &str, c: &CandleAcc, closed: bool) -> Candle {
    Candle {
        asset_id: asset.to_owned(),
        start_ns: c.start_ns,
        end_ns: c.end_ns,
        open: c.open().to_string(),
        high: c.high.to_string(),
        low: c.low.to_string(),
        close: c.close().to_string(),
        volume: c.volume.to_string(),
        tick_count: c.count,
        closed,
    }
}

/// Maps a store failure to a status: Redis trouble is UNAVAILABLE (retryable), bad data INTERNAL.
fn store_error(e: StoreError) -> Status {
    warn!(error = %e, "store error");
    match e {
        StoreError::Corrupt { .. } => Status::internal(format!("stored data is corrupt: {e}")),
        _ => Status::unavailable(format!("store unavailable: {e}")),
    }
}

#[tonic::async_trait]
impl TickService for Api {
    async fn get_latest(
        &self,
        req: Request<GetLatestRequest>,
    ) -> Result<Response<GetLatestResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        let r = req.into_inner();
        self.unary("GetLatest", deadline, async {
            let tick = self.known(&r.asset_id).await?;
            Ok(GetLatestResponse {
                tick: Some((&tick).into()),
            })
        })
        .await
    }

    async fn batch_get_latest(
        &self,
        req: Request<BatchGetLatestRequest>,
    ) -> Result<Response<BatchGetLatestResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        let r = req.into_inner();
        self.unary("BatchGetLatest", deadline, async {
            validate::asset_ids("asset_ids", &r.asset_ids, false)?;
            // Concurrent lookups share the store's connection (the Redis client pipelines them), so a
            // thousand assets cost about one round trip, not a thousand.
            let latest =
                futures::future::try_join_all(r.asset_ids.iter().map(|id| self.store.latest(id)))
                    .await
                    .map_err(store_error)?;
            let mut out = BatchGetLatestResponse::default();
            for (id, tick) in r.asset_ids.iter().zip(latest) {
                match tick {
                    Some(t) => out.ticks.push((&t).into()),
                    None => out.missing.push(id.clone()),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_ticks(
        &self,
        req: Request<ListTicksRequest>,
    ) -> Result<Response<ListTicksResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        let r = req.into_inner();
        self.unary("ListTicks", deadline, async {
            validate::asset_id("asset_id", &r.asset_id)?;
            let (from, to) = validate::time_range(r.from_ns, r.to_ns)?;
            let limit = validate::page_size(r.limit)?;
            let after = match r.page_token.as_str() {
                "" => None,
                token => Some(PageToken::decode(token, &r.asset_id, from, to)?.after),
            };
            self.known(&r.asset_id).await?;
            let page = self
                .store
                .range(
                    &r.asset_id,
                    &RangeQuery {
                        from_ns: from,
                        to_ns: to,
                        limit,
                        after,
                    },
                )
                .await
                .map_err(store_error)?;
            Ok(ListTicksResponse {
                ticks: page.ticks.iter().map(Into::into).collect(),
                next_page_token: page
                    .next
                    .map(|after| {
                        PageToken {
                            from_ns: from,
                            to_ns: to,
                            after,
                            asset_id: r.asset_id.clone(),
                        }
                        .encode()
                    })
                    .unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_candles(
        &self,
        req: Request<GetCandlesRequest>,
    ) -> Result<Response<GetCandlesResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        let r = req.into_inner();
        self.unary("GetCandles", deadline, self.candles(r)).await
    }

    async fn get_moving_average(
        &self,
        req: Request<GetMovingAverageRequest>,
    ) -> Result<Response<GetMovingAverageResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        let r = req.into_inner();
        self.unary("GetMovingAverage", deadline, self.moving_average(r))
            .await
    }

    async fn list_assets(
        &self,
        req: Request<ListAssetsRequest>,
    ) -> Result<Response<ListAssetsResponse>, Status> {
        let deadline = validate::grpc_timeout(req.metadata());
        self.unary("ListAssets", deadline, async {
            Ok(ListAssetsResponse {
                asset_ids: self.store.assets().await.map_err(store_error)?,
            })
        })
        .await
    }

    type StreamTicksStream = ReceiverStream<Result<StreamTicksResponse, Status>>;

    async fn stream_ticks(
        &self,
        req: Request<StreamTicksRequest>,
    ) -> Result<Response<Self::StreamTicksStream>, Status> {
        let r = req.into_inner();
        self.open_stream("StreamTicks", &r.asset_ids, |ctx| {
            Box::pin(stream_ticks(ctx))
        })
        .await
    }

    type StreamCandlesStream = ReceiverStream<Result<StreamCandlesResponse, Status>>;

    async fn stream_candles(
        &self,
        req: Request<StreamCandlesRequest>,
    ) -> Result<Response<Self::StreamCandlesStream>, Status> {
        let r = req.into_inner();
        let interval = match calc::parse_interval(&r.interval) {
            Ok(i) => i,
            Err(e) => {
                self.metrics
                    .finished("StreamCandles", tonic::Code::InvalidArgument);
                return Err(Status::invalid_argument(e));
            }
        };
        let api = self.clone();
        self.open_stream("StreamCandles", &r.asset_ids, move |ctx| {
            Box::pin(stream_candles(api, interval, ctx))
        })
        .await
    }
}

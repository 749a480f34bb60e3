//! The `tickfleet.v1.TickService` implementation over any [`TickStore`].
//!
//! Every store call has a deadline of its own ([`Api::with_store_timeout`]): a store that hangs makes the
//! call UNAVAILABLE, never a stuck call.
//!
//! **Candles and windowed averages read the store's write-time rollups** ([`tickfleet_store::rollup`]):
//! candles of an interval that is a whole number of seconds are merged from the rollups of the largest
//! base that divides it (5 s from 1 s, 15 min from 1 min, 4 h from 1 h, 7 d from 1 d), so a call costs
//! O(candles), not O(ticks). Intervals that no base divides (`250ms`, `1500ms`) are computed from the raw
//! ticks as before, bounded by the same 10000-candle cap. A window average covers its window with as few
//! rollup candles as fit (a ladder of 1 s, 1 min, 1 h, 1 d candles) and reads raw ticks only for the part
//! of its oldest second that lies outside the window. Both are read page by page and folded as they
//! come, so a call holds one page whatever its range.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tickfleet_proto::Tick;
use tickfleet_proto::v1::{
    BatchGetLatestRequest, BatchGetLatestResponse, Candle, GetCandlesRequest, GetCandlesResponse,
    GetLatestRequest, GetLatestResponse, GetMovingAverageRequest, GetMovingAverageResponse,
    ListAssetsRequest, ListAssetsResponse, ListTicksRequest, ListTicksResponse,
    StreamCandlesRequest, StreamCandlesResponse, StreamTicksRequest, StreamTicksResponse,
    get_moving_average_request::Over, tick_service_server::TickService,
};
use tickfleet_service::CancellationToken;
use tickfleet_store::{Base, RangeQuery, StoreError, TickStore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::calc::{self, AverageAcc, CalcError, CandleAcc, CandleSeries};
use crate::limits::{Bound, Limits};
use crate::metrics::ApiMetrics;
use crate::ratelimit::{Class, ClientId, RateLimiter};
use crate::stream::{self, Seeds};
use crate::validate::{self, PageToken};

/// Most candles one `GetCandles` answer holds; a range holding more is INVALID_ARGUMENT.
pub const MAX_CANDLES: usize = 10_000;
/// Ticks read per store call when a range is folded into candles or an average: what one call holds
/// in memory, whatever its range.
pub const SCAN_PAGE: usize = 4096;
/// Default of [`Api::with_stream_buffer`].
pub const STREAM_BUFFER: usize = 8192;
/// Default of [`Api::with_candles_immutable_after`]: the workers' default skew-behind limit (365
/// days) plus a day.
pub const CANDLES_IMMUTABLE_AFTER: Duration = Duration::from_secs(366 * 86_400);
/// Default of [`Api::with_store_timeout`].
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// The gRPC service.
#[derive(Clone)]
pub struct Api {
    pub(crate) store: Arc<dyn TickStore>,
    pub(crate) metrics: ApiMetrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stream_buffer: usize,
    pub(crate) limits: Limits,
    pub(crate) store_timeout: Duration,
    pub(crate) seeds: Seeds,
    pub(crate) rate: RateLimiter,
    pub(crate) candles_immutable_after: Duration,
}

/// What a handler needs of a call besides its message: the client's deadline and who the client is
/// (for the rate limiter).
pub(crate) struct Call {
    deadline: Option<Duration>,
    pub(crate) client: ClientId,
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
            limits: Limits::default(),
            store_timeout: STORE_TIMEOUT,
            seeds: Seeds::default(),
            rate: RateLimiter::default(),
            candles_immutable_after: CANDLES_IMMUTABLE_AFTER,
        }
        .with_limits(Limits::default())
    }

    /// Sets how many messages each stream buffers for its client (at least 1). When a client's buffer
    /// is full, newer messages are dropped for that client alone and it gets a gap notice once there
    /// is room: a slow client never slows the feed or other clients down.
    pub fn with_stream_buffer(mut self, messages: usize) -> Self {
        self.stream_buffer = messages.max(1);
        self
    }

    /// Sets the per-replica limits on concurrent calls and open streams (see [`Limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        for (bound, max) in [
            (Bound::Calls, limits.max_calls()),
            (Bound::Streams, limits.max_streams()),
        ] {
            self.metrics
                .limit
                .with_label_values(&[bound.label()])
                .set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        self.limits = limits;
        self
    }

    /// Sets the deadline of each store call (at least 1 ms): a call the store has not answered by then
    /// fails with UNAVAILABLE.
    pub fn with_store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the per-client rate limits (see [`RateLimiter`]).
    pub fn with_rate_limiter(mut self, rate: RateLimiter) -> Self {
        self.rate = rate;
        self
    }

    /// Sets the late-tick horizon: REST candles of a range that ended at least this long ago are
    /// served as immutable (see [`crate::rest::closed_range`]). It must cover the workers'
    /// `--max-skew-behind-secs` (plus a margin), or a cache may keep a candle a late tick changed.
    pub fn with_candles_immutable_after(mut self, horizon: Duration) -> Self {
        self.candles_immutable_after = horizon;
        self
    }

    /// The limiter's view of a request: its deadline and its client.
    pub(crate) fn call<T>(&self, req: &Request<T>) -> Call {
        Call {
            deadline: validate::grpc_timeout(req.metadata()),
            client: self.rate.client_of(req),
        }
    }

    /// Takes a token of the call's rate limit (RESOURCE_EXHAUSTED, counted, when there is none).
    pub(crate) fn admit(&self, method: &'static str, client: ClientId) -> Result<(), Status> {
        self.rate
            .check(Class::of(method), client)
            .map_err(|status| self.rejected(method, Bound::Rate, status))
    }

    /// Runs a unary handler: takes a token of the client's rate limit and a slot of the call limit, honours the client's deadline and records
    /// the metrics.
    pub(crate) async fn unary<T>(
        &self,
        method: &'static str,
        call: Call,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        self.admit(method, call.client)?;
        let deadline = call.deadline;
        let _slot = match self.limits.try_acquire(Bound::Calls) {
            Ok(slot) => slot,
            Err(status) => return Err(self.rejected(method, Bound::Calls, status)),
        };
        let in_flight = self.metrics.in_flight.with_label_values(&[method]);
        in_flight.inc();
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
        in_flight.dec();
        self.metrics
            .duration_of(method)
            .observe(started.elapsed().as_secs_f64());
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.finished(method, code);
        result.map(Response::new)
    }

    /// Counts a call refused at a limit and returns its status.
    pub(crate) fn rejected(&self, method: &'static str, bound: Bound, status: Status) -> Status {
        self.metrics
            .rejected
            .with_label_values(&[method, bound.label()])
            .inc();
        self.metrics.finished(method, status.code());
        status
    }

    /// Runs one store call under the store timeout; failures become statuses (see [`store_error`]).
    pub(crate) async fn store_call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.store_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics
                    .store_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                Err(store_error(e))
            }
            Err(_) => {
                self.metrics
                    .store_errors
                    .with_label_values(&["timeout"])
                    .inc();
                warn!(
                    call = what,
                    timeout_ms = self.store_timeout.as_millis() as u64,
                    "store call timed out"
                );
                Err(Status::unavailable(format!(
                    "store unavailable: it did not answer {what} within {:?}",
                    self.store_timeout
                )))
            }
        }
    }

    /// Fails with NOT_FOUND unless `asset_id` has ticks; returns its latest.
    async fn known(&self, asset_id: &str) -> Result<Tick, Status> {
        validate::asset_id("asset_id", asset_id)?;
        self.store_call("latest", self.store.latest(asset_id))
            .await?
            .ok_or_else(|| Status::not_found(format!("asset {asset_id:?} has no ticks")))
    }

    /// Feeds every tick of `asset_id` in `[from, to)`, in tick-id order, to `fold`, one store page of
    /// [`SCAN_PAGE`] ticks at a time: memory stays at one page whatever the range.
    pub(crate) async fn fold_range(
        &self,
        asset_id: &str,
        from: i64,
        to: i64,
        mut fold: impl FnMut(&[Tick]) -> Result<(), Status>,
    ) -> Result<(), Status> {
        let mut q = RangeQuery {
            from_ns: from,
            to_ns: to,
            limit: SCAN_PAGE,
            after: None,
        };
        loop {
            let page = self
                .store_call("range", self.store.range(asset_id, &q))
                .await?;
            fold(&page.ticks)?;
            match page.next {
                Some(next) => q.after = Some(next),
                None => return Ok(()),
            }
        }
    }

    async fn candles(&self, r: GetCandlesRequest) -> Result<GetCandlesResponse, Status> {
        let interval =
            calc::parse_interval(&r.interval).map_err(|e| validate::invalid("interval", e))?;
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
            return Err(validate::invalid(
                "from_ns",
                format!(
                    "[from_ns, to_ns) spans more than {MAX_CANDLES} intervals of {}; narrow it or use a longer interval",
                    r.interval
                ),
            ));
        }
        let too_many = || {
            validate::invalid(
                "interval",
                format!(
                    "the range holds more than {MAX_CANDLES} candles of {}; set from_ns/to_ns or use a longer interval",
                    r.interval
                ),
            )
        };
        let mut series = CandleSeries::new(interval, MAX_CANDLES);
        let fail = |e| match e {
            CalcError::TooManyCandles(_) => too_many(),
            e => calc_error(e),
        };
        match Base::dividing(interval) {
            Some(base) => {
                self.fold_rollups(&r.asset_id, base, from, to, |page| {
                    page.iter().try_for_each(|c| series.merge(c)).map_err(fail)
                })
                .await?;
            }
            None => {
                self.fold_range(&r.asset_id, from, to, |page| {
                    series.extend(page).map_err(fail)
                })
                .await?
            }
        }
        Ok(GetCandlesResponse {
            candles: series
                .finish()
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
        let mut acc = AverageAcc::default();
        match &r.over {
            None => {
                return Err(validate::invalid(
                    "points",
                    "set points (the last N ticks) or window (e.g. \"1m\")",
                ));
            }
            Some(Over::Points(p)) if *p == 0 || *p > validate::MAX_PAGE => {
                return Err(validate::invalid(
                    "points",
                    format!("points is {p}; it must be 1..={}", validate::MAX_PAGE),
                ));
            }
            Some(Over::Points(p)) => {
                self.known(&r.asset_id).await?;
                let ticks = self
                    .store_call("tail", self.store.tail(&r.asset_id, *p as usize))
                    .await?;
                ticks
                    .iter()
                    .try_for_each(|t| acc.add(t))
                    .map_err(calc_error)?;
            }
            Some(Over::Window(w)) => {
                let window = calc::parse_interval(w)
                    .map_err(|e| validate::invalid("window", format!("window: {e}")))?;
                let newest = self.known(&r.asset_id).await?.event_time_ns;
                let to = newest.saturating_add(1);
                self.window_average(&r.asset_id, (to - window).max(0), to, &mut acc)
                    .await?;
            }
        }
        let avg = acc
            .finish()
            .map_err(calc_error)?
            .ok_or_else(|| Status::not_found(format!("asset {:?} has no ticks", r.asset_id)))?;
        Ok(GetMovingAverageResponse {
            asset_id: r.asset_id,
            sma: avg.sma.to_string(),
            vwap: avg.vwap.map(|v| v.to_string()),
            count: avg.count,
            from_ns: avg.from_ns,
            to_ns: avg.to_ns,
        })
    }
}

/// A computation that cannot be answered: a decimal overflow is OUT_OF_RANGE.
pub(crate) fn calc_error(e: CalcError) -> Status {
    match e {
        CalcError::TooManyCandles(_) => validate::invalid("interval", e.to_string()),
        CalcError::Overflow(_) => Status::out_of_range(e.to_string()),
    }
}

pub(crate) fn candle(asset: &str, c: &CandleAcc, closed: bool) -> Candle {
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
        let call = self.call(&req);
        let r = req.into_inner();
        self.unary("GetLatest", call, async {
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
        let call = self.call(&req);
        let r = req.into_inner();
        self.unary("BatchGetLatest", call, async {
            validate::asset_ids("asset_ids", &r.asset_ids, false)?;
            // Concurrent lookups share the store's connection (the Redis client pipelines them), so a
            // thousand assets cost about one round trip, not a thousand.
            let latest = self
                .store_call(
                    "latest",
                    futures::future::try_join_all(
                        r.asset_ids.iter().map(|id| self.store.latest(id)),
                    ),
                )
                .await?;
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
        let call = self.call(&req);
        let r = req.into_inner();
        self.unary("ListTicks", call, async {
            validate::asset_id("asset_id", &r.asset_id)?;
            let (from, to) = validate::time_range(r.from_ns, r.to_ns)?;
            let limit = validate::page_size(r.limit)?;
            let after = match r.page_token.as_str() {
                "" => None,
                token => Some(PageToken::decode(token, &r.asset_id, from, to)?.after),
            };
            self.known(&r.asset_id).await?;
            let query = RangeQuery {
                from_ns: from,
                to_ns: to,
                limit,
                after,
            };
            let page = self
                .store_call("range", self.store.range(&r.asset_id, &query))
                .await?;
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
        let call = self.call(&req);
        let r = req.into_inner();
        self.unary("GetCandles", call, self.candles(r)).await
    }

    async fn get_moving_average(
        &self,
        req: Request<GetMovingAverageRequest>,
    ) -> Result<Response<GetMovingAverageResponse>, Status> {
        let call = self.call(&req);
        let r = req.into_inner();
        self.unary("GetMovingAverage", call, self.moving_average(r))
            .await
    }

    async fn list_assets(
        &self,
        req: Request<ListAssetsRequest>,
    ) -> Result<Response<ListAssetsResponse>, Status> {
        let call = self.call(&req);
        self.unary("ListAssets", call, async {
            Ok(ListAssetsResponse {
                asset_ids: self.store_call("assets", self.store.assets()).await?,
            })
        })
        .await
    }

    type StreamTicksStream = ReceiverStream<Result<StreamTicksResponse, Status>>;

    async fn stream_ticks(
        &self,
        req: Request<StreamTicksRequest>,
    ) -> Result<Response<Self::StreamTicksStream>, Status> {
        let client = self.call(&req).client;
        let r = req.into_inner();
        self.open_stream("StreamTicks", Some(client), &r.asset_ids, |ctx| {
            Box::pin(stream::stream_ticks(ctx))
        })
        .await
    }

    type StreamCandlesStream = ReceiverStream<Result<StreamCandlesResponse, Status>>;

    async fn stream_candles(
        &self,
        req: Request<StreamCandlesRequest>,
    ) -> Result<Response<Self::StreamCandlesStream>, Status> {
        let client = self.call(&req).client;
        self.admit("StreamCandles", client)?;
        let r = req.into_inner();
        let interval = match calc::parse_interval(&r.interval) {
            Ok(i) => i,
            Err(e) => {
                self.metrics
                    .finished("StreamCandles", tonic::Code::InvalidArgument);
                return Err(validate::invalid("interval", e));
            }
        };
        let api = self.clone();
        self.open_stream("StreamCandles", None, &r.asset_ids, move |ctx| {
            Box::pin(stream::stream_candles(api, interval, ctx))
        })
        .await
    }
}

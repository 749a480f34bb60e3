//! The REST/JSON api: the same queries as `tickfleet.v1.TickService`, answered by the same
//! implementation. Each handler turns its query string into the gRPC request message and calls the
//! [`Api`]'s gRPC method, so validation, paging, limits, store deadlines and metrics are the gRPC
//! side's, not a copy; the answer is converted to JSON ([`model`]) and a failure to an RFC 9457
//! problem ([`problem`]). Live ticks (and candles) are Server-Sent Events over the gRPC streams.
//!
//! (Just over 600 lines with its tests: one handler a route, each with the OpenAPI annotation that
//! documents it and its query type beside it; the polling routes, the model, the document and the
//! problems are modules of their own.)

pub mod model;
pub mod openapi;
pub mod polls;
pub mod problem;

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tickfleet_proto::v1::{
    self, get_moving_average_request::Over, stream_candles_response, stream_ticks_response,
    tick_service_server::TickService,
};
use tonic::{Code, Request};
use utoipa::IntoParams;

use crate::Api;
use crate::ratelimit::ClientId;
use model::{Assets, Candles, Gap, LatestPrice, MovingAverage, Tick, TicksPage};
use problem::Problem;

/// Default REST listen address of the `tickfleet-api` binary.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";

/// The REST routes over `api` and the polling jobs' `polls`.
pub fn router(api: Api, polls: crate::polls::Polls) -> Router {
    Router::new()
        .route("/v1/prices/latest", get(latest_price))
        .route("/v1/prices/poll", post(polls::create_poll))
        .route(
            "/v1/polls/{id}",
            get(polls::get_poll).delete(polls::delete_poll),
        )
        .route("/v1/ticks", get(list_ticks))
        .route("/v1/ticks/stream", get(stream_ticks))
        .route("/v1/candles", get(get_candles))
        .route("/v1/candles/stream", get(stream_candles))
        .route("/v1/moving-average", get(moving_average))
        .route("/v1/assets", get(list_assets))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::Extension(polls))
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            count_response,
        ))
        .with_state(api)
}

/// Counts every REST answer in `tickfleet_api_http_responses_total{method,route,status}`: `route` is
/// the route's template (`/v1/candles`), or `unmatched`; a method outside the standard ones is
/// `other`, so no client can mint label values.
async fn count_response(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let res = next.run(req).await;
    api.metrics
        .http_responses
        .with_label_values(&[method.as_str(), &route, res.status().as_str()])
        .inc();
    res
}

/// Who calls a REST route, as the rate limiter knows clients (the API key header when one is
/// configured, else the peer address); carried into the gRPC request, so REST and gRPC calls of one
/// client share its buckets.
#[derive(Debug, Clone, Copy)]
pub struct Caller(ClientId);

impl FromRequestParts<Api> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, Infallible> {
        let key = api
            .rate
            .limits()
            .key_header
            .as_ref()
            .and_then(|h| parts.headers.get(h.as_str()))
            .map(|v| v.as_bytes());
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Ok(Caller(api.rate.client(key, peer)))
    }
}

impl Caller {
    /// The gRPC request of this caller with message `msg`.
    pub fn request<T>(self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.extensions_mut().insert(self.0);
        r
    }
}

/// Parses a query string into `T`; a parameter that does not parse (or is unknown) is a 400 naming it.
// A Problem is made once per refused request and handed straight to axum: its size costs nothing.
#[allow(clippy::result_large_err)]
fn query<T: DeserializeOwned>(raw: Option<String>) -> Result<T, Problem> {
    let raw = raw.unwrap_or_default();
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.inner().to_string();
        // An unknown or missing parameter is reported at the top level; its name is in the message.
        let field = if path.is_empty() || path == "." || path == "?" {
            reason.split('`').nth(1).unwrap_or("query").to_owned()
        } else {
            path
        };
        Problem::invalid(&field, format!("{field}: {reason}"))
    })
}

/// The gRPC status of a failed call as a problem, with this route's parameter names.
fn failed(rename: &'static [(&'static str, &'static str)]) -> impl Fn(tonic::Status) -> Problem {
    move |status| Problem::from_status(&status, rename)
}

/// Splits `A,B` (and drops empty parts): a list of asset ids in one parameter.
fn ids(list: Option<String>) -> Vec<String> {
    list.unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

const SYMBOL: &[(&str, &str)] = &[("asset_id", "symbol")];
const SAME: &[(&str, &str)] = &[];

/// Query of `GET /v1/prices/latest`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LatestQuery {
    /// The symbol (asset id).
    #[param(required = true, example = "A0000")]
    pub symbol: Option<String>,
    /// Only a price from this provider: for a polled provider (`finnhub`, `alphavantage`, `yahoo`)
    /// its cached quote while it lasts, else the newest tick if its `source` is this provider (404 when
    /// it came from another).
    pub provider: Option<String>,
}

/// The newest price of a symbol (`GetLatest`).
#[utoipa::path(get, path = "/v1/prices/latest", params(LatestQuery), tag = "prices",
    responses(
        (status = 200, description = "The newest price", body = LatestPrice, headers(
            ("ETag" = String, description = "Strong validator of this body"),
            ("Cache-Control" = String, description = "`max-age=1`: a price may change at any time"))),
        (status = 304, description = "Not modified: `If-None-Match` named the current ETag"),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The symbol has no ticks (from that provider)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of the route's class, or the replica's limit of concurrent calls, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn latest_price(
    State(api): State<Api>,
    caller: Caller,
    axum::Extension(polls): axum::Extension<crate::polls::Polls>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let q: LatestQuery = query(raw)?;
    let symbol = q.symbol.unwrap_or_default();
    if let Some(provider) = &q.provider
        && !symbol.is_empty()
        && let Some(body) = polls::cached_latest(caller, &polls, provider, &symbol).await?
    {
        return Ok(conditional(&headers, &body, "max-age=1"));
    }
    let tick = api
        .get_latest(caller.request(v1::GetLatestRequest {
            asset_id: symbol.clone(),
        }))
        .await
        .map_err(failed(SYMBOL))?
        .into_inner()
        .tick
        .unwrap_or_default();
    if let Some(provider) = q.provider.filter(|p| *p != tick.source) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!(
                "no price of {symbol:?} from provider {provider:?}: its newest tick came from {:?}",
                tick.source
            ),
        ));
    }
    let body = LatestPrice {
        timestamp: model::rfc3339(tick.event_time_ns),
        symbol: tick.asset_id,
        price: tick.price,
        provider: tick.source,
    };
    Ok(conditional(&headers, &body, "max-age=1"))
}

/// A strong ETag of `body`: FNV-1a of its bytes (the same on every replica and every build).
fn etag_of(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

/// `body` as JSON with an `ETag` and `cache_control`, or `304 Not Modified` when the request's
/// `If-None-Match` names that ETag (or is `*`).
fn conditional(
    headers: &HeaderMap,
    body: &impl serde::Serialize,
    cache_control: &'static str,
) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let etag = etag_of(&bytes);
    let matched = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == "*" || t == etag)
        });
    let mut res = if matched {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    res
}

/// Query of `GET /v1/ticks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TicksQuery {
    /// The asset id.
    #[param(required = true, example = "A0000")]
    pub asset_id: Option<String>,
    /// Range start (inclusive), ns since the epoch; unset = the beginning.
    pub from_ns: Option<i64>,
    /// Range end (exclusive), ns since the epoch; unset = no end.
    pub to_ns: Option<i64>,
    /// Ticks per page, at most 10000 (unset or 0 = 1000).
    pub limit: Option<u32>,
    /// `next_page_token` of the previous page (same asset_id, from_ns, to_ns).
    pub page_token: Option<String>,
}

/// An asset's ticks in `[from_ns, to_ns)`, one page (`ListTicks`).
#[utoipa::path(get, path = "/v1/ticks", params(TicksQuery), tag = "ticks",
    responses(
        (status = 200, description = "One page of ticks", body = TicksPage),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The asset has no ticks", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of the route's class, or the replica's limit of concurrent calls, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn list_ticks(
    State(api): State<Api>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<TicksPage>, Problem> {
    let q: TicksQuery = query(raw)?;
    let page = api
        .list_ticks(caller.request(v1::ListTicksRequest {
            asset_id: q.asset_id.unwrap_or_default(),
            from_ns: q.from_ns,
            to_ns: q.to_ns,
            limit: q.limit.unwrap_or(0),
            page_token: q.page_token.unwrap_or_default(),
        }))
        .await
        .map_err(failed(SAME))?;
    Ok(Json(page.into_inner().into()))
}

/// Query of `GET /v1/candles`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CandlesQuery {
    /// The asset id.
    #[param(required = true, example = "A0000")]
    pub asset_id: Option<String>,
    /// Candle length: whole ms, s, m or h up to 1d (`1s`, `5s`, `1m`, `1h`, `1d`).
    #[param(required = true, example = "1m")]
    pub interval: Option<String>,
    /// Range start, ns since the epoch (rounded down to a candle start).
    pub from_ns: Option<i64>,
    /// Range end (exclusive), ns since the epoch.
    pub to_ns: Option<i64>,
}

/// OHLCV candles of an asset (`GetCandles`), with an `ETag` (`If-None-Match` → 304) and, when the
/// answer can no longer change ([`closed_range`]), `Cache-Control: public, max-age=31536000,
/// immutable`; else `max-age=1`.
#[utoipa::path(get, path = "/v1/candles", params(CandlesQuery), tag = "candles",
    responses(
        (status = 200, description = "The candles", body = Candles, headers(
            ("ETag" = String, description = "Strong validator of this body"),
            ("Cache-Control" = String, description = "`public, max-age=31536000, immutable` when `to_ns` is set and the whole range (rounded up to a candle end) is older than the late-tick horizon (`--candles-immutable-after-secs`): no tick can be added to it any more; else `max-age=1`"))),
        (status = 304, description = "Not modified: `If-None-Match` named the current ETag"),
        (status = 400, description = "A bad parameter, or a range of more than 10000 candles", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The asset has no ticks", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of the route's class, or the replica's limit of concurrent calls, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn get_candles(
    State(api): State<Api>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let q: CandlesQuery = query(raw)?;
    let interval = q.interval.unwrap_or_default();
    let r = api
        .get_candles(caller.request(v1::GetCandlesRequest {
            asset_id: q.asset_id.unwrap_or_default(),
            interval: interval.clone(),
            from_ns: q.from_ns,
            to_ns: q.to_ns,
        }))
        .await
        .map_err(failed(SAME))?
        .into_inner();
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    let closed = crate::calc::parse_interval(&interval)
        .is_ok_and(|i| closed_range(q.to_ns, i, now_ns, api.candles_immutable_after))
        && !r.candles.is_empty();
    let body = Candles {
        candles: r.candles.into_iter().map(Into::into).collect(),
    };
    let cache = if closed {
        "public, max-age=31536000, immutable"
    } else {
        "max-age=1"
    };
    Ok(conditional(&headers, &body, cache))
}

/// Whether the candles of a query ending at `to_ns` can no longer change at `now_ns`: the query
/// has an end, and its last candle (the end rounded up to a whole `interval`) ends at least
/// `horizon` before now. The workers take a late tick up to their skew-behind limit
/// (`--max-skew-behind-secs`) before their clock and fold it into its candle; `horizon` is that
/// limit plus a margin for clock differences and for a batch that waited for the store. Without an
/// end, a later tick would add candles to the same query. (Retention may still delete old ticks and
/// rollups later; what a cache keeps is then what was true, not what the store still holds.)
pub fn closed_range(
    to_ns: Option<i64>,
    interval: i64,
    now_ns: i64,
    horizon: std::time::Duration,
) -> bool {
    let Some(to) = to_ns else { return false };
    let start = crate::calc::bucket_start(to, interval);
    let end = if start == to {
        to
    } else {
        start.saturating_add(interval)
    };
    let horizon = i64::try_from(horizon.as_nanos()).unwrap_or(i64::MAX);
    end <= now_ns.saturating_sub(horizon)
}

/// Query of `GET /v1/moving-average`: `points` or `window`, one of them.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MovingAverageQuery {
    /// The asset id.
    #[param(required = true, example = "A0000")]
    pub asset_id: Option<String>,
    /// Average the last N ticks (1..=10000).
    pub points: Option<u32>,
    /// Average the ticks of this long back from the newest (`30s`, `1m`).
    pub window: Option<String>,
}

/// Simple moving average and VWAP of an asset (`GetMovingAverage`).
#[utoipa::path(get, path = "/v1/moving-average", params(MovingAverageQuery), tag = "prices",
    responses(
        (status = 200, description = "The averages", body = MovingAverage),
        (status = 400, description = "A bad parameter (or neither or both of points and window)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The asset has no ticks", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of the route's class, or the replica's limit of concurrent calls, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn moving_average(
    State(api): State<Api>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<MovingAverage>, Problem> {
    let q: MovingAverageQuery = query(raw)?;
    let over = match (q.points, q.window) {
        (Some(_), Some(_)) => {
            return Err(Problem::invalid("window", "set points or window, not both"));
        }
        (Some(p), None) => Some(Over::Points(p)),
        (None, Some(w)) => Some(Over::Window(w)),
        (None, None) => None,
    };
    let r = api
        .get_moving_average(caller.request(v1::GetMovingAverageRequest {
            asset_id: q.asset_id.unwrap_or_default(),
            over,
        }))
        .await
        .map_err(failed(SAME))?;
    Ok(Json(r.into_inner().into()))
}

/// Every asset id the store holds ticks of (`ListAssets`).
#[utoipa::path(get, path = "/v1/assets", tag = "assets",
    responses(
        (status = 200, description = "The asset ids", body = Assets),
        (status = 429, description = "This client's rate limit of the route's class, or the replica's limit of concurrent calls, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn list_assets(State(api): State<Api>, caller: Caller) -> Result<Json<Assets>, Problem> {
    let r = api
        .list_assets(caller.request(v1::ListAssetsRequest {}))
        .await
        .map_err(failed(SAME))?;
    Ok(Json(Assets {
        asset_ids: r.into_inner().asset_ids,
    }))
}

/// Query of the live streams.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Comma-separated asset ids (at most 1000); unset = every asset.
    #[param(example = "A0000,A0001")]
    pub asset_ids: Option<String>,
}

type Events = Sse<
    axum::response::sse::KeepAliveStream<
        futures::stream::BoxStream<'static, Result<Event, Infallible>>,
    >,
>;

/// Live ticks as Server-Sent Events (`StreamTicks`): `event: tick` with a [`Tick`] as its data,
/// `event: gap` with a [`Gap`] when this client missed some, `event: error` with a [`Problem`] before
/// the stream ends on a failure. The stream ends when the api shuts down.
#[utoipa::path(get, path = "/v1/ticks/stream", params(StreamQuery), tag = "ticks",
    responses(
        (status = 200, description = "The live ticks (text/event-stream: tick, gap and error events)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of opening streams, or the replica's limit of open streams, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn stream_ticks(
    State(api): State<Api>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Events, Problem> {
    let q: StreamQuery = query(raw)?;
    let stream = api
        .stream_ticks(caller.request(v1::StreamTicksRequest {
            asset_ids: ids(q.asset_ids),
        }))
        .await
        .map_err(failed(SAME))?
        .into_inner();
    Ok(sse(stream, |m| match m.event {
        Some(stream_ticks_response::Event::Tick(t)) => json_event("tick", &Tick::from(t)),
        Some(stream_ticks_response::Event::Gap(g)) => json_event("gap", &Gap::from(g)),
        None => Event::default().comment("empty message"),
    }))
}

/// Query of `GET /v1/candles/stream`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CandleStreamQuery {
    /// Comma-separated asset ids (at most 1000); unset = every asset.
    pub asset_ids: Option<String>,
    /// Candle length (`1s`, `1m`, …).
    #[param(required = true, example = "1s")]
    pub interval: Option<String>,
}

/// Live candles as Server-Sent Events (`StreamCandles`): `event: candle` with a [`Candle`](model::Candle)
/// on every change (`closed` once a later candle started), `event: gap`, `event: error`.
#[utoipa::path(get, path = "/v1/candles/stream", params(CandleStreamQuery), tag = "candles",
    responses(
        (status = 200, description = "The live candles (text/event-stream: candle, gap and error events)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of opening streams, or the replica's limit of open streams, is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn stream_candles(
    State(api): State<Api>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Events, Problem> {
    let q: CandleStreamQuery = query(raw)?;
    let stream = api
        .stream_candles(caller.request(v1::StreamCandlesRequest {
            asset_ids: ids(q.asset_ids),
            interval: q.interval.unwrap_or_default(),
        }))
        .await
        .map_err(failed(SAME))?
        .into_inner();
    Ok(sse(stream, |m| match m.event {
        Some(stream_candles_response::Event::Candle(c)) => {
            json_event("candle", &model::Candle::from(c))
        }
        Some(stream_candles_response::Event::Gap(g)) => json_event("gap", &Gap::from(g)),
        None => Event::default().comment("empty message"),
    }))
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    // Serializing these plain structs cannot fail; a comment keeps the stream going if it ever did.
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|e| Event::default().comment(format!("unserializable {name}: {e}")))
}

/// A gRPC stream as Server-Sent Events: each message as `event(message)`, a failure as an `error`
/// event with its problem (the stream ends after it), keep-alive comments in between.
fn sse<M: Send + 'static>(
    stream: impl Stream<Item = Result<M, tonic::Status>> + Send + 'static,
    event: fn(M) -> Event,
) -> Events {
    let events = stream.map(move |m| {
        Ok(match m {
            Ok(m) => event(m),
            Err(status) => json_event("error", &Problem::from_status(&status, SAME)),
        })
    });
    Sse::new(events.boxed()).keep_alive(KeepAlive::default())
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        Code::NotFound,
        "no such route; the api's routes are listed at /openapi.json and /docs",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unimplemented,
        "this route does not answer this method (see /openapi.json)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_candle_range_is_closed_once_its_rounded_end_is_past_the_horizon() {
        const S: i64 = 1_000_000_000;
        let horizon = Duration::from_secs(100);
        let now = 1_000 * S;
        // No end: a new tick adds candles to the same query.
        assert!(!closed_range(None, S, now, horizon));
        // An end 100 s before now, on a candle boundary: closed.
        assert!(closed_range(Some(900 * S), S, now, horizon));
        assert!(!closed_range(Some(900 * S + 1), S, now, horizon));
        // The end inside a minute candle counts as that candle's end: 840 s + 60 s = 900 s.
        assert!(closed_range(Some(841 * S), 60 * S, now, horizon));
        assert!(!closed_range(Some(901 * S), 60 * S, now, horizon));
        // A late tick up to the horizon old can still arrive.
        assert!(!closed_range(Some(950 * S), S, now, horizon));
    }
}

//! A local HTTP server answering as Finnhub, Alpha Vantage and Yahoo Finance do (their documented
//! response shapes, error bodies and 429s), from quotes a test sets, for the tests of the job runner
//! (and anyone trying it without provider keys). It counts polls per (provider, symbol) and the most
//! that were ever in flight at once for one pair, so a test can show that one runner polls a pair at a
//! time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tickfleet_service::CancellationToken;

/// The API key the fixture accepts (Finnhub's header, Alpha Vantage's `apikey`).
pub const FIXTURE_KEY: &str = "fixture-key";

#[derive(Debug, Default)]
struct PairState {
    quote: Option<(String, i64)>,
    polls: u64,
    in_flight: u32,
    max_in_flight: u32,
    /// canned answers served before the quote: (status, Retry-After seconds)
    failures: Vec<(u16, Option<u64>)>,
    times: Vec<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    pairs: HashMap<(String, String), PairState>,
    last_time: i64,
    latency: Duration,
}

/// A running fixture server (stops when dropped).
pub struct ProviderFixture {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

impl Drop for ProviderFixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ProviderFixture {
    /// Serves on `addr` (port 0: any); each answer waits `latency` first (so overlapping polls of a
    /// pair would be seen overlapping).
    pub async fn start(addr: SocketAddr, latency: Duration) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            latency,
            ..Inner::default()
        }));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/api/v1/quote", get(finnhub))
            .route("/query", get(alphavantage))
            .route("/v8/finance/chart/{symbol}", get(yahoo))
            .with_state(inner.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(ProviderFixture { addr, inner, stop })
    }

    /// The base URL (`http://127.0.0.1:PORT`) to give the connector for every provider.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on `provider` quotes `symbol` at `price` (decimal text, sent as the provider sends
    /// it), dated a second after any quote set before (and not before now). Returns that time (Unix s).
    pub fn set_quote(&self, provider: &str, symbol: &str, price: &str) -> i64 {
        let mut inner = self.lock();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let t = now.max(inner.last_time + 1);
        inner.last_time = t;
        inner
            .pairs
            .entry((provider.into(), symbol.into()))
            .or_default()
            .quote = Some((price.into(), t));
        t
    }

    /// The next `n` polls of the pair get `status` (429 with `Retry-After: retry_after` seconds when
    /// given; a 5xx otherwise) with the provider's error body.
    pub fn fail_next(
        &self,
        provider: &str,
        symbol: &str,
        n: usize,
        status: u16,
        retry_after: Option<u64>,
    ) {
        let mut inner = self.lock();
        let p = inner
            .pairs
            .entry((provider.into(), symbol.into()))
            .or_default();
        p.failures
            .extend(std::iter::repeat_n((status, retry_after), n));
    }

    /// Polls of the pair so far.
    pub fn polls(&self, provider: &str, symbol: &str) -> u64 {
        self.lock()
            .pairs
            .get(&(provider.into(), symbol.into()))
            .map_or(0, |p| p.polls)
    }

    /// The most polls of the pair that were ever in flight at once.
    pub fn max_in_flight(&self, provider: &str, symbol: &str) -> u32 {
        self.lock()
            .pairs
            .get(&(provider.into(), symbol.into()))
            .map_or(0, |p| p.max_in_flight)
    }

    /// When each poll of the pair arrived.
    pub fn poll_times(&self, provider: &str, symbol: &str) -> Vec<Instant> {
        self.lock()
            .pairs
            .get(&(provider.into(), symbol.into()))
            .map(|p| p.times.clone())
            .unwrap_or_default()
    }
}

enum Answer {
    Quote(String, i64),
    Failure(u16, Option<u64>),
    Unknown,
}

/// Counts a poll out when its answer is taken or its handler is dropped (the client went away, e.g.
/// a SIGKILLed connector): a cancelled poll must not stay "in flight".
struct InFlight<'a> {
    inner: &'a Mutex<Inner>,
    key: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = i.pairs.get_mut(&self.key) {
            p.in_flight -= 1;
        }
    }
}

/// Counts the poll in, waits the latency, takes the answer, counts it out.
async fn poll(inner: &Mutex<Inner>, provider: &str, symbol: &str) -> Answer {
    let key = (provider.to_owned(), symbol.to_owned());
    let latency = {
        let mut i = inner.lock().unwrap_or_else(|e| e.into_inner());
        let latency = i.latency;
        let p = i.pairs.entry(key.clone()).or_default();
        p.polls += 1;
        p.in_flight += 1;
        p.max_in_flight = p.max_in_flight.max(p.in_flight);
        p.times.push(Instant::now());
        latency
    };
    let guard = InFlight { inner, key };
    tokio::time::sleep(latency).await;
    let answer = {
        let mut i = inner.lock().unwrap_or_else(|e| e.into_inner());
        let p = i.pairs.entry(guard.key.clone()).or_default();
        if p.failures.is_empty() {
            match &p.quote {
                Some((price, t)) => Answer::Quote(price.clone(), *t),
                None => Answer::Unknown,
            }
        } else {
            let (s, r) = p.failures.remove(0);
            Answer::Failure(s, r)
        }
    };
    drop(guard);
    answer
}

fn reply(status: u16, retry_after: Option<u64>, content_type: &str, body: String) -> Response {
    let mut res = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, content_type.to_owned())],
        body,
    )
        .into_response();
    if let Some(r) = retry_after
        && let Ok(v) = r.to_string().parse()
    {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
}

const JSON: &str = "application/json; charset=utf-8";

async fn finnhub(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let token = headers
        .get("x-finnhub-token")
        .and_then(|v| v.to_str().ok())
        .or(q.get("token").map(String::as_str));
    if token != Some(FIXTURE_KEY) {
        return reply(401, None, JSON, r#"{"error":"Invalid API key"}"#.into());
    }
    let symbol = q.get("symbol").cloned().unwrap_or_default();
    match poll(&inner, "finnhub", &symbol).await {
        Answer::Quote(c, t) => reply(
            200,
            None,
            JSON,
            format!(r#"{{"c":{c},"d":null,"dp":null,"h":{c},"l":{c},"o":{c},"pc":{c},"t":{t}}}"#),
        ),
        Answer::Failure(429, r) => reply(
            429,
            r,
            JSON,
            r#"{"error":"API limit reached. Please try again later. Remaining Limit: 0"}"#.into(),
        ),
        Answer::Failure(s, r) => reply(s, r, JSON, r#"{"error":"Internal error"}"#.into()),
        Answer::Unknown => reply(
            200,
            None,
            JSON,
            r#"{"c":0,"d":null,"dp":null,"h":0,"l":0,"o":0,"pc":0,"t":0}"#.into(),
        ),
    }
}

async fn alphavantage(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if q.get("function").map(String::as_str) != Some("GLOBAL_QUOTE") || !q.contains_key("symbol") {
        return reply(200, None, JSON, r#"{"Error Message": "Invalid API call. Please retry or visit the documentation (https://www.alphavantage.co/documentation/) for GLOBAL_QUOTE."}"#.into());
    }
    if q.get("apikey").map(String::as_str) != Some(FIXTURE_KEY) {
        return reply(200, None, JSON, r#"{"Error Message": "the parameter apikey is invalid or missing. Please claim your free API key on (https://www.alphavantage.co/support/#api-key). It should take less than 20 seconds."}"#.into());
    }
    let symbol = q.get("symbol").cloned().unwrap_or_default();
    match poll(&inner, "alphavantage", &symbol).await {
        Answer::Quote(p, t) => {
            let day = chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            reply(
                200,
                None,
                JSON,
                format!(
                    r#"{{
    "Global Quote": {{
        "01. symbol": "{symbol}",
        "02. open": "{p}",
        "03. high": "{p}",
        "04. low": "{p}",
        "05. price": "{p}",
        "06. volume": "{t}",
        "07. latest trading day": "{day}",
        "08. previous close": "{p}",
        "09. change": "0.0000",
        "10. change percent": "0.0000%"
    }}
}}"#
                ),
            )
        }
        // Alpha Vantage says "over quota" with a 200 and an Information message
        Answer::Failure(429, _) => reply(200, None, JSON, r#"{"Information": "Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per day. Please subscribe to any of the premium plans at https://www.alphavantage.co/premium/ to instantly remove all daily rate limits."}"#.into()),
        Answer::Failure(s, r) => reply(s, r, "text/html", "<html><body>Service Unavailable</body></html>".into()),
        Answer::Unknown => reply(200, None, JSON, r#"{"Global Quote": {}}"#.into()),
    }
}

async fn yahoo(State(inner): State<Arc<Mutex<Inner>>>, Path(symbol): Path<String>) -> Response {
    match poll(&inner, "yahoo", &symbol).await {
        Answer::Quote(p, t) => reply(
            200,
            None,
            JSON,
            format!(
                r#"{{"chart":{{"result":[{{"meta":{{"currency":"USD","symbol":"{symbol}","exchangeName":"NMS","instrumentType":"EQUITY","regularMarketTime":{t},"gmtoffset":-14400,"timezone":"EDT","regularMarketPrice":{p},"chartPreviousClose":{p},"priceHint":2,"dataGranularity":"1d","range":"1d"}},"timestamp":[{t}],"indicators":{{"quote":[{{"close":[{p}]}}]}}}}],"error":null}}}}"#
            ),
        ),
        Answer::Failure(429, r) => reply(429, r, "text/plain", "Too Many Requests\r\n".into()),
        Answer::Failure(s, r) => reply(
            s,
            r,
            JSON,
            r#"{"chart":{"result":null,"error":{"code":"Internal Server Error","description":"Internal error"}}}"#.into(),
        ),
        Answer::Unknown => reply(
            404,
            None,
            JSON,
            r#"{"chart":{"result":null,"error":{"code":"Not Found","description":"No data found, symbol may be delisted"}}}"#.into(),
        ),
    }
}

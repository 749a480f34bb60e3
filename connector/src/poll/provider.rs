//! Market-data providers polled over HTTP: the [`Provider`] trait and its three implementations, each
//! reading its documented quote response exactly — prices are taken from the JSON *text* (serde_json's
//! `RawValue`, or the provider's own decimal strings) into [`Decimal`], never through `f64`.
//!
//! | provider | request | price, time |
//! |---|---|---|
//! | [`Finnhub`] | `GET /api/v1/quote?symbol=S`, key in `X-Finnhub-Token` | `c`, `t` (Unix s) |
//! | [`AlphaVantage`] | `GET /query?function=GLOBAL_QUOTE&symbol=S&apikey=K` | `Global Quote` → `05. price`, `07. latest trading day` |
//! | [`Yahoo`] | `GET /v8/finance/chart/S?interval=1d&range=1d` | `chart.result[0].meta` → `regularMarketPrice`, `regularMarketTime` (Unix s) |
//!
//! Rate limits: HTTP 429 on all three (with `Retry-After` when the provider sends one); Alpha Vantage
//! also answers 200 with an `Information` (or older `Note`) message when the key is over its quota.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use tickfleet_store::jobs::Observation;

/// Why a poll gave no price.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider says: too many requests (429, or Alpha Vantage's quota message); back off, for
    /// `retry_after` when it said how long.
    #[error("rate limited{}", .retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// An HTTP error status (the provider's message, when its body has one).
    #[error("HTTP {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// The provider's error message, or the start of the body.
        message: String,
    },
    /// A 200 whose body is the provider's error message (unknown symbol, bad call).
    #[error("provider error: {0}")]
    Api(String),
    /// The body is not the documented shape, or its price is not a positive decimal.
    #[error("unreadable response: {0}")]
    Parse(String),
    /// The request failed (connect, timeout, TLS).
    #[error("transport: {0}")]
    Transport(String),
}

impl ProviderError {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Status { .. } => "http_error",
            ProviderError::Api(_) => "provider_error",
            ProviderError::Parse(_) => "unreadable",
            ProviderError::Transport(_) => "transport",
        }
    }
}

/// One HTTP request of a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteRequest {
    /// Path and query, after the base URL (may hold the API key: never log it).
    pub path_and_query: String,
    /// Extra request headers (may hold the API key: never log them).
    pub headers: Vec<(&'static str, String)>,
}

/// A provider's answer as the poller received it.
#[derive(Debug, Clone)]
pub struct QuoteResponse {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, when present and in seconds (or an HTTP date, as the time until it).
    pub retry_after: Option<Duration>,
    /// The body as text.
    pub body: String,
    /// When it arrived, ns since the epoch.
    pub fetched_ns: i64,
}

/// A market-data provider: how to ask for one symbol's quote and how to read the answer.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name: the job's `provider`, the ticks' `source`.
    fn name(&self) -> &'static str;
    /// The public base URL (overridable with the connector's `--PROVIDER-url`).
    fn default_base_url(&self) -> &'static str;
    /// Whether it needs an API key.
    fn needs_key(&self) -> bool;
    /// The request for `symbol`'s quote.
    fn request(&self, symbol: &str, api_key: Option<&str>) -> QuoteRequest;
    /// Reads a response body (status 200) into an observation.
    fn parse(&self, body: &str, fetched_ns: i64) -> Result<Observation, ProviderError>;

    /// Reads any response: rate limits and error statuses first, then [`parse`](Self::parse).
    fn read(&self, response: &QuoteResponse) -> Result<Observation, ProviderError> {
        if response.status == 429 {
            return Err(ProviderError::RateLimited {
                retry_after: response.retry_after,
            });
        }
        if response.status != 200 {
            return Err(ProviderError::Status {
                status: response.status,
                message: error_message(&response.body),
            });
        }
        self.parse(&response.body, response.fetched_ns)
    }
}

/// The provider called `name` (one of [`tickfleet_store::jobs::PROVIDERS`]).
pub fn provider(name: &str) -> Option<Box<dyn Provider>> {
    match name {
        "finnhub" => Some(Box::new(Finnhub)),
        "alphavantage" => Some(Box::new(AlphaVantage)),
        "yahoo" => Some(Box::new(Yahoo)),
        _ => None,
    }
}

/// The provider's message in an error body (`{"error": …}`, Yahoo's `chart.error.description`,
/// Alpha Vantage's `Error Message`), else the body's first 200 characters.
fn error_message(body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let msg = v.as_ref().and_then(|v| {
        v.get("error")
            .and_then(|e| e.as_str().map(str::to_owned))
            .or_else(|| {
                v.pointer("/chart/error/description")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
            })
            .or_else(|| {
                v.get("Error Message")
                    .and_then(|e| e.as_str())
                    .map(str::to_owned)
            })
    });
    msg.unwrap_or_else(|| body.chars().take(200).collect())
}

/// A positive exact decimal from JSON number or string text.
fn price(text: &str) -> Result<Decimal, ProviderError> {
    let t = text.trim().trim_matches('"');
    let d = Decimal::from_str(t)
        .or_else(|_| Decimal::from_scientific(t))
        .map_err(|_| ProviderError::Parse(format!("price {t:?} is not a decimal")))?;
    if d <= Decimal::ZERO {
        return Err(ProviderError::Api(format!(
            "price {t}: no quote (unknown symbol?)"
        )));
    }
    Ok(d)
}

fn unix_seconds_ns(secs: i64) -> Result<i64, ProviderError> {
    if secs <= 0 {
        return Err(ProviderError::Api(format!(
            "time {secs}: no quote (unknown symbol?)"
        )));
    }
    secs.checked_mul(1_000_000_000)
        .ok_or_else(|| ProviderError::Parse(format!("time {secs} out of range")))
}

fn json<'a, T: Deserialize<'a>>(body: &'a str) -> Result<T, ProviderError> {
    serde_json::from_str(body).map_err(|e| ProviderError::Parse(e.to_string()))
}

/// Finnhub's quote endpoint (`/api/v1/quote`).
#[derive(Debug, Clone, Copy)]
pub struct Finnhub;

#[derive(Deserialize)]
struct FinnhubQuote<'a> {
    #[serde(borrow)]
    c: &'a RawValue,
    t: i64,
}

impl Provider for Finnhub {
    fn name(&self) -> &'static str {
        "finnhub"
    }
    fn default_base_url(&self) -> &'static str {
        "https://finnhub.io"
    }
    fn needs_key(&self) -> bool {
        true
    }
    fn request(&self, symbol: &str, api_key: Option<&str>) -> QuoteRequest {
        QuoteRequest {
            path_and_query: format!("/api/v1/quote?symbol={}", encode(symbol)),
            headers: api_key
                .map(|k| vec![("x-finnhub-token", k.to_owned())])
                .unwrap_or_default(),
        }
    }
    fn parse(&self, body: &str, fetched_ns: i64) -> Result<Observation, ProviderError> {
        let q: FinnhubQuote = json(body)?;
        let price = price(q.c.get())?;
        let time = unix_seconds_ns(q.t)?;
        Ok(Observation {
            price,
            provider_time_ns: time,
            event_time_ns: time,
            fetched_ns,
            raw: body.to_owned(),
        })
    }
}

/// Alpha Vantage's `GLOBAL_QUOTE` function (`/query`).
#[derive(Debug, Clone, Copy)]
pub struct AlphaVantage;

#[derive(Deserialize)]
struct AlphaVantageBody {
    #[serde(rename = "Global Quote")]
    quote: Option<AlphaVantageQuote>,
    #[serde(rename = "Information")]
    information: Option<String>,
    #[serde(rename = "Note")]
    note: Option<String>,
    #[serde(rename = "Error Message")]
    error: Option<String>,
}

#[derive(Deserialize)]
struct AlphaVantageQuote {
    #[serde(rename = "05. price")]
    price: Option<String>,
    #[serde(rename = "07. latest trading day")]
    day: Option<String>,
}

impl Provider for AlphaVantage {
    fn name(&self) -> &'static str {
        "alphavantage"
    }
    fn default_base_url(&self) -> &'static str {
        "https://www.alphavantage.co"
    }
    fn needs_key(&self) -> bool {
        true
    }
    fn request(&self, symbol: &str, api_key: Option<&str>) -> QuoteRequest {
        QuoteRequest {
            path_and_query: format!(
                "/query?function=GLOBAL_QUOTE&symbol={}&apikey={}",
                encode(symbol),
                encode(api_key.unwrap_or("demo"))
            ),
            headers: Vec::new(),
        }
    }
    fn parse(&self, body: &str, fetched_ns: i64) -> Result<Observation, ProviderError> {
        let b: AlphaVantageBody = json(body)?;
        if b.information.is_some() || b.note.is_some() {
            // the documented answer of a key over its quota (HTTP 200)
            return Err(ProviderError::RateLimited { retry_after: None });
        }
        if let Some(e) = b.error {
            return Err(ProviderError::Api(e));
        }
        let q = b
            .quote
            .ok_or_else(|| ProviderError::Parse("no \"Global Quote\"".into()))?;
        let (Some(p), Some(day)) = (q.price, q.day) else {
            return Err(ProviderError::Api(
                "empty \"Global Quote\" (unknown symbol?)".into(),
            ));
        };
        let price = price(&p)?;
        let day = chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d")
            .map_err(|_| ProviderError::Parse(format!("latest trading day {day:?}")))?;
        let day_ns = day
            .and_hms_opt(0, 0, 0)
            .and_then(|t| t.and_utc().timestamp_nanos_opt())
            .ok_or_else(|| ProviderError::Parse(format!("latest trading day {day}")))?;
        Ok(Observation {
            price,
            provider_time_ns: day_ns,
            // a day is too coarse for a tick's time: the tick is dated when it was fetched
            event_time_ns: fetched_ns,
            fetched_ns,
            raw: body.to_owned(),
        })
    }
}

/// Yahoo Finance's chart endpoint (`/v8/finance/chart/SYMBOL`), read from its `meta`.
#[derive(Debug, Clone, Copy)]
pub struct Yahoo;

#[derive(Deserialize)]
struct YahooBody<'a> {
    #[serde(borrow)]
    chart: YahooChart<'a>,
}

#[derive(Deserialize)]
struct YahooChart<'a> {
    #[serde(borrow)]
    result: Option<Vec<YahooResult<'a>>>,
    error: Option<YahooError>,
}

#[derive(Deserialize)]
struct YahooError {
    code: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize)]
struct YahooResult<'a> {
    #[serde(borrow)]
    meta: YahooMeta<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct YahooMeta<'a> {
    #[serde(borrow)]
    regular_market_price: Option<&'a RawValue>,
    regular_market_time: Option<i64>,
}

impl Provider for Yahoo {
    fn name(&self) -> &'static str {
        "yahoo"
    }
    fn default_base_url(&self) -> &'static str {
        "https://query1.finance.yahoo.com"
    }
    fn needs_key(&self) -> bool {
        false
    }
    fn request(&self, symbol: &str, _api_key: Option<&str>) -> QuoteRequest {
        QuoteRequest {
            path_and_query: format!("/v8/finance/chart/{}?interval=1d&range=1d", encode(symbol)),
            headers: Vec::new(),
        }
    }
    fn parse(&self, body: &str, fetched_ns: i64) -> Result<Observation, ProviderError> {
        let b: YahooBody = json(body)?;
        if let Some(e) = b.chart.error {
            return Err(ProviderError::Api(format!(
                "{}: {}",
                e.code.unwrap_or_default(),
                e.description.unwrap_or_default()
            )));
        }
        let meta = b
            .chart
            .result
            .and_then(|r| r.into_iter().next())
            .map(|r| r.meta)
            .ok_or_else(|| ProviderError::Parse("no chart.result".into()))?;
        let (Some(p), Some(t)) = (meta.regular_market_price, meta.regular_market_time) else {
            return Err(ProviderError::Api("no regularMarketPrice/Time".into()));
        };
        let price = price(p.get())?;
        let time = unix_seconds_ns(t)?;
        Ok(Observation {
            price,
            provider_time_ns: time,
            event_time_ns: time,
            fetched_ns,
            raw: body.to_owned(),
        })
    }
}

/// Percent-encodes a query or path component (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> QuoteResponse {
        QuoteResponse {
            status: 200,
            retry_after: None,
            body: body.to_owned(),
            fetched_ns: 1_700_000_000_123_456_789,
        }
    }

    // Finnhub's documented sample (https://finnhub.io/docs/api/quote).
    const FINNHUB: &str =
        r#"{"c":261.74,"h":263.31,"l":260.68,"o":261.07,"pc":259.45,"t":1582641000}"#;

    #[test]
    fn every_job_provider_is_implemented() {
        for name in tickfleet_store::jobs::PROVIDERS {
            assert_eq!(provider(name).map(|p| p.name()), Some(*name));
        }
        assert!(provider("bloomberg").is_none());
    }

    #[test]
    fn finnhub_reads_the_documented_quote_exactly() {
        let o = Finnhub.read(&ok(FINNHUB)).unwrap();
        assert_eq!(o.price.to_string(), "261.74");
        assert_eq!(o.event_time_ns, 1_582_641_000_000_000_000);
        assert_eq!(o.raw, FINNHUB);
        // digits f64 cannot hold survive: the text is the price
        let o = Finnhub
            .read(&ok(r#"{"c":0.1000000000000000055511151231,"t":1}"#))
            .unwrap();
        assert_eq!(o.price.to_string(), "0.1000000000000000055511151231");
        // an unknown symbol is all zeros
        let zero = r#"{"c":0,"d":null,"dp":null,"h":0,"l":0,"o":0,"pc":0,"t":0}"#;
        assert_eq!(
            Finnhub.read(&ok(zero)).unwrap_err().kind(),
            "provider_error"
        );
        let r = Finnhub.request("BINANCE:BTCUSDT", Some("secret"));
        assert_eq!(r.path_and_query, "/api/v1/quote?symbol=BINANCE%3ABTCUSDT");
        assert!(
            !r.path_and_query.contains("secret"),
            "the key goes in a header"
        );
        assert_eq!(r.headers, vec![("x-finnhub-token", "secret".to_owned())]);
    }

    #[test]
    fn finnhub_errors_and_rate_limits() {
        let r = Finnhub.read(&QuoteResponse {
            status: 401,
            body: r#"{"error":"Invalid API key"}"#.into(),
            ..ok("")
        });
        assert_eq!(
            r.unwrap_err(),
            ProviderError::Status {
                status: 401,
                message: "Invalid API key".into()
            }
        );
        let r = Finnhub.read(&QuoteResponse {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            body: r#"{"error":"API limit reached. Please try again later. Remaining Limit: 0"}"#
                .into(),
            ..ok("")
        });
        assert_eq!(
            r.unwrap_err(),
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            Finnhub.read(&ok("<html>")).unwrap_err().kind(),
            "unreadable"
        );
        assert_eq!(
            Finnhub
                .read(&ok(r#"{"c":"abc","t":5}"#))
                .unwrap_err()
                .kind(),
            "unreadable"
        );
    }

    // Alpha Vantage's documented sample (https://www.alphavantage.co/documentation/#latestprice).
    const ALPHAVANTAGE: &str = r#"{
    "Global Quote": {
        "01. symbol": "IBM",
        "02. open": "294.4800",
        "03. high": "297.6600",
        "04. low": "291.6500",
        "05. price": "293.8700",
        "06. volume": "3358389",
        "07. latest trading day": "2025-10-10",
        "08. previous close": "295.2400",
        "09. change": "-1.3700",
        "10. change percent": "-0.4640%"
    }
}"#;

    #[test]
    fn alphavantage_reads_the_documented_global_quote_exactly() {
        let o = AlphaVantage.read(&ok(ALPHAVANTAGE)).unwrap();
        assert_eq!(
            o.price.to_string(),
            "293.8700",
            "the provider's text, scale kept"
        );
        assert_eq!(
            o.provider_time_ns, 1_760_054_400_000_000_000,
            "2025-10-10T00:00Z"
        );
        assert_eq!(o.event_time_ns, o.fetched_ns, "a trading day dates no tick");
        let r = AlphaVantage.request("IBM", Some("k&y"));
        assert_eq!(
            r.path_and_query,
            "/query?function=GLOBAL_QUOTE&symbol=IBM&apikey=k%26y"
        );
    }

    #[test]
    fn alphavantage_quota_messages_are_rate_limits_and_errors_are_errors() {
        let info = r#"{"Information": "Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per day. Please subscribe to any of the premium plans at https://www.alphavantage.co/premium/ to instantly remove all daily rate limits."}"#;
        assert_eq!(
            AlphaVantage.read(&ok(info)).unwrap_err(),
            ProviderError::RateLimited { retry_after: None }
        );
        let note = r#"{"Note": "Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per minute and 500 calls per day."}"#;
        assert_eq!(
            AlphaVantage.read(&ok(note)).unwrap_err().kind(),
            "rate_limited"
        );
        let err = r#"{"Error Message": "Invalid API call. Please retry or visit the documentation (https://www.alphavantage.co/documentation/) for GLOBAL_QUOTE."}"#;
        assert!(
            matches!(AlphaVantage.read(&ok(err)).unwrap_err(), ProviderError::Api(m) if m.starts_with("Invalid API call"))
        );
        assert_eq!(
            AlphaVantage
                .read(&ok(r#"{"Global Quote": {}}"#))
                .unwrap_err()
                .kind(),
            "provider_error"
        );
    }

    // The shape of Yahoo's chart answer (query1.finance.yahoo.com/v8/finance/chart/AAPL), trimmed.
    const YAHOO: &str = r#"{"chart":{"result":[{"meta":{"currency":"USD","symbol":"AAPL","exchangeName":"NMS","fullExchangeName":"NasdaqGS","instrumentType":"EQUITY","firstTradeDate":345479400,"regularMarketTime":1727380801,"hasPrePostMarketData":true,"gmtoffset":-14400,"timezone":"EDT","exchangeTimezoneName":"America/New_York","regularMarketPrice":227.52,"fiftyTwoWeekHigh":229.65,"fiftyTwoWeekLow":164.08,"regularMarketDayHigh":228.5,"regularMarketDayLow":225.41,"regularMarketVolume":36636707,"chartPreviousClose":226.37,"priceHint":2,"dataGranularity":"1d","range":"1d"},"timestamp":[1727357400],"indicators":{"quote":[{"open":[227.3000030517578],"close":[227.52000427246094],"high":[228.5],"volume":[36636707],"low":[225.41000366210938]}],"adjclose":[{"adjclose":[227.52000427246094]}]}}],"error":null}}"#;

    #[test]
    fn yahoo_reads_the_chart_meta_exactly() {
        let o = Yahoo.read(&ok(YAHOO)).unwrap();
        assert_eq!(
            o.price.to_string(),
            "227.52",
            "meta's price, not the f32-ish close array"
        );
        assert_eq!(o.event_time_ns, 1_727_380_801_000_000_000);
        assert_eq!(
            Yahoo.request("^GSPC", None).path_and_query,
            "/v8/finance/chart/%5EGSPC?interval=1d&range=1d"
        );
    }

    #[test]
    fn yahoo_errors_and_rate_limits() {
        let nf = r#"{"chart":{"result":null,"error":{"code":"Not Found","description":"No data found, symbol may be delisted"}}}"#;
        assert_eq!(
            Yahoo
                .read(&QuoteResponse {
                    status: 404,
                    body: nf.into(),
                    ..ok("")
                })
                .unwrap_err(),
            ProviderError::Status {
                status: 404,
                message: "No data found, symbol may be delisted".into()
            }
        );
        assert!(
            matches!(Yahoo.read(&ok(nf)).unwrap_err(), ProviderError::Api(m) if m.contains("delisted"))
        );
        let r = Yahoo.read(&QuoteResponse {
            status: 429,
            body: "Too Many Requests\r\n".into(),
            ..ok("")
        });
        assert_eq!(
            r.unwrap_err(),
            ProviderError::RateLimited { retry_after: None }
        );
    }
}

//! A poll's HTTP side: one request to the provider (bounded by a deadline and a body limit, the URL
//! never logged), `Retry-After`, and the per-provider pause after errors and rate limits ([`Gate`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Provider, ProviderError, QuoteResponse, Shared};
use crate::{Backoff, Error};

/// Largest response body read (a quote is a few hundred bytes; Yahoo's chart a few kB).
const MAX_BODY: usize = 1 << 20;

/// Per-provider pauses after errors and rate limits (shared by every pair of the provider).
pub(super) struct Gate {
    min: Duration,
    max: Duration,
    state: Mutex<HashMap<&'static str, (Backoff, Instant)>>,
}

impl Gate {
    /// No provider paused; pauses grow from `min` to `max`.
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Gate {
            min,
            max,
            state: Mutex::default(),
        }
    }

    /// When the provider's pause ends, if it is paused.
    pub(super) fn open_at(&self, provider: &'static str) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.get(provider).map(|(_, until)| *until)
    }

    /// Pauses the provider after a failure: for `retry_after` when given, else the next backoff.
    pub(super) fn failed(&self, provider: &'static str, retry_after: Option<Duration>) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (backoff, until) = s.entry(provider).or_insert_with(|| {
            (
                Backoff {
                    min: self.min.max(Duration::from_millis(1)),
                    max: self.max.max(self.min),
                    attempt: 0,
                },
                Instant::now(),
            )
        });
        let wait = retry_after.unwrap_or_else(|| backoff.next());
        *until = (*until).max(Instant::now() + wait);
        wait
    }

    /// Ends the provider's pause.
    pub(super) fn succeeded(&self, provider: &'static str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(provider);
    }
}

/// The HTTPS (or HTTP, for tests' fake providers) client of every poll.
pub(super) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The client, with the platform's root certificates.
pub(super) fn http_client() -> Result<HttpClient, Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// `Retry-After`: seconds, or an HTTP date (as the time from now until it).
fn retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    let secs = at.timestamp() - chrono::Utc::now().timestamp();
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

impl Shared {
    /// One HTTP request of a poll (the URL may hold the key: it is not logged).
    pub(super) async fn fetch(
        &self,
        p: &dyn Provider,
        symbol: &str,
        timeout: Duration,
    ) -> Result<QuoteResponse, ProviderError> {
        let req = p.request(symbol, self.config.api_key(p));
        let uri = format!("{}{}", self.config.base_url(p), req.path_and_query);
        let mut builder = hyper::Request::get(uri).header(
            hyper::header::USER_AGENT,
            concat!("tickfleet-connector/", env!("CARGO_PKG_VERSION")),
        );
        for (k, v) in &req.headers {
            builder = builder.header(*k, v);
        }
        let request = builder
            .body(Empty::new())
            .map_err(|_| ProviderError::Transport("bad request URL (symbol or base URL)".into()))?;
        let transport = |e: String| ProviderError::Transport(e);
        let deadline = tokio::time::Instant::now() + timeout;
        let res = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| transport("timed out".into()))?
            // the error's text names the host, never the path or headers
            .map_err(|e| transport(format!("{e}")))?;
        let status = res.status().as_u16();
        let retry = res
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body =
            tokio::time::timeout_at(deadline, Limited::new(res.into_body(), MAX_BODY).collect())
                .await
                .map_err(|_| transport("body timed out".into()))?
                .map_err(|e| transport(format!("body: {e}")))?
                .to_bytes();
        Ok(QuoteResponse {
            status,
            retry_after: retry,
            body: String::from_utf8_lossy(&body).into_owned(),
            fetched_ns: now_ns(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past: now"
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let d = retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn a_rate_limit_pauses_the_provider_for_retry_after_and_a_success_resumes_it() {
        let gate = Gate::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(gate.open_at("finnhub"), None);
        let before = Instant::now();
        assert_eq!(
            gate.failed("finnhub", Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert!(gate.open_at("finnhub").unwrap() >= before + Duration::from_secs(30));
        assert_eq!(gate.open_at("yahoo"), None, "per provider");
        let w = gate.failed("yahoo", None);
        assert!(
            w >= Duration::from_millis(50) && w <= Duration::from_millis(100),
            "{w:?}"
        );
        let w = gate.failed("yahoo", None);
        assert!(
            w >= Duration::from_millis(100) && w <= Duration::from_millis(200),
            "doubles: {w:?}"
        );
        gate.succeeded("finnhub");
        assert_eq!(gate.open_at("finnhub"), None);
    }
}

//! `tickfleet.v1.PollService`: provider polling jobs and cached quotes over a [`JobStore`] (the jobs
//! run in `tickfleet-connector poll`; see [`tickfleet_store::jobs`]). The REST routes
//! `POST /v1/prices/poll`, `GET`/`DELETE /v1/polls/{id}` and `GET /v1/prices/latest?provider=` call
//! these methods.

use std::collections::HashSet;
use std::sync::Arc;

use rand::Rng;
use tickfleet_proto::v1::{self, poll_service_server::PollService};
use tickfleet_store::JobStore;
use tickfleet_store::jobs::{PROVIDERS, Pair, PollJob};
use tonic::{Request, Response, Status};

use crate::ratelimit::{Class, RateLimiter};
use crate::validate::invalid;

/// Most symbols in one job.
pub const MAX_SYMBOLS: usize = 100;
/// Longest symbol (bytes).
pub const MAX_SYMBOL_LEN: usize = 32;
/// Shortest polling interval.
pub const MIN_INTERVAL_NS: i64 = 100_000_000;
/// Longest polling interval.
pub const MAX_INTERVAL_NS: i64 = 86_400_000_000_000;

/// The service, over the jobs' store (`None`: an api without Redis answers FAILED_PRECONDITION),
/// rate limited per client like the api's other methods (`GetPollJob` and `GetQuote` are reads, the
/// others writes).
#[derive(Clone)]
pub struct Polls {
    jobs: Option<Arc<dyn JobStore>>,
    rate: RateLimiter,
}

impl Polls {
    /// Over `jobs`, limited by `rate`.
    pub fn new(jobs: Option<Arc<dyn JobStore>>, rate: RateLimiter) -> Self {
        Polls { jobs, rate }
    }

    #[allow(clippy::result_large_err)]
    fn admit<T>(&self, method: &str, request: &Request<T>) -> Result<(), Status> {
        self.rate
            .check(Class::of(method), self.rate.client_of(request))
    }

    fn store(&self) -> Result<&dyn JobStore, Status> {
        self.jobs.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "polling jobs need Redis: this api runs without one (--store postgres)",
            )
        })
    }
}

fn unavailable(e: tickfleet_store::StoreError) -> Status {
    Status::unavailable(format!("store: {e}"))
}

/// Checks a create request: `(provider, symbols, interval_ms)`.
pub fn validate_create(r: &v1::CreatePollJobRequest) -> Result<(String, Vec<String>, u64), Status> {
    if r.provider.is_empty() {
        return Err(invalid(
            "provider",
            format!("provider is required: one of {}", PROVIDERS.join(", ")),
        ));
    }
    if !PROVIDERS.contains(&r.provider.as_str()) {
        return Err(invalid(
            "provider",
            format!(
                "provider {:?} is not one of {}",
                r.provider,
                PROVIDERS.join(", ")
            ),
        ));
    }
    if r.symbols.is_empty() {
        return Err(invalid(
            "symbols",
            "symbols is required: at least one symbol",
        ));
    }
    if r.symbols.len() > MAX_SYMBOLS {
        return Err(invalid(
            "symbols",
            format!(
                "symbols holds {}; the most one job polls is {MAX_SYMBOLS}",
                r.symbols.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for s in &r.symbols {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || ".^=:_-".contains(c);
        if s.is_empty() || s.len() > MAX_SYMBOL_LEN || !s.chars().all(ok_char) {
            return Err(invalid(
                "symbols",
                format!(
                    "symbols: symbol {s:?} is not 1..={MAX_SYMBOL_LEN} characters of A-Z a-z 0-9 . ^ = : _ -"
                ),
            ));
        }
        if !seen.insert(s.as_str()) {
            return Err(invalid(
                "symbols",
                format!("symbols: {s:?} is listed twice"),
            ));
        }
    }
    if r.interval.is_empty() {
        return Err(invalid("interval", "interval is required (e.g. 5s, 1m)"));
    }
    let ns = tickfleet_service::parse_duration_ns(&r.interval)
        .map_err(|e| invalid("interval", format!("interval {:?}: {e}", r.interval)))?;
    if !(MIN_INTERVAL_NS..=MAX_INTERVAL_NS).contains(&ns) {
        return Err(invalid(
            "interval",
            format!("interval {:?} is outside 100ms..=1d", r.interval),
        ));
    }
    Ok((
        r.provider.clone(),
        r.symbols.clone(),
        (ns / 1_000_000) as u64,
    ))
}

fn interval_text(ms: u64) -> String {
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(n) {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

fn to_proto(job: &PollJob) -> v1::PollJob {
    v1::PollJob {
        id: job.id.clone(),
        provider: job.provider.clone(),
        symbols: job.symbols.clone(),
        interval: interval_text(job.interval_ms),
        created_ns: job.created_ns,
        status: Vec::new(),
    }
}

fn quote_proto(q: tickfleet_store::jobs::Quote) -> v1::Quote {
    v1::Quote {
        provider: q.provider,
        symbol: q.symbol,
        price: q.price.to_string(),
        time_ns: q.time_ns,
        fetched_ns: q.fetched_ns,
        raw_id: q.raw_id,
    }
}

fn job_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(invalid(field, format!("{field} is required")));
    }
    if id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid(field, format!("{field} {id:?} is not a job id")));
    }
    Ok(())
}

#[tonic::async_trait]
impl PollService for Polls {
    async fn create_poll_job(
        &self,
        request: Request<v1::CreatePollJobRequest>,
    ) -> Result<Response<v1::PollJob>, Status> {
        self.admit("CreatePollJob", &request)?;
        let (provider, symbols, interval_ms) = validate_create(request.get_ref())?;
        let store = self.store()?;
        let id = format!("{:016x}", rand::rng().random::<u64>());
        let job = PollJob {
            id,
            provider,
            symbols,
            interval_ms,
            created_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        };
        store.create_job(&job).await.map_err(unavailable)?;
        tracing::info!(job = %job.id, provider = %job.provider, symbols = job.symbols.len(), interval_ms, "poll job created");
        Ok(Response::new(to_proto(&job)))
    }

    async fn get_poll_job(
        &self,
        request: Request<v1::GetPollJobRequest>,
    ) -> Result<Response<v1::PollJob>, Status> {
        self.admit("GetPollJob", &request)?;
        let id = &request.get_ref().id;
        job_id("id", id)?;
        let store = self.store()?;
        let job = store
            .job(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("no poll job {id:?}")))?;
        let mut out = to_proto(&job);
        for s in &job.symbols {
            let pair = Pair::new(&job.provider, s);
            let lease = store.holder(&pair).await.map_err(unavailable)?;
            let quote = store.quote(&pair).await.map_err(unavailable)?;
            out.status.push(v1::SymbolStatus {
                symbol: s.clone(),
                holder: lease.as_ref().map(|l| l.holder.clone()).unwrap_or_default(),
                fence: lease.map_or(0, |l| l.token),
                quote: quote.map(quote_proto),
            });
        }
        Ok(Response::new(out))
    }

    async fn delete_poll_job(
        &self,
        request: Request<v1::DeletePollJobRequest>,
    ) -> Result<Response<v1::DeletePollJobResponse>, Status> {
        self.admit("DeletePollJob", &request)?;
        let id = &request.get_ref().id;
        job_id("id", id)?;
        if !self.store()?.delete_job(id).await.map_err(unavailable)? {
            return Err(Status::not_found(format!("no poll job {id:?}")));
        }
        tracing::info!(job = %id, "poll job deleted");
        Ok(Response::new(v1::DeletePollJobResponse {}))
    }

    async fn get_quote(
        &self,
        request: Request<v1::GetQuoteRequest>,
    ) -> Result<Response<v1::Quote>, Status> {
        self.admit("GetQuote", &request)?;
        let r = request.get_ref();
        if !PROVIDERS.contains(&r.provider.as_str()) {
            return Err(invalid(
                "provider",
                format!(
                    "provider {:?} is not one of {}",
                    r.provider,
                    PROVIDERS.join(", ")
                ),
            ));
        }
        crate::validate::asset_id("symbol", &r.symbol)?;
        let q = self
            .store()?
            .quote(&Pair::new(&r.provider, &r.symbol))
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no cached quote of {:?} from {:?}",
                    r.symbol, r.provider
                ))
            })?;
        Ok(Response::new(quote_proto(q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickfleet_store::MemoryJobs;

    fn req(symbols: &[&str], interval: &str, provider: &str) -> v1::CreatePollJobRequest {
        v1::CreatePollJobRequest {
            symbols: symbols.iter().map(|s| (*s).to_owned()).collect(),
            interval: interval.into(),
            provider: provider.into(),
        }
    }

    fn field(s: &Status) -> &str {
        crate::validate::field_of(s).unwrap_or("")
    }

    #[test]
    fn create_requests_are_validated_naming_the_field() {
        assert_eq!(
            validate_create(&req(
                &["AAPL", "^GSPC", "BINANCE:BTCUSDT", "EURUSD=X"],
                "5s",
                "yahoo"
            ))
            .unwrap(),
            (
                "yahoo".into(),
                vec![
                    "AAPL".into(),
                    "^GSPC".into(),
                    "BINANCE:BTCUSDT".into(),
                    "EURUSD=X".into()
                ],
                5000
            )
        );
        for (r, f) in [
            (req(&["AAPL"], "5s", ""), "provider"),
            (req(&["AAPL"], "5s", "bloomberg"), "provider"),
            (req(&[], "5s", "finnhub"), "symbols"),
            (req(&["AA PL"], "5s", "finnhub"), "symbols"),
            (req(&["{x}"], "5s", "finnhub"), "symbols"),
            (req(&["AAPL", "AAPL"], "5s", "finnhub"), "symbols"),
            (req(&["AAPL"], "", "finnhub"), "interval"),
            (req(&["AAPL"], "5 s", "finnhub"), "interval"),
            (req(&["AAPL"], "10ms", "finnhub"), "interval"),
            (req(&["AAPL"], "2d", "finnhub"), "interval"),
        ] {
            let e = validate_create(&r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{r:?}");
            assert_eq!(field(&e), f, "{r:?}: {}", e.message());
            assert!(e.message().contains(f), "{}", e.message());
        }
        let many: Vec<String> = (0..101).map(|i| format!("S{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            field(&validate_create(&req(&many, "1s", "finnhub")).unwrap_err()),
            "symbols"
        );
        assert_eq!(interval_text(5000), "5s");
        assert_eq!(interval_text(250), "250ms");
        assert_eq!(interval_text(120_000), "2m");
    }

    #[tokio::test]
    async fn jobs_are_created_read_and_deleted() {
        let polls = Polls::new(Some(Arc::new(MemoryJobs::new())), RateLimiter::default());
        let job = polls
            .create_poll_job(Request::new(req(&["AAPL", "MSFT"], "1m", "finnhub")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(job.id.len(), 16);
        assert_eq!((job.interval.as_str(), job.symbols.len()), ("1m", 2));
        let got = polls
            .get_poll_job(Request::new(v1::GetPollJobRequest { id: job.id.clone() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.status.len(), 2);
        assert_eq!(got.status[0].holder, "", "nobody polls it yet");
        let id = || v1::DeletePollJobRequest { id: job.id.clone() };
        polls.delete_poll_job(Request::new(id())).await.unwrap();
        let e = polls.delete_poll_job(Request::new(id())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = polls
            .get_poll_job(Request::new(v1::GetPollJobRequest {
                id: "no/such".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!((e.code(), field(&e)), (tonic::Code::InvalidArgument, "id"));
        let e = polls
            .get_quote(Request::new(v1::GetQuoteRequest {
                provider: "yahoo".into(),
                symbol: "AAPL".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let none = Polls::new(None, RateLimiter::default());
        let e = none
            .create_poll_job(Request::new(req(&["AAPL"], "1m", "finnhub")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    }
}

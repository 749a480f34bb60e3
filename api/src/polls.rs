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

use crate::service::Api;
use crate::validate::invalid;

/// Most symbols in one job.
pub const MAX_SYMBOLS: usize = 100;
/// Longest symbol (bytes).
pub const MAX_SYMBOL_LEN: usize = 32;
/// Shortest polling interval.
pub const MIN_INTERVAL_NS: i64 = 100_000_000;
/// Longest polling interval.
pub const MAX_INTERVAL_NS: i64 = 86_400_000_000_000;

/// The service, over the jobs' store (`None`: an api without Redis answers FAILED_PRECONDITION).
/// Each call runs as a [`TickService`](tickfleet_proto::v1::tick_service_server::TickService) call
/// does, through the same [`Api`]: the client's rate limit (`GetPollJob` and `GetQuote` are reads,
/// the others writes), the replica's call limit, the client's deadline, the store timeout, and the
/// `tickfleet_api_*` metrics (a refusal counts in `rejected_total` like any other).
#[derive(Clone)]
pub struct Polls {
    jobs: Option<Arc<dyn JobStore>>,
    api: Api,
}

impl Polls {
    /// Over `jobs`, with the limits, deadlines and metrics of `api`.
    pub fn new(jobs: Option<Arc<dyn JobStore>>, api: Api) -> Self {
        Polls { jobs, api }
    }

    fn store(&self) -> Result<&dyn JobStore, Status> {
        self.jobs.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "polling jobs need Redis: this api runs without one (--store postgres)",
            )
        })
    }
}

/// Checks a request's `provider`: one of [`PROVIDERS`].
fn provider(p: &str) -> Result<(), Status> {
    if p.is_empty() {
        return Err(invalid(
            "provider",
            format!("provider is required: one of {}", PROVIDERS.join(", ")),
        ));
    }
    if !PROVIDERS.contains(&p) {
        return Err(invalid(
            "provider",
            format!("provider {p:?} is not one of {}", PROVIDERS.join(", ")),
        ));
    }
    Ok(())
}

/// Checks a create request: `(provider, symbols, interval_ms)`.
pub fn validate_create(r: &v1::CreatePollJobRequest) -> Result<(String, Vec<String>, u64), Status> {
    provider(&r.provider)?;
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
        let call = self.api.call(&request);
        let r = request.into_inner();
        self.api
            .unary("CreatePollJob", call, async {
                let (provider, symbols, interval_ms) = validate_create(&r)?;
                let store = self.store()?;
                let id = format!("{:016x}", rand::rng().random::<u64>());
                let job = PollJob {
                    id,
                    provider,
                    symbols,
                    interval_ms,
                    created_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
                };
                self.api
                    .store_call("create_job", store.create_job(&job))
                    .await?;
                tracing::info!(job = %job.id, provider = %job.provider, symbols = job.symbols.len(), interval_ms, "poll job created");
                Ok(to_proto(&job))
            })
            .await
    }

    async fn get_poll_job(
        &self,
        request: Request<v1::GetPollJobRequest>,
    ) -> Result<Response<v1::PollJob>, Status> {
        let call = self.api.call(&request);
        let id = request.into_inner().id;
        self.api
            .unary("GetPollJob", call, async {
                job_id("id", &id)?;
                let store = self.store()?;
                let job = self
                    .api
                    .store_call("job", store.job(&id))
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no poll job {id:?}")))?;
                let mut out = to_proto(&job);
                for s in &job.symbols {
                    let pair = Pair::new(&job.provider, s);
                    let lease = self.api.store_call("holder", store.holder(&pair)).await?;
                    let quote = self.api.store_call("quote", store.quote(&pair)).await?;
                    out.status.push(v1::SymbolStatus {
                        symbol: s.clone(),
                        holder: lease.as_ref().map(|l| l.holder.clone()).unwrap_or_default(),
                        fence: lease.map_or(0, |l| l.token),
                        quote: quote.map(quote_proto),
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn delete_poll_job(
        &self,
        request: Request<v1::DeletePollJobRequest>,
    ) -> Result<Response<v1::DeletePollJobResponse>, Status> {
        let call = self.api.call(&request);
        let id = request.into_inner().id;
        self.api
            .unary("DeletePollJob", call, async {
                job_id("id", &id)?;
                let store = self.store()?;
                if !self
                    .api
                    .store_call("delete_job", store.delete_job(&id))
                    .await?
                {
                    return Err(Status::not_found(format!("no poll job {id:?}")));
                }
                tracing::info!(job = %id, "poll job deleted");
                Ok(v1::DeletePollJobResponse {})
            })
            .await
    }

    async fn get_quote(
        &self,
        request: Request<v1::GetQuoteRequest>,
    ) -> Result<Response<v1::Quote>, Status> {
        let call = self.api.call(&request);
        let r = request.into_inner();
        self.api
            .unary("GetQuote", call, async {
                provider(&r.provider)?;
                crate::validate::asset_id("symbol", &r.symbol)?;
                let store = self.store()?;
                let q = self
                    .api
                    .store_call("quote", store.quote(&Pair::new(&r.provider, &r.symbol)))
                    .await?
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "no cached quote of {:?} from {:?}",
                            r.symbol, r.provider
                        ))
                    })?;
                Ok(quote_proto(q))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ApiMetrics;
    use tickfleet_store::{MemoryJobs, MemoryStore};

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

    /// An api over an empty store.
    fn api() -> Api {
        let metrics = ApiMetrics::new(&prometheus::Registry::new()).unwrap();
        Api::new(
            Arc::new(MemoryStore::new()),
            metrics,
            tickfleet_service::CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn jobs_are_created_read_and_deleted() {
        let polls = Polls::new(Some(Arc::new(MemoryJobs::new())), api());
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
        let none = Polls::new(None, api());
        let e = none
            .create_poll_job(Request::new(req(&["AAPL"], "1m", "finnhub")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    }
}

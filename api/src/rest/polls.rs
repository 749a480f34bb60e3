//! The REST routes of the polling jobs: `POST /v1/prices/poll` (202 with the job), `GET` and
//! `DELETE /v1/polls/{id}`, each calling its `tickfleet.v1.PollService` method ([`Polls`]).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tickfleet_proto::v1::{self, poll_service_server::PollService};
use utoipa::ToSchema;

use super::Caller;
use super::model::rfc3339;
use super::problem::Problem;
use crate::polls::Polls;

/// Body of `POST /v1/prices/poll`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    /// The provider's symbols (1..=100, each 1..=32 of `A-Z a-z 0-9 . ^ = : _ -`), no repeats.
    #[schema(example = json!(["AAPL", "MSFT"]))]
    pub symbols: Option<Vec<String>>,
    /// Time between two polls of a symbol, 100ms..=1d (`5s`, `1m`).
    #[schema(example = "5s")]
    pub interval: Option<String>,
    /// `finnhub`, `alphavantage` or `yahoo`.
    #[schema(example = "finnhub")]
    pub provider: Option<String>,
}

/// A cached quote: the newest poll's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Quote {
    /// Exact decimal price.
    #[schema(pattern = r"^[0-9]+(\.[0-9]+)?$")]
    pub price: String,
    /// The price's time, RFC 3339 UTC.
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// When it was fetched, RFC 3339 UTC.
    #[schema(format = DateTime)]
    pub fetched_at: String,
    /// Id of the kept raw response (also the `tickfleet-raw-id` header of its tick on Kafka).
    pub raw_id: String,
}

/// A symbol's polling status.
#[derive(Debug, Serialize, ToSchema)]
pub struct SymbolStatus {
    /// The symbol.
    pub symbol: String,
    /// The connector polling it now (absent: nobody yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Its lease's fencing token (decimal string; with `holder`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9]+$")]
    pub fence: Option<String>,
    /// The cached quote, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quote: Option<Quote>,
}

/// A polling job.
#[derive(Debug, Serialize, ToSchema)]
pub struct PollJob {
    /// The job's id.
    #[schema(example = "5f0c2d1e9a7b3c44")]
    pub id: String,
    /// The provider.
    pub provider: String,
    /// The symbols.
    pub symbols: Vec<String>,
    /// The polling interval, as created.
    pub interval: String,
    /// When it was created, RFC 3339 UTC.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Per symbol (in `GET /v1/polls/{id}`; empty in the 202).
    pub status: Vec<SymbolStatus>,
}

impl From<v1::PollJob> for PollJob {
    fn from(j: v1::PollJob) -> Self {
        PollJob {
            id: j.id,
            provider: j.provider,
            symbols: j.symbols,
            interval: j.interval,
            created_at: rfc3339(j.created_ns),
            status: j
                .status
                .into_iter()
                .map(|s| SymbolStatus {
                    symbol: s.symbol,
                    holder: (!s.holder.is_empty()).then(|| s.holder.clone()),
                    fence: (!s.holder.is_empty()).then(|| s.fence.to_string()),
                    quote: s.quote.map(Into::into),
                })
                .collect(),
        }
    }
}

impl From<v1::Quote> for Quote {
    fn from(q: v1::Quote) -> Self {
        Quote {
            price: q.price,
            timestamp: rfc3339(q.time_ns),
            fetched_at: rfc3339(q.fetched_ns),
            raw_id: q.raw_id,
        }
    }
}

const SAME: &[(&str, &str)] = &[];

/// Creates a polling job (`CreatePollJob`): 202 with the job and its `Location`; the connectors
/// (`tickfleet-connector poll`) start polling it at their next scan.
#[utoipa::path(post, path = "/v1/prices/poll", tag = "polls", request_body = PollRequest,
    responses(
        (status = 202, description = "The job, accepted", body = PollJob, headers(
            ("Location" = String, description = "`/v1/polls/{id}`"))),
        (status = 400, description = "A bad field (or a body that is not the documented JSON)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit of writes is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn create_poll(
    caller: Caller,
    Extension(polls): Extension<Polls>,
    body: Bytes,
) -> Result<Response, Problem> {
    let mut de = serde_json::Deserializer::from_slice(&body);
    let r: PollRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            e.inner()
                .to_string()
                .split('`')
                .nth(1)
                .unwrap_or("body")
                .to_owned()
        } else {
            path.split(['[', '.']).next().unwrap_or("body").to_owned()
        };
        Problem::invalid(&field, format!("{field}: {}", e.inner()))
    })?;
    let job = polls
        .create_poll_job(caller.request(v1::CreatePollJobRequest {
            symbols: r.symbols.unwrap_or_default(),
            interval: r.interval.unwrap_or_default(),
            provider: r.provider.unwrap_or_default(),
        }))
        .await
        .map_err(|s| Problem::from_status(&s, SAME))?
        .into_inner();
    let location = format!("/v1/polls/{}", job.id);
    let mut res = (StatusCode::ACCEPTED, axum::Json(PollJob::from(job))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

/// A polling job with each symbol's holder and cached quote (`GetPollJob`).
#[utoipa::path(get, path = "/v1/polls/{id}", tag = "polls",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = PollJob),
        (status = 400, description = "Not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn get_poll(
    caller: Caller,
    Extension(polls): Extension<Polls>,
    Path(id): Path<String>,
) -> Result<axum::Json<PollJob>, Problem> {
    let job = polls
        .get_poll_job(caller.request(v1::GetPollJobRequest { id }))
        .await
        .map_err(|s| Problem::from_status(&s, SAME))?;
    Ok(axum::Json(job.into_inner().into()))
}

/// Deletes a polling job (`DeletePollJob`): 204; its symbols stop being polled at the connectors'
/// next scan (unless another job polls them).
#[utoipa::path(delete, path = "/v1/polls/{id}", tag = "polls",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "This client's rate limit is reached", body = Problem, content_type = "application/problem+json", headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ))]
pub async fn delete_poll(
    caller: Caller,
    Extension(polls): Extension<Polls>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    polls
        .delete_poll_job(caller.request(v1::DeletePollJobRequest { id }))
        .await
        .map_err(|s| Problem::from_status(&s, SAME))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cached quote of (provider, symbol) as a latest price, if there is one.
// A Problem is made once per refused request and handed straight to axum: its size costs nothing.
#[allow(clippy::result_large_err)]
pub(super) async fn cached_latest(
    caller: Caller,
    polls: &Polls,
    provider: &str,
    symbol: &str,
) -> Result<Option<super::model::LatestPrice>, Problem> {
    if !tickfleet_store::jobs::PROVIDERS.contains(&provider) {
        return Ok(None);
    }
    match polls
        .get_quote(caller.request(v1::GetQuoteRequest {
            provider: provider.to_owned(),
            symbol: symbol.to_owned(),
        }))
        .await
    {
        Ok(q) => {
            let q = q.into_inner();
            Ok(Some(super::model::LatestPrice {
                symbol: q.symbol,
                price: q.price,
                timestamp: rfc3339(q.time_ns),
                provider: q.provider,
            }))
        }
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(None)
        }
        Err(s) => Err(Problem::from_status(&s, &[("asset_id", "symbol")])),
    }
}

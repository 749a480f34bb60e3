//! RFC 9457 problem details (`application/problem+json`): every REST error, made from the gRPC
//! status the one implementation answers with, so both sides fail the same way for the same reason.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

use crate::metrics::code_name;
use crate::validate;

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the HTTP status and `code` say what kind of problem it is.
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub kind: String,
    /// The HTTP status phrase.
    #[schema(example = "Bad Request")]
    pub title: String,
    /// The HTTP status code.
    #[schema(example = 400, minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong, for a human.
    #[schema(example = "limit is 20000; the most ticks one page holds is 10000 (0 = 1000)")]
    pub detail: String,
    /// The gRPC status code name the same request gets on the gRPC api.
    #[schema(example = "INVALID_ARGUMENT")]
    pub code: String,
    /// The query parameter the problem is about, when it is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "limit")]
    pub field: Option<String>,
    /// Why that parameter was refused (with `field`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "limit is 20000; the most ticks one page holds is 10000 (0 = 1000)")]
    pub reason: Option<String>,
    /// Seconds to wait before retrying (with 429 and 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with `status`, the gRPC `code` it corresponds to, and `detail`.
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code_name(code).into(),
            field: None,
            reason: None,
            retry_after: None,
        }
    }

    /// A 400 about one query parameter.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Problem {
            field: Some(field.into()),
            reason: Some(reason.clone()),
            ..Problem::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, reason)
        }
    }

    /// The problem for a gRPC status; `rename` maps the gRPC request's field names to this route's
    /// query parameters where they differ (`asset_id` → `symbol`).
    pub fn from_status(status: &tonic::Status, rename: &[(&str, &str)]) -> Self {
        let http = http_status(status.code());
        let mut p = Problem::new(http, status.code(), status.message());
        p.retry_after = status
            .metadata()
            .get(crate::ratelimit::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        if let Some(field) = validate::field_of(status) {
            let field = rename
                .iter()
                .find(|(from, _)| *from == field)
                .map_or(field, |(_, to)| to);
            p.field = Some(field.to_owned());
            p.reason = Some(status.message().to_owned());
        }
        p
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut res = (status, axum::Json(self)).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// The HTTP status of a gRPC code (the mapping Google's APIs use).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_error_names_the_field_under_the_routes_name() {
        let status = validate::invalid("asset_id", "asset_id is required");
        let p = Problem::from_status(&status, &[("asset_id", "symbol")]);
        assert_eq!(p.status, 400);
        assert_eq!(p.code, "INVALID_ARGUMENT");
        assert_eq!(p.field.as_deref(), Some("symbol"));
        assert_eq!(p.reason.as_deref(), Some("asset_id is required"));
        let p = Problem::from_status(&tonic::Status::not_found("asset \"X\" has no ticks"), &[]);
        assert_eq!((p.status, p.field), (404, None));
        let res = Problem::invalid("limit", "not a number").into_response();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}

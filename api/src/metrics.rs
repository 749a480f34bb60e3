//! The api's Prometheus metrics. Labels are low-cardinality on purpose: method and gRPC code, never an
//! asset id. Dashboards (issue 5) are built on exactly these names.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Handles to every api metric.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    /// `tickfleet_api_requests_total{method,code}`: finished calls by gRPC status code name (`OK`,
    /// `NOT_FOUND`, …). A stream counts when it ends.
    pub requests: IntCounterVec,
    /// `tickfleet_api_request_duration_seconds{method}`: unary calls from request to answer; for streams,
    /// the time to set the stream up.
    pub duration: HistogramVec,
    /// `tickfleet_api_active_streams{method}`: open server streams.
    pub active_streams: IntGaugeVec,
    /// `tickfleet_api_stream_messages_dropped_total{method}`: stream messages dropped because the client's
    /// buffer was full (the client then gets a gap notice).
    pub dropped: IntCounterVec,
    /// `tickfleet_api_in_flight_calls{method}`: unary calls being served.
    pub in_flight: IntGaugeVec,
    /// `tickfleet_api_rejected_total{method,limit}`: calls and streams refused with RESOURCE_EXHAUSTED
    /// because the replica was at a limit (`limit` = `calls` or `streams`).
    pub rejected: IntCounterVec,
    /// `tickfleet_api_limit{limit}`: the configured limits (`calls`, `streams`), to plot usage against.
    pub limit: IntGaugeVec,
    /// `tickfleet_api_store_errors_total{kind}`: store calls that failed, by kind (`timeout` when the
    /// store did not answer within the api's store timeout, else the store's error kind).
    pub store_errors: IntCounterVec,
    /// `tickfleet_api_http_responses_total{method,route,status}`: REST answers by route template and
    /// HTTP status.
    pub http_responses: IntCounterVec,
    /// The per-client rate limiter's metrics (see [`crate::ratelimit`]).
    pub rate: crate::ratelimit::RateMetrics,
}

impl ApiMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = ApiMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_requests_total",
                    "gRPC calls finished, by method and status code",
                ),
                &["method", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "tickfleet_api_request_duration_seconds",
                    "Time to answer a unary call (streams: time to set the stream up)",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["method"],
            )?,
            active_streams: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_api_active_streams",
                    "Open server streams, by method",
                ),
                &["method"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_stream_messages_dropped_total",
                    "Stream messages dropped for clients too slow to take them",
                ),
                &["method"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_api_in_flight_calls",
                    "Unary calls being served, by method",
                ),
                &["method"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_rejected_total",
                    "Calls and streams refused (RESOURCE_EXHAUSTED) at the replica's limits",
                ),
                &["method", "limit"],
            )?,
            limit: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_api_limit",
                    "Configured per-replica limits: concurrent calls, open streams",
                ),
                &["limit"],
            )?,
            store_errors: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_store_errors_total",
                    "Store calls that failed or timed out, by kind",
                ),
                &["kind"],
            )?,
            http_responses: IntCounterVec::new(
                Opts::new(
                    "tickfleet_api_http_responses_total",
                    "REST answers, by method, route template and HTTP status",
                ),
                &["method", "route", "status"],
            )?,
            rate: crate::ratelimit::RateMetrics::new(registry)?,
        };
        registry.register(Box::new(m.http_responses.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.limit.clone()))?;
        registry.register(Box::new(m.store_errors.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.active_streams.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        Ok(m)
    }

    /// The duration histogram of one method.
    pub fn duration_of(&self, method: &str) -> Histogram {
        self.duration.with_label_values(&[method])
    }

    /// Counts one finished call.
    pub fn finished(&self, method: &str, code: tonic::Code) {
        self.requests
            .with_label_values(&[method, code_name(code)])
            .inc();
    }
}

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

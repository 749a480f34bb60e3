//! Prometheus metrics of the operator.
//!
//! - `tickfleet_operator_reconcile_runs_total`: reconciles started;
//! - `tickfleet_operator_reconcile_failures_total{error}`: failed reconciles by [`Error::metric_label`]
//!   (every label present from the start, at 0);
//! - `tickfleet_operator_reconcile_duration_seconds`: reconcile duration histogram;
//! - `tickfleet_operator_pipeline_lag{namespace,pipeline}`: last measured consumer lag per pipeline
//!   (measured when the pipeline autoscales);
//! - `tickfleet_operator_pipeline_workers_desired` / `..._ready{namespace,pipeline}`: worker replicas;
//!
//! Per-pipeline series carry the TickPipeline's namespace and name as `namespace` and `pipeline`, the
//! labels its worker and api series get from the chart's PodMonitor, so dashboards can put them side
//! by side. The chart's ServiceMonitor scrapes with `honorLabels: true` so the pipeline's namespace is
//! kept rather than replaced by the operator pod's own (as kube-state-metrics is scraped).
//! - `tickfleet_operator_leader`: 1 while this replica holds the leader Lease.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::Error;

/// The operator's metrics, registered in one [`Registry`].
#[derive(Clone)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: IntCounter,
    /// Failed reconciles by error label.
    pub failures: IntCounterVec,
    /// Reconcile duration.
    pub duration: Histogram,
    /// Consumer lag per pipeline.
    pub lag: IntGaugeVec,
    /// Desired workers per pipeline.
    pub workers_desired: IntGaugeVec,
    /// Ready workers per pipeline.
    pub workers_ready: IntGaugeVec,
    /// 1 while this replica is the leader.
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let pipeline = ["namespace", "pipeline"];
        let m = Self {
            reconciles: IntCounter::new(
                "tickfleet_operator_reconcile_runs_total",
                "Reconciles started",
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "tickfleet_operator_reconcile_failures_total",
                    "Failed reconciles by error",
                ),
                &["error"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tickfleet_operator_reconcile_duration_seconds",
                    "Reconcile duration",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_operator_pipeline_lag",
                    "Consumer lag of a pipeline in messages",
                ),
                &pipeline,
            )?,
            workers_desired: IntGaugeVec::new(
                Opts::new(
                    "tickfleet_operator_pipeline_workers_desired",
                    "Workers the operator asks for",
                ),
                &pipeline,
            )?,
            workers_ready: IntGaugeVec::new(
                Opts::new("tickfleet_operator_pipeline_workers_ready", "Ready workers"),
                &pipeline,
            )?,
            leader: IntGauge::new(
                "tickfleet_operator_leader",
                "1 while this replica holds the leader Lease",
            )?,
        };
        registry.register(Box::new(m.reconciles.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.workers_desired.clone()))?;
        registry.register(Box::new(m.workers_ready.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        for label in Error::METRIC_LABELS {
            m.failures.with_label_values(&[label]);
        }
        Ok(m)
    }

    /// Counts a failure.
    pub fn failure(&self, error: &Error) {
        self.failures
            .with_label_values(&[error.metric_label()])
            .inc();
    }

    /// Records the per-pipeline gauges.
    pub fn pipeline(
        &self,
        namespace: &str,
        name: &str,
        lag: Option<i64>,
        desired: i32,
        ready: i32,
    ) {
        let labels = [namespace, name];
        if let Some(lag) = lag {
            self.lag.with_label_values(&labels).set(lag);
        }
        self.workers_desired
            .with_label_values(&labels)
            .set(i64::from(desired));
        self.workers_ready
            .with_label_values(&labels)
            .set(i64::from(ready));
    }
}

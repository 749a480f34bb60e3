//! The TickPipeline operator: a Kubernetes controller that runs tickfleet pipelines.
//!
//! Module map (after kube-rs's controller-rs):
//! - [`crd`]: the `TickPipeline` custom resource;
//! - [`desired`]: pure functions from a `TickPipeline` to the child objects it should have;
//! - [`conditions`]: status condition transitions;
//! - [`autoscale`]: the lag-based worker autoscaling decision;
//! - [`kafka`]: topic admin and consumer-lag measurement behind a small trait;
//! - [`controller`]: the reconcile loop (server-side apply of children, status);
//! - [`events`]: Kubernetes Events about what the operator did and what failed;
//! - [`metrics`]: Prometheus metrics of the operator;
//! - [`leader`]: leader election on a `coordination.k8s.io` Lease;
//! - [`offer`]: which Secrets a pipeline may use (the `tickfleet.io/allowed-pipelines` offer).

pub mod autoscale;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod desired;
mod error;
pub mod events;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod offer;

#[cfg(test)]
pub mod fixtures;

pub use crd::{TickPipeline, TickPipelineSpec, TickPipelineStatus};
pub use error::Error;

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

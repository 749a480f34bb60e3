//! The TickPipeline operator: a Kubernetes controller that runs tickfleet pipelines.
//!
//! Module map (after kube-rs's controller-rs):
//! - [`crd`]: the `TickPipeline` custom resource;
//! - [`desired`]: pure functions from a `TickPipeline` to the child objects it should have;
//! - [`conditions`]: status condition transitions;
//! - [`autoscale`]: the lag-based worker autoscaling decision;
//! - [`kafka`]: topic admin and consumer-lag measurement behind small traits;
//! - [`controller`]: the reconcile loop (server-side apply of children, status);
//! - [`metrics`]: Prometheus metrics of the operator;
//! - [`leader`]: leader election on a `coordination.k8s.io` Lease.

pub mod autoscale;
pub mod conditions;
pub mod crd;
pub mod desired;
pub mod kafka;

#[cfg(test)]
pub mod fixtures;

pub use crd::{TickPipeline, TickPipelineSpec, TickPipelineStatus};

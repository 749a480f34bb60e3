//! Prints the `TickPipeline` CustomResourceDefinition as YAML on stdout.
//!
//! The output is checked in as `manifests/crd.yaml`; a test fails when the two differ, so the
//! schema the API server enforces is always the one the Rust types describe.

use kube::CustomResourceExt;
use tickfleet_operator::TickPipeline;

fn main() -> anyhow::Result<()> {
    print!("{}", serde_saphyr::to_string(&TickPipeline::crd())?);
    Ok(())
}

//! The worker's memory bound: every message polled from Kafka is charged to one process-wide byte
//! budget until its lane has handled it (`--max-in-flight-bytes`); the consumer pauses fetching while
//! the budget is spent (see the consumer's module doc).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics::Metrics;

/// Messages and bytes taken from Kafka and not yet handled, over every lane of the process, and the
/// byte budget the consumer keeps them under (`--max-in-flight-bytes`).
#[derive(Debug)]
pub struct InFlight {
    bytes: AtomicUsize,
    budget: usize,
    metrics: Metrics,
}

impl InFlight {
    /// Nothing in flight yet; at most about `budget` bytes from now on.
    pub fn new(budget: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(InFlight {
            bytes: AtomicUsize::new(0),
            budget: budget.max(1),
            metrics,
        })
    }

    /// Counts `bytes` more in flight until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.metrics.in_flight.inc();
        self.metrics.in_flight_bytes.add(bytes as i64);
        Charge(Some((self.clone(), bytes)))
    }

    /// Bytes in flight now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn budget(&self) -> usize {
        self.budget
    }
}

/// A message's share of the [`InFlight`] budget; dropping it gives the share back. Clones and the
/// default carry no share.
#[derive(Debug, Default)]
pub struct Charge(Option<(Arc<InFlight>, usize)>);

impl Clone for Charge {
    fn clone(&self) -> Self {
        Charge(None)
    }
}

impl PartialEq for Charge {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Charge {}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((budget, bytes)) = self.0.take() {
            budget.bytes.fetch_sub(bytes, Ordering::AcqRel);
            budget.metrics.in_flight.dec();
            budget.metrics.in_flight_bytes.sub(bytes as i64);
        }
    }
}

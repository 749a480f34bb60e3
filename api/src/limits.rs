//! Per-replica bounds on concurrent work: unary calls in flight and open streams. A call beyond a bound
//! is refused at once with `RESOURCE_EXHAUSTED` (it is not queued: a client backs off and retries, or
//! goes to another replica) and counted in `tickfleet_api_rejected_total{method,limit}` (where the
//! per-client rate limits of [`crate::ratelimit`] count too, as `limit="rate"`).
//!
//! With the per-call memory bound (every range is computed page by page, see [`crate::calc`]), these
//! two numbers bound what one replica can be asked to hold: about `max_calls` store pages plus
//! `max_streams` stream buffers.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Default of [`Limits::max_calls`].
pub const MAX_CALLS: usize = 128;
/// Default of [`Limits::max_streams`].
pub const MAX_STREAMS: usize = 512;

/// The bounds of one replica, shared by every connection it serves.
#[derive(Clone, Debug)]
pub struct Limits {
    max_calls: usize,
    max_streams: usize,
    calls: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(MAX_CALLS, MAX_STREAMS)
    }
}

/// Which bound refused a call (the `limit` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Unary calls in flight.
    Calls,
    /// Open server streams.
    Streams,
    /// The client's rate limit ([`crate::ratelimit`]).
    Rate,
}

impl Bound {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Bound::Calls => "calls",
            Bound::Streams => "streams",
            Bound::Rate => "rate",
        }
    }
}

impl Limits {
    /// At most `max_calls` unary calls in flight and `max_streams` open streams (each at least 1).
    pub fn new(max_calls: usize, max_streams: usize) -> Self {
        let max_calls = max_calls.clamp(1, Semaphore::MAX_PERMITS);
        let max_streams = max_streams.clamp(1, Semaphore::MAX_PERMITS);
        Limits {
            max_calls,
            max_streams,
            calls: Arc::new(Semaphore::new(max_calls)),
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// The bound on unary calls in flight.
    pub fn max_calls(&self) -> usize {
        self.max_calls
    }

    /// The bound on open streams.
    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    /// A slot for one call of kind `bound` ([`Bound::Calls`] or [`Bound::Streams`]), held until the
    /// permit is dropped; `RESOURCE_EXHAUSTED` with a message (and `retry-after: 1`) when every slot
    /// is taken.
    pub fn try_acquire(&self, bound: Bound) -> Result<OwnedSemaphorePermit, Status> {
        let (sem, max, flag, what) = match bound {
            Bound::Calls | Bound::Rate => (
                &self.calls,
                self.max_calls,
                "--max-concurrent-calls",
                "concurrent calls",
            ),
            Bound::Streams => (
                &self.streams,
                self.max_streams,
                "--max-streams",
                "open streams",
            ),
        };
        sem.clone().try_acquire_owned().map_err(|_| {
            let mut status = Status::resource_exhausted(format!(
                "this api replica is at its limit of {max} {what} ({flag}); retry with backoff or use another replica"
            ));
            status
                .metadata_mut()
                .insert(crate::ratelimit::RETRY_AFTER, tonic::metadata::MetadataValue::from_static("1"));
            status
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_refused_past_the_bound_and_freed_on_drop() {
        let limits = Limits::new(2, 1);
        let a = limits.try_acquire(Bound::Calls).unwrap();
        let _b = limits.try_acquire(Bound::Calls).unwrap();
        let refused = limits.try_acquire(Bound::Calls).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("limit of 2 concurrent calls"));
        // Streams have their own bound.
        let _s = limits.try_acquire(Bound::Streams).unwrap();
        assert!(limits.try_acquire(Bound::Streams).is_err());
        drop(a);
        let _c = limits.try_acquire(Bound::Calls).unwrap();
        assert_eq!(Limits::new(0, 0).max_calls(), 1);
    }
}

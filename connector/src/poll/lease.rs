//! Holding one pair's lease: renewing it every third of its TTL, polling only while it is surely valid,
//! committing each poll under its fence, producing new prices (and a previous holder's pending tick),
//! and releasing it on shutdown — see the module doc of [`super`] for why a pair has one poller at a
//! time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tickfleet_service::CancellationToken;
use tickfleet_store::jobs::{Commit, Lease, Pair, Pending};
use tracing::{debug, info, warn};

use super::{FENCE_HEADER, ProviderError, RAW_ID_HEADER, Shared, provider};
use crate::Error;

impl Shared {
    /// Produces a pending tick and marks it produced; `false` when the lease was lost meanwhile.
    async fn produce(
        &self,
        pair: &Pair,
        lease: &Lease,
        pending: &Pending,
        stop: &CancellationToken,
    ) -> Result<bool, Error> {
        let fence = format!("{} {}", lease.holder, lease.token);
        self.sink
            .deliver(
                &pending.tick,
                &[(RAW_ID_HEADER, &pending.raw_id), (FENCE_HEADER, &fence)],
                stop,
            )
            .await?;
        loop {
            match self.store.produced(pair, lease, pending.tick.seq).await {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    warn!(%pair, error = %e, "marking a tick produced failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Err(Error::Closed),
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }
}

/// Polls one pair while `lease` holds; returns when `stop` is cancelled or the lease is lost.
pub(super) async fn run_pair(
    shared: Arc<Shared>,
    pair: Pair,
    lease: Lease,
    taken_at: Instant,
    interval: Arc<Mutex<Duration>>,
    stop: CancellationToken,
) {
    let Some(p) = provider::provider(&pair.provider) else {
        return;
    };
    let name = p.name();
    let lost = stop.child_token();
    let ttl = shared.config.lease_ttl();
    // The lease is surely ours until `valid_until`: the TTL counted from when the acquire (or the
    // last successful renewal) was *sent* — Redis started its TTL later than that. A poll starts only
    // with half a TTL of that left and must end a tenth of a TTL before it, so a holder whose renewals
    // stall stops polling before anyone else can take the lease: one poller per pair at a time.
    let valid_until = Arc::new(Mutex::new(taken_at + ttl));
    // renewal, every third of the TTL, on its own so a slow poll cannot let the lease lapse
    let renew = {
        let (shared, pair, lease, lost) =
            (shared.clone(), pair.clone(), lease.clone(), lost.clone());
        let valid_until = valid_until.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = lost.cancelled() => return,
                    () = tokio::time::sleep(ttl / 3) => {}
                }
                let sent = Instant::now();
                match shared.store.renew(&pair, &lease, ttl).await {
                    Ok(true) => *valid_until.lock().unwrap_or_else(|e| e.into_inner()) = sent + ttl,
                    Ok(false) => {
                        warn!(%pair, token = lease.token, "lease lost (expired and taken); stopping");
                        lost.cancel();
                        return;
                    }
                    Err(e) => warn!(%pair, error = %e, "renewing the lease failed; retrying"),
                }
            }
        })
    };
    let mut lost_it = false;
    // a taken-over pair may hold a tick its last holder committed and did not produce
    match shared.store.pending(&pair).await {
        Ok(Some(pending)) => {
            info!(%pair, seq = pending.tick.seq, "producing the previous holder's pending tick");
            lost_it = !matches!(
                shared.produce(&pair, &lease, &pending, &lost).await,
                Ok(true)
            );
        }
        Ok(None) => {}
        Err(e) => warn!(%pair, error = %e, "reading the pending tick failed"),
    }
    let mut next = Instant::now();
    while !lost_it && !lost.is_cancelled() {
        let at = shared.gate.open_at(name).map_or(next, |g| g.max(next));
        tokio::select! {
            () = lost.cancelled() => break,
            () = tokio::time::sleep_until(at.into()) => {}
        }
        if shared
            .gate
            .open_at(name)
            .is_some_and(|g| g > Instant::now())
        {
            continue; // another pair of the provider hit a limit meanwhile
        }
        let left = valid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_duration_since(Instant::now());
        if left < ttl / 2 {
            // renewals are late: wait for one (or for the loss of the lease) before polling
            next = Instant::now() + ttl / 10;
            continue;
        }
        let every = *interval.lock().unwrap_or_else(|e| e.into_inner());
        next = Instant::now() + every;
        let timeout =
            Duration::from_millis(shared.config.http_timeout_ms.max(1)).min(left - ttl / 10);
        let observation = match shared.fetch(p.as_ref(), &pair.symbol, timeout).await {
            Ok(res) => p.read(&res),
            Err(e) => Err(e),
        };
        let o = match observation {
            Ok(o) => {
                shared.gate.succeeded(name);
                o
            }
            Err(e) => {
                let retry = match &e {
                    ProviderError::RateLimited { retry_after } => *retry_after,
                    _ => None,
                };
                let wait = shared.gate.failed(name, retry);
                shared
                    .metrics
                    .polls
                    .with_label_values(&[name, e.kind()])
                    .inc();
                warn!(%pair, reason = e.kind(), error = %e, backoff_ms = wait.as_millis() as u64, "poll failed; backing off");
                continue;
            }
        };
        let commit = shared
            .store
            .commit(
                &pair,
                &lease,
                &o,
                Duration::from_millis(shared.config.cache_ttl_ms),
            )
            .await;
        let outcome = match commit {
            Ok(Commit::Fenced) => {
                lost_it = true;
                "fenced"
            }
            Ok(Commit::Unchanged { .. }) => "unchanged",
            Ok(Commit::New(pending)) => {
                debug!(%pair, seq = pending.tick.seq, price = %pending.tick.price, "new price");
                lost_it = !matches!(
                    shared.produce(&pair, &lease, &pending, &lost).await,
                    Ok(true)
                );
                "new"
            }
            Err(e) => {
                warn!(%pair, error = %e, "committing a poll failed");
                "store_error"
            }
        };
        shared
            .metrics
            .polls
            .with_label_values(&[name, outcome])
            .inc();
    }
    lost.cancel();
    let _ = renew.await;
    if lost_it || !stop.is_cancelled() {
        shared.metrics.leases_lost.inc();
        warn!(%pair, token = lease.token, "stopped polling: lease lost");
    } else if let Err(e) = shared.store.release(&pair, &lease).await {
        warn!(%pair, error = %e, "releasing the lease failed (it expires by itself)");
    }
}

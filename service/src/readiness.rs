//! Readiness as a named set of checks: a process is ready while every check passes. The worker and
//! the api both run one (today each has a single check, `store`: the store answers a ping); a
//! process adds a check with [`Readiness::check`], and every check is run, timed out, logged and
//! reported the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Health;

type Probe =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A check that failed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The check's name, as given to [`Readiness::check`].
    pub check: &'static str,
    /// Why it failed (its error, or that it timed out).
    pub reason: String,
}

/// A named set of readiness checks, run every second by [`Readiness::run`].
pub struct Readiness {
    checks: Vec<(&'static str, Probe)>,
    period: Duration,
    timeout: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// No checks yet; every check runs once a second and fails after 2 s without an answer.
    pub fn new() -> Self {
        Readiness {
            checks: Vec::new(),
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }

    /// Adds the check `name`: ready only while `probe` answers `Ok` within the timeout. The error
    /// is what the logs say when it fails, so it should say what is wrong (e.g. "store
    /// unreachable: ...").
    pub fn check<F, Fut, E>(mut self, name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        self.checks.push((
            name,
            Box::new(move || {
                let fut = probe();
                Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
                    as Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
            }),
        ));
        self
    }

    /// Runs every check once, in the order they were added: the ones that failed (none: ready).
    pub async fn failures(&self) -> Vec<Failure> {
        let mut failures = Vec::new();
        for &(check, ref probe) in &self.checks {
            let reason = match tokio::time::timeout(self.timeout, probe()).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => format!("{check} did not answer within {:?}", self.timeout),
            };
            failures.push(Failure { check, reason });
        }
        failures
    }

    /// Until `shutdown`: marks the process ready ([`Health::set_ready`]) and runs the checks every
    /// period, each reported to `health` under its own name ([`Health::fail`] / [`Health::pass`]), so
    /// `/readyz` is 200 exactly while they pass and nothing else reports a failure — a check cannot
    /// clear what another part of the process reported. Logs each change (a failure with its check
    /// and reason, once until it recovers).
    pub async fn run(self, health: Arc<Health>, shutdown: CancellationToken) {
        self.run_with(health, shutdown, |_| async {}).await;
    }

    /// [`Readiness::run`], also calling `on_change` with the new readiness whenever it changes
    /// (the first round counts as a change), e.g. to update a gRPC health service.
    pub async fn run_with<F, Fut>(
        self,
        health: Arc<Health>,
        shutdown: CancellationToken,
        mut on_change: F,
    ) where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut was_ready = None;
        let mut logged: Vec<Failure> = Vec::new();
        // The process is up; from now on its checks decide (and whatever else reports to `health`).
        health.set_ready(true);
        while !shutdown.is_cancelled() {
            let failures = self.failures().await;
            for f in &failures {
                if !logged.iter().any(|l| l.check == f.check) {
                    warn!(check = f.check, reason = %f.reason, "not ready: {}", f.reason);
                }
            }
            logged = failures;
            let ready = logged.is_empty();
            if ready && was_ready != Some(true) {
                info!(
                    checks = self.checks.len(),
                    "every readiness check passes: ready"
                );
            }
            // Each check passes or fails under its own name: other parts of the process report
            // theirs (a worker's stalled partitions), and one passing check cannot clear them.
            for (check, _) in &self.checks {
                match logged.iter().find(|f| f.check == *check) {
                    Some(f) => health.fail(check, f.reason.clone()),
                    None => health.pass(check),
                }
            }
            if was_ready != Some(ready) {
                on_change(ready).await;
            }
            was_ready = Some(ready);
            tokio::select! {
                () = tokio::time::sleep(self.period) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn ready_exactly_while_every_check_passes() {
        let store_up = Arc::new(AtomicBool::new(true));
        let up = store_up.clone();
        let readiness = Readiness::new()
            .check("store", move || {
                let up = up.load(Ordering::Relaxed);
                async move {
                    if up {
                        Ok(())
                    } else {
                        Err("store unreachable: connection refused")
                    }
                }
            })
            .check("lanes", || async { Ok::<(), String>(()) });
        assert_eq!(readiness.failures().await, vec![]);
        store_up.store(false, Ordering::Relaxed);
        assert_eq!(
            readiness.failures().await,
            vec![Failure {
                check: "store",
                reason: "store unreachable: connection refused".into()
            }]
        );
    }

    #[tokio::test]
    async fn a_check_that_does_not_answer_fails() {
        let mut readiness =
            Readiness::new().check("stuck", std::future::pending::<Result<(), String>>);
        readiness.timeout = Duration::from_millis(10);
        let failures = readiness.failures().await;
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].check, "stuck");
        assert!(
            failures[0].reason.contains("did not answer"),
            "{failures:?}"
        );
    }

    #[tokio::test]
    async fn run_follows_the_checks_and_reports_each_change() {
        let up = Arc::new(AtomicBool::new(false));
        let probe = up.clone();
        let mut readiness = Readiness::new().check("store", move || {
            let ok = probe.load(Ordering::Relaxed);
            async move { if ok { Ok(()) } else { Err("down") } }
        });
        readiness.period = Duration::from_millis(5);
        let health = Health::new();
        health.set_ready(true);
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(
            readiness.run_with(health.clone(), shutdown.clone(), move |r| {
                let _ = tx.send(r);
                async {}
            }),
        );
        assert_eq!(rx.recv().await, Some(false), "the first round counts");
        assert!(!health.is_ready());
        up.store(true, Ordering::Relaxed);
        assert_eq!(rx.recv().await, Some(true));
        assert!(health.is_ready());
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(rx.recv().await, None, "no change reported twice");
    }
}

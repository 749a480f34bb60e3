//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas are safe: only
//! the holder of the Lease reconciles, the other waits and takes over when the holder stops
//! renewing.
//!
//! The protocol is the one client-go's leader election uses: the holder writes `renewTime` every
//! few seconds; anyone may take a Lease whose `renewTime + leaseDurationSeconds` has passed. Writes
//! are `replace` with the `resourceVersion` that was read, so when two replicas race, the API
//! server accepts one and answers the other `409 Conflict`.
//!
//! A leader that cannot renew before its lease would expire stops reconciling (and the binary
//! exits), because by then another replica may already have taken over.
//!
//! [`Leadership`] is the wiring the binary uses: wait to lead, reconcile until shutdown or until
//! the Lease is lost, then release it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the operator's).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews, and how often others retry.
    pub retry_period: Duration,
}

/// What to do with the Lease as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// It does not exist: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder's lease expired: take it.
    Acquire,
    /// Someone else holds a valid lease.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// Decides the next step from the Lease's spec (`None` when the Lease does not exist).
pub fn next_step(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Step::Acquire;
    }
    if holder == identity {
        return Step::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = match &spec.renew_time {
        Some(MicroTime(renewed)) => renewed.checked_add(duration).map_or(true, |end| end < now),
        None => true,
    };
    if expired {
        Step::Acquire
    } else {
        Step::Wait { holder }
    }
}

/// The Lease spec to write for `step` (not used for [`Step::Wait`]).
pub fn spec_for(
    step: &Step,
    old: Option<&LeaseSpec>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    let duration = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    match step {
        Step::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration),
            ..old.cloned().unwrap_or_default()
        },
        _ => LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if matches!(step, Step::Create) {
                0
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        },
    }
}

/// Takes part in the election for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

/// Why [`LeaderElector::hold`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The lease could not be renewed in time, or someone else holds it now.
    Lost,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// An elector for `cfg.namespace/cfg.name`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: reads the Lease and creates, renews or takes it when allowed. Returns whether
    /// this replica holds it afterwards. A lost race (`409 Conflict`) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.cfg.name).await?;
        let step = next_step(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.cfg.identity,
            now,
        );
        let write = match (&step, current) {
            (Step::Wait { .. }, _) => return Ok(false),
            (Step::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec_for(&step, None, &self.cfg, now)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (_, Some(mut lease)) => {
                let spec = spec_for(&step, lease.spec.as_ref(), &self.cfg, now);
                if step == Step::Acquire {
                    info!(lease = %self.cfg.name, previous = ?lease.spec.as_ref().and_then(|s| s.holder_identity.clone()), "taking over the lease");
                }
                lease.spec = Some(spec);
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => unreachable!("next_step gives Create for a missing lease"),
        };
        match write {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease (`true`) or shutdown is requested (`false`).
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return true;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: lease not reachable"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
    }

    /// Renews the Lease every `retry_period` until shutdown or until it is lost: another replica
    /// holds it, or no renewal succeeded for `lease_duration`.
    pub async fn hold(&self, shutdown: &CancellationToken) -> HoldEnd {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return HoldEnd::Shutdown,
                () = tokio::time::sleep(self.cfg.retry_period) => {}
            }
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.cfg.name, "another replica holds the lease");
                    return HoldEnd::Lost;
                }
                Err(e) => {
                    warn!(error = %e, "could not renew the lease");
                    if last_renewal.elapsed() >= self.cfg.lease_duration {
                        return HoldEnd::Lost;
                    }
                }
            }
        }
    }

    /// Gives the Lease up (clears the holder) so a standby replica takes over at once instead of
    /// waiting for it to expire. Best effort: errors are logged.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.cfg.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.cfg.name, "released the lease"),
            Err(e) => warn!(error = %e, "could not release the lease"),
        }
    }
}

/// This replica's turn as leader: the controller runs until [`Leadership::stop`] is cancelled
/// (shutdown, or the Lease was lost), then [`Leadership::end`] says which and releases the Lease.
pub struct Leadership {
    elector: Option<Arc<LeaderElector>>,
    stop: CancellationToken,
    holder: Option<JoinHandle<HoldEnd>>,
}

impl Leadership {
    /// Waits until this replica leads. With `elector` (leader election on) that is once it holds
    /// the Lease, which it then renews in the background; without, at once. `None` when shutdown
    /// came first.
    pub async fn acquire(
        elector: Option<LeaderElector>,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let Some(elector) = elector else {
            return Some(Self::watch(
                None,
                None::<std::future::Ready<HoldEnd>>,
                shutdown,
            ));
        };
        info!(lease = %elector.cfg.name, "waiting to become leader");
        if !elector.acquire(shutdown).await {
            info!("shut down before becoming leader");
            return None;
        }
        let elector = Arc::new(elector);
        let hold = {
            let elector = elector.clone();
            let shutdown = shutdown.clone();
            async move { elector.hold(&shutdown).await }
        };
        Some(Self::watch(Some(elector), Some(hold), shutdown))
    }

    /// Cancels [`Self::stop`] when `hold` ends (the Lease was lost, or shutdown) or on `shutdown`.
    fn watch<F>(
        elector: Option<Arc<LeaderElector>>,
        hold: Option<F>,
        shutdown: &CancellationToken,
    ) -> Self
    where
        F: Future<Output = HoldEnd> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let holder = hold.map(|hold| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let end = hold.await;
                stop.cancel();
                end
            })
        });
        {
            let shutdown = shutdown.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            });
        }
        Self {
            elector,
            stop,
            holder,
        }
    }

    /// Cancelled when the controller must stop: on shutdown, or when the Lease is lost.
    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// After the controller stopped: waits for the renewals to end and, unless the Lease was lost
    /// (then another replica may hold it already), releases it so a standby takes over at once.
    pub async fn end(self) -> HoldEnd {
        let lost = match self.holder {
            Some(h) => h.await.map(|end| end == HoldEnd::Lost).unwrap_or(true),
            None => false,
        };
        if let Some(elector) = self.elector.as_ref().filter(|_| !lost) {
            elector.release().await;
        }
        if lost {
            HoldEnd::Lost
        } else {
            HoldEnd::Shutdown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ApiServer;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            name: "tickfleet-operator".into(),
            namespace: "tickfleet-system".into(),
            identity: "op-a".into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(5),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn steps() {
        assert_eq!(next_step(None, "op-a", at(0)), Step::Create);
        assert_eq!(
            next_step(Some(&held_by("op-a", 0)), "op-a", at(100)),
            Step::Renew
        );
        assert_eq!(
            next_step(Some(&held_by("op-b", 0)), "op-a", at(15)),
            Step::Wait {
                holder: "op-b".into()
            },
            "valid until renewTime + 15 s"
        );
        assert_eq!(
            next_step(Some(&held_by("op-b", 0)), "op-a", at(16)),
            Step::Acquire
        );
        assert_eq!(
            next_step(Some(&LeaseSpec::default()), "op-a", at(0)),
            Step::Acquire
        );
    }

    #[test]
    fn specs() {
        let old = held_by("op-b", 0);
        let take = spec_for(&Step::Acquire, Some(&old), &cfg(), at(20));
        assert_eq!(take.holder_identity.as_deref(), Some("op-a"));
        assert_eq!(take.lease_transitions, Some(3));
        assert_eq!(take.acquire_time, Some(MicroTime(at(20))));
        let mine = held_by("op-a", 0);
        let renew = spec_for(&Step::Renew, Some(&mine), &cfg(), at(5));
        assert_eq!(renew.renew_time, Some(MicroTime(at(5))));
        assert_eq!(renew.acquire_time, Some(MicroTime(at(0))), "kept");
        assert_eq!(renew.lease_transitions, Some(2), "kept");
        let create = spec_for(&Step::Create, None, &cfg(), at(0));
        assert_eq!(create.lease_transitions, Some(0));
        assert_eq!(create.lease_duration_seconds, Some(15));
    }

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/tickfleet-system/leases";

    fn requests(log: &std::sync::Mutex<Vec<crate::fixtures::Recorded>>) -> Vec<String> {
        log.lock()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r.method, r.uri))
            .collect()
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let (client, log) = ApiServer::default().start();
        let e = LeaderElector::new(client, cfg());
        assert!(e.try_acquire_or_renew(at(0)).await.unwrap());
        assert_eq!(
            requests(&log),
            vec![
                format!("GET {LEASE}/tickfleet-operator"),
                format!("POST {LEASE}?")
            ]
        );
        let body = log.lock().unwrap()[1].body.clone();
        assert_eq!(body["spec"]["holderIdentity"], "op-a");
        assert_eq!(body["spec"]["leaseTransitions"], 0);
    }

    #[tokio::test]
    async fn waits_while_another_holds_it_then_takes_it_over() {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("tickfleet-operator".into()),
                namespace: Some("tickfleet-system".into()),
                resource_version: Some("42".into()),
                ..ObjectMeta::default()
            },
            spec: Some(held_by("op-b", 0)),
        };
        let (client, log) = ApiServer {
            lease: Some(lease),
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, cfg());
        assert!(!e.try_acquire_or_renew(at(10)).await.unwrap());
        assert_eq!(
            requests(&log),
            vec![format!("GET {LEASE}/tickfleet-operator")],
            "no write"
        );
        assert!(e.try_acquire_or_renew(at(30)).await.unwrap());
        let reqs = requests(&log);
        assert_eq!(reqs[2], format!("PUT {LEASE}/tickfleet-operator?"));
        let body = log.lock().unwrap()[2].body.clone();
        assert_eq!(
            body["metadata"]["resourceVersion"], "42",
            "optimistic concurrency"
        );
        assert_eq!(body["spec"]["holderIdentity"], "op-a");
        assert_eq!(body["spec"]["leaseTransitions"], 3);
    }

    #[tokio::test]
    async fn lost_race_is_not_an_error() {
        let (client, log) = ApiServer {
            fail: vec![("POST", LEASE.into(), 409)],
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, cfg());
        assert!(!e.try_acquire_or_renew(at(0)).await.unwrap());
        assert_eq!(requests(&log).len(), 2);
    }

    #[tokio::test]
    async fn without_election_leads_at_once_and_stops_on_shutdown() {
        let shutdown = CancellationToken::new();
        let leadership = Leadership::acquire(None, &shutdown).await.expect("leads");
        let stop = leadership.stop();
        assert!(!stop.is_cancelled());
        shutdown.cancel();
        stop.cancelled().await;
        assert_eq!(leadership.end().await, HoldEnd::Shutdown);
    }

    #[tokio::test]
    async fn shutdown_before_becoming_leader_leads_nothing() {
        let (client, log) = ApiServer {
            fail: vec![("POST", LEASE.into(), 409)],
            ..ApiServer::default()
        }
        .start();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let elector = LeaderElector::new(client, cfg());
        assert!(
            Leadership::acquire(Some(elector), &shutdown)
                .await
                .is_none()
        );
        assert_eq!(requests(&log).len(), 2, "one round: GET, lost POST");
    }

    #[tokio::test]
    async fn leads_once_it_holds_the_lease_and_releases_it_on_shutdown() {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("tickfleet-operator".into()),
                namespace: Some("tickfleet-system".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(held_by("op-a", 0)),
        };
        let (client, log) = ApiServer {
            lease: Some(lease),
            ..ApiServer::default()
        }
        .start();
        let shutdown = CancellationToken::new();
        let elector = LeaderElector::new(client, cfg());
        let leadership = Leadership::acquire(Some(elector), &shutdown)
            .await
            .expect("leads");
        assert_eq!(
            requests(&log),
            vec![
                format!("GET {LEASE}/tickfleet-operator"),
                format!("PUT {LEASE}/tickfleet-operator?")
            ],
            "renewed its own lease"
        );
        let stop = leadership.stop();
        assert!(!stop.is_cancelled());
        shutdown.cancel();
        stop.cancelled().await;
        assert_eq!(leadership.end().await, HoldEnd::Shutdown);
        let log = log.lock().unwrap();
        let last = log.last().unwrap();
        assert_eq!(
            format!("{} {}", last.method, last.uri),
            format!("PUT {LEASE}/tickfleet-operator?")
        );
        assert!(
            last.body["spec"]["holderIdentity"].is_null(),
            "released: {}",
            last.body
        );
    }

    #[tokio::test]
    async fn a_lost_lease_stops_the_controller_and_is_not_released() {
        let (client, log) = ApiServer::default().start();
        let elector = Arc::new(LeaderElector::new(client, cfg()));
        let shutdown = CancellationToken::new();
        let leadership = Leadership::watch(Some(elector), Some(async { HoldEnd::Lost }), &shutdown);
        leadership.stop().cancelled().await;
        assert!(
            !shutdown.is_cancelled(),
            "stopped by the loss, not by shutdown"
        );
        assert_eq!(leadership.end().await, HoldEnd::Lost);
        assert_eq!(requests(&log), Vec::<String>::new(), "no release");
    }
}

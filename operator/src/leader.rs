//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas are safe: only
//! the holder of the Lease reconciles, the other waits and takes over when the holder stops
//! renewing. It follows client-go's `leaderelection` package:
//!
//! - **Timings.** Lease duration 15 s, renew deadline 10 s, retry period 2 s by default (the
//!   values of kube-controller-manager); [`LeaseConfig::validate`] insists on
//!   `retry period < renew deadline < lease duration`.
//! - **The holder** renews every retry period. Each attempt (read and write) is cut off when the
//!   renew deadline passes: 10 s after the start of the last renewal that succeeded. When it
//!   passes without a renewal, or the Lease shows another holder, leadership is lost:
//!   [`Leadership::lead`] drops the controller at once, in the middle of whatever it was doing,
//!   and the binary exits. The gap between renew deadline and lease duration (5 s) is the margin
//!   for that stop.
//! - **A standby** never compares the holder's `renewTime` with its own clock: the two clocks may
//!   disagree by any amount. It remembers the Lease record it last saw *change*
//!   (`resourceVersion`, holder, times) and when it saw that, on its own monotonic clock, and takes
//!   the Lease only once that record has stayed the same for the record's `leaseDurationSeconds`.
//!   It checks again exactly when that time is up, so failover does not wait for the next retry.
//! - **Writes** are `replace` with the `resourceVersion` that was read, so when two replicas race,
//!   or the holder renewed after the standby's last look, the API server accepts one write and
//!   answers the other `409 Conflict`.
//!
//! Why two leaders cannot reconcile at once: the holder's last successful renewal was sent before
//! the standby saw its result, and the holder stops reconciling at most a renew deadline after
//! sending it; the standby waits a whole lease duration after seeing it. This needs the two clocks
//! to run at about the same *rate* (5 s of margin in 15 s), never that they *agree*.
//!
//! After a holder dies without releasing the Lease (SIGKILL, node loss), a standby takes over
//! between `lease duration − retry period` and `lease duration + retry period` after the death (it
//! saw the last renewal up to one retry period late, and the renewal was up to one retry period
//! old); a holder that shuts down cleanly releases the Lease and a standby takes over at its next
//! look.
//!
//! [`Leadership`] is the wiring the binary uses: wait to lead, reconcile until shutdown or until
//! the Lease is lost, then release it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Default seconds a Lease stays valid without renewal, as seen by a standby.
pub const DEFAULT_LEASE_DURATION_SECS: u64 = 15;
/// Default seconds the holder keeps trying to renew before it gives leadership up.
pub const DEFAULT_RENEW_DEADLINE_SECS: u64 = 10;
/// Default seconds between renewals, and between a standby's looks at the Lease.
pub const DEFAULT_RETRY_PERIOD_SECS: u64 = 2;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the operator's).
    pub namespace: String,
    /// This replica's identity (the pod name; see [`identity`]).
    pub identity: String,
    /// How long a standby waits after it last saw the Lease change before it takes it.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it stops leading.
    pub renew_deadline: Duration,
    /// How often the holder renews, and how often a standby looks.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Checks `0 < retry period < renew deadline < lease duration`, without which a holder could
    /// still be reconciling when a standby takes over.
    pub fn validate(&self) -> Result<(), String> {
        let (d, r, p) = (self.lease_duration, self.renew_deadline, self.retry_period);
        if p.is_zero() || p >= r || r >= d {
            return Err(format!(
                "leader election needs 0 < retry period < renew deadline < lease duration, got \
                 retry {}s, renew deadline {}s, lease {}s",
                p.as_secs_f64(),
                r.as_secs_f64(),
                d.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// This replica's identity in the election: `explicit` (`--identity`, or `POD_NAME` from the
/// downward API) when given, else the host name and the process id (`host-1234`), so two
/// operators on one machine, or a restarted one, never pass for each other.
pub fn identity(explicit: Option<String>) -> String {
    explicit
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| {
            let host = hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .or_else(|| std::env::var("HOSTNAME").ok());
            default_identity(host, std::process::id())
        })
}

/// `host-pid`, or `localhost-pid` when the host name is unknown.
pub fn default_identity(host: Option<String>, pid: u32) -> String {
    let host = host
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}-{pid}")
}

/// A Lease record as a standby saw it, and when (on its own clock) it first saw it so.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    resource_version: Option<String>,
    spec: LeaseSpec,
    since: Instant,
}

/// What to do with the Lease as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// It does not exist: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder's record stayed unchanged for its lease duration: take it.
    Acquire,
    /// Someone else holds it.
    Wait {
        /// The current holder.
        holder: String,
        /// When the record, unless it changes, may be taken (our clock).
        until: Instant,
    },
}

/// Decides the next step from the Lease as read at `now` (our monotonic clock), updating what
/// was `seen` of it. `default_duration` applies to a record without `leaseDurationSeconds`.
pub fn next_step(
    lease: Option<&Lease>,
    identity: &str,
    seen: &mut Option<Observed>,
    now: Instant,
    default_duration: Duration,
) -> Step {
    let Some(lease) = lease else {
        *seen = None;
        return Step::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Step::Acquire;
    }
    if holder == identity {
        return Step::Renew;
    }
    let resource_version = lease.metadata.resource_version.clone();
    let since = match seen {
        Some(o) if o.resource_version == resource_version && o.spec == spec => o.since,
        _ => {
            *seen = Some(Observed {
                resource_version,
                spec: spec.clone(),
                since: now,
            });
            now
        }
    };
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(default_duration, Duration::from_secs);
    let until = since + duration;
    if now >= until {
        Step::Acquire
    } else {
        Step::Wait { holder, until }
    }
}

/// The Lease spec to write for `step` (not used for [`Step::Wait`]). The times are wall-clock
/// times for people and other tools; this elector never reads them.
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

/// The outcome of one [`LeaderElector::try_acquire_or_renew`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease now.
    Held,
    /// Another replica holds it; it may be taken at `until` unless it changes.
    HeldBy {
        /// The holder.
        holder: String,
        /// When it may be taken (our clock).
        until: Instant,
    },
    /// The write lost a race (`409 Conflict`): the Lease changed since it was read.
    Conflict,
}

/// Takes part in the election for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    seen: Mutex<Option<Observed>>,
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
            seen: Mutex::new(None),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// One round: reads the Lease and creates, renews or takes it when allowed.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(&self.cfg.name).await?;
        let step = next_step(
            current.as_ref(),
            &self.cfg.identity,
            &mut self.seen.lock().expect("seen lock"),
            Instant::now(),
            self.cfg.lease_duration,
        );
        let now = Timestamp::now();
        let write = match (&step, current) {
            (Step::Wait { holder, until }, _) => {
                return Ok(Attempt::HeldBy {
                    holder: holder.clone(),
                    until: *until,
                });
            }
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
            Ok(_) => Ok(Attempt::Held),
            Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease or shutdown is requested (`None`). Returns when
    /// the winning attempt started: the renew deadline counts from there.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Instant> {
        loop {
            let started = Instant::now();
            let mut next = started + self.cfg.retry_period;
            // an attempt that hangs must not hold the lease unknowingly for long: it is cut off
            // at the renew deadline, as a renewal would be
            match tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Some(started);
                }
                Ok(Ok(Attempt::HeldBy { until, .. })) => next = next.min(until),
                Ok(Ok(Attempt::Conflict)) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election: lease not reachable"),
                Err(_) => warn!(
                    timeout_secs = self.cfg.renew_deadline.as_secs_f64(),
                    "leader election: the API server did not answer in time"
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Renews the Lease every retry period until shutdown or until it is lost: another replica
    /// holds it, or no renewal succeeded by the renew deadline (counted from the start of the
    /// last one that did, `renewed`). Each attempt is cut off at that deadline.
    pub async fn hold(&self, renewed: Instant, shutdown: &CancellationToken) -> HoldEnd {
        let mut deadline = renewed + self.cfg.renew_deadline;
        loop {
            let next = (Instant::now() + self.cfg.retry_period).min(deadline);
            tokio::select! {
                () = shutdown.cancelled() => return HoldEnd::Shutdown,
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                warn!(lease = %self.cfg.name, renew_deadline_secs = self.cfg.renew_deadline.as_secs_f64(), "no renewal succeeded before the renew deadline");
                return HoldEnd::Lost;
            }
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => deadline = started + self.cfg.renew_deadline,
                Ok(Ok(Attempt::HeldBy { holder, .. })) => {
                    warn!(lease = %self.cfg.name, %holder, "another replica holds the lease");
                    return HoldEnd::Lost;
                }
                Ok(Ok(Attempt::Conflict)) => {
                    warn!(lease = %self.cfg.name, "renewal conflicted; reading the lease again");
                }
                Ok(Err(e)) => warn!(error = %e, "could not renew the lease"),
                Err(_) => {
                    warn!(lease = %self.cfg.name, renew_deadline_secs = self.cfg.renew_deadline.as_secs_f64(), "renewal did not finish before the renew deadline");
                    return HoldEnd::Lost;
                }
            }
        }
    }

    /// Gives the Lease up (clears the holder) so a standby replica takes over at once instead of
    /// waiting for it to expire. Best effort, bounded by the retry period: errors are logged.
    pub async fn release(&self) {
        match tokio::time::timeout(self.cfg.retry_period, self.release_inner()).await {
            Ok(()) => {}
            Err(_) => warn!(lease = %self.cfg.name, "could not release the lease in time"),
        }
    }

    async fn release_inner(&self) {
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

/// This replica's turn as leader: [`Leadership::lead`] runs the controller until it stops by
/// itself after [`Leadership::stop`] (shutdown) or until the Lease is lost, then
/// [`Leadership::end`] releases the Lease.
pub struct Leadership {
    elector: Option<Arc<LeaderElector>>,
    stop: CancellationToken,
    lost: CancellationToken,
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
        info!(lease = %elector.cfg.name, identity = %elector.cfg.identity, "waiting to become leader");
        let Some(renewed) = elector.acquire(shutdown).await else {
            info!("shut down before becoming leader");
            return None;
        };
        let elector = Arc::new(elector);
        let hold = {
            let elector = elector.clone();
            let shutdown = shutdown.clone();
            async move { elector.hold(renewed, &shutdown).await }
        };
        Some(Self::watch(Some(elector), Some(hold), shutdown))
    }

    /// Cancels [`Self::stop`] when `hold` ends (the Lease was lost, or shutdown) or on `shutdown`,
    /// and the loss signal [`Self::lead`] waits for when `hold` ends with [`HoldEnd::Lost`].
    fn watch<F>(
        elector: Option<Arc<LeaderElector>>,
        hold: Option<F>,
        shutdown: &CancellationToken,
    ) -> Self
    where
        F: Future<Output = HoldEnd> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let holder = hold.map(|hold| {
            let (stop, lost) = (stop.clone(), lost.clone());
            tokio::spawn(async move {
                let end = hold.await;
                if end == HoldEnd::Lost {
                    lost.cancel();
                }
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
            lost,
            holder,
        }
    }

    /// Cancelled when the controller must stop: on shutdown, or when the Lease is lost.
    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `controller` (which should end by itself once [`Self::stop`] is cancelled) and returns
    /// [`HoldEnd::Shutdown`] when it ends. When the Lease is lost first, the controller is dropped
    /// at once, in the middle of whatever reconcile it runs, and this returns [`HoldEnd::Lost`]:
    /// a standby may take over as soon as the lease duration has passed, so waiting for a
    /// reconcile stuck in a Kafka timeout could make two leaders.
    pub async fn lead(&self, controller: impl Future<Output = ()>) -> HoldEnd {
        tokio::select! {
            biased;
            () = self.lost.cancelled() => HoldEnd::Lost,
            () = controller => HoldEnd::Shutdown,
        }
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
    use k8s_openapi::jiff::SignedDuration;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            name: "tickfleet-operator".into(),
            namespace: "tickfleet-system".into(),
            identity: "op-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
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
        assert_eq!(e.try_acquire_or_renew().await.unwrap(), Attempt::Held);
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
            spec: Some(LeaseSpec {
                lease_duration_seconds: None,
                ..held_by("op-b", 0)
            }),
        };
        let (client, log) = ApiServer {
            lease: Some(lease),
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, fast());
        assert!(matches!(
            e.try_acquire_or_renew().await.unwrap(),
            Attempt::HeldBy { .. }
        ));
        assert_eq!(
            requests(&log),
            vec![format!("GET {LEASE}/tickfleet-operator")],
            "no write"
        );
        // unchanged for a whole lease duration (the record has none: ours applies)
        tokio::time::sleep(fast().lease_duration).await;
        assert_eq!(e.try_acquire_or_renew().await.unwrap(), Attempt::Held);
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
        assert_eq!(e.try_acquire_or_renew().await.unwrap(), Attempt::Conflict);
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

    // --- issue 11 #6: leader election with margin, and #7: identity outside a cluster ---

    fn held_lease(holder: &str, renewed: Timestamp, version: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("tickfleet-operator".into()),
                namespace: Some("tickfleet-system".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                ..held_by(holder, 0)
            }),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn standby_waits_a_lease_duration_from_when_it_saw_the_lease_change() {
        let t0 = Instant::now();
        let mut seen = None;
        let v1 = held_lease("op-b", at(0), "1");
        let wait = |until| Step::Wait {
            holder: "op-b".into(),
            until,
        };
        assert_eq!(next_step(Some(&v1), "op-a", &mut seen, t0, D), wait(t0 + D));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            next_step(Some(&v1), "op-a", &mut seen, later, D),
            wait(t0 + D)
        );
        // the holder renews: the wait starts again from when the standby saw the change
        let v2 = held_lease("op-b", at(10), "2");
        assert_eq!(
            next_step(Some(&v2), "op-a", &mut seen, later, D),
            wait(later + D)
        );
        let almost = later + D - Duration::from_millis(1);
        assert_eq!(
            next_step(Some(&v2), "op-a", &mut seen, almost, D),
            wait(later + D)
        );
        assert_eq!(
            next_step(Some(&v2), "op-a", &mut seen, later + D, D),
            Step::Acquire
        );
        // the record's own duration is the holder's promise; ours only when it has none
        let mut short = held_lease("op-b", at(0), "3");
        short.spec.as_mut().unwrap().lease_duration_seconds = Some(5);
        assert_eq!(
            next_step(Some(&short), "op-a", &mut seen, t0, D),
            wait(t0 + Duration::from_secs(5))
        );
        // released (no holder) or ours: at once
        let mut released = v2.clone();
        released.spec.as_mut().unwrap().holder_identity = None;
        assert_eq!(
            next_step(Some(&released), "op-a", &mut seen, t0, D),
            Step::Acquire
        );
        assert_eq!(next_step(Some(&v2), "op-b", &mut seen, t0, D), Step::Renew);
        assert_eq!(next_step(None, "op-a", &mut seen, t0, D), Step::Create);
    }

    #[test]
    fn standby_ignores_clock_skew_between_holder_and_standby() {
        // issue 11 #6: the standby compared the holder's renewTime with its own clock. A holder
        // whose clock is an hour behind looked expired at once (two leaders); one an hour ahead
        // kept its lease for an hour after dying.
        let hour = 3600;
        let wall_now = Timestamp::now();
        for (skew, renewed) in [
            (
                "holder an hour behind",
                wall_now - SignedDuration::from_secs(hour),
            ),
            (
                "holder an hour ahead",
                wall_now + SignedDuration::from_secs(hour),
            ),
        ] {
            let t0 = Instant::now();
            let mut seen = None;
            let lease = held_lease("op-b", renewed, "9");
            assert!(
                matches!(
                    next_step(Some(&lease), "op-a", &mut seen, t0, D),
                    Step::Wait { .. }
                ),
                "{skew}: a lease seen for the first time is never taken"
            );
            assert!(
                matches!(
                    next_step(
                        Some(&lease),
                        "op-a",
                        &mut seen,
                        t0 + D - Duration::from_millis(1),
                        D
                    ),
                    Step::Wait { .. }
                ),
                "{skew}"
            );
            assert_eq!(
                next_step(Some(&lease), "op-a", &mut seen, t0 + D, D),
                Step::Acquire,
                "{skew}: unchanged for a lease duration, by the standby's own clock"
            );
        }
    }

    #[tokio::test]
    async fn standby_on_the_api_server_does_not_take_a_lease_of_a_holder_whose_clock_is_behind() {
        // the same through the mocked API server: renewTime an hour old, a fresh look
        let stale = Timestamp::now() - SignedDuration::from_secs(3600);
        let (client, log) = ApiServer {
            lease: Some(held_lease("op-b", stale, "42")),
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, cfg());
        let attempt = e.try_acquire_or_renew().await.unwrap();
        assert!(
            matches!(&attempt, Attempt::HeldBy { holder, .. } if holder == "op-b"),
            "{attempt:?}"
        );
        assert_eq!(
            requests(&log),
            vec![format!("GET {LEASE}/tickfleet-operator")],
            "no write"
        );
    }

    #[test]
    fn renew_deadline_is_well_inside_the_lease_duration() {
        // issue 11 #6: the leader renewed until exactly the lease duration
        let defaults = LeaseConfig {
            lease_duration: Duration::from_secs(DEFAULT_LEASE_DURATION_SECS),
            renew_deadline: Duration::from_secs(DEFAULT_RENEW_DEADLINE_SECS),
            retry_period: Duration::from_secs(DEFAULT_RETRY_PERIOD_SECS),
            ..cfg()
        };
        assert_eq!(defaults.validate(), Ok(()));
        assert_eq!(
            (
                DEFAULT_LEASE_DURATION_SECS,
                DEFAULT_RENEW_DEADLINE_SECS,
                DEFAULT_RETRY_PERIOD_SECS
            ),
            (15, 10, 2)
        );
        let no_margin = LeaseConfig {
            renew_deadline: Duration::from_secs(15),
            ..defaults.clone()
        };
        assert!(no_margin.validate().unwrap_err().contains("renew deadline"));
        let retry_too_long = LeaseConfig {
            retry_period: Duration::from_secs(10),
            ..defaults
        };
        assert!(retry_too_long.validate().is_err());
    }

    /// Short timings on real time for the async loops; no duration is asserted.
    fn fast() -> LeaseConfig {
        LeaseConfig {
            lease_duration: Duration::from_millis(600),
            renew_deadline: Duration::from_millis(300),
            retry_period: Duration::from_millis(50),
            ..cfg()
        }
    }

    #[tokio::test]
    async fn a_hung_renewal_is_cut_off_and_loses_leadership() {
        // issue 11 #6: the renew call had no timeout of its own; a hung API server kept the
        // leader reconciling with no valid lease, forever
        let (client, log) = ApiServer {
            lease: Some(held_lease("op-a", Timestamp::now(), "5")),
            hang: vec![("PUT", format!("{LEASE}/tickfleet-operator"))],
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, fast());
        let shutdown = CancellationToken::new();
        let end = tokio::time::timeout(Duration::from_secs(30), e.hold(Instant::now(), &shutdown))
            .await
            .expect("hold returns instead of hanging on the renewal");
        assert_eq!(end, HoldEnd::Lost);
        assert_eq!(
            requests(&log),
            vec![
                format!("GET {LEASE}/tickfleet-operator"),
                format!("PUT {LEASE}/tickfleet-operator?")
            ],
            "one renewal, hung until the deadline"
        );
    }

    #[tokio::test]
    async fn failing_renewals_are_retried_until_the_renew_deadline() {
        let (client, log) = ApiServer {
            lease: Some(held_lease("op-a", Timestamp::now(), "5")),
            fail: vec![("PUT", format!("{LEASE}/tickfleet-operator"), 500)],
            ..ApiServer::default()
        }
        .start();
        let e = LeaderElector::new(client, fast());
        let shutdown = CancellationToken::new();
        let end = tokio::time::timeout(Duration::from_secs(30), e.hold(Instant::now(), &shutdown))
            .await
            .expect("hold returns");
        assert_eq!(end, HoldEnd::Lost);
        let puts = requests(&log)
            .iter()
            .filter(|r| r.starts_with("PUT"))
            .count();
        assert!(puts >= 1, "retried: {puts}");
    }

    #[tokio::test]
    async fn standby_takes_over_only_the_record_it_saw_unchanged() {
        // two replicas on one API server: a leads; b stands by; a renews, so b's wait restarts;
        // a stops renewing (killed), and b takes over with the version it watched
        let (client, log) = ApiServer::default().start();
        let a = LeaderElector::new(client.clone(), fast());
        let b = LeaderElector::new(
            client,
            LeaseConfig {
                identity: "op-b".into(),
                ..fast()
            },
        );
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
        let Attempt::HeldBy { holder, until } = b.try_acquire_or_renew().await.unwrap() else {
            panic!("b must wait")
        };
        assert_eq!(holder, "op-a");
        assert_eq!(
            a.try_acquire_or_renew().await.unwrap(),
            Attempt::Held,
            "renewed"
        );
        let Attempt::HeldBy { until: later, .. } = b.try_acquire_or_renew().await.unwrap() else {
            panic!("b must still wait after a renewal")
        };
        assert!(later > until, "the renewal restarted b's wait");
        // a is gone; b's next look after the lease duration takes it
        let shutdown = CancellationToken::new();
        let started = tokio::time::timeout(Duration::from_secs(30), b.acquire(&shutdown))
            .await
            .expect("b takes over")
            .expect("not shut down");
        assert!(
            started >= later,
            "not before the record it saw stayed unchanged for a lease duration"
        );
        let log = log.lock().unwrap();
        let take = log.last().unwrap();
        assert_eq!(take.method, "PUT");
        assert_eq!(take.body["spec"]["holderIdentity"], "op-b");
        assert_eq!(take.body["spec"]["leaseTransitions"], 1);
        // and a, on its next renewal, sees b and gives up
        drop(log);
        let Attempt::HeldBy { holder, .. } = a.try_acquire_or_renew().await.unwrap() else {
            panic!("a must see b")
        };
        assert_eq!(holder, "op-b");
    }

    #[tokio::test]
    async fn losing_the_lease_drops_the_controller_at_once() {
        // a reconcile stuck in a Kafka call ignores the stop token; leadership lost must not wait
        // for it, since a standby may take over as soon as the lease duration has passed
        struct Dropped(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = Dropped(dropped.clone());
        let controller = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        let (client, _) = ApiServer::default().start();
        let elector = Arc::new(LeaderElector::new(client, cfg()));
        let shutdown = CancellationToken::new();
        let leadership = Leadership::watch(Some(elector), Some(async { HoldEnd::Lost }), &shutdown);
        assert_eq!(leadership.lead(controller).await, HoldEnd::Lost);
        assert!(
            dropped.load(std::sync::atomic::Ordering::SeqCst),
            "controller dropped"
        );
    }

    #[tokio::test]
    async fn on_shutdown_the_controller_finishes_by_itself() {
        let shutdown = CancellationToken::new();
        let leadership = Leadership::acquire(None, &shutdown).await.expect("leads");
        let stop = leadership.stop();
        shutdown.cancel();
        let end = leadership.lead(async move { stop.cancelled().await }).await;
        assert_eq!(end, HoldEnd::Shutdown);
    }

    #[test]
    fn identity_outside_a_cluster_is_the_host_name_and_pid() {
        // issue 11 #7: without POD_NAME or --identity (and HOSTNAME, which shells do not export)
        // the operator refused to start
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(
            identity(None),
            format!("{}-{}", host.trim(), std::process::id())
        );
        assert_eq!(identity(Some("op-7d9f-x2".into())), "op-7d9f-x2");
        assert_eq!(
            identity(Some(" ".into())),
            identity(None),
            "blank is no identity"
        );
        assert_eq!(default_identity(None, 42), "localhost-42");
        assert_ne!(
            default_identity(Some("h".into()), 1),
            default_identity(Some("h".into()), 2),
            "two operators on one host differ"
        );
    }
}

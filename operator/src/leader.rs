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
//!   It **watches** the Lease (a `fieldSelector` watch from the version it read), so it sees each
//!   renewal when the API server commits it rather than up to a retry period later, and it tries
//!   exactly when the record's time is up, or at once when the watch shows the Lease released or
//!   deleted. It also reads the Lease every retry period, so a watch that broke or lags costs at
//!   most one retry period, never correctness (a late sighting only makes it wait longer).
//! - **Timings derive from the lease duration** when only it is given: renew deadline 2/3 of it,
//!   retry period 2/15 of it ([`LeaseConfig::derived`]), which gives client-go's 10 s and 2 s for
//!   15 s.
//! - **Writes** are `replace` with the `resourceVersion` that was read, so when two replicas race,
//!   or the holder renewed after the standby's last look, the API server accepts one write and
//!   answers the other `409 Conflict`.
//!
//! Why two leaders cannot reconcile at once: the holder's last successful renewal was sent before
//! the standby saw its result, and the holder stops reconciling at most a renew deadline after
//! sending it; the standby waits a whole lease duration after seeing it. This needs the two clocks
//! to run at about the same *rate* (5 s of margin in 15 s), never that they *agree*.
//!
//! After a holder dies without releasing the Lease (SIGKILL, node loss), a standby takes over one
//! lease duration after its last renewal, plus the watch's delivery latency (milliseconds; at most
//! a retry period when the watch is broken and the periodic read sees it). Since the renewal came
//! before the death, that is between `lease duration − retry period` and `lease duration` (plus
//! that latency) after the death. A holder that shuts down cleanly releases the Lease and a
//! standby, seeing that on its watch, takes over at once.
//!
//! [`Leadership`] is the wiring the binary uses: wait to lead, reconcile until shutdown or until
//! the Lease is lost, then release it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Default seconds a Lease stays valid without renewal, as seen by a standby.
pub const DEFAULT_LEASE_DURATION_SECS: u64 = 15;
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
    /// Settings with the renew deadline and retry period derived from `lease_duration` as
    /// client-go's defaults relate (15 s, 10 s, 2 s): 2/3 and 2/15 of it.
    pub fn derived(
        name: String,
        namespace: String,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        Self {
            name,
            namespace,
            identity,
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: lease_duration * 2 / 15,
        }
    }

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

    /// Notes the Lease as read or watched now (`None`: it does not exist) and says what to do.
    fn observe(&self, lease: Option<&Lease>) -> Step {
        next_step(
            lease,
            &self.cfg.identity,
            &mut self.seen.lock().expect("seen lock"),
            Instant::now(),
            self.cfg.lease_duration,
        )
    }

    /// The `resourceVersion` of the Lease record last seen held by another replica.
    fn seen_version(&self) -> Option<String> {
        self.seen
            .lock()
            .expect("seen lock")
            .as_ref()
            .and_then(|o| o.resource_version.clone())
    }

    /// A watch of the Lease from `version`: its changes as they are committed. Opening it is
    /// part of the stream, so a slow API server never holds up the caller's timers.
    fn watch(&self, version: String) -> LeaseWatch {
        let api = self.api.clone();
        let params = WatchParams::default().fields(&format!("metadata.name={}", self.cfg.name));
        futures::stream::once(async move { api.watch(&params, &version).await })
            .try_flatten()
            .boxed()
    }

    /// One round: reads the Lease and creates, renews or takes it when allowed.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(&self.cfg.name).await?;
        let step = self.observe(current.as_ref());
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
    ///
    /// Between attempts it follows the Lease on a watch: each change seen there restarts the
    /// wait as a read would, and an attempt is made the moment the record's lease duration is
    /// up, or at once when the Lease is released or deleted. The Lease is read again every retry
    /// period in any case, and a watch that ends or fails is opened again after that read.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<Instant> {
        let mut watch: Option<LeaseWatch> = None;
        loop {
            let started = Instant::now();
            let poll = started + self.cfg.retry_period;
            let mut next = poll;
            // an attempt that hangs must not hold the lease unknowingly for long: it is cut off
            // at the renew deadline, as a renewal would be
            match tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Some(started);
                }
                Ok(Ok(Attempt::HeldBy { until, .. })) => {
                    next = next.min(until);
                    if watch.is_none() {
                        watch = self.seen_version().map(|v| self.watch(v));
                    }
                }
                Ok(Ok(Attempt::Conflict)) => {}
                Ok(Err(e)) => warn!(error = %e, "leader election: lease not reachable"),
                Err(_) => warn!(
                    timeout_secs = self.cfg.renew_deadline.as_secs_f64(),
                    "leader election: the API server did not answer in time"
                ),
            }
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep_until(next) => break,
                    event = next_event(&mut watch) => {
                        let step = match event {
                            Some(Ok(WatchEvent::Added(l) | WatchEvent::Modified(l))) => self.observe(Some(&l)),
                            Some(Ok(WatchEvent::Deleted(_))) => self.observe(None),
                            Some(Ok(WatchEvent::Bookmark(_))) => continue,
                            Some(Ok(WatchEvent::Error(e))) => {
                                debug!(code = e.code, reason = %e.reason, "lease watch ended; reading again at the next look");
                                watch = None;
                                continue;
                            }
                            Some(Err(e)) => {
                                debug!(error = %e, "lease watch failed; reading again at the next look");
                                watch = None;
                                continue;
                            }
                            None => {
                                watch = None;
                                continue;
                            }
                        };
                        match step {
                            Step::Wait { until, .. } => next = poll.min(until),
                            // released, deleted (or, oddly, ours): try now
                            Step::Acquire | Step::Create | Step::Renew => break,
                        }
                    }
                }
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

/// The events of a Lease watch.
type LeaseWatch = BoxStream<'static, Result<WatchEvent<Lease>, kube::Error>>;

/// The next event of `watch`; never ready while there is none.
async fn next_event(
    watch: &mut Option<LeaseWatch>,
) -> Option<Result<WatchEvent<Lease>, kube::Error>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
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
mod tests;

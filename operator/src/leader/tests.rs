//! Leader election tests: pure steps on explicit instants (a fake clock), and the electors
//! against the mocked API server (short timings on real time; no duration is asserted).

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
    let defaults = LeaseConfig::derived(
        "l".into(),
        "ns".into(),
        "op-a".into(),
        Duration::from_secs(DEFAULT_LEASE_DURATION_SECS),
    );
    assert_eq!(defaults.validate(), Ok(()));
    assert_eq!(
        (
            defaults.lease_duration,
            defaults.renew_deadline,
            defaults.retry_period
        ),
        (
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2)
        ),
        "client-go's timings"
    );
    // derived from any lease duration in the same proportions, so always valid
    for (lease, renew, retry) in [(30_000, 20_000, 4_000), (6_000, 4_000, 800)] {
        let c = LeaseConfig::derived(
            "l".into(),
            "ns".into(),
            "op-a".into(),
            Duration::from_millis(lease),
        );
        assert_eq!(
            (c.renew_deadline, c.retry_period),
            (Duration::from_millis(renew), Duration::from_millis(retry))
        );
        assert_eq!(c.validate(), Ok(()));
    }
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

/// Renews `op-a`'s Lease on `server` (fast timings) until `hold` returns; its end and the
/// requests made. The 30 s limit only keeps a hang from stalling the run.
async fn hold_on(server: ApiServer) -> (HoldEnd, Vec<String>) {
    let (client, log) = ApiServer {
        lease: Some(held_lease("op-a", Timestamp::now(), "5")),
        ..server
    }
    .start();
    let e = LeaderElector::new(client, fast());
    let shutdown = CancellationToken::new();
    let end = tokio::time::timeout(Duration::from_secs(30), e.hold(Instant::now(), &shutdown))
        .await
        .expect("hold returns instead of hanging");
    (end, requests(&log))
}

#[tokio::test]
async fn a_hung_renewal_is_cut_off_and_loses_leadership() {
    // issue 11 #6: the renew call had no timeout of its own; a hung API server kept the
    // leader reconciling with no valid lease, forever
    let (end, requests) = hold_on(ApiServer {
        hang: vec![("PUT", format!("{LEASE}/tickfleet-operator"))],
        ..ApiServer::default()
    })
    .await;
    assert_eq!(end, HoldEnd::Lost);
    assert_eq!(
        requests,
        vec![
            format!("GET {LEASE}/tickfleet-operator"),
            format!("PUT {LEASE}/tickfleet-operator?")
        ],
        "one renewal, hung until the deadline"
    );
}

#[tokio::test]
async fn failing_renewals_are_retried_until_the_renew_deadline() {
    let (end, requests) = hold_on(ApiServer {
        fail: vec![("PUT", format!("{LEASE}/tickfleet-operator"), 500)],
        ..ApiServer::default()
    })
    .await;
    assert_eq!(end, HoldEnd::Lost);
    let puts = requests.iter().filter(|r| r.starts_with("PUT")).count();
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
    {
        let log = log.lock().unwrap();
        let take = log.last().unwrap();
        assert_eq!(take.method, "PUT");
        assert_eq!(take.body["spec"]["holderIdentity"], "op-b");
        assert_eq!(take.body["spec"]["leaseTransitions"], 1);
    }
    // and a, on its next renewal, sees b and gives up
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

/// Runs a standby `op-a` (default timings, paused clock) against a Lease `op-b` holds, which
/// changes to `change` 500 ms in; returns when it took the Lease, from its start, and the
/// requests made.
async fn standby_with_change(change: Lease) -> (Duration, Vec<crate::fixtures::Recorded>) {
    let t0 = Instant::now();
    let (client, log) = ApiServer {
        lease: Some(held_lease("op-b", Timestamp::now(), "1")),
        lease_changes: vec![(Duration::from_millis(500), change)],
        ..ApiServer::default()
    }
    .start();
    let e = LeaderElector::new(client, cfg());
    let started = e
        .acquire(&CancellationToken::new())
        .await
        .expect("not shut down");
    let log = log.lock().unwrap().clone();
    let take = log.last().unwrap();
    assert_eq!(take.method, "PUT");
    assert_eq!(take.body["spec"]["holderIdentity"], "op-a");
    (started - t0, log)
}

/// Whether the standby watched the Lease (checked after the timing, which is what matters).
fn watched(log: &[crate::fixtures::Recorded]) -> bool {
    log.iter().any(|r| {
        r.method == "GET"
            && r.uri.contains("watch=true")
            && r.uri
                .contains("fieldSelector=metadata.name%3Dtickfleet-operator")
    })
}

#[tokio::test(start_paused = true)]
async fn standby_sees_a_renewal_on_its_watch_and_tries_the_moment_the_lease_expires() {
    // issue 19 "failover took 13-18 s": the standby saw a renewal only at its next read, up to
    // a retry period (2 s) late, and waited a lease duration from there. On its watch it sees
    // the renewal (0.5 s in) when it is made, and takes over a lease duration after that, not
    // at the first read after it (17 s). The clock is tokio's paused one: exact, not timing.
    let renewed = held_lease("op-b", Timestamp::now(), "2");
    let (took, log) = standby_with_change(renewed).await;
    assert_eq!(took, Duration::from_millis(15_500));
    assert!(watched(&log), "the standby watches the Lease: {log:?}");
    let puts = log.iter().filter(|r| r.method == "PUT").count();
    assert_eq!(puts, 1, "one attempt to take it, when it expired");
}

#[tokio::test(start_paused = true)]
async fn standby_takes_a_lease_released_on_its_watch_at_once() {
    let mut released = held_lease("op-b", Timestamp::now(), "2");
    released.spec.as_mut().unwrap().holder_identity = None;
    let (took, log) = standby_with_change(released).await;
    assert_eq!(
        took,
        Duration::from_millis(500),
        "not at the next read (2 s)"
    );
    assert!(watched(&log), "the standby watches the Lease: {log:?}");
}

//! Condition tests: rollouts from Deployment status, the wanted conditions, merging.

use super::*;
use crate::fixtures::pods;
use k8s_openapi::jiff::Timestamp;

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn find<'a>(c: &'a [Condition], ty: &str) -> &'a Condition {
    c.iter().find(|c| c.type_ == ty).unwrap()
}

fn healthy() -> Observation {
    Observation {
        workers: pods(3),
        api: pods(1),
        ..Observation::default()
    }
}

fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "btc-worker", "generation": generation},
        "spec": {"replicas": 4, "selector": {}, "template": {}},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn a_source_that_is_not_up_keeps_the_pipeline_unready() {
    let mut obs = healthy();
    obs.sources = vec![
        ("kraken".into(), Rollout::Complete, pods(1)),
        (
            "binance".into(),
            Rollout::Waiting("0 of 1 pods available".into()),
            ReplicaStatus {
                available: 0,
                ready: 0,
                ..pods(1)
            },
        ),
    ];
    let w = wanted(&obs);
    assert_eq!(
        (w[0].status, w[0].reason.as_str()),
        ("False", "SourceNotReady")
    );
    assert!(
        w[0].message
            .starts_with("source binance: 0 of 1 connector pods available"),
        "{}",
        w[0].message
    );
    assert_eq!((w[1].status, w[1].reason.as_str()), ("True", "RollingOut"));
    assert_eq!(w[1].message, "source binance: 0 of 1 pods available");
    obs.sources[1] = ("binance".into(), Rollout::Complete, pods(1));
    let w = wanted(&obs);
    assert_eq!(
        (w[0].status, w[0].reason.as_str()),
        ("True", "AllReplicasReady")
    );
    assert_eq!(
        w[0].message,
        "3 workers, 1 api pods and 2 source connectors available"
    );
    assert_eq!(w[1].status, "False");
}

#[test]
fn rollout_is_read_from_the_deployment_status() {
    // what was seen on a real cluster: 4 pods of the current spec, all Pending
    let pending = deployment(
        2,
        serde_json::json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 4,
            "unavailableReplicas": 4}),
    );
    let (state, p) = rollout(&pending);
    assert_eq!(state, Rollout::Waiting("0 of 4 pods available".into()));
    assert_eq!((p.desired, p.current, p.updated, p.available), (4, 4, 4, 0));
    let obs = Observation {
        workers: p,
        workers_rollout: state,
        api: pods(1),
        ..Observation::default()
    };
    let w = wanted(&obs);
    assert_eq!(
        (w[0].status, w[0].reason.as_str()),
        ("False", "WorkersNotReady")
    );
    assert_eq!(
        w[0].message,
        "0 of 4 workers available (0 ready, 4 run the current spec)"
    );
    assert_eq!((w[1].status, w[1].reason.as_str()), ("True", "RollingOut"));
    assert_eq!(w[1].message, "workers: 0 of 4 pods available");

    let unseen = deployment(
        3,
        serde_json::json!({"observedGeneration": 2, "replicas": 4,
        "updatedReplicas": 4, "availableReplicas": 4, "readyReplicas": 4}),
    );
    assert!(matches!(rollout(&unseen).0, Rollout::Waiting(m) if m.contains("not seen")));
    let half = deployment(
        2,
        serde_json::json!({"observedGeneration": 2, "replicas": 5,
        "updatedReplicas": 2, "availableReplicas": 4}),
    );
    assert_eq!(
        rollout(&half).0,
        Rollout::Waiting("2 of 4 pods run the current spec".into())
    );
    let old_left = deployment(
        2,
        serde_json::json!({"observedGeneration": 2, "replicas": 5,
        "updatedReplicas": 4, "availableReplicas": 4}),
    );
    assert_eq!(
        rollout(&old_left).0,
        Rollout::Waiting("1 old pods still terminating".into())
    );
    let stuck = deployment(
        2,
        serde_json::json!({"observedGeneration": 2, "replicas": 4,
        "updatedReplicas": 4, "conditions": [{"type": "Progressing", "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "ReplicaSet \"btc-worker-1\" has timed out progressing."}]}),
    );
    let (state, p) = rollout(&stuck);
    assert_eq!(
        state,
        Rollout::Stalled("ReplicaSet \"btc-worker-1\" has timed out progressing.".into())
    );
    let w = wanted(&Observation {
        workers: p,
        workers_rollout: state,
        api: pods(1),
        ..Observation::default()
    });
    assert_eq!(
        (w[1].status, w[1].reason.as_str()),
        ("False", "ProgressDeadlineExceeded")
    );
    let done = deployment(
        2,
        serde_json::json!({"observedGeneration": 2, "replicas": 4,
        "updatedReplicas": 4, "availableReplicas": 4, "readyReplicas": 4}),
    );
    assert_eq!(rollout(&done), (Rollout::Complete, pods(4)));
}

#[test]
fn healthy_pipeline_is_ready_and_stable() {
    let w = wanted(&healthy());
    let types: Vec<_> = w
        .iter()
        .map(|w| (w.type_, w.status, w.reason.as_str()))
        .collect();
    assert_eq!(
        types,
        vec![
            (READY, "True", "AllReplicasReady"),
            (PROGRESSING, "False", "RolloutComplete"),
            (DEGRADED, "False", "AsExpected"),
            (PAUSED, "False", "NotPaused"),
            (WORKERS_CAPPED, "False", "WithinPartitions"),
        ]
    );
}

#[test]
fn missing_workers_make_it_unready_and_rolling_is_progressing() {
    let mut obs = healthy();
    obs.workers.ready = 1;
    obs.workers.available = 1;
    obs.workers_rollout = Rollout::Waiting("1 of 3 pods available".into());
    let w = wanted(&obs);
    assert_eq!(w[0].status, "False");
    assert_eq!(w[0].reason, "WorkersNotReady");
    assert_eq!(
        w[0].message,
        "1 of 3 workers available (1 ready, 3 run the current spec)"
    );
    assert_eq!((w[1].status, w[1].reason.as_str()), ("True", "RollingOut"));
    assert_eq!(w[1].message, "workers: 1 of 3 pods available");
}

#[test]
fn blocking_problem_is_degraded_and_unready() {
    let mut obs = healthy();
    obs.problems.push(Problem {
        reason: "TopicUnavailable".into(),
        message: "creating topic ticks: broker down".into(),
        blocks_ready: true,
    });
    obs.problems.push(Problem {
        reason: "LagUnavailable".into(),
        message: "reading lag: broker down".into(),
        blocks_ready: false,
    });
    let w = wanted(&obs);
    assert_eq!(
        (w[0].status, w[0].reason.as_str()),
        ("False", "TopicUnavailable")
    );
    assert_eq!(
        (w[2].status, w[2].reason.as_str()),
        ("True", "TopicUnavailable")
    );
    assert_eq!(
        w[2].message,
        "creating topic ticks: broker down; reading lag: broker down"
    );
}

#[test]
fn non_blocking_problem_keeps_ready() {
    let mut obs = healthy();
    obs.problems.push(Problem {
        reason: "PartitionsCannotShrink".into(),
        message: "topic has 8 partitions, spec asks for 4; topics are never shrunk".into(),
        blocks_ready: false,
    });
    let w = wanted(&obs);
    assert_eq!(w[0].status, "True");
    assert_eq!(
        (w[2].status, w[2].reason.as_str()),
        ("True", "PartitionsCannotShrink")
    );
}

#[test]
fn capped_workers_are_explained() {
    let mut obs = healthy();
    obs.capped = Some((10, 3));
    let w = wanted(&obs);
    assert_eq!(
        (w[4].status, w[4].reason.as_str()),
        ("True", "MoreWorkersThanPartitions")
    );
    assert!(
        w[4].message
            .starts_with("10 workers asked for but the topic has 3 partitions")
    );
}

#[test]
fn transition_time_kept_while_status_unchanged() {
    let first = merge(&[], &wanted(&healthy()), &t(100), Some(1));
    assert!(first.iter().all(|c| c.last_transition_time == t(100)));
    assert!(first.iter().all(|c| c.observed_generation == Some(1)));

    // same statuses, new message and generation: times stay
    let mut obs = healthy();
    obs.workers = pods(4);
    let second = merge(&first, &wanted(&obs), &t(200), Some(2));
    assert_eq!(find(&second, READY).last_transition_time, t(100));
    assert_eq!(
        find(&second, READY).message,
        "4 workers and 1 api pods available"
    );
    assert_eq!(find(&second, READY).observed_generation, Some(2));

    // Ready flips: its time moves, the others' don't
    obs.workers.available = 2;
    let third = merge(&second, &wanted(&obs), &t(300), Some(2));
    assert_eq!(find(&third, READY).last_transition_time, t(300));
    assert_eq!(find(&third, READY).status, "False");
    assert_eq!(find(&third, DEGRADED).last_transition_time, t(100));
    assert_eq!(third.len(), 5);
}

#[test]
fn pausing_changes_only_paused() {
    let before = merge(&[], &wanted(&healthy()), &t(100), Some(1));
    let after = merge(&before, &[paused(Some(1), Some(2))], &t(500), Some(2));
    assert_eq!(find(&after, PAUSED).status, "True");
    assert!(
        find(&after, PAUSED)
            .message
            .ends_with("generation 2 is not applied (children are from generation 1) and will be when the annotation is removed"),
        "{}",
        find(&after, PAUSED).message
    );
    assert!(
        paused(Some(2), Some(2))
            .message
            .ends_with("nothing is pending")
    );
    assert_eq!(find(&after, PAUSED).reason, "PausedByAnnotation");
    assert_eq!(find(&after, PAUSED).last_transition_time, t(500));
    assert_eq!(find(&after, READY), find(&before, READY));
    assert_eq!(after.len(), 5);
}

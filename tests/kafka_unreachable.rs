//! Kafka that cannot be reached, with the real binaries: what was seen on a real cluster was a
//! worker writing 3,460 log lines in 77 s (librdkafka's `AllBrokersDown` and the poll error, every
//! ~50 ms) and an operator whose SIGTERM took 18.6 s (two 10 s Kafka timeouts in flight) after
//! logging ~196 librdkafka lines for one reconcile.

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tickfleet_e2e::kube::FakeKube;
use tickfleet_e2e::{
    DevBroker, Operator, Worker, WorkerSetup, free_port, redis_url, signal, wait_exit, wait_for,
};

/// Log lines that come from librdkafka or report a Kafka failure.
fn kafka_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("librdkafka") || l.contains("kafka consumer error"))
        .collect()
}

#[test]
fn a_worker_without_kafka_logs_the_failure_with_backoff_not_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    // a broker only for the setup's names; the worker is pointed at a port nothing listens on
    let broker = DevBroker::start(&["ticks:2"]);
    let mut setup = WorkerSetup::new(&broker, dir.path(), &redis_url());
    setup.bootstrap = format!("127.0.0.1:{}", free_port());
    let mut worker = Worker::start(&setup, 0);
    // the failure repeats about every 50 ms for as long as we watch
    std::thread::sleep(Duration::from_secs(12));
    let log = worker.log_text();
    let lines = kafka_lines(&log);
    // folded: written at 0, 1, 3 and 7 s (and once more when a second kind of line comes), with
    // the number folded in; unfolded this was ~540 lines in 12 s
    assert!(
        !lines.is_empty() && lines.len() <= 8,
        "{} Kafka lines in 12 s:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("folded=") && !l.contains("folded=0")),
        "a later line says how many were folded in:\n{}",
        lines.join("\n")
    );
    signal(&worker.child, "TERM");
    assert!(
        wait_exit(&mut worker.child, Duration::from_secs(30)).is_some(),
        "the worker did not stop"
    );
}

/// Accepts TCP connections and never answers: a Kafka that times out every request.
fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    (addr, accepted)
}

/// A TickPipeline `name` whose Kafka is `bootstrap`, as the fake API server serves it.
fn pipeline(name: &str, bootstrap: &str) -> serde_json::Value {
    json!({
        "apiVersion": "tickfleet.io/v1alpha1",
        "kind": "TickPipeline",
        "metadata": {"name": name, "namespace": "markets", "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "1",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "image": "ghcr.io/tickfleet/tickfleet:test",
            "kafka": {"bootstrapServers": bootstrap, "topic": "ticks", "partitions": 4},
            "store": {"redis": {"url": redis_url()}},
        },
    })
}

#[test]
fn operator_sigterm_ends_within_5s_while_kafka_calls_hang() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, accepted) = black_hole();
    let kube = FakeKube::start(vec![pipeline("silent", &kafka)]);
    let mut operator = Operator::start(&kube.kubeconfig(dir.path()), dir.path());
    // the reconcile is inside a Kafka call that will not answer
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the operator connecting to Kafka",
        || (accepted.load(Ordering::SeqCst) > 0).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));
    signal(&operator.child, "TERM");
    let status = wait_exit(&mut operator.child, Duration::from_secs(5));
    let log = operator.log_text();
    let status = status
        .unwrap_or_else(|| panic!("the operator was still running 5 s after SIGTERM:\n{log}"));
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("reconcile cancelled"), "{log}");
    let lines = kafka_lines(&log);
    assert!(lines.len() <= 4, "{} librdkafka lines:\n{log}", lines.len());
}

/// What a pipeline whose Kafka cannot be reached makes the operator log, for `bootstrap`.
fn operator_log_against(bootstrap: &str, watch: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let kube = FakeKube::start(vec![pipeline("lost", bootstrap)]);
    let mut operator = Operator::start(&kube.kubeconfig(dir.path()), dir.path());
    std::thread::sleep(watch);
    signal(&operator.child, "TERM");
    let status = wait_exit(&mut operator.child, Duration::from_secs(10));
    let log = operator.log_text();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    log
}

/// Seen on a real cluster, where there is no cluster DNS: a pipeline naming a Kafka Service the
/// operator cannot resolve, and one whose broker refuses connections. Each of librdkafka's
/// connection attempts logs an error; one reconcile wrote ~196 lines there. Now the cause (the
/// name that does not resolve, the refused connection) is logged, at once and then with backoff:
/// the operator's probe clients are never polled, so before it served their queue on a failure
/// (`RdKafkaAdmin::probing`) it logged only librdkafka's summary, `BrokerTransportFailure`.
#[test]
fn an_operator_whose_kafka_is_unresolvable_or_refusing_logs_the_failure_with_backoff() {
    for (what, bootstrap) in [
        ("unresolvable", "kafka.markets.svc.invalid:9092".to_string()),
        ("refusing", format!("127.0.0.1:{}", free_port())),
    ] {
        let log = operator_log_against(&bootstrap, Duration::from_secs(12));
        let lines = kafka_lines(&log);
        let cause = match what {
            "unresolvable" => "Failed to resolve",
            _ => "Connection refused",
        };
        assert!(
            lines.iter().any(|l| l.contains(cause)),
            "{what}: the cause ({cause}) is logged:\n{log}"
        );
        // folded: at most at 0, 1, 3 and 7 s after the first (one kind: every librdkafka failure
        // of the operator's clients shares it); unfolded, the unresolvable name alone was 9 lines
        // from the one reconcile that ran in these 12 s
        assert!(
            lines.len() <= 4,
            "{what}: {} librdkafka lines in 12 s:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }
}

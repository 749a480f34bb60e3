//! Issue 11, end to end with the real binaries: hostile input and faults the chaos suite does not make.
//! Each test replays one thing that went wrong before and counts what is stored and dead-lettered.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tickfleet_e2e::{
    Api, Kafka, Worker, WorkerSetup, create_topic, dead_letters, http_status, produce, redis_url,
    send_messages, shared_topic, signal, tickctl_json, verify, wait_exit, wait_for, wait_verified,
};

const STORED: &str = "tickfleet_worker_ticks_stored_total";
const DEAD: &str = "tickfleet_worker_messages_dead_lettered_total";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A JSON tick of BTC as an existing producer sends it (epoch milliseconds), keyed by its symbol.
fn btc(seq: u64, at_ms: i64, price: &str) -> (Option<&'static str>, Vec<u8>) {
    let json = format!(
        r#"{{"symbol":"BTC","price":"{price}","timestamp":{at_ms},"source":"e2e","seq":{seq}}}"#
    );
    (Some("BTC"), json.into_bytes())
}

/// Issue 11, "what was seen" 1: a worker with one day of retention stored 1000 JSON ticks of BTC; a
/// tick dated 100 years ahead then left only itself, pinned `latest`, and made retention delete the
/// next valid tick (now + 2 days) at once. Now, with the default skew limit, both out-of-range ticks
/// are dead-lettered as `clock_skew`, all 1000 are kept and `latest` is the last of them. And with the
/// limit opened wide (a second worker, its own store prefix), the far-future tick is stored, yet
/// retention — measured against the worker's clock — still keeps every tick.
#[test]
fn far_future_tick_cannot_erase_history() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("far-future", 4);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = ["--format", "json", "--retention-max-age-secs", "86400"]
        .map(String::from)
        .to_vec();
    let worker = Worker::start(&setup, 0);
    let mut wide = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    wide.args = setup.args.clone();
    wide.args
        .extend(["--max-skew-ahead-secs", "4000000000"].map(String::from));
    let wide_worker = Worker::start(&wide, 1);

    let start = now_ms() - 1000;
    let mut messages: Vec<_> = (1..=1000)
        .map(|i| btc(i, start + i as i64, &format!("64{i:03}.5")))
        .collect();
    let day_ms = 86_400_000;
    messages.push(btc(1001, now_ms() + 36_500 * day_ms, "1"));
    messages.push(btc(1002, now_ms() + 2 * day_ms, "64999"));
    send_messages(&bootstrap, &topic, &messages);

    let report = dir.path().join("btc.json");
    let assets =
        |last| serde_json::json!({"BTC": {"count": last, "first_seq": 1, "last_seq": last}});
    std::fs::write(
        &report,
        serde_json::json!({"topic": topic, "acknowledged": 1000, "failed": 0, "assets": assets(1000)})
            .to_string(),
    )
    .unwrap();
    let summary = wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(60),
    );
    assert_eq!(summary["stored"], 1000, "{summary}");
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "both out-of-range ticks dead-lettered",
        || (worker.metric(DEAD) == 2.0).then_some(()),
    );
    let letters = dead_letters(&bootstrap, &format!("{topic}.dlq"));
    let skewed: Vec<_> = letters
        .iter()
        .filter(|l| l["reason"] == "clock_skew")
        .collect();
    // Both workers write the one dead-letter topic: the default worker both ticks, the wide one
    // (126 years ahead allowed) none.
    assert_eq!(skewed.len(), 2, "{letters:#?}");
    assert!(
        skewed
            .iter()
            .all(|l| l["error"].as_str().unwrap().contains("ahead")),
        "{letters:#?}"
    );

    // `latest` is the last valid tick, not the bogus one.
    let api = Api::start(&setup.prefix, dir.path(), 0);
    let latest = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the api to answer latest",
        || tickctl_json(&api.url, &["latest", "BTC"]).ok(),
    );
    assert_eq!(latest["ticks"][0]["seq"], 1000, "{latest}");

    // The wide worker stored the far-future tick and the now+2d one too, and retention kept all 1000.
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the wide worker to store 1002 ticks",
        || (wide_worker.metric(STORED) == 1002.0).then_some(()),
    );
    let (_, summary) = verify(&report, &wide.redis_url, &wide.prefix);
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["unexpected"], 2, "seq 1001 and 1002: {summary}");
}

/// Issue 11, "what was seen" 7: a worker reported a clean drain when its final commit failed, and
/// then, with the broker gone, "drain timed out" (the synchronous commit waited past the bound). Now a
/// SIGTERMed worker whose final commit Kafka does not take (the broker is SIGKILLed) gives up on the
/// commit within its drain bound, exits 1 and logs "final commit failed".
/// (A commit Kafka answers with an error is `a_failed_final_commit_is_reported` in the worker.)
#[test]
fn a_failed_final_commit_exits_1_and_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    // A broker of this test's own, to stop.
    let kafka = Kafka::start(&[]);
    create_topic(&kafka.bootstrap, &[], "ticks", 2, None);
    create_topic(&kafka.bootstrap, &[], "ticks.dlq", 1, None);
    let mut setup = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis_url());
    // Nothing is committed before the drain, so the final commit has work to do; a short drain
    // bound, which the final commit must fit in.
    setup.args = [
        "--commit-interval-ms",
        "3600000",
        "--drain-timeout-secs",
        "6",
    ]
    .map(String::from)
    .to_vec();
    let mut worker = Worker::start(&setup, 0);
    let report = produce(
        &kafka.bootstrap,
        "ticks",
        dir.path(),
        &["--count", "500", "--assets", "4"],
    );
    wait_verified(
        &report,
        &setup.redis_url,
        &setup.prefix,
        Duration::from_secs(60),
    );
    // SIGKILL: the broker is gone at once (a graceful stop can outlast the test's patience).
    kafka.kill();
    signal(&worker.child, "TERM");
    let status = wait_exit(&mut worker.child, Duration::from_secs(60)).expect("worker exited");
    let log = worker.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    // Everything was stored: what failed is the commit, which librdkafka would wait for as long as
    // the broker is away; the worker gives up on it inside the drain bound and says so.
    assert!(log.contains("final commit failed"), "{log}");
    assert!(log.contains("outcome=CommitFailed"), "{log}");
    assert!(!log.contains("drain timed out"), "{log}");
}

/// Issue 11, "what was seen" 2: a dead letter larger than the producer's `message.max.bytes` was
/// retried for ever. Now it is sent cut to fit, with a header giving the original size, and the
/// partition goes on.
#[test]
fn a_dead_letter_too_large_for_the_producer_is_sent_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("too-large", 1);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = [
        "--format",
        "json",
        "--max-payload-bytes",
        "1000",
        "--kafka-option",
        "message.max.bytes=20000",
    ]
    .map(String::from)
    .to_vec();
    let worker = Worker::start(&setup, 0);
    let big = format!(
        r#"{{"symbol":"BTC","price":"1","timestamp":{},"source":"{}","seq":1}}"#,
        now_ms(),
        "x".repeat(70_000)
    );
    let size = big.len();
    send_messages(
        &bootstrap,
        &topic,
        &[(Some("BTC"), big.into_bytes()), btc(2, now_ms(), "2")],
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the oversized message dead-lettered and the next tick stored",
        || (worker.metric(DEAD) == 1.0 && worker.metric(STORED) == 1.0).then_some(()),
    );
    let letters = dead_letters(&bootstrap, &format!("{topic}.dlq"));
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["reason"], "oversized");
    assert_eq!(letters[0]["truncated_from"], size);
    let kept = letters[0]["bytes"].as_u64().unwrap();
    assert!((1000..20_000).contains(&kept), "{kept} bytes kept");
}

/// Issue 11, "what was seen" 2: a missing dead-letter topic was retried without end while `/readyz` said
/// ready. Now the partition stops at the message it cannot dead-letter (nothing after it is stored or
/// committed), `/readyz` says which partition and why, the failures are counted — and creating the
/// topic resumes it.
#[test]
fn an_unwritable_dead_letter_topic_stops_the_partition_and_readyz_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, topic) = shared_topic("dlq-missing", 1);
    let missing = format!("{topic}.missing-dlq");
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = [
        "--format",
        "json",
        "--dlq-topic",
        &missing,
        // the broker does not create topics: find out after 1 s instead of librdkafka's 30 s
        "--kafka-option",
        "topic.metadata.propagation.max.ms=1000",
    ]
    .map(String::from)
    .to_vec();
    let worker = Worker::start(&setup, 0);
    let mut messages = vec![(Some("BTC"), b"{not json".to_vec())];
    messages.extend((1..=5).map(|i| btc(i, now_ms(), "1")));
    send_messages(&bootstrap, &topic, &messages);

    let body = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "/readyz to name the stalled partition",
        || match http_status(&worker.admin, "/readyz") {
            Some((503, body)) if body.contains("stalled") => Some(body),
            _ => None,
        },
    );
    assert!(
        body.contains("partition 0 stalled at offset 0: dead-letter topic unwritable"),
        "{body}"
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "failed dead-letter sends counted",
        || (worker.metric("tickfleet_worker_dead_letter_failures_total") >= 2.0).then_some(()),
    );
    assert_eq!(worker.metric(STORED), 0.0, "nothing past the stuck message");
    assert_eq!(
        http_status(&worker.admin, "/readyz").map(|(code, _)| code),
        Some(503),
        "stays not ready: the store ping does not override it"
    );

    // The fix: the topic exists. The lane's next try succeeds and the partition goes on.
    create_topic(&bootstrap, &[], &missing, 1, None);
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the partition to resume",
        || (worker.metric(STORED) == 5.0 && worker.metric(DEAD) == 1.0).then_some(()),
    );
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "ready again",
        || matches!(http_status(&worker.admin, "/readyz"), Some((200, _))).then_some(()),
    );
    assert_eq!(dead_letters(&bootstrap, &missing).len(), 1);
}

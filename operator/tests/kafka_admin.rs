//! The operator's Kafka side against Apache Kafka (the test run's broker, `TICKFLEET_TEST_KAFKA`, which
//! `scripts/test.sh` starts): topic ensure — create with the declared partitions, grow, refuse to
//! shrink — and the dead-letter topic beside it, through the real admin API, and lag from offsets a
//! consumer group really committed.
//!
//! Each test uses topics and groups of its own, so tests sharing the broker never meet.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tickfleet_operator::kafka::{
    KafkaAdmin, KafkaConnection, LagReport, PartitionLag, RdKafkaAdmin, TopicOutcome,
    ensure_dead_letter_topic, ensure_topic,
};

fn kafka() -> String {
    std::env::var("TICKFLEET_TEST_KAFKA").expect(
        "TICKFLEET_TEST_KAFKA is not set: run scripts/test.sh (it starts Apache Kafka and sets it)",
    )
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Produces `counts[p]` messages to partition `p` of `topic`.
async fn produce(bootstrap: &str, topic: &str, counts: &[i32]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    for (p, n) in counts.iter().enumerate() {
        for i in 0..*n {
            let payload = format!("tick {i}");
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(i32::try_from(p).unwrap())
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .expect("delivered");
        }
    }
}

/// Commits `offsets` (partition, next offset to read) for `group`, as a worker would.
fn commit(bootstrap: &str, topic: &str, group: &str, offsets: &[(i32, i64)]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

/// Partitions of `topic` once the broker's metadata shows `want` of them (a created or grown topic
/// reaches metadata a moment after the admin call returns), or what it shows after 10 s.
async fn partitions_once(
    admin: &RdKafkaAdmin,
    conn: &KafkaConnection,
    topic: &str,
    want: i32,
) -> Option<i32> {
    let mut partitions = None;
    for _ in 0..100 {
        partitions = admin.topic_partitions(conn, topic).await.unwrap();
        if partitions == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    partitions
}

fn expected(rows: &[(i32, i64, Option<i64>, i64)]) -> LagReport {
    let partitions: Vec<PartitionLag> = rows
        .iter()
        .map(|&(partition, high, committed, lag)| PartitionLag {
            partition,
            low: 0,
            high,
            committed,
            lag,
        })
        .collect();
    LagReport {
        total: partitions.iter().map(|p| p.lag).sum(),
        partitions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topic_creates_grows_and_refuses_to_shrink_on_apache_kafka() {
    let admin = RdKafkaAdmin::default();
    let conn = KafkaConnection::plaintext(kafka());
    let topic = unique("ensure");

    assert_eq!(admin.topic_partitions(&conn, &topic).await.unwrap(), None);
    let out = ensure_topic(&admin, &conn, &topic, 3, None).await.unwrap();
    assert_eq!(out, TopicOutcome::Created { partitions: 3 });
    assert_eq!(
        partitions_once(&admin, &conn, &topic, 3).await,
        Some(3),
        "the broker has the topic with the declared partitions"
    );
    let out = ensure_topic(&admin, &conn, &topic, 3, None).await.unwrap();
    assert_eq!(out, TopicOutcome::Unchanged { partitions: 3 });

    let out = ensure_topic(&admin, &conn, &topic, 6, None).await.unwrap();
    assert_eq!(out, TopicOutcome::Grown { from: 3, to: 6 });
    assert_eq!(
        partitions_once(&admin, &conn, &topic, 6).await,
        Some(6),
        "grown on the broker"
    );

    let out = ensure_topic(&admin, &conn, &topic, 2, None).await.unwrap();
    assert_eq!(
        out,
        TopicOutcome::CannotShrink {
            actual: 6,
            declared: 2
        }
    );
    assert_eq!(
        admin.topic_partitions(&conn, &topic).await.unwrap(),
        Some(6),
        "a smaller declaration changes nothing on the broker"
    );

    // The broker's own refusals come back as errors: a replication factor it cannot meet (one broker).
    let err = admin
        .create_topic(&conn, &unique("rf3"), 1, Some(3))
        .await
        .expect_err("replication factor 3 on one broker");
    assert!(
        err.to_string().contains("create topic"),
        "the error names the operation: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_topic_is_created_beside_the_topic_once_on_apache_kafka() {
    let admin = RdKafkaAdmin::default();
    let conn = KafkaConnection::plaintext(kafka());
    let topic = unique("dlq");
    let dlq = format!("{topic}.dlq");
    ensure_topic(&admin, &conn, &topic, 3, None).await.unwrap();

    let made = ensure_dead_letter_topic(&admin, &conn, &topic, 3, Some(1))
        .await
        .unwrap();
    assert_eq!(made, Some(3));
    assert_eq!(
        partitions_once(&admin, &conn, &dlq, 3).await,
        Some(3),
        "the broker has {dlq} with the pipeline's partitions"
    );
    // there: nothing more to do
    let again = ensure_dead_letter_topic(&admin, &conn, &topic, 3, Some(1))
        .await
        .unwrap();
    assert_eq!(again, None);

    // a dead-letter topic made by hand with other partitions is kept as it is
    let other = unique("dlq-by-hand");
    admin
        .create_topic(&conn, &format!("{other}.dlq"), 1, None)
        .await
        .unwrap();
    assert_eq!(
        partitions_once(&admin, &conn, &format!("{other}.dlq"), 1).await,
        Some(1)
    );
    let kept = ensure_dead_letter_topic(&admin, &conn, &other, 6, None)
        .await
        .unwrap();
    assert_eq!(kept, None);
    assert_eq!(
        admin
            .topic_partitions(&conn, &format!("{other}.dlq"))
            .await
            .unwrap(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_high_watermark_minus_the_offsets_the_group_committed_on_apache_kafka() {
    let bootstrap = kafka();
    let admin = RdKafkaAdmin::default();
    let conn = KafkaConnection::plaintext(bootstrap.clone());
    let topic = unique("lag");
    let group = unique("workers");
    ensure_topic(&admin, &conn, &topic, 3, None).await.unwrap();
    produce(&bootstrap, &topic, &[10, 5, 0]).await;
    commit(&bootstrap, &topic, &group, &[(0, 4), (1, 5)]);

    let lag = admin
        .consumer_lag(&conn, &topic, &group)
        .await
        .expect("lag");
    assert_eq!(
        lag,
        expected(&[(0, 10, Some(4), 6), (1, 5, Some(5), 0), (2, 0, None, 0)])
    );
    assert_eq!(lag.total, 6);

    // a group that never committed has everything stored ahead of it
    let fresh = admin
        .consumer_lag(&conn, &topic, &unique("new-group"))
        .await
        .expect("lag");
    assert_eq!(
        fresh,
        expected(&[(0, 10, None, 10), (1, 5, None, 5), (2, 0, None, 0)])
    );

    // the workers catch up on partition 0 and more arrives on partition 2
    produce(&bootstrap, &topic, &[0, 0, 7]).await;
    commit(&bootstrap, &topic, &group, &[(0, 10)]);
    let later = admin
        .consumer_lag(&conn, &topic, &group)
        .await
        .expect("lag");
    assert_eq!(
        later,
        expected(&[(0, 10, Some(10), 0), (1, 5, Some(5), 0), (2, 7, None, 7)])
    );

    // a topic the broker does not have is an error, not zero lag
    assert!(
        admin
            .consumer_lag(&conn, &unique("absent"), &group)
            .await
            .is_err()
    );
}

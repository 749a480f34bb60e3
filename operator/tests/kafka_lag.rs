//! Lag measurement and topic description against librdkafka's in-process mock cluster (a real
//! Kafka wire protocol on loopback ports). Topic create/grow is not tested here: the mock cluster
//! has no CreateTopics admin API; `kafka::tests` covers it with a fake `KafkaAdmin`.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tickfleet_operator::kafka::{
    KafkaAdmin, KafkaConnection, LagReport, PartitionLag, RdKafkaAdmin,
};

const TOPIC: &str = "ticks";

/// Produces `counts[p]` messages to partition `p`.
async fn produce(bootstrap: &str, counts: &[i32]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer");
    for (p, n) in counts.iter().enumerate() {
        for i in 0..*n {
            let payload = format!("tick {i}");
            producer
                .send(
                    FutureRecord::<(), _>::to(TOPIC)
                        .partition(i32::try_from(p).unwrap())
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    }
}

/// Commits `offsets` (partition, next offset to read) for `group`, as a worker would.
fn commit(bootstrap: &str, group: &str, offsets: &[(i32, i64)]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(TOPIC, *p, Offset::Offset(*o))
            .unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
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
async fn lag_is_high_watermark_minus_committed_offset() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 3, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    produce(&bootstrap, &[10, 5, 0]).await;
    commit(&bootstrap, "workers", &[(0, 4), (1, 5)]);

    let admin = RdKafkaAdmin::default();
    let conn = KafkaConnection::plaintext(bootstrap.clone());

    let lag = admin
        .consumer_lag(&conn, TOPIC, "workers")
        .await
        .expect("lag");
    assert_eq!(
        lag,
        expected(&[(0, 10, Some(4), 6), (1, 5, Some(5), 0), (2, 0, None, 0)])
    );
    assert_eq!(lag.total, 6);

    // a group that never committed has everything stored ahead of it
    let fresh = admin
        .consumer_lag(&conn, TOPIC, "new-group")
        .await
        .expect("lag");
    assert_eq!(
        fresh,
        expected(&[(0, 10, None, 10), (1, 5, None, 5), (2, 0, None, 0)])
    );

    // the workers catch up on partition 0 and more arrives on partition 2
    produce(&bootstrap, &[0, 0, 7]).await;
    commit(&bootstrap, "workers", &[(0, 10)]);
    let later = admin
        .consumer_lag(&conn, TOPIC, "workers")
        .await
        .expect("lag");
    assert_eq!(
        later,
        expected(&[(0, 10, Some(10), 0), (1, 5, Some(5), 0), (2, 7, None, 7)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describes_topic_partitions_without_creating_topics() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 5, 1).expect("topic");
    let admin = RdKafkaAdmin::default();
    let conn = KafkaConnection::plaintext(cluster.bootstrap_servers());
    assert_eq!(
        admin
            .topic_partitions(&conn, TOPIC)
            .await
            .expect("describe"),
        Some(5)
    );
    assert_eq!(
        admin
            .topic_partitions(&conn, "absent")
            .await
            .expect("describe"),
        None
    );
    // asking did not create it
    assert_eq!(
        admin
            .topic_partitions(&conn, "absent")
            .await
            .expect("describe"),
        None
    );
}

//! Describing a topic never creates it, against librdkafka's in-process mock cluster: the mock
//! auto-creates any topic a client asks for, so this check can fail here (the test Apache Kafka has
//! auto-creation off). Topic create/grow/shrink and lag run against Apache Kafka in `kafka_admin.rs`.

use rdkafka::mocking::MockCluster;
use tickfleet_operator::kafka::{KafkaAdmin, KafkaConnection, RdKafkaAdmin};

const TOPIC: &str = "ticks";

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

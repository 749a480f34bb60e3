//! Apache Kafka in the end-to-end tests: the run's shared broker, dedicated brokers of a test's own, and
//! topics made on purpose through the admin API.
//!
//! Every broker is started by `tests/kafka/kafka.sh` (KRaft combined mode, the release pinned in
//! `tests/kafka/pom.xml`). `scripts/test.sh` starts one per run and exports its bootstrap servers as
//! `TICKFLEET_TEST_KAFKA`; set that variable yourself to point the suite at any Kafka. Tests that stop,
//! kill or restart a broker, or need SASL_SSL or three nodes, start a [`Kafka`] of their own through the
//! same script.
//!
//! The test brokers never auto-create topics: a test creates what it uses with [`create_topic`] (or has
//! the operator do it), each under a name of its own, so tests sharing the broker never meet.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::{unique, wait_for};

/// `tests/kafka/kafka.sh`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kafka/kafka.sh")
}

/// Bootstrap servers of the run's shared Kafka (`TICKFLEET_TEST_KAFKA`).
pub fn shared_kafka() -> String {
    std::env::var("TICKFLEET_TEST_KAFKA").expect(
        "TICKFLEET_TEST_KAFKA is not set: run scripts/test.sh (it starts Apache Kafka and sets it), or \
         `bash tests/kafka/kafka.sh start DIR` and export TICKFLEET_TEST_KAFKA=<what it prints>",
    )
}

/// A topic of the test's own on the shared Kafka, `NAME-<unique>` with `partitions` partitions, and its
/// dead-letter topic `<topic>.dlq` (2 partitions), as the worker's default expects. Returns
/// (bootstrap servers, topic).
pub fn shared_topic(name: &str, partitions: i32) -> (String, String) {
    let bootstrap = shared_kafka();
    let topic = unique(name);
    create_topic(&bootstrap, &[], &topic, partitions, None);
    create_topic(&bootstrap, &[], &format!("{topic}.dlq"), 2, None);
    (bootstrap, topic)
}

fn client_config(bootstrap: &str, security: &[(&str, &str)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap);
    for (k, v) in security {
        cfg.set(*k, *v);
    }
    cfg
}

/// Creates `topic` with the admin API (`replication` `None`: the broker's default) and waits until every
/// partition has a leader. `security` is extra client configuration (e.g. SASL_SSL settings).
pub fn create_topic(
    bootstrap: &str,
    security: &[(&str, &str)],
    topic: &str,
    partitions: i32,
    replication: Option<i32>,
) {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap, security)
        .create()
        .expect("admin client");
    let new = NewTopic::new(
        topic,
        partitions,
        replication.map_or(TopicReplication::Fixed(-1), TopicReplication::Fixed),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics([&new], &opts))
        .unwrap_or_else(|e| panic!("create topic {topic} on {bootstrap}: {e}"));
    for r in results {
        if let Err((name, code)) = r {
            assert!(
                code == RDKafkaErrorCode::TopicAlreadyExists,
                "create topic {name} on {bootstrap}: {code}"
            );
        }
    }
    let consumer: BaseConsumer = client_config(bootstrap, security)
        .create()
        .expect("metadata client");
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        &format!("every partition of {topic} to have a leader"),
        || {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()?;
            let t = md.topics().iter().find(|t| t.name() == topic)?;
            (t.error().is_none()
                && t.partitions().len() == partitions as usize
                && t.partitions()
                    .iter()
                    .all(|p| p.leader() >= 0 && p.error().is_none()))
            .then_some(())
        },
    );
}

/// Partitions of `topic`, `None` when the broker does not know it.
pub fn topic_partitions(bootstrap: &str, security: &[(&str, &str)], topic: &str) -> Option<usize> {
    let consumer: BaseConsumer = client_config(bootstrap, security)
        .create()
        .expect("metadata client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("fetch metadata");
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    t.error().is_none().then(|| t.partitions().len())
}

/// Leader broker id of each partition of `topic` (index = partition).
pub fn partition_leaders(bootstrap: &str, security: &[(&str, &str)], topic: &str) -> Vec<i32> {
    let consumer: BaseConsumer = client_config(bootstrap, security)
        .create()
        .expect("metadata client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("fetch metadata");
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("topic in metadata");
    let mut leaders: Vec<(i32, i32)> = t
        .partitions()
        .iter()
        .map(|p| (p.id(), p.leader()))
        .collect();
    leaders.sort();
    leaders.into_iter().map(|(_, l)| l).collect()
}

/// A Kafka of a test's own (one node, or a cluster with `--nodes N`), started by `tests/kafka/kafka.sh`
/// in a temp dir. Its JVMs never outlive the test: they are SIGKILLed when it is dropped (also while a
/// panicking test unwinds, and when its start fails half-way), and `kafka.sh --owner` SIGKILLs them once
/// the test process is gone without dropping it (abort, SIGKILL, nextest's timeout killing the test's
/// process group).
pub struct Kafka {
    dir: tempfile::TempDir,
    /// Its bootstrap servers (every node).
    pub bootstrap: String,
}

impl Kafka {
    /// Starts one with `kafka.sh start DIR ARGS…` (e.g. `["--nodes", "3"]`) and waits until it serves.
    pub fn start(args: &[&str]) -> Self {
        // Owned before it starts: a start that panics half-way still kills what it launched.
        let mut kafka = Kafka {
            dir: tempfile::tempdir().expect("kafka dir"),
            bootstrap: String::new(),
        };
        let state = kafka.dir();
        let owner = std::process::id().to_string();
        let mut full = vec![
            "start",
            state.to_str().expect("utf-8 path"),
            "--owner",
            &owner,
        ];
        full.extend_from_slice(args);
        kafka.bootstrap = run(&full);
        kafka
    }

    /// The cluster directory (the node directory when it has one node).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("kafka")
    }

    /// Directory of node `n` (1-based) of a `--nodes N` cluster.
    pub fn node(&self, n: usize) -> PathBuf {
        self.dir().join(format!("node-{n}"))
    }

    /// Graceful stop of every node (SIGTERM, controlled shutdown), waiting for the exit.
    pub fn stop(&self) {
        run(&["stop", self.dir().to_str().expect("utf-8 path")]);
    }

    /// SIGKILL of every node, waiting for the exit: nothing is flushed or shut down.
    pub fn kill(&self) {
        run(&["kill", self.dir().to_str().expect("utf-8 path")]);
    }

    /// Starts every node again on the same ports, config and log dirs, and waits until they serve.
    pub fn restart(&self) {
        run(&["restart", self.dir().to_str().expect("utf-8 path")]);
    }

    /// SIGKILL of node `n` of a cluster.
    pub fn kill_node(&self, n: usize) {
        run(&["kill", self.node(n).to_str().expect("utf-8 path")]);
    }

    /// Starts node `n` of a cluster again on its own log dirs.
    pub fn restart_node(&self, n: usize) {
        run(&["restart", self.node(n).to_str().expect("utf-8 path")]);
    }

    /// The broker's log of node `n` (or of the only node), for failure messages.
    pub fn log(&self, n: Option<usize>) -> String {
        let dir = n.map_or_else(|| self.dir(), |n| self.node(n));
        std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if !self.dir().exists() {
            return;
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("kill")
            .arg(self.dir())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs `kafka.sh ARGS…`, panics on failure, returns what it printed (trimmed).
fn run(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run tests/kafka/kafka.sh");
    assert!(
        out.status.success(),
        "kafka.sh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;

    use super::*;

    /// The broker pids `kafka.sh pid DIR` finds (only processes whose command line names DIR's config).
    fn pids(dir: &Path) -> String {
        let out = Command::new("bash")
            .arg(script())
            .arg("pid")
            .arg(dir)
            .stderr(Stdio::null())
            .output()
            .expect("kafka.sh pid");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// What nextest does to a test that runs past its timeout: SIGKILL of the test's whole process
    /// group. The broker that test started with `--owner` (its own pid) must go with it, although its
    /// owner watch was started from inside that group.
    #[test]
    fn a_broker_dies_with_its_owner_when_the_owners_process_group_is_killed() {
        // Dropped at the end whatever happens: this test's own JVM does not outlive it either.
        let guard = Kafka {
            dir: tempfile::tempdir().expect("dir"),
            bootstrap: String::new(),
        };
        let state = guard.dir();
        // The owner: a process leading a group of its own, standing in for the test process.
        let mut owner = Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let group = owner.id() as i32;
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&state)
            .arg("--owner")
            .arg(owner.id().to_string())
            .process_group(group)
            .output()
            .expect("kafka.sh start");
        assert!(
            out.status.success(),
            "kafka.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = pids(&state);
        assert!(!pid.is_empty(), "the broker runs after a successful start");

        let killed = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status()
            .expect("kill");
        assert!(killed.success());
        owner.wait().expect("reap the owner");
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            &format!("broker pid {pid} to exit after its owner's process group was SIGKILLed"),
            || pids(&state).is_empty().then_some(()),
        );
        drop(guard);
    }

    /// A start that fails after launching the JVM (here: a start timeout of 0 s) SIGKILLs it.
    #[test]
    fn a_broker_that_fails_to_start_is_not_left_running() {
        let guard = Kafka {
            dir: tempfile::tempdir().expect("dir"),
            bootstrap: String::new(),
        };
        let state = guard.dir();
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&state)
            .env("TICKFLEET_KAFKA_START_TIMEOUT", "0")
            .output()
            .expect("kafka.sh start");
        assert!(!out.status.success(), "a start timeout of 0 s fails");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("did not start within 0s"), "{stderr}");
        let launched: u32 = std::fs::read_to_string(state.join("pid"))
            .expect("the JVM was launched (its pid file)")
            .trim()
            .parse()
            .expect("pid");
        assert!(pids(&state).is_empty(), "pid {launched} still runs");
        drop(guard);
    }
}

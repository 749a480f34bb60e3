//! Redis Clusters for the tests: the shared one `scripts/test.sh` starts (its seed URLs in
//! `TICKFLEET_TEST_REDIS_CLUSTER_URLS`), and clusters of a test's own ([`RedisCluster`]) for the tests
//! that move slots or kill nodes, started with the same script (`scripts/redis-cluster.sh`: 3 primaries,
//! 3 replicas, `cluster-node-timeout` 15 s unless a test asks for less: see
//! [`RedisCluster::start_failing_over_fast`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::wait_for;

/// The shared test cluster's seed URLs, comma-separated.
pub fn redis_cluster_urls() -> String {
    std::env::var("TICKFLEET_TEST_REDIS_CLUSTER_URLS").expect(
        "TICKFLEET_TEST_REDIS_CLUSTER_URLS is not set: run scripts/test.sh, which starts a Redis Cluster \
         (scripts/redis-cluster.sh start DIR prints the URLs to export)",
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster.sh")
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag — the part between the first
/// `{` and the next `}`, when that is not empty — or else of the whole key, mod 16384.
pub fn key_slot(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(bytes) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    u32::from(crc) % 16384
}

/// One node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Whether it is a primary (else a replica).
    pub primary: bool,
    /// Whether the cluster sees it as failed.
    pub failed: bool,
    /// How many slots it serves (primaries).
    pub slots: u32,
    /// The slot ranges it serves (inclusive).
    pub ranges: Vec<(u32, u32)>,
    /// The id of its primary (replicas).
    pub primary_id: Option<String>,
}

impl Node {
    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u32) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// A Redis Cluster of a test's own, stopped (by pid) when dropped.
pub struct RedisCluster {
    dir: PathBuf,
    /// Its seed URLs, comma-separated (every node).
    pub urls: String,
    ports: Vec<u16>,
    /// Its `cluster-node-timeout` in ms (for nodes restarted by [`RedisCluster::restart`]).
    node_timeout_ms: u64,
    restarted: Mutex<Vec<Child>>,
}

/// `cluster-node-timeout` of a test's cluster unless it asks for a fast failover: Redis's default, so a
/// node stalled for a second by a loaded machine is not failed over behind a test that moves slots.
const NODE_TIMEOUT_MS: u64 = 15_000;

/// `cluster-node-timeout` of the failover tests' clusters: a dead primary's replica is promoted within
/// a few seconds.
const FAST_FAILOVER_NODE_TIMEOUT_MS: u64 = 1000;

impl RedisCluster {
    /// Starts one in `dir` (which it removes when stopped) and waits until it is healthy.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None, NODE_TIMEOUT_MS)
    }

    /// [`start`](Self::start) with a `cluster-node-timeout` of 1 s, for the tests that kill a primary:
    /// its replica is promoted within a few seconds. (A loaded machine may also fail over a live
    /// primary that stalled for a second, which only these tests tolerate.)
    pub fn start_failing_over_fast(dir: &Path) -> Self {
        Self::start_with(dir, None, FAST_FAILOVER_NODE_TIMEOUT_MS)
    }

    /// [`start`](Self::start) with TLS only: `tls` holds `ca.pem`, `server.pem` and `server.key`
    /// (every node requires a client certificate of that CA; its URLs are `rediss://`). The
    /// slot-moving and node-killing helpers below speak plain TCP, so they do not work on it.
    pub fn start_tls(dir: &Path, tls: &Path) -> Self {
        Self::start_with(dir, Some(tls), NODE_TIMEOUT_MS)
    }

    fn start_with(dir: &Path, tls: Option<&Path>, node_timeout_ms: u64) -> Self {
        let mut cmd = Command::new("bash");
        cmd.env("REDIS_CLUSTER_NODE_TIMEOUT", node_timeout_ms.to_string());
        if let Some(tls) = tls {
            cmd.env("REDIS_CLUSTER_TLS", tls);
        }
        let out = cmd
            .arg(script())
            .arg("start")
            .arg(dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/redis-cluster.sh");
        assert!(out.status.success(), "redis-cluster.sh start failed");
        let urls = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let ports = std::fs::read_to_string(dir.join("ports"))
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        RedisCluster {
            dir: dir.to_path_buf(),
            urls,
            ports,
            node_timeout_ms,
            restarted: Mutex::default(),
        }
    }

    /// `redis-cli -p PORT ARGS…`: its stdout, or panics when it fails.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A node that is up, to ask about the cluster.
    fn any_live_port(&self) -> u16 {
        *self
            .ports
            .iter()
            .find(|p| {
                Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "ping"])
                    .output()
                    .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"PONG"))
            })
            .expect("a live node")
    }

    /// The nodes as the cluster sees them now.
    pub fn nodes(&self) -> Vec<Node> {
        Self::cli(self.any_live_port(), &["cluster", "nodes"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                let ranges: Vec<(u32, u32)> = f[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .map(|r| match r.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                        None => (r.parse().unwrap(), r.parse().unwrap()),
                    })
                    .collect();
                let slots = ranges.iter().map(|(a, b)| b - a + 1).sum();
                Node {
                    id: f[0].to_owned(),
                    port,
                    primary: f[2].contains("master"),
                    failed: f[2].contains("fail"),
                    slots,
                    ranges,
                    primary_id: (f[3] != "-").then(|| f[3].to_owned()),
                }
            })
            .collect()
    }

    /// The hash slot of `key`, as `CLUSTER KEYSLOT` answers it ([`key_slot`]; computed here, not
    /// asked: the reshard test looks up 200 keys between counting the ticks stored and starting the
    /// move, and 200 `redis-cli` runs took ~90 s on the loaded 2-core machine, so the "mid-stream"
    /// reshard started when the stream was over).
    pub fn slot_of(&self, key: &str) -> u32 {
        key_slot(key)
    }

    /// The primaries that serve slots and are not failed.
    pub fn primaries(&self) -> Vec<Node> {
        self.nodes()
            .into_iter()
            .filter(|n| n.primary && !n.failed && n.slots > 0)
            .collect()
    }

    /// Moves `slots` slots from primary `from` to primary `to` with `redis-cli --cluster reshard`
    /// (keys are migrated one `MIGRATE` batch at a time while clients keep writing). Blocks until done.
    pub fn reshard(&self, from: &Node, to: &Node, slots: u32) {
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", to.port)])
            .args(["--cluster-from", &from.id, "--cluster-to", &to.id])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .args(["--cluster-pipeline", "100"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The replica of primary `id`.
    pub fn replica_of(&self, id: &str) -> Node {
        self.nodes()
            .into_iter()
            .find(|n| n.primary_id.as_deref() == Some(id))
            .expect("the primary has a replica")
    }

    /// Sends the node on `port` a signal (`KILL`, `STOP`, `CONT`).
    pub fn signal(&self, port: u16, sig: &str) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("pid")).unwrap();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), pid.trim()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// SIGKILLs the node on `port` and waits until it is gone.
    pub fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("pid")).unwrap();
        self.signal(port, "KILL");
        wait_for(
            Duration::from_secs(10),
            Duration::from_millis(50),
            "the killed node to exit",
            || {
                (!Command::new("kill")
                    .args(["-0", pid.trim()])
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success())
                .then_some(())
            },
        );
    }

    /// Starts the node on `port` again with its cluster config and waits until it is a replica in
    /// sync with its primary (it rejoins as the replica of the one promoted in its place).
    pub fn restart(&self, port: u16) {
        let dir = self.dir.join(port.to_string());
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout"])
            .arg(self.node_timeout_ms.to_string())
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(dir.join("log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        // The script stops nodes by the pids in their directories.
        std::fs::write(dir.join("pid"), child.id().to_string()).unwrap();
        self.restarted.lock().unwrap().push(child);
        wait_for(
            Duration::from_secs(60),
            Duration::from_millis(100),
            "the restarted node to be a replica in sync",
            || {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "info", "replication"])
                    .output()
                    .ok()?;
                let info = String::from_utf8_lossy(&out.stdout);
                (info.contains("role:slave") && info.contains("master_link_status:up"))
                    .then_some(())
            },
        );
    }

    /// Waits until every slot is served (`cluster_state:ok` on every live node).
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_for(
            timeout,
            Duration::from_millis(100),
            "cluster_state:ok",
            || {
                let port = self.any_live_port();
                Self::cli(port, &["cluster", "info"])
                    .contains("cluster_state:ok")
                    .then_some(())
            },
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Stopping removes the directory: when the test failed (or the directories are kept), its
        // nodes' logs and last view of the cluster are copied beside it first (into `DIR-logs`, kept
        // with a [`crate::TestDir`]).
        if std::thread::panicking() || crate::keep_dirs() {
            let keep = self.dir.with_file_name(format!(
                "{}-logs",
                self.dir.file_name().unwrap_or_default().to_string_lossy()
            ));
            let _ = std::fs::create_dir_all(&keep);
            for port in &self.ports {
                let _ = std::fs::copy(
                    self.dir.join(port.to_string()).join("log"),
                    keep.join(format!("{port}.log")),
                );
                if let Ok(out) = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "nodes"])
                    .output()
                {
                    let _ = std::fs::write(keep.join(format!("{port}.nodes")), out.stdout);
                }
            }
        }
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
        for mut child in self.restarted.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn key_slots_are_the_servers() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot("123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("{user1000}.following"), 3443);
        assert_eq!(
            key_slot("foo{}{bar}"),
            8363,
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot("foo{{bar}}zap"), 4015);
        assert_eq!(key_slot("{bar"), 4015);
        assert_eq!(key_slot("e2e-1-2:{A0001}:ticks"), 12690);
    }
}

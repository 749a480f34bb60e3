//! Harness for tickfleet's end-to-end tests: starts the real binaries (`tickfleet-worker`,
//! `tickctl produce`/`verify`, `tickctl dev-broker`) as processes on loopback, against the redis-server
//! named by `TICKFLEET_TEST_REDIS_URL` and the Apache Kafka named by `TICKFLEET_TEST_KAFKA`
//! (`scripts/test.sh` starts both and sets them; [`kafka`] has the brokers and topics).
//!
//! [`kube::FakeKube`] stands in for a Kubernetes API server so the real `tickfleet-operator` can run, and
//! [`prometheus::Prometheus`] is a real Prometheus of a test's own.
//!
//! Binaries are taken from `TICKFLEET_BIN_DIR`, or else from the target directory this test was built
//! into (`cargo build --bins` first; `scripts/test.sh` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod http;
pub mod kafka;
pub mod kube;
pub mod postgres;
pub mod prometheus;
pub mod redis_cluster;

pub use kafka::{
    Kafka, create_topic, partition_leaders, shared_kafka, shared_topic, topic_partitions,
};
pub use redis_cluster::{RedisCluster, redis_cluster_urls};

/// Path of one of the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TICKFLEET_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test-binary> → target/<profile>
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins) or set TICKFLEET_BIN_DIR",
        path.display()
    );
    path
}

/// The test Redis URL.
pub fn redis_url() -> String {
    std::env::var("TICKFLEET_TEST_REDIS_URL").expect(
        "TICKFLEET_TEST_REDIS_URL is not set: run scripts/test.sh, which starts redis-server and sets it",
    )
}

/// A name no other test run uses: for key prefixes, groups and temp files.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A free loopback port (bound and released; the window for a clash is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A test's temporary directory (worker and api logs, reports, servers' files): removed when the test
/// passes, kept when it fails (panics), with its path printed, so the logs of a failure can be read.
/// `TICKFLEET_TEST_KEEP_DIRS=1` keeps it when the test passes too (to compare with a failure).
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A fresh one under the system's temp directory.
    pub fn new() -> Self {
        TestDir(Some(tempfile::tempdir().expect("temp dir")))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .expect("the directory lives until drop")
            .path()
    }
}

/// Whether `TICKFLEET_TEST_KEEP_DIRS=1` asks to keep the directories of passing tests.
pub(crate) fn keep_dirs() -> bool {
    std::env::var_os("TICKFLEET_TEST_KEEP_DIRS").is_some_and(|v| v == "1")
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        if std::thread::panicking() {
            eprintln!(
                "the test failed: its logs are kept in {}",
                dir.keep().display()
            );
        } else if keep_dirs() {
            eprintln!("its logs are kept in {}", dir.keep().display());
        }
    }
}

/// Polls `check` every `every` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// Sends a signal by name (TERM, INT, KILL) with the system's `kill`.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {} failed", child.id());
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `tickctl dev-broker` process.
pub struct DevBroker {
    child: Child,
    /// Its bootstrap servers.
    pub bootstrap: String,
}

impl DevBroker {
    /// Sends `sig` (`STOP`, `CONT`, …) to the broker's process: a stopped broker keeps its
    /// connections open and answers nothing, as a broker that hangs does.
    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// Starts a broker with `topics` (`NAME:PARTITIONS`) and waits for its bootstrap list.
    pub fn start(topics: &[&str]) -> Self {
        let mut cmd = Command::new(bin("tickctl"));
        cmd.arg("dev-broker");
        for t in topics {
            cmd.arg("--topic").arg(t);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tickctl dev-broker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read bootstrap servers");
        let bootstrap = line.trim().to_owned();
        assert!(
            !bootstrap.is_empty(),
            "dev-broker printed no bootstrap servers"
        );
        DevBroker { child, bootstrap }
    }
}

impl DevBroker {
    /// Takes every broker down (connections closed and refused) — `kill -USR1`.
    pub fn down(&self) {
        signal(&self.child, "USR1");
    }

    /// Brings the brokers back — `kill -USR2`.
    pub fn up(&self) {
        signal(&self.child, "USR2");
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tickfleet-worker` process whose stderr goes to a log file.
pub struct Worker {
    /// The process.
    pub child: Child,
    /// Its admin endpoint, `127.0.0.1:PORT`.
    pub admin: String,
    /// Its log file.
    pub log: PathBuf,
}

/// What every worker of a test shares.
#[derive(Clone, Debug)]
pub struct WorkerSetup {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Topic.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Redis URL.
    pub redis_url: String,
    /// Redis key prefix.
    pub prefix: String,
    /// Directory for logs.
    pub dir: PathBuf,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Extra environment variables (e.g. `TICKFLEET_KAFKA_SASL_PASSWORD`, kept off the command line).
    pub env: Vec<(String, String)>,
}

impl WorkerSetup {
    /// Workers on `broker`'s topic `ticks`, a fresh group and key prefix, logs in `dir`.
    pub fn new(broker: &DevBroker, dir: &Path, redis_url: &str) -> Self {
        Self::on(&broker.bootstrap, "ticks", dir, redis_url)
    }

    /// Workers on `topic` at `bootstrap`, a fresh group and key prefix, logs in `dir`.
    pub fn on(bootstrap: &str, topic: &str, dir: &Path, redis_url: &str) -> Self {
        WorkerSetup {
            bootstrap: bootstrap.to_owned(),
            topic: topic.to_owned(),
            group: unique("group"),
            redis_url: redis_url.to_owned(),
            prefix: unique("e2e"),
            dir: dir.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Worker {
    /// Starts worker number `n` of `setup`.
    pub fn start(setup: &WorkerSetup, n: usize) -> Self {
        let log = setup.dir.join(format!("worker-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin("tickfleet-worker"))
            .args([
                "--brokers",
                &setup.bootstrap,
                "--topic",
                &setup.topic,
                "--group",
                &setup.group,
            ])
            .args([
                "--redis-url",
                &setup.redis_url,
                "--redis-prefix",
                &setup.prefix,
            ])
            // Port 0: the worker binds a free port itself and logs it, so concurrent tests never
            // race for a port.
            .args(["--admin-addr", "127.0.0.1:0", "--drain-timeout-secs", "20"])
            // Dead members noticed in 6 s; under KIP-848 the broker's setting (kafka.sh: 6 s) rules.
            .args(if setup.args.iter().any(|a| a == "--group-protocol") {
                vec![]
            } else {
                vec!["--kafka-option", "session.timeout.ms=6000"]
            })
            .args(&setup.args)
            .env(
                "RUST_LOG",
                std::env::var("TICKFLEET_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(setup.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start tickfleet-worker");
        let admin = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "the worker's admin address in its log",
            || logged_admin_addr(&std::fs::read_to_string(&log).unwrap_or_default()),
        );
        Worker { child, admin, log }
    }

    /// The worker's `/metrics` text, or `None` if it does not answer.
    pub fn metrics(&self) -> Option<String> {
        http_get(&self.admin, "/metrics")
    }

    /// Sum of one metric's samples (all label sets), 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().map(|m| metric_sum(&m, name)).unwrap_or(0.0)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The address in the `admin endpoint listening … addr=HOST:PORT` log line.
fn logged_admin_addr(log: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("admin endpoint listening"))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    Some(addr.trim_matches('"').to_owned())
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of a metric over several workers (those that answer).
pub fn total(workers: &[Worker], metric: &str) -> f64 {
    workers.iter().map(|w| w.metric(metric)).sum()
}

/// Every worker's log, for failure messages.
pub fn dump_logs(workers: &[Worker]) -> String {
    workers
        .iter()
        .map(|w| format!("--- {}\n{}", w.log.display(), w.log_text()))
        .collect()
}

/// Sum of the samples of metric `name` in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET on loopback; the body on 200.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// `GET path` on `addr`: (status code, body), whatever the status; `None` when nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Sends hand-made messages (key, payload) to `topic`, in order, with the murmur2 partitioner the
/// project's producers use, and waits until the broker has acknowledged every one.
pub fn send_messages(bootstrap: &str, topic: &str, messages: &[(Option<&str>, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "10000000")
        .create()
        .expect("create a producer");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (key, payload) in messages {
            let mut record = FutureRecord::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(*k);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .expect("message acknowledged");
        }
    });
}

/// `tickctl dlq list --json` of `topic` on `bootstrap`: every dead letter.
pub fn dead_letters(bootstrap: &str, topic: &str) -> Vec<serde_json::Value> {
    let (ok, out) = tickctl(&[
        "dlq",
        "list",
        "--json",
        "--brokers",
        bootstrap,
        "--topic",
        topic,
    ]);
    assert!(ok, "tickctl dlq list failed: {out}");
    serde_json::from_str(&out).expect("dlq list JSON")
}

/// Runs `tickctl produce` (blocking) and returns its report file.
pub fn produce(bootstrap: &str, topic: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let report = dir.join("report.json");
    let out = Command::new(bin("tickctl"))
        .args([
            "produce",
            "--brokers",
            bootstrap,
            "--topic",
            topic,
            "--report",
        ])
        .arg(&report)
        .args(extra)
        .output()
        .expect("run tickctl produce");
    assert!(
        out.status.success(),
        "tickctl produce failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// Runs `tickctl produce` on a thread of its own (`--topic ticks` plus `args`); join it for the report.
pub fn produce_in_background(
    bootstrap: &str,
    dir: &Path,
    args: &[&str],
) -> std::thread::JoinHandle<PathBuf> {
    produce_to_in_background(bootstrap, "ticks", dir, args)
}

/// Runs `tickctl produce --topic topic` plus `args` on a thread of its own; join it for the report.
pub fn produce_to_in_background(
    bootstrap: &str,
    topic: &str,
    dir: &Path,
    args: &[&str],
) -> std::thread::JoinHandle<PathBuf> {
    let (bootstrap, topic, dir) = (bootstrap.to_owned(), topic.to_owned(), dir.to_path_buf());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        produce(&bootstrap, &topic, &dir, &args)
    })
}

/// A `tickctl produce` process for load that runs until the test is done with it: killed when dropped.
pub struct Producer(Child);

impl Producer {
    /// Starts `tickctl produce --brokers bootstrap --topic topic` plus `args`.
    pub fn start(bootstrap: &str, topic: &str, args: &[&str]) -> Self {
        let child = Command::new(bin("tickctl"))
            .args(["produce", "--brokers", bootstrap, "--topic", topic])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tickctl produce");
        Producer(child)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asserts a `tickctl verify --json` summary shows exactly `ticks` ticks of `assets` assets, each once.
pub fn assert_exact(summary: &serde_json::Value, assets: u64, ticks: u64) {
    assert_eq!(summary["assets"], assets, "{summary}");
    assert_eq!(summary["expected"], ticks, "{summary}");
    assert_eq!(summary["stored"], ticks, "{summary}");
    for field in ["lost", "duplicated", "out_of_order", "unexpected"] {
        assert_eq!(summary[field], 0, "{field}: {summary}");
    }
}

/// Runs `tickctl verify` every second until the store holds exactly what `report` says (nothing lost, nothing
/// doubled, order kept), or panics after `timeout`; returns the last summary.
pub fn wait_verified(
    report: &Path,
    redis_url: &str,
    prefix: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_verified_on(report, redis_url, prefix, &[], timeout)
}

/// [`wait_verified`] with extra `tickctl verify` arguments (e.g. `--store postgres ...`).
pub fn wait_verified_on(
    report: &Path,
    redis_url: &str,
    prefix: &str,
    extra: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    wait_for(
        timeout,
        Duration::from_secs(1),
        "tickctl verify to find every tick stored once",
        || {
            let (clean, summary) = verify_on(report, redis_url, prefix, extra);
            clean.then_some(summary)
        },
    )
}

/// `tickctl verify --json` of `report` against `redis_url` under `prefix`: (clean?, summary).
pub fn verify(report: &Path, redis_url: &str, prefix: &str) -> (bool, serde_json::Value) {
    verify_on(report, redis_url, prefix, &[])
}

/// [`verify`] with extra `tickctl verify` arguments (e.g. `--redis-mode cluster`).
pub fn verify_on(
    report: &Path,
    redis_url: &str,
    prefix: &str,
    extra: &[&str],
) -> (bool, serde_json::Value) {
    let out = Command::new(bin("tickctl"))
        .args([
            "verify",
            "--json",
            "--redis-url",
            redis_url,
            "--redis-prefix",
            prefix,
        ])
        .args(extra)
        .arg("--report")
        .arg(report)
        .output()
        .expect("run tickctl verify");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tickctl verify printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), summary)
}

/// A `tickfleet-api` process over the test Redis, its stderr in a log file.
pub struct Api {
    /// The process.
    pub child: Child,
    /// Its gRPC address as a URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its admin endpoint, `127.0.0.1:PORT`.
    pub admin: String,
    /// Its REST api, `127.0.0.1:PORT`.
    pub http: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Api {
    /// Starts an api over the keys under `prefix` and waits until it is ready (`/readyz`).
    pub fn start(prefix: &str, dir: &Path, n: usize) -> Self {
        Self::start_with(prefix, dir, n, &[])
    }

    /// [`Api::start`] with extra arguments (e.g. `--stream-buffer 16`).
    pub fn start_with(prefix: &str, dir: &Path, n: usize, extra: &[&str]) -> Self {
        Self::start_on(&redis_url(), prefix, dir, n, extra)
    }

    /// [`Api::start_with`] over the Redis at `redis_url` (say, a cluster's seeds with
    /// `--redis-mode cluster` in `extra`).
    pub fn start_on(redis_url: &str, prefix: &str, dir: &Path, n: usize, extra: &[&str]) -> Self {
        let grpc = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("api-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin("tickfleet-api"))
            .args([
                "--grpc-addr",
                &grpc,
                "--admin-addr",
                &admin,
                "--http-addr",
                &http,
            ])
            .args(["--redis-url", redis_url, "--redis-prefix", prefix])
            .args(extra)
            // Variables meant for the worker must not bother the api.
            .env("TICKFLEET_BROKERS", "127.0.0.1:1")
            .env("TICKFLEET_TOPIC", "ticks")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start tickfleet-api");
        let api = Api {
            child,
            url: format!("http://{grpc}"),
            admin,
            http,
            log,
        };
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "tickfleet-api to be ready",
            || http_get(&api.admin, "/readyz"),
        );
        api
    }

    /// Sum of one metric's samples whose line contains `filter` (e.g. `method="StreamTicks"`).
    pub fn metric(&self, name: &str, filter: &str) -> f64 {
        let text = http_get(&self.admin, "/metrics").unwrap_or_default();
        let lines: String = text
            .lines()
            .filter(|l| l.contains(filter))
            .flat_map(|l| [l, "\n"])
            .collect();
        metric_sum(&lines, name)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a `tickctl` query command with `--api URL --json` and parses what it prints.
pub fn tickctl_json(api: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(bin("tickctl"))
        .args(args)
        .args(["--api", api, "--json"])
        .output()
        .expect("run tickctl");
    if !out.status.success() {
        return Err(format!(
            "tickctl {args:?} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "tickctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A `tickctl watch --json` process: one JSON object per line on its stdout, collected in a file.
pub struct Watch {
    /// The process.
    pub child: Child,
    /// Where its stdout goes.
    pub out: PathBuf,
}

impl Watch {
    /// Starts `tickctl watch --json --api URL ARGS…`.
    pub fn start(api: &str, args: &[&str], out: PathBuf) -> Self {
        let file = std::fs::File::create(&out).expect("watch output file");
        let child = Command::new(bin("tickctl"))
            .arg("watch")
            .args(args)
            .args(["--api", api, "--json"])
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tickctl watch");
        Watch { child, out }
    }

    /// The lines printed so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server of a test's own (for tests that stop and restart it), with every write fsynced to
/// its append-only file before it is acknowledged — so a SIGKILLed server loses nothing acknowledged.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free loopback port, keeping its files in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// Like [`start`](Self::start) with extra `redis-server` arguments, in which `{port}` stands for
    /// the chosen port (e.g. `["--port", "0", "--tls-port", "{port}", ...]` for TLS only).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("redis data dir");
        let port = free_port();
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            extra: extra
                .iter()
                .map(|a| a.replace("{port}", &port.to_string()))
                .collect(),
        };
        server.start_again();
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (no shutdown, no final save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "KILL");
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGSTOP: connections stay open and nothing is answered, as with a
    /// server that hangs, until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            signal(child, "STOP");
        }
    }

    /// Lets a [`freeze`](Self::freeze)d server run on (SIGCONT).
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            signal(child, "CONT");
        }
    }

    /// Starts the server (again) on the same port and data directory, and waits until it answers.
    pub fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let plain = self.extra.is_empty();
        wait_for(
            Duration::from_secs(20),
            Duration::from_millis(50),
            "redis-server to answer",
            || {
                let mut s = TcpStream::connect(&addr).ok()?;
                if !plain {
                    // TLS or AUTH: a listening port is all we can check without a client of our own.
                    return Some(());
                }
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"PING\r\n").ok()?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf).ok()?;
                (&buf == b"+PONG\r\n").then_some(())
            },
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `tickctl` with `args` to completion: (success?, stdout).
pub fn tickctl(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("tickctl"))
        .args(args)
        .output()
        .expect("run tickctl");
    if !out.status.success() {
        eprintln!(
            "tickctl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A `tickfleet-operator` process talking to the API server of `kubeconfig`, stderr to a log file.
pub struct Operator {
    /// The process.
    pub child: Child,
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`), `127.0.0.1:PORT`.
    pub admin: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts the operator (leader election off) with `KUBECONFIG=kubeconfig`, logging into `dir`.
    pub fn start(kubeconfig: &Path, dir: &Path) -> Self {
        Self::spawn(
            kubeconfig,
            &dir.join("operator.log"),
            &["--leader-election", "false"],
        )
    }

    /// Starts a replica taking part in leader election (default timings, default identity: no
    /// `POD_NAME` nor `--identity`, as when run outside a cluster), logging into `dir/NAME.log`.
    pub fn start_elected(kubeconfig: &Path, dir: &Path, name: &str) -> Self {
        Self::spawn(kubeconfig, &dir.join(format!("{name}.log")), &[])
    }

    fn spawn(kubeconfig: &Path, log: &Path, args: &[&str]) -> Self {
        let admin = format!("127.0.0.1:{}", free_port());
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(bin("tickfleet-operator"))
            .args(["--admin-addr", &admin])
            .args(args)
            .args(["--log-format", "text"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("HOSTNAME")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start tickfleet-operator");
        Operator {
            child,
            admin,
            log: log.to_path_buf(),
        }
    }

    /// Kills the process with SIGKILL (no shutdown, no Lease release) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

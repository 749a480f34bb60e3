//! Security basics end to end: Redis AUTH and TLS (`rediss://` with a private CA), and no secret in logs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tickfleet_e2e::{
    DevBroker, RedisServer, Worker, WorkerSetup, assert_exact, bin, free_port, http_get, produce,
    redis_url, unique, wait_for,
};

const PASSWORD: &str = "s3cret-Pa55word";

/// Runs `tickctl verify` with extra arguments: the summary, once clean.
fn verify_with(report: &Path, url: &str, prefix: &str, extra: &[&str]) -> serde_json::Value {
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "every tick stored",
        || {
            let out = Command::new(bin("tickctl"))
                .args([
                    "verify",
                    "--json",
                    "--redis-url",
                    url,
                    "--redis-prefix",
                    prefix,
                ])
                .args(extra)
                .arg("--report")
                .arg(report)
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| serde_json::from_slice(&out.stdout).unwrap())
        },
    )
}

#[test]
fn redis_auth_works_from_the_url_and_the_password_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_with(&dir.path().join("redis"), &["--requirepass", PASSWORD]);
    let broker = DevBroker::start(&["ticks:4"]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let good = WorkerSetup::new(&broker, dir.path(), &url);
    let mut bad = WorkerSetup::new(
        &broker,
        dir.path(),
        &format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}", redis.port()),
    );
    bad.group = unique("bad-group");

    let worker = Worker::start(&good, 0);
    let refused = Worker::start(&bad, 1);
    let report = produce(
        &broker.bootstrap,
        "ticks",
        dir.path(),
        &["--count", "3000", "--assets", "10"],
    );
    let summary = verify_with(&report, &url, &good.prefix, &[]);
    assert_exact(&summary, 10, 3000);

    // A wrong password: the worker stays up but not ready, and says why without the password.
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the refused worker to stay not ready",
        || {
            (http_get(&refused.admin, "/healthz").is_some()
                && http_get(&refused.admin, "/readyz").is_none())
            .then_some(())
        },
    );
    for w in [&worker, &refused] {
        let log = w.log_text();
        assert!(!log.contains(PASSWORD), "a log holds the password:\n{log}");
    }
    assert!(
        refused.log_text().contains("not ready"),
        "{}",
        refused.log_text()
    );
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tickfleet test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

#[test]
fn redis_over_tls_with_a_private_ca_stores_everything() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let redis = RedisServer::start_with(
        &dir.path().join("redis"),
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    let broker = DevBroker::start(&["ticks:4"]);
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let mut setup = WorkerSetup::new(&broker, dir.path(), &url);
    setup.args = vec!["--redis-ca-file".into(), ca.clone()];
    let worker = Worker::start(&setup, 0);
    let report = produce(
        &broker.bootstrap,
        "ticks",
        dir.path(),
        &["--count", "3000", "--assets", "10"],
    );
    let summary = verify_with(&report, &url, &setup.prefix, &["--redis-ca-file", &ca]);
    assert_exact(&summary, 10, 3000);
    assert!(http_get(&worker.admin, "/readyz").is_some());

    // Without the CA the server's certificate is not trusted: the worker never becomes ready.
    let mut untrusting = WorkerSetup::new(&broker, dir.path(), &url);
    untrusting.group = unique("untrusting");
    let refused = Worker::start(&untrusting, 1);
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the untrusting worker to log a TLS failure",
        || {
            refused
                .log_text()
                .contains("store unreachable")
                .then_some(())
        },
    );
    assert!(http_get(&refused.admin, "/readyz").is_none());
}

#[test]
fn api_serves_grpc_over_tls_and_tickctl_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (grpc, admin) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let log = std::fs::File::create(dir.path().join("api.log")).unwrap();
    let mut api = Command::new(bin("tickfleet-api"))
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--admin-addr",
            &admin,
        ])
        .args([
            "--redis-url",
            &redis_url(),
            "--redis-prefix",
            &unique("tls"),
        ])
        .args([
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
        ])
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "the api to be ready",
        || http_get(&admin, "/readyz"),
    );
    let assets = |api_url: &str, extra: &[&str]| {
        Command::new(bin("tickctl"))
            .args(["assets", "--json", "--api", api_url])
            .args(extra)
            .output()
            .unwrap()
    };
    let https = format!("https://127.0.0.1:{grpc}");
    let ok = assets(&https, &["--ca-file", &file("ca.pem")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The certificate is checked: without the CA it is refused, and plaintext gets no answer.
    assert!(
        !assets(&https, &[]).status.success(),
        "an untrusted certificate was accepted"
    );
    assert!(
        !assets(&format!("http://127.0.0.1:{grpc}"), &[])
            .status
            .success(),
        "plaintext was served"
    );
    let _ = api.kill();
    let _ = api.wait();
}

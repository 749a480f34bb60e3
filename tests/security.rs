//! Security end to end: Redis AUTH and TLS (`rediss://` with a private CA), PostgreSQL over TLS
//! (`sslmode`, `sslrootcert` with a private CA, a server that refuses plaintext), Apache Kafka with
//! SASL_SSL and SCRAM-SHA-512 (certificates made with openssl, users with Kafka's own tool), and no
//! secret in logs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tickfleet_e2e::postgres::{Postgres, Store, psql};
use tickfleet_e2e::{
    Kafka, RedisCluster, RedisServer, Worker, WorkerSetup, assert_exact, bin, create_topic,
    free_port, http_get, produce, redis_url, shared_topic, unique, wait_for,
};
use tickfleet_operator::kafka::{
    KafkaAdmin, KafkaConnection, RdKafkaAdmin, TopicOutcome, ensure_topic,
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
    let (bootstrap, topic) = shared_topic("security", 4);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let good = WorkerSetup::on(&bootstrap, &topic, dir.path(), &url);
    let mut bad = WorkerSetup::on(
        &bootstrap,
        &topic,
        dir.path(),
        &format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}", redis.port()),
    );
    bad.group = unique("bad-group");

    let worker = Worker::start(&good, 0);
    let refused = Worker::start(&bad, 1);
    let report = produce(
        &bootstrap,
        &topic,
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
fn postgres_over_tls_with_a_private_ca_stores_everything_and_sslmode_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let ca = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let pg = Postgres::start();
    pg.enable_tls(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    );
    let with = |query: &str| format!("{}?{query}", pg.url);
    let verify_full = with(&format!("sslmode=verify-full&sslrootcert={ca}"));

    // The worker writes and tickctl verify reads over TLS, the server's name and CA checked.
    let (bootstrap, topic) = shared_topic("security-pg", 4);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &redis_url());
    setup.args = Store::Postgres.args(&verify_full);
    let _worker = Worker::start(&setup, 0);
    let report = produce(
        &bootstrap,
        &topic,
        dir.path(),
        &["--count", "3000", "--assets", "10"],
    );
    let audit = |url: &str| {
        let args = Store::Postgres.args(url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        verify_with(&report, &setup.redis_url, &setup.prefix, &args)
    };
    assert_exact(&audit(&verify_full), 10, 3000);
    // The server only takes TLS, and saw the worker's connections as TLS.
    let tls_sessions = psql(
        &pg.url,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    );
    assert_ne!(tls_sessions, ["0"], "no TLS session besides psql's own");
    // verify-ca (the chain only) and require (encrypted, the certificate not checked) read it too.
    assert_exact(
        &audit(&with(&format!("sslmode=verify-ca&sslrootcert={ca}"))),
        10,
        3000,
    );
    assert_exact(&audit(&with("sslmode=require")), 10, 3000);

    // Refused: plaintext (the server says no), and verify-full without the private CA (the OS's
    // roots do not know it).
    let verify_args = |url: &str| -> (bool, String) {
        let out = Command::new(bin("tickctl"))
            .args(["verify", "--json", "--redis-prefix", &setup.prefix])
            .args(Store::Postgres.args(url))
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = verify_args(&with("sslmode=disable"));
    assert!(
        !ok && err.contains("no encryption"),
        "sslmode=disable: {err}"
    );
    let (ok, err) = verify_args(&with("sslmode=verify-full"));
    assert!(
        !ok && err.to_lowercase().contains("certificate"),
        "verify-full without the CA: {err}"
    );
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
    let (bootstrap, topic) = shared_topic("security", 4);
    let url = format!("rediss://127.0.0.1:{}", redis.port());
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &url);
    setup.args = vec!["--redis-ca-file".into(), ca.clone()];
    let worker = Worker::start(&setup, 0);
    let report = produce(
        &bootstrap,
        &topic,
        dir.path(),
        &["--count", "3000", "--assets", "10"],
    );
    let summary = verify_with(&report, &url, &setup.prefix, &["--redis-ca-file", &ca]);
    assert_exact(&summary, 10, 3000);
    assert!(http_get(&worker.admin, "/readyz").is_some());

    // Without the CA the server's certificate is not trusted: the worker never becomes ready.
    let mut untrusting = WorkerSetup::on(&bootstrap, &topic, dir.path(), &url);
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
fn redis_cluster_over_tls_with_a_private_ca_and_client_certificates_stores_everything() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    // 3 primaries + 3 replicas speaking only TLS (clients, replication, cluster bus), each requiring a
    // client certificate of the CA; the server's certificate serves as the client's too.
    let cluster = RedisCluster::start_tls(&dir.path().join("cluster"), dir.path());
    assert!(cluster.urls.starts_with("rediss://"), "{}", cluster.urls);
    let tls = [
        "--redis-mode",
        "cluster",
        "--redis-ca-file",
        &ca,
        "--redis-client-cert-file",
        &cert,
        "--redis-client-key-file",
        &key,
    ];
    let (bootstrap, topic) = shared_topic("security", 4);
    let mut setup = WorkerSetup::on(&bootstrap, &topic, dir.path(), &cluster.urls);
    setup.args = tls.iter().map(|a| (*a).to_owned()).collect();
    let worker = Worker::start(&setup, 0);
    let report = produce(
        &bootstrap,
        &topic,
        dir.path(),
        &["--count", "3000", "--assets", "30"],
    );
    let summary = verify_with(&report, &cluster.urls, &setup.prefix, &tls);
    assert_exact(&summary, 30, 3000);
    assert!(http_get(&worker.admin, "/readyz").is_some());

    // Without the client certificate the nodes refuse the connection: the worker never becomes ready.
    let mut anonymous = WorkerSetup::on(&bootstrap, &topic, dir.path(), &cluster.urls);
    anonymous.group = unique("anonymous");
    anonymous.args = tls[..4].iter().map(|a| (*a).to_owned()).collect();
    let refused = Worker::start(&anonymous, 1);
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the worker without a client certificate to log a refusal",
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
            "--http-addr",
            &format!("127.0.0.1:{}", free_port()),
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

const KAFKA_ADMIN_PASSWORD: &str = "Adm1n-kafka-secret";
const KAFKA_PASSWORD: &str = "W0rker-kafka-secret";

/// The librdkafka settings of a SASL_SSL + SCRAM-SHA-512 client trusting `ca`.
fn sasl_ssl<'a>(user: &'a str, password: &'a str, ca: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("security.protocol", "sasl_ssl"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", user),
        ("sasl.password", password),
        ("ssl.ca.location", ca),
    ]
}

/// The `TICKFLEET_KAFKA_*` variables for a SASL_SSL + SCRAM-SHA-512 login trusting `ca`.
fn kafka_env(user: &str, password: &str, ca: &str) -> Vec<(String, String)> {
    [
        ("TICKFLEET_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("TICKFLEET_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("TICKFLEET_KAFKA_SASL_USERNAME", user),
        ("TICKFLEET_KAFKA_SASL_PASSWORD", password),
        ("TICKFLEET_KAFKA_CA_FILE", ca),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Runs `tickctl ARGS` with `env`: (success?, stdout, stderr).
fn tickctl_env(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let out = Command::new(bin("tickctl"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run tickctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kafka_sasl_ssl_scram_worker_and_tickctl_connect_and_wrong_credentials_are_refused_unlogged() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    // A broker whose only client listener is SASL_SSL with SCRAM-SHA-512; both users are made by
    // Kafka's own StorageTool when the log dirs are formatted.
    let kafka = Kafka::start(&[
        "--sasl-ssl",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--scram",
        &format!("admin:{KAFKA_ADMIN_PASSWORD}"),
        "--scram",
        &format!("tickfleet:{KAFKA_PASSWORD}"),
    ]);
    // The operator's own admin client makes the pipeline's topic over SASL_SSL (its topic ensure).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let operator = RdKafkaAdmin::default();
    let conn = |password: &str| {
        let mut c = KafkaConnection::plaintext(kafka.bootstrap.clone());
        c.security_protocol = Some("SASL_SSL".into());
        c.sasl_mechanism = Some("SCRAM-SHA-512".into());
        c.sasl_username = Some("admin".into());
        c.sasl_password = Some(password.into());
        c.ssl_ca_location = Some(ca.clone());
        c
    };
    assert_eq!(
        rt.block_on(ensure_topic(
            &operator,
            &conn(KAFKA_ADMIN_PASSWORD),
            "ticks",
            4,
            None
        ))
        .unwrap(),
        TopicOutcome::Created { partitions: 4 }
    );
    let admin = sasl_ssl("admin", KAFKA_ADMIN_PASSWORD, &ca);
    create_topic(&kafka.bootstrap, &admin, "ticks.dlq", 2, None);

    let env = kafka_env("tickfleet", KAFKA_PASSWORD, &ca);
    let mut setup = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis_url());
    setup.env = env.clone();
    let worker = Worker::start(&setup, 0);

    let report = file("report.json");
    let (ok, _, err) = tickctl_env(
        &[
            "produce",
            "--brokers",
            &kafka.bootstrap,
            "--topic",
            "ticks",
            "--count",
            "3000",
            "--assets",
            "10",
            "--poison-every",
            "300",
            "--report",
            &report,
        ],
        &env,
    );
    assert!(ok, "tickctl produce over SASL_SSL: {err}");
    let summary = verify_with(Path::new(&report), &redis_url(), &setup.prefix, &[]);
    assert_exact(&summary, 10, 3000);
    assert!(http_get(&worker.admin, "/readyz").is_some());

    // The worker's dead letters went through the secured producer; tickctl reads them back.
    let letters = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "10 dead letters listed over SASL_SSL",
        || {
            let (ok, out, _) = tickctl_env(
                &[
                    "dlq",
                    "list",
                    "--json",
                    "--brokers",
                    &kafka.bootstrap,
                    "--topic",
                    "ticks.dlq",
                ],
                &env,
            );
            let letters: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
            (ok && letters.len() == 10).then_some(letters)
        },
    );
    assert!(
        letters.iter().all(|l| l["reason"].is_string()),
        "{letters:?}"
    );
    // The operator measures the group's lag from its committed offsets over SASL_SSL: all caught up.
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(500),
        "the operator to measure zero lag",
        || {
            let lag = rt.block_on(operator.consumer_lag(
                &conn(KAFKA_ADMIN_PASSWORD),
                "ticks",
                &setup.group,
            ));
            (lag.ok()?.total == 0).then_some(())
        },
    );
    // A wrong password fails the operator's calls with an error that names no password.
    let err = rt
        .block_on(operator.topic_partitions(&conn("not-the-password"), "ticks"))
        .expect_err("a wrong password is refused");
    assert!(!err.to_string().contains(KAFKA_ADMIN_PASSWORD), "{err}");

    // A wrong password: the broker refuses the login; the worker says so, is not ready, stores
    // nothing, and no log holds either password.
    let wrong = format!("wrong-{KAFKA_PASSWORD}");
    let mut bad = WorkerSetup::on(&kafka.bootstrap, "ticks", dir.path(), &redis_url());
    bad.env = kafka_env("tickfleet", &wrong, &ca);
    let refused = Worker::start(&bad, 1);
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the refused worker to log the failed login",
        || {
            refused
                .log_text()
                .contains("Authentication failed")
                .then_some(())
        },
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the refused worker to be live but not ready",
        || {
            (http_get(&refused.admin, "/healthz").is_some()
                && http_get(&refused.admin, "/readyz").is_none())
            .then_some(())
        },
    );
    assert_eq!(refused.metric("tickfleet_worker_ticks_stored_total"), 0.0);
    let (ok, _, produce_err) = tickctl_env(
        &[
            "produce",
            "--brokers",
            &kafka.bootstrap,
            "--topic",
            "ticks",
            "--count",
            "10",
            "--kafka-option",
            "message.timeout.ms=10000",
        ],
        &bad.env,
    );
    assert!(!ok, "tickctl produce with a wrong password succeeded");
    assert!(
        produce_err.contains("Authentication failed"),
        "tickctl produce says why: {produce_err}"
    );
    for log in [worker.log_text(), refused.log_text(), produce_err] {
        for secret in [KAFKA_PASSWORD, KAFKA_ADMIN_PASSWORD] {
            assert!(!log.contains(secret), "a log holds a password:\n{log}");
        }
    }
}

//! PostgreSQL for the end-to-end tests: the run's shared server (`TICKFLEET_TEST_POSTGRES_URL`, started
//! by `scripts/test.sh`) and dedicated servers, through `scripts/postgres.sh`, for tests that restart
//! one; [`Store`], for the tests that run the same pipeline on each `--store`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Which store a pipeline test's workers write (`--store`): the tests that prove a guarantee for
/// every store run once per kind, with the same assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Redis alone (the default: no `--store` argument).
    Redis,
    /// PostgreSQL alone.
    Postgres,
    /// Redis and PostgreSQL.
    Both,
}

impl Store {
    /// Its `--store` value.
    pub fn name(self) -> &'static str {
        match self {
            Store::Redis => "redis",
            Store::Postgres => "postgres",
            Store::Both => "both",
        }
    }

    /// Whether it writes PostgreSQL.
    pub fn has_postgres(self) -> bool {
        self != Store::Redis
    }

    /// The worker's (and api's) arguments choosing it, with PostgreSQL at `pg_url`.
    pub fn args(self, pg_url: &str) -> Vec<String> {
        match self {
            Store::Redis => Vec::new(),
            kind => ["--store", kind.name(), "--postgres-url", pg_url]
                .map(String::from)
                .to_vec(),
        }
    }

    /// `tickctl verify` arguments, one set per store it wrote: every one must hold each tick once
    /// (`--store both` is audited in Redis and in PostgreSQL, each on its own).
    pub fn audits(self, pg_url: &str) -> Vec<Vec<String>> {
        let redis = Vec::new();
        let postgres = Store::Postgres.args(pg_url);
        match self {
            Store::Redis => vec![redis],
            Store::Postgres => vec![postgres],
            Store::Both => vec![redis, postgres],
        }
    }
}

/// Asserts what `psql` shows of a pipeline's schema: `ticks` rows, its day partitions, the migrations
/// table.
pub fn assert_psql_shows(url: &str, schema: &str, ticks: u64) {
    let count = psql(url, &format!("SELECT count(*) FROM {schema}.ticks"));
    assert_eq!(count, [ticks.to_string()]);
    let partitions = psql(
        url,
        &format!(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = '{schema}.ticks'::regclass ORDER BY 1"
        ),
    );
    assert!(
        !partitions.is_empty() && partitions.iter().all(|p| p.starts_with("ticks_20")),
        "day partitions: {partitions:?}"
    );
    let migrations = psql(
        url,
        &format!("SELECT version, name FROM {schema}.schema_migrations ORDER BY version"),
    );
    assert_eq!(migrations, ["1|ticks"]);
}

/// The run's shared PostgreSQL URL.
pub fn postgres_url() -> String {
    std::env::var("TICKFLEET_TEST_POSTGRES_URL").expect(
        "TICKFLEET_TEST_POSTGRES_URL is not set: run scripts/test.sh, which starts PostgreSQL \
         (scripts/postgres.sh) and sets it",
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh")
}

/// `psql URL -At -c SQL`: its output lines, or panics when it fails.
pub fn psql(url: &str, sql: &str) -> Vec<String> {
    let out = Command::new("psql")
        .args([url, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A PostgreSQL of one test's own, stopped (and its data removed) on drop.
pub struct Postgres {
    dir: PathBuf,
    /// Its URL.
    pub url: String,
}

impl Postgres {
    /// initdb + start under a fresh directory in /tmp (the server's user must be able to reach it).
    pub fn start() -> Self {
        let dir = PathBuf::from(format!("/tmp/{}", crate::unique("tickfleet-pg")));
        std::fs::create_dir(&dir).expect("create the PostgreSQL directory");
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.join("pg"))
            .output()
            .expect("run postgres.sh");
        assert!(
            out.status.success(),
            "postgres.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Postgres { dir, url }
    }

    /// Stops the server at once (`pg_ctl -m immediate`, like a crash) and starts it again on the same
    /// data and port.
    pub fn restart(&self) {
        self.run("restart", &[]);
    }

    /// Stops the server: `fast` is a clean shutdown (sessions are ended, a checkpoint is written),
    /// `immediate` a crash (recovery from the WAL on the next start).
    pub fn down(&self, mode: &str) {
        self.run("down", &[mode]);
    }

    /// Starts the server stopped by [`down`](Self::down) on the same data and port.
    pub fn up(&self) {
        self.run("up", &[]);
    }

    /// Turns TLS on with `cert` and `key` (PEM) and makes the server refuse connections without it
    /// (`hostssl` only in pg_hba.conf), then reloads it.
    pub fn enable_tls(&self, cert: &Path, key: &Path) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let data = self.dir.join("pg/data");
        let owner = std::fs::metadata(&data).expect("the data directory");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let to = data.join(to);
            std::fs::copy(from, &to).expect("copy a TLS file into the data directory");
            // PostgreSQL refuses a key others can read; it runs as the data directory's owner.
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        psql(&self.url, "ALTER SYSTEM SET ssl = on");
        psql(&self.url, "SELECT pg_reload_conf()");
        crate::wait_for(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(100),
            "PostgreSQL to serve TLS",
            || (psql(&self.url, "SHOW ssl") == ["on"]).then_some(()),
        );
    }

    fn run(&self, cmd: &str, extra: &[&str]) {
        let status = Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(self.dir.join("pg"))
            .args(extra)
            .status()
            .expect("run postgres.sh");
        assert!(status.success(), "postgres.sh {cmd} failed");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.join("pg"))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

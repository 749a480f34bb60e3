//! PostgreSQL for the end-to-end tests: the run's shared server (`TICKFLEET_TEST_POSTGRES_URL`, started
//! by `scripts/test.sh`) and dedicated servers, through `scripts/postgres.sh`, for tests that restart
//! one.

use std::path::{Path, PathBuf};
use std::process::Command;

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
        let status = Command::new("bash")
            .arg(script())
            .arg("restart")
            .arg(self.dir.join("pg"))
            .status()
            .expect("run postgres.sh");
        assert!(status.success(), "postgres.sh restart failed");
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

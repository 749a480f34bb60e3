//! A real Prometheus server (Debian's `prometheus` package; `scripts/test.sh` installs it) of a test's own:
//! its own config, data directory and free loopback port, so a system Prometheus (the Debian package
//! starts one where it can) is never in the way. Queried through its HTTP API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{free_port, wait_for};

/// A running `prometheus` process; killed when dropped.
pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (prometheus.yml text) in `dir` and waits until it is ready.
    pub fn start(dir: &Path, config: &str) -> Self {
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus; scripts/test.sh does)");
        let prometheus = Prometheus { child, addr };
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "prometheus to be ready",
            || (prometheus.get("/-/ready").0 == 200).then_some(()),
        );
        prometheus
    }

    /// `GET path` with HTTP/1.0 (so the answer is never chunked): (status, body); status 0 when the
    /// server does not answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "")
    }

    fn request(&self, method: &str, path: &str, form: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(&self.addr) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let sent = write!(
            s,
            "{method} {path} HTTP/1.0\r\nhost: {}\r\ncontent-type: application/x-www-form-urlencoded\r\n\
             content-length: {}\r\n\r\n{form}",
            self.addr,
            form.len()
        );
        let mut out = String::new();
        if sent.is_err() || s.read_to_string(&mut out).is_err() {
            return (0, String::new());
        }
        let Some((head, body)) = out.split_once("\r\n\r\n") else {
            return (0, String::new());
        };
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, body.to_owned())
    }

    /// Evaluates `expr` now (`/api/v1/query`): the result vector, or Prometheus' error text.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let (status, body) = self.request(
            "POST",
            "/api/v1/query",
            &format!("query={}", percent_encode(expr)),
        );
        let answer: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if answer["status"] != "success" {
            return Err(format!(
                "{}: {}",
                answer["errorType"].as_str().unwrap_or("error"),
                answer["error"].as_str().unwrap_or(&body)
            ));
        }
        match &answer["data"]["result"] {
            Value::Array(v) => Ok(v.clone()),
            // a scalar or string result: one value
            other => Ok(vec![serde_json::json!({"metric": {}, "value": other})]),
        }
    }

    /// `/api/v1/<what>`'s `data`, e.g. `rules` or `targets`.
    pub fn api(&self, what: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/{what}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/{what}: HTTP {status}, not JSON ({e}): {body}"));
        answer["data"].clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `application/x-www-form-urlencoded` value encoding.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Whether a query result has a sample with a finite value (not NaN, not ±Inf).
pub fn has_finite_sample(result: &[Value]) -> bool {
    result.iter().any(|r| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

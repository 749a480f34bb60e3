//! A small fake Kubernetes API server for running the real `tickfleet-operator` binary in tests (there
//! is no Kubernetes API server on the build machines). It serves, over plain HTTP on loopback:
//!
//! * lists of the `TickPipeline`s it was given (every other kind lists empty), and watches that stay
//!   open without events — what kube-runtime's controller needs to start and reconcile;
//! * server-side apply `PATCH`es of the children, answered with the applied object; a Deployment
//!   comes back with a status saying all its replicas are ready (the fake plays the kubelet and the
//!   Deployment controller, which do not exist here);
//! * `PATCH …/status` of a `TickPipeline`, answered with the pipeline carrying that status;
//! * 404 `Status` for anything else.
//!
//! * `coordination.k8s.io` Leases, the one kind it keeps: create, get and replace with the API
//!   server's optimistic concurrency (`409 Conflict` for a stale `resourceVersion` or an existing
//!   name), and watches of one Lease (`fieldSelector=metadata.name=…`) that send each write after
//!   the watch's `resourceVersion` as a `MODIFIED` event (checked every 10 ms), so real operator
//!   replicas can elect a leader through it. Every Lease write is kept, in order
//!   ([`FakeKube::lease_writes`]).
//!
//! It does not validate against the CRD schema, keep other state between requests, or send watch
//! events of other kinds.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// The fake API server; stops (and closes held watches) when dropped.
pub struct FakeKube {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    leases: Leases,
}

/// Leases by path (`/apis/coordination.k8s.io/v1/namespaces/NS/leases/NAME`), and every write.
#[derive(Default)]
struct LeaseStore {
    current: BTreeMap<String, Value>,
    writes: Vec<Value>,
}

type Leases = Arc<Mutex<LeaseStore>>;

impl FakeKube {
    /// Serves `pipelines` (full `TickPipeline` objects with `metadata.namespace`).
    pub fn start(pipelines: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake kube");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let pipelines = Arc::new(pipelines);
        let leases = Leases::default();
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop2, requests2, leases2) = (stop.clone(), requests.clone(), leases.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (stop, requests, pipelines, leases) = (
                            stop2.clone(),
                            requests2.clone(),
                            pipelines.clone(),
                            leases2.clone(),
                        );
                        std::thread::spawn(move || {
                            let _ = serve(stream, &pipelines, &leases, &stop, &requests);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FakeKube {
            url,
            stop,
            requests,
            leases,
        }
    }

    /// Writes a kubeconfig pointing at this server into `dir`; returns its path (for `KUBECONFIG`).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url
        );
        std::fs::write(&path, config).expect("write kubeconfig");
        path
    }

    /// The Lease `namespace/name`, as stored.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.leases
            .lock()
            .expect("leases")
            .current
            .get(&format!(
                "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
            ))
            .cloned()
    }

    /// Every Lease written (created or replaced), oldest first, as stored.
    pub fn lease_writes(&self) -> Vec<Value> {
        self.leases.lock().expect("leases").writes.clone()
    }

    /// The requests served so far (`METHOD PATH`), for failure messages.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    stream: TcpStream,
    pipelines: &[Value],
    leases: &Mutex<LeaseStore>,
    stop: &AtomicBool,
    requests: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    requests
        .lock()
        .expect("requests")
        .push(format!("{method} {target}"));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut out = stream;
    let watch = method == "GET"
        && query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
    if watch && path.starts_with("/apis/coordination.k8s.io/") {
        return watch_lease(out, path, query, leases, stop);
    }
    if watch {
        // a watch with no events: headers now, then hold the connection until the server stops
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        )?;
        out.flush()?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        return Ok(());
    }
    let (code, answer) = if path.starts_with("/apis/coordination.k8s.io/") {
        lease(&method, path, &body, leases)
    } else {
        respond(&method, path, &body, pipelines)
    };
    let text = answer.to_string();
    write!(
        out,
        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()
}

/// A watch of one Lease: each version stored after the watch's `resourceVersion`, as a
/// `MODIFIED` event in its own chunk, until the server stops.
fn watch_lease(
    mut out: TcpStream,
    path: &str,
    query: &str,
    leases: &Mutex<LeaseStore>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(name))
            .map(|v| v.replace("%3D", "=").replace("%3d", "="))
    };
    let name = param("fieldSelector=")
        .and_then(|f| f.strip_prefix("metadata.name=").map(String::from))
        .unwrap_or_default();
    let key = format!("{path}/{name}");
    let version = |l: &Value| {
        l["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut sent = param("resourceVersion=")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    out.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    )?;
    out.flush()?;
    while !stop.load(Ordering::Relaxed) {
        let current = leases.lock().expect("leases").current.get(&key).cloned();
        if let Some(lease) = current.filter(|l| version(l) > sent) {
            sent = version(&lease);
            let line = format!("{}\n", json!({"type": "MODIFIED", "object": lease}));
            write!(out, "{:x}\r\n{line}\r\n", line.len())?;
            out.flush()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn not_found(path: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

fn conflict(message: String) -> (u16, Value) {
    (
        409,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Conflict", "code": 409, "message": message}),
    )
}

/// Create, get and replace of Leases, with `resourceVersion` checks like the API server's.
fn lease(method: &str, path: &str, body: &[u8], store: &Mutex<LeaseStore>) -> (u16, Value) {
    static VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    let mut store = store.lock().expect("leases");
    let LeaseStore {
        current: leases,
        writes,
    } = &mut *store;
    let object = serde_json::from_slice::<Value>(body).ok();
    let stamp = |mut object: Value| {
        let version = VERSION.fetch_add(1, Ordering::Relaxed);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        object
    };
    match (method, object) {
        ("GET", _) => match leases.get(path) {
            Some(l) => (200, l.clone()),
            None => not_found(path),
        },
        ("POST", Some(object)) => {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let key = format!("{path}/{name}");
            if leases.contains_key(&key) {
                return conflict(format!("leases {name:?} already exists"));
            }
            let object = stamp(object);
            leases.insert(key, object.clone());
            writes.push(object.clone());
            (201, object)
        }
        ("PUT", Some(object)) => {
            let Some(stored) = leases.get(path) else {
                return not_found(path);
            };
            if stored["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                return conflict("the object has been modified".to_string());
            }
            let object = stamp(object);
            leases.insert(path.to_string(), object.clone());
            writes.push(object.clone());
            (200, object)
        }
        _ => not_found(path),
    }
}

fn respond(method: &str, path: &str, body: &[u8], pipelines: &[Value]) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match method {
        "GET" => {
            // collection paths end with the plural kind: /api/v1/configmaps,
            // /apis/GROUP/VERSION/[namespaces/NS/]KIND
            let kind = segments.last().copied().unwrap_or_default();
            let namespaced = segments.len() >= 3 && segments[segments.len() - 3] == "namespaces";
            let is_collection = matches!(
                kind,
                "tickpipelines"
                    | "configmaps"
                    | "deployments"
                    | "services"
                    | "poddisruptionbudgets"
            );
            if !is_collection {
                return not_found(path);
            }
            let items: Vec<Value> = if kind == "tickpipelines" {
                pipelines
                    .iter()
                    .filter(|p| {
                        !namespaced || p["metadata"]["namespace"] == segments[segments.len() - 2]
                    })
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            (
                200,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        "PATCH" => {
            let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
                return (
                    400,
                    json!({"kind": "Status", "code": 400, "message": "bad body"}),
                );
            };
            if segments.last() == Some(&"status") {
                let name = segments[segments.len() - 2];
                let Some(pipeline) = pipelines.iter().find(|p| p["metadata"]["name"] == name)
                else {
                    return not_found(path);
                };
                let mut pipeline = pipeline.clone();
                pipeline["status"] = object["status"].take();
                return (200, pipeline);
            }
            let meta = &mut object["metadata"];
            meta["uid"] = json!(format!("uid-{}", path.replace('/', "-")));
            meta["resourceVersion"] = json!("2");
            meta["generation"] = json!(1);
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            if segments.contains(&"deployments") {
                let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
                object["status"] = json!({"observedGeneration": 1, "replicas": replicas,
                    "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
            }
            (200, object)
        }
        _ => not_found(path),
    }
}

//! The REST/JSON api end to end with the real binaries: JSON ticks and `tickctl produce` → Apache Kafka
//! → `tickfleet-worker` → redis-server → `tickfleet-api`, queried over HTTP on its `--http-addr`. Every
//! REST answer is checked against what the gRPC api (through `tickctl --json`) answers for the same
//! query, since both are one implementation; errors are RFC 9457 problems naming the parameter.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tickfleet_e2e::http::{EventStream, get, request};
use tickfleet_e2e::{
    Api, Worker, WorkerSetup, produce, redis_url, send_messages, shared_topic, signal,
    tickctl_json, unique, wait_exit, wait_for, wait_verified,
};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The seed's five prices of one symbol, as JSON ticks (epoch ms), one ms apart ending `end_ms`.
fn seed_ticks(symbol: &'static str, end_ms: i64) -> Vec<(Option<&'static str>, Vec<u8>)> {
    ["100", "101", "99", "102", "98"]
        .iter()
        .enumerate()
        .map(|(i, price)| {
            let at = end_ms - 4 + i as i64;
            let seq = i + 1;
            let json = format!(
                r#"{{"symbol":"{symbol}","price":"{price}","size":"2","timestamp":{at},"source":"e2e","seq":{seq}}}"#
            );
            (Some(symbol), json.into_bytes())
        })
        .collect()
}

/// A problem document: status, content type, the `field` it names and its `code`.
fn assert_problem(addr: &str, path: &str, status: u16, field: Option<&str>) -> serde_json::Value {
    let r = get(addr, path);
    assert_eq!(r.status, status, "GET {path}: {}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "GET {path}"
    );
    let p = r.json();
    assert_eq!(p["status"], status, "{p}");
    assert_eq!(p["type"], "about:blank");
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert_eq!(p["field"].as_str(), field, "GET {path}: {p}");
    if field.is_some() {
        assert_eq!(p["reason"], p["detail"], "{p}");
    }
    p
}

/// A worker's setup on a new topic of the shared broker (`partitions` partitions) and a key prefix of
/// its own (both named after `name`), the worker taking `args`; the test's api reads that prefix.
fn setup_on_new_topic(name: &str, partitions: i32, dir: &Path, args: &[&str]) -> WorkerSetup {
    let (bootstrap, topic) = shared_topic(name, partitions);
    WorkerSetup {
        prefix: unique(&format!("e2e-{name}")),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..WorkerSetup::on(&bootstrap, &topic, dir, &redis_url())
    }
}

#[test]
fn rest_answers_what_grpc_answers_over_real_data() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup_on_new_topic("rest", 4, dir.path(), &["--format", "json"]);
    let (bootstrap, topic, prefix) = (&setup.bootstrap, &setup.topic, &setup.prefix);
    let _worker = Worker::start(&setup, 0);
    // Candles of ranges that ended 5 s ago are served as immutable (the default horizon is a year).
    let api = Api::start_with(
        prefix,
        dir.path(),
        0,
        &["--candles-immutable-after-secs", "5"],
    );
    // 500 ticks of each of three assets (exact decimal prices), then the seed's five of AAPL.
    let end_ms = now_ms();
    let start_ms = end_ms - 10_000;
    let mut messages = Vec::new();
    for (a, asset) in ["A0000", "A0001", "A0002"].into_iter().enumerate() {
        for i in 1..=500u64 {
            let at = start_ms + (i * 3 + a as u64) as i64;
            let json = format!(
                r#"{{"symbol":"{asset}","price":"{}.{i:03}","timestamp":{at},"source":"e2e","seq":{i}}}"#,
                100 + a
            );
            messages.push((Some(asset), json.into_bytes()));
        }
    }
    messages.extend(seed_ticks("AAPL", end_ms));
    send_messages(bootstrap, topic, &messages);
    let report = dir.path().join("report.json");
    let counts = |n: u64| serde_json::json!({"count": n, "first_seq": 1, "last_seq": n});
    std::fs::write(
        &report,
        serde_json::json!({"topic": topic, "acknowledged": 1505, "failed": 0, "assets": {
            "A0000": counts(500), "A0001": counts(500), "A0002": counts(500), "AAPL": counts(5)}})
        .to_string(),
    )
    .unwrap();
    wait_verified(&report, &redis_url(), prefix, Duration::from_secs(60));
    let http = &api.http;

    // The seed's latest price: exactly its four fields, the price an exact decimal string.
    let r = get(http, "/v1/prices/latest?symbol=AAPL");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let latest = r.json();
    let end_ns = end_ms * 1_000_000;
    let want_time = chrono_like(end_ns);
    assert_eq!(
        latest,
        serde_json::json!({"symbol": "AAPL", "price": "98", "timestamp": want_time, "provider": "e2e"})
    );
    assert_eq!(
        get(http, "/v1/prices/latest?symbol=AAPL&provider=e2e").json(),
        latest
    );
    // Caching: a short Cache-Control, and a conditional request with the ETag is a 304 without a body.
    assert_eq!(r.header("cache-control"), Some("max-age=1"));
    let etag = r.header("etag").expect("an ETag").to_owned();
    let again = tickfleet_e2e::http::get_with(
        http,
        "/v1/prices/latest?symbol=AAPL",
        &[("if-none-match", &etag)],
    );
    assert_eq!((again.status, again.body.as_str()), (304, ""));
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let other = tickfleet_e2e::http::get_with(
        http,
        "/v1/prices/latest?symbol=A0000",
        &[("if-none-match", &etag)],
    );
    assert_eq!(other.status, 200, "another body, another ETag");
    assert_ne!(other.header("etag"), Some(etag.as_str()));
    let p = assert_problem(
        http,
        "/v1/prices/latest?symbol=AAPL&provider=finnhub",
        404,
        None,
    );
    assert_eq!(p["code"], "NOT_FOUND");

    // The seed's moving average: [100, 101, 99, 102, 98] -> exactly 100; the same as gRPC says.
    let ma = get(http, "/v1/moving-average?asset_id=AAPL&points=5").json();
    assert_eq!(ma["sma"], "100", "{ma}");
    assert_eq!(ma["vwap"], "100", "{ma}");
    let grpc_ma = tickctl_json(&api.url, &["ma", "AAPL", "--points", "5"]).unwrap();
    assert_eq!(ma["sma"], grpc_ma["sma"]);
    assert_eq!(ma["count"], grpc_ma["count"].to_string());
    let w = get(http, "/v1/moving-average?asset_id=AAPL&window=1m").json();
    assert_eq!(
        (w["sma"].as_str(), w["count"].as_str()),
        (Some("100"), Some("5"))
    );

    // One daily candle of the five, exact.
    let c = get(http, "/v1/candles?asset_id=AAPL&interval=1d").json();
    let c = &c["candles"];
    assert_eq!(c.as_array().map(Vec::len), Some(1), "{c}");
    let c = &c[0];
    assert_eq!(
        [
            &c["open"],
            &c["high"],
            &c["low"],
            &c["close"],
            &c["volume"],
            &c["tick_count"]
        ],
        ["100", "102", "98", "98", "10", "5"]
    );
    assert_eq!(c["closed"], false);

    // Candles of a generated asset: the same as gRPC's.
    let rest_c = get(http, "/v1/candles?asset_id=A0001&interval=100ms").json();
    let grpc_c = tickctl_json(&api.url, &["candles", "A0001", "--interval", "100ms"]).unwrap();
    let key = |c: &serde_json::Value| {
        (
            c["start_ns"].to_string().trim_matches('"').to_owned(),
            c["open"].clone(),
            c["close"].clone(),
            c["tick_count"].to_string().trim_matches('"').to_owned(),
        )
    };
    let rest_keys: Vec<_> = rest_c["candles"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let grpc_keys: Vec<_> = grpc_c["candles"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    assert!(!rest_keys.is_empty());
    assert_eq!(rest_keys, grpc_keys);

    // Candles of a range that ended past the late-tick horizon (5 s here): immutable, with an ETag
    // that a conditional request matches (304). A range without an end, or ending within the
    // horizon, may still change: max-age=1.
    let closed = format!(
        "/v1/candles?asset_id=A0000&interval=1s&to_ns={}",
        (start_ms + 2_000) * 1_000_000
    );
    let r = get(http, &closed);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(!r.json()["candles"].as_array().unwrap().is_empty());
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let etag = r.header("etag").expect("an ETag").to_owned();
    let again = tickfleet_e2e::http::get_with(http, &closed, &[("if-none-match", &etag)]);
    assert_eq!((again.status, again.body.as_str()), (304, ""));
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    assert_eq!(
        again.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    for open in [
        "/v1/candles?asset_id=A0000&interval=1s".to_owned(),
        format!(
            "/v1/candles?asset_id=A0000&interval=1s&to_ns={}",
            now_ms() * 1_000_000
        ),
    ] {
        let r = get(http, &open);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("cache-control"), Some("max-age=1"), "{open}");
        assert!(r.header("etag").is_some());
    }

    // Every tick of A0000 by pages of 100, once each, in order: what gRPC lists.
    let grpc_ticks = tickctl_json(&api.url, &["ticks", "A0000", "--all"]).unwrap();
    let grpc_ticks: Vec<(String, String)> = grpc_ticks["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["seq"].to_string(),
                t["price"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let (mut rest_ticks, mut token, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let path = match &token {
            None => "/v1/ticks?asset_id=A0000&limit=100".to_owned(),
            Some(t) => format!("/v1/ticks?asset_id=A0000&limit=100&page_token={t}"),
        };
        let page = get(http, &path).json();
        pages += 1;
        for t in page["ticks"].as_array().unwrap() {
            assert!(t["price"].is_string() && t["seq"].is_string(), "{t}");
            rest_ticks.push((
                t["seq"].as_str().unwrap().to_owned(),
                t["price"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(rest_ticks, grpc_ticks);
    assert_eq!(rest_ticks.len(), 500);
    assert_eq!(rest_ticks[0], ("1".to_owned(), "100.001".to_owned()));
    assert_eq!(pages, 5);

    // Assets: every one, as gRPC lists them.
    let assets = get(http, "/v1/assets").json();
    let grpc_assets = tickctl_json(&api.url, &["assets"]).unwrap();
    let mut a: Vec<_> = assets["asset_ids"].as_array().unwrap().clone();
    a.sort_by_key(|v| v.to_string());
    assert_eq!(a.len(), 4, "{assets}");
    assert!(a.contains(&serde_json::json!("AAPL")));
    let g = grpc_assets.to_string();
    assert!(a.iter().all(|id| g.contains(&id.to_string())), "{g}");

    // Bad requests: a problem naming the parameter, with the gRPC side's reason.
    for (path, field) in [
        ("/v1/prices/latest", "symbol"),
        ("/v1/prices/latest?symbol=", "symbol"),
        ("/v1/ticks?asset_id=A0000&limit=20000", "limit"),
        ("/v1/ticks?asset_id=A0000&from_ns=abc", "from_ns"),
        ("/v1/ticks?asset_id=A0000&from_ns=-1", "from_ns"),
        ("/v1/ticks?asset_id=A0000&from_ns=5&to_ns=5", "to_ns"),
        ("/v1/ticks?asset_id=A0000&page_token=junk", "page_token"),
        ("/v1/ticks?asset_id=A0000&symbl=x", "symbl"),
        ("/v1/candles?asset_id=A0000&interval=7x", "interval"),
        ("/v1/candles?asset_id=A0000", "interval"),
        ("/v1/moving-average?asset_id=A0000", "points"),
        ("/v1/moving-average?asset_id=A0000&points=0", "points"),
        (
            "/v1/moving-average?asset_id=A0000&points=5&window=1m",
            "window",
        ),
        ("/v1/moving-average?asset_id=A0000&window=soon", "window"),
        ("/v1/ticks/stream?asset_ids=%01", "asset_ids"),
        ("/v1/candles/stream?interval=0s", "interval"),
    ] {
        let p = assert_problem(http, path, 400, Some(field));
        assert_eq!(p["code"], "INVALID_ARGUMENT", "{path}: {p}");
    }
    let p = assert_problem(
        http,
        "/v1/ticks?asset_id=A0000&limit=20000",
        400,
        Some("limit"),
    );
    assert_eq!(
        p["detail"],
        "limit is 20000; the most ticks one page holds is 10000 (0 = 1000)"
    );
    // A page token of another query is refused, not served.
    let first = get(http, "/v1/ticks?asset_id=A0000&limit=10").json();
    let t = first["next_page_token"].as_str().unwrap();
    assert_problem(
        http,
        &format!("/v1/ticks?asset_id=A0001&limit=10&page_token={t}"),
        400,
        Some("page_token"),
    );
    let p = assert_problem(http, "/v1/prices/latest?symbol=NOPE", 404, None);
    assert_eq!(p["code"], "NOT_FOUND");
    assert_problem(http, "/v1/nothing", 404, None);
    let r = request(http, "POST", "/v1/assets", &[], Some("{}")).unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));

    // The calls were served by the gRPC implementation: its metrics counted them.
    assert!(api.metric("tickfleet_api_requests_total", "method=\"GetLatest\"") >= 3.0);
    assert!(api.log_text().lines().all(|l| !l.contains("panicked")));
}

/// RFC 3339 UTC of `ns` with as many fraction digits as needed (milliseconds here).
fn chrono_like(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    let base = String::from_utf8(out.stdout).unwrap();
    format!("{}.{ms:03}Z", base.trim())
}

#[test]
fn sse_streams_every_live_tick_once_and_ends_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup_on_new_topic("rest-sse", 2, dir.path(), &[]);
    let (bootstrap, topic, prefix) = (&setup.bootstrap, &setup.topic, &setup.prefix);
    let mut api = Api::start_with(prefix, dir.path(), 0, &["--max-streams", "1"]);
    let mut stream = EventStream::open(&api.http, "/v1/ticks/stream?asset_ids=A0000,A0001");
    assert_eq!(stream.status, 200);
    assert!(
        stream
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"))
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "the SSE stream to open",
        || (api.metric("tickfleet_api_active_streams", "StreamTicks") == 1.0).then_some(()),
    );
    // The replica's stream limit holds for SSE as for gRPC: a second stream is a 429 problem.
    let p = assert_problem(&api.http, "/v1/ticks/stream", 429, None);
    assert_eq!(p["code"], "RESOURCE_EXHAUSTED");

    let _worker = Worker::start(&setup, 0);
    let report = produce(
        bootstrap,
        topic,
        dir.path(),
        &["--count", "600", "--assets", "3", "--rate", "3000"],
    );
    wait_verified(&report, &redis_url(), prefix, Duration::from_secs(60));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let want: u64 = ["A0000", "A0001"]
        .iter()
        .map(|a| r["assets"][a]["count"].as_u64().unwrap())
        .sum();
    let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..want {
        let ev = stream.next_event().expect("a tick event");
        assert_eq!(ev.event, "tick", "{ev:?}");
        let t: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
        assert!(t["price"].is_string(), "{t}");
        seqs.entry(t["asset_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(t["seq"].as_str().unwrap().parse().unwrap());
    }
    assert_eq!(seqs.keys().collect::<Vec<_>>(), ["A0000", "A0001"]);
    for (asset, s) in &seqs {
        let want: Vec<u64> = (1..=r["assets"][asset]["count"].as_u64().unwrap()).collect();
        assert_eq!(s, &want, "{asset}: every tick once, in order");
    }

    // SIGTERM: the event stream ends cleanly (the last chunk), the api exits 0.
    signal(&api.child, "TERM");
    assert!(stream.ends(), "the SSE stream did not end cleanly");
    let status = wait_exit(&mut api.child, Duration::from_secs(30)).expect("api exits");
    assert!(status.success(), "api: {status}\n{}", api.log_text());
    assert!(api.log_text().contains("drained"), "{}", api.log_text());
}

/// The REST api's OpenAPI document and docs page as the api serves them, and schemathesis (the
/// binary named by `TICKFLEET_SCHEMATHESIS`; `scripts/test.sh` installs it in a venv) against the live
/// api over stored ticks: no 5xx, every status, content type and body as the document says. The live
/// streams are left out (an event stream never ends, so it cannot be checked as one response).
#[test]
fn openapi_is_served_as_committed_and_schemathesis_finds_nothing() {
    let schemathesis = std::env::var("TICKFLEET_SCHEMATHESIS").expect(
        "TICKFLEET_SCHEMATHESIS is not set: run scripts/test.sh, which installs schemathesis and sets it",
    );
    let dir = tempfile::tempdir().unwrap();
    let setup = setup_on_new_topic("rest-schema", 2, dir.path(), &["--format", "json"]);
    let (bootstrap, topic, prefix) = (&setup.bootstrap, &setup.topic, &setup.prefix);
    let _worker = Worker::start(&setup, 0);
    let api = Api::start(prefix, dir.path(), 0);
    send_messages(bootstrap, topic, &seed_ticks("AAPL", now_ms()));
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "AAPL's ticks to be stored",
        || (get(&api.http, "/v1/prices/latest?symbol=AAPL").status == 200).then_some(()),
    );

    let served = get(&api.http, "/openapi.json");
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/json"));
    let committed =
        std::fs::read_to_string(format!("{}/api/openapi.json", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    assert!(
        served.body == committed,
        "the served /openapi.json differs from api/openapi.json (tickfleet-api --print-openapi > api/openapi.json)"
    );
    let doc = served.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let docs = get(&api.http, "/docs");
    assert_eq!(docs.status, 200);
    assert!(
        docs.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    for path in doc["paths"].as_object().unwrap().keys() {
        assert!(
            docs.body.contains(&format!("<code>{path}</code>")),
            "{path}"
        );
    }
    assert!(!docs.body.contains("<script"));

    let started = std::time::Instant::now();
    let out = std::process::Command::new(&schemathesis)
        .args(["run", &format!("http://{}/openapi.json", api.http)])
        .args(["--url", &format!("http://{}", api.http)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--exclude-path-regex", "stream"])
        .args(["--max-examples", "30", "--request-timeout", "10", "--no-color"])
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(text.contains("Tested: 8"), "{text}");
    eprintln!("schemathesis passed in {:?}", started.elapsed());

    // Every documented answer is reachable: each (method, route, status) of the document was
    // answered by this test's apis (counted by tickfleet_api_http_responses_total), by schemathesis
    // or by the requests below for what it does not try (event streams, conditional requests, rate
    // limits). A status documented for a new route fails here until a request reaches it.
    for (path, want) in [
        ("/v1/prices/latest?symbol=AAPL", 200),
        ("/v1/prices/latest", 400),
        ("/v1/prices/latest?symbol=NOPE", 404),
        ("/v1/ticks?asset_id=AAPL", 200),
        ("/v1/ticks?asset_id=AAPL&limit=20000", 400),
        ("/v1/ticks?asset_id=NOPE", 404),
        ("/v1/candles?asset_id=AAPL&interval=1s", 200),
        ("/v1/candles?asset_id=AAPL", 400),
        ("/v1/candles?asset_id=NOPE&interval=1s", 404),
        ("/v1/moving-average?asset_id=AAPL&points=5", 200),
        ("/v1/moving-average?asset_id=AAPL", 400),
        ("/v1/moving-average?asset_id=NOPE&points=5", 404),
        ("/v1/assets", 200),
        ("/v1/ticks/stream?asset_ids=%01", 400),
        ("/v1/candles/stream?interval=0s", 400),
    ] {
        assert_eq!(get(&api.http, path).status, want, "GET {path}");
    }
    for path in [
        "/v1/prices/latest?symbol=AAPL",
        "/v1/candles?asset_id=AAPL&interval=1s",
    ] {
        let etag = get(&api.http, path).header("etag").unwrap().to_owned();
        let r = tickfleet_e2e::http::get_with(&api.http, path, &[("if-none-match", &etag)]);
        assert_eq!(r.status, 304, "GET {path}");
    }
    for path in ["/v1/ticks/stream", "/v1/candles/stream?interval=1s"] {
        assert_eq!(EventStream::open(&api.http, path).status, 200, "GET {path}");
    }
    // Polling jobs: create, read, delete, and each refusal.
    let poll = |method: &str, path: &str, body: Option<&str>| {
        request(&api.http, method, path, &[], body).unwrap()
    };
    let r = poll(
        "POST",
        "/v1/prices/poll",
        Some(r#"{"symbols": ["AAPL"], "interval": "5s", "provider": "yahoo"}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let job = format!("/v1/polls/{}", r.json()["id"].as_str().unwrap());
    let r = poll("POST", "/v1/prices/poll", Some(r#"{"symbols": "AAPL"}"#));
    assert_eq!(r.status, 400, "{}", r.body);
    for (method, path, want) in [
        ("GET", job.as_str(), 200),
        ("DELETE", job.as_str(), 204),
        ("GET", job.as_str(), 404),
        ("DELETE", job.as_str(), 404),
        ("GET", "/v1/polls/not-an-id", 400),
        ("DELETE", "/v1/polls/not-an-id", 400),
    ] {
        let r = poll(method, path, None);
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
    }
    // Rate limits: an api over the same store whose every class allows one call an hour; each
    // route's second call is refused.
    let limited = Api::start_with(
        prefix,
        dir.path(),
        1,
        &[
            "--rate-limit-reads",
            "1/h",
            "--rate-limit-ranges",
            "1/h",
            "--rate-limit-streams",
            "1/h",
            "--rate-limit-writes",
            "1/h",
        ],
    );
    let paths = doc["paths"].as_object().unwrap();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            // An empty JSON object parses as a request body; the limit is taken before it is checked.
            let body = (method == "POST").then_some("{}");
            let send = || request(&limited.http, &method, path, &[], body).unwrap();
            send();
            let r = send();
            assert_eq!(r.status, 429, "{method} {path}: {}", r.body);
        }
    }
    let mut seen = answered(&api);
    seen.extend(answered(&limited));
    let mut missing = Vec::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            for status in op["responses"].as_object().unwrap().keys() {
                let key = (method.to_uppercase(), path.clone(), status.clone());
                if !seen.contains(&key) {
                    missing.push(format!("{} {} {}", key.0, key.1, key.2));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented in api/openapi.json but never answered in this test (add a request that reaches each): {missing:?}"
    );
    assert!(api.log_text().lines().all(|l| !l.contains("panicked")));
}

/// The (method, route, status) answers an api counted in `tickfleet_api_http_responses_total`.
fn answered(api: &Api) -> std::collections::BTreeSet<(String, String, String)> {
    let text = tickfleet_e2e::http_get(&api.admin, "/metrics").unwrap();
    let label = |line: &str, key: &str| {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    text.lines()
        .filter(|l| l.starts_with("tickfleet_api_http_responses_total{"))
        .filter_map(|l| Some((label(l, "method")?, label(l, "route")?, label(l, "status")?)))
        .collect()
}

/// One gRPC `GetLatest` of `symbol`, with `x-api-key: key` when given.
async fn grpc_latest(url: &str, key: Option<&str>, symbol: &str) -> tonic::Status {
    use tickfleet_proto::v1::{GetLatestRequest, tick_service_client::TickServiceClient};
    let mut client = TickServiceClient::connect(url.to_owned()).await.unwrap();
    let mut req = tonic::Request::new(GetLatestRequest {
        asset_id: symbol.into(),
    });
    if let Some(key) = key {
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    client.get_latest(req).await.unwrap_err()
}

/// Per-client rate limits over real Redis, on both apis at once: one limiter, so a client's REST and
/// gRPC calls share its bucket; another API key (or no key: the peer address) has a bucket of its
/// own; a class without a limit is not limited; a refusal is a 429 problem with `Retry-After` on
/// REST and RESOURCE_EXHAUSTED with a message and `retry-after` on gRPC; the metric counts each
/// refusal by class, without client ids.
#[test]
fn rate_limits_refuse_each_client_apart_on_rest_and_grpc_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("e2e-rest-rate");
    let api = Api::start_with(
        &prefix,
        dir.path(),
        0,
        &[
            "--rate-limit-reads",
            "2/h",
            "--rate-limit-streams",
            "1/h",
            "--rate-limit-key-header",
            "X-Api-Key",
        ],
    );
    let http = &api.http;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let latest = |key: &str| {
        let headers: Vec<(&str, &str)> = if key.is_empty() {
            vec![]
        } else {
            vec![("x-api-key", key)]
        };
        tickfleet_e2e::http::get_with(http, "/v1/prices/latest?symbol=NOPE", &headers)
    };
    // Key a: a burst of two (404: no such symbol, but served), then refused.
    assert_eq!(latest("a").status, 404);
    assert_eq!(latest("a").status, 404);
    let r = latest("a");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(
        (1700..=1800).contains(&wait),
        "2/h: a token every 1800 s, {wait}"
    );
    let p = r.json();
    assert_eq!(
        (p["status"].as_u64(), p["code"].as_str()),
        (Some(429), Some("RESOURCE_EXHAUSTED"))
    );
    assert_eq!(p["retry_after"].as_u64(), Some(wait), "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("--rate-limit-reads"),
        "{p}"
    );
    // Key b has a bucket of its own; ranges have no limit here, so key a still lists ticks.
    assert_eq!(latest("b").status, 404);
    assert_eq!(
        get_with_key(http, "/v1/ticks?asset_id=NOPE", "a").status,
        404
    );

    // gRPC: key a's bucket is the one its REST calls emptied.
    let s = rt.block_on(grpc_latest(&api.url, Some("a"), "NOPE"));
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("rate limit of reads"), "{s:?}");
    let secs: u64 = s
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1800).contains(&secs), "{secs}");
    // Key c over gRPC: two, then refused.
    for _ in 0..2 {
        assert_eq!(
            rt.block_on(grpc_latest(&api.url, Some("c"), "NOPE")).code(),
            tonic::Code::NotFound
        );
    }
    assert_eq!(
        rt.block_on(grpc_latest(&api.url, Some("c"), "NOPE")).code(),
        tonic::Code::ResourceExhausted
    );
    // No key: the peer address (127.0.0.1) is the client, the same for gRPC and REST.
    for _ in 0..2 {
        assert_eq!(
            rt.block_on(grpc_latest(&api.url, None, "NOPE")).code(),
            tonic::Code::NotFound
        );
    }
    assert_eq!(
        rt.block_on(grpc_latest(&api.url, None, "NOPE")).code(),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(latest("").status, 429);

    // Streams: one open per hour per client; the open SSE stream is the peer's one.
    let stream = EventStream::open(http, "/v1/ticks/stream");
    assert_eq!(stream.status, 200);
    let p = assert_problem(http, "/v1/ticks/stream", 429, None);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("--rate-limit-streams"),
        "{p}"
    );

    // Counted by class and outcome, and as rejections of the method; no client id in any label.
    let count = |filter: &str| api.metric("tickfleet_api_rate_limit_total", filter);
    assert_eq!(count("class=\"reads\",outcome=\"limited\""), 5.0);
    assert_eq!(count("class=\"reads\",outcome=\"allowed\""), 7.0);
    assert_eq!(count("class=\"streams\",outcome=\"limited\""), 1.0);
    assert_eq!(count("class=\"streams\",outcome=\"allowed\""), 1.0);
    assert_eq!(
        count("class=\"ranges\""),
        0.0,
        "an unlimited class is not counted"
    );
    assert_eq!(
        api.metric(
            "tickfleet_api_rejected_total",
            "limit=\"rate\",method=\"GetLatest\""
        ),
        5.0
    );
    let metrics = tickfleet_e2e::http_get(&api.admin, "/metrics").unwrap();
    assert!(
        !metrics.contains("\"a\"") && !metrics.contains("127.0.0.1"),
        "client ids in labels"
    );
    drop(stream);
    assert!(api.log_text().lines().all(|l| !l.contains("panicked")));
}

fn get_with_key(addr: &str, path: &str, key: &str) -> tickfleet_e2e::http::Reply {
    tickfleet_e2e::http::get_with(addr, path, &[("x-api-key", key)])
}

//! CI's smoke run of `tickctl bench`: the benchmark works end to end on a small backlog (20k ticks) in a
//! topic of its own on the run's Apache Kafka. The figures it prints are not checked — speed is measured
//! by `scripts/bench.sh`, not asserted in tests.

use tickfleet_e2e::{Api, redis_url, shared_kafka, tickctl, unique};

#[test]
fn bench_ingest_and_consume_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = shared_kafka();
    let topic = unique("bench");
    tickfleet_e2e::create_topic(&bootstrap, &[], &topic, 16, None);
    let out = dir.path().join("ingest.json");
    let redis = redis_url();
    let (ok, stdout) = tickctl(&[
        "bench",
        "ingest",
        "--brokers",
        &bootstrap,
        "--topic",
        &topic,
        "--redis",
        &redis,
        "--ticks",
        "20000",
        "--assets",
        "20",
        "--workers",
        "1,2",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}");
    let runs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for (run, workers) in runs.iter().zip([1, 2]) {
        assert_eq!(run["workers"], workers);
        assert_eq!(
            run["ticks"], 20_000,
            "every produced tick was stored and committed: {run}"
        );
        assert!(run["peak_rss_mib"].as_f64().unwrap() > 0.0, "{run}");
    }

    // The api under load, over what the first run stored.
    let api = Api::start(runs[0]["prefix"].as_str().unwrap(), dir.path(), 0);
    let load = dir.path().join("api.json");
    for method in ["latest", "ticks"] {
        let (ok, stdout) = tickctl(&[
            "bench",
            "api",
            "--api",
            &api.url,
            "--method",
            method,
            "--clients",
            "2",
            "--seconds",
            "1",
            "--json",
            load.to_str().unwrap(),
        ]);
        assert!(ok, "{stdout}");
        let result: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&load).unwrap()).unwrap();
        assert!(result["requests"].as_u64().unwrap() > 0, "{result}");
        assert_eq!(result["errors"], 0, "{result}");
    }

    // A worker that cannot start fails the run at once instead of hanging it.
    let (ok, _) = tickctl(&[
        "bench",
        "ingest",
        "--brokers",
        &bootstrap,
        "--topic",
        &topic,
        "--redis",
        &redis,
        "--skip-produce",
        "--workers",
        "1",
        "--worker-arg=--no-such-flag",
    ]);
    assert!(!ok, "a broken worker must fail the bench");

    let (ok, stdout) = tickctl(&[
        "bench",
        "consume",
        "--brokers",
        &bootstrap,
        "--topic",
        &topic,
    ]);
    assert!(ok);
    assert!(stdout.contains("raw consume: 20000 messages"), "{stdout}");
}

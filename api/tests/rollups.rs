//! Candles and window averages served from write-time rollups equal those computed from the raw ticks by
//! a plain reference, for every base interval and composed ones, over random streams with duplicates,
//! redelivered batches and late ticks — against `MemoryStore`, a real redis-server
//! (`TICKFLEET_TEST_REDIS_URL`) and a real Redis Cluster (`TICKFLEET_TEST_REDIS_CLUSTER_URLS`). The handlers are called directly (no transport: what is under test is
//! the arithmetic and the store reads).

use std::collections::BTreeMap;
use std::sync::Arc;

use rust_decimal::Decimal;
use tickfleet_api::{Api, ApiMetrics};
use tickfleet_proto::v1::tick_service_server::TickService;
use tickfleet_proto::v1::{
    GetCandlesRequest, GetMovingAverageRequest, get_moving_average_request::Over,
};
use tickfleet_service::CancellationToken;
use tickfleet_store::{
    MemoryStore, RedisMode, RedisSettings, RedisStore, Retention, Tick, TickStore,
};
use tonic::Request;

const T0: i64 = 1_700_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;

/// xorshift64*: a small seeded generator, so a failure names its seed and repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random stream of `asset`'s batches: ticks 0–3 s apart, 10% late (up to 3 days back), 5% repeated
/// inside their batch, 20% of batches a redelivery of an earlier one. Returns the batches and the
/// distinct ticks.
fn stream(asset: &str, seed: u64) -> (Vec<Vec<Tick>>, Vec<Tick>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut batches: Vec<Vec<Tick>> = Vec::new();
    let mut distinct = BTreeMap::new();
    let (mut now, mut seq) = (T0, 0);
    for _ in 0..30 {
        if !batches.is_empty() && rng.chance(20) {
            let again = batches[rng.below(batches.len() as u64) as usize].clone();
            batches.push(again);
            continue;
        }
        let mut batch = Vec::new();
        for _ in 0..1 + rng.below(50) {
            seq += 1;
            now += rng.below(3 * SEC as u64) as i64;
            let t = if rng.chance(10) {
                now - rng.below(3 * 86_400 * SEC as u64) as i64
            } else {
                now
            };
            let tick = Tick {
                asset_id: asset.into(),
                price: Decimal::new(1 + rng.below(500_000) as i64, rng.below(4) as u32),
                size: rng
                    .chance(70)
                    .then(|| Decimal::new(rng.below(10_000) as i64, rng.below(6) as u32)),
                event_time_ns: t,
                seq,
                source: "prop".into(),
            };
            distinct.insert(tick.id(), tick.clone());
            batch.push(tick);
            if rng.chance(5) {
                let i = rng.below(batch.len() as u64) as usize;
                batch.push(batch[i].clone());
            }
        }
        batches.push(batch);
    }
    (batches, distinct.into_values().collect())
}

/// The reference candle: `[start, open, high, low, close, volume, count]` as strings.
fn reference(ticks: &[Tick], interval: i64) -> Vec<[String; 7]> {
    let mut buckets: BTreeMap<i64, Vec<&Tick>> = BTreeMap::new();
    for t in ticks {
        buckets
            .entry(t.event_time_ns - t.event_time_ns.rem_euclid(interval))
            .or_default()
            .push(t);
    }
    buckets
        .into_iter()
        .map(|(start, mut ts)| {
            ts.sort_by_key(|t| t.id());
            let volume: Decimal = ts.iter().filter_map(|t| t.size).sum();
            [
                start.to_string(),
                ts[0].price.to_string(),
                ts.iter().map(|t| t.price).max().unwrap().to_string(),
                ts.iter().map(|t| t.price).min().unwrap().to_string(),
                ts[ts.len() - 1].price.to_string(),
                volume.to_string(),
                ts.len().to_string(),
            ]
        })
        .collect()
}

fn api(store: Arc<dyn TickStore>) -> Api {
    let registry = prometheus::Registry::new();
    Api::new(
        store,
        ApiMetrics::new(&registry).unwrap(),
        CancellationToken::new(),
    )
}

async fn candles_and_averages_equal_the_reference(
    store: Arc<dyn TickStore>,
    asset: &str,
    seed: u64,
) {
    let (batches, ticks) = stream(asset, seed);
    for b in &batches {
        store.write_batch(b).await.unwrap();
    }
    let api = api(store);
    for interval in [
        "1s", "5s", "90s", "1m", "15m", "1h", "4h", "1d", "7d", "250ms",
    ] {
        let ns = tickfleet_api::calc::parse_interval(interval).unwrap();
        let got: Vec<[String; 7]> = api
            .get_candles(Request::new(GetCandlesRequest {
                asset_id: asset.into(),
                interval: interval.into(),
                from_ns: None,
                to_ns: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .candles
            .into_iter()
            .map(|c| {
                [
                    c.start_ns.to_string(),
                    c.open,
                    c.high,
                    c.low,
                    c.close,
                    c.volume,
                    c.tick_count.to_string(),
                ]
            })
            .collect();
        assert_eq!(
            got,
            reference(&ticks, ns),
            "seed {seed}, interval {interval}"
        );
    }
    let newest = ticks.iter().map(|t| t.id()).max().unwrap().event_time_ns;
    for window in ["1s", "7s", "90s", "1h", "36h", "3d"] {
        let w = tickfleet_api::calc::parse_interval(window).unwrap();
        let inside: Vec<Tick> = ticks
            .iter()
            .filter(|t| t.event_time_ns > newest - w)
            .cloned()
            .collect();
        let want = tickfleet_api::calc::average(&inside).unwrap().unwrap();
        let got = api
            .get_moving_average(Request::new(GetMovingAverageRequest {
                asset_id: asset.into(),
                over: Some(Over::Window(window.into())),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (got.sma, got.vwap, got.count, got.from_ns, got.to_ns),
            (
                want.sma.to_string(),
                want.vwap.map(|v| v.to_string()),
                want.count,
                want.from_ns,
                want.to_ns
            ),
            "seed {seed}, window {window}"
        );
    }
}

#[tokio::test]
async fn memory_rollup_candles_equal_candles_of_the_raw_ticks() {
    for seed in 1..=8 {
        let store = Arc::new(MemoryStore::new());
        candles_and_averages_equal_the_reference(store, "P", seed).await;
    }
}

#[tokio::test]
async fn redis_rollup_candles_equal_candles_of_the_raw_ticks() {
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").expect(
        "TICKFLEET_TEST_REDIS_URL is not set: run scripts/test.sh, which starts redis-server and sets it",
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for seed in 1..=8 {
        let prefix = format!("rollups-{}-{seed}-{nanos}", std::process::id());
        let store = Arc::new(RedisStore::open(&url, &prefix, Retention::default()).unwrap());
        candles_and_averages_equal_the_reference(store, "P", seed).await;
    }
}

#[tokio::test]
async fn cluster_rollup_candles_equal_candles_of_the_raw_ticks() {
    let urls = std::env::var("TICKFLEET_TEST_REDIS_CLUSTER_URLS").expect(
        "TICKFLEET_TEST_REDIS_CLUSTER_URLS is not set: run scripts/test.sh, which starts a Redis Cluster \
         (scripts/redis-cluster.sh) and sets it",
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for seed in 1..=8 {
        let prefix = format!("rollups-{}-{seed}-{nanos}", std::process::id());
        let settings = RedisSettings {
            mode: RedisMode::Cluster,
            ..RedisSettings::default()
        };
        let store =
            Arc::new(RedisStore::connect(&urls, &prefix, Retention::default(), settings).unwrap());
        candles_and_averages_equal_the_reference(store, "P", seed).await;
    }
}

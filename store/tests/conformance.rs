//! One suite, four targets: every test here runs against [`MemoryStore`], against [`RedisStore`] on a
//! real `redis-server` (its URL in `TICKFLEET_TEST_REDIS_URL`), against [`RedisStore`] in cluster mode
//! on a real Redis Cluster of 3 primaries and 3 replicas (its seed URLs, comma-separated, in
//! `TICKFLEET_TEST_REDIS_CLUSTER_URLS`) and against [`PostgresStore`] on a real PostgreSQL (its URL in
//! `TICKFLEET_TEST_POSTGRES_URL`); `scripts/test.sh` starts them all. Each Redis test uses a key prefix
//! of its own and each PostgreSQL test a schema of its own, so tests can share one server.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rust_decimal::Decimal;
use tickfleet_store::{
    Base, Candle, LiveEvent, LiveFeed, MemoryStore, PostgresStore, RangeQuery, RedisMode,
    RedisSettings, RedisStore, Retention, RollupQuery, RollupRetention, Tick, TickId, TickStore,
};

fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "conformance-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn redis_store(retention: Retention) -> RedisStore {
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").expect(
        "TICKFLEET_TEST_REDIS_URL is not set: run scripts/test.sh, which starts redis-server and sets it",
    );
    RedisStore::open(&url, &unique_prefix(), retention).unwrap()
}

fn cluster_urls() -> String {
    std::env::var("TICKFLEET_TEST_REDIS_CLUSTER_URLS").expect(
        "TICKFLEET_TEST_REDIS_CLUSTER_URLS is not set: run scripts/test.sh, which starts a Redis Cluster \
         (scripts/redis-cluster.sh) and sets it",
    )
}

fn cluster_store(retention: Retention) -> RedisStore {
    let settings = RedisSettings {
        mode: RedisMode::Cluster,
        ..RedisSettings::default()
    };
    RedisStore::connect(&cluster_urls(), &unique_prefix(), retention, settings).unwrap()
}

fn postgres_url() -> String {
    std::env::var("TICKFLEET_TEST_POSTGRES_URL").expect(
        "TICKFLEET_TEST_POSTGRES_URL is not set: run scripts/test.sh, which starts PostgreSQL \
         (scripts/postgres.sh) and sets it",
    )
}

/// A store in a schema of its own (the prefix, as an identifier).
fn postgres_store(retention: Retention) -> PostgresStore {
    let schema = unique_prefix().replace('-', "_");
    PostgresStore::connect(&postgres_url(), &schema, retention).unwrap()
}

fn memory_store(retention: Retention) -> MemoryStore {
    MemoryStore::with_retention(retention)
}

const T0: i64 = 1_700_000_000_000_000_000;

fn tick(asset: &str, t: i64, seq: u64, price: &str) -> Tick {
    Tick {
        asset_id: asset.into(),
        price: Decimal::from_str(price).unwrap(),
        size: seq
            .is_multiple_of(2)
            .then(|| Decimal::from_str("0.001").unwrap()),
        event_time_ns: t,
        seq,
        source: "conformance".into(),
    }
}

/// `n` ticks of `asset`, 1 ms apart, seq 1..=n.
fn series(asset: &str, n: u64) -> Vec<Tick> {
    (1..=n)
        .map(|i| tick(asset, T0 + i as i64 * 1_000_000, i, &format!("100.{i:02}")))
        .collect()
}

async fn all(store: &impl TickStore, asset: &str) -> Vec<Tick> {
    let mut out = Vec::new();
    let mut q = RangeQuery::all(7);
    loop {
        let page = store.range(asset, &q).await.unwrap();
        out.extend(page.ticks);
        match page.next {
            Some(next) => q.after = Some(next),
            None => return out,
        }
    }
}

async fn stores_what_it_is_given_in_order(store: impl TickStore) {
    let mut batch = series("A", 20);
    batch.extend(series("B", 3));
    batch.reverse(); // arrival order must not matter for the stored order
    let s = store.write_batch(&batch).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (23, 0));
    assert_eq!(all(&store, "A").await, series("A", 20));
    assert_eq!(all(&store, "B").await, series("B", 3));
    assert_eq!(
        store.assets().await.unwrap(),
        vec!["A".to_string(), "B".to_string()]
    );
    // Prices come back exactly as written, scale included.
    let got = store.latest("A").await.unwrap().unwrap();
    assert_eq!(got.price.to_string(), "100.20");
    assert_eq!(got.size, Some(Decimal::from_str("0.001").unwrap()));
}

async fn a_redelivered_batch_changes_nothing(store: impl TickStore) {
    let batch = series("A", 10);
    store.write_batch(&batch[..6]).await.unwrap();
    store.write_batch(&batch[6..]).await.unwrap();
    let latest = store.latest("A").await.unwrap();
    // The first batch again, after a newer one: no new ticks, latest unchanged.
    let s = store.write_batch(&batch[..6]).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 6));
    let s = store.write_batch(&batch).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 10));
    assert_eq!(all(&store, "A").await, batch);
    assert_eq!(store.latest("A").await.unwrap(), latest);
    assert_eq!(latest.unwrap().seq, 10);
}

async fn latest_only_moves_forward(store: impl TickStore) {
    let newer = tick("A", T0 + 5_000, 5, "2");
    let older = tick("A", T0 + 1_000, 1, "1");
    let same_time_higher_seq = tick("A", T0 + 5_000, 6, "3");
    assert_eq!(store.latest("A").await.unwrap(), None);
    store
        .write_batch(std::slice::from_ref(&newer))
        .await
        .unwrap();
    store
        .write_batch(std::slice::from_ref(&older))
        .await
        .unwrap();
    assert_eq!(store.latest("A").await.unwrap(), Some(newer));
    store
        .write_batch(std::slice::from_ref(&same_time_higher_seq))
        .await
        .unwrap();
    assert_eq!(store.latest("A").await.unwrap(), Some(same_time_higher_seq));
}

async fn pages_cover_the_range_exactly_once(store: impl TickStore) {
    // Ticks crowded into the same microseconds, so page boundaries fall inside equal scores.
    let mut ticks = Vec::new();
    let mut seq = 0;
    for us in 0..5 {
        for ns in [0, 1, 999] {
            for _ in 0..3 {
                seq += 1;
                ticks.push(tick("A", T0 + us * 1_000 + ns, seq, "1.5"));
            }
        }
    }
    store.write_batch(&ticks).await.unwrap();
    for limit in [1, 2, 4, 9, 45, 100] {
        let mut got = Vec::new();
        let mut q = RangeQuery::all(limit);
        let mut pages = 0;
        loop {
            let page = store.range("A", &q).await.unwrap();
            assert!(page.ticks.len() <= limit);
            pages += 1;
            got.extend(page.ticks);
            match page.next {
                Some(next) => q.after = Some(next),
                None => break,
            }
        }
        assert_eq!(got, ticks, "limit {limit}");
        assert_eq!(pages, ticks.len().div_ceil(limit), "limit {limit}");
    }
}

async fn range_bounds_are_exact_to_the_nanosecond(store: impl TickStore) {
    let ticks: Vec<Tick> = (0..10)
        .map(|i| tick("A", T0 + i * 300, i as u64 + 1, "7"))
        .collect();
    store.write_batch(&ticks).await.unwrap();
    // [T0+600, T0+2100): ticks at 600, 900, ..., 1800 — bounds inside microseconds.
    let q = RangeQuery {
        from_ns: T0 + 600,
        to_ns: T0 + 2_100,
        limit: 100,
        after: None,
    };
    let page = store.range("A", &q).await.unwrap();
    assert_eq!(page.ticks, ticks[2..7].to_vec());
    assert_eq!(page.next, None);
    // Continuing after a cursor stays inside the bounds.
    let q = RangeQuery {
        after: Some(TickId {
            event_time_ns: T0 + 900,
            seq: 4,
        }),
        ..q
    };
    assert_eq!(
        store.range("A", &q).await.unwrap().ticks,
        ticks[4..7].to_vec()
    );
    let empty = RangeQuery {
        from_ns: T0 + 5,
        to_ns: T0 + 5,
        limit: 10,
        after: None,
    };
    assert!(store.range("A", &empty).await.unwrap().ticks.is_empty());
    assert!(
        store
            .range("nope", &RangeQuery::all(10))
            .await
            .unwrap()
            .ticks
            .is_empty()
    );
    assert_eq!(store.latest("nope").await.unwrap(), None);
    // A limit of 0 is served as 1, not as "everything".
    assert_eq!(
        store
            .range("A", &RangeQuery::all(0))
            .await
            .unwrap()
            .ticks
            .len(),
        1
    );
}

async fn retention_by_count(store: impl TickStore) {
    let ticks = series("A", 12);
    store.write_batch(&ticks[..8]).await.unwrap();
    store.write_batch(&ticks[8..]).await.unwrap();
    assert_eq!(all(&store, "A").await, ticks[7..].to_vec());
    assert_eq!(store.latest("A").await.unwrap().unwrap().seq, 12);
}

async fn retention_by_age(store: impl TickStore) {
    // series() is 1 ms apart; keep 3.5 ms back from the newest tick.
    let ticks = series("A", 10);
    store.write_batch(&ticks).await.unwrap();
    assert_eq!(all(&store, "A").await, ticks[6..].to_vec());
}

/// Issue 11's scenario at the store: retention of one day, 1000 ticks of now, then one tick dated 100
/// years ahead and one dated now + 2 days. Age counts back from the newest tick bounded by the writer's
/// clock, so neither erases the history (before, the far-future tick left only itself).
async fn far_future_tick_cannot_erase_history(store: impl TickStore) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let history: Vec<Tick> = (1..=1000)
        .map(|i| tick("BTC", now - (1000 - i as i64) * 1_000_000, i, "64250.1"))
        .collect();
    store.write_batch(&history).await.unwrap();
    let day = 86_400 * 1_000_000_000_i64;
    let far = tick("BTC", now + 36_500 * day, 1001, "1");
    store.write_batch(std::slice::from_ref(&far)).await.unwrap();
    let soon = tick("BTC", now + 2 * day, 1002, "64251");
    store
        .write_batch(std::slice::from_ref(&soon))
        .await
        .unwrap();
    let mut expect = history.clone();
    expect.extend([soon, far]);
    assert_eq!(all(&store, "BTC").await, expect);
    // Ticks older than the day before the clock still go.
    let old = tick("BTC", now - 2 * day, 1, "1");
    store.write_batch(std::slice::from_ref(&old)).await.unwrap();
    assert_eq!(all(&store, "BTC").await.len(), 1002);
}

async fn big_batches_with_overlaps_and_repeats_count_exactly(store: impl TickStore) {
    // More ticks of one asset than the Redis script handles per chunk, overlapping what is stored,
    // and with ticks repeated inside the batch.
    let ticks = series("A", 2500);
    let s = store.write_batch(&ticks[1000..1700]).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (700, 0));
    let mut batch = ticks.clone();
    batch.extend_from_slice(&ticks[..10]);
    let s = store.write_batch(&batch).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (1800, 710));
    assert_eq!(all(&store, "A").await, ticks);
    assert_eq!(store.latest("A").await.unwrap().unwrap().seq, 2500);
}

async fn ping_answers(store: impl TickStore) {
    store.ping().await.unwrap();
}

async fn tail_is_the_newest_ticks_in_order(store: impl TickStore) {
    let mut ticks = series("A", 30);
    // Two ticks in one microsecond, so rank order within equal scores matters.
    ticks.push(tick("A", T0 + 31_000_000, 31, "9"));
    ticks.push(tick("A", T0 + 31_000_500, 32, "9"));
    store.write_batch(&ticks).await.unwrap();
    assert_eq!(store.tail("A", 5).await.unwrap(), ticks[27..].to_vec());
    assert_eq!(store.tail("A", 1000).await.unwrap(), ticks);
    assert!(store.tail("A", 0).await.unwrap().is_empty());
    assert!(store.tail("nope", 3).await.unwrap().is_empty());
}

/// The next tick batch on `feed`, skipping nothing else (a gap here would be a failure).
async fn next_batch(feed: &mut LiveFeed) -> (String, Vec<Tick>) {
    match tokio::time::timeout(Duration::from_secs(10), feed.recv()).await {
        Ok(Some(LiveEvent::Ticks(b))) => (b.asset_id.clone(), b.ticks.clone()),
        other => panic!("expected a live batch, got {other:?}"),
    }
}

async fn the_live_feed_announces_each_new_tick_once(store: impl TickStore) {
    let mut feed = store.subscribe().await.unwrap();
    let mut other = store.subscribe().await.unwrap();
    let a = series("A", 6);
    let b = series("B", 2);
    let mut batch = a[..4].to_vec();
    batch.extend(b.clone());
    batch.reverse();
    store.write_batch(&batch).await.unwrap();
    // A redelivery of the same batch announces nothing; the next batch announces only its new ticks.
    store.write_batch(&batch).await.unwrap();
    store.write_batch(&a[2..]).await.unwrap();
    let mut got = vec![
        next_batch(&mut feed).await,
        next_batch(&mut feed).await,
        next_batch(&mut feed).await,
    ];
    got.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.len().cmp(&y.1.len()).reverse()));
    assert_eq!(
        got,
        vec![
            ("A".to_string(), a[..4].to_vec()),
            ("A".to_string(), a[4..].to_vec()),
            ("B".to_string(), b),
        ]
    );
    // Every feed gets every announcement.
    for _ in 0..3 {
        next_batch(&mut other).await;
    }
    // Nothing more was announced: a marker batch is the very next thing each feed sees.
    let marker = tick("Z", T0, 1, "1");
    store
        .write_batch(std::slice::from_ref(&marker))
        .await
        .unwrap();
    assert_eq!(next_batch(&mut feed).await, ("Z".to_string(), vec![marker]));
}

/// Every rollup candle of `base` the store holds for `asset`, in time order.
async fn rollups(store: &impl TickStore, asset: &str, base: Base) -> Vec<Candle> {
    let mut out = Vec::new();
    let mut q = RollupQuery {
        base,
        from_ns: 0,
        to_ns: i64::MAX,
        limit: 7,
    };
    loop {
        let page = store.rollups(asset, &q).await.unwrap();
        out.extend(page.candles);
        match page.next {
            Some(next) => q.from_ns = next,
            None => return out,
        }
    }
}

/// The reference: candles of `base` from `ticks` (each once), the plain way — group by bucket, sort by
/// id, first and last, max and min, sums. Shares no code with the stores' rollups.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    start_ns: i64,
    open: Decimal,
    close: Decimal,
    high: Decimal,
    low: Decimal,
    volume: Decimal,
    turnover: Decimal,
    price_sum: Decimal,
    count: u64,
}

fn reference(ticks: &[Tick], interval_ns: i64) -> Vec<Expected> {
    let mut buckets: std::collections::BTreeMap<i64, Vec<&Tick>> = Default::default();
    for t in ticks {
        let start = t.event_time_ns - t.event_time_ns.rem_euclid(interval_ns);
        buckets.entry(start).or_default().push(t);
    }
    buckets
        .into_iter()
        .map(|(start_ns, mut ts)| {
            ts.sort_by_key(|t| t.id());
            let sized = ts.iter().filter_map(|t| t.size.map(|s| (t.price, s)));
            Expected {
                start_ns,
                open: ts[0].price,
                close: ts[ts.len() - 1].price,
                high: ts.iter().map(|t| t.price).max().unwrap(),
                low: ts.iter().map(|t| t.price).min().unwrap(),
                volume: sized.clone().map(|(_, s)| s).sum(),
                turnover: sized.map(|(p, s)| p * s).sum(),
                price_sum: ts.iter().map(|t| t.price).sum(),
                count: ts.len() as u64,
            }
        })
        .collect()
}

fn observed(candles: &[Candle]) -> Vec<Expected> {
    candles
        .iter()
        .map(|c| Expected {
            start_ns: c.start_ns,
            open: c.open(),
            close: c.close(),
            high: c.high,
            low: c.low,
            volume: c.volume,
            turnover: c.turnover,
            price_sum: c.price_sum,
            count: c.count,
        })
        .collect()
}

/// The store's documented rules, as a model: a tick is new when it is not stored, not repeated in its
/// batch and above the horizon; count retention keeps the newest `keep` and moves the horizon up to the
/// newest it removed. Returns every tick ever accepted (what the rollups must hold).
struct Model {
    stored: std::collections::BTreeMap<TickId, Tick>,
    horizon: Option<TickId>,
    accepted: Vec<Tick>,
    keep: Option<usize>,
}

impl Model {
    fn write(&mut self, batch: &[Tick]) -> usize {
        let mut new = 0;
        for t in batch {
            if self.horizon.is_some_and(|h| t.id() <= h) || self.stored.contains_key(&t.id()) {
                continue;
            }
            self.stored.insert(t.id(), t.clone());
            self.accepted.push(t.clone());
            new += 1;
        }
        if let Some(keep) = self.keep {
            while self.stored.len() > keep {
                let (id, _) = self.stored.pop_first().unwrap();
                self.horizon = Some(self.horizon.map_or(id, |h| h.max(id)));
            }
        }
        new
    }
}

/// Random streams — duplicates inside batches, redelivered batches, late ticks (up to two days back),
/// count retention — and after every batch the rollups of every base equal the reference candles of
/// every tick the store accepted, whatever raw retention removed.
async fn rollups_equal_candles_of_every_accepted_tick(
    store: &impl TickStore,
    asset: &str,
    keep: Option<usize>,
    seed: u64,
) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = Model {
        stored: Default::default(),
        horizon: None,
        accepted: Vec::new(),
        keep,
    };
    let mut seq = 0;
    let mut now = T0;
    let mut sent: Vec<Vec<Tick>> = Vec::new();
    for round in 0..40 {
        let batch: Vec<Tick> = if round > 0 && rng.random_bool(0.2) {
            // A redelivery of an earlier batch.
            sent[rng.random_range(0..sent.len())].clone()
        } else {
            let n = rng.random_range(1..60);
            let mut b = Vec::new();
            for _ in 0..n {
                seq += 1;
                now += rng.random_range(0..3 * 1_000_000_000);
                let t = if rng.random_bool(0.1) {
                    now - rng.random_range(0..2 * 86_400 * 1_000_000_000_i64)
                } else {
                    now
                };
                let price = format!("{}.{}", rng.random_range(1..500), rng.random_range(0..1000));
                let mut tick = tick(asset, t, seq, &price);
                tick.size = rng
                    .random_bool(0.7)
                    .then(|| Decimal::new(rng.random_range(0..10_000), rng.random_range(0..6)));
                b.push(tick);
                if rng.random_bool(0.05) {
                    b.push(b[rng.random_range(0..b.len())].clone());
                }
            }
            b
        };
        let expect_new = model.write(&batch);
        let s = store.write_batch(&batch).await.unwrap();
        assert_eq!(s.inserted, expect_new, "round {round}: new ticks");
        assert_eq!(s.duplicates, batch.len() - expect_new, "round {round}");
        sent.push(batch);
        if round % 8 == 7 || round == 39 {
            let raw: Vec<Tick> = model.stored.values().cloned().collect();
            assert_eq!(all(store, asset).await, raw, "round {round}: raw ticks");
            for base in Base::ALL {
                assert_eq!(
                    observed(&rollups(store, asset, base).await),
                    reference(&model.accepted, base.ns()),
                    "round {round}, base {}",
                    base.label()
                );
            }
        }
    }
    assert!(model.accepted.len() > 100, "the stream was not trivial");
    if keep.is_some() {
        assert!(model.horizon.is_some(), "retention removed nothing");
    }
}

async fn rollups_match_raw_ticks(store: impl TickStore) {
    for seed in 1..=3 {
        rollups_equal_candles_of_every_accepted_tick(&store, &format!("R{seed}"), None, seed).await;
    }
}

async fn rollups_match_raw_ticks_under_count_retention(store: impl TickStore) {
    for seed in 11..=13 {
        rollups_equal_candles_of_every_accepted_tick(&store, &format!("R{seed}"), Some(50), seed)
            .await;
    }
}

async fn every_base(store: &impl TickStore, asset: &str) -> Vec<(Base, Vec<Candle>)> {
    let mut out = Vec::new();
    for base in Base::ALL {
        out.push((base, rollups(store, asset, base).await));
    }
    out
}

async fn a_redelivered_batch_changes_no_rollup(store: impl TickStore) {
    let batch = series("A", 50);
    store.write_batch(&batch).await.unwrap();
    let before = every_base(&store, "A").await;
    let version = store
        .rollups(
            "A",
            &RollupQuery {
                base: Base::Second,
                from_ns: 0,
                to_ns: i64::MAX,
                limit: 1,
            },
        )
        .await
        .unwrap()
        .version;
    for _ in 0..3 {
        let s = store.write_batch(&batch).await.unwrap();
        assert_eq!((s.inserted, s.duplicates), (0, 50));
    }
    assert_eq!(every_base(&store, "A").await, before);
    let again = store
        .rollups(
            "A",
            &RollupQuery {
                base: Base::Second,
                from_ns: 0,
                to_ns: i64::MAX,
                limit: 1,
            },
        )
        .await
        .unwrap()
        .version;
    assert_eq!(again, version, "a redelivery wrote nothing");
    let day = &before[3].1;
    assert_eq!((day.len(), day[0].count), (1, 50));
    assert_eq!(day[0].volume, Decimal::from_str("0.025").unwrap());
}

async fn a_late_tick_takes_its_place_by_event_time(store: impl TickStore) {
    let s = 1_000_000_000;
    store
        .write_batch(&[
            tick("A", T0 + 5 * s + 500, 2, "105"),
            tick("A", T0 + 5 * s + 900, 3, "107"),
        ])
        .await
        .unwrap();
    // Arrives after them, happened before them: it is the open, not the close.
    store
        .write_batch(&[tick("A", T0 + 5 * s + 100, 1, "99")])
        .await
        .unwrap();
    // And one for an hour earlier.
    store
        .write_batch(&[tick("A", T0 - 3600 * s, 4, "50")])
        .await
        .unwrap();
    let secs = rollups(&store, "A", Base::Second).await;
    assert_eq!(secs.len(), 2);
    let c = &secs[1];
    assert_eq!(
        (c.open(), c.close(), c.high, c.low, c.count),
        (
            Decimal::from(99),
            Decimal::from(107),
            Decimal::from(107),
            Decimal::from(99),
            3
        )
    );
    let day = rollups(&store, "A", Base::Day).await;
    let c = day.last().unwrap();
    assert_eq!(c.count, if day.len() == 1 { 4 } else { 3 });
    assert_eq!(day.iter().map(|c| c.count).sum::<u64>(), 4);
    let first_day = &day[0];
    assert_eq!(first_day.open(), Decimal::from(50));
}

async fn rollups_outlive_raw_retention(store: impl TickStore) {
    // series() is 1 ms apart; raw retention keeps 3.5 ms.
    let ticks = series("A", 10);
    store.write_batch(&ticks[..5]).await.unwrap();
    store.write_batch(&ticks[5..]).await.unwrap();
    assert_eq!(all(&store, "A").await, ticks[6..].to_vec());
    for base in Base::ALL {
        assert_eq!(
            observed(&rollups(&store, "A", base).await),
            reference(&ticks, base.ns()),
            "{}",
            base.label()
        );
    }
    // A redelivery of ticks retention removed is not counted again: they are at or below the horizon.
    let s = store.write_batch(&ticks).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (0, 10));
    assert_eq!(rollups(&store, "A", Base::Day).await[0].count, 10);
}

async fn rebuild_is_idempotent_and_keeps_what_retention_removed(store: impl TickStore) {
    let ticks = series("A", 10);
    store.write_batch(&ticks).await.unwrap();
    let before = every_base(&store, "A").await;
    let r = store.rebuild_rollups("A", 0, i64::MAX).await.unwrap();
    assert_eq!((r.days, r.busy.len()), (1, 0));
    assert_eq!(every_base(&store, "A").await, before);
    assert!(
        store
            .rebuild_rollups("nope", 0, i64::MAX)
            .await
            .unwrap()
            .days
            == 0
    );
}

/// `target!(module, constructor, test: retention, ...)`: the listed tests, run on the store the
/// constructor makes from the test's retention (default: keep everything).
macro_rules! target {
    ($module:ident, $store:ident, $($name:ident $(: $retention:expr)?),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    #[allow(unused_mut, unused_assignments)]
                    let mut retention = Retention::default();
                    $(retention = $retention;)?
                    super::$name($store(retention)).await;
                }
            )*
        }
    };
}

/// The suite on every target, plus the per-tick retention tests on the stores that trim per asset
/// (PostgreSQL drops whole day partitions instead: `postgres_retention_drops_whole_day_partitions`).
macro_rules! conformance {
    (every { $($name:ident $(: $retention:expr)?),* $(,)? } per_tick_retention { $($rname:ident : $rretention:expr),* $(,)? }) => {
        target!(memory, memory_store, $($name $(: $retention)?,)* $($rname: $rretention,)*);
        target!(redis, redis_store, $($name $(: $retention)?,)* $($rname: $rretention,)*);
        target!(cluster, cluster_store, $($name $(: $retention)?,)* $($rname: $rretention,)*);
        target!(postgres, postgres_store, $($name $(: $retention)?,)*);
    };
}

conformance! {
    every {
        stores_what_it_is_given_in_order,
        a_redelivered_batch_changes_nothing,
        latest_only_moves_forward,
        pages_cover_the_range_exactly_once,
        range_bounds_are_exact_to_the_nanosecond,
        far_future_tick_cannot_erase_history: Retention { max_age: Some(Duration::from_secs(86_400)), max_count: None },
        ping_answers,
        big_batches_with_overlaps_and_repeats_count_exactly,
        tail_is_the_newest_ticks_in_order,
        the_live_feed_announces_each_new_tick_once,
        rollups_match_raw_ticks,
        a_redelivered_batch_changes_no_rollup,
        a_late_tick_takes_its_place_by_event_time,
    }
    per_tick_retention {
        retention_by_count: Retention { max_count: Some(5), max_age: None },
        retention_by_age: Retention { max_age: Some(Duration::from_micros(3_500)), max_count: None },
        rollups_match_raw_ticks_under_count_retention: Retention { max_count: Some(50), max_age: None },
        rollups_outlive_raw_retention: Retention { max_age: Some(Duration::from_micros(3_500)), max_count: None },
        rebuild_is_idempotent_and_keeps_what_retention_removed: Retention { max_age: Some(Duration::from_micros(3_500)), max_count: None },
    }
}

/// A restarted Redis has forgotten the Lua scripts; the store must load them again, not fail.
#[tokio::test]
async fn redis_reloads_scripts_it_lost() {
    let store = redis_store(Retention::default());
    store.write_batch(&series("A", 2)).await.unwrap();
    let client = ::redis::Client::open(std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let s = store.write_batch(&series("A", 4)).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (2, 2));
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(all(&store, "A").await, series("A", 4));
}

/// A key of the wrong type (WRONGTYPE) and a key the user may not touch (NOPERM) are permanent
/// rejections, to be dead-lettered rather than retried; an unreachable Redis is retriable.
#[tokio::test]
async fn redis_rejections_are_permanent_and_outages_retriable() {
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap();
    let store = redis_store(Retention::default());
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SET")
        .arg(format!("{}:{{BAD}}:ticks", store.prefix()))
        .arg("not a sorted set")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = store.write_batch(&series("BAD", 3)).await.unwrap_err();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert_eq!(err.kind(), "rejected");
    // Another asset in the same batch does not change the verdict; alone it is stored.
    let mut mixed = series("BAD", 3);
    mixed.extend(series("GOOD", 3));
    assert!(!store.write_batch(&mixed).await.unwrap_err().is_retriable());
    store.write_batch(&series("GOOD", 3)).await.unwrap();

    // A user whose ACL allows only other keys.
    let user = format!("tf-noperm-{}", std::process::id());
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">pw")
        .arg("~elsewhere:*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let limited_url = url.replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let limited = RedisStore::open(&limited_url, store.prefix(), Retention::default()).unwrap();
    let err = limited.write_batch(&series("A", 2)).await.unwrap_err();
    let _: i64 = ::redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().to_lowercase().contains("noperm"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let down = RedisStore::open(
        &format!("redis://127.0.0.1:{port}"),
        "x",
        Retention::default(),
    )
    .unwrap();
    let err = down.write_batch(&series("A", 1)).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
}

/// A redis-server of this test's own on a free port (so killing its connections disturbs no other test).
struct OwnRedis {
    child: std::process::Child,
    url: String,
    _dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("tickfleet-own-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// When the live feed's pub/sub connection is cut, the store reconnects, tells its feeds there may be a
/// gap, and announces new ticks again.
#[tokio::test]
async fn redis_live_feed_reconnects_and_reports_the_gap() {
    let redis = OwnRedis::start();
    let store = RedisStore::open(&redis.url, "live", Retention::default()).unwrap();
    let mut feed = store.subscribe().await.unwrap();
    store.write_batch(&series("A", 2)).await.unwrap();
    assert_eq!(next_batch(&mut feed).await.1, series("A", 2));

    let client = ::redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the store's one pub/sub connection");
    match tokio::time::timeout(Duration::from_secs(10), feed.recv()).await {
        Ok(Some(LiveEvent::Gap { reason, .. })) => assert_eq!(reason, "reconnected"),
        other => panic!("expected a gap notice, got {other:?}"),
    }
    let more = series("A", 4);
    store.write_batch(&more).await.unwrap();
    assert_eq!(next_batch(&mut feed).await.1, more[2..].to_vec());
}

fn cluster_store_with(settings: RedisSettings) -> RedisStore {
    let settings = RedisSettings {
        mode: RedisMode::Cluster,
        ..settings
    };
    RedisStore::connect(
        &cluster_urls(),
        &unique_prefix(),
        Retention::default(),
        settings,
    )
    .unwrap()
}

/// Every primary of the test cluster, as `redis://` URLs.
async fn cluster_primaries() -> Vec<String> {
    primaries_with_slots()
        .await
        .into_iter()
        .map(|p| format!("redis://{}", p.addr))
        .collect()
}

/// Promoted replicas and restarted nodes have no scripts: after `SCRIPT FLUSH` on every primary the
/// cluster store loads them again and loses nothing.
#[tokio::test]
async fn cluster_reloads_scripts_it_lost() {
    let store = cluster_store(Retention::default());
    let assets: Vec<String> = (0..20).map(|i| format!("S{i}")).collect();
    let batch = |n| assets.iter().flat_map(|a| series(a, n)).collect::<Vec<_>>();
    store.write_batch(&batch(2)).await.unwrap();
    let primaries = cluster_primaries().await;
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    for url in &primaries {
        let client = ::redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let s = store.write_batch(&batch(4)).await.unwrap();
    assert_eq!((s.inserted, s.duplicates), (40, 40));
    for a in &assets {
        assert_eq!(all(&store, a).await, series(a, 4));
    }
    assert_eq!(store.assets().await.unwrap().len(), 20);
}

/// With `min_replica_acks` the write waits for replicas: 1 (each primary of the test cluster has one)
/// succeeds; 2 cannot be met, so the write fails after the timeout, retriable, and says why.
#[tokio::test]
async fn cluster_writes_wait_for_replica_acks() {
    let one = cluster_store_with(RedisSettings {
        min_replica_acks: 1,
        replica_ack_timeout: Duration::from_secs(2),
        ..RedisSettings::default()
    });
    let batch: Vec<Tick> = (0..10).flat_map(|i| series(&format!("W{i}"), 3)).collect();
    let s = one.write_batch(&batch).await.unwrap();
    assert_eq!(s.inserted, 30);

    let two = cluster_store_with(RedisSettings {
        min_replica_acks: 2,
        replica_ack_timeout: Duration::from_millis(200),
        ..RedisSettings::default()
    });
    let err = two.write_batch(&series("W0", 4)).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert_eq!(err.kind(), "replication");
    assert!(err.to_string().contains("only 1 of 2"), "{err}");
    // The retry finds the ticks on the primary already; it must still wait, not count them as stored.
    let err = two.write_batch(&series("W0", 4)).await.unwrap_err();
    assert_eq!(err.kind(), "replication", "{err}");
}

/// A primary of the test cluster: id, `HOST:PORT`, slot ranges.
struct Primary {
    id: String,
    addr: String,
    ranges: Vec<(u32, u32)>,
}

/// One command on one node of the test cluster (not routed: `redis://ADDR`).
async fn on_node<T: ::redis::FromRedisValue>(addr: &str, cmd: &::redis::Cmd) -> T {
    let client = ::redis::Client::open(format!("redis://{addr}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"))
}

fn cmd(args: &[&str]) -> ::redis::Cmd {
    let mut c = ::redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// The primaries serving slots, from `CLUSTER SLOTS` (one entry per range: start, end, primary
/// `[host, port, id]`, replicas).
async fn primaries_with_slots() -> Vec<Primary> {
    let seed = cluster_urls()
        .split(',')
        .next()
        .unwrap()
        .replace("redis://", "");
    let reply: Vec<Vec<::redis::Value>> = on_node(&seed, &cmd(&["CLUSTER", "SLOTS"])).await;
    let ranges = reply.into_iter().map(|r| {
        let int = |v: &::redis::Value| -> u32 { ::redis::from_redis_value_ref(v).unwrap() };
        let node: Vec<::redis::Value> = ::redis::from_redis_value_ref(&r[2]).unwrap();
        let text = |v: &::redis::Value| -> String { ::redis::from_redis_value_ref(v).unwrap() };
        (
            int(&r[0]),
            int(&r[1]),
            (text(&node[0]), int(&node[1]), text(&node[2])),
        )
    });
    let mut primaries: Vec<Primary> = Vec::new();
    for (a, b, (host, port, id)) in ranges {
        match primaries.iter_mut().find(|p| p.id == id) {
            Some(p) => p.ranges.push((a, b)),
            None => primaries.push(Primary {
                id,
                addr: format!("{host}:{port}"),
                ranges: vec![(a, b)],
            }),
        }
    }
    primaries
}

/// How many `-TRYAGAIN` replies the node at `addr` has sent (`INFO errorstats`).
async fn tryagain_replies(addr: &str) -> u64 {
    let info: String = on_node(addr, &cmd(&["INFO", "errorstats"])).await;
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_TRYAGAIN:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A write to a slot that is moving to another primary (`-TRYAGAIN` while the slot's keys are split
/// between the two, then `-MOVED`) is held off until the move is done and then stores the batch once:
/// nothing lost, nothing doubled, all of it on the new owner. A call that gives up meanwhile fails
/// retriable (the worker retries it); the test retries likewise and counts the tries. The slot is left
/// with its new owner.
#[tokio::test]
async fn cluster_write_during_a_slot_migration_is_stored_once_after_it() {
    let store = cluster_store(Retention::default());
    let primaries = primaries_with_slots().await;
    assert_eq!(primaries.len(), 3);
    let owner = |slot: u32| {
        primaries
            .iter()
            .position(|p| p.ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap()
    };
    // An asset alone in its slot, so the move takes no other test's keys along.
    let mut found = None;
    for i in 0.. {
        let asset = format!("MIG{i}-{}", std::process::id());
        let slot: u32 = on_node(&primaries[0].addr, &cmd(&["CLUSTER", "KEYSLOT", &asset])).await;
        let from = owner(slot);
        let keys: u64 = on_node(
            &primaries[from].addr,
            &cmd(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]),
        )
        .await;
        if keys == 0 {
            found = Some((asset, slot, from));
            break;
        }
    }
    let (asset, slot, from) = found.unwrap();
    let (from, to) = (&primaries[from], &primaries[(from + 1) % 3]);
    let slot_arg = slot.to_string();
    store.write_batch(&series(&asset, 3)).await.unwrap();

    let _: () = on_node(
        &to.addr,
        &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from.id]),
    )
    .await;
    let _: () = on_node(
        &from.addr,
        &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to.id]),
    )
    .await;
    let refused_before = tryagain_replies(&from.addr).await;
    let writer = {
        let (store, asset) = (store.clone(), asset.clone());
        tokio::spawn(async move {
            let mut failures = 0;
            loop {
                match store.write_batch(&series(&asset, 6)).await {
                    Ok(s) => return (s, failures),
                    Err(e) if e.is_retriable() => failures += 1,
                    Err(e) => panic!("the write was refused: {e}"),
                }
            }
        })
    };
    // The write reached the migrating slot and was told to try again (its keys are all on the old
    // owner except the horizon, which no retention ever set: a script needs all its keys in one place).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tryagain_replies(&from.addr).await == refused_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached the migrating slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!writer.is_finished(), "stored while its slot was migrating");

    // Move the slot's keys and hand the slot over, as `redis-cli --cluster reshard` does.
    let keys: Vec<String> = on_node(
        &from.addr,
        &cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]),
    )
    .await;
    assert!(keys.len() >= 3, "{keys:?}");
    let (host, port) = to.addr.split_once(':').unwrap();
    let mut migrate = cmd(&["MIGRATE", host, port, "", "0", "10000", "KEYS"]);
    for k in &keys {
        migrate.arg(k);
    }
    let _: String = on_node(&from.addr, &migrate).await;
    let third = primaries.iter().find(|p| p.id != from.id && p.id != to.id);
    for p in [to, from].into_iter().chain(third) {
        let _: () = on_node(
            &p.addr,
            &cmd(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to.id]),
        )
        .await;
    }
    let moved = std::time::Instant::now();
    let (summary, failures) = writer.await.unwrap();
    eprintln!(
        "the write was stored {:?} after the slot moved ({failures} retriable failures before)",
        moved.elapsed()
    );
    if failures == 0 {
        // (A call that gave up may have been carried out after all: its retry then finds the ticks.)
        assert_eq!((summary.inserted, summary.duplicates), (3, 3));
    }
    assert_eq!(all(&store, &asset).await, series(&asset, 6));
    // All of it is on the new owner; a fresh client finds it there.
    let keys_now: u64 = on_node(&to.addr, &cmd(&["CLUSTER", "COUNTKEYSINSLOT", &slot_arg])).await;
    assert_eq!(keys_now, keys.len() as u64);
    let fresh = RedisStore::connect(
        &cluster_urls(),
        store.prefix(),
        Retention::default(),
        RedisSettings {
            mode: RedisMode::Cluster,
            ..RedisSettings::default()
        },
    )
    .unwrap();
    assert_eq!(all(&fresh, &asset).await, series(&asset, 6));
}

/// On one server without replicas, `WAIT 1` cannot be met: the write fails (retriable) instead of
/// counting as stored.
#[tokio::test]
async fn redis_writes_without_replicas_fail_when_acks_are_required() {
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap();
    let store = RedisStore::connect(
        &url,
        &unique_prefix(),
        Retention::default(),
        RedisSettings {
            min_replica_acks: 1,
            replica_ack_timeout: Duration::from_millis(100),
            ..RedisSettings::default()
        },
    )
    .unwrap();
    let err = store.write_batch(&series("A", 2)).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert_eq!(err.kind(), "replication");
    assert!(err.to_string().contains("only 0 of 1"), "{err}");
    // The retry finds the ticks stored already; it must still wait, not count them as stored.
    let err = store.write_batch(&series("A", 2)).await.unwrap_err();
    assert_eq!(err.kind(), "replication", "{err}");
}

/// Assets indexed by versions before the bucketed index (one `PREFIX:assets` set) are still listed.
#[tokio::test]
async fn redis_lists_assets_of_the_single_set_index_too() {
    let store = redis_store(Retention::default());
    store.write_batch(&series("NEW", 1)).await.unwrap();
    let client = ::redis::Client::open(std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = ::redis::cmd("SADD")
        .arg(format!("{}:assets", store.prefix()))
        .arg("OLD")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.assets().await.unwrap(), vec!["NEW", "OLD"]);
}

/// A store in cluster mode pointed at a server that is not in a cluster is unreachable (retriable, the
/// worker waits and says so), never a rejection of the ticks.
#[tokio::test]
async fn cluster_mode_against_a_standalone_server_is_retriable() {
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap();
    let store = RedisStore::connect(
        &url,
        "x",
        Retention::default(),
        RedisSettings {
            mode: RedisMode::Cluster,
            ..RedisSettings::default()
        },
    )
    .unwrap();
    let err = store.write_batch(&series("A", 1)).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(store.ping().await.is_err());
}

/// Rollup retention is its own: 1 s candles older than a day before the newest tick go, 1 d candles
/// stay; raw retention (none here) has nothing to do with it.
async fn rollup_retention_drops_only_old_candles(store: impl TickStore) {
    let day = 86_400 * 1_000_000_000_i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let old = tick("A", now - 3 * day, 1, "10");
    let recent = tick("A", now - 1_000_000_000, 2, "20");
    store.write_batch(std::slice::from_ref(&old)).await.unwrap();
    assert_eq!(rollups(&store, "A", Base::Second).await.len(), 1);
    store
        .write_batch(std::slice::from_ref(&recent))
        .await
        .unwrap();
    let secs = rollups(&store, "A", Base::Second).await;
    assert_eq!(secs.len(), 1, "the 3-day-old 1 s candle is gone");
    assert_eq!(secs[0].open(), Decimal::from(20));
    assert_eq!(
        rollups(&store, "A", Base::Day).await.len(),
        if Base::Day.bucket(old.event_time_ns) == Base::Day.bucket(recent.event_time_ns) {
            1
        } else {
            2
        }
    );
    assert_eq!(
        rollups(&store, "A", Base::Day)
            .await
            .iter()
            .map(|c| c.count)
            .sum::<u64>(),
        2
    );
    assert_eq!(
        all(&store, "A").await.len(),
        2,
        "raw ticks are not rollups' business"
    );
}

fn one_day_of_seconds() -> RollupRetention {
    RollupRetention::parse("1s=1d").unwrap()
}

#[tokio::test]
async fn memory_rollup_retention_drops_only_old_candles() {
    rollup_retention_drops_only_old_candles(
        memory_store(Retention::default()).with_rollup_retention(one_day_of_seconds()),
    )
    .await;
}

#[tokio::test]
async fn redis_rollup_retention_drops_only_old_candles() {
    rollup_retention_drops_only_old_candles(
        redis_store(Retention::default()).with_rollup_retention(one_day_of_seconds()),
    )
    .await;
}

#[tokio::test]
async fn cluster_rollup_retention_drops_only_old_candles() {
    rollup_retention_drops_only_old_candles(
        cluster_store(Retention::default()).with_rollup_retention(one_day_of_seconds()),
    )
    .await;
}

/// Data stored before rollups existed (here: its rollup keys deleted) gets them from `rebuild`, equal
/// to the reference, while a writer keeps storing ticks into the same day; a second rebuild changes
/// nothing.
#[tokio::test]
async fn redis_rebuild_recomputes_lost_rollups_while_a_writer_writes() {
    rebuild_recomputes_lost_rollups_while_a_writer_writes(redis_store(Retention::default())).await;
}

#[tokio::test]
async fn cluster_rebuild_recomputes_lost_rollups_while_a_writer_writes() {
    rebuild_recomputes_lost_rollups_while_a_writer_writes(cluster_store(Retention::default()))
        .await;
}

/// Deletes `keys` (of one slot) through a plain client of the store's server or cluster.
async fn delete(store: &RedisStore, keys: Vec<String>) {
    let mut del = ::redis::cmd("DEL");
    del.arg(keys);
    if store.mode() == RedisMode::Cluster {
        let seeds: Vec<String> = cluster_urls().split(',').map(str::to_owned).collect();
        let client = ::redis::cluster::ClusterClient::new(seeds).unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        let _: () = del.query_async(&mut conn).await.unwrap();
    } else {
        let url = std::env::var("TICKFLEET_TEST_REDIS_URL").unwrap();
        let client = ::redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = del.query_async(&mut conn).await.unwrap();
    }
}

async fn rebuild_recomputes_lost_rollups_while_a_writer_writes(store: RedisStore) {
    let s = 1_000_000_000;
    let history: Vec<Tick> = (1..=3000)
        .map(|i| tick("A", T0 + i * s / 10, i as u64, &format!("100.{}", i % 97)))
        .collect();
    store.write_batch(&history).await.unwrap();
    let keys = Base::ALL
        .iter()
        .map(|base| format!("{}:{{A}}:rollup:{}", store.prefix(), base.label()))
        .collect();
    delete(&store, keys).await;
    assert!(rollups(&store, "A", Base::Day).await.is_empty());
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut more = Vec::new();
            for i in 0..200_i64 {
                let t = tick("A", T0 + 301 * s + i * s / 100, 5000 + i as u64, "101");
                store.write_batch(std::slice::from_ref(&t)).await.unwrap();
                more.push(t);
            }
            more
        })
    };
    let mut summary = store.rebuild_rollups("A", 0, i64::MAX).await.unwrap();
    let more = writer.await.unwrap();
    // A day that stayed busy throughout is reported, not written; once quiet, it rebuilds.
    if !summary.busy.is_empty() {
        summary = store.rebuild_rollups("A", 0, i64::MAX).await.unwrap();
    }
    assert!(summary.busy.is_empty(), "{summary:?}");
    let mut ticks = history.clone();
    ticks.extend(more);
    for base in Base::ALL {
        assert_eq!(
            observed(&rollups(&store, "A", base).await),
            reference(&ticks, base.ns()),
            "{}",
            base.label()
        );
    }
    let before = every_base(&store, "A").await;
    store.rebuild_rollups("A", 0, i64::MAX).await.unwrap();
    assert_eq!(every_base(&store, "A").await, before);
}

/// Two writers (their own key prefixes) start on a Redis that has not loaded the write script. Their
/// first pipelines run together: while one gets `NOSCRIPT` for its first assets, the other's `SCRIPT
/// LOAD` can land between the commands of its pipeline, so its later assets are written. Each write
/// must still report every tick as new exactly once — re-running the whole pipeline after the load
/// counted the assets already written as duplicates (a worker's `ticks_stored_total` fell short of
/// what it stored). Repeated on a flushed script cache, since the interleaving is up to the server.
#[tokio::test]
async fn writers_racing_a_script_load_count_every_tick_once() {
    let redis = OwnRedis::start();
    let client = ::redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // 40 assets of 50 ticks: a pipeline of several read buffers, so the server interleaves clients.
    let batch: Vec<Tick> = (0..40)
        .flat_map(|a| series(&format!("A{a:02}"), 50))
        .collect();
    for round in 0..12 {
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let writers: Vec<RedisStore> = (0..4)
            .map(|w| {
                RedisStore::open(
                    &redis.url,
                    &format!("race-{round}-{w}"),
                    Retention::default(),
                )
                .unwrap()
            })
            .collect();
        let writes = writers.iter().map(|s| s.write_batch(&batch));
        for (w, summary) in futures::future::join_all(writes)
            .await
            .into_iter()
            .enumerate()
        {
            let s = summary.unwrap();
            assert_eq!(
                (s.inserted, s.duplicates),
                (batch.len(), 0),
                "round {round}, writer {w}"
            );
        }
        for w in &writers {
            assert_eq!(all(w, "A17").await, series("A17", 50));
        }
    }
}

/// A plain client on the test PostgreSQL, for looking behind the store's back.
async fn postgres_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn postgres_named(schema: &str, retention: Retention) -> PostgresStore {
    PostgresStore::connect(&postgres_url(), schema, retention).unwrap()
}

async fn partitions(client: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = '{schema}.ticks'::regclass ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Retention in PostgreSQL drops whole day partitions: with 2 days kept, ticks of the last 2 days
/// stay, whole older days go (their partitions with them), and no row of a kept day is deleted.
#[tokio::test]
async fn postgres_retention_drops_whole_day_partitions() {
    let schema = unique_prefix().replace('-', "_");
    let day = 86_400 * 1_000_000_000_i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let today = now.div_euclid(day) * day;
    // One tick at the start of each of the last 6 UTC days, written oldest first without retention.
    let ticks: Vec<Tick> = (0..6)
        .map(|i| tick("A", today - (5 - i) * day + 1, i as u64 + 1, "1"))
        .collect();
    let keep_all = postgres_named(&schema, Retention::default());
    keep_all.write_batch(&ticks).await.unwrap();
    let client = postgres_client().await;
    assert_eq!(partitions(&client, &schema).await.len(), 6);
    // A writer keeping 2 days: its first write creates a partition (the next day) and sweeps.
    let two_days = postgres_named(
        &schema,
        Retention {
            max_age: Some(Duration::from_secs(2 * 86_400)),
            max_count: None,
        },
    );
    let next = tick("A", now + 1_000, 7, "2");
    two_days
        .write_batch(std::slice::from_ref(&next))
        .await
        .unwrap();
    // The cutoff is now - 2 days: the days that ended before it go, the one it falls in stays whole.
    let kept: Vec<Tick> = all(&two_days, "A").await;
    let cutoff = now - 2 * day;
    assert!(
        kept.iter()
            .all(|t| t.event_time_ns.div_euclid(day) * day + day > cutoff)
    );
    let expect: Vec<Tick> = ticks
        .iter()
        .filter(|t| t.event_time_ns.div_euclid(day) * day + day > cutoff)
        .cloned()
        .chain([next])
        .collect();
    assert_eq!(kept, expect);
    assert_eq!(
        partitions(&client, &schema).await.len(),
        3,
        "today and the two days before"
    );
}

/// Writers starting at once on a new schema: the migration runs once, every day partition is created
/// once, and every tick is stored once.
#[tokio::test]
async fn postgres_writers_starting_together_migrate_once() {
    let schema = unique_prefix().replace('-', "_");
    let ticks: Vec<Tick> = (0..8)
        .flat_map(|d| series(&format!("D{d}"), 50))
        .map(|mut t| {
            t.event_time_ns += (t.asset_id[1..].parse::<i64>().unwrap()) * 86_400 * 1_000_000_000;
            t
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let store = postgres_named(&schema, Retention::default());
            let ticks = ticks.clone();
            tokio::spawn(async move { store.write_batch(&ticks).await.unwrap() })
        })
        .collect();
    let mut inserted = 0;
    for w in writers {
        inserted += w.await.unwrap().inserted;
    }
    assert_eq!(inserted, ticks.len(), "each tick new to exactly one writer");
    let client = postgres_client().await;
    let versions = client
        .query(
            &format!("SELECT version FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(partitions(&client, &schema).await.len(), 8);
}

/// A binary never writes to a schema a newer version migrated: it says so instead.
#[tokio::test]
async fn postgres_refuses_a_schema_newer_than_it_knows() {
    let schema = unique_prefix().replace('-', "_");
    postgres_named(&schema, Retention::default())
        .ping()
        .await
        .unwrap();
    let client = postgres_client().await;
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.schema_migrations (version, name) VALUES (999, 'future')"
            ),
            &[],
        )
        .await
        .unwrap();
    let err = postgres_named(&schema, Retention::default())
        .ping()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this binary"), "{err}");
    assert!(!err.is_retriable());
}

/// A tick too big for one NOTIFY is stored and reported to live feeds as a gap; a killed listening
/// connection comes back with a gap notice, and the feed goes on.
#[tokio::test]
async fn postgres_live_feed_reports_oversized_ticks_and_reconnects() {
    let store = postgres_store(Retention::default());
    let mut feed = store.subscribe().await.unwrap();
    let mut big = tick("A", T0, 1, "1");
    big.source = "x".repeat(5_000);
    let small = tick("A", T0 + 1, 2, "2");
    store
        .write_batch(&[big.clone(), small.clone()])
        .await
        .unwrap();
    let mut got_small = false;
    let mut got_gap = false;
    while !(got_small && got_gap) {
        match tokio::time::timeout(Duration::from_secs(10), feed.recv()).await {
            Ok(Some(LiveEvent::Ticks(b))) => {
                assert_eq!(b.ticks, vec![small.clone()]);
                got_small = true;
            }
            Ok(Some(LiveEvent::Gap { missed, reason })) => {
                assert_eq!((missed, reason), (1, "oversized"));
                got_gap = true;
            }
            other => panic!("expected the small tick and a gap, got {other:?}"),
        }
    }
    assert_eq!(all(&store, "A").await, vec![big, small]);

    let client = postgres_client().await;
    let killed = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN %' \
             AND query LIKE $1",
            &[&format!("%{}_live%", store.schema())],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1, "the store's one listening connection");
    match tokio::time::timeout(Duration::from_secs(10), feed.recv()).await {
        Ok(Some(LiveEvent::Gap { reason, .. })) => assert_eq!(reason, "reconnected"),
        other => panic!("expected a gap notice, got {other:?}"),
    }
    let more = tick("A", T0 + 2, 3, "3");
    store
        .write_batch(std::slice::from_ref(&more))
        .await
        .unwrap();
    assert_eq!(next_batch(&mut feed).await.1, vec![more]);
}

//! [`JobStore`] semantics on [`MemoryJobs`] and on [`RedisJobs`] over a real `redis-server` (its URL in
//! `TICKFLEET_TEST_REDIS_URL`): jobs, leases with fencing tokens, fenced commits, pending ticks, the
//! quote cache's TTL and the raw responses kept.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tickfleet_store::jobs::{Commit, Lease, Observation, Pair, PollJob};
use tickfleet_store::{JobStore, MemoryJobs, RedisStore, Retention};

fn redis_jobs() -> impl JobStore {
    static N: AtomicU32 = AtomicU32::new(0);
    let url = std::env::var("TICKFLEET_TEST_REDIS_URL").expect(
        "TICKFLEET_TEST_REDIS_URL is not set: run scripts/test.sh, which starts redis-server and sets it",
    );
    let prefix = format!(
        "jobs-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    RedisStore::open(&url, &prefix, Retention::default())
        .unwrap()
        .jobs()
}

fn obs(price: &str, t: i64) -> Observation {
    Observation {
        price: price.parse::<Decimal>().unwrap(),
        provider_time_ns: t,
        event_time_ns: t,
        fetched_ns: t + 1,
        raw: format!(r#"{{"c":{price},"t":{t}}}"#),
    }
}

/// Polls `f` until it is `Some`, up to a generous deadline.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn jobs_crud(store: &dyn JobStore) {
    let job = |id: &str| PollJob {
        id: id.into(),
        provider: "finnhub".into(),
        symbols: vec!["AAPL".into(), "MSFT".into()],
        interval_ms: 1000,
        created_ns: 7,
    };
    assert_eq!(store.jobs().await.unwrap(), vec![]);
    store.create_job(&job("b")).await.unwrap();
    store.create_job(&job("a")).await.unwrap();
    assert_eq!(store.job("a").await.unwrap(), Some(job("a")));
    assert_eq!(store.job("zz").await.unwrap(), None);
    let ids: Vec<String> = store
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(store.delete_job("a").await.unwrap());
    assert!(!store.delete_job("a").await.unwrap());
    assert_eq!(store.jobs().await.unwrap(), vec![job("b")]);
}

async fn leases_are_exclusive_fenced_and_expire(store: &dyn JobStore) {
    let pair = Pair::new("finnhub", "AAPL");
    let ttl = Duration::from_millis(300);
    let t1 = store
        .acquire(&pair, "r1", ttl)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(store.acquire(&pair, "r2", ttl).await.unwrap(), None, "held");
    let r1 = Lease {
        holder: "r1".into(),
        token: t1,
    };
    assert_eq!(store.holder(&pair).await.unwrap(), Some(r1.clone()));
    assert!(store.renew(&pair, &r1, ttl).await.unwrap());
    // another pair is independent
    assert!(
        store
            .acquire(&Pair::new("finnhub", "MSFT"), "r2", ttl)
            .await
            .unwrap()
            .is_some()
    );

    // r1 stops renewing: r2 takes over once the TTL has passed, with a greater token
    let t2 = eventually("the lease to expire", || async {
        store.acquire(&pair, "r2", ttl).await.unwrap()
    })
    .await;
    assert!(t2 > t1, "fencing token {t2} after {t1}");
    let r2 = Lease {
        holder: "r2".into(),
        token: t2,
    };
    // the stale holder can neither renew nor write nor release
    assert!(!store.renew(&pair, &r1, ttl).await.unwrap());
    assert_eq!(
        store.commit(&pair, &r1, &obs("1", 10), ttl).await.unwrap(),
        Commit::Fenced
    );
    store.release(&pair, &r1).await.unwrap();
    assert_eq!(store.holder(&pair).await.unwrap(), Some(r2.clone()));
    // the same holder id with an old token is stale too
    let old = Lease {
        holder: "r2".into(),
        token: t1,
    };
    assert_eq!(
        store.commit(&pair, &old, &obs("1", 10), ttl).await.unwrap(),
        Commit::Fenced
    );
    assert_eq!(
        store.quote(&pair).await.unwrap(),
        None,
        "a fenced commit wrote nothing"
    );
    store.release(&pair, &r2).await.unwrap();
    assert_eq!(store.holder(&pair).await.unwrap(), None);
    let t3 = store.acquire(&pair, "r3", ttl).await.unwrap().unwrap();
    assert!(t3 > t2);
}

async fn commits_keep_raw_cache_quotes_and_record_new_prices(store: &dyn JobStore) {
    let pair = Pair::new("yahoo", "IBM");
    let ttl = Duration::from_secs(30);
    let token = store.acquire(&pair, "r1", ttl).await.unwrap().unwrap();
    let lease = Lease {
        holder: "r1".into(),
        token,
    };
    let Commit::New(first) = store
        .commit(&pair, &lease, &obs("100.50", 1000), ttl)
        .await
        .unwrap()
    else {
        panic!("the first price is new");
    };
    assert_eq!(first.tick.seq, 1);
    assert_eq!(first.tick.price.to_string(), "100.5");
    assert_eq!(first.tick.asset_id, "IBM");
    assert_eq!(first.tick.source, "yahoo");
    assert_eq!(first.tick.event_time_ns, 1000);
    assert_eq!(store.pending(&pair).await.unwrap(), Some(first.clone()));
    assert_eq!(
        store.raw(&pair, &first.raw_id).await.unwrap().as_deref(),
        Some(r#"{"c":100.50,"t":1000}"#),
        "the raw response, byte for byte"
    );
    assert_eq!(store.raw(&pair, "not-an-id").await.unwrap(), None);
    assert_eq!(store.raw(&pair, "1-999999").await.unwrap(), None);
    let q = store.quote(&pair).await.unwrap().unwrap();
    assert_eq!(
        (q.price.to_string(), q.time_ns, q.fetched_ns),
        ("100.5".into(), 1000, 1001)
    );
    assert_eq!(q.raw_id, first.raw_id);

    // the same price again (written differently): kept and cached, not new
    let Commit::Unchanged { raw_id } = store
        .commit(&pair, &lease, &obs("100.500", 1000), ttl)
        .await
        .unwrap()
    else {
        panic!("an unchanged price is not new");
    };
    assert_ne!(raw_id, first.raw_id);
    assert_eq!(store.quote(&pair).await.unwrap().unwrap().raw_id, raw_id);
    assert_eq!(store.pending(&pair).await.unwrap(), Some(first.clone()));
    assert!(store.produced(&pair, &lease, 1).await.unwrap());
    assert_eq!(store.pending(&pair).await.unwrap(), None);

    // a new price gets the next seq, also after a takeover (the counter is the pair's, not the holder's)
    store.release(&pair, &lease).await.unwrap();
    let token = store.acquire(&pair, "r2", ttl).await.unwrap().unwrap();
    let r2 = Lease {
        holder: "r2".into(),
        token,
    };
    let Commit::New(second) = store
        .commit(&pair, &r2, &obs("101", 2000), ttl)
        .await
        .unwrap()
    else {
        panic!("a new price");
    };
    assert_eq!(second.tick.seq, 2);
    // a fenced-off holder cannot mark it produced: it stays pending for the next holder
    assert!(!store.produced(&pair, &lease, 2).await.unwrap());
    assert_eq!(store.pending(&pair).await.unwrap(), Some(second));

    // the cache expires
    let short = Pair::new("yahoo", "SHORT");
    let token = store.acquire(&short, "r1", ttl).await.unwrap().unwrap();
    let lease = Lease {
        holder: "r1".into(),
        token,
    };
    store
        .commit(&short, &lease, &obs("5", 1), Duration::from_millis(50))
        .await
        .unwrap();
    eventually("the cached quote to expire", || async {
        store.quote(&short).await.unwrap().is_none().then_some(())
    })
    .await;
}

mod memory {
    use super::*;
    #[tokio::test]
    async fn jobs_crud() {
        super::jobs_crud(&MemoryJobs::new()).await;
    }
    #[tokio::test]
    async fn leases_are_exclusive_fenced_and_expire() {
        super::leases_are_exclusive_fenced_and_expire(&MemoryJobs::new()).await;
    }
    #[tokio::test]
    async fn commits_keep_raw_cache_quotes_and_record_new_prices() {
        super::commits_keep_raw_cache_quotes_and_record_new_prices(&MemoryJobs::new()).await;
    }
}

mod redis {
    use super::*;
    #[tokio::test]
    async fn jobs_crud() {
        super::jobs_crud(&redis_jobs()).await;
    }
    #[tokio::test]
    async fn leases_are_exclusive_fenced_and_expire() {
        super::leases_are_exclusive_fenced_and_expire(&redis_jobs()).await;
    }
    #[tokio::test]
    async fn commits_keep_raw_cache_quotes_and_record_new_prices() {
        super::commits_keep_raw_cache_quotes_and_record_new_prices(&redis_jobs()).await;
    }
}

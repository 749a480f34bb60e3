//! [`TieredStore`]: Redis for the hot window and live streams, PostgreSQL for history (`--store both`).

use async_trait::async_trait;

use crate::live::LiveFeed;
use crate::{
    PostgresStore, RangeQuery, RebuildSummary, RedisStore, RollupPage, RollupQuery, StoreError,
    Tick, TickPage, TickStore, WriteSummary,
};

/// Writes every batch to both stores and reads each query from the one that can answer it.
///
/// * **Writes:** Redis, then PostgreSQL; `Ok` only when both stored the batch, so a worker commits an
///   offset only once the ticks are in both. A failure of either is the batch's failure and the batch
///   is written again: both stores are idempotent, so the store that had it already changes nothing.
///   The summary counts a tick as inserted when either store found it new (the larger count), so a
///   batch retried after a half-done write is still counted once.
/// * **Reads:** `latest`, `tail`, live feeds and candle rollups from Redis (the hot window has them,
///   fast; its pub/sub carries the streams; its rollups are kept at write time and outlive its raw
///   retention, and match the live feed's versions); `range` and `assets` from PostgreSQL, which keeps
///   history after Redis's retention has trimmed it.
#[derive(Debug, Clone)]
pub struct TieredStore {
    hot: RedisStore,
    history: PostgresStore,
}

impl TieredStore {
    /// Redis as the hot store, PostgreSQL as history.
    pub fn new(hot: RedisStore, history: PostgresStore) -> Self {
        TieredStore { hot, history }
    }
}

#[async_trait]
impl TickStore for TieredStore {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        let hot = self.hot.write_batch(ticks).await?;
        let history = self.history.write_batch(ticks).await?;
        let inserted = hot.inserted.max(history.inserted);
        Ok(WriteSummary {
            inserted,
            duplicates: ticks.len().saturating_sub(inserted),
        })
    }

    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        self.hot.latest(asset_id).await
    }

    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        self.history.range(asset_id, query).await
    }

    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        self.hot.tail(asset_id, n).await
    }

    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        self.history.assets().await
    }

    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        self.hot.subscribe().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.hot.ping().await?;
        self.history.ping().await
    }

    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError> {
        self.hot.rollups(asset_id, query).await
    }

    async fn rebuild_rollups(
        &self,
        asset_id: &str,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        self.hot.rebuild_rollups(asset_id, from_ns, to_ns).await
    }
}

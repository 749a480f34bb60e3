//! [`PostgresStore`]: ticks in PostgreSQL, for history that outlives Redis's hot window.
//!
//! Each pipeline's tables live in their own schema (the key prefix of the Redis store), created and
//! migrated by the binaries themselves ([`schema`]: versioned migrations in `migrations/`, recorded in
//! `schema_migrations`):
//!
//! | table | holds |
//! |---|---|
//! | `ticks` | one row per tick; partitioned by event time, one partition per UTC day (`ticks_YYYYMMDD`) |
//! | `latest` | per asset, the tick with the greatest (event time, seq); only moves forward |
//! | `tick_partitions` | the day partitions and their bounds |
//! | `schema_migrations` | the migrations applied, with when |
//!
//! Prices and sizes are `numeric` (exact, with the scale they were written with). A batch is one
//! statement (`write.sql`) in one round trip: the ticks go in with `INSERT … ON CONFLICT DO NOTHING` on
//! the tick's identity (asset, event time, seq and the exact payload text), so a redelivered batch adds
//! nothing; `latest` moves only forward; the new ticks are announced with `NOTIFY` in the same
//! transaction (see [`live`]). A day's partition is created the first time this store writes into it
//! (one more round trip, once per day).
//!
//! **Candles** ([`TickStore::rollups`]) are computed from the ticks in SQL (`rollups.sql`: `numeric`
//! sums, open and close by tick id), so they cost a scan of the range's ticks rather than one read
//! per candle as in Redis, and they go with the partitions retention drops; there is nothing to
//! rebuild. Each asset's write version (for live candles) is kept in `latest`.
//!
//! **Retention drops whole partitions**, never rows: with a maximum age, a partition whose day ended
//! before `min(newest tick, now) - max_age` is dropped (checked when a partition is created and at most
//! once a minute). So ticks go at day granularity, up to a day later than in Redis; a count limit per
//! asset is not offered (it would mean deleting rows).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rust_decimal::Decimal;
use tokio_postgres::{Client, Row, Statement};
use tracing::warn;

use crate::live::LiveFeed;
use crate::rollup::Overflow;
use crate::{
    Candle, MAX_PAGE, RangeQuery, RebuildSummary, Retention, RollupPage, RollupQuery, StoreError,
    Tick, TickId, TickPage, TickStore, WriteSummary,
};

mod live;
pub mod schema;
pub(crate) mod tls;

const WRITE_SQL: &str = include_str!("write.sql");
const ROLLUPS_SQL: &str = include_str!("rollups.sql");
const DAY_NS: i64 = 86_400 * 1_000_000_000;
/// How often, at most, a writer checks retention besides when it creates a partition.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A tick's u64 sequence number as stored: the top bit flipped, so bigint order is u64 order.
fn seq_to_sql(seq: u64) -> i64 {
    (seq ^ (1 << 63)) as i64
}

fn seq_from_sql(seq: i64) -> u64 {
    (seq as u64) ^ (1 << 63)
}

/// A [`TickStore`] on PostgreSQL (see the [module docs](self)).
#[derive(Clone)]
pub struct PostgresStore {
    url: String,
    schema: String,
    retention: Retention,
    session: Arc<tokio::sync::Mutex<Option<Arc<Session>>>>,
    /// Day partitions (their `lo`) this store knows exist.
    partitions: Arc<Mutex<HashSet<i64>>>,
    last_sweep: Arc<Mutex<Option<Instant>>>,
    live: Arc<tokio::sync::Mutex<Option<crate::live::LiveHub>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the URL: it may carry a password.
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// One connection with its prepared statements.
struct Session {
    client: Client,
    write: Statement,
    range: Statement,
    tail: Statement,
    latest: Statement,
    rollups: Statement,
}

impl PostgresStore {
    /// A store on the PostgreSQL at `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DB`, or key=value
    /// form; TLS as its `sslmode` and `sslrootcert` say, see [`tls`]), in schema `schema` (created and migrated on first use). Lazy: no connection is made until
    /// the first call. Retention by count is refused (see the [module docs](self)).
    pub fn connect(url: &str, schema: &str, retention: Retention) -> Result<Self, StoreError> {
        if retention.max_count.is_some() {
            return Err(StoreError::Config(
                "the PostgreSQL store keeps ticks by age only (whole day partitions are dropped); \
                 a maximum count per asset is not supported"
                    .into(),
            ));
        }
        schema::check_name(schema)?;
        // The URL and its TLS settings (a CA file is read here too), checked before any connection.
        tls::parse(url)?;
        Ok(PostgresStore {
            url: url.to_owned(),
            schema: schema.to_owned(),
            retention,
            session: Arc::default(),
            partitions: Arc::default(),
            last_sweep: Arc::default(),
            live: Arc::default(),
        })
    }

    /// The schema this store's tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The channel the live feed listens on (NOTIFY channels are database-wide: one per schema).
    fn channel(&self) -> String {
        format!("{}_live", self.schema)
    }

    /// The live connection, (re)connecting and migrating when there is none or it broke.
    async fn session(&self) -> Result<Arc<Session>, StoreError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(s.clone());
        }
        *guard = None;
        let client = schema::connect(&self.url, &self.schema).await?;
        let session = Arc::new(Session {
            write: client.prepare(WRITE_SQL).await?,
            range: client
                .prepare(
                    "SELECT event_time_ns, seq, price::text, size::text, source FROM ticks \
                     WHERE asset = $1 AND event_time_ns >= $2 AND event_time_ns < $3 \
                       AND (event_time_ns, seq) > ($4, $5) \
                     ORDER BY event_time_ns, seq, identity LIMIT $6",
                )
                .await?,
            tail: client
                .prepare(
                    "SELECT event_time_ns, seq, price::text, size::text, source FROM ticks \
                     WHERE asset = $1 ORDER BY event_time_ns DESC, seq DESC, identity DESC LIMIT $2",
                )
                .await?,
            latest: client
                .prepare(
                    "SELECT event_time_ns, seq, price::text, size::text, source FROM latest \
                     WHERE asset = $1",
                )
                .await?,
            rollups: client.prepare(ROLLUPS_SQL).await?,
            client,
        });
        // A new connection may meet partitions dropped meanwhile: learn them again.
        self.partitions_lock().clear();
        *guard = Some(session.clone());
        Ok(session)
    }

    fn partitions_lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the day partitions `ticks` need that this store has not seen yet; true if any was new
    /// to the database.
    async fn ensure_partitions(&self, s: &Session, ticks: &[Tick]) -> Result<bool, StoreError> {
        let missing: Vec<i64> = {
            let known = self.partitions_lock();
            let days: std::collections::BTreeSet<i64> = ticks
                .iter()
                .map(|t| t.event_time_ns.max(0).div_euclid(DAY_NS) * DAY_NS)
                .collect();
            days.into_iter().filter(|lo| !known.contains(lo)).collect()
        };
        if missing.is_empty() {
            return Ok(false);
        }
        let his: Vec<i64> = missing.iter().map(|lo| lo.saturating_add(DAY_NS)).collect();
        let made: i32 = s
            .client
            .query_one("SELECT ensure_partitions($1, $2)", &[&missing, &his])
            .await?
            .get(0);
        self.partitions_lock().extend(missing);
        Ok(made > 0)
    }

    /// Drops the partitions retention no longer keeps (see the [module docs](self)).
    async fn sweep(&self, s: &Session, force: bool) -> Result<(), StoreError> {
        let Some(max_age) = self.retention.max_age else {
            return Ok(());
        };
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let now_ns = crate::clock_us().saturating_mul(1_000);
        let max_age_ns = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
        let dropped: i32 = s
            .client
            .query_one(
                "SELECT drop_partitions_before( \
                   least(coalesce((SELECT max(event_time_ns) FROM latest), $1), $1) - $2)",
                &[&now_ns, &max_age_ns],
            )
            .await?
            .get(0);
        if dropped > 0 {
            // Forget them all: the next write learns which still exist.
            self.partitions_lock().clear();
        }
        Ok(())
    }

    async fn write(&self, s: &Session, ticks: &[Tick]) -> Result<i64, StoreError> {
        let mut assets = Vec::with_capacity(ticks.len());
        let mut times = Vec::with_capacity(ticks.len());
        let mut seqs = Vec::with_capacity(ticks.len());
        let mut prices = Vec::with_capacity(ticks.len());
        let mut sizes = Vec::with_capacity(ticks.len());
        let mut sources = Vec::with_capacity(ticks.len());
        for t in ticks {
            assets.push(t.asset_id.as_str());
            times.push(t.event_time_ns.max(0));
            seqs.push(seq_to_sql(t.seq));
            prices.push(t.price.to_string());
            sizes.push(t.size.map(|s| s.to_string()));
            sources.push(t.source.as_str());
        }
        let channel = self.channel();
        let row = s
            .client
            .query_one(
                &s.write,
                &[&assets, &times, &seqs, &prices, &sizes, &sources, &channel],
            )
            .await?;
        Ok(row.get::<_, i64>(0))
    }
}

fn tick_of(asset_id: &str, row: &Row) -> Result<Tick, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        key: format!("ticks of {asset_id}"),
        detail,
    };
    let decimal = |text: &str| {
        text.parse::<Decimal>()
            .map_err(|e| corrupt(format!("{text:?}: {e}")))
    };
    let price: String = row.try_get(2)?;
    let size: Option<String> = row.try_get(3)?;
    Ok(Tick {
        asset_id: asset_id.to_owned(),
        event_time_ns: row.try_get(0)?,
        seq: seq_from_sql(row.try_get(1)?),
        price: decimal(&price)?,
        size: size.as_deref().map(decimal).transpose()?,
        source: row.try_get(4)?,
    })
}

#[async_trait]
impl TickStore for PostgresStore {
    async fn write_batch(&self, ticks: &[Tick]) -> Result<WriteSummary, StoreError> {
        if ticks.is_empty() {
            return Ok(WriteSummary::default());
        }
        let s = self.session().await?;
        let created = self.ensure_partitions(&s, ticks).await?;
        let inserted = match self.write(&s, ticks).await {
            // A partition this store knew of was dropped by retention elsewhere: learn again, once.
            Err(StoreError::Postgres(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) =>
            {
                warn!(error = %e, "a tick partition is missing; creating it again");
                self.partitions_lock().clear();
                self.ensure_partitions(&s, ticks).await?;
                self.write(&s, ticks).await?
            }
            other => other?,
        };
        // The batch is stored: a failed retention pass must not fail it (a retry would then count its
        // ticks as duplicates); the next write tries again.
        if let Err(e) = self.sweep(&s, created).await {
            warn!(error = %e, "dropping old tick partitions failed; the next write tries again");
            self.last_sweep
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        let inserted = usize::try_from(inserted).unwrap_or(0);
        Ok(WriteSummary {
            inserted,
            duplicates: ticks.len().saturating_sub(inserted),
        })
    }

    async fn latest(&self, asset_id: &str) -> Result<Option<Tick>, StoreError> {
        let s = self.session().await?;
        let row = s.client.query_opt(&s.latest, &[&asset_id]).await?;
        row.map(|r| tick_of(asset_id, &r)).transpose()
    }

    async fn range(&self, asset_id: &str, query: &RangeQuery) -> Result<TickPage, StoreError> {
        let s = self.session().await?;
        let limit = query.page_size();
        // (time, seq) > (from - 1, u64::MAX) is "from `from_ns` on" when there is no `after`.
        let (after_t, after_seq) = match query.after {
            Some(a) => (a.event_time_ns, seq_to_sql(a.seq)),
            None => (query.from_ns.saturating_sub(1), i64::MAX),
        };
        let rows = s
            .client
            .query(
                &s.range,
                &[
                    &asset_id,
                    &query.from_ns,
                    &query.to_ns,
                    &after_t,
                    &after_seq,
                    &(limit as i64 + 1),
                ],
            )
            .await?;
        let mut page = TickPage::default();
        for row in &rows {
            if page.ticks.len() == limit {
                page.next = page.ticks.last().map(Tick::id);
                break;
            }
            page.ticks.push(tick_of(asset_id, row)?);
        }
        Ok(page)
    }

    async fn tail(&self, asset_id: &str, n: usize) -> Result<Vec<Tick>, StoreError> {
        let s = self.session().await?;
        let rows = s
            .client
            .query(&s.tail, &[&asset_id, &(n.min(MAX_PAGE) as i64)])
            .await?;
        let mut out = rows
            .iter()
            .map(|r| tick_of(asset_id, r))
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    async fn assets(&self) -> Result<Vec<String>, StoreError> {
        let s = self.session().await?;
        let rows = s
            .client
            .query("SELECT asset FROM latest ORDER BY asset COLLATE \"C\"", &[])
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(StoreError::from))
            .collect()
    }

    async fn subscribe(&self) -> Result<LiveFeed, StoreError> {
        let (url, channel) = (self.url.clone(), self.channel());
        crate::live::subscribe(&self.live, "postgres", move || {
            live::listen(url.clone(), channel.clone())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let s = self.session().await?;
        s.client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn rollups(&self, asset_id: &str, query: &RollupQuery) -> Result<RollupPage, StoreError> {
        let s = self.session().await?;
        let width = query.base.ns();
        let limit = query.limit.clamp(1, MAX_PAGE);
        // One statement: the page and the asset's version, read in one snapshot.
        let rows = s
            .client
            .query(
                &s.rollups,
                &[
                    &asset_id,
                    &width,
                    &query.from_ns.max(0),
                    &query.to_ns.min(i64::MAX - width),
                    &(limit as i64 + 1),
                ],
            )
            .await?;
        let version = match rows.first() {
            Some(row) => row.try_get::<_, i64>(0)?,
            None => 0,
        };
        let mut page = RollupPage {
            version: u64::try_from(version).unwrap_or(0),
            ..RollupPage::default()
        };
        for row in &rows {
            // An empty page is one row with NULL candle columns.
            let Some(start) = row.try_get::<_, Option<i64>>(1)? else {
                continue;
            };
            if page.candles.len() == limit {
                page.next = Some(start);
                break;
            }
            page.candles.push(candle_of(asset_id, width, row)?);
        }
        Ok(page)
    }

    /// Nothing to rebuild: PostgreSQL's candles are computed from its ticks when they are read.
    async fn rebuild_rollups(
        &self,
        _asset_id: &str,
        _from_ns: i64,
        _to_ns: i64,
    ) -> Result<RebuildSummary, StoreError> {
        Ok(RebuildSummary::default())
    }
}

/// A candle from a row of `rollups.sql` (column 0 is the version). Sums beyond what a decimal holds (28 digits) are an
/// overflow, as in the stores that keep rollups.
fn candle_of(asset_id: &str, width: i64, row: &Row) -> Result<Candle, StoreError> {
    let decimal = |i: usize, what: &'static str| -> Result<Decimal, StoreError> {
        let text: String = row.try_get(i)?;
        text.parse::<Decimal>().map_err(|_| StoreError::Overflow {
            asset: asset_id.to_owned(),
            overflow: Overflow(what),
        })
    };
    let id = |t: usize, seq: usize| -> Result<TickId, StoreError> {
        Ok(TickId {
            event_time_ns: row.try_get(t)?,
            seq: seq_from_sql(row.try_get(seq)?),
        })
    };
    let start: i64 = row.try_get(1)?;
    let mut c = Candle::spanning(
        start,
        start.saturating_add(width),
        (id(2, 3)?, decimal(4, "open")?),
        (id(5, 6)?, decimal(7, "close")?),
    );
    c.high = decimal(8, "high")?;
    c.low = decimal(9, "low")?;
    c.volume = decimal(10, "candle volume")?;
    c.turnover = decimal(11, "sum of price × size")?;
    c.price_sum = decimal(12, "sum of prices")?;
    c.price_scale = u32::try_from(row.try_get::<_, i32>(13)?).unwrap_or(0);
    c.count = u64::try_from(row.try_get::<_, i64>(14)?).unwrap_or(0);
    Ok(c)
}

/// A PostgreSQL error with what the server said (tokio-postgres prints only "db error" for it).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Whether a PostgreSQL error can pass by itself: no server answer (I/O, a closed connection, a
/// timeout), or an answer whose SQLSTATE class means "not now" — connection exceptions (08),
/// transaction rollbacks such as serialization failures and deadlocks (40), insufficient resources
/// (53), operator intervention such as a shutting-down server (57), system errors (58), a lock not
/// available (55P03). Every other answer refuses the statement as sent.
pub(crate) fn postgres_error_is_retriable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            let code = code.code();
            matches!(&code[..2], "08" | "40" | "53" | "57" | "58") || code == "55P03"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_seq_orders_like_u64() {
        let seqs = [0, 1, (1 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX];
        for w in seqs.windows(2) {
            assert!(seq_to_sql(w[0]) < seq_to_sql(w[1]), "{w:?}");
        }
        for s in seqs {
            assert_eq!(seq_from_sql(seq_to_sql(s)), s);
        }
    }

    #[test]
    fn count_retention_is_refused_with_a_reason() {
        let err = PostgresStore::connect(
            "postgres://u@127.0.0.1/db",
            "tf",
            Retention {
                max_age: None,
                max_count: Some(5),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("by age only"), "{err}");
    }
}

//! Command-line and environment options choosing the store, shared by every tickfleet binary.

use std::sync::Arc;

use clap::Args;

use crate::{
    PostgresStore, RedisOptions, ReplicaAckOptions, Retention, RollupRetention, StoreError,
    TickStore, TieredStore,
};

/// Which store holds the ticks.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// Redis (one server or a cluster): the hot window and live streams.
    #[default]
    Redis,
    /// PostgreSQL alone: history in SQL.
    Postgres,
    /// Both: every batch in Redis and PostgreSQL before its offsets are committed (see
    /// [`TieredStore`]).
    Both,
}

/// The store: `--store redis|postgres|both` with each store's options. Flags and `TICKFLEET_*`
/// environment variables, the same in every binary.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreOptions {
    /// Where ticks are stored: redis, postgres, or both (Redis for the hot window and live streams,
    /// PostgreSQL for history).
    #[arg(long = "store", env = "TICKFLEET_STORE", value_enum, default_value_t = StoreKind::Redis)]
    pub kind: StoreKind,
    /// Redis (with --store redis or both).
    #[command(flatten)]
    pub redis: RedisOptions,
    /// PostgreSQL URL (with --store postgres or both): `postgres://USER[:PASSWORD]@HOST:PORT/DB`, TLS
    /// as libpq's `sslmode` (disable, prefer: the default, require, verify-ca, verify-full) and
    /// `sslrootcert` parameters say.
    #[arg(long, env = "TICKFLEET_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// CA certificate (PEM) for PostgreSQL's TLS: the URL's `sslrootcert` when the URL names none.
    /// TLS itself follows the URL's `sslmode` (`verify-full` to check the server's name too).
    #[arg(long, env = "TICKFLEET_POSTGRES_CA_FILE")]
    pub postgres_ca_file: Option<std::path::PathBuf>,
    /// PostgreSQL schema of the pipeline's tables (created and migrated by the binaries)
    /// [default: the Redis key prefix, with every character other than letters, digits and '_' as '_'].
    #[arg(long, env = "TICKFLEET_POSTGRES_SCHEMA")]
    pub postgres_schema: Option<String>,
    /// Drop PostgreSQL's day partitions whose ticks are all older than this many days (back from the
    /// newest tick, bounded by the clock); unset keeps all history. Redis's retention flags do not
    /// apply to PostgreSQL.
    #[arg(long, env = "TICKFLEET_POSTGRES_RETENTION_DAYS", value_parser = clap::value_parser!(u64).range(1..))]
    pub postgres_retention_days: Option<u64>,
}

impl StoreOptions {
    /// Opens the chosen store for reading (lazily: no connection is made until the first call).
    pub fn open(&self, retention: Retention) -> Result<Arc<dyn TickStore>, StoreError> {
        self.open_with_acks(
            retention,
            RollupRetention::default(),
            &ReplicaAckOptions::default(),
        )
    }

    /// [`open`](Self::open) for a writer: `retention`, `rollups` and `acks` apply to Redis.
    pub fn open_with_acks(
        &self,
        retention: Retention,
        rollups: RollupRetention,
        acks: &ReplicaAckOptions,
    ) -> Result<Arc<dyn TickStore>, StoreError> {
        let redis = || {
            Ok::<_, StoreError>(
                self.redis
                    .open_with_acks(retention, acks)?
                    .with_rollup_retention(rollups),
            )
        };
        Ok(match self.kind {
            StoreKind::Redis => Arc::new(redis()?),
            StoreKind::Postgres => Arc::new(self.postgres()?),
            StoreKind::Both => Arc::new(TieredStore::new(redis()?, self.postgres()?)),
        })
    }

    /// The polling jobs' store ([`crate::jobs`]): the Redis these options name, under their prefix;
    /// `None` with `--store postgres` (jobs, leases and quotes live in Redis only).
    pub fn open_jobs(&self) -> Result<Option<Arc<dyn crate::JobStore>>, StoreError> {
        Ok(match self.kind {
            StoreKind::Postgres => None,
            StoreKind::Redis | StoreKind::Both => {
                Some(Arc::new(self.redis.open(Retention::default())?.jobs()))
            }
        })
    }

    /// The PostgreSQL schema these options name.
    pub fn schema(&self) -> String {
        self.postgres_schema
            .clone()
            .unwrap_or_else(|| crate::postgres::schema::for_prefix(&self.redis.redis_prefix))
    }

    fn postgres(&self) -> Result<PostgresStore, StoreError> {
        let url = self.postgres_url.as_deref().ok_or_else(|| {
            StoreError::Config(format!(
                "--store {} needs --postgres-url (TICKFLEET_POSTGRES_URL)",
                match self.kind {
                    StoreKind::Both => "both",
                    _ => "postgres",
                }
            ))
        })?;
        let retention = Retention {
            max_age: self
                .postgres_retention_days
                .map(|d| std::time::Duration::from_secs(d.saturating_mul(86_400))),
            max_count: None,
        };
        match &self.postgres_ca_file {
            Some(ca) => {
                let url = crate::postgres::tls::with_root_cert(url, &ca.to_string_lossy())?;
                PostgresStore::connect(&url, &self.schema(), retention)
            }
            None => PostgresStore::connect(url, &self.schema(), retention),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreOptions,
    }

    #[tokio::test]
    async fn postgres_needs_its_url_and_the_schema_follows_the_prefix() {
        let cli =
            Cli::try_parse_from(["x", "--store", "postgres", "--redis-prefix", "e2e-1"]).unwrap();
        let Err(err) = cli.store.open(Retention::default()) else {
            panic!("--store postgres without a URL was accepted");
        };
        assert!(err.to_string().contains("--postgres-url"), "{err}");
        assert_eq!(cli.store.schema(), "e2e_1");
        let cli = Cli::try_parse_from([
            "x",
            "--store",
            "both",
            "--postgres-url",
            "postgres://u@127.0.0.1:1/db",
            "--postgres-schema",
            "hist",
        ])
        .unwrap();
        assert_eq!(cli.store.kind, StoreKind::Both);
        assert_eq!(cli.store.schema(), "hist");
        assert!(cli.store.open(Retention::default()).is_ok());
        assert!(Cli::try_parse_from(["x", "--store", "mongo"]).is_err());
    }
}

//! The PostgreSQL store's schema: versioned migrations, applied by the binaries on connect.
//!
//! Migrations are the files in `migrations/`, numbered, embedded in the binary and applied in order,
//! each in its own transaction with its row in `schema_migrations` (version, name, when). Processes
//! that connect at once serialize on an advisory lock, so each migration runs once. A database whose
//! schema is newer than this binary knows is refused (an older binary must not write to it).

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::StoreError;

/// Every migration, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "ticks", include_str!("migrations/0001_ticks.sql"))];

/// The schema of a pipeline whose key prefix is `prefix` (when none is named): the prefix with every
/// character other than letters, digits and `_` as `_` (`e2e-1` → `e2e_1`).
pub fn for_prefix(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Schema names are identifiers the store puts into SQL: letters, digits and `_`, not starting with a
/// digit, at most 50 bytes (so `NAME_live` is a valid channel name).
pub fn check_name(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= 50
        && !schema.starts_with(|c: char| c.is_ascii_digit())
        && schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "PostgreSQL schema {schema:?}: use 1 to 50 letters, digits or '_', not starting with a digit"
        )))
    }
}

/// How long a connection attempt may take when the URL does not say (`connect_timeout`): without a
/// bound, a server that drops packets holds a writer for the operating system's TCP timeout.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to `url` (TLS as its `sslmode` and `sslrootcert` say: [`super::tls`]), with
/// [`CONNECT_TIMEOUT`] unless the URL sets one; the caller drives the returned connection.
pub(crate) async fn open(
    url: &str,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<
            tokio_postgres::Socket,
            super::tls::RustlsStream<tokio_postgres::Socket>,
        >,
    ),
    StoreError,
> {
    let super::tls::Target { mut config, tls } = super::tls::parse(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config.connect(tls).await?)
}

/// Connects, sets the search path to `schema` and applies the migrations it lacks.
pub(crate) async fn connect(url: &str, schema: &str) -> Result<Client, StoreError> {
    let (mut client, connection) = open(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "PostgreSQL connection closed");
        }
    });
    // "already exists, skipping" notices of every reconnect are not worth a log line.
    client
        .batch_execute("SET client_min_messages TO warning")
        .await?;
    migrate(&mut client, schema).await?;
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await?;
    Ok(client)
}

/// Applies the migrations `schema` lacks; returns how many ran.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<usize, StoreError> {
    check_name(schema)?;
    // Session-level lock: held across the migrations' own transactions, released below.
    let lock_key = format!("tickfleet migrations {schema}");
    client
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
        .await?;
    let result = apply(client, schema).await;
    client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
        .await?;
    result
}

async fn apply(client: &mut Client, schema: &str) -> Result<usize, StoreError> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS \"{schema}\".schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let applied: Vec<i32> = client
        .query(
            &format!("SELECT version FROM \"{schema}\".schema_migrations ORDER BY version"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest_known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = applied.iter().find(|v| **v > newest_known) {
        return Err(StoreError::Config(format!(
            "PostgreSQL schema {schema:?} is at migration {newer}, newer than this binary knows \
             ({newest_known}): upgrade the binary"
        )));
    }
    let mut ran = 0;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL search_path TO \"{schema}\""))
            .await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        info!(schema, version, name, "PostgreSQL migration applied");
        ran += 1;
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["tf", "e2e_1", "T_x9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1tf", "tf-x", "a\"b", "tf;drop", &"x".repeat(51)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, (version, _, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i32 + 1);
        }
    }
}

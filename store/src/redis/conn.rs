//! How [`RedisStore`](super::RedisStore) reaches Redis: one server, or a Redis Cluster.
//!
//! The store hands this layer *parts*: pipelines whose commands all touch one hash slot (one asset's
//! keys, or one asset-index bucket). On one server every part of a call goes out in one pipeline, one
//! round trip. On a cluster each part is its own pipeline, routed by the client to the primary owning
//! its slot, all parts in flight at once; the cluster client follows `MOVED`/`ASK` redirections and
//! waits out `TRYAGAIN`/`CLUSTERDOWN` (slot migration, failover) with backoff before it gives up, and
//! what it gives up on is a retriable [`StoreError`] that the worker retries again.
//!
//! **Replica acknowledgements.** With `min_replica_acks > 0` a write call ends with `WAIT N timeout`
//! on the connection that carried the writes (once at the end of the one pipeline on one server; at the
//! end of each part on a cluster, so it waits on the very connection, to the very primary, that took
//! that part's writes — a reconnect in between fails the part instead of acknowledging a write the new
//! connection never made). Fewer than N acknowledgements is [`StoreError::Replication`], retriable.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};
use tokio::sync::OnceCell;

use super::RedisTls;
use crate::StoreError;

/// Which kind of Redis deployment the store talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RedisMode {
    /// One Redis server (or a primary behind one address).
    #[default]
    Standalone,
    /// A Redis Cluster (or a managed service that speaks its protocol), reached through seed nodes.
    Cluster,
}

/// A connection to one server or to a cluster. Cheap to clone (handles to shared connections).
#[derive(Clone)]
pub(super) enum Conn {
    Standalone(ConnectionManager),
    Cluster {
        client: Arc<ClusterClient>,
        conn: Arc<OnceCell<ClusterConnection>>,
    },
}

/// `WAIT` after writes: how many replicas must acknowledge, and for how long to wait.
#[derive(Debug, Clone, Copy)]
pub(super) struct Acks {
    pub replicas: u32,
    pub timeout: Duration,
}

impl Conn {
    /// A lazy connection to one server: nothing is connected until the first command.
    pub(super) fn standalone(client: Client) -> Result<Self, StoreError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        Ok(Conn::Standalone(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    /// A lazy connection to a cluster through `seeds`: the first command discovers the slot map.
    pub(super) fn cluster(seeds: &[String], tls: Option<&RedisTls>) -> Result<Self, StoreError> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.to_vec());
        if let Some(tls) = tls {
            // Every node the client discovers is reached with the same CA and client certificate.
            builder = builder.certs(tls.certificates());
        }
        let client = builder
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(10))
            // TRYAGAIN/CLUSTERDOWN (and a lost connection) are retried this many times, redirections
            // at once, before the error goes back to the caller, who retries the whole call. The wait
            // before retry r is random in [10 ms, min(10 ms * 2^r, 1 s)): all 8 within ~3.3 s, well
            // inside the response timeout. The minimum must be set: the client's default (1280 ms) is
            // above this maximum, which made every retry wait exactly 1.28 s — a write that met a
            // migrating slot was held 1.28 s after the slot had moved (3 runs of
            // `cluster_write_during_a_slot_migration_is_stored_once_after_it`: 1.26-1.28 s), and 8
            // such waits (10.24 s) outlasted the 10 s response timeout.
            .retries(8)
            .min_retry_wait(10)
            .max_retry_wait(1000)
            .build()?;
        Ok(Conn::Cluster {
            client: Arc::new(client),
            conn: Arc::default(),
        })
    }

    async fn cluster_conn(
        client: &ClusterClient,
        cell: &OnceCell<ClusterConnection>,
    ) -> Result<ClusterConnection, StoreError> {
        cell.get_or_try_init(|| client.get_async_connection())
            .await
            .cloned()
            .map_err(StoreError::Connect)
    }

    /// Runs one single-slot command (a read).
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        match self {
            Conn::Standalone(c) => Ok(cmd.query_async(&mut c.clone()).await?),
            Conn::Cluster { client, conn } => {
                let mut c = Self::cluster_conn(client, conn).await?;
                Ok(cmd.query_async(&mut c).await?)
            }
        }
    }

    /// Runs one single-slot pipeline as it is (a `MULTI`/`EXEC` one stays a transaction: a read of
    /// several keys of one asset at one moment).
    pub(super) async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        match self {
            Conn::Standalone(c) => Ok(pipe.query_async(&mut c.clone()).await?),
            Conn::Cluster { client, conn } => {
                let mut c = Self::cluster_conn(client, conn).await?;
                Ok(pipe.query_async(&mut c).await?)
            }
        }
    }

    /// Checks that the store answers: the server, or every primary of the cluster.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    /// Loads scripts on the server, or on every node of the cluster.
    pub(super) async fn load_scripts(&self, sources: &[&str]) -> Result<(), StoreError> {
        for src in sources {
            let _: Value = self
                .query(redis::cmd("SCRIPT").arg("LOAD").arg(*src))
                .await?;
        }
        Ok(())
    }

    /// Runs `parts` (each one slot's commands) and returns each part's outcome, in order: its
    /// replies, or the error one of its commands got. With `acks`, the writes must reach that many
    /// replicas (see the module docs); too few acknowledgements, or a failure of the call as a whole
    /// (connection, timeout), is the `Err` of the whole call.
    pub(super) async fn exec(
        &self,
        parts: &[Pipeline],
        acks: Option<Acks>,
    ) -> Result<Vec<Result<Vec<Value>, StoreError>>, StoreError> {
        match self {
            Conn::Standalone(c) => {
                let mut pipe = redis::pipe();
                // Each command answers on its own: one part's error must not hide the others' replies.
                pipe.ignore_errors();
                let mut counts = Vec::with_capacity(parts.len());
                for part in parts {
                    let mut n = 0;
                    for cmd in part.cmd_iter() {
                        pipe.add_command(cmd.clone());
                        n += 1;
                    }
                    counts.push(n);
                }
                add_wait(&mut pipe, acks);
                let mut replies: Vec<Value> = pipe.query_async(&mut c.clone()).await?;
                check_wait(&mut replies, acks)?;
                let mut replies = replies.into_iter();
                Ok(counts
                    .into_iter()
                    .map(|n| part_outcome(replies.by_ref().take(n).collect()))
                    .collect())
            }
            Conn::Cluster { client, conn } => {
                let c = Self::cluster_conn(client, conn).await?;
                let results = futures::future::join_all(parts.iter().map(|part| {
                    let mut c = c.clone();
                    async move {
                        let mut pipe = part.clone();
                        add_wait(&mut pipe, acks);
                        let mut replies: Vec<Value> = pipe.query_async(&mut c).await?;
                        check_wait(&mut replies, acks)?;
                        Ok::<_, StoreError>(replies)
                    }
                }))
                .await;
                Ok(results
                    .into_iter()
                    .map(|r| r.and_then(part_outcome))
                    .collect())
            }
        }
    }
}

/// A part's replies, or the first error among them.
fn part_outcome(replies: Vec<Value>) -> Result<Vec<Value>, StoreError> {
    for v in &replies {
        if let Value::ServerError(e) = v {
            return Err(StoreError::Redis(RedisError::from(e.clone())));
        }
    }
    Ok(replies)
}

/// The error a call with these part outcomes fails with, if any: a retriable one wins, so the caller
/// retries the whole call rather than treating the batch as refused (the parts that succeeded are
/// no-ops when written again).
pub(super) fn first_failure(
    outcomes: Vec<Result<Vec<Value>, StoreError>>,
) -> Result<Vec<Vec<Value>>, StoreError> {
    let mut refused = None;
    let mut out = Vec::with_capacity(outcomes.len());
    for r in outcomes {
        match r {
            Ok(replies) => out.push(replies),
            Err(e) if e.is_retriable() => return Err(e),
            Err(e) => {
                refused.get_or_insert(e);
            }
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn add_wait(pipe: &mut Pipeline, acks: Option<Acks>) {
    if let Some(a) = acks {
        pipe.cmd("WAIT").arg(a.replicas).arg(
            u64::try_from(a.timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
    }
}

/// Takes the `WAIT` reply off the end of `replies` and checks it.
fn check_wait(replies: &mut Vec<Value>, acks: Option<Acks>) -> Result<(), StoreError> {
    let Some(a) = acks else { return Ok(()) };
    let acked = match replies.pop() {
        Some(Value::Int(n)) => n,
        other => {
            return Err(StoreError::Corrupt {
                key: "WAIT".into(),
                detail: format!("unexpected reply {other:?}"),
            });
        }
    };
    if acked < i64::from(a.replicas) {
        return Err(StoreError::Replication {
            wanted: a.replicas,
            acked: acked.max(0) as u32,
            timeout: a.timeout,
        });
    }
    Ok(())
}

pub(super) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, r)| r.code() == "NOSCRIPT"))
}

pub(super) fn is_noscript_err(e: &StoreError) -> bool {
    matches!(e, StoreError::Redis(r) if is_noscript(r))
}

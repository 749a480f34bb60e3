//! Command-line and environment options for the Redis store, shared by every tickfleet binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{RedisMode, RedisSettings, RedisStore, RedisTls};
use crate::{Retention, StoreError};

/// Where the store is: mode, URL(s), key prefix and TLS files. Flags and `TICKFLEET_REDIS_*` environment
/// variables, the same in every binary.
#[derive(Args, Debug, Clone, Default)]
pub struct RedisOptions {
    /// Redis URL: `redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for TLS. In cluster mode, one or
    /// more comma-separated seed URLs of the cluster's nodes.
    #[arg(
        long,
        env = "TICKFLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// `standalone` (one server) or `cluster` (a Redis Cluster, reached through the seed URLs).
    #[arg(long, env = "TICKFLEET_REDIS_MODE", value_enum, default_value_t = RedisMode::Standalone)]
    pub redis_mode: RedisMode,
    /// Prefix of every Redis key, so pipelines can share a Redis (a pipeline's workers and api use the same).
    #[arg(long, env = "TICKFLEET_REDIS_PREFIX", default_value = "tf")]
    pub redis_prefix: String,
    /// PEM file of the CA that signed the Redis server's certificate (instead of the system's CAs).
    #[arg(long, env = "TICKFLEET_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate, for Redis servers that verify clients (with --redis-client-key-file).
    #[arg(
        long,
        env = "TICKFLEET_REDIS_CLIENT_CERT_FILE",
        requires = "redis_client_key_file"
    )]
    pub redis_client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(
        long,
        env = "TICKFLEET_REDIS_CLIENT_KEY_FILE",
        requires = "redis_client_cert_file"
    )]
    pub redis_client_key_file: Option<PathBuf>,
}

/// How many replicas must hold a batch before it counts as stored (the worker's flags).
#[derive(Args, Debug, Clone, Default)]
pub struct ReplicaAckOptions {
    /// After each batch, wait until this many replicas of each primary written to acknowledge it
    /// (`WAIT`) before the partition's offset may be committed; 0 = the primary's answer is enough.
    #[arg(long, env = "TICKFLEET_REDIS_MIN_REPLICA_ACKS", default_value_t = 0)]
    pub redis_min_replica_acks: u32,
    /// How long a batch waits for those acknowledgements; past it the write has failed (retried,
    /// readiness false).
    #[arg(long, env = "TICKFLEET_REDIS_REPLICA_ACK_TIMEOUT_MS", default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_replica_ack_timeout_ms: u64,
}

impl RedisOptions {
    /// Opens the store (lazily: no connection is made until the first command).
    pub fn open(&self, retention: Retention) -> Result<RedisStore, StoreError> {
        self.open_with_acks(retention, &ReplicaAckOptions::default())
    }

    /// [`open`](Self::open) for a writer that requires replica acknowledgements.
    pub fn open_with_acks(
        &self,
        retention: Retention,
        acks: &ReplicaAckOptions,
    ) -> Result<RedisStore, StoreError> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| StoreError::Config(format!("reading {}: {e}", p.display())))
        };
        let client = match (&self.redis_client_cert_file, &self.redis_client_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let ca_pem = self.redis_ca_file.as_ref().map(read).transpose()?;
        let tls = (ca_pem.is_some() || client.is_some()).then_some(RedisTls {
            ca_pem,
            client_cert_and_key: client,
        });
        let settings = RedisSettings {
            mode: self.redis_mode,
            tls,
            min_replica_acks: acks.redis_min_replica_acks,
            replica_ack_timeout: Duration::from_millis(acks.redis_replica_ack_timeout_ms),
        };
        RedisStore::connect(&self.redis_url, &self.redis_prefix, retention, settings)
    }
}

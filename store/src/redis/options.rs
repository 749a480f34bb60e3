//! Command-line and environment options for the Redis store, shared by every tickfleet binary.

use std::path::PathBuf;

use clap::Args;

use super::{RedisStore, RedisTls};
use crate::{Retention, StoreError};

/// Where the store is: URL, key prefix and TLS files. Flags and `TICKFLEET_REDIS_*` environment
/// variables, the same in every binary.
#[derive(Args, Debug, Clone, Default)]
pub struct RedisOptions {
    /// Redis URL: `redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for TLS.
    #[arg(
        long,
        env = "TICKFLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
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

impl RedisOptions {
    /// Opens the store (lazily: no connection is made until the first command).
    pub fn open(&self, retention: Retention) -> Result<RedisStore, StoreError> {
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
        RedisStore::open_tls(&self.redis_url, &self.redis_prefix, retention, tls)
    }
}

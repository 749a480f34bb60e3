//! Command-line and environment options for Redis TLS, shared by every tickfleet binary.

use std::path::PathBuf;

use clap::Args;

use super::{RedisStore, RedisTls};
use crate::{Retention, StoreError};

/// TLS files for `rediss://` URLs (all PEM). Flags and `TICKFLEET_REDIS_*` environment variables.
#[derive(Args, Debug, Clone, Default)]
pub struct RedisTlsOptions {
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

impl RedisTlsOptions {
    /// Opens the store at `url` with these TLS files (if any).
    pub fn open(
        &self,
        url: &str,
        prefix: &str,
        retention: Retention,
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
        RedisStore::open_tls(url, prefix, retention, tls)
    }
}

//! How every tickfleet Kafka client connects (feature `kafka`): the worker, `tickctl` and the
//! operator build their librdkafka configuration here, so a security setting means the same in
//! each of them.
//!
//! * [`KafkaConnection`]: bootstrap servers and security, with credentials already at hand (the
//!   operator reads them from a Secret); its `Debug` never shows the password.
//! * [`KafkaOptions`]: the same as `--brokers`/`--kafka-*` flags and `TICKFLEET_*` variables,
//!   plus extra librdkafka properties (`--kafka-option`), for the binaries.
//! * [`dead_letter_topic`]: the name of a topic's dead-letter topic, the worker's default and the
//!   topic the operator creates beside the pipeline's.

use std::fmt;

use clap::Args;
use rdkafka::ClientConfig;

/// The dead-letter topic of `topic`: `<topic>.dlq`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// How to reach a Kafka cluster: bootstrap servers and security, credentials included.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// `security.protocol`, librdkafka's default (plaintext) when `None`.
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`.
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub sasl_username: Option<String>,
    /// `sasl.password`.
    pub sasl_password: Option<String>,
    /// `ssl.ca.location`: PEM file of the CA that signed the brokers' certificates (for a private
    /// CA; the system's trust store otherwise).
    pub ssl_ca_location: Option<String>,
}

impl fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .finish()
    }
}

impl KafkaConnection {
    /// A plaintext connection without authentication.
    pub fn plaintext(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
        }
    }

    /// librdkafka configuration for this connection.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_with(&[], &[])
    }

    /// librdkafka configuration for this connection, then `defaults` (a client's own settings),
    /// then `overrides` (the user's), each later one winning over what came before.
    pub fn client_config_with(
        &self,
        defaults: &[(&str, &str)],
        overrides: &[(String, String)],
    ) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap_servers);
        let opt = [
            ("security.protocol", &self.security_protocol),
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
            ("ssl.ca.location", &self.ssl_ca_location),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                cfg.set(k, v);
            }
        }
        for (k, v) in defaults {
            cfg.set(*k, *v);
        }
        for (k, v) in overrides {
            cfg.set(k, v);
        }
        cfg
    }
}

/// How to reach Kafka: bootstrap servers, security, and any extra librdkafka property.
/// Shared by the worker and `tickctl`.
#[derive(Args, Debug, Clone)]
pub struct KafkaOptions {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "TICKFLEET_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Kafka security protocol (plaintext, ssl, sasl_plaintext, sasl_ssl).
    #[arg(long, env = "TICKFLEET_KAFKA_SECURITY_PROTOCOL")]
    pub kafka_security_protocol: Option<String>,
    /// SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_MECHANISM")]
    pub kafka_sasl_mechanism: Option<String>,
    /// SASL username.
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (prefer the environment variable, from a Secret, to the flag).
    #[arg(long, env = "TICKFLEET_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// PEM file of the CA that signed the brokers' certificates (ssl, sasl_ssl), for a private CA.
    #[arg(long, env = "TICKFLEET_KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<String>,
    /// Extra librdkafka properties, `key=value`, comma-separated or repeated; they win over tickfleet's defaults.
    #[arg(long = "kafka-option", env = "TICKFLEET_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

impl KafkaOptions {
    /// Options for `brokers` with nothing else set.
    pub fn new(brokers: &str) -> Self {
        KafkaOptions {
            brokers: brokers.to_owned(),
            kafka_security_protocol: None,
            kafka_sasl_mechanism: None,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_ca_file: None,
            kafka_options: Vec::new(),
        }
    }

    /// The servers and security these options name.
    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection {
            bootstrap_servers: self.brokers.clone(),
            security_protocol: self.kafka_security_protocol.clone(),
            sasl_mechanism: self.kafka_sasl_mechanism.clone(),
            sasl_username: self.kafka_sasl_username.clone(),
            sasl_password: self.kafka_sasl_password.clone(),
            ssl_ca_location: self.kafka_ca_file.clone(),
        }
    }

    /// A librdkafka client config with the servers and security set; `defaults` are applied before the
    /// user's `--kafka-option`s, so users can override them.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        self.connection()
            .client_config_with(defaults, &self.kafka_options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_password() {
        let mut c = KafkaConnection::plaintext("k:9092");
        c.sasl_password = Some("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn servers_then_security_then_defaults_then_the_users_options() {
        let mut o = KafkaOptions::new("k:9092");
        o.kafka_security_protocol = Some("sasl_ssl".into());
        o.kafka_sasl_password = Some("hunter2".into());
        o.kafka_options = vec![("session.timeout.ms".into(), "30000".into())];
        let c = o.client_config(&[("session.timeout.ms", "10000"), ("group.id", "g")]);
        assert_eq!(c.get("bootstrap.servers"), Some("k:9092"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("sasl.mechanism"), None, "unset stays unset");
        assert_eq!(c.get("ssl.ca.location"), None, "unset stays unset");
        o.kafka_ca_file = Some("/etc/kafka/ca.pem".into());
        assert_eq!(
            o.client_config(&[]).get("ssl.ca.location"),
            Some("/etc/kafka/ca.pem")
        );
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("session.timeout.ms"), Some("30000"), "the user wins");
        assert_eq!(
            o.connection().client_config().get("session.timeout.ms"),
            None
        );
    }

    #[test]
    fn key_values_parse() {
        assert_eq!(
            parse_key_value(" linger.ms = 5 "),
            Ok(("linger.ms".into(), "5".into()))
        );
        assert!(parse_key_value("linger.ms").is_err());
    }
}

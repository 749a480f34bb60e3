//! Kafka message → validated [`Tick`].
//!
//! Two payload formats are accepted: the protobuf `tickfleet.v1.Tick` (what `tickctl produce` writes) and
//! the JSON that existing producers already emit:
//!
//! ```json
//! {"symbol": "BTC-USD", "price": "64250.10", "timestamp": "2024-05-01T12:00:00.5Z", "source": "binance"}
//! ```
//!
//! `price` (and the optional `size`) may be a JSON string or number; either way it is parsed from its text,
//! exactly, never through `f64`. `timestamp` is RFC 3339 or a number of seconds, milliseconds, microseconds
//! or nanoseconds since the epoch (told apart by magnitude); `asset_id` is accepted for `symbol` and an
//! optional `seq` may carry the producer's sequence number.
//!
//! Every rejection is a [`DecodeError`]; nothing here panics on input.

use std::str::FromStr;

use chrono::DateTime;
use prost::Message;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Tick, v1};

/// The payload format of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Protobuf `tickfleet.v1.Tick`.
    #[default]
    Protobuf,
    /// JSON `{"symbol","price","timestamp","source"}`.
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "protobuf" | "proto" => Ok(Format::Protobuf),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown format {other:?}: expected protobuf or json"
            )),
        }
    }
}

/// Validation limits applied to every decoded tick.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload, in bytes.
    pub max_payload_bytes: usize,
    /// Longest accepted asset id, in bytes.
    pub max_asset_id_bytes: usize,
    /// When set, ticks whose event time is further than this from the worker's clock (either way) are rejected.
    pub max_skew_ns: Option<i64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 64 * 1024,
            max_asset_id_bytes: 128,
            max_skew_ns: None,
        }
    }
}

/// Why a message could not become a tick.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than [`Limits::max_payload_bytes`].
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    Oversized {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The payload is not a valid message of the configured format.
    #[error("malformed {format} payload: {detail}")]
    Malformed {
        /// `protobuf` or `json`.
        format: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// The asset id is missing, too long, or has characters that would break the store's key layout.
    #[error("invalid asset id: {0}")]
    AssetId(String),
    /// The message key is set and differs from the tick's asset id, so the tick may be on the wrong partition.
    #[error("message key {key:?} differs from asset id {asset_id:?}")]
    KeyMismatch {
        /// The Kafka key.
        key: String,
        /// The asset id in the payload.
        asset_id: String,
    },
    /// The price is missing, not a decimal, or not > 0.
    #[error("invalid price: {0}")]
    Price(String),
    /// The size is not a decimal or is negative.
    #[error("invalid size: {0}")]
    Size(String),
    /// The timestamp is missing, unparseable, before 1970, or too far from now.
    #[error("invalid timestamp: {0}")]
    Timestamp(String),
}

impl DecodeError {
    /// A short, stable code for this kind of error, for dead-letter headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::AssetId(_) => "invalid_asset_id",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
            DecodeError::Price(_) => "invalid_price",
            DecodeError::Size(_) => "invalid_size",
            DecodeError::Timestamp(_) => "invalid_timestamp",
        }
    }
}

/// Decodes and validates one message.
///
/// `offset` is the message's Kafka offset: ticks that carry no sequence number (seq 0, or JSON without
/// `seq`) get it as their sequence number, which is unique and increasing per asset because an asset's
/// ticks all live on one partition. `now_ns` is the clock used for [`Limits::max_skew_ns`].
pub fn decode(
    format: Format,
    key: Option<&[u8]>,
    payload: &[u8],
    offset: i64,
    limits: &Limits,
    now_ns: i64,
) -> Result<Tick, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let mut tick = match format {
        Format::Protobuf => decode_protobuf(payload)?,
        Format::Json => decode_json(payload)?,
    };
    if tick.seq == 0 {
        tick.seq = u64::try_from(offset).unwrap_or(0);
    }
    validate(&tick, key, limits, now_ns)?;
    Ok(tick)
}

/// Decodes a protobuf `tickfleet.v1.Tick` into a [`Tick`] (format checks only; see [`decode`]).
pub fn decode_protobuf(payload: &[u8]) -> Result<Tick, DecodeError> {
    let wire = v1::Tick::decode(payload).map_err(|e| DecodeError::Malformed {
        format: "protobuf",
        detail: e.to_string(),
    })?;
    Ok(Tick {
        price: parse_price(&wire.price)?,
        size: wire.size.as_deref().map(parse_size).transpose()?,
        asset_id: wire.asset_id,
        event_time_ns: wire.event_time_ns,
        seq: wire.seq,
        source: wire.source,
    })
}

#[derive(Deserialize)]
struct JsonTick<'a> {
    #[serde(alias = "asset_id")]
    symbol: Option<String>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    size: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    source: Option<String>,
    seq: Option<u64>,
}

/// Decodes a JSON tick into a [`Tick`] (format checks only; see [`decode`]).
pub fn decode_json(payload: &[u8]) -> Result<Tick, DecodeError> {
    let json: JsonTick<'_> =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed {
            format: "json",
            detail: e.to_string(),
        })?;
    let price = json
        .price
        .ok_or_else(|| DecodeError::Price("missing".into()))
        .and_then(|raw| parse_price(json_scalar_text(raw)))?;
    let size = json
        .size
        .filter(|raw| raw.get() != "null")
        .map(|raw| parse_size(json_scalar_text(raw)))
        .transpose()?;
    let event_time_ns = json
        .timestamp
        .ok_or_else(|| DecodeError::Timestamp("missing".into()))
        .and_then(parse_json_timestamp)?;
    Ok(Tick {
        asset_id: json.symbol.unwrap_or_default(),
        price,
        size,
        event_time_ns,
        seq: json.seq.unwrap_or(0),
        source: json.source.unwrap_or_default(),
    })
}

/// The text of a JSON scalar: the contents of a string (escapes are not meaningful in a number), or a number as written.
fn json_scalar_text(raw: &RawValue) -> &str {
    let text = raw.get();
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text)
}

fn parse_decimal(text: &str) -> Result<Decimal, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty".into());
    }
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str_exact(text)
    };
    parsed
        .map(|d| d.normalize())
        .map_err(|e| format!("{text:?} is not an exact decimal ({e})"))
}

fn parse_price(text: &str) -> Result<Decimal, DecodeError> {
    let price = parse_decimal(text).map_err(DecodeError::Price)?;
    if price <= Decimal::ZERO {
        return Err(DecodeError::Price(format!("{price} is not > 0")));
    }
    Ok(price)
}

fn parse_size(text: &str) -> Result<Decimal, DecodeError> {
    let size = parse_decimal(text).map_err(DecodeError::Size)?;
    if size.is_sign_negative() && !size.is_zero() {
        return Err(DecodeError::Size(format!("{size} is negative")));
    }
    Ok(size)
}

fn parse_json_timestamp(raw: &RawValue) -> Result<i64, DecodeError> {
    let text = raw.get();
    if let Some(s) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return t
                .timestamp_nanos_opt()
                .ok_or_else(|| DecodeError::Timestamp(format!("{s:?} is out of range")));
        }
        return epoch_to_ns(s);
    }
    epoch_to_ns(text)
}

/// Epoch number (seconds, ms, µs or ns, told apart by magnitude; fractions allowed) → nanoseconds.
fn epoch_to_ns(text: &str) -> Result<i64, DecodeError> {
    let value = parse_decimal(text).map_err(|_| {
        DecodeError::Timestamp(format!("{text:?} is neither RFC 3339 nor an epoch number"))
    })?;
    let abs = value.abs();
    let scale: i64 = if abs < Decimal::from(100_000_000_000_i64) {
        1_000_000_000 // seconds (until year 5138)
    } else if abs < Decimal::from(100_000_000_000_000_i64) {
        1_000_000 // milliseconds
    } else if abs < Decimal::from(100_000_000_000_000_000_i64) {
        1_000 // microseconds
    } else {
        1 // nanoseconds
    };
    value
        .checked_mul(Decimal::from(scale))
        .map(|ns| ns.trunc())
        .and_then(|ns| i64::try_from(ns).ok())
        .ok_or_else(|| DecodeError::Timestamp(format!("{text:?} is out of range")))
}

fn validate(
    tick: &Tick,
    key: Option<&[u8]>,
    limits: &Limits,
    now_ns: i64,
) -> Result<(), DecodeError> {
    let id = tick.asset_id.as_str();
    if id.is_empty() {
        return Err(DecodeError::AssetId("missing".into()));
    }
    if id.len() > limits.max_asset_id_bytes {
        return Err(DecodeError::AssetId(format!(
            "{} bytes, longer than {}",
            id.len(),
            limits.max_asset_id_bytes
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '|'))
    {
        return Err(DecodeError::AssetId(format!(
            "{id:?} contains {bad:?} (whitespace, control characters, braces and '|' are not allowed)"
        )));
    }
    if let Some(key) = key
        && key != id.as_bytes()
    {
        return Err(DecodeError::KeyMismatch {
            key: String::from_utf8_lossy(key).into_owned(),
            asset_id: id.to_owned(),
        });
    }
    if tick.event_time_ns < 0 {
        return Err(DecodeError::Timestamp(format!(
            "{} ns is before 1970",
            tick.event_time_ns
        )));
    }
    if let Some(skew) = limits.max_skew_ns
        && tick.event_time_ns.saturating_sub(now_ns).saturating_abs() > skew
    {
        return Err(DecodeError::Timestamp(format!(
            "{} ns is more than {} ns from the worker's clock ({} ns)",
            tick.event_time_ns, skew, now_ns
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000_000;

    fn tick() -> Tick {
        Tick {
            asset_id: "BTC-USD".into(),
            price: Decimal::from_str("64250.10").unwrap().normalize(),
            size: Some(Decimal::from_str("0.5").unwrap()),
            event_time_ns: NOW,
            seq: 7,
            source: "gen".into(),
        }
    }

    fn json(payload: &str) -> Result<Tick, DecodeError> {
        decode(
            Format::Json,
            None,
            payload.as_bytes(),
            99,
            &Limits::default(),
            NOW,
        )
    }

    #[test]
    fn protobuf_round_trips_exactly() {
        let t = tick();
        let got = decode(
            Format::Protobuf,
            Some(b"BTC-USD"),
            &t.to_protobuf(),
            5,
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(got, t);
    }

    #[test]
    fn unnumbered_ticks_take_the_offset_as_seq() {
        let mut t = tick();
        t.seq = 0;
        let got = decode(
            Format::Protobuf,
            None,
            &t.to_protobuf(),
            1234,
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(got.seq, 1234);
        assert_eq!(
            json(r#"{"symbol":"X","price":"1","timestamp":1}"#)
                .unwrap()
                .seq,
            99
        );
    }

    #[test]
    fn json_prices_are_exact_whether_string_or_number() {
        // 0.1 + 0.2 style values that f64 cannot hold exactly.
        let a = json(r#"{"symbol":"X","price":"0.30000000000000001","timestamp":1}"#).unwrap();
        let b = json(r#"{"symbol":"X","price":0.30000000000000001,"timestamp":1}"#).unwrap();
        assert_eq!(a.price.to_string(), "0.30000000000000001");
        assert_eq!(a.price, b.price);
        let c = json(r#"{"symbol":"X","price":1.5e3,"timestamp":1}"#).unwrap();
        assert_eq!(c.price.to_string(), "1500");
    }

    #[test]
    fn json_timestamps_in_every_supported_form() {
        let expect = 1_700_000_000_500_000_000_i64;
        for ts in [
            r#""2023-11-14T22:13:20.5Z""#,
            r#""2023-11-14T23:13:20.5+01:00""#,
            "1700000000.5",
            "1700000000500",
            "1700000000500000",
            "1700000000500000000",
            r#""1700000000500""#,
        ] {
            let t = json(&format!(r#"{{"symbol":"X","price":"1","timestamp":{ts}}}"#)).unwrap();
            assert_eq!(t.event_time_ns, expect, "timestamp {ts}");
        }
    }

    #[test]
    fn json_source_size_and_alias() {
        let t = json(r#"{"asset_id":"ETH","price":"2","size":"1.25","timestamp":1,"source":"kraken","seq":3}"#)
            .unwrap();
        assert_eq!(t.asset_id, "ETH");
        assert_eq!(t.size.unwrap().to_string(), "1.25");
        assert_eq!(t.source, "kraken");
        assert_eq!(t.seq, 3);
    }

    #[test]
    fn rejections_carry_a_reason() {
        let cases = [
            (r#"{"price":"1","timestamp":1}"#, "invalid_asset_id"),
            (
                r#"{"symbol":"a b","price":"1","timestamp":1}"#,
                "invalid_asset_id",
            ),
            (
                r#"{"symbol":"{x}","price":"1","timestamp":1}"#,
                "invalid_asset_id",
            ),
            (r#"{"symbol":"X","timestamp":1}"#, "invalid_price"),
            (
                r#"{"symbol":"X","price":"-1","timestamp":1}"#,
                "invalid_price",
            ),
            (
                r#"{"symbol":"X","price":"0","timestamp":1}"#,
                "invalid_price",
            ),
            (
                r#"{"symbol":"X","price":"NaN","timestamp":1}"#,
                "invalid_price",
            ),
            (
                r#"{"symbol":"X","price":"abc","timestamp":1}"#,
                "invalid_price",
            ),
            (
                r#"{"symbol":"X","price":"1","size":"-2","timestamp":1}"#,
                "invalid_size",
            ),
            (r#"{"symbol":"X","price":"1"}"#, "invalid_timestamp"),
            (
                r#"{"symbol":"X","price":"1","timestamp":"yesterday"}"#,
                "invalid_timestamp",
            ),
            (
                r#"{"symbol":"X","price":"1","timestamp":-5}"#,
                "invalid_timestamp",
            ),
            (
                r#"{"symbol":"X","price":"1","timestamp":1e300}"#,
                "invalid_timestamp",
            ),
            (r#"not json"#, "malformed"),
            (r#"[1,2]"#, "malformed"),
        ];
        for (payload, reason) in cases {
            let err = json(payload).unwrap_err();
            assert_eq!(err.reason(), reason, "{payload}: {err}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn key_must_match_asset_and_size_is_bounded() {
        let t = tick();
        let err = decode(
            Format::Protobuf,
            Some(b"ETH"),
            &t.to_protobuf(),
            0,
            &Limits::default(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "key_mismatch");
        let limits = Limits {
            max_payload_bytes: 4,
            ..Limits::default()
        };
        let err = decode(Format::Protobuf, None, &t.to_protobuf(), 0, &limits, NOW).unwrap_err();
        assert_eq!(err.reason(), "oversized");
        let err = decode(
            Format::Protobuf,
            None,
            b"\xff\xff\xff",
            0,
            &Limits::default(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn skew_limit_applies_both_ways() {
        let limits = Limits {
            max_skew_ns: Some(1_000_000_000),
            ..Limits::default()
        };
        let mut t = tick();
        assert!(decode(Format::Protobuf, None, &t.to_protobuf(), 0, &limits, NOW).is_ok());
        t.event_time_ns = NOW + 2_000_000_000;
        let err = decode(Format::Protobuf, None, &t.to_protobuf(), 0, &limits, NOW).unwrap_err();
        assert_eq!(err.reason(), "invalid_timestamp");
        t.event_time_ns = NOW - 2_000_000_000;
        assert!(decode(Format::Protobuf, None, &t.to_protobuf(), 0, &limits, NOW).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(Format::Protobuf, None, &payload, 0, &Limits::default(), NOW);
            let _ = decode(Format::Json, None, &payload, 0, &Limits::default(), NOW);
        }

        #[test]
        fn arbitrary_json_fields_never_panic(price in ".{0,24}", ts in ".{0,24}", sym in ".{0,12}") {
            let payload = serde_json::json!({"symbol": sym, "price": price, "timestamp": ts}).to_string();
            let _ = decode(Format::Json, None, payload.as_bytes(), 0, &Limits::default(), NOW);
        }
    }
}

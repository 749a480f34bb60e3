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
//!
//! (Over 600 lines with its tests, about 440 of code: one decoder, since both formats end in the same
//! validation (`validate`: limits, clock skew, the derived sequence number) and the same errors; the
//! tests, about 290 lines, one a rule of the above, are its specification.)

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
    /// Ticks dated more than this after the worker's clock are rejected ([`DecodeError::ClockSkew`]).
    pub max_ahead_ns: i64,
    /// Ticks dated more than this before the worker's clock are rejected ([`DecodeError::ClockSkew`]).
    pub max_behind_ns: i64,
}

/// Default of [`Limits::max_ahead_ns`]: 5 minutes. A tick from the future is a producer's clock or
/// encoding bug; a few minutes absorb honest clock drift between hosts.
pub const DEFAULT_MAX_AHEAD_NS: i64 = 5 * 60 * 1_000_000_000;
/// Default of [`Limits::max_behind_ns`]: 365 days — generous, so replays and backfills of the past
/// year pass, while a timestamp in the wrong unit or a zeroed clock (1970) does not.
pub const DEFAULT_MAX_BEHIND_NS: i64 = 365 * 24 * 3600 * 1_000_000_000;

/// Marks a sequence number that the worker derived (from the producer's `id`, or the tick's content)
/// rather than one the producer sent. Producer sequence numbers stay below it.
pub const DERIVED_SEQ_BIT: u64 = 1 << 63;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 64 * 1024,
            max_asset_id_bytes: 128,
            max_ahead_ns: DEFAULT_MAX_AHEAD_NS,
            max_behind_ns: DEFAULT_MAX_BEHIND_NS,
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
    /// The message key is missing or differs from the tick's asset id, so the asset's ticks could be
    /// spread over partitions (and lose their order).
    #[error("{}", match key {
        Some(key) => format!("message key {key:?} differs from asset id {asset_id:?}"),
        None => format!("message has no key; it must be the asset id {asset_id:?}"),
    })]
    KeyMismatch {
        /// The Kafka key, if any.
        key: Option<String>,
        /// The asset id in the payload.
        asset_id: String,
    },
    /// The price is missing, not a decimal, or not > 0.
    #[error("invalid price: {0}")]
    Price(String),
    /// The size is not a decimal or is negative.
    #[error("invalid size: {0}")]
    Size(String),
    /// The timestamp is missing, unparseable or before 1970.
    #[error("invalid timestamp: {0}")]
    Timestamp(String),
    /// The event time is further from the worker's clock than [`Limits`] allow.
    #[error("event time {event_time_ns} ns is {} from the worker's clock ({now_ns} ns); the limit is {} {}",
        human_ns(event_time_ns.abs_diff(*now_ns)),
        human_ns(limit_ns.unsigned_abs()),
        if event_time_ns > now_ns { "ahead" } else { "behind" })]
    ClockSkew {
        /// The tick's event time.
        event_time_ns: i64,
        /// The worker's clock.
        now_ns: i64,
        /// The limit that was exceeded.
        limit_ns: i64,
    },
}

/// `90061 s` → `1d 1h 1m 1s`-style text for skew messages (whole seconds; sub-second as ns).
fn human_ns(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    if secs == 0 {
        return format!("{ns} ns");
    }
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (v, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!("{v}{unit}"));
        }
    }
    out
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
            DecodeError::ClockSkew { .. } => "clock_skew",
        }
    }
}

/// Decodes and validates one message.
///
/// Ticks that carry no sequence number (seq 0) get a derived one (see the module docs on identity).
/// `now_ns` is the worker's clock, which [`Limits::max_ahead_ns`] and [`Limits::max_behind_ns`] are
/// measured from.
pub fn decode(
    format: Format,
    key: Option<&[u8]>,
    payload: &[u8],
    limits: &Limits,
    now_ns: i64,
) -> Result<Tick, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let tick = match format {
        Format::Protobuf => decode_protobuf(payload)?,
        Format::Json => decode_json(payload)?,
    };
    validate(&tick, key, limits, now_ns)?;
    Ok(tick)
}

/// FNV-1a (64 bit) over `parts`, each followed by a 0xff separator (a byte no UTF-8 text contains), so
/// ("ab", "c") and ("a", "bc") differ. Stable across Rust versions and platforms, unlike `std`'s hasher:
/// the result is stored.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The derived sequence number of a tick without one: from the producer's id when there is one, else
/// from the tick's content. Never from where the message happened to land (its offset).
fn derived_seq(tick: &Tick, producer_id: Option<&str>) -> u64 {
    let h = match producer_id {
        Some(id) => fnv1a(&[b"id", id.as_bytes()]),
        None => {
            let price = tick.price.to_string();
            let size = tick.size.map(|s| s.to_string()).unwrap_or_default();
            fnv1a(&[
                b"content",
                price.as_bytes(),
                size.as_bytes(),
                tick.source.as_bytes(),
            ])
        }
    };
    h | DERIVED_SEQ_BIT
}

/// Decodes a protobuf `tickfleet.v1.Tick` into a [`Tick`] (format checks only; see [`decode`]).
pub fn decode_protobuf(payload: &[u8]) -> Result<Tick, DecodeError> {
    let wire = v1::Tick::decode(payload).map_err(|e| DecodeError::Malformed {
        format: "protobuf",
        detail: e.to_string(),
    })?;
    let mut tick = Tick {
        price: parse_price(&wire.price)?,
        size: wire.size.as_deref().map(parse_size).transpose()?,
        asset_id: wire.asset_id,
        event_time_ns: wire.event_time_ns,
        seq: wire.seq,
        source: wire.source,
    };
    if tick.seq == 0 {
        tick.seq = derived_seq(&tick, None);
    }
    Ok(tick)
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
    #[serde(borrow, alias = "trade_id", alias = "event_id")]
    id: Option<&'a RawValue>,
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
    let producer_id = json
        .id
        .filter(|raw| raw.get() != "null")
        .map(json_scalar_text);
    let mut tick = Tick {
        asset_id: json.symbol.unwrap_or_default(),
        price,
        size,
        event_time_ns,
        seq: json.seq.unwrap_or(0),
        source: json.source.unwrap_or_default(),
    };
    if tick.seq == 0 {
        tick.seq = derived_seq(&tick, producer_id);
    }
    Ok(tick)
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
    if key != Some(id.as_bytes()) {
        return Err(DecodeError::KeyMismatch {
            key: key.map(|k| String::from_utf8_lossy(k).into_owned()),
            asset_id: id.to_owned(),
        });
    }
    if tick.event_time_ns < 0 {
        return Err(DecodeError::Timestamp(format!(
            "{} ns is before 1970",
            tick.event_time_ns
        )));
    }
    let ahead = tick.event_time_ns.saturating_sub(now_ns);
    let limit_ns = if ahead > 0 {
        limits.max_ahead_ns
    } else {
        limits.max_behind_ns
    };
    if ahead.saturating_abs() > limit_ns {
        return Err(DecodeError::ClockSkew {
            event_time_ns: tick.event_time_ns,
            now_ns,
            limit_ns,
        });
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

    /// Limits that accept any past timestamp, for cases written with small epoch numbers.
    fn lax() -> Limits {
        Limits {
            max_behind_ns: i64::MAX,
            ..Limits::default()
        }
    }

    /// Decodes a JSON payload keyed by its own symbol, as a well-behaved producer sends it.
    fn json(payload: &str) -> Result<Tick, DecodeError> {
        let t = decode_json(payload.as_bytes())?;
        validate(&t, Some(t.asset_id.as_bytes()), &lax(), NOW)?;
        Ok(t)
    }

    #[test]
    fn protobuf_round_trips_exactly() {
        let t = tick();
        let got = decode(
            Format::Protobuf,
            Some(b"BTC-USD"),
            &t.to_protobuf(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(got, t);
    }

    #[test]
    fn producer_retry_of_an_unnumbered_tick_has_the_same_identity() {
        // The same JSON payload twice (a producer retry lands at a new offset): one identity.
        let payload = r#"{"symbol":"BTC","price":"64250.10","timestamp":1700000000,"source":"x"}"#;
        let a = json(payload).unwrap();
        let b = json(payload).unwrap();
        assert_eq!(a.id(), b.id());
        assert_ne!(a.seq & DERIVED_SEQ_BIT, 0, "derived, not a producer seq");
        // The same tick written differently (number vs string, trailing zero) is still the same tick.
        let c = json(r#"{"symbol":"BTC","price":64250.1,"timestamp":"1700000000","source":"x"}"#)
            .unwrap();
        assert_eq!(a.id(), c.id());
        // Protobuf without seq: content identity too.
        let mut t = tick();
        t.seq = 0;
        let p = decode(
            Format::Protobuf,
            Some(b"BTC-USD"),
            &t.to_protobuf(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        let q = decode(
            Format::Protobuf,
            Some(b"BTC-USD"),
            &t.to_protobuf(),
            &Limits::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(p.id(), q.id());
        assert_ne!(p.seq & DERIVED_SEQ_BIT, 0);
    }

    #[test]
    fn identity_comes_from_seq_then_producer_id_then_content() {
        let base = r#""symbol":"X","price":"1","timestamp":1"#;
        let seq = json(&format!("{{{base},\"seq\":7}}")).unwrap();
        assert_eq!(seq.seq, 7);
        // An id makes two ticks with identical content two ticks, and a retry of either one tick.
        let t1 = json(&format!("{{{base},\"trade_id\":\"T-1\"}}")).unwrap();
        let t2 = json(&format!("{{{base},\"trade_id\":\"T-2\"}}")).unwrap();
        let t1_again = json(&format!("{{{base},\"trade_id\":\"T-1\"}}")).unwrap();
        assert_ne!(t1.id(), t2.id());
        assert_eq!(t1.id(), t1_again.id());
        let numeric = json(&format!("{{{base},\"event_id\":991}}")).unwrap();
        let text = json(&format!("{{{base},\"id\":\"991\"}}")).unwrap();
        assert_eq!(numeric.id(), text.id());
        // Without seq or id, content decides: a different price is a different tick ...
        let c1 = json(&format!("{{{base}}}")).unwrap();
        let c2 = json(r#"{"symbol":"X","price":"2","timestamp":1}"#).unwrap();
        assert_ne!(c1.id(), c2.id());
        // ... and the same content is the same tick (the documented trade-off).
        assert_eq!(c1.id(), json(&format!("{{{base}}}")).unwrap().id());
        for t in [&t1, &t2, &numeric, &c1, &c2] {
            assert_ne!(t.seq & DERIVED_SEQ_BIT, 0);
        }
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
            &Limits::default(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "key_mismatch");
        // An unkeyed message could land on any partition: rejected the same way.
        let err = decode(
            Format::Protobuf,
            None,
            &t.to_protobuf(),
            &Limits::default(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "key_mismatch");
        assert!(err.to_string().contains("no key"), "{err}");
        let limits = Limits {
            max_payload_bytes: 4,
            ..Limits::default()
        };
        let err = decode(Format::Protobuf, None, &t.to_protobuf(), &limits, NOW).unwrap_err();
        assert_eq!(err.reason(), "oversized");
        let err = decode(
            Format::Protobuf,
            None,
            b"\xff\xff\xff",
            &Limits::default(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn skew_limits_are_on_by_default_ahead_and_behind() {
        let key = Some(&b"BTC-USD"[..]);
        let at = |t_ns: i64, limits: &Limits| {
            let mut t = tick();
            t.event_time_ns = t_ns;
            decode(Format::Protobuf, key, &t.to_protobuf(), limits, NOW)
        };
        let defaults = Limits::default();
        assert!(at(NOW + DEFAULT_MAX_AHEAD_NS, &defaults).is_ok());
        assert!(at(NOW - DEFAULT_MAX_BEHIND_NS, &defaults).is_ok());
        let century = 100 * 365 * 24 * 3600 * 1_000_000_000_i64;
        for bad in [
            NOW + DEFAULT_MAX_AHEAD_NS + 1,
            NOW + century,
            NOW + 2 * 86_400 * 1_000_000_000,
            NOW - DEFAULT_MAX_BEHIND_NS - 1,
            1,
        ] {
            let err = at(bad, &defaults).unwrap_err();
            assert_eq!(err.reason(), "clock_skew", "{bad}: {err}");
        }
        let err = at(NOW + century, &defaults).unwrap_err().to_string();
        assert!(
            err.contains("ahead") && err.contains("the limit is 5m"),
            "{err}"
        );
        let tight = Limits {
            max_ahead_ns: 1_000_000_000,
            max_behind_ns: 2_000_000_000,
            ..Limits::default()
        };
        assert!(at(NOW + 1_500_000_000, &tight).is_err());
        assert!(at(NOW - 1_500_000_000, &tight).is_ok());
        assert!(at(NOW - 2_500_000_000, &tight).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(Format::Protobuf, None, &payload, &Limits::default(), NOW);
            let _ = decode(Format::Json, None, &payload, &Limits::default(), NOW);
        }

        #[test]
        fn arbitrary_json_fields_never_panic(price in ".{0,24}", ts in ".{0,24}", sym in ".{0,12}") {
            let payload = serde_json::json!({"symbol": sym, "price": price, "timestamp": ts}).to_string();
            let _ = decode(Format::Json, Some(sym.as_bytes()), payload.as_bytes(), &Limits::default(), NOW);
        }
    }
}

//! The text form of a stored tick, shared by both stores so their identity rules are the same.
//!
//! `TTTTTTTTTTTTTTTTTTTSSSSSSSSSSSSSSSSSSSS|price|size|source`: 19 zero-padded digits of event time (ns),
//! 20 of sequence number, then the payload. The 39-digit prefix orders members exactly like [`TickId`],
//! byte-wise, and equal ticks encode to equal strings: that is what makes a rewrite a no-op.

use std::str::FromStr;

use rust_decimal::Decimal;
use tickfleet_proto::{Tick, TickId};

/// Length of the identity prefix.
pub const ID_LEN: usize = 39;

/// Encodes a tick as a sorted-set member.
pub fn encode(tick: &Tick) -> String {
    let mut s = encode_id(tick.id());
    s.push('|');
    s.push_str(&tick.price.to_string());
    s.push('|');
    if let Some(size) = tick.size {
        s.push_str(&size.to_string());
    }
    s.push('|');
    s.push_str(&tick.source);
    s
}

/// The 39-digit identity prefix of a tick id.
pub fn encode_id(id: TickId) -> String {
    format!("{:019}{:020}", id.event_time_ns.max(0), id.seq)
}

/// 19-digit time prefix: members of ticks at or after `ns` sort at or after it.
pub fn encode_time(ns: i64) -> String {
    format!("{:019}", ns.max(0))
}

/// The sorted-set score of a tick: event time in whole microseconds, exact in an `f64` until year 2255.
pub fn score(event_time_ns: i64) -> i64 {
    event_time_ns.max(0) / 1_000
}

/// Decodes a member back into the tick of `asset_id`.
pub fn decode(asset_id: &str, member: &str) -> Result<Tick, String> {
    let bad = |what: &str| format!("member {member:?}: {what}");
    if member.len() < ID_LEN || !member.is_char_boundary(ID_LEN) {
        return Err(bad("too short"));
    }
    let (id, rest) = member.split_at(ID_LEN);
    let event_time_ns = id[..19].parse().map_err(|_| bad("bad time"))?;
    let seq = id[19..].parse().map_err(|_| bad("bad seq"))?;
    let mut parts = rest
        .strip_prefix('|')
        .ok_or_else(|| bad("no payload"))?
        .splitn(3, '|');
    let price = parts.next().ok_or_else(|| bad("no price"))?;
    let size = parts.next().ok_or_else(|| bad("no size"))?;
    let source = parts.next().ok_or_else(|| bad("no source"))?;
    Ok(Tick {
        asset_id: asset_id.to_owned(),
        price: Decimal::from_str(price).map_err(|_| bad("bad price"))?,
        size: if size.is_empty() {
            None
        } else {
            Some(Decimal::from_str(size).map_err(|_| bad("bad size"))?)
        },
        event_time_ns,
        seq,
        source: source.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(t: i64, seq: u64, size: Option<&str>, source: &str) -> Tick {
        Tick {
            asset_id: "A".into(),
            price: Decimal::from_str("101.25").unwrap(),
            size: size.map(|s| Decimal::from_str(s).unwrap()),
            event_time_ns: t,
            seq,
            source: source.into(),
        }
    }

    #[test]
    fn round_trips_with_and_without_optional_parts() {
        for t in [
            tick(1_700_000_000_123_456_789, 42, Some("0.5"), "gen|with|bars"),
            tick(0, 0, None, ""),
            tick(i64::MAX, u64::MAX, None, "x"),
        ] {
            let m = encode(&t);
            assert_eq!(decode("A", &m).unwrap(), t, "{m}");
        }
    }

    #[test]
    fn byte_order_of_members_is_tick_id_order() {
        let ids = [(5, 9), (5, 10), (6, 1), (1_000_000_000_000, 0)];
        let members: Vec<String> = ids
            .iter()
            .map(|&(t, s)| encode(&tick(t, s, None, "")))
            .collect();
        let mut sorted = members.clone();
        sorted.sort();
        assert_eq!(members, sorted);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for m in [
            "",
            "123",
            &"9".repeat(39),
            &format!("{}|x|", "0".repeat(39)),
            "ééééééééééééééééééééééééééééééé",
        ] {
            assert!(decode("A", m).is_err(), "{m}");
        }
    }
}

use std::fmt;
use std::str::FromStr;

use prost::Message;
use rust_decimal::Decimal;

use crate::{Format, v1};

/// One price observation for one asset, with exact decimal price and size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tick {
    /// The asset (symbol) id; also the Kafka message key.
    pub asset_id: String,
    /// Exact price, always > 0.
    pub price: Decimal,
    /// Exact traded size, when the source has one.
    pub size: Option<Decimal>,
    /// Event time, UTC nanoseconds since the Unix epoch (never negative).
    pub event_time_ns: i64,
    /// Per-asset sequence number: the producer's, or derived from its id or the tick's content (see
    /// [`crate::DERIVED_SEQ_BIT`]); never the Kafka offset.
    pub seq: u64,
    /// Free-text origin of the price (exchange, feed, generator); may be empty.
    pub source: String,
}

/// What makes a tick unique within its asset: event time, then sequence number.
///
/// Ordering by `TickId` is the order ticks are stored and listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TickId {
    /// Event time, UTC nanoseconds since the Unix epoch.
    pub event_time_ns: i64,
    /// Per-asset sequence number.
    pub seq: u64,
}

impl Tick {
    /// This tick's identity within its asset.
    pub fn id(&self) -> TickId {
        TickId {
            event_time_ns: self.event_time_ns,
            seq: self.seq,
        }
    }

    /// Encodes the tick as a protobuf `tickfleet.v1.Tick` message.
    pub fn to_protobuf(&self) -> Vec<u8> {
        v1::Tick::from(self).encode_to_vec()
    }

    /// Encodes the tick in a topic's payload format, as [`crate::decode`] reads it back: protobuf
    /// `tickfleet.v1.Tick`, or JSON `{"symbol","price","size","timestamp","source","seq"}` with the
    /// price and size as exact decimal strings and the timestamp as `SECONDS.NANOSECONDS`.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Protobuf => self.to_protobuf(),
            Format::Json => {
                let secs = self.event_time_ns.div_euclid(1_000_000_000);
                let nanos = self.event_time_ns.rem_euclid(1_000_000_000);
                serde_json::json!({
                    "symbol": self.asset_id,
                    "price": self.price.to_string(),
                    "size": self.size.map(|s| s.to_string()),
                    "timestamp": format!("{secs}.{nanos:09}"),
                    "source": self.source,
                    "seq": self.seq,
                })
                .to_string()
                .into_bytes()
            }
        }
    }
}

impl From<&Tick> for v1::Tick {
    fn from(t: &Tick) -> Self {
        v1::Tick {
            asset_id: t.asset_id.clone(),
            price: t.price.to_string(),
            size: t.size.map(|s| s.to_string()),
            event_time_ns: t.event_time_ns,
            seq: t.seq,
            source: t.source.clone(),
        }
    }
}

impl fmt::Display for TickId {
    /// `TIME-SEQ`, e.g. `1700000000000000000-42`: the text form used in page tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.event_time_ns, self.seq)
    }
}

impl FromStr for TickId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (time, seq) = s
            .split_once('-')
            .ok_or_else(|| format!("tick id {s:?} is not TIME-SEQ"))?;
        Ok(TickId {
            event_time_ns: time
                .parse()
                .map_err(|e| format!("tick id {s:?}: bad time: {e}"))?,
            seq: seq
                .parse()
                .map_err(|e| format!("tick id {s:?}: bad seq: {e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_id_round_trips_through_text() {
        let id = TickId {
            event_time_ns: 1_700_000_000_123_456_789,
            seq: 42,
        };
        assert_eq!(id.to_string(), "1700000000123456789-42");
        assert_eq!(id.to_string().parse::<TickId>().unwrap(), id);
        assert!("12".parse::<TickId>().is_err());
        assert!("a-1".parse::<TickId>().is_err());
    }

    #[test]
    fn tick_ids_order_by_time_then_seq() {
        let a = TickId {
            event_time_ns: 1,
            seq: 9,
        };
        let b = TickId {
            event_time_ns: 2,
            seq: 1,
        };
        let c = TickId {
            event_time_ns: 2,
            seq: 2,
        };
        assert!(a < b && b < c);
    }
}

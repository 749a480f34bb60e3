//! One module per exchange, each implementing [`Venue`]: the subscribe message(s), parsing one text frame
//! into trades / control / error, and the mapping between tickfleet's `BASE-QUOTE` symbols and the venue's
//! spelling.
//!
//! Parsers never panic and never go through `f64`: prices and sizes are parsed from the venue's own text
//! (a JSON string, or for Kraken the raw text of a JSON number, via [`serde_json::value::RawValue`]).

pub mod binance;
pub mod coinbase;
pub mod kraken;

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

pub use tickfleet_service::Symbol;

/// One trade as the venue reported it, already mapped to tickfleet's symbol and exact decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    /// The normalised symbol.
    pub symbol: Symbol,
    /// The venue's trade id (increasing per symbol on all three venues).
    pub trade_id: u64,
    /// Exact price, > 0.
    pub price: Decimal,
    /// Exact size, >= 0.
    pub size: Decimal,
    /// The venue's trade time, UTC nanoseconds since the epoch.
    pub time_ns: i64,
}

/// What one text frame meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Trades, in the venue's order, and the trades of the same frame that could not be read.
    Trades {
        /// The good trades.
        trades: Vec<Trade>,
        /// Why each bad trade was rejected.
        rejected: Vec<FrameError>,
    },
    /// The venue acknowledged the subscription.
    Subscribed,
    /// A heartbeat; when the venue includes it, the last trade id it has sent for a symbol (Coinbase), so
    /// a gap is visible even when no trade follows.
    Heartbeat(Option<(Symbol, u64)>),
    /// A control message needing nothing from us (status, pong, subscription lists, …).
    Control,
    /// The venue reported an error (e.g. a rejected subscription).
    VenueError(String),
}

impl Event {
    pub(crate) fn one(trade: Trade) -> Self {
        Event::Trades {
            trades: vec![trade],
            rejected: Vec::new(),
        }
    }
}

/// Why a frame could not be understood: `reason` is a short, stable metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct FrameError {
    /// `not_json`, `unexpected`, `bad_price`, `bad_size`, `bad_time`, `bad_trade_id`, `unknown_symbol`.
    pub reason: &'static str,
    /// What was wrong, for the log.
    pub detail: String,
}

impl FrameError {
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        FrameError {
            reason,
            detail: detail.into(),
        }
    }
}

/// One exchange's protocol.
pub trait Venue: Send + Sync {
    /// The exchange name, also the ticks' `source` (`binance`, `coinbase`, `kraken`).
    fn name(&self) -> &'static str;
    /// The public endpoint used when `--ws-url` is not given.
    fn default_url(&self) -> &'static str;
    /// The text frames to send after connecting.
    fn subscribe(&self) -> Vec<String>;
    /// An application-level ping to send when the connection is idle, if the venue wants one (Kraken).
    fn ping(&self) -> Option<String> {
        None
    }
    /// Parses one text frame.
    fn parse(&self, text: &str) -> Result<Event, FrameError>;
}

/// The exchanges tickfleet has connectors for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Exchange {
    /// Binance spot, `<symbol>@trade` streams with combined-stream framing.
    Binance,
    /// Coinbase Exchange (the public market-data feed), `matches` channel.
    Coinbase,
    /// Kraken spot WebSocket v2, `trade` channel.
    Kraken,
}

impl Exchange {
    /// The venue's protocol for these symbols.
    pub fn venue(self, symbols: &[Symbol]) -> Box<dyn Venue> {
        match self {
            Exchange::Binance => Box::new(binance::Binance::new(symbols)),
            Exchange::Coinbase => Box::new(coinbase::Coinbase::new(symbols)),
            Exchange::Kraken => Box::new(kraken::Kraken::new(symbols)),
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Exchange::Binance => "binance",
            Exchange::Coinbase => "coinbase",
            Exchange::Kraken => "kraken",
        }
    }
}

/// Subscribed symbols by the venue's spelling.
#[derive(Debug, Clone, Default)]
pub(crate) struct SymbolMap {
    by_venue: HashMap<String, Symbol>,
}

impl SymbolMap {
    pub(crate) fn new(symbols: &[Symbol], spell: impl Fn(&Symbol) -> String) -> Self {
        SymbolMap {
            by_venue: symbols.iter().map(|s| (spell(s), s.clone())).collect(),
        }
    }

    pub(crate) fn get(&self, venue_symbol: &str) -> Result<Symbol, FrameError> {
        self.by_venue.get(venue_symbol).cloned().ok_or_else(|| {
            FrameError::new(
                "unknown_symbol",
                format!("{venue_symbol:?} is not a subscribed symbol"),
            )
        })
    }
}

/// A price from its text: a decimal > 0, without trailing zeros (so `"64250.10000000"` and `64250.1`
/// are the same tick).
pub(crate) fn price(text: &str) -> Result<Decimal, FrameError> {
    match decimal(text) {
        Some(p) if p > Decimal::ZERO => Ok(p.normalize()),
        _ => Err(FrameError::new(
            "bad_price",
            format!("{text:?} is not a decimal > 0"),
        )),
    }
}

/// A size from its text: a decimal >= 0.
pub(crate) fn size(text: &str) -> Result<Decimal, FrameError> {
    match decimal(text) {
        Some(s) if s >= Decimal::ZERO => Ok(s.normalize()),
        _ => Err(FrameError::new(
            "bad_size",
            format!("{text:?} is not a decimal >= 0"),
        )),
    }
}

/// Plain or scientific decimal text (JSON numbers may use an exponent), exactly.
fn decimal(text: &str) -> Option<Decimal> {
    let text = text.trim_matches('"');
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

/// A JSON number or string given as raw text: the text between the quotes, or the number's own digits.
pub(crate) fn raw_number(raw: &RawValue) -> &str {
    raw.get().trim_matches('"')
}

/// RFC 3339 text to nanoseconds since the epoch.
pub(crate) fn rfc3339_ns(text: &str) -> Result<i64, FrameError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .filter(|ns| *ns >= 0)
        .ok_or_else(|| FrameError::new("bad_time", format!("{text:?} is not an RFC 3339 time")))
}

/// Milliseconds since the epoch to nanoseconds.
pub(crate) fn millis_ns(ms: i64) -> Result<i64, FrameError> {
    ms.checked_mul(1_000_000)
        .filter(|ns| *ns >= 0)
        .ok_or_else(|| FrameError::new("bad_time", format!("{ms} ms is out of range")))
}

pub(crate) fn not_json(e: serde_json::Error) -> FrameError {
    FrameError::new("not_json", e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_and_checked() {
        assert_eq!(price("64250.10").unwrap().to_string(), "64250.1");
        assert_eq!(price("6.425e4").unwrap().to_string(), "64250");
        assert_eq!(size("0.00000001").unwrap().to_string(), "0.00000001");
        assert_eq!(price("0").unwrap_err().reason, "bad_price");
        assert_eq!(price("-1").unwrap_err().reason, "bad_price");
        assert_eq!(price("NaN").unwrap_err().reason, "bad_price");
        assert_eq!(size("-0.1").unwrap_err().reason, "bad_size");
        assert_eq!(size("1e999").unwrap_err().reason, "bad_size");
    }

    #[test]
    fn times_convert_or_fail() {
        assert_eq!(
            rfc3339_ns("2023-09-25T07:49:37.708706Z").unwrap(),
            1_695_628_177_708_706_000
        );
        assert_eq!(rfc3339_ns("yesterday").unwrap_err().reason, "bad_time");
        assert_eq!(
            rfc3339_ns("1969-12-31T23:59:59Z").unwrap_err().reason,
            "bad_time"
        );
        assert_eq!(
            millis_ns(1_672_515_782_136).unwrap(),
            1_672_515_782_136_000_000
        );
        assert!(millis_ns(i64::MAX).is_err());
        assert!(millis_ns(-1).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn venues() -> Vec<Box<dyn Venue>> {
        let symbols: Vec<Symbol> = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        [Exchange::Binance, Exchange::Coinbase, Exchange::Kraken]
            .iter()
            .map(|e| e.venue(&symbols))
            .collect()
    }

    /// Every `send` frame of the three fixture scripts.
    fn frames() -> Vec<String> {
        ["binance", "coinbase", "kraken"]
            .iter()
            .flat_map(|v| {
                let path = format!("{}/tests/fixtures/{v}.script", env!("CARGO_MANIFEST_DIR"));
                std::fs::read_to_string(path)
                    .unwrap()
                    .lines()
                    .filter_map(|l| l.strip_prefix("send ").map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_any_text(text in ".{0,300}") {
            for v in venues() {
                let _ = v.parse(&text);
            }
        }

        #[test]
        fn parsers_never_panic_on_damaged_venue_frames(pick in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let frames = frames();
            let frame = &frames[pick.index(frames.len())];
            let at = cut.index(frame.len().max(1));
            // truncated, and with one character replaced
            let truncated: String = frame.chars().take(at).collect();
            let mut replaced: Vec<char> = frame.chars().collect();
            if !replaced.is_empty() {
                let i = at.min(replaced.len() - 1);
                replaced[i] = char::from(byte);
            }
            let replaced: String = replaced.into_iter().collect();
            for v in venues() {
                let _ = v.parse(&truncated);
                let _ = v.parse(&replaced);
            }
        }
    }
}

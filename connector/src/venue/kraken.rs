//! Kraken spot WebSocket v2 (`wss://ws.kraken.com/v2`), `trade` channel.
//!
//! From Kraken's "Spot WebSocket v2 — Trade" documentation: subscribe with
//! `{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"],"snapshot":true},"req_id":1}`
//! (answered per symbol by `{"method":"subscribe","result":{"channel":"trade",…},"success":true,…}`); trades
//! arrive as `{"channel":"trade","type":"snapshot"|"update","data":[{"symbol":"BTC/USD","side":"buy",
//! "price":0.5147,"qty":6423.46326,"ord_type":"limit","trade_id":4665846,"timestamp":"2023-09-25T07:49:37.708706Z"}]}`.
//! `price` and `qty` are JSON *numbers*: they are parsed from the number's raw text (a
//! [`RawValue`]), never through `f64`. `trade_id` increases by one per symbol; the snapshot sent on
//! (re)subscribing repeats the last 50 trades. The server also sends `{"channel":"heartbeat"}` about once
//! a second and a `status` message on connect; clients may send `{"method":"ping"}` (answered by `pong`).
//! Symbols are `BASE/QUOTE` (`BTC`, not v1's `XBT`).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Event, FrameError, Symbol, SymbolMap, Trade, Venue, not_json, price, raw_number, rfc3339_ns,
    size,
};

/// The Kraken v2 protocol for a set of symbols.
#[derive(Debug, Clone)]
pub struct Kraken {
    symbols: Vec<Symbol>,
    map: SymbolMap,
}

impl Kraken {
    /// The protocol for `symbols`.
    pub fn new(symbols: &[Symbol]) -> Self {
        Kraken {
            symbols: symbols.to_vec(),
            map: SymbolMap::new(symbols, spell),
        }
    }
}

/// `BTC-USDT` → `BTC/USDT`.
pub fn spell(s: &Symbol) -> String {
    format!("{}/{}", s.base, s.quote)
}

#[derive(Deserialize)]
struct Message<'a> {
    channel: Option<&'a str>,
    method: Option<&'a str>,
    success: Option<bool>,
    error: Option<String>,
    #[serde(borrow)]
    data: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct RawTrade<'a> {
    symbol: &'a str,
    #[serde(borrow)]
    price: &'a RawValue,
    #[serde(borrow)]
    qty: &'a RawValue,
    trade_id: u64,
    timestamp: &'a str,
}

impl Kraken {
    fn trade(&self, raw: &RawValue) -> Result<Trade, FrameError> {
        let t: RawTrade<'_> = serde_json::from_str(raw.get())
            .map_err(|e| FrameError::new("unexpected", format!("trade: {e}")))?;
        Ok(Trade {
            symbol: self.map.get(t.symbol)?,
            trade_id: t.trade_id,
            price: price(raw_number(t.price))?,
            size: size(raw_number(t.qty))?,
            time_ns: rfc3339_ns(t.timestamp)?,
        })
    }
}

impl Venue for Kraken {
    fn name(&self) -> &'static str {
        "kraken"
    }

    fn default_url(&self) -> &'static str {
        "wss://ws.kraken.com/v2"
    }

    fn subscribe(&self) -> Vec<String> {
        let symbols: Vec<String> = self.symbols.iter().map(spell).collect();
        vec![
            serde_json::json!({"method": "subscribe", "params": {"channel": "trade", "symbol": symbols, "snapshot": true}, "req_id": 1})
                .to_string(),
        ]
    }

    fn ping(&self) -> Option<String> {
        Some(r#"{"method":"ping"}"#.to_owned())
    }

    fn parse(&self, text: &str) -> Result<Event, FrameError> {
        let m: Message<'_> = serde_json::from_str(text).map_err(not_json)?;
        match (m.channel, m.method) {
            (Some("trade"), _) => {
                let data = m
                    .data
                    .ok_or_else(|| FrameError::new("unexpected", "trade message without data"))?;
                // one bad trade rejects itself, not the rest of its batch
                let (mut trades, mut rejected) = (Vec::with_capacity(data.len()), Vec::new());
                for raw in data {
                    match self.trade(raw) {
                        Ok(t) => trades.push(t),
                        Err(e) => rejected.push(e),
                    }
                }
                Ok(Event::Trades { trades, rejected })
            }
            (Some("heartbeat"), _) => Ok(Event::Heartbeat(None)),
            (Some("status"), _) | (_, Some("pong")) => Ok(Event::Control),
            (_, Some("subscribe")) => match m.success {
                Some(true) => Ok(Event::Subscribed),
                _ => Ok(Event::VenueError(m.error.unwrap_or_default())),
            },
            (channel, method) => Err(FrameError::new(
                "unexpected",
                format!("channel {channel:?}, method {method:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn venue() -> Kraken {
        Kraken::new(&["BTC-USD".parse().unwrap(), "MATIC-USD".parse().unwrap()])
    }

    #[test]
    fn subscribes_with_slash_symbols_and_a_snapshot() {
        let sub: serde_json::Value = serde_json::from_str(&venue().subscribe()[0]).unwrap();
        assert_eq!(
            sub,
            serde_json::json!({"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD","MATIC/USD"],"snapshot":true},"req_id":1})
        );
    }

    #[test]
    fn parses_json_numbers_from_their_text_not_through_f64() {
        // 0.1 + 0.2 style values and more digits than an f64 holds survive exactly
        let frame = r#"{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"buy","price":0.5147,"qty":6423.46326,"ord_type":"limit","trade_id":4665846,"timestamp":"2023-09-25T07:49:37.708706Z"},{"symbol":"BTC/USD","side":"sell","price":26345.123456789012345,"qty":1E-8,"ord_type":"market","trade_id":7,"timestamp":"2023-09-25T07:49:38Z"}]}"#;
        let Event::Trades { trades: t, .. } = venue().parse(frame).unwrap() else {
            panic!("not trades")
        };
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].symbol.to_string(), "MATIC-USD");
        assert_eq!(t[0].price.to_string(), "0.5147");
        assert_eq!(t[0].size.to_string(), "6423.46326");
        assert_eq!(t[0].trade_id, 4_665_846);
        assert_eq!(t[1].price.to_string(), "26345.123456789012345");
        assert_eq!(t[1].size.to_string(), "0.00000001");
    }

    #[test]
    fn control_messages_and_errors() {
        let v = venue();
        assert_eq!(
            v.parse(r#"{"method":"subscribe","result":{"channel":"trade","snapshot":true,"symbol":"BTC/USD"},"success":true,"time_in":"2023-09-25T09:04:31.742599Z","time_out":"2023-09-25T09:04:31.742648Z","req_id":1}"#).unwrap(),
            Event::Subscribed
        );
        assert!(matches!(
            v.parse(r#"{"error":"Currency pair not supported DOGE/XYZ","method":"subscribe","success":false,"req_id":1}"#).unwrap(),
            Event::VenueError(e) if e.contains("not supported")
        ));
        assert_eq!(
            v.parse(r#"{"channel":"heartbeat"}"#).unwrap(),
            Event::Heartbeat(None)
        );
        assert_eq!(
            v.parse(r#"{"channel":"status","type":"update","data":[{"api_version":"v2","connection_id":1,"system":"online","version":"2.0.0"}]}"#).unwrap(),
            Event::Control
        );
        assert_eq!(
            v.parse(r#"{"method":"pong","req_id":2}"#).unwrap(),
            Event::Control
        );
        let bad_time = r#"{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","price":1,"qty":1,"trade_id":1,"timestamp":"soon"}]}"#;
        let Event::Trades { trades, rejected } = v.parse(bad_time).unwrap() else {
            panic!("not trades")
        };
        assert!(trades.is_empty());
        assert_eq!(rejected[0].reason, "bad_time");
        let string_price = r#"{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","price":"1.5","qty":1,"trade_id":1,"timestamp":"2023-09-25T07:49:38Z"}]}"#;
        assert!(v.parse(string_price).is_ok());
        assert_eq!(
            v.parse(r#"{"channel":"book"}"#).unwrap_err().reason,
            "unexpected"
        );
    }
}

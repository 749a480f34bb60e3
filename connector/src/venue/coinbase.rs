//! Coinbase Exchange (the public market-data feed, `wss://ws-feed.exchange.coinbase.com`), `matches`
//! channel — chosen over Advanced Trade's `market_trades` because it needs no API key and carries a
//! per-product `trade_id` that increases by one, so gaps are visible.
//!
//! From Coinbase's "Exchange WebSocket Feed" documentation: subscribe with
//! `{"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches","heartbeat"]}` within 5 s of
//! connecting (answered by `{"type":"subscriptions",…}`); the feed sends one `last_match` and then a
//! `match` per trade,
//! `{"type":"match","trade_id":10,"sequence":50,"maker_order_id":…,"taker_order_id":…,
//! "time":"2014-11-07T08:19:27.028459Z","product_id":"BTC-USD","size":"5.23512","price":"400.23","side":"sell"}`.
//! The `heartbeat` channel sends `{"type":"heartbeat","sequence":…,"last_trade_id":20,"product_id":…}`
//! every second, which shows a gap even when no trade follows. Errors are `{"type":"error","message":…}`.
//! Product ids are already `BASE-QUOTE`.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Event, FrameError, Symbol, SymbolMap, Trade, Venue, not_json, price, raw_number, rfc3339_ns,
    size,
};

/// The Coinbase Exchange protocol for a set of symbols.
#[derive(Debug, Clone)]
pub struct Coinbase {
    symbols: Vec<Symbol>,
    map: SymbolMap,
}

impl Coinbase {
    /// The protocol for `symbols`.
    pub fn new(symbols: &[Symbol]) -> Self {
        Coinbase {
            symbols: symbols.to_vec(),
            map: SymbolMap::new(symbols, Symbol::to_string),
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    trade_id: Option<u64>,
    last_trade_id: Option<u64>,
    product_id: Option<&'a str>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    size: Option<&'a RawValue>,
    time: Option<&'a str>,
    message: Option<String>,
    reason: Option<String>,
}

fn missing(field: &str, kind: &str) -> FrameError {
    FrameError::new("unexpected", format!("{kind} without {field}"))
}

impl Venue for Coinbase {
    fn name(&self) -> &'static str {
        "coinbase"
    }

    fn default_url(&self) -> &'static str {
        "wss://ws-feed.exchange.coinbase.com"
    }

    fn subscribe(&self) -> Vec<String> {
        let ids: Vec<String> = self.symbols.iter().map(Symbol::to_string).collect();
        vec![
            serde_json::json!({"type": "subscribe", "product_ids": ids, "channels": ["matches", "heartbeat"]})
                .to_string(),
        ]
    }

    fn parse(&self, text: &str) -> Result<Event, FrameError> {
        let m: Message<'_> = serde_json::from_str(text).map_err(not_json)?;
        match m.kind {
            "match" | "last_match" => {
                let product = m.product_id.ok_or_else(|| missing("product_id", m.kind))?;
                let trade_id = m.trade_id.ok_or_else(|| missing("trade_id", m.kind))?;
                let p = m.price.ok_or_else(|| missing("price", m.kind))?;
                let s = m.size.ok_or_else(|| missing("size", m.kind))?;
                let time = m.time.ok_or_else(|| missing("time", m.kind))?;
                Ok(Event::one(Trade {
                    symbol: self.map.get(product)?,
                    trade_id,
                    price: price(raw_number(p))?,
                    size: size(raw_number(s))?,
                    time_ns: rfc3339_ns(time)?,
                }))
            }
            "heartbeat" => Ok(Event::Heartbeat(match (m.product_id, m.last_trade_id) {
                (Some(p), Some(id)) => Some((self.map.get(p)?, id)),
                _ => None,
            })),
            "subscriptions" => Ok(Event::Subscribed),
            "error" => Ok(Event::VenueError(format!(
                "{} {}",
                m.message.unwrap_or_default(),
                m.reason.unwrap_or_default()
            ))),
            other => Err(FrameError::new(
                "unexpected",
                format!("message type {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn venue() -> Coinbase {
        Coinbase::new(&["BTC-USD".parse().unwrap()])
    }

    #[test]
    fn subscribes_to_matches_and_heartbeat() {
        let sub: serde_json::Value = serde_json::from_str(&venue().subscribe()[0]).unwrap();
        assert_eq!(
            sub,
            serde_json::json!({"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches","heartbeat"]})
        );
    }

    #[test]
    fn parses_matches_heartbeats_and_errors() {
        let v = venue();
        let frame = r#"{"type":"match","trade_id":10,"sequence":50,"maker_order_id":"ac928c66-ca53-498f-9c13-a110027a60e8","taker_order_id":"132fb6ae-456b-4654-b4e0-d681ac05cea1","time":"2014-11-07T08:19:27.028459Z","product_id":"BTC-USD","size":"5.23512","price":"400.23","side":"sell"}"#;
        let Event::Trades { trades: t, .. } = v.parse(frame).unwrap() else {
            panic!("not trades")
        };
        assert_eq!(t[0].trade_id, 10);
        assert_eq!(t[0].price.to_string(), "400.23");
        assert_eq!(t[0].size.to_string(), "5.23512");
        assert_eq!(t[0].time_ns, 1_415_348_367_028_459_000);
        let hb = r#"{"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD","time":"2014-11-07T08:19:28.464459Z"}"#;
        assert_eq!(
            v.parse(hb).unwrap(),
            Event::Heartbeat(Some(("BTC-USD".parse().unwrap(), 20)))
        );
        assert_eq!(
            v.parse(r#"{"type":"subscriptions","channels":[]}"#)
                .unwrap(),
            Event::Subscribed
        );
        assert!(matches!(
            v.parse(r#"{"type":"error","message":"Failed to subscribe","reason":"ETH-XYZ is not a valid product"}"#)
                .unwrap(),
            Event::VenueError(_)
        ));
        let no_price = r#"{"type":"match","trade_id":11,"time":"2014-11-07T08:19:27Z","product_id":"BTC-USD","size":"1"}"#;
        assert_eq!(v.parse(no_price).unwrap_err().reason, "unexpected");
        assert_eq!(
            v.parse(r#"{"type":"l2update"}"#).unwrap_err().reason,
            "unexpected"
        );
        assert_eq!(v.parse("[1,2]").unwrap_err().reason, "not_json");
    }
}

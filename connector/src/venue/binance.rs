//! Binance spot: `<symbol>@trade` streams on the combined-stream endpoint.
//!
//! From Binance's "WebSocket Streams" documentation: connect to `wss://stream.binance.com:9443/stream`,
//! subscribe with `{"method":"SUBSCRIBE","params":["btcusdt@trade",…],"id":1}` (answered by
//! `{"result":null,"id":1}`); every event then arrives wrapped as `{"stream":"btcusdt@trade","data":{…}}`
//! with a trade payload
//! `{"e":"trade","E":…,"s":"BTCUSDT","t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}`
//! (`t` trade id, increasing by one per symbol; `p`/`q` decimal strings; `T` trade time in ms). Symbols are
//! the base and quote concatenated, lower case in stream names and upper case in payloads. The server sends
//! a ping frame every 20 s and disconnects a client that does not answer within a minute; a connection
//! lasts at most 24 h.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Event, FrameError, Symbol, SymbolMap, Trade, Venue, millis_ns, not_json, price, raw_number,
    size,
};

/// The Binance spot protocol for a set of symbols.
#[derive(Debug, Clone)]
pub struct Binance {
    symbols: Vec<Symbol>,
    map: SymbolMap,
}

impl Binance {
    /// The protocol for `symbols`.
    pub fn new(symbols: &[Symbol]) -> Self {
        Binance {
            symbols: symbols.to_vec(),
            map: SymbolMap::new(symbols, spell),
        }
    }
}

/// `BTC-USDT` → `BTCUSDT`.
pub fn spell(s: &Symbol) -> String {
    format!("{}{}", s.base, s.quote)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    stream: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    id: Option<u64>,
    code: Option<i64>,
    msg: Option<String>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawTrade<'a> {
    e: &'a str,
    s: &'a str,
    t: u64,
    #[serde(borrow)]
    p: &'a RawValue,
    #[serde(borrow)]
    q: &'a RawValue,
    #[serde(rename = "T")]
    time: i64,
}

impl Venue for Binance {
    fn name(&self) -> &'static str {
        "binance"
    }

    fn default_url(&self) -> &'static str {
        "wss://stream.binance.com:9443/stream"
    }

    fn subscribe(&self) -> Vec<String> {
        let params: Vec<String> = self
            .symbols
            .iter()
            .map(|s| format!("{}@trade", spell(s).to_ascii_lowercase()))
            .collect();
        vec![serde_json::json!({"method": "SUBSCRIBE", "params": params, "id": 1}).to_string()]
    }

    fn parse(&self, text: &str) -> Result<Event, FrameError> {
        let env: Envelope<'_> = serde_json::from_str(text).map_err(not_json)?;
        if let Some(data) = env.data {
            if !env.stream.is_some_and(|s| s.ends_with("@trade")) {
                return Err(FrameError::new(
                    "unexpected",
                    format!("stream {:?} is not a trade stream", env.stream),
                ));
            }
            let raw: RawTrade<'_> = serde_json::from_str(data.get())
                .map_err(|e| FrameError::new("unexpected", format!("trade payload: {e}")))?;
            if raw.e != "trade" {
                return Err(FrameError::new(
                    "unexpected",
                    format!("event type {:?}", raw.e),
                ));
            }
            return Ok(Event::one(Trade {
                symbol: self.map.get(raw.s)?,
                trade_id: raw.t,
                price: price(raw_number(raw.p))?,
                size: size(raw_number(raw.q))?,
                time_ns: millis_ns(raw.time)?,
            }));
        }
        if env.code.is_some() || env.error.is_some() {
            let detail = env
                .msg
                .or_else(|| env.error.map(|e| e.to_string()))
                .unwrap_or_default();
            return Ok(Event::VenueError(detail));
        }
        if env.id.is_some() {
            // {"result":null,"id":1}: our SUBSCRIBE was accepted (`result` is null, so only `id` shows)
            return Ok(Event::Subscribed);
        }
        Err(FrameError::new("unexpected", "not a trade, ack or error"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn venue() -> Binance {
        Binance::new(&["BTC-USDT".parse().unwrap(), "ETH-USDT".parse().unwrap()])
    }

    #[test]
    fn subscribes_to_lower_case_trade_streams() {
        let sub: serde_json::Value = serde_json::from_str(&venue().subscribe()[0]).unwrap();
        assert_eq!(
            sub,
            serde_json::json!({"method":"SUBSCRIBE","params":["btcusdt@trade","ethusdt@trade"],"id":1})
        );
    }

    #[test]
    fn parses_a_combined_stream_trade_exactly() {
        let frame = r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1672515782136,"s":"BTCUSDT","t":12345,"p":"16500.01000000","q":"0.00100000","T":1672515782134,"m":true,"M":true}}"#;
        let Event::Trades { trades: t, .. } = venue().parse(frame).unwrap() else {
            panic!("not trades")
        };
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].symbol.to_string(), "BTC-USDT");
        assert_eq!(t[0].trade_id, 12345);
        assert_eq!(t[0].price.to_string(), "16500.01");
        assert_eq!(t[0].size.to_string(), "0.001");
        assert_eq!(t[0].time_ns, 1_672_515_782_134_000_000);
    }

    #[test]
    fn acks_errors_and_junk() {
        let v = venue();
        assert_eq!(
            v.parse(r#"{"result":null,"id":1}"#).unwrap(),
            Event::Subscribed
        );
        assert!(matches!(
            v.parse(r#"{"code":2,"msg":"Invalid request"}"#).unwrap(),
            Event::VenueError(m) if m == "Invalid request"
        ));
        assert_eq!(v.parse("{").unwrap_err().reason, "not_json");
        let other = r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"XRPUSDT","t":1,"p":"1","q":"1","T":1}}"#;
        assert_eq!(v.parse(other).unwrap_err().reason, "unknown_symbol");
        let bad = r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"-1","q":"1","T":1}}"#;
        assert_eq!(v.parse(bad).unwrap_err().reason, "bad_price");
        let agg = r#"{"stream":"btcusdt@aggTrade","data":{}}"#;
        assert_eq!(v.parse(agg).unwrap_err().reason, "unexpected");
    }
}

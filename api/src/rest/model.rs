//! The JSON bodies of the REST api, converted from the gRPC messages the one implementation answers
//! with. Prices, sizes and everything computed from them stay the exact decimal strings the store
//! holds. 64-bit integers (times in ns, sequence numbers, counts) are JSON strings of decimal digits,
//! as in the protobuf JSON mapping: a JavaScript client would round them as numbers (a derived `seq`
//! has bit 63 set).

use serde::Serialize;
use tickfleet_proto::v1;
use utoipa::ToSchema;

/// Nanoseconds since the Unix epoch as RFC 3339 UTC with as many fraction digits as it needs.
pub fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The newest price of one symbol, in the seed service's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct LatestPrice {
    /// The symbol (asset id).
    #[schema(example = "A0000")]
    pub symbol: String,
    /// Exact decimal price.
    #[schema(example = "100.25", pattern = r"^[0-9]+(\.[0-9]+)?$")]
    pub price: String,
    /// Event time of the tick, RFC 3339 UTC.
    #[schema(example = "2026-12-01T14:00:00.123456789Z", format = DateTime)]
    pub timestamp: String,
    /// Where the price came from (the tick's `source`; may be empty).
    #[schema(example = "generator")]
    pub provider: String,
}

/// One stored tick.
#[derive(Debug, Serialize, ToSchema)]
pub struct Tick {
    /// The asset (symbol) id.
    pub asset_id: String,
    /// Exact decimal price.
    #[schema(pattern = r"^[0-9]+(\.[0-9]+)?$")]
    pub price: String,
    /// Exact decimal traded size, when the source has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]+(\.[0-9]+)?$")]
    pub size: Option<String>,
    /// Event time, nanoseconds since the Unix epoch (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub event_time_ns: String,
    /// Event time, RFC 3339 UTC.
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// Per-asset sequence number (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub seq: String,
    /// Free-text origin of the price (exchange, feed, generator); may be empty.
    pub source: String,
}

impl From<v1::Tick> for Tick {
    fn from(t: v1::Tick) -> Self {
        Tick {
            timestamp: rfc3339(t.event_time_ns),
            asset_id: t.asset_id,
            price: t.price,
            size: t.size,
            event_time_ns: t.event_time_ns.to_string(),
            seq: t.seq.to_string(),
            source: t.source,
        }
    }
}

/// One page of an asset's ticks in a time range.
#[derive(Debug, Serialize, ToSchema)]
pub struct TicksPage {
    /// The ticks, in time order (then sequence number).
    pub ticks: Vec<Tick>,
    /// Pass as `page_token` (with the same `asset_id`, `from_ns`, `to_ns`) for the next page; absent
    /// on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

impl From<v1::ListTicksResponse> for TicksPage {
    fn from(r: v1::ListTicksResponse) -> Self {
        TicksPage {
            ticks: r.ticks.into_iter().map(Tick::from).collect(),
            next_page_token: (!r.next_page_token.is_empty()).then_some(r.next_page_token),
        }
    }
}

/// One OHLCV candle, epoch-aligned.
#[derive(Debug, Serialize, ToSchema)]
pub struct Candle {
    /// The asset id.
    pub asset_id: String,
    /// Start of the candle (inclusive), ns since the epoch (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub start_ns: String,
    /// End of the candle (exclusive), ns since the epoch (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub end_ns: String,
    /// First price in the candle.
    pub open: String,
    /// Highest price.
    pub high: String,
    /// Lowest price.
    pub low: String,
    /// Last price.
    pub close: String,
    /// Sum of the sizes (0 when the ticks have none).
    pub volume: String,
    /// Ticks in the candle (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub tick_count: String,
    /// Whether a later candle has started (live streams only; queries answer `false`).
    pub closed: bool,
}

impl From<v1::Candle> for Candle {
    fn from(c: v1::Candle) -> Self {
        Candle {
            asset_id: c.asset_id,
            start_ns: c.start_ns.to_string(),
            end_ns: c.end_ns.to_string(),
            open: c.open,
            high: c.high,
            low: c.low,
            close: c.close,
            volume: c.volume,
            tick_count: c.tick_count.to_string(),
            closed: c.closed,
        }
    }
}

/// Candles of one asset.
#[derive(Debug, Serialize, ToSchema)]
pub struct Candles {
    /// The candles with at least one tick, in time order.
    pub candles: Vec<Candle>,
}

/// Simple moving average and VWAP.
#[derive(Debug, Serialize, ToSchema)]
pub struct MovingAverage {
    /// The asset id.
    pub asset_id: String,
    /// Simple moving average of the prices (exact, rounded half-to-even past the inputs' precision).
    pub sma: String,
    /// Volume-weighted average price, when the ticks have sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vwap: Option<String>,
    /// Ticks averaged (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub count: String,
    /// Event time of the oldest tick averaged, ns (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub from_ns: String,
    /// Event time of the newest tick averaged, ns (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub to_ns: String,
}

impl From<v1::GetMovingAverageResponse> for MovingAverage {
    fn from(r: v1::GetMovingAverageResponse) -> Self {
        MovingAverage {
            asset_id: r.asset_id,
            sma: r.sma,
            vwap: r.vwap,
            count: r.count.to_string(),
            from_ns: r.from_ns.to_string(),
            to_ns: r.to_ns.to_string(),
        }
    }
}

/// Every asset id the store holds ticks of.
#[derive(Debug, Serialize, ToSchema)]
pub struct Assets {
    /// The asset ids.
    pub asset_ids: Vec<String>,
}

/// A live stream told this client it missed messages (`event: gap`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Gap {
    /// Messages missed (decimal string).
    #[schema(pattern = "^[0-9]+$")]
    pub missed: String,
    /// `client_slow`, `server_lagged` or `feed_reconnected`.
    pub reason: String,
}

impl From<v1::Gap> for Gap {
    fn from(g: v1::Gap) -> Self {
        Gap {
            missed: g.missed.to_string(),
            reason: g.reason,
        }
    }
}

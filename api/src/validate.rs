//! Argument checks shared by the handlers, and the opaque page token. Every failure is an
//! `INVALID_ARGUMENT` whose message names the field and says what is wrong.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tickfleet_proto::TickId;
use tonic::Status;

/// Longest accepted asset id (bytes).
pub const MAX_ASSET_ID_LEN: usize = 256;
/// Most asset ids in one request.
pub const MAX_ASSETS_PER_REQUEST: usize = 1000;
/// Page size when the request leaves `limit` at 0.
pub const DEFAULT_PAGE: u32 = 1000;
/// Largest page size (the store's hard cap).
pub const MAX_PAGE: u32 = tickfleet_store::MAX_PAGE as u32;

/// The gRPC metadata key (sent as a trailer) that names the request field an INVALID_ARGUMENT is
/// about, so a client (and the REST side's problem documents) can point at it without parsing text.
pub const FIELD_KEY: &str = "tickfleet-field";

/// An INVALID_ARGUMENT about `field`, with the field named in [`FIELD_KEY`] too.
pub fn invalid(field: &str, message: impl Into<String>) -> Status {
    let mut status = Status::invalid_argument(message);
    if let Ok(v) = field.parse() {
        status.metadata_mut().insert(FIELD_KEY, v);
    }
    status
}

/// The field an [`invalid`] status is about.
pub fn field_of(status: &Status) -> Option<&str> {
    status.metadata().get(FIELD_KEY)?.to_str().ok()
}

/// Checks one asset id.
pub fn asset_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(invalid(field, format!("{field} is required")));
    }
    if id.len() > MAX_ASSET_ID_LEN {
        return Err(invalid(
            field,
            format!(
                "{field} is {} bytes long; the limit is {MAX_ASSET_ID_LEN}",
                id.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{field} {id:?} contains control characters"),
        ));
    }
    Ok(())
}

/// Checks a list of asset ids (`empty_ok`: an empty list means "all").
pub fn asset_ids(field: &str, ids: &[String], empty_ok: bool) -> Result<(), Status> {
    if ids.is_empty() && !empty_ok {
        return Err(invalid(
            field,
            format!("{field} needs at least one asset id"),
        ));
    }
    if ids.len() > MAX_ASSETS_PER_REQUEST {
        return Err(invalid(
            field,
            format!(
                "{field} has {} ids; the limit is {MAX_ASSETS_PER_REQUEST}",
                ids.len()
            ),
        ));
    }
    for id in ids {
        asset_id(field, id)?;
    }
    Ok(())
}

/// Resolves optional `[from_ns, to_ns)` bounds (unset = unbounded) and checks them.
pub fn time_range(from_ns: Option<i64>, to_ns: Option<i64>) -> Result<(i64, i64), Status> {
    let from = from_ns.unwrap_or(0);
    let to = to_ns.unwrap_or(i64::MAX);
    if from < 0 {
        return Err(invalid(
            "from_ns",
            format!(
                "from_ns is {from}; times are nanoseconds since the Unix epoch and cannot be negative"
            ),
        ));
    }
    if to <= from {
        return Err(invalid(
            "to_ns",
            format!(
                "to_ns ({to}) must be greater than from_ns ({from}): the range is [from_ns, to_ns)"
            ),
        ));
    }
    Ok((from, to))
}

/// Resolves a page size: 0 means the default; above [`MAX_PAGE`] is an error.
pub fn page_size(limit: u32) -> Result<usize, Status> {
    match limit {
        0 => Ok(DEFAULT_PAGE as usize),
        l if l > MAX_PAGE => Err(invalid(
            "limit",
            format!(
                "limit is {l}; the most ticks one page holds is {MAX_PAGE} (0 = {DEFAULT_PAGE})"
            ),
        )),
        l => Ok(l as usize),
    }
}

/// What a page token carries: the query it belongs to and where to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken {
    /// Range lower bound of the query.
    pub from_ns: i64,
    /// Range upper bound of the query.
    pub to_ns: i64,
    /// Continue after this tick.
    pub after: TickId,
    /// The asset of the query.
    pub asset_id: String,
}

impl PageToken {
    /// The opaque text form: URL-safe base64 of `v1:FROM:TO:TIME-SEQ:ASSET`.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "v1:{}:{}:{}:{}",
            self.from_ns, self.to_ns, self.after, self.asset_id
        ))
    }

    /// Parses a token and checks that it belongs to this query.
    pub fn decode(token: &str, asset_id: &str, from_ns: i64, to_ns: i64) -> Result<Self, Status> {
        let bad = || {
            invalid(
                "page_token",
                "page_token is not one this api issued (pass next_page_token back unchanged)",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(5, ':');
        if parts.next() != Some("v1") {
            return Err(bad());
        }
        let mut next = || parts.next().ok_or_else(bad);
        let t = PageToken {
            from_ns: next()?.parse().map_err(|_| bad())?,
            to_ns: next()?.parse().map_err(|_| bad())?,
            after: next()?.parse().map_err(|_| bad())?,
            asset_id: next()?.to_owned(),
        };
        if t.asset_id != asset_id || t.from_ns != from_ns || t.to_ns != to_ns {
            return Err(invalid(
                "page_token",
                "page_token belongs to another query: keep asset_id, from_ns and to_ns as they were",
            ));
        }
        Ok(t)
    }
}

/// The client's deadline from the `grpc-timeout` header, if it set one.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_query() {
        let t = PageToken {
            from_ns: 5,
            to_ns: i64::MAX,
            after: TickId {
                event_time_ns: 1_700_000_000_000_000_000,
                seq: 9,
            },
            asset_id: "BTC:USD".into(),
        };
        let s = t.encode();
        assert_eq!(PageToken::decode(&s, "BTC:USD", 5, i64::MAX).unwrap(), t);
        assert!(PageToken::decode(&s, "ETH", 5, i64::MAX).is_err());
        assert!(PageToken::decode(&s, "BTC:USD", 6, i64::MAX).is_err());
        for junk in ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("v2:1:2:3-4:A")] {
            let e = PageToken::decode(junk, "A", 1, 2).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{junk:?}");
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}

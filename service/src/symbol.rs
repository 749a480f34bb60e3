//! The symbol rule every tickfleet part uses: the connector parses its `--symbols` with it, and the
//! operator checks a `TickPipeline`'s `spec.sources[].symbols` with it (in the canonical spelling
//! the CRD's schema asks for), so what the CRD and operator accept is what the connector reads.

use std::fmt;
use std::str::FromStr;

/// Most ASCII letters or digits on each side of a symbol's `-`.
pub const MAX_SYMBOL_PART: usize = 16;

/// A normalised symbol, `BASE-QUOTE` in upper case (e.g. `BTC-USDT`): the Kafka key and the asset id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol {
    /// Base asset, e.g. `BTC`.
    pub base: String,
    /// Quote asset, e.g. `USDT`.
    pub quote: String,
}

impl FromStr for Symbol {
    type Err = String;

    /// Parses `BASE-QUOTE`: two non-empty runs of ASCII letters and digits (at most [`MAX_SYMBOL_PART`] each) around one
    /// `-`; lower case is accepted and upper-cased.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (base, quote) = s
            .trim()
            .split_once('-')
            .ok_or_else(|| format!("symbol {s:?} is not BASE-QUOTE (e.g. BTC-USDT)"))?;
        let ok = |part: &str| {
            !part.is_empty()
                && part.len() <= MAX_SYMBOL_PART
                && part.bytes().all(|b| b.is_ascii_alphanumeric())
        };
        if !ok(base) || !ok(quote) {
            return Err(format!(
                "symbol {s:?} is not BASE-QUOTE: base and quote must be 1-16 ASCII letters or digits"
            ));
        }
        Ok(Symbol {
            base: base.to_ascii_uppercase(),
            quote: quote.to_ascii_uppercase(),
        })
    }
}

impl Symbol {
    /// Whether `s` is a symbol in its canonical spelling (upper case, no white space): the form
    /// the CRD asks for, because a symbol is an asset id and a Kafka key, and two spellings of
    /// one asset would pass a duplicate check.
    pub fn is_canonical(s: &str) -> bool {
        s.parse::<Symbol>().is_ok_and(|sym| sym.to_string() == s)
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.base, self.quote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_parse_normalise_and_reject_junk() {
        let s: Symbol = "btc-usdt".parse().unwrap();
        assert_eq!(s.to_string(), "BTC-USDT");
        for bad in [
            "BTCUSDT",
            "-USDT",
            "BTC-",
            "BTC-US-DT",
            "BT C-USD",
            "BTC/USD",
            "",
            "ABCDEFGHIJKLMNOPQ-USD",
        ] {
            assert!(bad.parse::<Symbol>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn canonical_is_the_upper_case_spelling() {
        for good in ["BTC-USDT", "1INCH-USD", "ABCDEFGHIJKLMNOP-USD"] {
            assert!(Symbol::is_canonical(good), "{good:?}");
        }
        for other in ["btc-usdt", "Btc-USDT", " BTC-USDT", "BTC-USDT ", "BTCUSDT"] {
            assert!(!Symbol::is_canonical(other), "{other:?}");
        }
    }
}

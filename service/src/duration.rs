//! Durations as people type them: a whole number and a unit, `250ms`, `30s`, `5m`, `1h`, `1d`. One
//! parser for every place that reads one (candle intervals and windows in the api, `--since` in
//! `tickctl`); each caller adds its own bounds and words its own errors.

use crate::Error;

/// Nanoseconds in each unit a duration may have.
const UNITS: [(&str, i64); 5] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// Parses a whole number followed by `ms`, `s`, `m`, `h` or `d` (nothing between them, nothing
/// around them) into nanoseconds. Zero is allowed; bounds are the caller's.
pub fn parse_duration_ns(s: &str) -> Result<i64, Error> {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let Some((_, unit_ns)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(Error::DurationUnit(s.to_owned()));
    };
    let n: i64 = n.parse().map_err(|_| Error::DurationNumber(s.to_owned()))?;
    n.checked_mul(*unit_ns)
        .ok_or_else(|| Error::DurationOverflow(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let second = 1_000_000_000;
        for (text, ns) in [
            ("250ms", second / 4),
            ("30s", 30 * second),
            ("5m", 300 * second),
            ("1h", 3600 * second),
            ("7d", 7 * 86_400 * second),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration_ns(text), Ok(ns), "{text}");
        }
    }

    #[test]
    fn each_kind_of_mistake_has_its_error() {
        for bad in ["", "1", "1x", "-1s", "1.5s", "1 s", "s1"] {
            assert_eq!(
                parse_duration_ns(bad),
                Err(Error::DurationUnit(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_duration_ns("s"),
            Err(Error::DurationNumber("s".into()))
        );
        assert_eq!(
            parse_duration_ns("99999999999999999999h"),
            Err(Error::DurationNumber("99999999999999999999h".into())),
            "more than an i64"
        );
        assert_eq!(
            parse_duration_ns("9999999999999d"),
            Err(Error::DurationOverflow("9999999999999d".into()))
        );
    }
}

//! Go-compatible duration text.
//!
//! Consul is written in Go and speaks Go's [`time.Duration`] text format on
//! the wire: a session's `TTL` is sent as `"15s"`, its `LockDelay` as `"15s"`,
//! and Consul replies with TTLs rendered by Go's `Duration.String()` (for
//! example `"1m30s"` or `"1h0m0s"`). To interoperate byte-for-byte we
//! implement the same grammar and the same formatting here, on top of
//! [`std::time::Duration`].
//!
//! * [`parse()`] follows Go's `time.ParseDuration`: an optional sign, then one
//!   or more `<decimal number><unit>` pairs such as `"1h2m3.5s"`.
//! * [`format()`] follows Go's `Duration.String()`.
//! * [`format_millis_wait`] renders the `wait` query parameter of Consul's
//!   blocking queries as whole milliseconds, rounded up.
//!
//! Two deliberate differences from Go, both because
//! [`std::time::Duration`] is unsigned:
//!
//! * a negative non-zero duration is rejected with
//!   [`DurationError::Negative`] (`"-0s"` is still zero);
//! * durations longer than Go's maximum ([`MAX`], `i64::MAX` nanoseconds,
//!   about 292 years) cannot be parsed, and [`format()`] saturates them to the
//!   text of [`MAX`].
//!
//! [`time.Duration`]: https://pkg.go.dev/time#Duration

use std::fmt::Write as _;
use std::time::Duration;

/// The largest duration Go can represent: `i64::MAX` nanoseconds,
/// formatted as `2562047h47m16.854775807s`.
///
/// [`parse()`] rejects anything longer with [`DurationError::Overflow`] and
/// [`format()`] saturates to this value.
pub const MAX: Duration = Duration::from_nanos(MAX_NANOS);

/// `i64::MAX` as nanoseconds (lossless: the value is positive).
const MAX_NANOS: u64 = i64::MAX as u64;

/// Go's internal overflow threshold while parsing, `1 << 63`. Go allows the
/// accumulated magnitude to reach it so that `-1 << 63` parses.
const LIMIT: u64 = 1 << 63;

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// How many characters of the offending input an error keeps.
const MAX_ERROR_INPUT_CHARS: usize = 64;

/// Why a string is not a valid Go duration.
///
/// Every variant carries the offending input, truncated to 64 characters
/// (with a trailing `…` when cut), so that an enormous input cannot produce
/// an enormous error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The input was the empty string.
    #[error(
        "invalid duration \"\": the string is empty; expected a number followed by a unit such as 15s, 1m30s, 1.5s or 150ms"
    )]
    Empty,
    /// The input does not follow the `[-+]?(<number><unit>)+` grammar.
    #[error(
        "invalid duration {input:?}: expected a number followed by a unit such as 15s, 1m30s, 1.5s or 150ms"
    )]
    Invalid {
        /// The offending input (possibly truncated).
        input: String,
    },
    /// A number was not followed by a unit (for example `"15"`); only a
    /// bare `"0"` may omit the unit.
    #[error(
        "missing unit in duration {input:?}: every number needs a unit (ns, us, µs, ms, s, m or h), e.g. 15s"
    )]
    MissingUnit {
        /// The offending input (possibly truncated).
        input: String,
    },
    /// A number was followed by a unit Go does not know (for example `"1d"`).
    #[error("unknown unit {unit:?} in duration {input:?}: valid units are ns, us (or µs/μs), ms, s, m and h")]
    UnknownUnit {
        /// The offending input (possibly truncated).
        input: String,
        /// The unknown unit (possibly truncated).
        unit: String,
    },
    /// The duration is negative and non-zero; only non-negative durations
    /// are supported.
    #[error("negative duration {input:?}: durations must be zero or positive")]
    Negative {
        /// The offending input (possibly truncated).
        input: String,
    },
    /// The duration exceeds Go's maximum of `i64::MAX` nanoseconds
    /// (`2562047h47m16.854775807s`).
    #[error("duration {input:?} is too large: the maximum is 2562047h47m16.854775807s")]
    Overflow {
        /// The offending input (possibly truncated).
        input: String,
    },
}

/// Truncates `s` to [`MAX_ERROR_INPUT_CHARS`] characters, marking a cut with `…`.
fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_INPUT_CHARS) {
        None => s.to_owned(),
        Some((cut, _)) => {
            let mut out = s.get(..cut).unwrap_or_default().to_owned();
            out.push('…');
            out
        }
    }
}

/// Parses a Go duration string, exactly like Go's `time.ParseDuration`.
///
/// The grammar is `[-+]?(<decimal><unit>)+` where a decimal is `1`, `1.5`,
/// `.5` or `1.`, and a unit is one of `ns`, `us`, `µs` (U+00B5), `μs`
/// (U+03BC), `ms`, `s`, `m`, `h`. A bare `"0"` (optionally signed) is the
/// only number allowed without a unit. Fractions finer than a nanosecond
/// are truncated toward zero, using Go's own (floating-point) arithmetic so
/// results match Go bit for bit.
///
/// # Errors
///
/// * [`DurationError::Empty`] for `""`;
/// * [`DurationError::Invalid`] when the text does not follow the grammar;
/// * [`DurationError::MissingUnit`] for a number without a unit, e.g. `"15"`;
/// * [`DurationError::UnknownUnit`] for an unknown unit, e.g. `"1d"`;
/// * [`DurationError::Negative`] for a negative non-zero duration, e.g. `"-1s"`;
/// * [`DurationError::Overflow`] above `i64::MAX` nanoseconds ([`MAX`]).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use consul_lock_core::duration::{parse, DurationError};
///
/// assert_eq!(parse("15s"), Ok(Duration::from_secs(15)));
/// assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse("150ms"), Ok(Duration::from_millis(150)));
/// assert_eq!(parse("0"), Ok(Duration::ZERO));
/// assert!(matches!(parse("15"), Err(DurationError::MissingUnit { .. })));
/// assert!(matches!(parse("-1s"), Err(DurationError::Negative { .. })));
/// ```
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid { input: clip(s) };
    let overflow = || DurationError::Overflow { input: clip(s) };

    if s.is_empty() {
        return Err(DurationError::Empty);
    }

    // Consume [-+]?
    let mut rest = s.as_bytes();
    let mut neg = false;
    if let Some((&sign @ (b'-' | b'+'), tail)) = rest.split_first() {
        neg = sign == b'-';
        rest = tail;
    }
    // Special case: if all that is left is "0", this is zero.
    if rest == b"0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }

    let mut total: u64 = 0;
    while let Some(&first) = rest.first() {
        // The next character must be [0-9.].
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }

        // Consume [0-9]*.
        let before = rest.len();
        // Go reports this as "invalid duration"; it is an integer too large
        // for 64 bits, so we call it what it is.
        let (mut value, tail) = leading_int(rest).ok_or_else(overflow)?;
        rest = tail;
        let pre = rest.len() != before;

        // Consume (\.[0-9]*)?
        let mut post = false;
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        if let Some((b'.', tail)) = rest.split_first() {
            let before = tail.len();
            let (f, sc, tail) = leading_fraction(tail);
            frac = f;
            scale = sc;
            post = tail.len() != before;
            rest = tail;
        }
        if !pre && !post {
            // No digits at all, e.g. ".s" or "-.s".
            return Err(invalid());
        }

        // Consume the unit: everything up to the next [0-9.].
        let unit_len = rest
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit { input: clip(s) });
        }
        let (unit_text, tail) = rest.split_at_checked(unit_len).unwrap_or((rest, &[]));
        rest = tail;
        let unit = unit_nanos(unit_text).ok_or_else(|| DurationError::UnknownUnit {
            input: clip(s),
            unit: clip(&String::from_utf8_lossy(unit_text)),
        })?;

        if value > LIMIT / unit {
            return Err(overflow());
        }
        value *= unit;
        if frac > 0 {
            // Go: float64 is needed to be nanosecond accurate for fractions
            // of hours; the product is at most one `unit` (<= 3.6e12), and
            // the float-to-int conversion truncates toward zero. Reproducing
            // the exact float operations keeps us bit-identical with Go.
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            let extra = (frac as f64 * (unit as f64 / scale)) as u64;
            value = value.checked_add(extra).ok_or_else(overflow)?;
            if value > LIMIT {
                return Err(overflow());
            }
        }
        // Go adds without a wrap check here (its sum can wrap past 2^64);
        // we check instead.
        total = total
            .checked_add(value)
            .filter(|&t| t <= LIMIT)
            .ok_or_else(overflow)?;
    }

    if neg {
        return if total == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(DurationError::Negative { input: clip(s) })
        };
    }
    if total > MAX_NANOS {
        return Err(overflow());
    }
    Ok(Duration::from_nanos(total))
}

/// Go's `leadingInt`: consumes `[0-9]*`, failing once the value exceeds `1 << 63`.
fn leading_int(s: &[u8]) -> Option<(u64, &[u8])> {
    let mut x: u64 = 0;
    let mut len = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return None;
        }
        len += 1;
    }
    Some((x, s.get(len..).unwrap_or_default()))
}

/// Go's `leadingFraction`: consumes `[0-9]*` after the decimal point and
/// returns the digits as an integer `x` with `scale` such that the fraction
/// is `x / scale`. Digits that no longer fit are consumed but ignored.
fn leading_fraction(s: &[u8]) -> (u64, f64, &[u8]) {
    let mut x: u64 = 0;
    let mut scale: f64 = 1.0;
    let mut overflow = false;
    let mut len = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        len += 1;
        if overflow {
            continue;
        }
        if x > MAX_NANOS / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, s.get(len..).unwrap_or_default())
}

/// Go's `unitMap`: nanoseconds per unit.
fn unit_nanos(unit: &[u8]) -> Option<u64> {
    match unit {
        b"ns" => Some(NANOSECOND),
        // "µs" (U+00B5 MICRO SIGN) and "μs" (U+03BC GREEK SMALL LETTER MU).
        b"us" | b"\xc2\xb5s" | b"\xce\xbcs" => Some(MICROSECOND),
        b"ms" => Some(MILLISECOND),
        b"s" => Some(SECOND),
        b"m" => Some(MINUTE),
        b"h" => Some(HOUR),
        _ => None,
    }
}

/// Formats a duration exactly like Go's `Duration.String()`.
///
/// Zero is `"0s"`; durations under one second use the largest of `ns`, `µs`
/// (U+00B5 MICRO SIGN, as Go prints it) and `ms` that fits, with trailing
/// zeros of the fraction trimmed (`"1.5ms"`); longer durations use the
/// `XhYmZ.FFFs` form with leading zero units omitted (`"15s"`, `"1m30s"`,
/// `"1h0m0s"`).
///
/// Durations longer than Go can represent (above [`MAX`], `i64::MAX`
/// nanoseconds) saturate: they are formatted as [`MAX`], i.e.
/// `"2562047h47m16.854775807s"`.
///
/// For every `d <= MAX`, `parse(&format(d)) == Ok(d)`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use consul_lock_core::duration::format;
///
/// assert_eq!(format(Duration::ZERO), "0s");
/// assert_eq!(format(Duration::from_secs(15)), "15s");
/// assert_eq!(format(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format(Duration::from_secs(3600)), "1h0m0s");
/// assert_eq!(format(Duration::from_millis(1500)), "1.5s");
/// assert_eq!(format(Duration::from_micros(1500)), "1.5ms");
/// assert_eq!(format(Duration::MAX), "2562047h47m16.854775807s");
/// ```
#[must_use]
pub fn format(d: Duration) -> String {
    let nanos = u64::try_from(d.as_nanos())
        .ok()
        .filter(|&n| n <= MAX_NANOS)
        .unwrap_or(MAX_NANOS);

    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    if nanos < SECOND {
        // Smaller units, like 1.2ms.
        let (prec, unit) = if nanos < MICROSECOND {
            (0, "ns")
        } else if nanos < MILLISECOND {
            (3, "\u{b5}s")
        } else {
            (6, "ms")
        };
        let (int, frac) = split_frac(nanos, prec);
        // Writing to a String cannot fail.
        let _ = write!(out, "{int}{frac}{unit}");
    } else {
        let (secs, frac) = split_frac(nanos, 9);
        let mins = secs / 60;
        if mins > 0 {
            let hours = mins / 60;
            // Stop at hours because days can be different lengths.
            if hours > 0 {
                let _ = write!(out, "{hours}h");
            }
            let _ = write!(out, "{}m", mins % 60);
        }
        let _ = write!(out, "{}{frac}s", secs % 60);
    }
    out
}

/// Go's `fmtFrac`: splits `v` into `v / 10^prec` and the fraction text
/// (`".12"`, trailing zeros trimmed, empty when the fraction is zero).
fn split_frac(v: u64, prec: u32) -> (u64, String) {
    let pow = 10u64.pow(prec);
    let int = v / pow;
    let mut frac = v % pow;
    if frac == 0 {
        return (int, String::new());
    }
    let mut width = usize::try_from(prec).unwrap_or(0);
    while frac % 10 == 0 {
        frac /= 10;
        width = width.saturating_sub(1);
    }
    (int, format!(".{frac:0width$}"))
}

/// Formats a duration as the `wait` parameter of a Consul blocking query:
/// whole milliseconds followed by `ms`, e.g. `"15000ms"`.
///
/// Milliseconds are rounded up, so a non-zero sub-millisecond wait is sent
/// as `"1ms"` rather than `"0ms"` (which Consul would treat as "use the
/// default wait"). Zero is `"0ms"`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use consul_lock_core::duration::format_millis_wait;
///
/// assert_eq!(format_millis_wait(Duration::from_secs(15)), "15000ms");
/// assert_eq!(format_millis_wait(Duration::from_nanos(1)), "1ms");
/// ```
#[must_use]
pub fn format_millis_wait(d: Duration) -> String {
    format!("{}ms", wait_millis(d))
}

/// The whole milliseconds a wait of `d` is sent as: rounded up, so that a wait is never sent
/// shorter than asked.
pub(crate) fn wait_millis(d: Duration) -> u128 {
    let partial = d.subsec_nanos() % 1_000_000 != 0;
    d.as_millis() + u128::from(partial)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: u64 = 1;
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    #[test]
    fn parse_valid_table() {
        let cases: &[(&str, u64)] = &[
            // Consul examples
            ("15s", 15 * S),
            ("1m30s", M + 30 * S),
            ("1.5s", S + 500 * MS),
            ("150ms", 150 * MS),
            ("1h0m0s", H),
            ("0s", 0),
            // simple
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            // sign
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            ("-0s", 0),
            ("-0.0h", 0),
            ("-0.0000000001s", 0),
            // decimal
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            ("1.s", S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("1.0000000009s", S),
            ("0.9ns", 0),
            // units
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            // composite
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("1s1s", 2 * S),
            ("00s", 0),
            // large values
            ("52763797000ns", 52_763_797_000),
            ("9007199254740993ns", (1 << 53) + 1),
            // more than 9 digits after the decimal point (golang.org/issue/6617);
            // exact arithmetic would give 1199999999999ns, Go's float gives 20m
            ("0.3333333333333333333h", 20 * M),
            // huge fraction (Go issue 15011)
            ("0.100000000000000000000h", 6 * M),
            // first overflow check in leadingFraction
            ("0.830103483285477580700h", 49 * M + 48 * S + 372_539_827),
            // the largest duration
            ("9223372036854775807ns", MAX_NANOS),
            ("9223372036854775.807us", MAX_NANOS),
            ("9223372036s854ms775us807ns", MAX_NANOS),
            ("2562047h47m16.854775807s", MAX_NANOS),
        ];
        for &(input, want) in cases {
            assert_eq!(parse(input), Ok(ns(want)), "parse({input:?})");
        }
    }

    #[test]
    fn parse_error_table() {
        use DurationError as E;
        let invalid = |s: &str| E::Invalid { input: s.into() };
        let missing = |s: &str| E::MissingUnit { input: s.into() };
        let unknown = |s: &str, u: &str| E::UnknownUnit {
            input: s.into(),
            unit: u.into(),
        };
        let negative = |s: &str| E::Negative { input: s.into() };
        let overflow = |s: &str| E::Overflow { input: s.into() };
        let cases: Vec<(&str, DurationError)> = vec![
            ("", E::Empty),
            ("1", missing("1")),
            ("3", missing("3")),
            ("1.5", missing("1.5")),
            ("1s.", invalid("1s.")),
            ("1s.", invalid("1s.")),
            ("1x", unknown("1x", "x")),
            ("1d", unknown("1d", "d")),
            ("1S", unknown("1S", "S")),
            ("1sec", unknown("1sec", "sec")),
            ("1 s", unknown("1 s", " s")),
            ("1s-2s", unknown("1s-2s", "s-")),
            ("1\u{b5}", unknown("1\u{b5}", "\u{b5}")),
            ("s", invalid("s")),
            ("-", invalid("-")),
            ("+", invalid("+")),
            (".", invalid(".")),
            ("-.", invalid("-.")),
            (".s", invalid(".s")),
            ("+.s", invalid("+.s")),
            ("1s.s", invalid("1s.s")),
            (" 1s", invalid(" 1s")),
            ("--1s", invalid("--1s")),
            ("+-1s", invalid("+-1s")),
            ("\u{fffd}", invalid("\u{fffd}")),
            ("-1s", negative("-1s")),
            ("-5s", negative("-5s")),
            ("-1ns", negative("-1ns")),
            ("-2m3.4s", negative("-2m3.4s")),
            ("-9223372036854775808ns", negative("-9223372036854775808ns")),
            ("-2562047h47m16.854775808s", negative("-2562047h47m16.854775808s")),
            ("-1x", unknown("-1x", "x")),
            ("9223372036854775808ns", overflow("9223372036854775808ns")),
            ("9223372036854775810ns", overflow("9223372036854775810ns")),
            ("-9223372036854775809ns", overflow("-9223372036854775809ns")),
            ("9223372036854776us", overflow("9223372036854776us")),
            ("9223372036854775.808us", overflow("9223372036854775.808us")),
            ("9223372036854ms775us808ns", overflow("9223372036854ms775us808ns")),
            ("2562048h", overflow("2562048h")),
            ("2562047.9h", overflow("2562047.9h")),
            ("3000000h", overflow("3000000h")),
            ("2562047h47m16.854775808s", overflow("2562047h47m16.854775808s")),
            ("99999999999999999999s", overflow("99999999999999999999s")),
            // Go wraps its uint64 sum here and returns 0; we report overflow.
            (
                "9223372036854775808ns9223372036854775808ns",
                overflow("9223372036854775808ns9223372036854775808ns"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Err(want), "parse({input:?})");
        }
    }

    #[test]
    fn error_messages_name_the_input() {
        for input in ["abc", "1", "1x", "-1s", "2562048h", ""] {
            let err = parse(input).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{input:?}")), "{msg}");
        }
        assert_eq!(
            parse("abc").unwrap_err().to_string(),
            "invalid duration \"abc\": expected a number followed by a unit such as 15s, 1m30s, 1.5s or 150ms"
        );
        let msg = parse("1x").unwrap_err().to_string();
        assert!(msg.contains("\"x\"") && msg.contains("ms, s, m and h"), "{msg}");
    }

    #[test]
    fn error_input_is_truncated() {
        let huge = format!("1{}", "x".repeat(100_000));
        match parse(&huge).unwrap_err() {
            DurationError::UnknownUnit { input, unit } => {
                assert_eq!(input.chars().count(), MAX_ERROR_INPUT_CHARS + 1);
                assert!(input.ends_with('…'));
                assert_eq!(unit.chars().count(), MAX_ERROR_INPUT_CHARS + 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Truncation counts characters, never splitting a multi-byte one.
        let multibyte = "\u{3bc}".repeat(200);
        match parse(&multibyte).unwrap_err() {
            DurationError::Invalid { input } => {
                assert_eq!(input, format!("{}…", "\u{3bc}".repeat(64)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(&huge).unwrap_err().to_string().len() < 400);
    }

    #[test]
    fn format_table() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (1, "1ns"),
            (999, "999ns"),
            (1_100, "1.1\u{b5}s"),
            (1_000, "1\u{b5}s"),
            (2_200 * US, "2.2ms"),
            (1_500 * US, "1.5ms"),
            (150 * MS, "150ms"),
            (999_999_999, "999.999999ms"),
            (S, "1s"),
            (1_500 * MS, "1.5s"),
            (3_300 * MS, "3.3s"),
            (15 * S, "15s"),
            (M, "1m0s"),
            (90 * S, "1m30s"),
            (4 * M + 5 * S, "4m5s"),
            (4 * M + 5_001 * MS, "4m5.001s"),
            (5 * H + 6 * M + 7_001 * MS, "5h6m7.001s"),
            (8 * M + 1, "8m0.000000001s"),
            (H, "1h0m0s"),
            (24 * H, "24h0m0s"),
            (MAX_NANOS, "2562047h47m16.854775807s"),
        ];
        for &(nanos, want) in cases {
            assert_eq!(format(ns(nanos)), want, "format({nanos}ns)");
        }
    }

    #[test]
    fn format_saturates_above_go_max() {
        let max_text = "2562047h47m16.854775807s";
        assert_eq!(format(MAX), max_text);
        assert_eq!(format(MAX + Duration::from_nanos(1)), max_text);
        assert_eq!(format(Duration::from_secs(u64::MAX)), max_text);
        assert_eq!(format(Duration::MAX), max_text);
    }

    #[test]
    fn format_millis_wait_table() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0ms"),
            (ns(1), "1ms"),
            (ns(999_999), "1ms"),
            (ns(MS), "1ms"),
            (ns(MS + 1), "2ms"),
            (Duration::from_secs(15), "15000ms"),
            (Duration::from_secs(300), "300000ms"),
            (Duration::new(1, 1), "1001ms"),
        ];
        for &(d, want) in cases {
            assert_eq!(format_millis_wait(d), want, "format_millis_wait({d:?})");
        }
        // No overflow on the largest std Duration.
        assert!(format_millis_wait(Duration::MAX).ends_with("ms"));
    }

    proptest! {
        #[test]
        fn roundtrip_any(nanos in 0..=MAX_NANOS) {
            let d = ns(nanos);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn roundtrip_small(nanos in 0..=(48 * H)) {
            let d = ns(nanos);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn roundtrip_whole_millis(millis in 0..=(MAX_NANOS / MS)) {
            let d = Duration::from_millis(millis);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn parse_never_panics(s in ".*") {
            let _ = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_grammar_alphabet(s in "[0-9.+\\-a-z\u{b5}\u{3bc}]{0,20}") {
            if let Ok(d) = parse(&s) {
                // Anything accepted is in range and survives a round trip.
                prop_assert!(d <= MAX);
                prop_assert_eq!(parse(&format(d)), Ok(d));
            }
        }

        #[test]
        fn format_millis_wait_never_rounds_down(nanos in any::<u64>()) {
            let d = ns(nanos);
            let text = format_millis_wait(d);
            let millis: u128 = text.strip_suffix("ms").unwrap().parse().unwrap();
            prop_assert!(millis * 1_000_000 >= u128::from(nanos));
            prop_assert!(millis * 1_000_000 < u128::from(nanos) + 1_000_000);
        }
    }
}

//! `consul_lock_core::duration` against an independent reference of Go's duration grammar.
//!
//! - `parse(s)` vs [`reference`]: the grammar `[-+]?("0" | (<digits>[.<digits>]<unit>)+)`
//!   evaluated in exact integer arithmetic (u128), each number's fraction truncated to whole
//!   nanoseconds. Go (and so core) computes fractions in floating point, which may land 1 ns off
//!   the exact value for each number with a fraction: values must agree within that many
//!   nanoseconds, and where the exact value is that close to a limit (0 for a negative input,
//!   Go's maximum), either outcome is accepted. Everything else must agree exactly: Ok or Err,
//!   the error's kind, the unknown unit's text.
//! - `format(d)` vs an independent Go `Duration.String()`, and `parse(format(d)) == d`, for every
//!   parsed `d` and for the input's first 8 bytes taken as nanoseconds.
//! - `format_millis_wait(d)` is whole milliseconds, rounded up.
//!
//! Input: the text (invalid UTF-8 is replaced, lossily).
#![no_main]

use std::time::Duration;

use consul_lock_core::duration::{DurationError, MAX, format, format_millis_wait, parse};
use libfuzzer_sys::fuzz_target;

/// 2^63: Go's bound on each number's value and on the running total.
const LIMIT: u128 = 1 << 63;
/// Go's largest duration, 2^63 - 1 ns.
const MAX_NANOS: u128 = LIMIT - 1;

#[derive(Clone, Debug, PartialEq, Eq)]
enum RefError {
    Empty,
    Invalid,
    MissingUnit,
    UnknownUnit(String),
    Negative,
    Overflow,
}

/// The reference's verdict: the exact value (or the error), how many nanoseconds Go's floating
/// point may be off (one per number with a fraction), and whether the exact value is within that
/// of a limit, so that Go's outcome may differ.
#[derive(Debug)]
struct Verdict {
    outcome: Result<u128, RefError>,
    tolerance: u128,
    borderline: bool,
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// `floor(0.<digits> * unit)` from the first 24 digits (the rest move it by under 1e-11 ns).
fn fraction_nanos(digits: &[u8], unit: u128) -> u128 {
    let mut num: u128 = 0;
    let mut den: u128 = 1;
    for &d in digits.iter().take(24) {
        num = num * 10 + u128::from(d - b'0');
        den *= 10;
    }
    num * unit / den
}

fn near(a: u128, b: u128, tolerance: u128) -> bool {
    a.abs_diff(b) <= tolerance
}

/// Go's `time.ParseDuration`, restricted to non-negative results like core's (a negative
/// non-zero duration is an error).
fn reference(s: &str) -> Verdict {
    let verdict = |outcome, tolerance, borderline| Verdict {
        outcome,
        tolerance,
        borderline,
    };
    if s.is_empty() {
        return verdict(Err(RefError::Empty), 0, false);
    }
    let (neg, rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return verdict(Ok(0), 0, false);
    }
    if rest.is_empty() {
        return verdict(Err(RefError::Invalid), 0, false);
    }
    let b = rest.as_bytes();
    let is_num = |c: u8| c == b'.' || c.is_ascii_digit();
    let mut i = 0;
    let mut total: u128 = 0;
    let mut tolerance: u128 = 0;
    // Set once any value compared with a limit came within `tolerance` of it (sticky: an
    // intermediate sum that Go's rounding pushes over 2^63 fails there, whatever follows).
    let mut borderline = false;
    while i < b.len() {
        if !is_num(b[i]) {
            return verdict(Err(RefError::Invalid), tolerance, borderline);
        }
        // The integer part: any value over 2^63 is an error at once, whatever the unit.
        let start = i;
        let mut int: u128 = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            int = int * 10 + u128::from(b[i] - b'0');
            if int > LIMIT {
                return verdict(Err(RefError::Overflow), tolerance, borderline);
            }
            i += 1;
        }
        let pre = i > start;
        let mut frac: &[u8] = &[];
        let mut post = false;
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let fstart = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            frac = &b[fstart..i];
            post = i > fstart;
        }
        if !pre && !post {
            return verdict(Err(RefError::Invalid), tolerance, borderline);
        }
        let ustart = i;
        while i < b.len() && !is_num(b[i]) {
            i += 1;
        }
        if i == ustart {
            return verdict(Err(RefError::MissingUnit), tolerance, borderline);
        }
        // The unit ends before an ASCII byte, so this is a char boundary.
        let unit_text = &rest[ustart..i];
        let Some(unit) = unit_nanos(unit_text) else {
            return verdict(Err(RefError::UnknownUnit(clip(unit_text))), tolerance, borderline);
        };
        let mut value = int * unit;
        if value > LIMIT {
            return verdict(Err(RefError::Overflow), tolerance, borderline);
        }
        // Go adds a fraction only when its (first ~18) digits are not all zero.
        if frac.iter().take(18).any(|&d| d != b'0') {
            tolerance += 1;
            value += fraction_nanos(frac, unit);
            borderline |= near(value, LIMIT, tolerance);
            if value > LIMIT {
                return verdict(Err(RefError::Overflow), tolerance, borderline);
            }
        }
        total += value;
        borderline |= near(total, LIMIT, tolerance);
        if total > LIMIT {
            return verdict(Err(RefError::Overflow), tolerance, borderline);
        }
    }
    if neg {
        borderline |= total <= tolerance;
        return if total == 0 {
            verdict(Ok(0), tolerance, borderline)
        } else {
            verdict(Err(RefError::Negative), tolerance, borderline)
        };
    }
    borderline |= near(total, MAX_NANOS, tolerance);
    if total > MAX_NANOS {
        return verdict(Err(RefError::Overflow), tolerance, borderline);
    }
    verdict(Ok(total), tolerance, borderline)
}

/// Core's error, in the reference's terms.
fn kind(e: &DurationError) -> RefError {
    match e {
        DurationError::Empty => RefError::Empty,
        DurationError::Invalid { .. } => RefError::Invalid,
        DurationError::MissingUnit { .. } => RefError::MissingUnit,
        DurationError::UnknownUnit { unit, .. } => RefError::UnknownUnit(unit.clone()),
        DurationError::Negative { .. } => RefError::Negative,
        DurationError::Overflow { .. } => RefError::Overflow,
        other => panic!("a DurationError this target does not know: {other:?}"),
    }
}

/// What errors keep of a text: 64 characters, then `…`.
fn clip(s: &str) -> String {
    if s.chars().count() > 64 {
        let mut out: String = s.chars().take(64).collect();
        out.push('…');
        out
    } else {
        s.to_owned()
    }
}

/// Go's `Duration.String()`, written afresh.
fn go_string(nanos: u64) -> String {
    fn frac(v: u64, digits: u32) -> String {
        let f = v % 10u64.pow(digits);
        if f == 0 {
            return String::new();
        }
        let text = format!("{f:0width$}", width = digits as usize);
        format!(".{}", text.trim_end_matches('0'))
    }
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}{}\u{b5}s", nanos / 1_000, frac(nanos, 3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}{}ms", nanos / 1_000_000, frac(nanos, 6));
    }
    let secs = nanos / 1_000_000_000;
    let s = format!("{}{}s", secs % 60, frac(nanos, 9));
    let (h, m) = (secs / 3600, (secs / 60) % 60);
    if h > 0 {
        format!("{h}h{m}m{s}")
    } else if m > 0 {
        format!("{m}m{s}")
    } else {
        s
    }
}

fn check_format(d: Duration) {
    let nanos = u64::try_from(d.as_nanos())
        .unwrap_or(u64::MAX)
        .min(i64::MAX as u64);
    let text = format(d);
    assert_eq!(text, go_string(nanos), "format({d:?})");
    assert_eq!(
        parse(&text),
        Ok(Duration::from_nanos(nanos)),
        "parse(format({d:?})) = parse({text:?})"
    );
    let wait = format_millis_wait(d);
    let millis: u128 = match wait.strip_suffix("ms").map(str::parse) {
        Some(Ok(m)) => m,
        _ => panic!("format_millis_wait({d:?}) = {wait:?}"),
    };
    assert!(
        millis * 1_000_000 >= d.as_nanos() && millis * 1_000_000 < d.as_nanos() + 1_000_000,
        "format_millis_wait({d:?}) = {wait:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let got = parse(&s);
    let want = reference(&s);

    match (&got, &want.outcome) {
        (Ok(d), Ok(n)) => {
            let d = d.as_nanos();
            assert!(
                near(d, *n, want.tolerance),
                "parse({s:?}) = {d} ns, the exact value is {n} ns (tolerance {} ns)",
                want.tolerance
            );
        }
        (Err(e), Err(w)) if !want.borderline => {
            assert_eq!(&kind(e), w, "parse({s:?}) failed with the wrong error: {e:?}");
        }
        (Err(_), Err(_)) => {}
        _ => assert!(
            want.borderline,
            "parse({s:?}) = {got:?}, the reference says {:?}",
            want.outcome
        ),
    }
    if let Err(e) = &got {
        // Errors name the input (cut), and an unknown unit its text (cut).
        let input = match e {
            DurationError::Empty => None,
            DurationError::Invalid { input }
            | DurationError::MissingUnit { input }
            | DurationError::Negative { input }
            | DurationError::Overflow { input }
            | DurationError::UnknownUnit { input, .. } => Some(input),
            _ => None,
        };
        if let Some(input) = input {
            assert_eq!(input, &clip(&s), "the error's input for {s:?}");
        }
        if let DurationError::UnknownUnit { unit, .. } = e {
            assert!(unit.chars().count() <= 65, "the unit is not cut: {unit:?}");
        }
    }
    if let Ok(d) = got {
        assert!(d <= MAX, "parse({s:?}) = {d:?}, over Go's maximum");
        check_format(d);
    }

    let mut raw = [0u8; 8];
    for (r, b) in raw.iter_mut().zip(data) {
        *r = *b;
    }
    check_format(Duration::from_nanos(u64::from_le_bytes(raw)));
});

//! Go's `time.ParseDuration` and `time.Duration.String`, byte for byte, error texts included:
//! Consul parses `wait`, `TTL` and `LockDelay` with the former and prints limits with the latter.

const NANOSECOND: i64 = 1;
const MICROSECOND: i64 = 1_000;
const MILLISECOND: i64 = 1_000_000;
const SECOND: i64 = 1_000_000_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;

/// Go's `time.quote` (Go 1.15 and later): the text between double quotes, with non-ASCII and
/// control bytes as `\xNN`.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if !c.is_ascii() || c < ' ' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push('"');
    out
}

fn unit_nanos(unit: &str) -> Option<i64> {
    Some(match unit {
        "ns" => NANOSECOND,
        "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
        "ms" => MILLISECOND,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return None,
    })
}

/// Go's `time.ParseDuration`: nanoseconds, or Go's error text.
pub(crate) fn parse_duration(orig: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {}", quote(orig));
    let mut s = orig;
    let mut neg = false;
    if let Some(first) = s.as_bytes().first() {
        if *first == b'-' || *first == b'+' {
            neg = *first == b'-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i64 = 0;
    while !s.is_empty() {
        let bytes = s.as_bytes();
        if !(bytes[0] == b'.' || bytes[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // Leading integer.
        let mut v: i64 = 0;
        let mut i = 0;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            if v > i64::MAX / 10 {
                return Err(invalid());
            }
            v = v * 10 + i64::from(bytes[i] - b'0');
            if v < 0 {
                return Err(invalid());
            }
            i += 1;
        }
        let pre = i > 0;
        s = &s[i..];
        // Fraction.
        let mut f: i64 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if s.as_bytes().first() == Some(&b'.') {
            s = &s[1..];
            let bytes = s.as_bytes();
            let mut j = 0;
            let mut overflow = false;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                if !overflow {
                    if f > i64::MAX / 10 {
                        overflow = true;
                    } else {
                        let y = f * 10 + i64::from(bytes[j] - b'0');
                        if y < 0 {
                            overflow = true;
                        } else {
                            f = y;
                            scale *= 10.0;
                        }
                    }
                }
                j += 1;
            }
            post = j > 0;
            s = &s[j..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        // Unit: everything up to the next digit or period (both ASCII, so a char boundary).
        let unit_len = s
            .bytes()
            .take_while(|b| *b != b'.' && !b.is_ascii_digit())
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {}", quote(orig)));
        }
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let Some(unit_ns) = unit_nanos(unit) else {
            return Err(format!(
                "time: unknown unit {} in duration {}",
                quote(unit),
                quote(orig)
            ));
        };
        if v > i64::MAX / unit_ns {
            return Err(invalid());
        }
        v *= unit_ns;
        if f > 0 {
            // Go converts float64 to int64 here; the value is at most 3.6e12, so `as` is exact.
            #[allow(clippy::cast_possible_truncation)]
            let frac = (f as f64 * (unit_ns as f64 / scale)) as i64;
            v = v.wrapping_add(frac);
            if v < 0 {
                return Err(invalid());
            }
        }
        total = total.wrapping_add(v);
        if total < 0 {
            return Err(invalid());
        }
    }
    Ok(if neg { -total } else { total })
}

/// Go's `time.Duration(ns).String()`: `1.5s`, `24h0m0s`, `300ms`, `0s`.
pub(crate) fn format_duration(ns: i64) -> String {
    let neg = ns < 0;
    let mut u = ns.unsigned_abs();
    let mut out = String::new();
    // Appends the fraction v / 10^prec (without trailing zeros) and returns the integer part.
    let frac = |v: u64, prec: u32, out: &mut String| -> u64 {
        let mut digits = Vec::new();
        let mut v = v;
        let mut print = false;
        for _ in 0..prec {
            let digit = v % 10;
            print = print || digit != 0;
            if print {
                digits.push(char::from(b'0' + u8::try_from(digit).unwrap_or(0)));
            }
            v /= 10;
        }
        if print {
            out.push('.');
            out.extend(digits.iter().rev());
        }
        v
    };
    if u < 1_000_000_000 {
        if u == 0 {
            return "0s".to_owned();
        }
        let (prec, unit) = if u < 1_000 {
            (0, "ns")
        } else if u < 1_000_000 {
            (3, "\u{b5}s")
        } else {
            (6, "ms")
        };
        let mut tail = String::new();
        let int = frac(u, prec, &mut tail);
        out.push_str(&int.to_string());
        out.push_str(&tail);
        out.push_str(unit);
    } else {
        let mut tail = String::new();
        u = frac(u, 9, &mut tail);
        let secs = u % 60;
        u /= 60;
        if u > 0 {
            let mins = u % 60;
            u /= 60;
            if u > 0 {
                out.push_str(&format!("{u}h"));
            }
            out.push_str(&format!("{mins}m"));
        }
        out.push_str(&format!("{secs}{tail}s"));
    }
    if neg { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_go() {
        assert_eq!(parse_duration("15s"), Ok(15 * SECOND));
        assert_eq!(parse_duration("15000ms"), Ok(15 * SECOND));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Ok(HOUR + 2 * MINUTE + 3 * SECOND + 500 * MILLISECOND)
        );
        assert_eq!(parse_duration("0.5m"), Ok(30 * SECOND));
        assert_eq!(parse_duration("-5s"), Ok(-5 * SECOND));
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("1\u{b5}s"), Ok(1_000));
        assert_eq!(
            parse_duration("abc"),
            Err("time: invalid duration \"abc\"".to_owned())
        );
        assert_eq!(
            parse_duration("5"),
            Err("time: missing unit in duration \"5\"".to_owned())
        );
        assert_eq!(
            parse_duration("5x"),
            Err("time: unknown unit \"x\" in duration \"5x\"".to_owned())
        );
        assert_eq!(
            parse_duration(" 15s"),
            Err("time: invalid duration \" 15s\"".to_owned())
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("9999999999999999999h").is_err());
        assert!(parse_duration(".s").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_duration(10 * SECOND), "10s");
        assert_eq!(format_duration(24 * HOUR), "24h0m0s");
        assert_eq!(format_duration(90 * SECOND), "1m30s");
        assert_eq!(format_duration(1500 * MILLISECOND), "1.5s");
        assert_eq!(format_duration(300 * MILLISECOND), "300ms");
        assert_eq!(format_duration(1_500), "1.5\u{b5}s");
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(-SECOND), "-1s");
        assert_eq!(format_duration(i64::MIN), "-2562047h47m16.854775808s");
    }
}

//! Durations as users write them on the command line and read them in
//! reports.
//!
//! Parsing is strict about units: a bare `80` is refused rather than
//! guessed, since a threshold of 80 seconds instead of 80 milliseconds
//! silently hides every event.

use std::time::Duration;

/// Why a duration was refused. Every message is one line, quotes the
/// input and says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write a number with a unit, e.g. 80ms or 1s")]
    Empty,
    #[error("{input:?} is negative: a duration is zero or more, e.g. {suggestion}")]
    Negative { input: String, suggestion: String },
    #[error("{input:?} has no unit: write {number}ms or {number}s")]
    NoUnit { input: String, number: String },
    #[error("{input:?} has an unknown unit {unit:?}: use ns, us (or µs), ms, s, m or h, e.g. 80ms")]
    UnknownUnit { input: String, unit: String },
    #[error("{input:?} is not a duration: write numbers with units, e.g. 80ms, 1.5s or 1m30s")]
    Invalid { input: String },
    #[error("{input:?} is too long a duration: write a smaller one, e.g. 1h")]
    Overflow { input: String },
}

const NS_PER_US: u128 = 1_000;
const NS_PER_MS: u128 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;
const NS_PER_MIN: u128 = 60 * NS_PER_S;
const NS_PER_H: u128 = 60 * NS_PER_MIN;

fn unit_ns(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" | "nsec" => 1,
        // U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU look alike;
        // accept whichever the user's keyboard produced.
        "us" | "µs" | "μs" | "usec" => NS_PER_US,
        "ms" | "msec" => NS_PER_MS,
        "s" | "sec" | "secs" => NS_PER_S,
        "m" | "min" | "mins" => NS_PER_MIN,
        "h" | "hr" | "hour" | "hours" => NS_PER_H,
        _ => return None,
    })
}

/// Parses `80ms`, `1.5s`, `250us`, `250µs`, `500ns`, `2m`, `1h`, or a sum
/// such as `1m30s` (spaces between the parts are allowed).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let input = s.trim();
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    if let Some(rest) = input.strip_prefix('-') {
        let rest = rest.trim();
        let suggestion = if sum_parts(rest, rest).is_ok() {
            rest.to_string()
        } else {
            "80ms".to_string()
        };
        return Err(DurationError::Negative {
            input: input.to_string(),
            suggestion,
        });
    }
    sum_parts(input, input)
}

/// Adds up the `<number><unit>` parts of `rest`; `input` is what error
/// messages quote.
fn sum_parts(input: &str, mut rest: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid {
        input: input.to_string(),
    };
    let overflow = || DurationError::Overflow {
        input: input.to_string(),
    };
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        if number.is_empty() {
            return Err(if rest.starts_with('-') {
                DurationError::Negative {
                    input: input.to_string(),
                    suggestion: input
                        .split_whitespace()
                        .collect::<String>()
                        .replace('-', ""),
                }
            } else {
                invalid()
            });
        }
        rest = rest[num_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        if unit.is_empty() {
            if !rest.is_empty() {
                return Err(invalid());
            }
            // Suggest the whole input with a unit, which for `1m30` gives
            // `1m30s`; whitespace is dropped to keep the message one line.
            return Err(DurationError::NoUnit {
                input: input.to_string(),
                number: input.split_whitespace().collect(),
            });
        }
        let Some(scale) = unit_ns(unit) else {
            return Err(DurationError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            });
        };
        let value = scaled(number, scale)
            .ok_or_else(invalid)?
            .ok_or_else(overflow)?;
        total = total.checked_add(value).ok_or_else(overflow)?;
        rest = rest[unit_len..].trim_start();
    }
    let secs = u64::try_from(total / NS_PER_S).map_err(|_| overflow())?;
    // The remainder is below 10^9, so it fits.
    Ok(Duration::new(secs, (total % NS_PER_S) as u32))
}

/// `number` (digits with at most one `.`) times `scale` nanoseconds,
/// truncated to whole nanoseconds. Outer `None`: not a number; inner
/// `None`: too large.
fn scaled(number: &str, scale: u128) -> Option<Option<u128>> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let mut whole: u128 = 0;
    for d in int.bytes() {
        let Some(w) = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(d - b'0')))
        else {
            return Some(None);
        };
        whole = w;
    }
    // Digits past the 18th are below a nanosecond even for hours.
    let frac = &frac[..frac.len().min(18)];
    let mut f: u128 = 0;
    for d in frac.bytes() {
        f = f * 10 + u128::from(d - b'0');
    }
    let frac_ns = f * scale / 10u128.pow(frac.len() as u32);
    Some(
        whole
            .checked_mul(scale)
            .and_then(|w| w.checked_add(frac_ns)),
    )
}

/// Adapter for clap's `value_parser`: the error becomes clap's message.
pub fn clap_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Formats a duration for people, with about three significant digits:
/// `512ns`, `37.0us`, `80.2ms`, `1.50s`, `2m05s`, `1h02m03s`.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < NS_PER_US {
        return format!("{ns}ns");
    }
    for (unit, name) in [(NS_PER_US, "us"), (NS_PER_MS, "ms"), (NS_PER_S, "s")] {
        for decimals in [2u32, 1, 0] {
            let pow = 10u128.pow(decimals);
            // Rounded to `decimals` places, in units of 10^-decimals.
            let v = (ns * pow + unit / 2) / unit;
            let fits = if unit == NS_PER_S {
                // From a minute on, `1m01s` reads better than `61.0s`.
                match decimals {
                    2 => v < 1000,
                    1 => v < 600,
                    _ => false,
                }
            } else {
                v < 1000
            };
            if !fits {
                continue;
            }
            return if decimals == 0 {
                format!("{v}{name}")
            } else {
                let width = decimals as usize;
                format!("{}.{:0width$}{name}", v / pow, v % pow)
            };
        }
    }
    let secs = (ns + NS_PER_S / 2) / NS_PER_S;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h == 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{h}h{m:02}m{s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} parsed as {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(ok("80ms"), Duration::from_millis(80));
        assert_eq!(ok("1s"), Duration::from_secs(1));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("250us"), Duration::from_micros(250));
        assert_eq!(ok("250µs"), Duration::from_micros(250));
        assert_eq!(ok("250μs"), Duration::from_micros(250));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("500ns"), Duration::from_nanos(500));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("10sec"), Duration::from_secs(10));
        assert_eq!(ok("5min"), Duration::from_secs(300));
        assert_eq!(ok("5msec"), Duration::from_millis(5));
    }

    #[test]
    fn parses_compounds_fractions_and_whitespace() {
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1m 30s"), Duration::from_secs(90));
        assert_eq!(ok("1h2m3s"), Duration::from_secs(3723));
        assert_eq!(ok("1s500ms"), Duration::from_millis(1500));
        assert_eq!(ok("  80ms\n"), Duration::from_millis(80));
        assert_eq!(ok("5 ms"), Duration::from_millis(5));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("2.s"), Duration::from_secs(2));
        assert_eq!(ok("0.25ms"), Duration::from_micros(250));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("0.1us"), Duration::from_nanos(100));
        // Below a nanosecond is truncated, not an error.
        assert_eq!(ok("1.9ns"), Duration::from_nanos(1));
        assert_eq!(
            ok("0.333333333333333333333333s"),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(ok("080ms"), Duration::from_millis(80));
    }

    #[test]
    fn bare_numbers_ask_for_a_unit() {
        assert_eq!(err("80"), r#""80" has no unit: write 80ms or 80s"#);
        assert_eq!(err(" 1.5 "), r#""1.5" has no unit: write 1.5ms or 1.5s"#);
        assert_eq!(err("1m30"), r#""1m30" has no unit: write 1m30ms or 1m30s"#);
        assert!(matches!(
            parse_duration("80"),
            Err(DurationError::NoUnit { .. })
        ));
    }

    #[test]
    fn unknown_units_list_the_accepted_ones() {
        let e = err("80x");
        assert!(e.contains(r#""80x""#) && e.contains(r#""x""#), "{e}");
        for unit in ["ns", "us", "µs", "ms", "s", "m", "h"] {
            assert!(e.contains(unit), "{e} lacks {unit}");
        }
        assert!(matches!(
            parse_duration("3days"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "days"
        ));
        assert!(matches!(
            parse_duration("1MS"),
            Err(DurationError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn rejects_empty_negative_and_garbage() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("  \t"), Err(DurationError::Empty));
        assert!(err("").contains("80ms"));
        let e = err("-5ms");
        assert!(
            e.contains(r#""-5ms""#) && e.contains("negative") && e.ends_with("5ms"),
            "{e}"
        );
        assert!(matches!(
            parse_duration("1s-5ms"),
            Err(DurationError::Negative { .. })
        ));
        for bad in [
            "ms", "abc", ".s", "1.2.3s", "1..2s", "+5s", "5s!", "5 3s", "1e3ms", "0x10s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse_duration("abc"),
            Err(DurationError::Invalid { .. })
        ));
        // Many minus signs must not recurse or panic.
        let e = err(&"-".repeat(100_000));
        assert!(
            e.contains("negative") && e.ends_with("80ms"),
            "{}",
            &e[e.len() - 40..]
        );
        assert!(err("--5ms").ends_with("80ms"));
        assert!(err("-").ends_with("80ms"));
    }

    #[test]
    fn rejects_overflow() {
        for big in [
            "99999999999999999999999999999999999999999999h",
            "18446744073709551616s",
            "999999999999999999999999h",
            "18446744073709551615s 1s",
        ] {
            assert!(
                matches!(parse_duration(big), Err(DurationError::Overflow { .. })),
                "{big}: {:?}",
                parse_duration(big)
            );
        }
        assert_eq!(ok("18446744073709551615s"), Duration::from_secs(u64::MAX));
    }

    #[test]
    fn messages_are_one_line_and_name_the_input() {
        for bad in [
            "80",
            "80x",
            "-1s",
            "abc",
            "1\n2",
            "99999999999999999999999999h",
            "5 3s",
            "\u{7}s",
        ] {
            let e = err(bad);
            assert!(!e.contains('\n'), "{bad:?}: {e}");
            if !bad.trim().is_empty() {
                assert!(e.contains(&format!("{:?}", bad.trim())), "{bad:?}: {e}");
            }
        }
    }

    #[test]
    fn clap_adapter() {
        assert_eq!(clap_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(
            clap_duration("10"),
            Err(r#""10" has no unit: write 10ms or 10s"#.to_string())
        );
    }

    #[test]
    fn formats_with_three_digits() {
        let f = |ns: u64| format_duration(Duration::from_nanos(ns));
        assert_eq!(f(0), "0ns");
        assert_eq!(f(512), "512ns");
        assert_eq!(f(999), "999ns");
        assert_eq!(f(1_000), "1.00us");
        assert_eq!(f(1_234), "1.23us");
        assert_eq!(f(37_000), "37.0us");
        assert_eq!(f(37_049), "37.0us");
        assert_eq!(f(250_000), "250us");
        assert_eq!(f(999_400), "999us");
        assert_eq!(f(999_600), "1.00ms");
        assert_eq!(f(9_996), "10.0us");
        assert_eq!(f(99_960), "100us");
        assert_eq!(f(80_200_000), "80.2ms");
        assert_eq!(f(10_000_000), "10.0ms");
        assert_eq!(f(1_500_000_000), "1.50s");
        assert_eq!(f(12_340_000_000), "12.3s");
        assert_eq!(f(59_940_000_000), "59.9s");
        assert_eq!(f(59_960_000_000), "1m00s");
        assert_eq!(f(60_000_000_000), "1m00s");
        assert_eq!(f(125_000_000_000), "2m05s");
        assert_eq!(f(3_599_400_000_000), "59m59s");
        assert_eq!(f(3_723_000_000_000), "1h02m03s");
        // The largest duration rounds up to the next second, still fine.
        assert_eq!(format_duration(Duration::MAX), "5124095576030431h00m16s");
    }

    #[test]
    fn format_then_parse_round_trips_closely() {
        for ns in [
            1u64,
            999,
            1_000,
            37_000,
            80_200_000,
            1_500_000_000,
            125_000_000_000,
            3_723_000_000_000,
        ] {
            let d = Duration::from_nanos(ns);
            let back = ok(&format_duration(d));
            let diff = back.abs_diff(d).as_secs_f64();
            assert!(diff <= d.as_secs_f64() * 0.005, "{ns}: {back:?}");
        }
    }
}

//! Parsers for command-line values: CPU and memory quantities, `KEY=VALUE`
//! environment variables, times and months, and the scheduler address.
//!
//! They only parse: ranges (negative or zero quantities, too many GPUs...)
//! are the scheduler's to check, so that the user gets the same error from
//! every client.

use gpupool_common::calendar::{days_from_civil, days_in_month};

/// An optional flag as the API takes it: empty when not given.
pub fn opt(s: Option<String>) -> String {
    s.unwrap_or_default()
}

/// Default scheduler address.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7070";

/// Parses a CPU quantity into millicores: cores (`2`, `0.5`, `-1`) or
/// millicores with an `m` suffix (`500m`).
pub fn parse_cpu(s: &str) -> Result<i64, String> {
    let invalid = || {
        format!(
            "invalid CPU quantity `{s}`: expected cores (e.g. `2`, `0.5`) or millicores (e.g. `500m`)"
        )
    };
    let t = s.trim();
    if let Some(milli) = t.strip_suffix('m') {
        return milli.trim().parse::<i64>().map_err(|_| invalid());
    }
    let cores = parse_decimal(t).ok_or_else(invalid)?;
    scale(cores, 1000.0).ok_or_else(invalid)
}

/// Parses a memory quantity into MiB: a number with an optional binary unit
/// (`512MiB`, `4GiB`, `1.5GiB`, `2G`, `1024M`, `1TiB`, `512KiB`); a plain
/// number is MiB. Units are case-insensitive and `G`/`GB` mean GiB.
pub fn parse_memory(s: &str) -> Result<i64, String> {
    let invalid = || {
        format!(
            "invalid memory quantity `{s}`: expected a number with an optional unit \
             (e.g. `512MiB`, `4GiB`, `1.5GiB`, `2G`, `1024M`; a plain number is MiB)"
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mi" | "mb" | "mib" => 1.0,
        "g" | "gi" | "gb" | "gib" => 1024.0,
        "t" | "ti" | "tb" | "tib" => 1024.0 * 1024.0,
        "k" | "ki" | "kb" | "kib" => 1.0 / 1024.0,
        _ => return Err(invalid()),
    };
    let value = parse_decimal(number.trim()).ok_or_else(invalid)?;
    scale(value, factor).ok_or_else(invalid)
}

/// Parses a `KEY=VALUE` environment variable; the value may be empty or
/// contain `=`, the key may not be empty.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        Some(_) => Err(format!(
            "invalid environment variable `{s}`: the name before `=` is empty"
        )),
        None => Err(format!(
            "invalid environment variable `{s}`: expected KEY=VALUE"
        )),
    }
}

/// The scheduler address as a URI: `host:port` gets an `http://` scheme.
pub fn normalize_addr(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Parses a time into a protobuf timestamp. Accepted forms:
///
/// * RFC 3339: `2026-11-27T10:00:00Z`, `2026-11-27T10:00:00.250+02:00`;
/// * `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` without a zone: UTC;
/// * `YYYY-MM-DD`: midnight UTC.
///
/// `t` and `z` may be lower-case, and a space may stand for the `T`.
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let invalid = |why: &str| {
        format!(
            "invalid time `{s}`: {why}; expected RFC 3339 (e.g. `2026-11-27T10:00:00Z`), \
             `YYYY-MM-DDTHH:MM` (UTC) or `YYYY-MM-DD` (UTC midnight)"
        )
    };
    let t = s.trim();
    let (date, clock) = match t.find(['T', 't', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (year, month, day) = parse_date(date).ok_or_else(|| invalid("bad date"))?;
    let mut seconds = days_from_civil(year, month, day) * 86_400;
    let mut nanos = 0;
    if let Some(clock) = clock {
        let (clock, offset) = split_zone(clock).ok_or_else(|| invalid("bad time zone"))?;
        let (secs_of_day, frac) = parse_clock(clock).ok_or_else(|| invalid("bad time of day"))?;
        seconds += secs_of_day - offset;
        nanos = frac;
    }
    Ok(prost_types::Timestamp { seconds, nanos })
}

/// Parses a calendar month `YYYY-MM` (`2026-11`).
/// A duration in seconds: `90`, `90s`, `30m`, `2h` or `1d`.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 2h, 1d)"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{s:?} is too long"))
}

pub fn parse_month(s: &str) -> Result<String, String> {
    let t = s.trim();
    let valid = t.len() == 7
        && t.as_bytes()[4] == b'-'
        && digits(&t[..4]).is_some()
        && digits(&t[5..]).is_some_and(|m| (1..=12).contains(&m));
    if valid {
        Ok(t.to_string())
    } else {
        Err(format!(
            "invalid month `{s}`: expected YYYY-MM (e.g. `2026-11`)"
        ))
    }
}

/// The value of a non-empty run of ASCII digits (no sign, no spaces).
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD`, checked against the calendar.
fn parse_date(s: &str) -> Option<(i64, i64, i64)> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (digits(&s[..4])?, digits(&s[5..7])?, digits(&s[8..])?);
    ((1..=12).contains(&month) && (1..=days_in_month(year, month)).contains(&day))
        .then_some((year, month, day))
}

/// Splits a clock from its zone: `Z` (UTC), `+HH:MM`/`-HH:MM`, or none
/// (UTC). Returns the clock and the zone's offset east of UTC in seconds.
fn split_zone(s: &str) -> Option<(&str, i64)> {
    if let Some(clock) = s.strip_suffix(['Z', 'z']) {
        return Some((clock, 0));
    }
    let Some(i) = s.find(['+', '-']) else {
        return Some((s, 0));
    };
    let (clock, zone) = s.split_at(i);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let zone = &zone[1..];
    let b = zone.as_bytes();
    if b.len() != 5 || b[2] != b':' {
        return None;
    }
    let (hours, minutes) = (digits(&zone[..2])?, digits(&zone[3..])?);
    (hours <= 23 && minutes <= 59).then_some((clock, sign * (hours * 3600 + minutes * 60)))
}

/// `HH:MM`, `HH:MM:SS` or `HH:MM:SS.fraction` (1 to 9 digits): the seconds
/// of the day and the nanoseconds. A leap second (`:60`) counts as the
/// first second of the next minute.
fn parse_clock(s: &str) -> Option<(i64, i32)> {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    let b = hms.as_bytes();
    let (hours, minutes, seconds) = match b.len() {
        5 if b[2] == b':' && frac.is_none() => (digits(&hms[..2])?, digits(&hms[3..])?, 0),
        8 if b[2] == b':' && b[5] == b':' => {
            (digits(&hms[..2])?, digits(&hms[3..5])?, digits(&hms[6..])?)
        }
        _ => return None,
    };
    if hours > 23 || minutes > 59 || seconds > 60 {
        return None;
    }
    let nanos = match frac {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) => {
            let value = i32::try_from(digits(f)?).ok()?;
            value * 10_i32.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
    };
    Some((hours * 3600 + minutes * 60 + seconds, nanos))
}

/// A plain decimal number (optional sign, digits, at most one dot); no
/// exponents, `inf` or `NaN`.
fn parse_decimal(s: &str) -> Option<f64> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.chars().any(|c| c.is_ascii_digit())
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        || digits.matches('.').count() > 1
    {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `value * factor`, rounded to an integer, if it fits in an `i64`.
fn scale(value: f64, factor: f64) -> Option<i64> {
    let scaled = (value * factor).round();
    // 2^63 is exactly representable; anything at or above it overflows.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if scaled.is_finite() && (-LIMIT..LIMIT).contains(&scaled) {
        Some(scaled as i64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_unit() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("30m", 1_800),
            ("2h", 7_200),
            ("1d", 86_400),
        ] {
            assert_eq!(parse_duration_secs(text), Ok(secs), "{text}");
        }
        for bad in ["", "m", "1w", "1.5h", "-3s", "99999999999999999999d"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_cores_and_millicores() {
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("1.25"), Ok(1250));
        assert_eq!(parse_cpu(".5"), Ok(500));
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu(" 250m "), Ok(250));
        assert_eq!(parse_cpu("0"), Ok(0));
        // Negative values go to the server, which rejects them.
        assert_eq!(parse_cpu("-1"), Ok(-1000));
        assert_eq!(parse_cpu("-500m"), Ok(-500));
    }

    #[test]
    fn cpu_rejects_garbage() {
        for bad in [
            "",
            "m",
            "abc",
            "1e3",
            "inf",
            "NaN",
            "1.2.3",
            "2 cores",
            "1.5m",
            "99999999999999999999",
        ] {
            assert!(parse_cpu(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("512MiB"), Ok(512));
        assert_eq!(parse_memory("4GiB"), Ok(4096));
        assert_eq!(parse_memory("1.5GiB"), Ok(1536));
        assert_eq!(parse_memory("2G"), Ok(2048));
        assert_eq!(parse_memory("2GB"), Ok(2048));
        assert_eq!(parse_memory("1024M"), Ok(1024));
        assert_eq!(parse_memory("1024Mi"), Ok(1024));
        assert_eq!(parse_memory("100"), Ok(100));
        assert_eq!(parse_memory("4 gib"), Ok(4096));
        assert_eq!(parse_memory("1TiB"), Ok(1024 * 1024));
        assert_eq!(parse_memory("2048KiB"), Ok(2));
        assert_eq!(parse_memory("-1GiB"), Ok(-1024));
    }

    #[test]
    fn memory_rejects_garbage() {
        for bad in ["", "GiB", "4XB", "abc", "1e3", "4GiBs", "1.5.1G", "inf"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("=value").is_err());
        assert!(parse_env("").is_err());
    }

    fn ts(s: &str) -> (i64, i32) {
        let t = parse_time(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (t.seconds, t.nanos)
    }

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1970, 1, 2), 1);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2023, 11, 14), 19_675);
        assert_eq!(days_from_civil(1600, 1, 1), -135_140);
        assert_eq!(days_from_civil(0, 3, 1), -719_468);
        // The inverse of the formatter, across leap years and centuries
        // (years 0001 to 9909).
        for day in (-719_000_i64..2_900_000).step_by(997) {
            let text = crate::format::format_time(day * 86_400_000);
            let (y, m, d) = parse_date(&text[..10]).unwrap();
            assert_eq!(days_from_civil(y, m, d), day, "{text}");
        }
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(1900, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2026, 2), 28);
        assert_eq!(days_in_month(2026, 11), 30);
    }

    #[test]
    fn times_in_every_form() {
        // 2026-11-27T00:00:00Z
        let midnight = 1_795_737_600;
        assert_eq!(ts("2026-11-27"), (midnight, 0));
        assert_eq!(ts("2026-11-27T10:00"), (midnight + 36_000, 0));
        assert_eq!(ts("2026-11-27T10:00:00Z"), (midnight + 36_000, 0));
        assert_eq!(ts("2026-11-27t10:00:00z"), (midnight + 36_000, 0));
        assert_eq!(ts("2026-11-27 10:00:00Z"), (midnight + 36_000, 0));
        assert_eq!(ts("2026-11-27T10:00:05"), (midnight + 36_005, 0));
        assert_eq!(ts("2026-11-27T10:00:00+02:00"), (midnight + 28_800, 0));
        assert_eq!(ts("2026-11-27T10:00:00-05:30"), (midnight + 55_800, 0));
        assert_eq!(ts("2026-11-27T00:30:00+01:00"), (midnight - 1800, 0));
        assert_eq!(
            ts("2026-11-27T10:00:00.25Z"),
            (midnight + 36_000, 250_000_000)
        );
        assert_eq!(
            ts("2026-11-27T10:00:00.123456789Z"),
            (midnight + 36_000, 123_456_789)
        );
        assert_eq!(ts("2026-12-31T23:59:60Z"), (midnight + 35 * 86_400, 0));
        assert_eq!(ts("1970-01-01T00:00:00Z"), (0, 0));
        assert_eq!(ts("1969-12-31T23:59:59Z"), (-1, 0));
        assert_eq!(ts("2000-02-29"), (951_782_400, 0));
        assert_eq!(ts(" 2023-11-14T22:13:20Z "), (1_700_000_000, 0));
    }

    #[test]
    fn times_reject_garbage() {
        for bad in [
            "",
            "yesterday",
            "2026-11",
            "2026-11-27T",
            "2026-11-27T10",
            "2026-11-27T10:00:00+2",
            "2026-11-27T10:00:00+02",
            "2026-11-27T10:00:00+24:00",
            "2026-11-27T10:00:00.Z",
            "2026-11-27T10:00:00.1234567890Z",
            "2026-11-27T10:00.5",
            "2026-11-27T24:00",
            "2026-11-27T10:60",
            "2026-11-27T10:00:61",
            "2026-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-11-00",
            "2026-11-31",
            "26-11-27",
            "2026/11/27",
            "+2026-11-27",
            "2026-1-27",
            "1700000000",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} should not parse");
        }
        let e = parse_time("soon").unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
    }

    #[test]
    fn months() {
        assert_eq!(parse_month("2026-11"), Ok("2026-11".into()));
        assert_eq!(parse_month("2026-01"), Ok("2026-01".into()));
        for bad in [
            "",
            "2026",
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026-11-01",
            "2026/11",
        ] {
            assert!(parse_month(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(normalize_addr("10.0.0.1:7070"), "http://10.0.0.1:7070");
        assert_eq!(normalize_addr("localhost:7070"), "http://localhost:7070");
        assert_eq!(
            normalize_addr("http://127.0.0.1:7070"),
            "http://127.0.0.1:7070"
        );
        assert_eq!(normalize_addr("https://gpupool:443"), "https://gpupool:443");
        assert_eq!(normalize_addr(DEFAULT_ADDR), DEFAULT_ADDR);
    }
}

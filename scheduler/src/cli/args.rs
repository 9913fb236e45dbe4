//! Parsers for command-line values: CPU and memory quantities, `KEY=VALUE`
//! environment variables and the scheduler address.
//!
//! They only parse: ranges (negative or zero quantities, too many GPUs...)
//! are the scheduler's to check, so that the user gets the same error from
//! every client.

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

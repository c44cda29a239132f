//! Sizes and durations written as strings in configuration files.
//!
//! Sizes: a whole number of bytes, or a number with a unit: `B`, `KB`/`MB`/`GB` (powers of 1000)
//! or `KiB`/`MiB`/`GiB` (powers of 1024); `512KiB`, `1.5MiB`, `10 MB`.
//! Durations: a number with a unit: `ms`, `s`, `m`, `h`; `250ms`, `5s`, `1.5m`.

use std::time::Duration;

/// Parses a byte size. Returns a message suitable for a config error on failure.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit `{unit}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{t}` is not a size (examples: 65536, 512KiB, 1MiB)"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{t}` is out of range"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("`{t}` is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Parses a duration. Returns a message suitable for a config error on failure.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" => {
            return Err(format!(
                "`{t}` needs a unit: ms, s, m or h (for example 5s)"
            ))
        }
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{t}` is not a duration (examples: 250ms, 5s, 2m)"))?;
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .map_err(|_| format!("`{t}` is out of range"))
}

/// Formats a byte count the way [`parse_size`] reads it, using the largest exact binary unit.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1.5B").is_err());
        assert!(parse_size("12 parsecs")
            .expect_err("unit")
            .contains("unknown size unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5")
            .expect_err("no unit")
            .contains("needs a unit"));
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn format_round_trips() {
        for n in [0, 1, 1000, 1024, 1 << 20, 3 << 30, 1536] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
        assert_eq!(format_size(1 << 20), "1MiB");
    }
}

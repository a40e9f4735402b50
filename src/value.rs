//! Typed column values, shared by the emulator's encoders, the decoders and the sinks.

use std::fmt;
use std::net::IpAddr;

use crate::time::{self, Micros};

/// One column value of a DAP record.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(Decimal),
    Str(String),
    Timestamp(Micros),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(Micros),
    Uuid(u128),
    Ip(IpAddr),
    /// Nested objects and arrays, kept as JSON.
    Json(serde_json::Value),
}

/// An exact decimal: `mantissa × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub mantissa: i128,
    pub scale: u8,
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scale == 0 {
            return write!(f, "{}", self.mantissa);
        }
        let pow = 10i128.pow(self.scale as u32);
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let abs = self.mantissa.unsigned_abs();
        let pow = pow as u128;
        write!(f, "{sign}{}.{:0width$}", abs / pow, abs % pow, width = self.scale as usize)
    }
}

/// Canonical hyphenated lowercase text of a UUID.
pub fn format_uuid(u: u128) -> String {
    let h = format!("{u:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Text of a float that Python, PostgreSQL and Spark all read back: `NaN`, `Infinity`,
/// `-Infinity`, else the shortest round-tripping decimal form.
pub fn format_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{f:?}")
    }
}

impl Value {
    /// The value's text in DAP's tabular formats (TSV and CSV, before escaping); `None` for NULL.
    pub fn to_text(&self) -> Option<String> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format_float(*f),
            Value::Decimal(d) => d.to_string(),
            Value::Str(s) => s.clone(),
            Value::Timestamp(us) => time::format_trimmed(*us),
            Value::Date(d) => time::format_date(*d),
            Value::Time(us) => format!("{}Z", time::format_time_of_day(*us)),
            Value::Uuid(u) => format_uuid(*u),
            Value::Ip(ip) => ip.to_string(),
            Value::Json(j) => j.to_string(),
        })
    }

    /// The typed-JSON form used for ground truth and comparisons: floats that JSON cannot hold
    /// become the strings `NaN`, `Infinity`, `-Infinity`; decimals are exact strings;
    /// timestamps, dates, UUIDs and IPs are their canonical text. Dates and times are written by
    /// chrono here, not by the encoders' own formatting in [`crate::time`], so that the truth does
    /// not share a bug with the code it checks.
    pub fn to_typed_json(&self) -> serde_json::Value {
        use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) if f.is_finite() => J::from(*f),
            Value::Json(j) => j.clone(),
            Value::Timestamp(us) => J::String(
                DateTime::from_timestamp_micros(*us)
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
                    .unwrap_or_else(|| format!("out of range: {us} µs")),
            ),
            Value::Date(days) => J::String(
                NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .unwrap_or_else(|| format!("out of range: day {days}")),
            ),
            Value::Time(us) => J::String(
                NaiveTime::from_num_seconds_from_midnight_opt((us / 1_000_000) as u32, (us % 1_000_000 * 1000) as u32)
                    .map(|t| t.format("%H:%M:%S%.f").to_string())
                    .unwrap_or_else(|| format!("out of range: {us} µs")),
            ),
            other => J::String(other.to_text().unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_keep_their_scale() {
        assert_eq!(Decimal { mantissa: 1230, scale: 2 }.to_string(), "12.30");
        assert_eq!(Decimal { mantissa: -5, scale: 2 }.to_string(), "-0.05");
        assert_eq!(Decimal { mantissa: 7, scale: 0 }.to_string(), "7");
    }

    #[test]
    fn floats_round_trip_and_specials_are_named() {
        assert_eq!(format_float(0.1), "0.1");
        assert_eq!(format_float(1.5e-7).parse::<f64>().unwrap(), 1.5e-7);
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(Value::Float(f64::INFINITY).to_typed_json(), serde_json::json!("Infinity"));
    }

    #[test]
    fn uuid_text() {
        assert_eq!(format_uuid(0x0123456789abcdef0123456789abcdef), "01234567-89ab-cdef-0123-456789abcdef");
    }
}

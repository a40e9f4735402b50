//! UTC instants as microseconds since the Unix epoch: the one time representation in the project.
//!
//! DAP sends RFC 3339 timestamps with an offset; the official client writes UTC as `Z` with six
//! fraction digits when there is a fraction (Python `isoformat`). Data values may carry 0 to 6.

use chrono::{DateTime, NaiveDate, Timelike, Utc};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

pub const MICROS_PER_SECOND: Micros = 1_000_000;
pub const MICROS_PER_DAY: Micros = 86_400 * MICROS_PER_SECOND;

#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not an RFC 3339 timestamp with an offset (expected e.g. 2024-05-01T12:00:00Z)")]
pub struct TimestampError {
    pub value: String,
}

/// The current time.
pub fn now() -> Micros {
    Utc::now().timestamp_micros()
}

fn to_datetime(us: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Wire form: `2024-05-01T12:00:00Z`, or six fraction digits when there is a fraction.
pub fn format_wire(us: Micros) -> String {
    let dt = to_datetime(us);
    if dt.nanosecond() == 0 {
        dt.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    }
}

/// Fixed-width form with six fraction digits, which sorts in time order as text (the SQLite
/// mirror's timestamp form; SQLite's date functions read it).
pub fn format_fixed(us: Micros) -> String {
    // Digits written by hand: this runs for every timestamp the mirror stores; strftime was a
    // tenth of initdb's CPU and `write!` still a twentieth.
    let (days, rem) = (us.div_euclid(MICROS_PER_DAY), us.rem_euclid(MICROS_PER_DAY));
    let (y, m, d) = civil_from_days(days);
    let secs = rem / MICROS_PER_SECOND;
    let (h, min, sec, frac) = (secs / 3600, secs / 60 % 60, secs % 60, rem % MICROS_PER_SECOND);
    if !(0..=9999).contains(&y) {
        return format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{frac:06}Z");
    }
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    for (mut value, at, width) in
        [(y, 0, 4), (m.into(), 5, 2), (d.into(), 8, 2), (h, 11, 2), (min, 14, 2), (sec, 17, 2), (frac, 20, 6)]
    {
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    String::from_utf8(text.to_vec()).expect("ASCII digits")
}

/// (year, month, day) of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Data form: like [`format_wire`] but with the fraction trimmed to its significant digits.
pub fn format_trimmed(us: Micros) -> String {
    let mut s = format_wire(us);
    if s.contains('.') {
        s.pop(); // the Z
        while s.ends_with('0') {
            s.pop();
        }
        s.push('Z');
    }
    s
}

/// Parses RFC 3339 with a mandatory offset (`Z` or `±hh:mm`).
pub fn parse_rfc3339(s: &str) -> Result<Micros, TimestampError> {
    DateTime::parse_from_rfc3339(s)
        .map(|dt| dt.with_timezone(&Utc).timestamp_micros())
        .map_err(|_| TimestampError { value: s.to_string() })
}

/// `YYYY-MM-DD` for a day number counted from 1970-01-01, negative before it (0001-01-01 is
/// day -719 162, 9999-12-31 day 2 932 896).
pub fn format_date(days: i32) -> String {
    let (y, m, d) = civil_from_days(days.into());
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day number (from 1970-01-01) of `YYYY-MM-DD`, for years 0001 to 9999.
pub fn parse_date(s: &str) -> Option<i32> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    if s.len() != 10 || !(1..=9999).contains(&chrono::Datelike::year(&d)) {
        return None;
    }
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
    i32::try_from((d - epoch).num_days()).ok()
}

/// Microseconds since midnight of `hh:mm:ss[.f{1,6}]`, with or without a trailing `Z`.
pub fn parse_time_of_day(s: &str) -> Option<Micros> {
    let t = chrono::NaiveTime::parse_from_str(s.strip_suffix('Z').unwrap_or(s), "%H:%M:%S%.f").ok()?;
    (t - chrono::NaiveTime::MIN).num_microseconds()
}

/// `hh:mm:ss[.ffffff]` for microseconds since midnight.
pub fn format_time_of_day(us: Micros) -> String {
    let secs = us / MICROS_PER_SECOND;
    let frac = us % MICROS_PER_SECOND;
    let base = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 { base } else { format!("{base}.{frac:06}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_and_trimmed_forms() {
        let t = parse_rfc3339("2024-05-01T14:00:00.5+02:00").unwrap();
        assert_eq!(format_wire(t), "2024-05-01T12:00:00.500000Z");
        assert_eq!(format_trimmed(t), "2024-05-01T12:00:00.5Z");
        let whole = parse_rfc3339("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(format_wire(whole), "2024-05-01T12:00:00Z");
        assert_eq!(format_trimmed(whole), "2024-05-01T12:00:00Z");
        assert_eq!(format_fixed(whole), "2024-05-01T12:00:00.000000Z");
        for us in [
            0,
            1,
            -1,
            951_782_400_123_456,
            4_102_444_799_999_999,
            -2_208_988_800_000_000,
            t,
            1_709_164_800_000_000,
            -62_135_596_800_000_000,
            253_402_300_799_999_999,
        ] {
            assert_eq!(format_fixed(us), to_datetime(us).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "{us}");
        }
    }

    #[test]
    fn rejects_naive_timestamps() {
        assert!(parse_rfc3339("2024-05-01T12:00:00").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(19844), "2024-05-01");
        assert_eq!(format_date(-1), "1969-12-31");
        assert_eq!(format_date(-25567), "1900-01-01");
        assert_eq!(format_date(-719_162), "0001-01-01");
        assert_eq!(format_date(2_932_896), "9999-12-31");
        for text in ["0001-01-01", "1899-12-31", "1900-01-01", "1969-12-31", "1970-01-01", "2000-02-29", "9999-12-31"] {
            assert_eq!(format_date(parse_date(text).unwrap()), text);
        }
        assert_eq!(parse_date("0000-12-31"), None, "year 0 is outside the schema's domain");
        assert_eq!(parse_date("10000-01-01"), None);
        assert_eq!(parse_time_of_day("23:59:59.999999Z"), Some(MICROS_PER_DAY - 1));
        assert_eq!(parse_time_of_day("00:00:00"), Some(0));
        assert_eq!(format_time_of_day(3_723_000_001), "01:02:03.000001");
    }
}

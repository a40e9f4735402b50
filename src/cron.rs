//! Cron schedules for `dap watch --cron "0 */4 * * *"`: the five fields of crontab(5) (minute,
//! hour, day of month, month, day of week), each `*`, a number, a range `a-b`, a step `*/n` or
//! `a-b/n`, or a comma list of those; day of week 0-7 (0 and 7 are Sunday). As in cron, when
//! both day fields are restricted a day matching either one runs. Times are the machine's
//! local time, as crontab's are.

use chrono::{DateTime, Datelike, Duration, Local, TimeZone, Timelike};

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    days_restricted: bool,
    weekdays_restricted: bool,
}

/// The allowed values of each field, in order.
const FIELDS: [(&str, u32, u32); 5] =
    [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)];

fn field(text: &str, (name, low, high): (&str, u32, u32)) -> Result<Vec<bool>, String> {
    let mut set = vec![false; high as usize + 1];
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(|| format!("{name}: bad step in {part:?}"))?)
            }
            None => (part, 1),
        };
        let (from, to) = match range {
            "*" => (low, high),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a, name)?, number(b, name)?),
                None if part.contains('/') => (number(r, name)?, high),
                None => {
                    let n = number(r, name)?;
                    (n, n)
                }
            },
        };
        if from < low || to > high || from > to {
            return Err(format!("{name}: {part:?} is outside {low}-{high}"));
        }
        for v in (from..=to).step_by(step as usize) {
            set[v as usize] = true;
        }
    }
    Ok(set)
}

fn number(text: &str, name: &str) -> Result<u32, String> {
    text.parse().map_err(|_| format!("{name}: {text:?} is not a number"))
}

impl Cron {
    /// Parses the five fields; the error names the field and what is wrong.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [m, h, dom, mon, dow] = parts.as_slice() else {
            return Err(format!(
                "{text:?} is not a cron schedule: five fields are needed (minute hour day-of-month month day-of-week), e.g. \"0 */4 * * *\""
            ));
        };
        let mut weekdays = field(dow, FIELDS[4])?;
        if weekdays[7] {
            weekdays[0] = true;
        }
        Ok(Cron {
            minutes: field(m, FIELDS[0])?,
            hours: field(h, FIELDS[1])?,
            days: field(dom, FIELDS[2])?,
            months: field(mon, FIELDS[3])?,
            weekdays,
            days_restricted: *dom != "*",
            weekdays_restricted: *dow != "*",
        })
    }

    fn day_matches(&self, t: &DateTime<Local>) -> bool {
        let dom = self.days[t.day() as usize];
        let dow = self.weekdays[t.weekday().num_days_from_sunday() as usize];
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first minute strictly after `after` that the schedule names (within four years; a
    /// schedule such as 30 February never runs: `None`).
    pub fn next_after(&self, after: DateTime<Local>) -> Option<DateTime<Local>> {
        let start = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        let mut t = start;
        let limit = start + Duration::days(366 * 4);
        while t < limit {
            if !self.months[t.month() as usize] || !self.day_matches(&t) {
                // The next day at midnight (in local time; a midnight a clock change skips is
                // the first minute that exists).
                let next = t.date_naive().succ_opt()?.and_hms_opt(0, 0, 0)?;
                t = Local.from_local_datetime(&next).earliest().unwrap_or(t + Duration::hours(1));
                continue;
            }
            if !self.hours[t.hour() as usize] {
                t = t.with_minute(0)? + Duration::hours(1);
                continue;
            }
            if self.minutes[t.minute() as usize] {
                return Some(t);
            }
            t += Duration::minutes(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Local> {
        let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").unwrap();
        Local.from_local_datetime(&naive).earliest().unwrap()
    }

    fn next(cron: &str, after: &str) -> String {
        Cron::parse(cron).unwrap().next_after(at(after)).unwrap().format("%Y-%m-%d %H:%M").to_string()
    }

    #[test]
    fn the_next_run_is_the_first_matching_minute_after() {
        assert_eq!(next("0 */4 * * *", "2026-03-01 05:17"), "2026-03-01 08:00");
        assert_eq!(next("0 */4 * * *", "2026-03-01 08:00"), "2026-03-01 12:00");
        assert_eq!(next("*/15 * * * *", "2026-03-01 05:17"), "2026-03-01 05:30");
        assert_eq!(next("30 2 * * 1-5", "2026-03-06 03:00"), "2026-03-09 02:30"); // Friday → Monday
        assert_eq!(next("0 0 1 * *", "2026-03-15 10:00"), "2026-04-01 00:00");
        assert_eq!(next("5 6 29 2 *", "2026-03-01 00:00"), "2028-02-29 06:05");
        assert_eq!(next("0 12 * * 7", "2026-03-01 13:00"), "2026-03-08 12:00"); // 7 is Sunday
        // Both day fields restricted: either matches (the 13th, or any Friday).
        assert_eq!(next("0 0 13 * 5", "2026-03-01 00:00"), "2026-03-06 00:00");
        assert_eq!(next("10,20 1 * * *", "2026-03-01 01:10"), "2026-03-01 01:20");
    }

    #[test]
    fn bad_schedules_are_named() {
        for bad in ["0 */4 * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "x * * * *", "5-1 * * * *"] {
            let e = Cron::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(Cron::parse("0 0 30 2 *").unwrap().next_after(at("2026-01-01 00:00")).is_none());
    }
}

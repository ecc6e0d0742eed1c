//! Time windows (`[windows.NAME]`): days of the week and a time range in a fixed UTC offset.

use chrono::{DateTime, Datelike, FixedOffset, Timelike, Utc};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowSpec {
    /// mon, tue, wed, thu, fri, sat, sun (default: every day). For a range that wraps past
    /// midnight, the day is the day the range starts.
    #[serde(default)]
    pub days: Option<Vec<String>>,
    /// "HH:MM" (inclusive). Without start/end the window is the whole day.
    #[serde(default)]
    pub start: Option<String>,
    /// "HH:MM" (exclusive). end < start wraps past midnight; end == start is 24 hours.
    #[serde(default)]
    pub end: Option<String>,
    /// "+HH:MM" / "-HH:MM" / "Z" (default UTC). Fixed offsets only: no DST rules.
    #[serde(default)]
    pub utc_offset: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// Bit 0 = Monday … bit 6 = Sunday.
    days: u8,
    /// Minutes after local midnight; `None` = whole day.
    range: Option<(u16, u16)>,
    offset: FixedOffset,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_hhmm(s: &str) -> Result<u16, String> {
    let (h, m) = s.trim().split_once(':').ok_or_else(|| format!("{s:?} is not HH:MM"))?;
    let h: u16 = h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?;
    let m: u16 = m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0).ok_or_else(|| "bad offset".into());
    }
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(format!("utc_offset {s:?} must look like +02:00 or -05:30")),
    };
    let mins = parse_hhmm(rest).map_err(|_| format!("utc_offset {s:?} must look like +02:00 or -05:30"))?;
    if mins > 18 * 60 {
        return Err(format!("utc_offset {s:?} is out of range"));
    }
    FixedOffset::east_opt(sign * i32::from(mins) * 60).ok_or_else(|| format!("utc_offset {s:?} is out of range"))
}

impl Window {
    pub(crate) fn compile(spec: &WindowSpec) -> Result<Window, String> {
        let days = match &spec.days {
            None => 0x7f,
            Some(list) => {
                let mut bits = 0u8;
                for d in list {
                    let l = d.trim().to_ascii_lowercase();
                    let i = DAYS
                        .iter()
                        .position(|x| l.starts_with(x) && DAYS_FULL.iter().any(|f| f.starts_with(&l)))
                        .ok_or_else(|| format!("unknown day {d:?} (use mon … sun)"))?;
                    bits |= 1 << i;
                }
                if bits == 0 {
                    return Err("days must not be empty".into());
                }
                bits
            }
        };
        let range = match (&spec.start, &spec.end) {
            (None, None) => None,
            (Some(s), Some(e)) => Some((parse_hhmm(s)? % 1440, parse_hhmm(e)? % 1440)),
            _ => return Err("give both start and end, or neither".into()),
        };
        let offset = match &spec.utc_offset {
            None => FixedOffset::east_opt(0).expect("zero offset"),
            Some(o) => parse_offset(o)?,
        };
        Ok(Window { days, range, offset })
    }

    pub(crate) fn contains(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.offset);
        let wd = local.weekday().num_days_from_monday() as u8;
        let prev = (wd + 6) % 7;
        let on = |d: u8| self.days & (1 << d) != 0;
        let m = (local.hour() * 60 + local.minute()) as u16;
        match self.range {
            None => on(wd),
            Some((s, e)) if s < e => on(wd) && m >= s && m < e,
            // Wraps past midnight (or 24 hours when s == e).
            Some((s, e)) => (on(wd) && m >= s) || (on(prev) && m < e),
        }
    }
}

const DAYS_FULL: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn w(days: Option<&[&str]>, start: Option<&str>, end: Option<&str>, off: Option<&str>) -> Window {
        Window::compile(&WindowSpec {
            days: days.map(|d| d.iter().map(|s| s.to_string()).collect()),
            start: start.map(str::to_owned),
            end: end.map(str::to_owned),
            utc_offset: off.map(str::to_owned),
        })
        .unwrap()
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn windows() {
        // 2025-06-07 is a Saturday.
        let weekend = w(Some(&["sat", "sunday"]), None, None, None);
        assert!(weekend.contains(at(2025, 6, 7, 12, 0)));
        assert!(!weekend.contains(at(2025, 6, 9, 12, 0)));
        let night = w(Some(&["fri"]), Some("22:00"), Some("02:00"), None);
        assert!(night.contains(at(2025, 6, 6, 23, 0)));
        assert!(night.contains(at(2025, 6, 7, 1, 59)));
        assert!(!night.contains(at(2025, 6, 7, 2, 0)));
        assert!(!night.contains(at(2025, 6, 6, 21, 59)));
        let office = w(None, Some("09:00"), Some("17:00"), Some("+02:00"));
        assert!(office.contains(at(2025, 6, 9, 7, 0)));
        assert!(!office.contains(at(2025, 6, 9, 15, 0)));
        assert!(Window::compile(&WindowSpec { days: Some(vec!["funday".into()]), ..Default::default() }).is_err());
        assert!(
            Window::compile(&WindowSpec {
                start: Some("25:00".into()),
                end: Some("1:00".into()),
                ..Default::default()
            })
            .is_err()
        );
        assert!(Window::compile(&WindowSpec { start: Some("01:00".into()), ..Default::default() }).is_err());
    }
}

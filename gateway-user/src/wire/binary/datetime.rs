//! Dates and times in binary (integers counted from 2000-01-01) as Postgres prints them with
//! `DateStyle` ISO and `IntervalStyle` postgres: `2024-02-29`, `13:05:00.25`,
//! `2024-02-29 13:05:00.25`, `0044-03-15 12:00:00 BC`, `2024-02-29 13:05:00.25+00` (a
//! timestamptz in UTC), `1 year 2 mons -3 days +04:05:06.5`, `infinity`.

use super::Cursor;

const USECS_PER_SEC: i64 = 1_000_000;
const USECS_PER_MINUTE: i64 = 60 * USECS_PER_SEC;
const USECS_PER_HOUR: i64 = 60 * USECS_PER_MINUTE;
const USECS_PER_DAY: i64 = 24 * USECS_PER_HOUR;
const MONTHS_PER_YEAR: i32 = 12;
/// The Julian day number of 2000-01-01, the day binary dates and timestamps count from.
const POSTGRES_EPOCH_JDATE: i64 = 2_451_545;
/// Julian days Postgres accepts for a date: from 4714-11-24 BC (day 0) up to, not including,
/// 5874898-01-01.
const DATE_END_JULIAN: i64 = 2_147_483_494;
/// Microseconds Postgres accepts for a timestamp: from 4714-11-24 BC 00:00 up to, not
/// including, 294277-01-01 00:00.
const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// `date`: days from 2000-01-01; `i32::MIN` / `i32::MAX` are -infinity / infinity.
pub(super) fn date_text(days: i32) -> Option<String> {
    match days {
        i32::MIN => return Some("-infinity".into()),
        i32::MAX => return Some("infinity".into()),
        _ => {}
    }
    let jd = i64::from(days) + POSTGRES_EPOCH_JDATE;
    if !(0..DATE_END_JULIAN).contains(&jd) {
        return None;
    }
    let (y, m, d) = j2date(jd);
    Some(format!("{}{}", ymd(y, m, d), bc(y)))
}

/// `time`: microseconds from midnight, 00:00:00 to 24:00:00.
pub(super) fn time_text(us: i64) -> Option<String> {
    if !(0..=USECS_PER_DAY).contains(&us) {
        return None;
    }
    let (h, m, s, f) = (us / USECS_PER_HOUR, us / USECS_PER_MINUTE % 60, us / USECS_PER_SEC % 60, us % USECS_PER_SEC);
    Some(format!("{h:02}:{m:02}:{}", seconds(s, f)))
}

/// `timestamp` / `timestamptz`: microseconds from 2000-01-01 00:00 (UTC for timestamptz,
/// printed with `+00`); `i64::MIN` / `i64::MAX` are -infinity / infinity.
pub(super) fn timestamp_text(us: i64, utc: bool) -> Option<String> {
    match us {
        i64::MIN => return Some("-infinity".into()),
        i64::MAX => return Some("infinity".into()),
        _ => {}
    }
    if !(MIN_TIMESTAMP..END_TIMESTAMP).contains(&us) {
        return None;
    }
    let (days, time) = (us.div_euclid(USECS_PER_DAY), us.rem_euclid(USECS_PER_DAY));
    let (y, m, d) = j2date(days + POSTGRES_EPOCH_JDATE);
    let (h, min, s, f) = (time / USECS_PER_HOUR, time / USECS_PER_MINUTE % 60, time / USECS_PER_SEC % 60, time % USECS_PER_SEC);
    let tz = if utc { "+00" } else { "" };
    Some(format!("{} {h:02}:{min:02}:{}{tz}{}", ymd(y, m, d), seconds(s, f), bc(y)))
}

/// `interval`: microseconds (i64), days (i32), months (i32), printed as Postgres's
/// `EncodeInterval` does in the postgres style: nonzero years, months and days, each after
/// a negative one signed `+` when positive; then `[-|+]HH:MM:SS[.ffffff]` when there is a
/// time part or nothing else (`00:00:00`).
pub(super) fn interval_text(v: &[u8]) -> Option<String> {
    let mut r = Cursor::new(v);
    let (time, day, month) = (r.i64()?, r.i32()?, r.i32()?);
    if !r.is_done() {
        return None;
    }
    let mut s = String::new();
    let (mut is_zero, mut is_before) = (true, false);
    let mut part = |s: &mut String, value: i64, unit: &str| {
        if value == 0 {
            return;
        }
        let sep = if is_zero { "" } else { " " };
        let plus = if is_before && value > 0 { "+" } else { "" };
        let plural = if value != 1 { "s" } else { "" };
        s.push_str(&format!("{sep}{plus}{value} {unit}{plural}"));
        is_before = value < 0;
        is_zero = false;
    };
    part(&mut s, i64::from(month / MONTHS_PER_YEAR), "year");
    part(&mut s, i64::from(month % MONTHS_PER_YEAR), "mon");
    part(&mut s, i64::from(day), "day");
    let (hour, min, sec, fsec) =
        (time / USECS_PER_HOUR, time % USECS_PER_HOUR / USECS_PER_MINUTE, time % USECS_PER_MINUTE / USECS_PER_SEC, time % USECS_PER_SEC);
    if is_zero || time != 0 {
        let sep = if is_zero { "" } else { " " };
        let sign = if time < 0 {
            "-"
        } else if is_before {
            "+"
        } else {
            ""
        };
        s.push_str(&format!("{sep}{sign}{:02}:{:02}:{}", hour.unsigned_abs(), min.unsigned_abs(), seconds(sec.abs(), fsec.abs())));
    }
    Some(s)
}

/// `SS` and, when there are microseconds, `.ffffff` without trailing zeros.
fn seconds(sec: i64, usec: i64) -> String {
    if usec == 0 {
        return format!("{sec:02}");
    }
    let frac = format!("{usec:06}");
    format!("{sec:02}.{}", frac.trim_end_matches('0'))
}

/// `YYYY-MM-DD`, the year at least four digits; a year before 1 AD as its BC number.
fn ymd(y: i64, m: i64, d: i64) -> String {
    let year = if y > 0 { y } else { 1 - y };
    format!("{year:04}-{m:02}-{d:02}")
}

fn bc(y: i64) -> &'static str {
    if y > 0 { "" } else { " BC" }
}

/// Postgres's `j2date`: the proleptic Gregorian (year, month, day) of a Julian day number
/// (year 0 is 1 BC). `jd` is in 0..DATE_END_JULIAN (checked by the callers).
fn j2date(jd: i64) -> (i64, i64, i64) {
    let mut julian = jd + 32044;
    let mut quad = julian / 146_097;
    let extra = (julian - quad * 146_097) * 4 + 3;
    julian += 60 + quad * 3 + extra / 146_097;
    quad = julian / 1461;
    julian -= quad * 1461;
    let mut y = julian * 4 / 1461;
    julian = if y != 0 { (julian + 305) % 365 } else { (julian + 306) % 366 } + 123;
    y += quad * 4;
    let year = y - 4800;
    let q = julian * 2141 / 65536;
    let day = julian - 7834 * q / 256;
    let month = (q + 10) % i64::from(MONTHS_PER_YEAR) + 1;
    (year, month, day)
}

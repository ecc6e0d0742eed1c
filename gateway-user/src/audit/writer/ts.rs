//! Record timestamps.

use chrono::SecondsFormat;

/// The current time as a record's `ts`: RFC 3339, UTC, microseconds
/// (`2026-12-02T05:10:41.123456Z`).
pub(super) fn now_ts(cache: &mut TsCache) -> String {
    format_ts(chrono::Utc::now(), cache)
}

/// The formatted date and time of the last second a `ts` was made for: records come
/// thousands per second, and only the microseconds change within one (chrono's RFC 3339
/// formatting was ~1% of pgward's instructions per statement).
#[derive(Default)]
pub(crate) struct TsCache {
    pub(super) second: Option<i64>,
    pub(super) prefix: String,
}

pub(crate) fn format_ts(t: chrono::DateTime<chrono::Utc>, cache: &mut TsCache) -> String {
    use std::fmt::Write as _;
    let micros = t.timestamp_subsec_micros();
    if micros >= 1_000_000 {
        // A leap second: leave it to chrono.
        return t.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    let second = t.timestamp();
    if cache.second != Some(second) {
        cache.prefix = t.format("%Y-%m-%dT%H:%M:%S.").to_string();
        cache.second = Some(second);
    }
    let mut s = String::with_capacity(cache.prefix.len() + 7);
    s.push_str(&cache.prefix);
    let _ = write!(s, "{micros:06}Z");
    s
}

//! The clock tokens are checked against: synchronized, and not behind the audit log.

use std::path::Path;

use super::Ctx;
use super::report::{Check, Outcome, check};

pub(super) fn clock(cx: &Ctx) -> Check {
    let name = "clock";
    let now = chrono::Utc::now();
    // The newest audit record: the clock must not be behind it.
    if let Some(ts) = last_audit_ts(&cx.cfg.resolve(&cx.cfg.audit.dir))
        && now + chrono::Duration::seconds(cx.cfg.auth.leeway_secs as i64) < ts
    {
        return check(
            name,
            Outcome::Fail,
            format!("the clock ({}) is behind the newest audit record ({})", now.to_rfc3339(), ts.to_rfc3339()),
            Some("set the clock right and keep it synchronized: timedatectl set-ntp true".into()),
        );
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into the struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return check(
            name,
            Outcome::Warn,
            format!("cannot read the clock state: {}", std::io::Error::last_os_error()),
            None,
        );
    }
    let unsync = state == libc::TIME_ERROR || tx.status & libc::STA_UNSYNC != 0;
    if unsync {
        return check(
            name,
            Outcome::Warn,
            format!(
                "not synchronized (kernel: STA_UNSYNC); token exp/nbf are checked against it with {} s leeway",
                cx.cfg.auth.leeway_secs
            ),
            Some("enable time synchronization: timedatectl set-ntp true (systemd-timesyncd) or install chrony".into()),
        );
    }
    check(name, Outcome::Pass, format!("synchronized (estimated error {} ms)", tx.esterror / 1000), None)
}

fn last_audit_ts(dir: &Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let last = crate::audit::chain::list_segments(dir).ok()?.pop()?;
    let line = crate::audit::last_line(&last.path).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&line).ok()?;
    chrono::DateTime::parse_from_rfc3339(v.get("ts")?.as_str()?).ok().map(|t| t.with_timezone(&chrono::Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest record is the last complete line of the last segment, before the zeros of
    /// its preallocated tail and any unterminated fragment.
    #[test]
    fn last_audit_ts_reads_the_newest_complete_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(last_audit_ts(d), None);
        let line = |seq: u64, ts: &str| format!("{{\"seq\":{seq},\"ts\":\"{ts}\",\"kind\":\"statement\"}}\n");
        std::fs::write(d.join(crate::audit::chain::segment_name(1)), line(1, "2026-01-01T00:00:01Z")).unwrap();
        let mut live = line(2, "2026-01-02T00:00:02Z") + &line(3, "2026-01-03T00:00:03Z") + "{\"seq\":4,\"ts\":\"2026-01-04";
        live.push_str(&"\0".repeat(4096));
        std::fs::write(d.join(crate::audit::chain::segment_name(2)), live).unwrap();
        let want = chrono::DateTime::parse_from_rfc3339("2026-01-03T00:00:03Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(last_audit_ts(d), Some(want));
    }
}

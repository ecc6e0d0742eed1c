//! What a doctor run reports: each check's outcome, detail and fix, as a table or JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

/// A check's result; any FAIL makes doctor exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

/// One line of the report: what was checked, its outcome, what was found, and how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub result: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// A [`Check`] named `name`.
pub(super) fn check(name: &'static str, result: Outcome, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { check: name, result, detail: detail.into(), fix }
}

/// Everything doctor found, as printed (table) or serialized (`--json`).
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) config: PathBuf,
    pub(super) serve_pid: Option<u32>,
    pub(super) checks: Vec<Check>,
}

pub(super) fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "pgward doctor: {}", r.config.display());
    match r.serve_pid {
        Some(pid) => {
            let _ = writeln!(o, "pgward serve: running (pid {pid})");
        }
        None => {
            let _ = writeln!(o, "pgward serve: not running");
        }
    }
    let _ = writeln!(o);
    let w = r.checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(o, "{:<w$}  {:<6}  DETAIL", "CHECK", "RESULT");
    for c in &r.checks {
        let _ = writeln!(o, "{:<w$}  {:<6}  {}", c.check, c.result.label(), c.detail);
    }
    let (fails, warns) = (
        r.checks.iter().filter(|c| c.result == Outcome::Fail).count(),
        r.checks.iter().filter(|c| c.result == Outcome::Warn).count(),
    );
    let _ = writeln!(
        o,
        "\n{fails} failed, {warns} warning(s), {} passed",
        r.checks.iter().filter(|c| c.result == Outcome::Pass).count()
    );
    let fixes: Vec<&Check> =
        r.checks.iter().filter(|c| matches!(c.result, Outcome::Fail | Outcome::Warn) && c.fix.is_some()).collect();
    if !fixes.is_empty() {
        let _ = writeln!(o, "\nHow to fix:");
        for c in fixes {
            let _ = writeln!(o, "  [{}] {}: {}", c.result.label(), c.check, c.fix.as_deref().unwrap_or_default());
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_fixes_for_failures() {
        let r = Report {
            config: "/etc/pgward/pgward.toml".into(),
            serve_pid: None,
            checks: vec![
                check("kernel", Outcome::Pass, "Linux 6.1", None),
                check("programs attached", Outcome::Fail, "not running", Some("systemctl start pgward".into())),
            ],
        };
        let t = render(&r);
        assert!(t.contains("pgward serve: not running"), "{t}");
        assert!(t.contains("programs attached  FAIL    not running"), "{t}");
        assert!(t.contains("[FAIL] programs attached: systemctl start pgward"), "{t}");
        assert!(t.contains("1 failed, 0 warning(s), 1 passed"), "{t}");
    }
}

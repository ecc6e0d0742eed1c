//! What a server is, for `upstream.target_session_attrs`: in recovery (a hot standby) or not,
//! and whether it takes writes by default.
//!
//! Read as libpq 14+ reads it: from the ParameterStatus values the server reports
//! (`in_hot_standby` and `default_transaction_read_only`, both reported since PostgreSQL 14).
//! The server reports them again whenever they change — a promoted standby says
//! `in_hot_standby = off`, a reload that makes a primary read-only says
//! `default_transaction_read_only = on` — before the ReadyForQuery of the next statement, so a
//! connection that has just answered a Query carries the server's current state for free. A
//! server that reports neither (before 14) is asked with [`STATE_SQL`], as libpq does.

use crate::config::TargetSessionAttrs;
use crate::upstream::{Upstream, UpstreamError};

/// One round trip for servers that do not report their state: in recovery, read-only.
pub const STATE_SQL: &str =
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')";

/// A server's state as far as `target_session_attrs` cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    /// In recovery: a hot standby (`in_hot_standby`, `pg_is_in_recovery()`).
    pub in_recovery: bool,
    /// New transactions are read-only by default (`default_transaction_read_only`); always so
    /// in recovery.
    pub read_only: bool,
}

impl ServerState {
    /// The state the server reported in ParameterStatus messages; None when it reported
    /// neither parameter (a server before PostgreSQL 14) or a value that is not a boolean.
    pub fn from_params(params: &[(String, String)]) -> Option<ServerState> {
        let get = |name: &str| {
            params
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let in_recovery = parse_bool(get("in_hot_standby")?)?;
        let read_only = parse_bool(get("default_transaction_read_only")?)?;
        Some(ServerState {
            in_recovery,
            read_only: read_only || in_recovery,
        })
    }

    /// The state of the server `up` is connected to: from what it reported, else asked with
    /// [`STATE_SQL`] (the connection must be idle).
    pub async fn of(up: &mut Upstream) -> Result<ServerState, UpstreamError> {
        if let Some(s) = ServerState::from_params(&up.params) {
            return Ok(s);
        }
        let rows = up.query_rows(STATE_SQL).await?;
        let cell = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .and_then(|v| v.as_deref())
                .and_then(parse_bool)
        };
        match (cell(0), cell(1)) {
            (Some(in_recovery), Some(read_only)) => Ok(ServerState {
                in_recovery,
                read_only: read_only || in_recovery,
            }),
            _ => Err(UpstreamError::Reset(format!(
                "unexpected answer to {STATE_SQL:?}: {rows:?}"
            ))),
        }
    }
}

/// A boolean as Postgres prints one: `on`/`off` (settings), `t`/`f` (bool columns).
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "t" | "true" => Some(true),
        "off" | "f" | "false" => Some(false),
        _ => None,
    }
}

impl TargetSessionAttrs {
    /// Whether a session with these attributes may use a server in state `s`.
    /// `prefer-standby` takes any server; the host walk tries standbys first.
    pub fn accepts(self, s: ServerState) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !s.read_only,
            TargetSessionAttrs::ReadOnly => s.read_only,
            TargetSessionAttrs::Primary => !s.in_recovery,
            TargetSessionAttrs::Standby => s.in_recovery,
        }
    }

    /// Whether a server in state `s` is what these attributes look for first (for
    /// `prefer-standby`: a standby; for the others: any server they accept).
    pub fn prefers(self, s: ServerState) -> bool {
        match self {
            TargetSessionAttrs::PreferStandby => s.in_recovery,
            other => other.accepts(s),
        }
    }

    /// libpq's spelling, for messages.
    pub fn name(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Every value, for per-value tables.
    pub const ALL: [TargetSessionAttrs; 6] = [
        TargetSessionAttrs::Any,
        TargetSessionAttrs::ReadWrite,
        TargetSessionAttrs::ReadOnly,
        TargetSessionAttrs::Primary,
        TargetSessionAttrs::Standby,
        TargetSessionAttrs::PreferStandby,
    ];

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetSessionAttrs as A;

    fn params(hot: &str, ro: &str) -> Vec<(String, String)> {
        vec![
            ("in_hot_standby".into(), hot.into()),
            ("default_transaction_read_only".into(), ro.into()),
        ]
    }

    #[test]
    fn state_from_reported_parameters() {
        assert_eq!(
            ServerState::from_params(&params("off", "off")),
            Some(ServerState {
                in_recovery: false,
                read_only: false
            })
        );
        assert_eq!(
            ServerState::from_params(&params("on", "off")),
            Some(ServerState {
                in_recovery: true,
                read_only: true
            })
        );
        assert_eq!(
            ServerState::from_params(&params("off", "on")),
            Some(ServerState {
                in_recovery: false,
                read_only: true
            })
        );
        assert_eq!(ServerState::from_params(&params("maybe", "off")), None);
        assert_eq!(
            ServerState::from_params(&params("on", "off")[1..]),
            None,
            "a server that does not report"
        );
        // A later report (promotion) wins over the login's.
        let mut p = params("on", "off");
        p.push(("in_hot_standby".into(), "off".into()));
        assert_eq!(
            ServerState::from_params(&p).map(|s| s.in_recovery),
            Some(false)
        );
    }

    #[test]
    fn attrs_accept_as_libpq_does() {
        let primary = ServerState {
            in_recovery: false,
            read_only: false,
        };
        let ro_primary = ServerState {
            in_recovery: false,
            read_only: true,
        };
        let standby = ServerState {
            in_recovery: true,
            read_only: true,
        };
        let table = [
            (A::Any, [true, true, true]),
            (A::ReadWrite, [true, false, false]),
            (A::ReadOnly, [false, true, true]),
            (A::Primary, [true, true, false]),
            (A::Standby, [false, false, true]),
            (A::PreferStandby, [true, true, true]),
        ];
        for (a, want) in table {
            assert_eq!(
                [
                    a.accepts(primary),
                    a.accepts(ro_primary),
                    a.accepts(standby)
                ],
                want,
                "{}",
                a.name()
            );
        }
        assert!(A::PreferStandby.prefers(standby) && !A::PreferStandby.prefers(primary));
        assert!(A::ReadWrite.prefers(primary) && !A::ReadWrite.prefers(standby));
        for (i, a) in A::ALL.iter().enumerate() {
            assert_eq!(a.index(), i);
        }
    }

    #[test]
    fn attrs_parse_with_libpq_names() {
        #[derive(serde::Deserialize)]
        struct T {
            a: TargetSessionAttrs,
        }
        for a in A::ALL {
            let t: T = toml::from_str(&format!("a = {:?}", a.name())).unwrap();
            assert_eq!(t.a, a);
        }
        assert!(toml::from_str::<T>("a = \"read_write\"").is_err());
    }
}

//! Setting changes: which modifiers a change of a run-time setting implies, and the client
//! encodings pgward reads text in.

use super::class::{ModSet, Modifier};

/// The modifiers a change of setting `name` (lowercase) to `value` (lowercase literal, if
/// known; `default` for RESET and `SET … TO DEFAULT`) implies. The lexical settings must stay
/// what pgward parses with (standard_conforming_strings on, a UTF-8 client encoding,
/// backslash_quote safe_encoding): setting one to anything else is a protected setting. The
/// session starts upstream with those values, so RESET and DEFAULT restore them.
pub(crate) fn setting_change(name: &str, value: Option<&str>) -> ModSet {
    let mut m = ModSet::default();
    let keeps = match name {
        "role" | "session_authorization" => {
            m.insert(Modifier::IdentityChange);
            true
        }
        "search_path" => {
            m.insert(Modifier::SearchPath);
            true
        }
        "standard_conforming_strings" => value.is_some_and(|v| v == "default" || bool_true(v)),
        "client_encoding" | "names" => value.is_some_and(|v| v == "default" || utf8_encoding(v)),
        "backslash_quote" => matches!(value, Some("default" | "safe_encoding")),
        _ => true,
    };
    if !keeps {
        m.insert(Modifier::ProtectedSetting);
    }
    m
}

/// A value Postgres reads as boolean true (`parse_bool`: unique prefixes of true/yes, on, 1).
fn bool_true(v: &str) -> bool {
    let v = v.trim();
    (!v.is_empty() && ("true".starts_with(v) || "yes".starts_with(v))) || v == "on" || v == "1"
}

/// An encoding name Postgres reads as UTF8 (case and punctuation ignored, as Postgres does).
pub fn utf8_encoding(name: &str) -> bool {
    matches!(crate::wire::encoding_key(name).as_str(), "utf8" | "unicode")
}

/// A client encoding pgward relays: UTF8, SQL_ASCII (which a UTF8 server checks as UTF-8),
/// or LATIN1 — those whose text pgward decodes exactly as the server converts it
/// (`wire::ClientEncoding`).
pub fn supported_client_encoding(name: &str) -> bool {
    crate::wire::ClientEncoding::from_name(name).is_some()
}

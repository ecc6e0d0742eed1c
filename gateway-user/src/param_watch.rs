//! The backstop behind the policy's lexical and identity checks: every ParameterStatus the
//! server reports is compared with what pgward expects. If the identity Postgres runs the
//! session as, or a setting pgward's parser depends on, ever changes — by a path the policy
//! did not see — the session ends before another statement is forwarded.

use crate::wire::ClientEncoding;

/// What the session was logged in as, from the server's own reports at login.
#[derive(Debug, Clone)]
pub struct ParamWatch {
    session_authorization: Option<String>,
    is_superuser: Option<String>,
    /// The client encoding reported at login: SQL text is decoded from it, and it must not
    /// change.
    client_encoding: String,
    encoding: ClientEncoding,
}

impl ParamWatch {
    /// The reports of a freshly set-up upstream session. Err: a setting pgward parses with
    /// does not hold (the upstream is not one pgward can check statements for).
    pub fn at_login(params: &[(String, String)]) -> Result<ParamWatch, String> {
        let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
        for (k, v) in params {
            check_lexical(k, v)?;
        }
        if let Some(enc) = get("server_encoding")
            && !crate::policy::utf8_encoding(&enc)
        {
            return Err(format!("the database's server_encoding is {enc}; pgward checks statements for UTF8 databases only"));
        }
        let client_encoding = get("client_encoding").unwrap_or_else(|| "UTF8".into());
        let encoding = ClientEncoding::from_name(&client_encoding)
            .ok_or_else(|| format!("the server reported client_encoding {client_encoding}, which pgward does not parse SQL in"))?;
        Ok(ParamWatch {
            session_authorization: get("session_authorization"),
            is_superuser: get("is_superuser"),
            client_encoding,
            encoding,
        })
    }

    /// How the session's SQL texts are decoded.
    pub fn encoding(&self) -> ClientEncoding {
        self.encoding
    }

    /// The client encoding's name as the server reported it.
    pub fn encoding_name(&self) -> &str {
        &self.client_encoding
    }

    /// A later report. Err: the session must end (the message says what changed).
    pub fn check(&self, name: &str, value: &str) -> Result<(), String> {
        check_lexical(name, value)?;
        if name == "client_encoding" && value != self.client_encoding {
            return Err(format!(
                "the server reported client_encoding = \"{value}\" (the session started with \"{}\")",
                self.client_encoding
            ));
        }
        let expected = match name {
            "session_authorization" => &self.session_authorization,
            "is_superuser" => &self.is_superuser,
            _ => return Ok(()),
        };
        match expected {
            Some(e) if e == value => Ok(()),
            Some(e) => Err(format!("the server reported {name} = \"{value}\" (the session started as \"{e}\")")),
            None => Err(format!("the server reported {name} = \"{value}\", which it did not report at login")),
        }
    }
}

fn check_lexical(name: &str, value: &str) -> Result<(), String> {
    let ok = match name {
        "standard_conforming_strings" => value == "on",
        "client_encoding" => ClientEncoding::from_name(value).is_some(),
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("the server reported {name} = \"{value}\", which pgward does not parse SQL under")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn table() {
        let w = ParamWatch::at_login(&p(&[
            ("session_authorization", "pgward_svc"),
            ("is_superuser", "off"),
            ("standard_conforming_strings", "on"),
            ("client_encoding", "UTF8"),
            ("server_encoding", "UTF8"),
        ]))
        .unwrap();
        assert!(w.check("application_name", "x").is_ok());
        assert!(w.check("session_authorization", "pgward_svc").is_ok());
        assert!(w.check("session_authorization", "postgres").is_err());
        assert!(w.check("is_superuser", "on").is_err());
        assert!(w.check("standard_conforming_strings", "off").is_err());
        assert!(w.check("client_encoding", "SJIS").is_err());
        assert!(w.check("client_encoding", "LATIN1").is_err());
        assert!(w.check("client_encoding", "UTF8").is_ok());
        assert_eq!(w.encoding(), ClientEncoding::Utf8);
        let l = ParamWatch::at_login(&p(&[("client_encoding", "LATIN1")])).unwrap();
        assert_eq!(l.encoding(), ClientEncoding::Latin1);
        assert!(l.check("client_encoding", "UTF8").is_err());
        assert!(ParamWatch::at_login(&p(&[("client_encoding", "WIN1251")])).is_err());
        assert!(ParamWatch::at_login(&p(&[("standard_conforming_strings", "off")])).is_err());
        assert!(ParamWatch::at_login(&p(&[("server_encoding", "LATIN1")])).is_err());
        let bare = ParamWatch::at_login(&[]).unwrap();
        assert!(bare.check("is_superuser", "on").is_err());
    }
}

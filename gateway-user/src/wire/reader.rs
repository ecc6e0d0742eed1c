//! Reading message bodies: a bounds-checked cursor, and protocol strings as text in the
//! client's encoding.

use std::borrow::Cow;

use bytes::Buf;

use super::WireError;

/// Bytes of a protocol string as text. Clients may use any `client_encoding`, so strings are
/// not required to be UTF-8: valid UTF-8 is used as is; anything else is read byte for byte as
/// Latin-1 code points (lossless: each byte maps to one char, so the audit log keeps exactly
/// what was sent, and is exact for LATIN1 clients).
pub fn text(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(b.iter().map(|&c| c as char).collect()),
    }
}

/// An encoding name as Postgres compares them: case and punctuation ignored (`UTF-8` = `utf8`).
pub fn encoding_key(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()
}

/// The client encodings pgward decodes SQL text from exactly as a UTF-8 server converts it
/// before lexing: UTF8 (and SQL_ASCII, which such a server checks as UTF-8), and LATIN1
/// (each byte is the code point of the same value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEncoding {
    Utf8,
    Latin1,
}

impl ClientEncoding {
    /// From a `client_encoding` value (case and punctuation ignored, as Postgres does).
    pub fn from_name(name: &str) -> Option<ClientEncoding> {
        match encoding_key(name).as_str() {
            "utf8" | "unicode" | "sqlascii" => Some(ClientEncoding::Utf8),
            "latin1" | "iso88591" => Some(ClientEncoding::Latin1),
            _ => None,
        }
    }

    /// The text the server will lex; Err with the offset of the first invalid byte.
    pub fn decode(self, b: &[u8]) -> Result<Cow<'_, str>, WireError> {
        match self {
            ClientEncoding::Utf8 => std::str::from_utf8(b).map(Cow::Borrowed).map_err(|e| WireError::Encoding(e.valid_up_to())),
            ClientEncoding::Latin1 => Ok(text(b)),
        }
    }
}

/// Cursor over a message body.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }
    pub fn remaining(&self) -> usize {
        self.b.len()
    }
    /// A NUL-terminated string, as text (see [`text`]).
    pub fn cstr(&mut self) -> Result<Cow<'a, str>, WireError> {
        let nul = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| WireError::malformed("string without terminator"))?;
        let s = text(&self.b[..nul]);
        self.b = &self.b[nul + 1..];
        Ok(s)
    }
    /// A NUL-terminated SQL text, decoded from the session's client encoding into the text
    /// the server lexes (no lossy fallback: pgward must not decide on text the server reads
    /// differently).
    pub fn sql(&mut self, enc: ClientEncoding) -> Result<Cow<'a, str>, WireError> {
        let nul = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| WireError::malformed("string without terminator"))?;
        let s = enc.decode(&self.b[..nul])?;
        self.b = &self.b[nul + 1..];
        Ok(s)
    }
    /// The message must end here: bytes after its last field (a NUL inside a text, say)
    /// would be read one way by pgward and refused or read another way by the server.
    pub fn end(&self, what: &str) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::malformed(format!("{what} has {} bytes after its last field (a NUL inside its text?)", self.b.len())))
        }
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        if self.b.is_empty() {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_u8())
    }
    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.b.len() < 2 {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_i16())
    }
    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.b.len() < 4 {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_i32())
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::malformed("message truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

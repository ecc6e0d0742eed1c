//! Messages other than rows that can carry values: ErrorResponse and NoticeResponse (every
//! field: PL/pgSQL's `RAISE … USING COLUMN = …` puts any text in the column, table, schema,
//! datatype and constraint fields), NotificationResponse (`pg_notify(…, card)`),
//! ParameterStatus (`set_config('application_name', card, false)`) and FunctionCallResponse.
//! The content detectors of the session's rules run over each, and with column rules the
//! detail of an error that echoes a table row is withheld; a message that cannot be read is
//! replaced, never passed on.

use bytes::{BufMut, BytesMut};

use super::SessionMask;
use super::relay::{binary_hits, scan_in_place};
use crate::wire::{self, Frame, Reader};

/// The bytes of a NUL-terminated string at the front of `b`, which moves past it.
fn cstr<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], ()> {
    let nul = b.iter().position(|&c| c == 0).ok_or(())?;
    let (v, rest) = b.split_at(nul);
    *b = &rest[1..];
    Ok(v)
}

/// Error/notice fields that are not free text: severity (localized and not), SQLSTATE, and
/// the numeric position, line and file fields of the server's own source.
const FIXED_FIELDS: &[u8] = b"SVCPpLFR";

/// The text that replaces a field or payload with a detected value that the rule's style
/// cannot keep in place (style `null`), or a message pgward cannot read.
const MASKED: &[u8] = b"(masked)";

/// SQLSTATE classes whose errors echo a row's values in their DETAIL: integrity constraint
/// violations (23: "Failing row contains (…)", "Key (…)=(…) already exists", a partition
/// key) and WITH CHECK OPTION violations (44). The row is the table's, masked columns
/// included, and the detectors know nothing of a column without a detectable shape.
const ROW_ECHOING_CLASSES: &[&[u8]] = &[b"23", b"44"];

/// The DETAIL that replaces one of a [`ROW_ECHOING_CLASSES`] error in a session with column
/// rules.
const WITHHELD_DETAIL: &[u8] = b"pgward: the detail (a row's values) was withheld by masking";

/// The ParameterStatus whose value pgward itself checks (`param_watch`): a role name is not
/// rewritten.
const UNSCRUBBED_PARAMETERS: &[&[u8]] = &[b"session_authorization"];

/// `v` with the session's content detectors applied, as in a row's text value (None:
/// unchanged); a value a rule would make NULL becomes [`MASKED`].
fn scrub(v: &[u8], sess: &SessionMask) -> Option<Vec<u8>> {
    let new = scan_in_place(v, sess)?.unwrap_or_else(|| MASKED.to_vec());
    // A C string cannot hold NUL.
    Some(new.into_iter().filter(|&b| b != 0).collect())
}

fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut raw = BytesMut::with_capacity(body.len() + 5);
    wire::message(&mut raw, tag, body);
    Frame { tag, raw: raw.freeze() }
}

/// A message of one of the kinds this module scrubs, with detected values masked. Other
/// frames come back as they are.
pub fn scrub_message(f: Frame, sess: &SessionMask) -> Frame {
    let errors = matches!(f.tag, b'E' | b'N') && sess.column_rules() != 0;
    if !sess.has_content() && !errors {
        return f;
    }
    let rewritten = match f.tag {
        b'E' | b'N' => error_fields(f.body(), sess).map(|b| b.map(|b| frame(f.tag, &b))),
        b'A' => notification(f.body(), sess).map(|b| b.map(|b| frame(b'A', &b))),
        b'S' => parameter_status(f.body(), sess).map(|b| b.map(|b| frame(b'S', &b))),
        b'V' => function_result(f.body(), sess).map(|b| b.map(|b| frame(b'V', &b))),
        _ => return f,
    };
    match rewritten {
        Ok(Some(new)) => new,
        Ok(None) => f,
        Err(()) => unreadable(f.tag),
    }
}

/// The replacement for a message pgward could not read.
fn unreadable(tag: u8) -> Frame {
    tracing::error!(tag = %char::from(tag), "masking: a server message pgward cannot read was replaced");
    match tag {
        b'E' | b'N' => {
            let severity: &[u8] = if tag == b'E' { b"ERROR" } else { b"NOTICE" };
            let mut b = BytesMut::new();
            for (t, v) in [(b'S', severity), (b'V', severity), (b'C', b"XX000".as_slice()), (b'M', b"pgward: a server message was withheld by masking".as_slice())] {
                b.put_u8(t);
                b.put_slice(v);
                b.put_u8(0);
            }
            b.put_u8(0);
            frame(tag, &b)
        }
        b'V' => frame(b'V', &(-1i32).to_be_bytes()),
        _ => {
            // NotificationResponse / ParameterStatus: an empty payload or value.
            let mut b = BytesMut::new();
            if tag == b'A' {
                b.put_i32(0);
                b.put_slice(b"\0\0");
            } else {
                b.put_slice(b"\0\0");
            }
            frame(tag, &b)
        }
    }
}

type Rewrite = Result<Option<BytesMut>, ()>;

/// ErrorResponse / NoticeResponse: every free-text field; in a session with column rules,
/// the DETAIL of an error that echoes a row ([`ROW_ECHOING_CLASSES`]) is withheld.
fn error_fields(body: &[u8], sess: &SessionMask) -> Rewrite {
    let mut fields: Vec<(u8, &[u8], Option<Vec<u8>>)> = Vec::new();
    let mut rest = body;
    loop {
        let (&t, tail) = rest.split_first().ok_or(())?;
        if t == 0 {
            if !tail.is_empty() {
                return Err(());
            }
            break;
        }
        let nul = tail.iter().position(|&c| c == 0).ok_or(())?;
        let v = &tail[..nul];
        let new = if FIXED_FIELDS.contains(&t) { None } else { scrub(v, sess) };
        fields.push((t, v, new));
        rest = &tail[nul + 1..];
    }
    let echoes_row = fields.iter().any(|(t, v, _)| *t == b'C' && ROW_ECHOING_CLASSES.iter().any(|c| v.starts_with(c)));
    if echoes_row && sess.column_rules() != 0 {
        for f in fields.iter_mut().filter(|f| f.0 == b'D') {
            f.2 = Some(WITHHELD_DETAIL.to_vec());
        }
    }
    if fields.iter().all(|f| f.2.is_none()) {
        return Ok(None);
    }
    let mut b = BytesMut::with_capacity(body.len() + 16);
    for (t, v, new) in &fields {
        b.put_u8(*t);
        b.put_slice(new.as_deref().unwrap_or(v));
        b.put_u8(0);
    }
    b.put_u8(0);
    Ok(Some(b))
}

/// NotificationResponse: process ID, channel, payload.
fn notification(body: &[u8], sess: &SessionMask) -> Rewrite {
    let (pid, mut rest) = body.split_first_chunk::<4>().ok_or(())?;
    let pid = i32::from_be_bytes(*pid);
    let channel = cstr(&mut rest)?;
    let payload = cstr(&mut rest)?;
    if !rest.is_empty() {
        return Err(());
    }
    let (c, p) = (scrub(channel, sess), scrub(payload, sess));
    if c.is_none() && p.is_none() {
        return Ok(None);
    }
    let mut b = BytesMut::new();
    b.put_i32(pid);
    for v in [c.as_deref().unwrap_or(channel), p.as_deref().unwrap_or(payload)] {
        b.put_slice(v);
        b.put_u8(0);
    }
    Ok(Some(b))
}

/// ParameterStatus: name, value.
fn parameter_status(body: &[u8], sess: &SessionMask) -> Rewrite {
    let mut rest = body;
    let name = cstr(&mut rest)?;
    let value = cstr(&mut rest)?;
    if !rest.is_empty() {
        return Err(());
    }
    if UNSCRUBBED_PARAMETERS.contains(&name) {
        return Ok(None);
    }
    let Some(v) = scrub(value, sess) else { return Ok(None) };
    let mut b = BytesMut::new();
    for x in [name, v.as_slice()] {
        b.put_slice(x);
        b.put_u8(0);
    }
    Ok(Some(b))
}

/// FunctionCallResponse: a length and the value (its type is the function's, unknown here):
/// a value with a detected value in it becomes NULL.
fn function_result(body: &[u8], sess: &SessionMask) -> Rewrite {
    let mut r = Reader::new(body);
    let len = r.i32().map_err(|_| ())?;
    if len < 0 {
        return if r.remaining() == 0 { Ok(None) } else { Err(()) };
    }
    let v = r.bytes(usize::try_from(len).map_err(|_| ())?).map_err(|_| ())?;
    if r.remaining() != 0 {
        return Err(());
    }
    if !binary_hits(v, sess) {
        return Ok(None);
    }
    let mut b = BytesMut::new();
    b.put_i32(-1);
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskPolicy;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn sess() -> SessionMask {
        let text = "[[mask]]\nname = \"pii\"\ndetect = [\"card\", \"ssn\", \"email\"]\n";
        let p = Arc::new(MaskPolicy::from_sources(&[(PathBuf::from("t"), text.into())], b"k").unwrap());
        SessionMask { active: 1, policy: p, database: "db".into() }
    }

    fn body_of(f: &Frame) -> Vec<u8> {
        f.body().to_vec()
    }

    const CARD: &str = "4111111111111111";

    fn has(f: &Frame, s: &str) -> bool {
        body_of(f).windows(s.len()).any(|w| w == s.as_bytes())
    }

    fn fields(pairs: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in pairs {
            b.push(*t);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn every_field_of_errors_and_notices() {
        let s = sess();
        for tag in [b'E', b'N'] {
            let body = fields(&[
                (b'S', "ERROR"),
                (b'C', "P0001"),
                (b'M', "m"),
                (b'c', CARD),
                (b't', "912-12-3456"),
                (b's', "a@b.example"),
                (b'd', CARD),
                (b'n', CARD),
                (b'D', CARD),
                (b'W', CARD),
            ]);
            let f = scrub_message(frame(tag, &body), &s);
            assert!(!has(&f, CARD) && !has(&f, "912-12-3456") && !has(&f, "a@b.example"), "{:?}", String::from_utf8_lossy(&body_of(&f)));
            assert!(has(&f, "P0001"));
        }
    }

    #[test]
    fn notifications_parameters_and_function_results() {
        let s = sess();
        let mut n = vec![0, 0, 0, 7];
        n.extend_from_slice(b"ch\0");
        n.extend_from_slice(CARD.as_bytes());
        n.push(0);
        let f = scrub_message(frame(b'A', &n), &s);
        assert!(!has(&f, CARD) && has(&f, "ch"));

        let p = format!("application_name\0{CARD}\0");
        assert!(!has(&scrub_message(frame(b'S', p.as_bytes()), &s), CARD));
        let keep = "session_authorization\0a@b.example\0";
        assert!(has(&scrub_message(frame(b'S', keep.as_bytes()), &s), "a@b.example"));

        let mut v = (CARD.len() as i32).to_be_bytes().to_vec();
        v.extend_from_slice(CARD.as_bytes());
        assert_eq!(body_of(&scrub_message(frame(b'V', &v), &s)), (-1i32).to_be_bytes());
        let mut v = 8i32.to_be_bytes().to_vec();
        v.extend_from_slice(&4111111111111111i64.to_be_bytes());
        assert_eq!(body_of(&scrub_message(frame(b'V', &v), &s)), (-1i32).to_be_bytes());
    }

    #[test]
    fn row_echoing_details_are_withheld_under_column_rules() {
        let text = "[[mask]]\nname = \"notes\"\ncolumns = [\"t.notes\"]\nstyle = \"null\"\n";
        let p = Arc::new(MaskPolicy::from_sources(&[(PathBuf::from("t"), text.into())], b"k").unwrap());
        let s = SessionMask { active: 1, policy: p, database: "db".into() };
        let row = "Failing row contains (null, secret-note-alpha).";
        for code in ["23502", "23514", "23505", "44000"] {
            let f = scrub_message(frame(b'E', &fields(&[(b'S', "ERROR"), (b'C', code), (b'M', "m"), (b'D', row)])), &s);
            assert!(!has(&f, "secret-note-alpha") && has(&f, "withheld") && has(&f, code), "{code}");
        }
        // Other errors keep their detail; a session without column rules keeps every detail.
        let other = fields(&[(b'S', "ERROR"), (b'C', "22012"), (b'M', "m"), (b'D', row)]);
        assert!(has(&scrub_message(frame(b'E', &other), &s), "secret-note-alpha"));
        let unique = fields(&[(b'S', "ERROR"), (b'C', "23505"), (b'M', "m"), (b'D', "Key (id)=(1) already exists.")]);
        assert!(has(&scrub_message(frame(b'E', &unique), &sess()), "Key (id)=(1)"));
    }

    #[test]
    fn unreadable_messages_are_replaced() {
        let s = sess();
        for (tag, body) in [(b'E', format!("M{CARD}").into_bytes()), (b'A', vec![0, 0]), (b'S', b"x\0".to_vec()), (b'V', vec![0, 0, 0, 9, 1])] {
            let f = scrub_message(frame(tag, &body), &s);
            assert_eq!(f.tag, tag);
            assert_ne!(body_of(&f), body, "{}", char::from(tag));
            assert!(!has(&f, CARD));
        }
    }
}

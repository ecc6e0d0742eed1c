//! Arrays in binary (ndim, has-nulls flag, element type, each dimension's length and lower
//! bound, then every element as length + bytes, -1 for NULL) as Postgres's `array_out`
//! prints them: `{1,2,NULL}`, `{{a,b},{c,d}}`, `{"x y","\\x00",""}`, `[0:1]={7,8}`.

use super::{Cursor, scalar_text};

/// Postgres's limit on array dimensions (MAXDIM).
const MAXDIM: usize = 6;
/// Postgres's limit on array elements (MaxArraySize: 1 GiB / 8).
const MAX_ARRAY_SIZE: u64 = (1 << 30) / 8;
/// Element bytes announcing a NULL.
const NULL_LENGTH: i32 = -1;

/// An array of `elem` in binary as Postgres prints it; None for bytes `array_recv` refuses
/// (among them an element type other than `elem`) or an element not printed by
/// [`scalar_text`].
pub(super) fn array_text(elem: u32, v: &[u8]) -> Option<String> {
    let mut r = Cursor::new(v);
    let ndim = usize::try_from(r.i32()?).ok().filter(|n| *n <= MAXDIM)?;
    let flags = r.i32()?;
    if flags & !1 != 0 || r.u32()? != elem {
        return None;
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut nitems: u64 = 1;
    for _ in 0..ndim {
        let (len, lbound) = (r.i32()?, r.i32()?);
        let len = u64::try_from(len).ok()?;
        // Postgres refuses a lower bound plus length past the int4 range.
        if i64::from(lbound) + len as i64 > i64::from(i32::MAX) {
            return None;
        }
        nitems = nitems.checked_mul(len).filter(|n| *n <= MAX_ARRAY_SIZE)?;
        dims.push((len as usize, lbound));
    }
    if ndim == 0 || nitems == 0 {
        return r.is_done().then(|| "{}".to_string());
    }
    let mut items = Vec::new();
    for _ in 0..nitems {
        let len = r.i32()?;
        items.push(match len {
            NULL_LENGTH => None,
            n => Some(quoted(&scalar_text(elem, r.bytes(usize::try_from(n).ok()?)?)?)),
        });
    }
    if !r.is_done() {
        return None;
    }
    let mut out = String::new();
    if dims.iter().any(|&(_, lb)| lb != 1) {
        for &(len, lb) in &dims {
            out.push_str(&format!("[{lb}:{}]", i64::from(lb) + len as i64 - 1));
        }
        out.push('=');
    }
    let mut items = items.iter();
    nest(&mut out, &dims, &mut items);
    Some(out)
}

/// `{…}` for the first dimension of `dims`, each member an element or a nested `{…}`.
fn nest<'a>(out: &mut String, dims: &[(usize, i32)], items: &mut impl Iterator<Item = &'a Option<String>>) {
    let Some((&(len, _), inner)) = dims.split_first() else { return };
    out.push('{');
    for i in 0..len {
        if i > 0 {
            out.push(',');
        }
        if inner.is_empty() {
            match items.next() {
                Some(Some(v)) => out.push_str(v),
                _ => out.push_str("NULL"),
            }
        } else {
            nest(out, inner, items);
        }
    }
    out.push('}');
}

/// An element as `array_out` writes it: in double quotes (with `"` and `\` escaped by a
/// backslash) when it is empty, spells NULL, or holds a quote, backslash, brace, comma or
/// white space.
fn quoted(v: &str) -> String {
    let special = |c: char| matches!(c, '"' | '\\' | '{' | '}' | ',' | ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C');
    if !v.is_empty() && !v.eq_ignore_ascii_case("NULL") && !v.contains(special) {
        return v.to_string();
    }
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

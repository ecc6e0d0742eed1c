//! `numeric` in binary (ndigits, weight, sign, dscale, then ndigits base-10000 digits, all
//! 16-bit big-endian) as Postgres prints it: every digit of the integer part, exactly
//! `dscale` digits after the point.

use super::Cursor;

/// Sign words of the binary format.
const POS: u16 = 0x0000;
const NEG: u16 = 0x4000;
const NAN: u16 = 0xC000;
const PINF: u16 = 0xD000;
const NINF: u16 = 0xF000;
/// One base-10000 digit holds four decimal digits.
const NBASE: i16 = 10_000;
const DEC_DIGITS: usize = 4;
/// The display scale is 14 bits; Postgres refuses more.
const DSCALE_MASK: u16 = 0x3FFF;
/// The most digits Postgres reads (NUMERIC_MAX_PRECISION + NUMERIC_MAX_RESULT_SCALE).
const MAX_NDIGITS: usize = 1000 + 2000;

/// A binary `numeric` as Postgres's text (`-12.50`, `0.001`, `NaN`, `-Infinity`); None for
/// bytes `numeric_recv` refuses.
pub fn numeric_text(v: &[u8]) -> Option<String> {
    let mut r = Cursor::new(v);
    let ndigits = usize::from(r.u16()?);
    let weight = i32::from(r.i16()?);
    let sign = r.u16()?;
    let dscale = r.u16()?;
    if ndigits > MAX_NDIGITS || dscale & DSCALE_MASK != dscale {
        return None;
    }
    let mut digits = Vec::with_capacity(ndigits);
    for _ in 0..ndigits {
        let d = r.i16()?;
        if !(0..NBASE).contains(&d) {
            return None;
        }
        digits.push(d);
    }
    if !r.is_done() {
        return None;
    }
    match sign {
        NAN => Some("NaN".into()),
        PINF => Some("Infinity".into()),
        NINF => Some("-Infinity".into()),
        POS | NEG => Some(finite_text(&digits, weight, usize::from(dscale), sign == NEG)),
        _ => None,
    }
}

/// Postgres's `get_str_from_var`: the integer part without leading zeros (`0` when there is
/// none), then `dscale` fraction digits (digits past them are cut, as `numeric_recv` cuts
/// them). A value that is zero once cut has no minus sign.
fn finite_text(digits: &[i16], weight: i32, dscale: usize, negative: bool) -> String {
    let digit = |i: i32| usize::try_from(i).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0);
    let mut s = String::with_capacity(2 + (weight.max(0) as usize + 1) * DEC_DIGITS + dscale);
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i);
            if i == 0 { s.push_str(&d.to_string()) } else { s.push_str(&format!("{d:04}")) }
        }
    }
    if dscale > 0 {
        s.push('.');
        let start = s.len();
        let mut i = weight + 1;
        while s.len() - start < dscale {
            s.push_str(&format!("{:04}", digit(i)));
            i += 1;
        }
        s.truncate(start + dscale);
    }
    if negative && s.bytes().any(|b| matches!(b, b'1'..=b'9')) {
        s.insert(0, '-');
    }
    s
}

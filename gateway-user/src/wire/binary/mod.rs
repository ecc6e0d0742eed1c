//! Binary-format values as Postgres prints them: [`to_text`] turns the bytes a client bound in
//! binary format into the text `SELECT $1::type::text` would show for them, for the common
//! types (booleans, integers, floats, numeric, text types, bytea, uuid, dates and times, json,
//! jsonb, and one-to-six-dimensional arrays of these).
//!
//! The output is Postgres's with its default settings: `DateStyle` ISO, `IntervalStyle`
//! postgres, `extra_float_digits` 1 (shortest exact floats), `bytea_output` hex, and
//! `timestamptz` in UTC (`+00`), whatever the session has set. Bytes Postgres's own
//! receive function would refuse (a wrong length, an out-of-range date, a digit over 9999)
//! give None, as do types not listed here: the caller then keeps the bytes as they are.

mod array;
mod cursor;
mod datetime;
mod float;
mod numeric;

pub use numeric::numeric_text;

use cursor::Cursor;

/// Type OIDs (`pg_type.oid`, fixed in Postgres's catalog) of the types [`to_text`] prints.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of each array type [`to_text`] prints: (array OID, element OID).
const ARRAYS: [(u32, u32); 21] = [
    (1000, oid::BOOL),
    (1001, oid::BYTEA),
    (1003, oid::NAME),
    (1005, oid::INT2),
    (1007, oid::INT4),
    (1009, oid::TEXT),
    (1028, oid::OID),
    (1014, oid::BPCHAR),
    (1015, oid::VARCHAR),
    (1016, oid::INT8),
    (1021, oid::FLOAT4),
    (1022, oid::FLOAT8),
    (199, oid::JSON),
    (3807, oid::JSONB),
    (1115, oid::TIMESTAMP),
    (1182, oid::DATE),
    (1183, oid::TIME),
    (1185, oid::TIMESTAMPTZ),
    (1187, oid::INTERVAL),
    (1231, oid::NUMERIC),
    (2951, oid::UUID),
];

/// Postgres refuses a `name` of this many bytes or more.
const NAMEDATALEN: usize = 64;

/// The only version of jsonb's binary format: a version byte, then the JSON text.
const JSONB_VERSION: u8 = 1;

/// `v`, a binary-format value of type `oid`, in Postgres's text form; None for a type not
/// printed here or bytes Postgres would refuse as that type.
pub fn to_text(oid: u32, v: &[u8]) -> Option<String> {
    if let Some(&(_, elem)) = ARRAYS.iter().find(|(a, _)| *a == oid) {
        return array::array_text(elem, v);
    }
    scalar_text(oid, v)
}

/// A value of a scalar (not array) type.
fn scalar_text(oid: u32, v: &[u8]) -> Option<String> {
    match oid {
        oid::BOOL => match v {
            [0] => Some("f".into()),
            [_] => Some("t".into()),
            _ => None,
        },
        oid::INT2 => Some(i16::from_be_bytes(v.try_into().ok()?).to_string()),
        oid::INT4 => Some(i32::from_be_bytes(v.try_into().ok()?).to_string()),
        oid::INT8 => Some(i64::from_be_bytes(v.try_into().ok()?).to_string()),
        oid::OID => Some(u32::from_be_bytes(v.try_into().ok()?).to_string()),
        oid::FLOAT4 => Some(float::float4_text(f32::from_be_bytes(v.try_into().ok()?))),
        oid::FLOAT8 => Some(float::float8_text(f64::from_be_bytes(v.try_into().ok()?))),
        oid::NUMERIC => numeric_text(v),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::JSON => utf8(v),
        oid::NAME if v.len() < NAMEDATALEN => utf8(v),
        oid::JSONB => match v.split_first() {
            Some((&JSONB_VERSION, json)) => utf8(json),
            _ => None,
        },
        oid::BYTEA => Some(bytea_hex(v)),
        oid::UUID => uuid_text(v),
        oid::DATE => datetime::date_text(i32::from_be_bytes(v.try_into().ok()?)),
        oid::TIME => datetime::time_text(i64::from_be_bytes(v.try_into().ok()?)),
        oid::TIMESTAMP => datetime::timestamp_text(i64::from_be_bytes(v.try_into().ok()?), false),
        oid::TIMESTAMPTZ => datetime::timestamp_text(i64::from_be_bytes(v.try_into().ok()?), true),
        oid::INTERVAL => datetime::interval_text(v),
        _ => None,
    }
}

/// Text sent in binary is the text itself; pgward records it only when it is UTF-8 (the
/// encodings pgward lets a session use are UTF8 and SQL_ASCII) and holds no NUL (which
/// Postgres refuses in text).
fn utf8(v: &[u8]) -> Option<String> {
    if v.contains(&0) {
        return None;
    }
    std::str::from_utf8(v).ok().map(str::to_string)
}

/// `bytes` as Postgres prints a bytea (`bytea_output = hex`): `\x` and lowercase hex.
pub fn bytea_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    s.push_str(&hex::encode(bytes));
    s
}

/// 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lowercase).
fn uuid_text(v: &[u8]) -> Option<String> {
    let b: [u8; 16] = v.try_into().ok()?;
    Some(uuid::Uuid::from_bytes(b).hyphenated().to_string())
}

#[cfg(test)]
mod tests;

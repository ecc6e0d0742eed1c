//! Zero-copy decoders of the messages pgward reads: from the client Query, Parse, Bind,
//! Execute, Describe, Close, FunctionCall and the password; from the server CommandComplete,
//! ErrorResponse/NoticeResponse, ParameterStatus, ParameterDescription, RowDescription and
//! CopyOutResponse.

use std::borrow::Cow;

use super::{ClientEncoding, Frame, Reader, WireError};

// ---------------------------------------------------------------- client message decoders

/// `Q`: the query string, in the client's encoding, with nothing after its terminator.
pub fn decode_query(f: &Frame, enc: ClientEncoding) -> Result<Cow<'_, str>, WireError> {
    let mut r = Reader::new(f.body());
    let sql = r.sql(enc)?;
    r.end("Query")?;
    Ok(sql)
}

/// Server `S` (ParameterStatus): (name, value); empty strings where the frame is short.
pub fn decode_parameter_status(f: &Frame) -> (String, String) {
    let mut r = Reader::new(f.body());
    let name = r.cstr().map(Cow::into_owned).unwrap_or_default();
    let value = r.cstr().map(Cow::into_owned).unwrap_or_default();
    (name, value)
}

/// A decoded `P`.
#[derive(Debug)]
pub struct Parse<'a> {
    pub name: Cow<'a, str>,
    /// The SQL text, in the client's encoding.
    pub sql: Cow<'a, str>,
    /// The parameter types the client declared, by position (0: left to the server; there
    /// may be fewer than the statement has parameters).
    pub param_types: Vec<u32>,
}

/// `P`: (statement name, SQL text in the client's encoding).
pub fn decode_parse(f: &Frame, enc: ClientEncoding) -> Result<(Cow<'_, str>, Cow<'_, str>), WireError> {
    decode_parse_typed(f, enc).map(|p| (p.name, p.sql))
}

/// `P` with the parameter types it declares.
pub fn decode_parse_typed(f: &Frame, enc: ClientEncoding) -> Result<Parse<'_>, WireError> {
    let mut r = Reader::new(f.body());
    let name = r.cstr()?;
    let sql = r.sql(enc)?;
    let n = r.i16()?;
    if n < 0 {
        return Err(WireError::malformed("Parse with negative parameter type count"));
    }
    let param_types = oids(r.bytes(n as usize * 4)?);
    r.end("Parse")?;
    Ok(Parse { name, sql, param_types })
}

/// Big-endian 32-bit type OIDs, one after the other.
fn oids(b: &[u8]) -> Vec<u32> {
    b.as_chunks::<4>().0.iter().map(|c| u32::from_be_bytes(*c)).collect()
}

/// A value bound to a parameter (Bind) or passed to a function (FunctionCall): its format (0
/// text, 1 binary) and its bytes, None for SQL NULL.
pub type BoundValue<'a> = (i16, Option<&'a [u8]>);

/// A decoded `B`.
#[derive(Debug)]
pub struct Bind<'a> {
    pub portal: Cow<'a, str>,
    pub statement: Cow<'a, str>,
    /// One entry per parameter.
    pub params: Vec<BoundValue<'a>>,
    /// The result-column format codes, None when the message ends before them (Postgres
    /// refuses such a Bind; the session forwards it and lets Postgres say so).
    pub result_formats: Option<Formats<'a>>,
}

/// Format codes as they are on the wire (big-endian int16s), decoded when asked for: only
/// masking reads result formats, so a Bind costs no allocation for them.
#[derive(Debug, Clone, Copy)]
pub struct Formats<'a>(&'a [u8]);

impl Formats<'_> {
    pub fn to_vec(self) -> Vec<i16> {
        self.0.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }
}

pub fn decode_bind(f: &Frame) -> Result<Bind<'_>, WireError> {
    let mut r = Reader::new(f.body());
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let nfmt = r.i16()?;
    if nfmt < 0 {
        return Err(WireError::malformed("Bind with negative format count"));
    }
    let mut fmts = Vec::with_capacity(nfmt as usize);
    for _ in 0..nfmt {
        fmts.push(r.i16()?);
    }
    let nparams = r.i16()?;
    if nparams < 0 {
        return Err(WireError::malformed("Bind with negative parameter count"));
    }
    if !(fmts.len() <= 1 || fmts.len() == nparams as usize) {
        return Err(WireError::malformed("Bind format count does not match parameter count"));
    }
    let mut params = Vec::with_capacity(nparams as usize);
    for i in 0..nparams as usize {
        let fmt = match fmts.len() {
            0 => 0,
            1 => fmts[0],
            _ => fmts[i],
        };
        let len = r.i32()?;
        let v = if len < 0 { None } else { Some(r.bytes(len as usize)?) };
        params.push((fmt, v));
    }
    // A negative count reads as none.
    let result_formats = r.i16().and_then(|n| r.bytes(n.max(0) as usize * 2)).ok().map(Formats);
    Ok(Bind { portal, statement, params, result_formats })
}

/// `E`: portal name.
pub fn decode_execute(f: &Frame) -> Result<Cow<'_, str>, WireError> {
    let mut r = Reader::new(f.body());
    let portal = r.cstr()?;
    r.i32()?;
    Ok(portal)
}

/// `C` (Close) and `D` (Describe): ('S' or 'P', name).
pub fn decode_close_or_describe(f: &Frame) -> Result<(u8, Cow<'_, str>), WireError> {
    let mut r = Reader::new(f.body());
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(WireError::malformed(format!("Close/Describe of unknown kind {:?}", kind as char)));
    }
    Ok((kind, r.cstr()?))
}

/// `F` (FunctionCall): the function's OID and its arguments.
pub fn decode_function_call(f: &Frame) -> Result<(i32, Vec<BoundValue<'_>>), WireError> {
    let mut r = Reader::new(f.body());
    let oid = r.i32()?;
    let nfmt = r.i16()?;
    if nfmt < 0 {
        return Err(WireError::malformed("FunctionCall with negative format count"));
    }
    let mut fmts = Vec::with_capacity(nfmt as usize);
    for _ in 0..nfmt {
        fmts.push(r.i16()?);
    }
    let nargs = r.i16()?;
    if nargs < 0 {
        return Err(WireError::malformed("FunctionCall with negative argument count"));
    }
    let mut args = Vec::with_capacity(nargs as usize);
    for i in 0..nargs as usize {
        let fmt = match fmts.len() {
            0 => 0,
            1 => fmts[0],
            _ => *fmts.get(i).ok_or_else(|| WireError::malformed("FunctionCall format count mismatch"))?,
        };
        let len = r.i32()?;
        let v = if len < 0 { None } else { Some(r.bytes(len as usize)?) };
        args.push((fmt, v));
    }
    r.i16()?;
    Ok((oid, args))
}

/// `p` during the startup phase: the password (the token).
pub fn decode_password(f: &Frame) -> Result<Cow<'_, str>, WireError> {
    if f.tag != b'p' {
        return Err(WireError::malformed(format!(
            "expected a password message, got {:?}",
            f.tag as char
        )));
    }
    Reader::new(f.body()).cstr()
}

// ---------------------------------------------------------------- server message decoders

/// `t` (ParameterDescription): the type OID of each parameter of the described statement.
/// The count is read unsigned, as Postgres writes it (a statement may have up to 65535).
pub fn decode_parameter_description(f: &Frame) -> Result<Vec<u32>, WireError> {
    let mut r = Reader::new(f.body());
    let n = r.i16()? as u16;
    let types = oids(r.bytes(usize::from(n) * 4)?);
    r.end("ParameterDescription")?;
    Ok(types)
}

/// `C` (CommandComplete) from the server: the tag and the row count it carries, if any.
pub fn decode_command_complete(f: &Frame) -> Result<(Cow<'_, str>, Option<u64>), WireError> {
    let tag = Reader::new(f.body()).cstr()?;
    let rows = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
    // "INSERT 0 5", "SELECT 3", "UPDATE 2", "COPY 10", "FETCH 1", "MOVE 1"; others carry none.
    let counted = ["INSERT", "SELECT", "UPDATE", "DELETE", "COPY", "FETCH", "MOVE", "MERGE"];
    let is_counted = counted.contains(&tag.split(' ').next().unwrap_or(""));
    Ok((tag, if is_counted { rows } else { None }))
}

/// Fields of an ErrorResponse / NoticeResponse we care about.
#[derive(Debug, Default, Clone)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn decode_error(f: &Frame) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut r = Reader::new(f.body());
    while let Ok(kind) = r.u8() {
        if kind == 0 {
            break;
        }
        let Ok(v) = r.cstr() else { break };
        match kind {
            b'V' => out.severity = v.to_string(),
            b'S' if out.severity.is_empty() => out.severity = v.to_string(),
            b'C' => out.code = v.to_string(),
            b'M' => out.message = v.to_string(),
            _ => {}
        }
    }
    out
}

/// One column of a RowDescription.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub format: i16,
}

/// `T` (RowDescription): the result's columns.
pub fn decode_row_description(f: &Frame) -> Result<Vec<Field>, WireError> {
    let mut r = Reader::new(f.body());
    let n = r.i16()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = r.cstr()?.into_owned();
        let table_oid = r.i32()? as u32;
        let attnum = r.i16()?;
        let type_oid = r.i32()? as u32;
        r.i16()?;
        r.i32()?;
        let format = r.i16()?;
        out.push(Field { name, table_oid, attnum, type_oid, format });
    }
    Ok(out)
}

/// `H` (CopyOutResponse): the overall format (0 text, 1 binary) and the column count (a
/// negative count reads as none).
pub fn decode_copy_out_response(f: &Frame) -> Result<(u8, usize), WireError> {
    let mut r = Reader::new(f.body());
    let overall = r.u8()?;
    let n = r.i16()?;
    Ok((overall, n.max(0) as usize))
}

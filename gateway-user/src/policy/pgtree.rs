//! Reading libpg_query's JSON parse tree ([`super::pgparse::parse`]): a node in a Node
//! position is a one-key object `{"TypeName": {fields}}`; a typed field holds the body
//! without that wrapper. Shared by the policy's analysis and masking's lineage.

use serde_json::{Map, Value};

pub type Obj = Map<String, Value>;

/// The single `{"Type": {…}}` wrapper of a node object: its type and body.
pub fn wrapped_map(m: &Obj) -> Option<(&str, &Obj)> {
    if m.len() != 1 {
        return None;
    }
    let (k, b) = m.iter().next()?;
    if !k.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    Some((k.as_str(), b.as_object()?))
}

/// [`wrapped_map`] of a value.
pub fn wrapped(v: &Value) -> Option<(&str, &Obj)> {
    wrapped_map(v.as_object()?)
}

/// The body of `v` if it is a wrapped node of type `ty`.
pub fn node<'a>(v: &'a Value, ty: &str) -> Option<&'a Obj> {
    v.get(ty)?.as_object()
}

/// The body of a node of type `ty` in a typed field (held without its wrapper) or a Node
/// field (held with it).
pub fn typed<'v>(v: &'v Value, ty: &str) -> Option<&'v Obj> {
    match wrapped(v) {
        Some((t, b)) if t == ty => Some(b),
        Some(_) => None,
        None => v.as_object(),
    }
}

pub fn str_field<'a>(m: &'a Obj, k: &str) -> Option<&'a str> {
    m.get(k)?.as_str()
}

/// A list field (empty when absent).
pub fn list<'a>(m: &'a Obj, k: &str) -> &'a [Value] {
    m.get(k).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// The `sval` of a `String` node.
pub fn sval(v: &Value) -> Option<&str> {
    v.get("String")?.get("sval")?.as_str()
}

/// The strings of a name list (`[{"String":{"sval":"pg_catalog"}}, …]`).
pub fn names(v: &[Value]) -> Vec<String> {
    v.iter().filter_map(|n| sval(n).map(str::to_string)).collect()
}

/// [`names`] of an optional list value.
pub fn name_list(v: Option<&Value>) -> Vec<String> {
    names(v.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]))
}

/// The raw statements of a parse tree (`{"stmts": [{"stmt": …, "stmt_location": …}]}`).
pub fn raw_stmts(tree: &Value) -> &[Value] {
    tree.get("stmts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// Locations of every `A_Const` node of the tree.
pub fn const_locations(v: &Value, out: &mut Vec<usize>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| const_locations(x, out)),
        Value::Object(m) => {
            if let Some(c) = m.get("A_Const").and_then(Value::as_object)
                && let Some(loc) = c.get("location").and_then(Value::as_u64).and_then(|l| usize::try_from(l).ok())
            {
                out.push(loc);
            }
            m.values().for_each(|x| const_locations(x, out));
        }
        _ => {}
    }
}

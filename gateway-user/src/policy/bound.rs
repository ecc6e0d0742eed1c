//! Functions a DDL statement binds by name, for Postgres to call later without the name ever
//! appearing in a call: an operator's function (`CREATE OPERATOR === (function =
//! pg_terminate_backend, …)`, then `SELECT 1 === 0::int8`), an aggregate's transition and
//! final functions (`sfunc = set_config`, then `SELECT agg('some_role', false)` switches the
//! role), a cast's, a type's or range's support functions, a conversion, a language's or
//! foreign-data wrapper's handler, an operator class's support functions, and the C symbol
//! of a `LANGUAGE internal` / `c` function. pgward treats such a reference as a call made by
//! the statement that binds it, so function rules and catalog classes decide it the same way,
//! and binding `set_config` counts as an identity change (its arguments are unknown).

use serde_json::{Map, Value};

use super::pgtree::{list, name_list, names, node, str_field};

/// DefElem names whose value is a function, in the statements that define operators,
/// aggregates, types, ranges, text search parsers and templates, and foreign-data wrappers
/// (Postgres compares them in lower case).
pub(super) const FUNCTION_OPTIONS: &[&str] = &[
    // CREATE / ALTER OPERATOR
    "function",
    "procedure",
    "restrict",
    "join",
    // CREATE AGGREGATE (sfunc1: the old spelling)
    "sfunc",
    "sfunc1",
    "finalfunc",
    "combinefunc",
    "serialfunc",
    "deserialfunc",
    "msfunc",
    "minvfunc",
    "mfinalfunc",
    // CREATE / ALTER TYPE
    "input",
    "output",
    "receive",
    "send",
    "typmod_in",
    "typmod_out",
    "analyze",
    "subscript",
    // CREATE TYPE … AS RANGE
    "subtype_diff",
    "canonical",
    // CREATE TEXT SEARCH PARSER / TEMPLATE
    "start",
    "gettoken",
    "end",
    "headline",
    "lextypes",
    "init",
    "lexize",
    // CREATE / ALTER FOREIGN DATA WRAPPER
    "handler",
    "validator",
];

/// Statements whose option lists can name functions ([`FUNCTION_OPTIONS`]), and the fields
/// holding those lists.
const OPTION_LISTS: &[(&str, &[&str])] = &[
    ("DefineStmt", &["definition"]),
    ("AlterOperatorStmt", &["options"]),
    ("AlterTypeStmt", &["options"]),
    ("CreateRangeStmt", &["params"]),
    ("CreateFdwStmt", &["func_options"]),
    ("AlterFdwStmt", &["func_options"]),
];

/// Statements with fields that are a function's name list, or an ObjectWithArgs naming one.
const NAME_FIELDS: &[(&str, &[&str])] = &[
    ("CreateConversionStmt", &["func_name"]),
    ("CreatePLangStmt", &["plhandler", "plinline", "plvalidator"]),
    ("CreateAmStmt", &["handler_name"]),
    ("CreateCastStmt", &["func"]),
    ("CreateTransformStmt", &["fromsql", "tosql"]),
];

/// `CreateOpClassItem.itemtype` of a support function (OPCLASS_ITEM_FUNCTION).
const OPCLASS_ITEM_FUNCTION: i64 = 2;

/// The name lists of the functions a node of type `ty` binds (empty for other nodes).
pub(super) fn functions(ty: &str, b: &Map<String, Value>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if let Some((_, fields)) = OPTION_LISTS.iter().find(|(t, _)| *t == ty) {
        for opt in fields.iter().flat_map(|f| list(b, f)) {
            let Some(d) = node(opt, "DefElem") else { continue };
            let named = str_field(d, "defname").is_some_and(|n| FUNCTION_OPTIONS.contains(&n.to_lowercase().as_str()));
            if let Some(parts) = d.get("arg").filter(|_| named).and_then(arg_name) {
                out.push(parts);
            }
        }
    }
    if let Some((_, fields)) = NAME_FIELDS.iter().find(|(t, _)| *t == ty) {
        for f in *fields {
            if let Some(parts) = b.get(*f).and_then(object_name) {
                out.push(parts);
            }
        }
    }
    if ty == "CreateOpClassItem"
        && b.get("itemtype").and_then(Value::as_i64) == Some(OPCLASS_ITEM_FUNCTION)
        && let Some(parts) = b.get("name").and_then(object_name)
    {
        out.push(parts);
    }
    if ty == "CreateFunctionStmt" {
        out.extend(native_symbol(b));
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The function a DefElem's value names: a type-like name (`sfunc = pg_catalog.set_config`),
/// a list, or a string (`sfunc = 'set_config'`, one part: Postgres does not split it).
fn arg_name(arg: &Value) -> Option<Vec<String>> {
    if let Some(t) = node(arg, "TypeName") {
        return Some(name_list(t.get("names")));
    }
    if let Some(l) = node(arg, "List") {
        return Some(name_list(l.get("items")));
    }
    node(arg, "String").and_then(|s| str_field(s, "sval")).map(|s| vec![s.to_string()])
}

/// A function named by an ObjectWithArgs (`{"objname": […]}`) or a bare name list.
fn object_name(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Array(a) => Some(names(a)),
        Value::Object(m) => Some(name_list(m.get("objname"))),
        _ => None,
    }
}

/// `CREATE FUNCTION … LANGUAGE internal AS 'symbol'` (or `c … AS 'library', 'symbol'`): the
/// body names the compiled function it runs (for `internal`, one of the server's own).
fn native_symbol(b: &Map<String, Value>) -> Option<Vec<String>> {
    let defs: Vec<&Map<String, Value>> = list(b, "options").iter().filter_map(|o| node(o, "DefElem")).collect();
    let option = |name: &str| defs.iter().find(|d| str_field(d, "defname") == Some(name)).and_then(|d| d.get("arg"));
    let language = option("language").and_then(|a| node(a, "String")).and_then(|s| str_field(s, "sval"))?;
    if !matches!(language.to_lowercase().as_str(), "internal" | "c") {
        return None;
    }
    let body = option("as")?;
    let parts = match node(body, "List") {
        Some(l) => name_list(l.get("items")),
        None => node(body, "String").and_then(|s| str_field(s, "sval")).map(str::to_string).into_iter().collect(),
    };
    // A C function given only its library runs the symbol of its own name (already counted).
    match (language.eq_ignore_ascii_case("c"), parts.as_slice()) {
        (true, [_, symbol]) | (false, [symbol]) => Some(vec![symbol.clone()]),
        _ => None,
    }
}

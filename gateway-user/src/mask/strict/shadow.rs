//! Objects that would stand in for the built-ins strict masking trusts. Strict masking lets a
//! masked column into `upper(card)`, `count(card)` or `card::text` because those are
//! pg_catalog's: a function or type of the same name in another schema, reached through a
//! `search_path` that puts pg_catalog after that schema, runs with the value instead (a
//! domain's CHECK or a function body can RAISE it). pgward's function catalog refuses the
//! functions once it knows them, but not statements of the same query string or pipeline
//! that were decided before the CREATE ran, and types are not in it at all. So a session
//! under a strict rule may not create or rename a function or type to such a name.

use serde_json::Value;

use super::{INTEGER_TYPES, TEXT_TYPES, VALUE_FUNCTIONS};
use crate::policy::pgtree::{Obj, list, names, str_field, typed};

/// Function names strict masking decides on by name, besides [`VALUE_FUNCTIONS`].
const COUNTING_FUNCTIONS: &[&str] = &["count"];

/// `RenameStmt` / `AlterObjectSchemaStmt` object types that name functions or types.
const ROUTINE_OBJECTS: &[&str] = &["OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE", "OBJECT_AGGREGATE"];
const TYPE_OBJECTS: &[&str] = &["OBJECT_TYPE", "OBJECT_DOMAIN"];

fn trusted_function(name: &str) -> bool {
    VALUE_FUNCTIONS.contains(&name) || COUNTING_FUNCTIONS.contains(&name)
}

fn trusted_type(name: &str) -> bool {
    TEXT_TYPES.contains(&name) || INTEGER_TYPES.contains(&name)
}

/// The trusted name statement `ty` (body `b`) would give a function or type, if any.
pub(super) fn shadowing_name(ty: &str, b: &Obj) -> Option<String> {
    let last = |v: &[Value]| names(v).pop();
    let (name, function) = match ty {
        "CreateFunctionStmt" => (last(list(b, "funcname")), true),
        "CreateDomainStmt" => (last(list(b, "domainname")), false),
        "CreateEnumStmt" | "CreateRangeStmt" => (last(list(b, "typeName")), false),
        "CompositeTypeStmt" => (b.get("typevar").and_then(Value::as_object).and_then(|t| str_field(t, "relname")).map(str::to_string), false),
        "RenameStmt" | "AlterObjectSchemaStmt" => {
            let kind = str_field(b, if ty == "RenameStmt" { "renameType" } else { "objectType" }).unwrap_or("");
            let function = ROUTINE_OBJECTS.contains(&kind);
            if !function && !TYPE_OBJECTS.contains(&kind) {
                return None;
            }
            let name = match str_field(b, "newname") {
                Some(n) => Some(n.to_string()),
                None => object_name(b.get("object")?),
            };
            (name, function)
        }
        _ => return None,
    };
    let name = name?;
    let trusted = if function { trusted_function(&name) } else { trusted_type(&name) };
    trusted.then_some(name)
}

/// The last part of an object's name: a function's `ObjectWithArgs`, a type's name list.
fn object_name(v: &Value) -> Option<String> {
    if let Some(o) = typed(v, "ObjectWithArgs") {
        return names(list(o, "objname")).pop();
    }
    let l = typed(v, "List")?;
    names(list(l, "items")).pop()
}

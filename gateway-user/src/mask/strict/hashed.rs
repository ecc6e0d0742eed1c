//! Columns of `hash` rules. The keyed hash of a column's value is the same for the same value
//! in every table, so that hashed columns can be joined. A value a session writes into a
//! column a hash rule covers therefore comes back hashed with the key that hashes the real
//! values: a guess, and one INSERT over `generate_series` is a million of them (an SSN has a
//! billion possibilities). With a glob pattern (`*.*.ssn`) a table the session creates is
//! such a column too. So a session under a strict hash rule may not write those columns, nor
//! create, rename or move a relation so that a hash rule covers one of its columns.

use serde_json::Value;

use super::{Check, Item, Out, Strict};
use crate::policy::pgtree::{Obj, list, str_field, sval, typed};

/// `RenameStmt` / `AlterObjectSchemaStmt` object types that are relations with columns.
const RELATION_OBJECTS: &[&str] = &["OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"];

/// A relation as written: schema (if given) and name.
struct RelName<'a> {
    schema: Option<&'a str>,
    name: &'a str,
}

fn rel_name(v: Option<&Value>) -> Option<RelName<'_>> {
    let rv = typed(v?, "RangeVar")?;
    Some(RelName { schema: str_field(rv, "schemaname"), name: str_field(rv, "relname")? })
}

/// The `name`s of a list of ResTargets (INSERT's columns, UPDATE's SET targets).
fn target_names(l: &[Value]) -> Vec<String> {
    l.iter().filter_map(|t| typed(t, "ResTarget")).filter_map(|t| str_field(t, "name").map(str::to_string)).collect()
}

impl Strict<'_> {
    /// Hash rules (bits) covering column `column` of `rel` (`None`: any of its columns).
    fn hashed(&self, rel: &RelName<'_>, column: Option<&str>) -> u64 {
        self.r.hashed_rules() & self.r.rules_for(rel.schema, rel.name, column)
    }

    fn refuse_hashed(&self, bits: u64, what: &str) -> Check {
        self.refuse(bits, format!("{what} a column of a hash rule: a value written there comes back hashed with the key of the real values, a guess at one"))
    }

    /// Columns `cols` of `rel` written (empty: every column, as far as pgward knows them).
    fn written(&self, rel: &RelName<'_>, cols: &[String], what: &str) -> Check {
        let bits = if cols.is_empty() {
            match self.r.columns_of(rel.schema, rel.name) {
                Some(all) => all.iter().fold(0, |b, c| b | self.hashed(rel, Some(c))),
                // A table pgward's catalog does not list has no masked column.
                None => 0,
            }
        } else {
            cols.iter().fold(0, |b, c| b | self.hashed(rel, Some(c)))
        };
        if bits == 0 { Ok(()) } else { self.refuse_hashed(bits, what) }
    }

    /// INSERT, UPDATE, MERGE (and INSERT's ON CONFLICT DO UPDATE) into a hash rule's column.
    pub(super) fn hashed_writes(&self, ty: &str, b: &Obj) -> Check {
        if self.r.hashed_rules() == 0 {
            return Ok(());
        }
        let Some(rel) = rel_name(b.get("relation")) else { return Ok(()) };
        match ty {
            "InsertStmt" => {
                self.written(&rel, &target_names(list(b, "cols")), "INSERT writes")?;
                let oc = b.get("onConflictClause").and_then(|o| typed(o, "OnConflictClause"));
                match oc.map(|o| target_names(list(o, "targetList"))) {
                    Some(set) if !set.is_empty() => self.written(&rel, &set, "ON CONFLICT DO UPDATE writes"),
                    _ => Ok(()),
                }
            }
            "UpdateStmt" => match target_names(list(b, "targetList")) {
                set if set.is_empty() => Ok(()),
                set => self.written(&rel, &set, "UPDATE writes"),
            },
            "MergeStmt" => list(b, "mergeWhenClauses").iter().filter_map(|w| typed(w, "MergeWhenClause")).try_for_each(|w| {
                let cols = target_names(list(w, "targetList"));
                match str_field(w, "commandType") {
                    Some("CMD_INSERT") => self.written(&rel, &cols, "MERGE writes"),
                    Some("CMD_UPDATE") if !cols.is_empty() => self.written(&rel, &cols, "MERGE writes"),
                    _ => Ok(()),
                }
            }),
            _ => Ok(()),
        }
    }

    /// COPY … FROM into a hash rule's column.
    pub(super) fn hashed_copy_from(&self, b: &Obj) -> Check {
        if self.r.hashed_rules() == 0 || b.get("is_from").and_then(Value::as_bool) != Some(true) {
            return Ok(());
        }
        let Some(rel) = rel_name(b.get("relation")) else { return Ok(()) };
        let cols: Vec<String> = list(b, "attlist").iter().filter_map(sval).map(str::to_string).collect();
        self.written(&rel, &cols, "COPY FROM writes")
    }

    /// A new relation named `rel` with columns `cols` (None in `cols`: a column of unknown
    /// name, which any hash rule covering the relation may cover).
    fn created(&self, rel: &RelName<'_>, cols: &[Option<String>]) -> Check {
        let bits = cols.iter().fold(0, |b, c| b | self.hashed(rel, c.as_deref()));
        if bits == 0 { Ok(()) } else { self.refuse_hashed(bits, "the new relation has") }
    }

    /// CREATE TABLE (column definitions, LIKE, INHERITS, PARTITION OF, OF type), CREATE TABLE
    /// AS, SELECT INTO, CREATE [MATERIALIZED] VIEW: refused when a hash rule covers a column
    /// the new relation gets.
    pub(super) fn hashed_creation(&self, ty: &str, b: &Obj) -> Check {
        if self.r.hashed_rules() == 0 {
            return Ok(());
        }
        match ty {
            "CreateStmt" | "CreateForeignTableStmt" => {
                let b = if ty == "CreateForeignTableStmt" { b.get("base").and_then(|x| typed(x, "CreateStmt")).unwrap_or(b) } else { b };
                let Some(rel) = rel_name(b.get("relation")) else { return Ok(()) };
                let mut cols: Vec<Option<String>> = Vec::new();
                for e in list(b, "tableElts") {
                    match typed(e, "ColumnDef").and_then(|c| str_field(c, "colname")) {
                        Some(c) if e.get("ColumnDef").is_some() => cols.push(Some(c.to_string())),
                        // LIKE another table: its columns.
                        _ if e.get("TableLikeClause").is_some() => cols.push(None),
                        _ => {}
                    }
                }
                let copied = !list(b, "inhRelations").is_empty() || b.get("ofTypename").is_some_and(|t| !t.is_null());
                if copied {
                    cols.push(None);
                }
                self.created(&rel, &cols)
            }
            "CreateTableAsStmt" => {
                let into = b.get("into").and_then(|i| typed(i, "IntoClause"));
                self.created_from_query(into, b.get("query"))
            }
            "SelectStmt" => match b.get("intoClause").and_then(|i| typed(i, "IntoClause")) {
                Some(into) => self.query_columns(into, b),
                None => Ok(()),
            },
            "ViewStmt" => {
                let Some(rel) = rel_name(b.get("view")) else { return Ok(()) };
                let aliases: Vec<String> = list(b, "aliases").iter().filter_map(sval).map(str::to_string).collect();
                self.query_output(&rel, &aliases, b.get("query"))
            }
            _ => Ok(()),
        }
    }

    /// CREATE TABLE AS: the IntoClause's relation and column names, else the query's outputs.
    fn created_from_query(&self, into: Option<&Obj>, query: Option<&Value>) -> Check {
        let Some(into) = into else { return Ok(()) };
        let Some(q) = query else { return Ok(()) };
        let Some(rel) = rel_name(into.get("rel")) else { return Ok(()) };
        let names: Vec<String> = list(into, "colNames").iter().filter_map(sval).map(str::to_string).collect();
        self.query_output(&rel, &names, Some(q))
    }

    /// SELECT … INTO: the statement's own output list.
    fn query_columns(&self, into: &Obj, select: &Obj) -> Check {
        let Some(rel) = rel_name(into.get("rel")) else { return Ok(()) };
        let names: Vec<String> = list(into, "colNames").iter().filter_map(sval).map(str::to_string).collect();
        let out = self.cx.select(select, None);
        self.output_names(&rel, &names, &out)
    }

    fn query_output(&self, rel: &RelName<'_>, names: &[String], q: Option<&Value>) -> Check {
        let Some(sel) = q.and_then(|q| typed(q, "SelectStmt")) else {
            // Not a SELECT (EXECUTE, a DML with RETURNING): columns of unknown names.
            return self.created(rel, &[None]);
        };
        let out = self.cx.select(sel, None);
        self.output_names(rel, names, &out)
    }

    /// The columns a query's output gives a new relation: explicit names first, then the
    /// output's own (`?column?` for an expression without one), any of a star's.
    fn output_names(&self, rel: &RelName<'_>, names: &[String], out: &Out) -> Check {
        let mut cols: Vec<Option<String>> = out
            .cols
            .iter()
            .enumerate()
            .map(|(i, (n, item))| match (names.get(i), n, item) {
                (Some(x), _, _) => Some(x.clone()),
                (None, _, Item::Star) => None,
                (None, Some(n), _) => Some(n.clone()),
                (None, None, _) => Some("?column?".to_string()),
            })
            .collect();
        if !out.stars.is_empty() {
            cols.push(None);
        }
        self.created(rel, &cols)
    }

    /// RENAME of a relation, a column or a schema, and SET SCHEMA of a relation: refused when
    /// a hash rule covers the relation's columns under the new name.
    pub(super) fn hashed_rename(&self, ty: &str, b: &Obj) -> Check {
        if self.r.hashed_rules() == 0 {
            return Ok(());
        }
        let rel = rel_name(b.get("relation"));
        match (ty, str_field(b, "renameType").or_else(|| str_field(b, "objectType"))) {
            ("RenameStmt", Some("OBJECT_COLUMN")) => match (rel, str_field(b, "newname")) {
                (Some(rel), Some(new)) => self.created(&rel, &[Some(new.to_string())]),
                _ => Ok(()),
            },
            ("RenameStmt", Some(kind)) if RELATION_OBJECTS.contains(&kind) => match (rel, str_field(b, "newname")) {
                (Some(rel), Some(new)) => self.created(&RelName { schema: rel.schema, name: new }, &[None]),
                _ => Ok(()),
            },
            // The schema's tables are not known: any a hash rule may cover under the new name.
            ("RenameStmt", Some("OBJECT_SCHEMA")) => match str_field(b, "newname") {
                Some(new) => match self.r.hashed_rules() & self.r.schema_rules(new) {
                    0 => Ok(()),
                    bits => self.refuse_hashed(bits, "the renamed schema's tables may have"),
                },
                None => Ok(()),
            },
            ("AlterObjectSchemaStmt", Some(kind)) if RELATION_OBJECTS.contains(&kind) => match (rel, str_field(b, "newschema")) {
                (Some(rel), Some(new)) => self.created(&RelName { schema: Some(new), name: rel.name }, &[None]),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}


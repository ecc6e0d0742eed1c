//! Statements that take a rule table out of its rules without naming it. Rules name tables by
//! pattern (`public.customers.card`); renaming the schema (`ALTER SCHEMA public RENAME TO
//! hidden`, which the service role may do when it owns the database) leaves no table the
//! pattern covers, and after the catalog reload every column reads raw. An extension's
//! members move with it (`ALTER EXTENSION e ADD TABLE customers`, then `ALTER EXTENSION e
//! SET SCHEMA hidden`). Neither names the table where the other checks look (a RangeVar).

use super::{Check, Strict};
use crate::policy::pgtree::{Obj, str_field};

impl Strict<'_> {
    /// Refused: renaming a schema out of a strict rule's pattern, changing an extension's
    /// members, moving an extension to another schema.
    pub(super) fn moves(&self, ty: &str, b: &Obj) -> Check {
        match ty {
            "RenameStmt" if str_field(b, "renameType") == Some("OBJECT_SCHEMA") => {
                let old = str_field(b, "subname").unwrap_or("");
                let new = str_field(b, "newname").unwrap_or("");
                // Rules whose pattern covers the schema by its old name and not by the new.
                match self.r.schema_rules(old) & !self.r.schema_rules(new) & self.all {
                    0 => Ok(()),
                    bits => self.refuse(bits, format!("renaming schema {old:?} would take its tables out of the masking rules that name it")),
                }
            }
            "AlterExtensionContentsStmt" => {
                self.refuse(0, "changing an extension's members can move a table with masked columns with the extension".into())
            }
            "AlterObjectSchemaStmt" if str_field(b, "objectType") == Some("OBJECT_EXTENSION") => {
                self.refuse(0, "moving an extension moves its member tables out of the masking rules that name their schema".into())
            }
            _ => Ok(()),
        }
    }
}


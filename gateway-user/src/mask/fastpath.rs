//! Strict masking of fastpath calls (the protocol's FunctionCall message): the call names a
//! function by OID and passes its arguments as bytes, so no parse tree shows where a masked
//! value could go — `query_to_xml` called this way runs any SQL text, and its result is
//! masked by the content detectors alone. Under a strict rule only the large-object
//! functions, which libpq calls this way and which read nothing but large objects, may run.

use super::strict::Violation;

/// The built-in large-object functions libpq's `lo_*` calls use, by their OIDs (fixed in
/// `pg_proc.dat`): lo_create, lo_open, lo_close, loread, lowrite, lo_lseek, lo_creat,
/// lo_tell, lo_unlink, lo_truncate, lo_lseek64, lo_tell64, lo_truncate64. `lo_import` and
/// `lo_export` (server files) are not among them.
const LARGE_OBJECT_FUNCTIONS: &[i32] = &[715, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170, 3171, 3172];

/// Strict masking's verdict on a fastpath call of `oid` in a session whose active strict
/// rules are `strict_bits`: None when it may run.
pub fn check(oid: i32, strict_bits: u64) -> Option<Violation> {
    if strict_bits == 0 || LARGE_OBJECT_FUNCTIONS.contains(&oid) {
        return None;
    }
    Some(Violation {
        rules: strict_bits,
        reason: format!(
            "a fastpath function call (oid {oid}) passes arguments pgward cannot follow; only the large-object functions may be called this way"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_objects_under_strict_rules() {
        // query_to_xml, set_config: refused under a strict rule, naming its bits.
        for oid in [2924, 2078, 764] {
            assert_eq!(check(oid, 0b101).map(|v| v.rules), Some(0b101), "{oid}");
        }
        // lo_open, loread, lowrite: what libpq's large-object calls need.
        for oid in [952, 954, 955] {
            assert_eq!(check(oid, 0b101), None, "{oid}");
        }
        // No strict rule: nothing to refuse.
        assert_eq!(check(2924, 0), None);
    }
}

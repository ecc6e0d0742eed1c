//! A prepared statement's parameter types, as far as pgward knows them: those the client
//! declared in its Parse, and those the server reported in a ParameterDescription (the
//! answer to a Describe of the statement). Shared (`Arc`) between the statement and the
//! Describe waiting for its answer, so the answer lands on the statement that was described
//! even when a later Parse has reused the name in the meantime.

use std::sync::OnceLock;

#[derive(Debug, Default)]
pub struct ParamTypes {
    declared: Box<[u32]>,
    described: OnceLock<Box<[u32]>>,
}

impl ParamTypes {
    /// The types a Parse declared (0 where it left the type to the server).
    pub fn declared(types: Vec<u32>) -> ParamTypes {
        ParamTypes { declared: types.into_boxed_slice(), described: OnceLock::new() }
    }

    /// The server's ParameterDescription of the statement (it never changes: a later one is
    /// the same and is ignored).
    pub fn describe(&self, types: Vec<u32>) {
        let _ = self.described.set(types.into_boxed_slice());
    }

    /// The type of parameter `i` (from 0): the declared one, else the described one, else 0
    /// (unknown: not declared, and no Describe of the statement answered yet).
    pub fn get(&self, i: usize) -> u32 {
        match self.declared.get(i) {
            Some(&t) if t != 0 => t,
            _ => self.described.get().and_then(|d| d.get(i)).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_first_then_described_then_unknown() {
        let t = ParamTypes::declared(vec![23, 0]);
        assert_eq!([t.get(0), t.get(1), t.get(2)], [23, 0, 0]);
        t.describe(vec![23, 25, 1700]);
        assert_eq!([t.get(0), t.get(1), t.get(2), t.get(3)], [23, 25, 1700, 0]);
        t.describe(vec![16, 16, 16]);
        assert_eq!(t.get(1), 25, "the first description stays");
        assert_eq!(ParamTypes::default().get(0), 0);
    }
}

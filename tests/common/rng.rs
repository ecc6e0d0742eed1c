//! A small deterministic generator (xorshift) for load tests: seeded per client, so a run's
//! mix of operations can be told from its seed.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A random nonzero seed (xorshift never leaves 0).
pub fn seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_le_bytes(b) | 1
}

//! `cargo xtask bench`: the benchmarks (not written yet).

use anyhow::{Result, bail};

#[derive(clap::Args, Default)]
pub struct BenchArgs {
    /// Extra arguments for the benchmarks.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(_args: &BenchArgs) -> Result<()> {
    bail!("bench: not implemented yet (xtask/src/bench.rs::run is a placeholder)")
}

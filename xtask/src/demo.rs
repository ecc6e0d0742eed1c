//! `cargo xtask demo`: the end-to-end demo (not written yet).

use anyhow::{Result, bail};

#[derive(clap::Args, Default)]
pub struct DemoArgs {
    /// Extra arguments for the demo.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(_args: &DemoArgs) -> Result<()> {
    bail!("demo: not implemented yet (xtask/src/demo.rs::run is a placeholder)")
}

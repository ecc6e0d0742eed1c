//! Project tasks: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! - `build-ebpf`: build the kernel programs (gateway-ebpf) into `target/bpf/gateway-ebpf.o`.
//! - `test`: build-ebpf, build the workspace, run the workspace tests (the README's test command).
//! - `package`: the Debian package (package.rs, and deb.rs in the library).
//! - `demo`, `bench`: see demo.rs and bench.rs (`splice-proxy`, hidden, is the bench's baseline
//!   proxy).

mod bench;
mod demo;
mod ebpf;
mod package;
mod pg;
mod splice;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "pgward project tasks",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build gateway-ebpf for bpfel-unknown-none and copy it to target/bpf/gateway-ebpf.o.
    BuildEbpf(ebpf::BuildEbpfArgs),
    /// build-ebpf, `cargo build --workspace`, then `cargo test --workspace`.
    ///
    /// Arguments before `--` go to `cargo test` (e.g. `-p gateway-user`, a test name filter);
    /// arguments after `--` go to the test binaries, after `--test-threads=N`.
    Test(TestArgs),
    /// Build the Debian package (build-ebpf, release build, .deb in target/debian).
    Package(package::PackageArgs),
    /// Run the end-to-end demo.
    Demo(demo::DemoArgs),
    /// Run the benchmarks: pgward vs direct, PgBouncer and a bare proxy (see bench.rs).
    Bench(bench::BenchArgs),
    /// The bench's baseline proxy (accept, connect, copy bytes both ways); started by `bench`.
    #[command(hide = true)]
    SpliceProxy(splice::SpliceArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Test threads per test binary (default: $PGWARD_TEST_THREADS, else the number of CPUs).
    #[arg(long, value_name = "N")]
    test_threads: Option<usize>,
    /// Skip build-ebpf (use the target/bpf/gateway-ebpf.o already there).
    #[arg(long)]
    no_ebpf: bool,
    /// Extra arguments: `[CARGO_TEST_ARGS]... [-- TEST_BINARY_ARGS...]`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

fn main() {
    // clap would swallow the first `--`; keep it so `cargo xtask test -- --nocapture` works
    // like `cargo test -- --nocapture`.
    let raw: Vec<String> = std::env::args().collect();
    let (cli_args, passthrough) = split_test_passthrough(raw);
    let cli = Cli::parse_from(cli_args);
    let result = match cli.command {
        Command::BuildEbpf(args) => ebpf::build(&args).map(|_| ()),
        Command::Test(args) => test(args, passthrough),
        Command::Package(args) => package::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::SpliceProxy(args) => splice::run(&args),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// For `test`, everything after the first literal `--` is for the test binaries.
fn split_test_passthrough(raw: Vec<String>) -> (Vec<String>, Vec<String>) {
    let is_test = raw.get(1).is_some_and(|a| a == "test");
    match raw.iter().position(|a| a == "--") {
        Some(i) if is_test => (raw[..i].to_vec(), raw[i + 1..].to_vec()),
        _ => (raw, Vec::new()),
    }
}

fn test(args: TestArgs, binary_args: Vec<String>) -> Result<()> {
    let root = util::workspace_root();
    if args.no_ebpf {
        util::step("build-ebpf: skipped (--no-ebpf)");
    } else {
        ebpf::build(&ebpf::BuildEbpfArgs::default())?;
    }

    let threads = match args.test_threads {
        Some(n) => n,
        None => match std::env::var("PGWARD_TEST_THREADS") {
            Ok(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("PGWARD_TEST_THREADS={v:?} is not a number"))?,
            Err(_) => std::thread::available_parallelism().map_or(2, |n| n.get()),
        },
    };

    let mut build = util::cargo();
    build.current_dir(&root).args(["build", "--workspace"]);
    util::run_timed("cargo build --workspace", &mut build)?;

    let mut test = util::cargo();
    test.current_dir(&root)
        .args(["test", "--workspace"])
        .args(&args.args)
        .arg("--")
        .arg(format!("--test-threads={threads}"))
        .args(&binary_args);
    util::run_timed("cargo test --workspace", &mut test)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> (TestArgs, Vec<String>) {
        let raw = line.split_whitespace().map(String::from).collect();
        let (cli_args, passthrough) = split_test_passthrough(raw);
        match Cli::try_parse_from(cli_args).expect("parses").command {
            Command::Test(args) => (args, passthrough),
            _ => panic!("not the test command"),
        }
    }

    #[test]
    fn test_args_split_at_double_dash() {
        let (args, bin) =
            parse("xtask test --test-threads 3 -p gateway-user relay -- --nocapture --ignored");
        assert_eq!(args.test_threads, Some(3));
        assert!(!args.no_ebpf);
        assert_eq!(args.args, ["-p", "gateway-user", "relay"]);
        assert_eq!(bin, ["--nocapture", "--ignored"]);
    }

    #[test]
    fn test_args_plain() {
        let (args, bin) = parse("xtask test");
        assert_eq!(args.test_threads, None);
        assert!(args.args.is_empty() && bin.is_empty());
        let (args, bin) = parse("xtask test --no-ebpf -- --exact a::b");
        assert!(args.no_ebpf && args.args.is_empty());
        assert_eq!(bin, ["--exact", "a::b"]);
    }

    #[test]
    fn double_dash_only_special_for_test() {
        let raw: Vec<String> = ["xtask", "demo", "--", "x"].map(String::from).into();
        assert_eq!(split_test_passthrough(raw.clone()).0, raw);
    }
}

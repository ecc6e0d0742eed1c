/// Stack of the thread the CLI runs on: statements are parsed and their trees walked
/// recursively (bounded by `policy::pgparse`), as on the gateway's event loops.
const MAIN_STACK: usize = 64 << 20;

fn main() -> std::process::ExitCode {
    match std::thread::Builder::new().name("pgward".into()).stack_size(MAIN_STACK).spawn(pgward::cli::main) {
        Ok(t) => t.join().unwrap_or(std::process::ExitCode::FAILURE),
        Err(e) => {
            eprintln!("pgward: cannot start the main thread: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

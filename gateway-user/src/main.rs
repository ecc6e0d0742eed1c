fn main() -> std::process::ExitCode {
    pgward::cli::main()
}

fn main() -> std::process::ExitCode {
    tunfwd::cli::main()
}

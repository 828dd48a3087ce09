fn main() -> std::process::ExitCode {
    proxy_userspace::cli::main()
}

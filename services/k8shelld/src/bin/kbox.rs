fn main() -> std::process::ExitCode {
    k8shell_k8shelld::kbox::main(std::env::args().skip(1).collect())
}

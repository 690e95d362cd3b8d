fn main() -> std::process::ExitCode {
    k8shell_service::service_main(k8shell_nfgate::NAME, "K8SHELL_NFGATE_", k8shell_nfgate::run)
}

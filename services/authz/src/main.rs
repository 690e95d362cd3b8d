fn main() -> std::process::ExitCode {
    k8shell_service::service_main(k8shell_authz::NAME, "K8SHELL_AUTHZ_", k8shell_authz::run)
}

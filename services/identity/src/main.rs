fn main() -> std::process::ExitCode {
    k8shell_service::service_main(
        k8shell_identity::NAME,
        "K8SHELL_IDENTITY_",
        k8shell_identity::run,
    )
}

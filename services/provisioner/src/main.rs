fn main() -> std::process::ExitCode {
    k8shell_service::service_main(
        k8shell_provisioner::NAME,
        "K8SHELL_PROVISIONER_",
        k8shell_provisioner::run,
    )
}

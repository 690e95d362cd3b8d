fn main() -> std::process::ExitCode {
    k8shell_service::service_main(
        k8shell_sshproxy::NAME,
        "K8SHELL_SSHPROXY_",
        k8shell_sshproxy::run,
    )
}

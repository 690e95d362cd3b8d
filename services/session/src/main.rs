fn main() -> std::process::ExitCode {
    k8shell_service::service_main(
        k8shell_session::NAME,
        "K8SHELL_SESSION_",
        k8shell_session::run,
    )
}

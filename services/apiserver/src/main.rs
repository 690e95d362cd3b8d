fn main() -> std::process::ExitCode {
    k8shell_service::service_main(
        k8shell_apiserver::NAME,
        "K8SHELL_APISERVER_",
        k8shell_apiserver::run,
    )
}

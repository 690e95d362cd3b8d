fn main() -> std::process::ExitCode {
    // One static binary serves both roles: `kbox` is a symlink to k8shelld.
    let invoked_as = std::env::args().next().unwrap_or_default();
    if std::path::Path::new(&invoked_as)
        .file_name()
        .is_some_and(|n| n == "kbox")
    {
        return k8shell_k8shelld::kbox::main(std::env::args().skip(1).collect());
    }
    if std::env::args().nth(1).as_deref() == Some("install") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return k8shell_k8shelld::install::main(&args);
    }
    if std::env::args().nth(1).as_deref() == Some("sftp-server") {
        return k8shell_k8shelld::serve_sftp_stdio();
    }
    k8shell_service::service_main_with_logs(
        k8shell_k8shelld::NAME,
        "K8SHELL_K8SHELLD_",
        5_000,
        |config: &mut k8shell_k8shelld::Config, buffer| config.log_buffer = Some(buffer),
        k8shell_k8shelld::run,
    )
}

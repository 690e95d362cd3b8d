// Policy evaluation allocates many small values (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    k8shell_service::service_main(k8shell_authz::NAME, "K8SHELL_AUTHZ_", k8shell_authz::run)
}

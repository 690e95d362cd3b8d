use k8shell_bus::Bus;
use k8shell_testkit::{Durability, TestInfra};
use sqlx::PgPool;

/// Private servers for one benchmark run (PostgreSQL with fsync on).
pub struct BenchEnv {
    pub bus: Bus,
    pub pool: PgPool,
    infra: TestInfra,
}

impl BenchEnv {
    pub async fn start() -> anyhow::Result<Self> {
        let infra = TestInfra::start_with(Durability::Durable).await?;
        let bus = infra.bus().await?;
        let pool = infra.pool(k8shell_provisioner::SCHEMA).await?;
        k8shell_provisioner::migrate(&pool).await?;
        Ok(Self { bus, pool, infra })
    }

    pub fn machine(&self) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown cpu".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024 / 1024)
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let date = time::OffsetDateTime::now_utc().date();
        format!(
            "{date}, {cpu}, {cores} cores, {memory_gib} GiB RAM, Linux {}, nats-server (Debian) with file storage, \
             PostgreSQL over a unix socket with fsync on",
            kernel.trim()
        )
    }

    pub async fn stop(mut self) {
        self.pool.close().await;
        self.infra.postgres.stop().await;
        self.infra.nats.stop().await;
    }
}

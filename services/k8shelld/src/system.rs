//! CPU and memory from cgroup v2, mounts with usage, uptime.

use std::time::Instant;

use k8shell_proto::k8shelld::v1 as pb;

const CGROUP: &str = "/sys/fs/cgroup";

/// Filesystems that hold no user data and only clutter the list.
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "hugetlbfs",
    "nsfs",
    "rpc_pipefs",
    "devtmpfs",
];

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Cores allowed by `cpu.max` ("quota period" or "max period").
fn cpu_limit() -> f64 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let Some(max) = read(&format!("{CGROUP}/cpu.max")) else {
        return cpus;
    };
    let mut fields = max.split_whitespace();
    match (
        fields.next().and_then(|q| q.parse::<f64>().ok()),
        fields.next().and_then(|p| p.parse::<f64>().ok()),
    ) {
        (Some(quota), Some(period)) if period > 0.0 => (quota / period).min(cpus),
        _ => cpus,
    }
}

fn meminfo(field: &str) -> Option<u64> {
    read("/proc/meminfo")?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

fn memory() -> (u64, u64) {
    let limit = read(&format!("{CGROUP}/memory.max"))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let used = read(&format!("{CGROUP}/memory.current"))
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| Some(meminfo("MemTotal:")?.saturating_sub(meminfo("MemAvailable:")?)))
        .unwrap_or(0);
    (limit, used)
}

fn mounts() -> Vec<pb::Mount> {
    let Some(table) = read("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut mounts: Vec<pb::Mount> = table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            // Octal escapes (\040 for a space) as the kernel writes them.
            let path = fields.next()?.replace("\\040", " ");
            let filesystem = fields.next()?.to_owned();
            if PSEUDO_FILESYSTEMS.contains(&filesystem.as_str()) {
                return None;
            }
            let stats = nix::sys::statvfs::statvfs(path.as_str()).ok()?;
            let block = stats.fragment_size();
            Some(pb::Mount {
                path,
                filesystem,
                total_bytes: stats.blocks() * block,
                available_bytes: stats.blocks_available() * block,
            })
        })
        .collect();
    mounts.sort_by(|a, b| a.path.cmp(&b.path));
    mounts.dedup_by(|a, b| a.path == b.path);
    mounts
}

/// Collects the current system information.
pub fn info(started: Instant) -> pb::SystemInfo {
    let (memory_limit_bytes, memory_used_bytes) = memory();
    let system_uptime_seconds = read("/proc/uptime")
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s as u64)
        .unwrap_or(0);
    let load_average = read("/proc/loadavg")
        .map(|l| {
            l.split_whitespace()
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pb::SystemInfo {
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        cpu_limit: cpu_limit(),
        memory_limit_bytes,
        memory_used_bytes,
        mounts: mounts(),
        system_uptime_seconds,
        daemon_uptime_seconds: started.elapsed().as_secs(),
        load_average,
    }
}

//! Listening TCP ports, from /proc/net/tcp and tcp6, with their owners.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8shell_proto::k8shelld::v1 as pb;

/// TCP state `LISTEN` in /proc/net/tcp.
const LISTEN: &str = "0A";

/// Parses the address column: IPv4 as one little-endian word, IPv6 as four.
fn parse_address(hex: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(address, 16).ok()?.swap_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for word in 0..4 {
                let value = u32::from_str_radix(&address[word * 8..word * 8 + 8], 16).ok()?;
                bytes[word * 4..word * 4 + 4].copy_from_slice(&value.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// `(address, port, socket inode)` of listening sockets in one table.
fn listening(table: &str) -> Vec<(IpAddr, u16, u64)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let (ip, port) = parse_address(fields.get(1)?)?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((ip, port, inode))
        })
        .collect()
}

/// Maps socket inodes to `(pid, comm)` by reading /proc/*/fd.
fn socket_owners() -> HashMap<u64, (i32, String)> {
    let mut owners = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for entry in processes.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|i| i.parse::<u64>().ok())
            {
                owners.entry(inode).or_insert_with(|| {
                    let comm =
                        std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    (pid, comm.trim().to_owned())
                });
            }
        }
    }
    owners
}

/// Every listening TCP port, sorted by port then address.
pub fn list() -> Vec<pb::ListeningPort> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            sockets.extend(listening(&text));
        }
    }
    let owners = socket_owners();
    let mut ports: Vec<pb::ListeningPort> = sockets
        .into_iter()
        .map(|(ip, port, inode)| {
            let (pid, process) = owners.get(&inode).cloned().unwrap_or_default();
            pb::ListeningPort {
                address: ip.to_string(),
                port: u32::from(port),
                process,
                pid,
            }
        })
        .collect();
    ports.sort_by(|a, b| (a.port, &a.address).cmp(&(b.port, &b.address)));
    ports.dedup_by(|a, b| a.port == b.port && a.address == b.address);
    ports
}

/// What changed between two listings.
pub fn diff(before: &[pb::ListeningPort], after: &[pb::ListeningPort]) -> pb::PortsChange {
    let key = |p: &pb::ListeningPort| (p.address.clone(), p.port);
    let before_keys: std::collections::HashSet<_> = before.iter().map(key).collect();
    let after_keys: std::collections::HashSet<_> = after.iter().map(key).collect();
    pb::PortsChange {
        opened: after
            .iter()
            .filter(|p| !before_keys.contains(&key(p)))
            .cloned()
            .collect(),
        closed: before
            .iter()
            .filter(|p| !after_keys.contains(&key(p)))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4243 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            listening(tcp),
            vec![(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080, 4242)]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            listening(tcp6),
            vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 22, 77)]
        );
    }
}

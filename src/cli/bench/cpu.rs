//! Server CPU time per operation, for servers this tool did not spawn.
//!
//! A server at `--server` on this machine is found by its port: the
//! listening socket's inode in `/proc/net/tcp` (and `tcp6`), then the
//! process holding that socket among `/proc/*/fd`. `--server-pid` names the
//! processes instead. A server elsewhere (or not found) has no CPU figure,
//! and the report says so rather than guessing.

use std::{path::Path, time::Duration};

use clap::Args;

use crate::cli::process::cpu_time_of;

/// Whose CPU time a benchmark of a running server reads: the flag
/// `transition`, `get`, `ceiling` and `watch` share.
#[derive(Debug, Args)]
pub(super) struct ServerCpuArgs {
    /// Server processes whose CPU time is read, comma-separated; default:
    /// the process listening on each --server port on this machine.
    #[arg(long, value_delimiter = ',')]
    pub(super) server_pid: Vec<u32>,
}

/// The server processes whose CPU time a benchmark reads.
#[derive(Debug, Default)]
pub(super) struct ServerCpu {
    pids: Vec<u32>,
}

impl ServerCpu {
    /// `pids` when given; otherwise the processes listening on the ports of
    /// the loopback URLs in `servers` (comma-separated).
    pub(super) fn find(servers: &str, pids: &[u32]) -> ServerCpu {
        if !pids.is_empty() {
            return ServerCpu {
                pids: pids.to_vec(),
            };
        }
        let mut found = Vec::new();
        for url in servers.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            if let Some(pid) = loopback_port(url).and_then(listening_pid) {
                found.push(pid);
            }
        }
        found.sort_unstable();
        found.dedup();
        ServerCpu { pids: found }
    }

    /// One process, known by its PID.
    pub(super) fn of(pid: u32) -> ServerCpu {
        ServerCpu { pids: vec![pid] }
    }

    /// What the report calls these processes.
    pub(super) fn describe(&self) -> String {
        if self.pids.is_empty() {
            "server CPU: not measured (no local server process found; --server-pid names it)"
                .to_string()
        } else {
            let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
            format!("server CPU from /proc of PID {}", pids.join(", "))
        }
    }

    /// CPU time used so far by all the processes; `None` without any, or
    /// when one of them cannot be read (it exited).
    pub(super) fn sample(&self) -> Option<Duration> {
        if self.pids.is_empty() {
            return None;
        }
        let mut total = Duration::ZERO;
        for pid in &self.pids {
            total += cpu_time_of(*pid).ok()?;
        }
        Some(total)
    }
}

/// CPU microseconds per operation between two samples.
pub(super) fn per_op(
    before: Option<Duration>,
    after: Option<Duration>,
    operations: u64,
) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    (operations > 0).then(|| used.as_secs_f64() * 1e6 / operations as f64)
}

/// Formats [`per_op`]'s figure for a report line, per `unit`.
pub(super) fn show(us_per_op: Option<f64>, unit: &str) -> String {
    match us_per_op {
        Some(us) => format!("server CPU {us:.2} us/{unit}"),
        None => "server CPU n/a".to_string(),
    }
}

/// The port of `url` when its host is this machine (loopback).
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local {
        return None;
    }
    port.parse().ok()
}

/// The process holding the socket that listens on `port` (any address).
fn listening_pid(port: u16) -> Option<u32> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if holds_any(&entry.path().join("fd"), &wanted) {
            return Some(pid);
        }
    }
    None
}

/// Inodes of the sockets in a `/proc/net/tcp` table listening on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid
    // timeout inode ...; addresses are HEX_IP:HEX_PORT, LISTEN is state 0A.
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = *fields.get(3)? == "0A";
            let matches = u16::from_str_radix(local_port, 16).ok()? == port;
            if listening && matches {
                fields.get(9)?.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

fn holds_any(fd_dir: &Path, wanted: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(fd_dir) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|target| target.to_str().map(|t| wanted.iter().any(|w| w == t)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_give_their_port() {
        assert_eq!(loopback_port("http://127.0.0.1:50051"), Some(50051));
        assert_eq!(loopback_port("https://localhost:443/"), Some(443));
        assert_eq!(loopback_port("http://[::1]:7000"), Some(7000));
        assert_eq!(loopback_port("http://10.0.0.1:50051"), None);
        assert_eq!(loopback_port("http://127.0.0.1"), None);
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:C351 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:C351 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(listening_inodes(table, 50001), vec![4242]);
        assert!(listening_inodes(table, 50002).is_empty());
    }

    /// A listener of this very process is found, and its CPU time read.
    #[test]
    fn a_local_listener_is_found_and_measured() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cpu = ServerCpu::find(&format!("http://127.0.0.1:{port}"), &[]);
        assert_eq!(cpu.pids, vec![std::process::id()]);
        assert!(cpu.sample().is_some());
    }
}

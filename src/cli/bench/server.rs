//! Servers the benchmark tool spawns (`recovery`, `memory`): started on an
//! ephemeral port and stopped on every exit path (SIGTERM, SIGKILL after
//! [`STOP_GRACE`]); and their temporary directories.

use std::{
    io::BufRead,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::sync::oneshot;

/// Time a spawned server gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A server this tool started; stopped (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]) when dropped, whatever the exit path.
pub(super) struct ServerProcess {
    child: Option<Child>,
    pid: u32,
    pub(super) url: String,
}

fn send_sigterm(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed: {status}");
    }
    Ok(())
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

impl ServerProcess {
    /// Starts `binary serve --store STORE --listen 127.0.0.1:0 --log warn`
    /// and waits for its `listening on` line.
    pub(super) async fn spawn(
        binary: &Path,
        store: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--store",
                store,
                "--listen",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take();
        let mut process = ServerProcess {
            pid: child.id(),
            child: Some(child),
            url: String::new(),
        };
        let stdout = stdout.context("the server's stdout is not captured")?;
        let (line_tx, line_rx) = oneshot::channel::<SocketAddr>();
        // Reads until EOF (the server exits), so the pipe never fills.
        std::thread::Builder::new()
            .name("bench-server-stdout".to_string())
            .spawn(move || {
                let mut line_tx = Some(line_tx);
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = parse_listening(&line)
                        && let Some(tx) = line_tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                }
            })
            .context("cannot start the stdout reader")?;
        let addr = match tokio::time::timeout(timeout, line_rx).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => {
                let status = process.try_status();
                bail!(
                    "the server (pid {}) exited before listening: {status}",
                    process.pid
                );
            }
            Err(_) => bail!(
                "the server (pid {}) did not listen within {timeout:?}",
                process.pid
            ),
        };
        process.url = format!("http://{addr}");
        Ok(process)
    }

    fn try_status(&mut self) -> String {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            Some(Ok(None)) => "still running".to_string(),
            Some(Err(err)) => err.to_string(),
            None => "already stopped".to_string(),
        }
    }

    /// VmRSS and VmHWM from /proc/PID/status, in bytes.
    pub(super) fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let rss = proc_status_kib(&text, "VmRSS:").context("no VmRSS")?;
        let hwm = proc_status_kib(&text, "VmHWM:").context("no VmHWM")?;
        Ok((rss * 1024, hwm * 1024))
    }

    /// SIGTERM, then waits for the exit; SIGKILL after [`STOP_GRACE`].
    /// Returns how long the exit took.
    pub(super) async fn stop(mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let started = Instant::now();
        let child = self.child.as_mut().context("already stopped")?;
        if child.try_wait()?.is_none() {
            send_sigterm(self.pid)?;
        }
        loop {
            let child = self.child.as_mut().context("already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok((started.elapsed(), status));
            }
            if started.elapsed() >= STOP_GRACE {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                bail!(
                    "the server (pid {}) did not exit within {STOP_GRACE:?} of SIGTERM; killed",
                    self.pid
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        eprintln!("bench: stopping the server (pid {})", self.pid);
        let _ = send_sigterm(self.pid);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn proc_status_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A directory this tool created, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn server_binary(binary: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match binary {
        Some(path) => Ok(path),
        None => std::env::current_exe().context("cannot find this executable"),
    }
}

pub(super) fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_and_proc_status() {
        assert_eq!(
            parse_listening("listening on 127.0.0.1:4321"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(parse_listening("something else"), None);
        let status = "Name:\tagent-lifecycle\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(proc_status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(proc_status_kib(status, "VmHWM:"), Some(20480));
    }
}

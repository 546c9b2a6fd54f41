//! Servers the benchmark tool spawns (`recovery`, `memory`), run with
//! [`crate::cli::process`]: started on an ephemeral port with their
//! stderr on this terminal, and stopped on every exit path (SIGTERM, SIGKILL
//! after [`STOP_GRACE`]); and the temporary directories they use.

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::cli::process::{ServerCommand, ServerProcess, Signal, Stderr};

/// Time a spawned server gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often [`SpawnedServer::stop`] looks for the exit; it reports how long
/// the exit took, so this bounds its error.
const STOP_POLL: Duration = Duration::from_millis(5);

/// A server this tool started; stopped (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]) when dropped, whatever the exit path.
pub(super) struct SpawnedServer {
    process: ServerProcess,
    /// `http://HOST:PORT`.
    pub(super) url: String,
}

impl SpawnedServer {
    /// Starts `binary serve --listen 127.0.0.1:0 --store STORE --log warn`
    /// (without `RUST_LOG`, which would override `--log`) and waits up to
    /// `timeout` for its address.
    ///
    /// # Errors
    /// The binary cannot be run, or the server exits or stays silent.
    pub(super) async fn spawn(
        binary: &Path,
        store: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(binary, store, &[], timeout).await
    }

    /// [`SpawnedServer::spawn`] with `extra` arguments after the others.
    ///
    /// # Errors
    /// As [`SpawnedServer::spawn`].
    pub(super) async fn spawn_with(
        binary: &Path,
        store: &str,
        extra: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let command = ServerCommand::new(binary)
            .args(["--store", store, "--log", "warn"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stderr(Stderr::Inherit)
            .stop_on_drop(Signal::Terminate, STOP_GRACE);
        let process = ServerProcess::start_async(&command, timeout).await?;
        Ok(SpawnedServer {
            url: process.url(),
            process,
        })
    }

    /// The server's PID.
    pub(super) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// VmRSS and VmHWM, in bytes.
    ///
    /// # Errors
    /// `/proc/PID/status` cannot be read or lacks them.
    pub(super) fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let memory = self.process.memory()?;
        Ok((memory.resident, memory.peak_resident))
    }

    /// SIGTERM, then waits for the exit; SIGKILL after [`STOP_GRACE`].
    /// Returns how long the exit took.
    ///
    /// # Errors
    /// The signal fails, or the server had to be killed.
    pub(super) async fn stop(mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let started = Instant::now();
        if self.process.try_wait()?.is_none() {
            self.process.signal(Signal::Terminate)?;
        }
        loop {
            if let Some(status) = self.process.try_wait()? {
                return Ok((started.elapsed(), status));
            }
            if started.elapsed() >= STOP_GRACE {
                let _ = self.process.kill();
                bail!(
                    "the server (pid {}) did not exit within {STOP_GRACE:?} of SIGTERM; killed",
                    self.process.pid()
                );
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        // The process's own drop then stops it (SIGTERM, SIGKILL after
        // STOP_GRACE).
        if matches!(self.process.try_wait(), Ok(None)) {
            eprintln!("bench: stopping the server (pid {})", self.process.pid());
        }
    }
}

/// A directory this tool created, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--binary`, else this executable.
pub(super) fn server_binary(binary: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match binary {
        Some(path) => Ok(path),
        None => std::env::current_exe().context("cannot find this executable"),
    }
}

/// Size of a file; 0 when it does not exist.
pub(super) fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

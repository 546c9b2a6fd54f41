//! Runs the agent-lifecycle server binary as a child process, for the
//! benchmark tool and the test suite.
//!
//! The server is started as `BINARY serve --listen 127.0.0.1:0 ARGS...`; its
//! address comes from the `listening on ADDR` line it prints first on stdout.
//! Its stderr is collected (tests show it when they fail) or inherited (the
//! benchmark tool's terminal). It is stopped by signal and always reaped: a
//! [`ServerProcess`] that is dropped while the server runs kills it, or
//! first asks it to stop ([`ServerCommand::stop_on_drop`]).
//!
//! Synchronous (threads and `std::process`), so tests without a runtime can
//! use it; [`ServerProcess::start_async`] waits for the address without
//! blocking the calling task. Signals are sent with the `kill` command, since
//! the crate forbids `unsafe` (no libc). Unix only: signals, and memory from
//! `/proc`. Depends on nothing else in the crate.
//!
//! - `error`: [`ProcessError`].
//! - `system`: the child's pipes and exit, its CPU time and memory.

mod error;
mod system;

use self::system::{parse_listening, proc_status_kib, read_first_line};
pub use self::{
    error::ProcessError,
    system::{CollectedPipe, MemoryUsage, collect, cpu_time_of, wait_child},
};

use std::{
    ffi::OsString,
    io,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// How often a wait for an exit looks at the child: short, because the
/// benchmark tool reports how long a stop took.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long reaping may take after SIGKILL, which cannot be ignored.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How long the stderr of a server that exited before listening may take to
/// reach its end, so that the error carries all of it.
const STDERR_DRAIN: Duration = Duration::from_secs(5);

/// Where the server's stderr goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    /// Read into memory on a thread ([`ServerProcess::stderr_text`]).
    Collect,
    /// Shared with this process.
    Inherit,
}

/// A signal that asks the server to stop; it exits cleanly on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Terminate,
    /// SIGINT, as Ctrl-C sends it.
    Interrupt,
}

impl Signal {
    /// The name `kill` takes: `TERM`, `INT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Terminate => "TERM",
            Signal::Interrupt => "INT",
        }
    }
}

/// How to start a server: the binary, the arguments after
/// `serve --listen 127.0.0.1:0`, where stderr goes, which environment
/// variables it must not see, and how a drop stops it.
#[derive(Clone, Debug)]
pub struct ServerCommand {
    binary: PathBuf,
    /// What comes before `args`: `serve --listen 127.0.0.1:0` unless set.
    leading: Vec<OsString>,
    args: Vec<OsString>,
    stderr: Stderr,
    env_remove: Vec<OsString>,
    /// Variables set for the server, besides the inherited ones.
    env: Vec<(OsString, OsString)>,
    /// The signal a drop sends and how long it then waits before SIGKILL;
    /// `None`: SIGKILL at once.
    stop_on_drop: Option<(Signal, Duration)>,
}

impl ServerCommand {
    /// `binary serve --listen 127.0.0.1:0`, stderr collected, the
    /// environment inherited, killed at once when dropped.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        ServerCommand {
            binary: binary.into(),
            leading: ["serve", "--listen", "127.0.0.1:0"]
                .into_iter()
                .map(OsString::from)
                .collect(),
            args: Vec::new(),
            stderr: Stderr::Collect,
            env_remove: Vec::new(),
            env: Vec::new(),
            stop_on_drop: None,
        }
    }

    /// Runs `binary LEADING... ARGS...` instead of `binary serve --listen
    /// 127.0.0.1:0 ARGS...` (another program that prints `listening on
    /// ADDR` first, such as the benchmark's echo server).
    pub fn leading<I, S>(mut self, leading: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.leading = leading.into_iter().map(Into::into).collect();
        self
    }

    /// Appends arguments of `serve`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Where stderr goes.
    pub fn stderr(mut self, stderr: Stderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// Hides an environment variable from the server (`RUST_LOG` overrides
    /// `--log`, for example).
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env_remove.push(key.into());
        self
    }

    /// Sets an environment variable for the server (a secret that its
    /// configuration file names by variable).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A drop of a running server sends `signal` and waits up to `grace`
    /// for the exit (blocking the dropping thread) before SIGKILL, instead
    /// of killing it at once. Also applies when a start fails.
    pub fn stop_on_drop(mut self, signal: Signal, grace: Duration) -> Self {
        self.stop_on_drop = Some((signal, grace));
        self
    }
}

/// The first line of the server's stdout: `None` at end of file.
pub(crate) type FirstLine = Option<io::Result<String>>;

/// A running server, listening. Dropping it stops the server if it still
/// runs (SIGKILL, or as [`ServerCommand::stop_on_drop`] says) and reaps it;
/// [`ServerProcess::stop`] stops it cleanly and reports the exit.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pid: u32,
    stop_on_drop: Option<(Signal, Duration)>,
    /// Unspecified until the server printed its address; [`ServerProcess`]
    /// values that callers see always have the real one.
    addr: SocketAddr,
    /// `None` when stderr is inherited.
    stderr: Option<CollectedPipe>,
    /// The stdout lines after the first.
    stdout_rest: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts the server and waits, blocking, up to `timeout` for its
    /// address.
    ///
    /// # Errors
    /// The binary cannot be run, or the server exits, prints something else
    /// or stays silent before its address (it is then stopped as a drop
    /// does); the error carries its stderr ([`ProcessError::server_stderr`]).
    pub fn start(command: &ServerCommand, timeout: Duration) -> Result<Self, ProcessError> {
        let (process, first_line) = Self::spawn(command)?;
        let line = first_line.recv_timeout(timeout);
        process.into_listening(line, timeout)
    }

    /// [`ServerProcess::start`] for async callers: the wait for the address
    /// runs on tokio's blocking pool. Needs a tokio runtime.
    ///
    /// # Errors
    /// As [`ServerProcess::start`].
    ///
    /// # Cancel safety
    /// Dropping the future stops the server as dropping a [`ServerProcess`]
    /// does; the blocking wait then ends when the server's stdout closes.
    pub async fn start_async(
        command: &ServerCommand,
        timeout: Duration,
    ) -> Result<Self, ProcessError> {
        let (process, first_line) = Self::spawn(command)?;
        let line = tokio::task::spawn_blocking(move || first_line.recv_timeout(timeout))
            .await
            .unwrap_or(Err(mpsc::RecvTimeoutError::Disconnected));
        process.into_listening(line, timeout)
    }

    /// Spawns the server and a thread that sends its first stdout line and
    /// then drains stdout, so the server never writes into a full or closed
    /// pipe.
    fn spawn(command: &ServerCommand) -> Result<(Self, mpsc::Receiver<FirstLine>), ProcessError> {
        let mut builder = Command::new(&command.binary);
        builder
            .args(&command.leading)
            .args(&command.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match command.stderr {
                Stderr::Collect => Stdio::piped(),
                Stderr::Inherit => Stdio::inherit(),
            });
        for key in &command.env_remove {
            builder.env_remove(key);
        }
        for (key, value) in &command.env {
            builder.env(key, value);
        }
        let mut child = builder.spawn().map_err(|source| ProcessError::Spawn {
            binary: command.binary.clone(),
            source,
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // The guard owns the child from here on, so a failure below kills it.
        let mut process = ServerProcess {
            pid: child.id(),
            child,
            stop_on_drop: command.stop_on_drop,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr: None,
            stdout_rest: Arc::default(),
        };
        if let Some(pipe) = stderr {
            process.stderr = Some(collect(pipe).map_err(|source| ProcessError::Reader {
                pipe: "stderr",
                source,
            })?);
        }
        let first_line = match stdout {
            Some(stdout) => {
                read_first_line(stdout, Arc::clone(&process.stdout_rest)).map_err(|source| {
                    ProcessError::Reader {
                        pipe: "stdout",
                        source,
                    }
                })?
            }
            // Piped above, so always present; without it the wait below
            // sees end of file.
            None => mpsc::channel().1,
        };
        Ok((process, first_line))
    }

    /// Turns what the stdout reader sent (or the failed wait for it) into a
    /// listening server or the reason it is not one.
    fn into_listening(
        mut self,
        line: Result<FirstLine, mpsc::RecvTimeoutError>,
        timeout: Duration,
    ) -> Result<Self, ProcessError> {
        let pid = self.pid;
        match line {
            Ok(Some(Ok(line))) => match parse_listening(&line) {
                Some(addr) => {
                    self.addr = addr;
                    Ok(self)
                }
                None => Err(ProcessError::UnexpectedOutput {
                    pid,
                    line,
                    stderr: self.stderr_text(),
                }),
            },
            Ok(Some(Err(source))) => Err(ProcessError::Stdout {
                pid,
                source,
                stderr: self.stderr_text(),
            }),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = match wait_child(&mut self.child, KILL_GRACE) {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => "still running; killed".to_string(),
                    Err(err) => err.to_string(),
                };
                Err(ProcessError::ExitedEarly {
                    pid,
                    status,
                    stderr: self.stderr_after_exit(STDERR_DRAIN),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ProcessError::NotListening {
                pid,
                timeout,
                stderr: self.stderr_text(),
            }),
        }
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address of the HTTP listener (`--http-listen`), from the
    /// server's `http listening on ADDR` line; `None` when it did not print
    /// one within `timeout`.
    pub fn http_addr(&self, timeout: Duration) -> Option<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stdout_rest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find_map(|line| line.trim().strip_prefix("http listening on ")?.parse().ok());
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the server wrote to stderr so far; empty when inherited.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .as_ref()
            .map(CollectedPipe::text)
            .unwrap_or_default()
    }

    /// Everything the server wrote to stderr, once it has exited: waits up
    /// to `limit` for the pipe to reach its end.
    pub fn stderr_after_exit(&self, limit: Duration) -> String {
        if let Some(stderr) = &self.stderr {
            stderr.finish(limit);
        }
        self.stderr_text()
    }

    /// Sends `signal` to the server.
    ///
    /// # Errors
    /// `kill` cannot be run or fails (the process is gone and reaped).
    pub fn signal(&self, signal: Signal) -> Result<(), ProcessError> {
        let status = Command::new("kill")
            .args([format!("-{}", signal.as_str()), self.pid.to_string()])
            .status()
            .map_err(ProcessError::KillCommand)?;
        if !status.success() {
            return Err(ProcessError::KillFailed {
                signal: signal.as_str(),
                pid: self.pid,
                status,
            });
        }
        Ok(())
    }

    /// The exit status if the server has exited (and is now reaped).
    ///
    /// # Errors
    /// The child cannot be looked at.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        self.child.try_wait().map_err(|source| ProcessError::Wait {
            pid: self.pid,
            source,
        })
    }

    /// Waits up to `limit` for the server to exit.
    ///
    /// # Errors
    /// [`ProcessError::ExitTimeout`] (after killing and reaping it) when it
    /// still runs after `limit`; [`ProcessError::Wait`].
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus, ProcessError> {
        match wait_child(&mut self.child, limit) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(ProcessError::ExitTimeout {
                pid: self.pid,
                limit,
            }),
            Err(source) => Err(ProcessError::Wait {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Sends `signal` unless the server has already exited, then waits up to
    /// `grace` for the exit; kills it after that.
    ///
    /// # Errors
    /// As [`ServerProcess::signal`] and [`ServerProcess::wait`].
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if self.try_wait()?.is_none() {
            self.signal(signal)?;
        }
        self.wait(grace)
    }

    /// Sends SIGKILL and reaps the server.
    ///
    /// # Errors
    /// The signal or the wait failed.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        self.child.kill().map_err(|source| ProcessError::Sigkill {
            pid: self.pid,
            source,
        })?;
        self.wait(KILL_GRACE)
    }

    /// CPU time the server's threads have used so far (see
    /// [`cpu_time_of`]).
    ///
    /// # Errors
    /// `/proc` cannot be read.
    pub fn cpu_time(&self) -> Result<Duration, ProcessError> {
        cpu_time_of(self.pid)
    }

    /// The server's resident memory now and at its peak.
    ///
    /// # Errors
    /// `/proc/PID/status` cannot be read or lacks `VmRSS` or `VmHWM`.
    pub fn memory(&self) -> Result<MemoryUsage, ProcessError> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ProcessError::ProcStatus { path, source })?;
        let field = |field: &'static str| {
            proc_status_kib(&text, field).ok_or(ProcessError::MissingField { field })
        };
        Ok(MemoryUsage {
            resident: field("VmRSS")? * 1024,
            peak_resident: field("VmHWM")? * 1024,
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Some((signal, grace)) = self.stop_on_drop
            && self.signal(signal).is_ok()
        {
            // Kills and reaps the server if `grace` passes first.
            let _ = wait_child(&mut self.child, grace);
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

use std::{
    ffi::OsString,
    io::{self, BufRead, BufReader, Read},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// How often a wait for an exit looks at the child: short, because the
/// benchmark tool reports how long a stop took.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long reaping may take after SIGKILL, which cannot be ignored.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How long the stderr of a server that exited before listening may take to
/// reach its end, so that the error carries all of it.
const STDERR_DRAIN: Duration = Duration::from_secs(5);

/// Why starting, signalling, waiting for or measuring a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The binary could not be executed.
    #[error("cannot start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread reading one of the server's pipes could not be started.
    #[error("cannot start a reader of the server's {pipe}")]
    Reader {
        /// `stdout` or `stderr`.
        pipe: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the server's stdout failed before the address was printed.
    #[error("the server (pid {pid}): reading its stdout")]
    Stdout {
        /// The server's process id.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
        /// What it wrote to stderr until then (empty when inherited).
        stderr: String,
    },
    /// The server exited (or closed stdout) before printing its address.
    #[error("the server (pid {pid}) exited before listening: {status}")]
    ExitedEarly {
        /// The server's process id.
        pid: u32,
        /// Its exit status, as text.
        status: String,
        /// What it wrote to stderr (empty when inherited).
        stderr: String,
    },
    /// The server printed no address in time; it has been killed.
    #[error("the server (pid {pid}) did not listen within {timeout:?}")]
    NotListening {
        /// The server's process id.
        pid: u32,
        /// How long it had.
        timeout: Duration,
        /// What it wrote to stderr until then (empty when inherited).
        stderr: String,
    },
    /// The first line on stdout was not `listening on ADDR`.
    #[error("the server (pid {pid}) printed {line:?} where `listening on ADDR` was expected")]
    UnexpectedOutput {
        /// The server's process id.
        pid: u32,
        /// The line it printed.
        line: String,
        /// What it wrote to stderr until then (empty when inherited).
        stderr: String,
    },
    /// The `kill` command could not be run.
    #[error("running kill")]
    KillCommand(#[source] io::Error),
    /// SIGKILL could not be sent.
    #[error("sending SIGKILL to the server (pid {pid})")]
    Sigkill {
        /// The server's process id.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `kill` command failed.
    #[error("kill -{signal} {pid} failed: {status}")]
    KillFailed {
        /// The signal's name without `SIG`.
        signal: &'static str,
        /// The server's process id.
        pid: u32,
        /// The exit status of `kill`.
        status: ExitStatus,
    },
    /// Looking at or reaping the child failed.
    #[error("waiting for the server (pid {pid})")]
    Wait {
        /// The server's process id.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server did not exit in time; it has been killed and reaped.
    #[error("the server (pid {pid}) did not exit within {limit:?}; killed")]
    ExitTimeout {
        /// The server's process id.
        pid: u32,
        /// How long it had.
        limit: Duration,
    },
    /// `/proc/PID/status` could not be read.
    #[error("reading {path}")]
    ProcStatus {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/PID/status` lacks a field.
    #[error("no {field}")]
    MissingField {
        /// The field, such as `VmRSS`.
        field: &'static str,
    },
}

impl ProcessError {
    /// What the server wrote to stderr before a failed start: empty for
    /// other errors, and when its stderr was inherited.
    pub fn server_stderr(&self) -> &str {
        match self {
            ProcessError::Stdout { stderr, .. }
            | ProcessError::ExitedEarly { stderr, .. }
            | ProcessError::NotListening { stderr, .. }
            | ProcessError::UnexpectedOutput { stderr, .. } => stderr,
            _ => "",
        }
    }
}

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

    /// A drop of a running server sends `signal` and waits up to `grace`
    /// for the exit (blocking the dropping thread) before SIGKILL, instead
    /// of killing it at once. Also applies when a start fails.
    pub fn stop_on_drop(mut self, signal: Signal, grace: Duration) -> Self {
        self.stop_on_drop = Some((signal, grace));
        self
    }
}

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    /// `VmRSS`, in bytes.
    pub resident: u64,
    /// `VmHWM`, the peak of `VmRSS`, in bytes.
    pub peak_resident: u64,
}

/// The first line of the server's stdout: `None` at end of file.
type FirstLine = Option<io::Result<String>>;

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

/// CPU time the threads of process `pid` have used so far (from
/// `/proc/PID/task/*/schedstat`, nanosecond resolution).
///
/// # Errors
/// `/proc` cannot be read (no such process).
pub fn cpu_time_of(pid: u32) -> Result<Duration, ProcessError> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|source| ProcessError::ProcStatus {
        path: dir.clone(),
        source,
    })?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        // A thread that ended meanwhile has no file any more.
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(Duration::from_nanos(total))
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

/// Waits up to `limit` for `child` to exit; `Ok(None)`, after killing and
/// reaping it, when `limit` passes first.
///
/// # Errors
/// The child cannot be looked at.
pub fn wait_child(child: &mut Child, limit: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// A child's pipe, read to its end on a thread.
#[derive(Debug)]
pub struct CollectedPipe {
    /// Everything read so far; the reader holds the lock only to append.
    buf: Arc<Mutex<Vec<u8>>>,
    /// Receives (or disconnects) once the pipe reached its end.
    done: mpsc::Receiver<()>,
}

impl CollectedPipe {
    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits up to `timeout` for the pipe to reach its end, so that
    /// [`CollectedPipe::text`] is complete.
    pub fn finish(&self, timeout: Duration) {
        let _ = self.done.recv_timeout(timeout);
    }
}

/// Reads `pipe` to its end on a thread.
///
/// # Errors
/// The thread cannot be started.
pub fn collect(mut pipe: impl Read + Send + 'static) -> io::Result<CollectedPipe> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let (tx, done) = mpsc::channel();
    thread::Builder::new()
        .name("collect-pipe".to_string())
        .spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                }
            }
            let _ = tx.send(());
        })?;
    Ok(CollectedPipe { buf, done })
}

/// Sends the first line of `stdout` (or its end) on the returned channel,
/// then keeps reading to the end on the same thread.
fn read_first_line(
    stdout: ChildStdout,
    rest: Arc<Mutex<Vec<String>>>,
) -> io::Result<mpsc::Receiver<FirstLine>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("server-stdout".to_string())
        .spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            drop(tx);
            for line in lines.map_while(Result::ok) {
                let mut rest = rest.lock().unwrap_or_else(|p| p.into_inner());
                // A bounded record: the few lines a server prints at start-up.
                if rest.len() < 64 {
                    rest.push(line);
                }
            }
        })?;
    Ok(rx)
}

/// The address of a `listening on ADDR` line.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

/// The number of a `Key:   123 kB` line of `/proc/PID/status`.
fn proc_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_and_proc_status() {
        assert_eq!(
            parse_listening("listening on 127.0.0.1:4321\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4321)))
        );
        assert_eq!(parse_listening("something else"), None);
        assert_eq!(parse_listening("listening on nowhere"), None);
        let status = "Name:\tagent-lifecycle\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(proc_status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(proc_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(proc_status_kib(status, "VmSwap"), None);
    }

    /// `sh serve --listen ...` fails to open a script named `serve`: it
    /// exits at once, printing only to stderr.
    #[test]
    fn a_binary_that_exits_at_once_is_reported_with_its_stderr() {
        let err = ServerProcess::start(&ServerCommand::new("sh"), Duration::from_secs(30))
            .expect_err("sh prints no address");
        assert!(matches!(err, ProcessError::ExitedEarly { .. }), "{err:?}");
        assert!(err.server_stderr().contains("serve"), "{err:?}");
        let err = ServerProcess::start(
            &ServerCommand::new("/nonexistent/agent-lifecycle"),
            Duration::from_secs(30),
        )
        .expect_err("no such binary");
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err:?}");
    }
}

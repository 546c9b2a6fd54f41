//! Why starting, signalling, waiting for or measuring a server failed.

use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

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

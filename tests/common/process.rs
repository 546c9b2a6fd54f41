//! The real server binary as a child process, for tests: a thin wrapper of
//! the binary's own process helper (`src/cli/process.rs`) that runs this build's `agent-lifecycle` and
//! fails the test, showing the server's stderr, when something goes wrong.

use std::{process::ExitStatus, time::Duration};

/// The binary's process helper, shared with the benchmark tool; not part of
/// the library's API.
#[allow(dead_code)]
#[path = "../../src/cli/process/mod.rs"]
pub mod lib;

use lib::{ServerCommand, Signal};

/// How long the server may take to print its address.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a signalled server may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `agent-lifecycle serve`, with its stderr collected; killed and
/// reaped on drop.
pub struct ServerProcess {
    inner: lib::ServerProcess,
    /// `HOST:PORT`.
    pub addr: String,
}

impl ServerProcess {
    /// `agent-lifecycle serve --listen 127.0.0.1:0 ARGS...`; waits for its
    /// address.
    pub fn start(args: &[&str]) -> ServerProcess {
        Self::start_with_env(args, &[])
    }

    /// [`ServerProcess::start`] with environment variables set for the
    /// server.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let mut command = ServerCommand::new(env!("CARGO_BIN_EXE_agent-lifecycle")).args(args);
        for (key, value) in env {
            command = command.env(*key, *value);
        }
        let inner = lib::ServerProcess::start(&command, STARTUP_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{}\n--- server stderr ---\n{}",
                chain(&e),
                e.server_stderr()
            )
        });
        ServerProcess {
            addr: inner.addr().to_string(),
            inner,
        }
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The `--http-listen` address the server printed, waiting up to
    /// `limit` for it.
    pub fn http_addr(&self, limit: Duration) -> Option<std::net::SocketAddr> {
        self.inner.http_addr(limit)
    }

    /// A connected client.
    pub async fn client(&self) -> super::Client {
        super::connect(&self.url()).await
    }

    /// The server's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        format!("\n--- server stderr ---\n{}", self.inner.stderr_text())
    }

    /// Everything the server wrote to stderr, once it has exited.
    pub fn stderr_after_exit(&self) -> String {
        self.inner.stderr_after_exit(Duration::from_secs(10))
    }

    /// Fails the test, showing the server's stderr, when the server has
    /// exited or one of its threads panicked.
    pub fn assert_running(&mut self) {
        match self.inner.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => panic!("the server exited: {status}{}", self.log()),
            Err(e) => panic!("{}{}", chain(&e), self.log()),
        }
        let log = self.inner.stderr_text();
        assert!(
            !log.contains("panicked"),
            "a server thread panicked{}",
            self.log()
        );
    }

    /// The server's resident memory (VmRSS), in bytes.
    pub fn resident_memory(&self) -> u64 {
        self.inner
            .memory()
            .unwrap_or_else(|e| panic!("{}{}", chain(&e), self.log()))
            .resident
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop(Signal::Terminate)
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded) for the exit.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.stop(Signal::Interrupt)
    }

    fn stop(&mut self, signal: Signal) -> ExitStatus {
        self.inner
            .stop(signal, STOP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}{}", chain(&e), self.log()))
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        self.inner
            .kill()
            .unwrap_or_else(|e| panic!("{}{}", chain(&e), self.log()))
    }

    /// Waits for the exit, failing the test after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        self.inner
            .wait(limit)
            .unwrap_or_else(|e| panic!("{}{}", chain(&e), self.log()))
    }
}

/// Waits for `child` to exit; `None` (after killing it) when `limit` passes.
pub fn wait_child(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    lib::wait_child(child, limit).expect("waiting for a child process")
}

/// Collects `pipe` on a thread.
pub fn collect(pipe: impl std::io::Read + Send + 'static) -> lib::CollectedPipe {
    lib::collect(pipe).expect("starting a pipe reader thread")
}

/// An error and its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

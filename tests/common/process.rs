//! The real server binary as a child process: started on an ephemeral port,
//! its address read from the `listening on ADDR` line, its stderr collected,
//! killed and reaped on drop.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// How long the server may take to print its address.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `agent-lifecycle serve`.
pub struct ServerProcess {
    pub child: Child,
    /// `HOST:PORT`.
    pub addr: String,
    stderr: Collected,
}

impl ServerProcess {
    /// `agent-lifecycle serve --listen 127.0.0.1:0 ARGS...`; waits for its
    /// address.
    pub fn start(args: &[&str]) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the agent-lifecycle server binary");
        let stderr = collect(child.stderr.take().expect("server stderr is piped"));
        let stdout = child.stdout.take().expect("server stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so that a later write never hits a closed pipe.
            for _ in lines {}
        });
        // The guard owns the child from here on, so a failure below kills it.
        let mut server = ServerProcess {
            child,
            addr: String::new(),
            stderr,
        };
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => panic!("reading the server's stdout: {e}{}", server.log()),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.child.wait().ok();
                panic!(
                    "the server exited ({status:?}) before printing its address{}",
                    server.log()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "the server printed no address within {STARTUP_TIMEOUT:?}{}",
                    server.log()
                )
            }
        };
        server.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("expected `listening on ADDR` first on stdout, got {line:?}"))
            .to_owned();
        server
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> super::Client {
        super::connect(&self.url()).await
    }

    /// The server's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        format!("\n--- server stderr ---\n{}", self.stderr.text())
    }

    /// Everything the server wrote to stderr, once it has exited.
    pub fn stderr_after_exit(&self) -> String {
        self.stderr.finish(Duration::from_secs(10));
        self.stderr.text()
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM")
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded) for the exit.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.signal("-INT")
    }

    fn signal(&mut self, signal: &str) -> ExitStatus {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.wait(Duration::from_secs(30))
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.wait(Duration::from_secs(10))
    }

    /// Waits for the exit, failing the test after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        wait_child(&mut self.child, limit)
            .unwrap_or_else(|| panic!("the server did not exit within {limit:?}{}", self.log()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child` to exit; `None` (after killing it) when `limit` passes.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            // Polling the child's exit; this waits for nothing else.
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for a child process: {e}"),
        }
    }
}

/// Reads a child's pipe to its end on a thread.
pub struct Collected {
    buf: Arc<Mutex<Vec<u8>>>,
    /// Receives (or disconnects) once the pipe reached its end.
    done: mpsc::Receiver<()>,
}

impl Collected {
    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits (bounded) until the pipe reached its end, so `text` is complete.
    pub fn finish(&self, timeout: Duration) {
        let _ = self.done.recv_timeout(timeout);
    }
}

/// Collects `pipe` on a thread.
pub fn collect(mut pipe: impl Read + Send + 'static) -> Collected {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let (tx, done) = mpsc::channel();
    thread::spawn(move || {
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
    });
    Collected { buf, done }
}

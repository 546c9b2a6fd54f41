//! Clients that no one here wrote: a Python client generated from the proto
//! with `grpc_tools.protoc`, and the real `grpcurl` binary driven only by
//! server reflection. Each test starts the real server binary on an ephemeral
//! port and runs one script of `tests/python/` against it.
//!
//! The scripts need the packages of `tests/python/requirements.txt` (`.ci/run`
//! installs them into `.venv`). The interpreter is `$AGENT_LIFECYCLE_PYTHON`,
//! else `python3`; `grpcurl` must be on `PATH`. A missing interpreter, package
//! or grpcurl fails these tests: they never skip.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

/// How long the server may take to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one client script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The server child process; killed (and reaped) when dropped.
struct Server {
    child: Child,
    addr: String,
    stderr: Collected,
}

impl Server {
    /// Starts `agent-lifecycle serve` with the memory store on an ephemeral
    /// port and waits for its `listening on ADDR` line.
    fn start() -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
            .args(["serve", "--store", "memory", "--listen", "127.0.0.1:0"])
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
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so that a later write never hits a closed pipe.
            for _ in lines {}
        });
        // The guard owns the child from here on, so a failure below kills it.
        let mut server = Server {
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
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "the server printed no address within {STARTUP_TIMEOUT:?}{}",
                server.log()
            ),
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "expected `listening on ADDR` as the server's first stdout line, got {line:?}"
                )
            })
            .to_owned();
        server.addr = addr;
        server
    }

    /// The server's stderr so far, for failure messages.
    fn log(&self) -> String {
        format!("\n--- server stderr ---\n{}", self.stderr.text())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a child's pipe to its end on a thread.
struct Collected {
    /// The bytes read so far.
    buf: Arc<Mutex<Vec<u8>>>,
    /// Receives (or disconnects) once the pipe reached its end.
    done: mpsc::Receiver<()>,
}

impl Collected {
    /// Everything read so far, as text.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits (bounded) until the pipe reached its end, so `text` is complete.
    fn finish(&self, timeout: Duration) {
        let _ = self.done.recv_timeout(timeout);
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> Collected {
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

/// The Python interpreter: `$AGENT_LIFECYCLE_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("AGENT_LIFECYCLE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_owned())
}

/// Runs `tests/python/<script> ADDR` with a deadline and panics, showing its
/// output and the server's log, unless it exits successfully.
fn run_script(server: &Server, script: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("tests").join("python").join(script);
    let python = python();
    let mut child = Command::new(&python)
        .arg(&path)
        .arg(&server.addr)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python} (set AGENT_LIFECYCLE_PYTHON to a Python 3.11 with \
                 tests/python/requirements.txt installed): {e}"
            )
        });
    let stdout = collect(child.stdout.take().expect("stdout is piped"));
    let stderr = collect(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            // Polling the child's exit; this waits for nothing else.
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {script}: {e}"),
        }
    };
    if status.is_some() {
        // The script exited: its pipes reach their end once the readers drained them.
        stdout.finish(Duration::from_secs(10));
        stderr.finish(Duration::from_secs(10));
    }
    let report = |what: &str| {
        format!(
            "{script} {what}\n--- stdout ---\n{}\n--- stderr ---\n{}{}",
            stdout.text(),
            stderr.text(),
            server.log()
        )
    };
    match status {
        None => panic!("{}", report(&format!("timed out after {SCRIPT_TIMEOUT:?}"))),
        Some(status) if !status.success() => panic!("{}", report(&format!("failed: {status}"))),
        Some(_) => print!("{script}:\n{}", stdout.text()),
    }
}

/// Scenario: a Python client generated from the proto alone registers an
/// agent (and repeats it idempotently), opens WatchEvents from the
/// registration's sequence, drives Deploy, Start, AssignTask, CompleteTask,
/// HandleError, TransitionAgent(ONLINE) and Stop, checks every response,
/// GetAgent, GetAgentHistory, GetLifecycleMetrics and the error codes
/// (NOT_FOUND, FAILED_PRECONDITION, ABORTED, INVALID_ARGUMENT,
/// ALREADY_EXISTS), and finally finds on the stream exactly the agent's
/// transitions, in order, with the sequences the RPCs returned.
#[test]
fn python_client_drives_and_watches_an_agent() {
    let server = Server::start();
    run_script(&server, "client_test.py");
}

/// Scenario: grpcurl, knowing nothing but what reflection tells it, lists the
/// lifecycle, health and reflection services, describes the service,
/// registers an agent with a JSON body and gets JSON back in
/// AGENT_STATE_REGISTERED, sees the service SERVING on grpc.health.v1, gets
/// InvalidArgument / NotFound / FailedPrecondition / Aborted as non-zero
/// exits, and replays the agent's events through the WatchEvents stream.
#[test]
fn grpcurl_lists_services_and_registers_with_json() {
    let server = Server::start();
    run_script(&server, "grpcurl_test.py");
}

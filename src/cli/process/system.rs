//! What the child process helper reads from the system: the child's pipes
//! and exit, and its CPU time and memory from `/proc`.

use std::{
    io::{self, BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, ChildStdout, ExitStatus},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use super::{FirstLine, POLL_INTERVAL, ProcessError};

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    /// `VmRSS`, in bytes.
    pub resident: u64,
    /// `VmHWM`, the peak of `VmRSS`, in bytes.
    pub peak_resident: u64,
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
pub(crate) fn read_first_line(
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
pub(crate) fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

/// The number of a `Key:   123 kB` line of `/proc/PID/status`.
pub(crate) fn proc_status_kib(text: &str, field: &str) -> Option<u64> {
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
    use super::super::{ServerCommand, ServerProcess};
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

//! One client library's scenario program as a child process
//! (clients/python/tests/scenario.py, clients/typescript/test/scenario.ts):
//! lines to its stdin, its stdout read line by line with a deadline.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::common::process::{collect, lib::CollectedPipe, wait_child};

/// How long a scenario waits for one expected line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// A client library, and how its scenario program runs.
#[derive(Clone, Copy, Debug)]
pub enum Lang {
    /// `Client` and its iterator watch.
    Python,
    /// `AsyncClient` and its async-iterator watch.
    PythonAsync,
    /// The TypeScript package, built into clients/typescript/dist.
    TypeScript,
}

/// Every client library the scenarios run.
pub const ALL: [Lang; 3] = [Lang::Python, Lang::PythonAsync, Lang::TypeScript];

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter: `$AGENT_LIFECYCLE_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("AGENT_LIFECYCLE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_owned())
}

/// The built TypeScript scenario program; fails the test, saying how to
/// build it, when it is missing.
pub fn typescript_dist(file: &str) -> PathBuf {
    let path = root().join("clients/typescript/dist").join(file);
    assert!(
        path.exists(),
        "{} is missing: build the TypeScript client first \
         (cd clients/typescript && npm ci && npm run build; scripts/test.sh does)",
        path.display()
    );
    path
}

impl Lang {
    fn command(self, args: &[&str]) -> Command {
        let mut command = match self {
            Lang::Python | Lang::PythonAsync => {
                let mut c = Command::new(python());
                c.arg(root().join("clients/python/tests/scenario.py"));
                c
            }
            Lang::TypeScript => {
                let mut c = Command::new("node");
                c.arg(typescript_dist("test/scenario.js"));
                c
            }
        };
        command.args(args);
        if matches!(self, Lang::PythonAsync) && args.first() == Some(&"watch") {
            command.arg("--async");
        }
        command
    }
}

/// A running scenario program.
pub struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: CollectedPipe,
}

impl Script {
    /// Starts `lang`'s scenario program with `args`.
    pub fn start(lang: Lang, args: &[&str]) -> Script {
        Script::spawn(format!("{lang:?} {}", args.join(" ")), lang.command(args))
    }

    /// Starts `command` (in the repository's root), named `name` in failure
    /// messages.
    pub fn spawn(name: String, mut command: Command) -> Script {
        let mut child = command
            .current_dir(root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {name} ({e}): set AGENT_LIFECYCLE_PYTHON to a Python with \
                     clients/python installed, and have node on PATH (scripts/test.sh does both)"
                )
            });
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = collect(child.stderr.take().expect("stderr is piped"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Script {
            name,
            child,
            stdin,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}", self.report(&format!("cannot write {line:?}: {e}"))));
    }

    /// Waits for a line that `matches`, returning it; fails the test,
    /// showing everything the program wrote, after [`LINE_TIMEOUT`].
    pub fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::task::block_in_place(|| self.lines.recv_timeout(left));
            match line {
                Ok(line) => {
                    self.seen.push(line.clone());
                    assert!(!line.starts_with("error "), "{}", self.report("failed"));
                    if matches(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}",
                        self.report(&format!("no {what} within {LINE_TIMEOUT:?}"))
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{}", self.report(&format!("ended before {what}")))
                }
            }
        }
    }

    /// Waits until an event at or past `sequence` was printed.
    pub fn wait_for_event(&mut self, sequence: u64) {
        let seen = self.events().last().copied().unwrap_or(0);
        if seen >= sequence {
            return;
        }
        self.wait_for(&format!("event {sequence}"), |line| {
            event_sequence(line).is_some_and(|s| s >= sequence)
        });
    }

    /// The sequences of the events printed so far, in order.
    pub fn events(&self) -> Vec<u64> {
        self.seen.iter().filter_map(|l| event_sequence(l)).collect()
    }

    /// Waits for the program to exit successfully (after reading what it
    /// printed last).
    pub fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = tokio::task::block_in_place(|| wait_child(&mut self.child, LINE_TIMEOUT));
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        match status {
            Some(status) if status.success() => self.seen.clone(),
            Some(status) => panic!("{}", self.report(&format!("exited with {status}"))),
            None => panic!("{}", self.report("did not exit")),
        }
    }

    fn report(&self, what: &str) -> String {
        self.stderr.finish(Duration::from_secs(1));
        format!(
            "{}: {what}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr.text()
        )
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sequence of an `event SEQ AGENT STATE` line.
pub fn event_sequence(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    (words.next() == Some("event")).then_some(())?;
    words.next()?.parse().ok()
}

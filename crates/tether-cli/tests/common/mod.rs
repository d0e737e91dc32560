//! Spawning `tether serve` (and the services it needs) for the end-to-end tests, and reading
//! child processes with deadlines: a regression that loses a line fails in seconds with a
//! message naming what was awaited, instead of hanging the test run.

#![allow(dead_code)]

use serde_json::Value as Json;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// How long any one awaited thing (a line, a process exit, a network outcome) may take. Far
/// above what a loaded 2-core machine needs; only a lost message ever reaches it.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The lines of a child's output, read on a helper thread so every read can have a deadline.
/// The thread drains the pipe to its end even after this is dropped, so the child never
/// blocks on (or dies writing to) a full or closed pipe.
pub struct LineReader {
    rx: mpsc::Receiver<String>,
    name: String,
}

impl LineReader {
    pub fn new(name: &str, out: impl Read + Send + 'static) -> LineReader {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        LineReader {
            rx,
            name: name.to_owned(),
        }
    }

    /// The next line, or `None` once the output ended; fails the test naming `what` if
    /// neither happens within `limit`.
    pub fn next_within(&mut self, limit: Duration, what: &str) -> Option<String> {
        match self.rx.recv_timeout(limit) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!(
                "timed out after {limit:?} waiting for {what} on {}",
                self.name
            ),
        }
    }

    /// The next line, which must arrive within [`DEADLINE`].
    pub fn line(&mut self, what: &str) -> String {
        self.next_within(DEADLINE, what)
            .unwrap_or_else(|| panic!("{} ended while waiting for {what}", self.name))
    }

    /// The next line as JSON.
    pub fn json(&mut self, what: &str) -> Json {
        let line = self.line(what);
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{what} on {}: not JSON ({e}): {line:?}", self.name))
    }

    /// Skips lines until one satisfies `pred` and returns it.
    pub fn find(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let give_up = Instant::now() + DEADLINE;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.next_within(left, what) {
                Some(line) if pred(&line) => return line,
                Some(_) => {}
                None => panic!("{} ended while waiting for {what}", self.name),
            }
        }
    }

    /// Every remaining line, until the output ends (within [`DEADLINE`] in all).
    pub fn rest(&mut self, what: &str) -> Vec<String> {
        let give_up = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        while let Some(line) =
            self.next_within(give_up.saturating_duration_since(Instant::now()), what)
        {
            lines.push(line);
        }
        lines
    }
}

/// Waits for `child` to exit; kills it and fails the test naming `what` after `limit`.
/// (std has no wait with a timeout; polling `try_wait` keeps the child ours to kill.)
pub fn wait_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let give_up = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= give_up {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {limit:?} waiting for {what} to exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` to completion like `Command::output`, but kills it and fails the test naming
/// `what` if it has not finished within `limit`.
pub fn run_within(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read_all = |mut out: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let status = wait_within(&mut child, limit, what);
    // The pipes end with the process; the deadline only guards against a stray holder.
    let collect = |rx: mpsc::Receiver<Vec<u8>>, which: &str| {
        rx.recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("{what}: {which} did not end after the process exited"))
    };
    Output {
        status,
        stdout: collect(stdout, "stdout"),
        stderr: collect(stderr, "stderr"),
    }
}

/// [`run_within`] with [`DEADLINE`].
pub fn run(cmd: &mut Command, what: &str) -> Output {
    run_within(cmd, DEADLINE, what)
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Asks the process to stop (SIGTERM) and waits for it (within [`DEADLINE`]); returns
    /// whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        sent.is_ok_and(|s| s.success())
            && wait_within(&mut self.0, DEADLINE, "a terminated process").success()
    }

    /// Its stdout as lines with deadlines.
    pub fn stdout_lines(&mut self, name: &str) -> LineReader {
        let out: ChildStdout = self.0.stdout.take().expect("stdout is piped");
        LineReader::new(name, out)
    }
}

/// A started `tether serve`: the process, its first stdout line, and its log when asked for.
pub struct Served {
    pub proc: Proc,
    /// The first line: `{"ready":true,…}`, or `{"error":…}` when it could not start.
    pub first: Json,
    pub stdout: LineReader,
    /// Its stderr (the tracing log), when started with [`spawn_serve`]'s `log`.
    pub log: Option<LineReader>,
}

/// Starts `tether serve ARGS…` and reads its first line, whatever it says.
pub fn spawn_serve(args: &[&str], log: bool) -> Served {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if log {
        // A known level, whatever the caller's environment says.
        cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    } else {
        cmd.stderr(Stdio::null());
    }
    let mut proc = Proc(cmd.spawn().expect("cannot start tether serve"));
    let log = log.then(|| LineReader::new("serve's log", proc.0.stderr.take().unwrap()));
    let mut stdout = proc.stdout_lines("serve's stdout");
    let first = stdout.json("serve's ready line");
    Served {
        proc,
        first,
        stdout,
        log,
    }
}

/// Starts `tether serve ARGS…` and returns it with its JSON ready line.
pub fn serve(args: &[&str]) -> (Proc, Json) {
    let served = spawn_serve(args, false);
    assert_eq!(
        served.first["ready"], true,
        "serve did not start: {}",
        served.first
    );
    (served.proc, served.first)
}

/// A free loopback TCP port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a throwaway `redis-server` on a free port (no persistence) and waits until it
/// accepts connections. Returns it and its URL.
pub fn redis() -> (Proc, String) {
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is not installed (.ci/run installs it)");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    // The reader keeps draining its log so redis never writes into a closed pipe.
    LineReader::new("redis-server", stdout).find("redis-server ready", |l| {
        l.contains("Ready to accept connections")
    });
    (proc, format!("redis://127.0.0.1:{port}"))
}

//! Accept-level abuse against the real `tether serve` (issue 17, item 5): every listener kind
//! (tcp, tls, unix, ws, wss, conductor) keeps accepting after running out of file descriptors
//! (`prlimit` lowers the limit of the server process only), and `--handshake-timeout` cuts
//! slowloris sockets on every kind while a normal client still gets answers.

mod common;

use common::{run, LineReader, Proc, BIN, DEADLINE};
use serde_json::Value as Json;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KINDS: [&str; 6] = ["tcp", "tls", "unix", "ws", "wss", "conductor"];

struct Certs {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn certs() -> Certs {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Certs { dir, cert, key }
}

/// A `tether serve` on every listener kind, its ready line's addresses and its log.
struct Serve {
    _proc: Proc,
    ready: Json,
    log: LineReader,
    _certs: Certs,
}

impl Serve {
    fn addr(&self, kind: &str) -> String {
        self.ready[kind][0]
            .as_str()
            .unwrap_or_else(|| panic!("no {kind} listener in {}", self.ready))
            .to_owned()
    }

    /// Calls `calculator.answer` (or the conductor's `answer`) with the CLI; `true` if it
    /// printed 42.
    fn answers(&self, kind: &str) -> bool {
        let addr = self.addr(kind);
        let out = match kind {
            "conductor" => run(
                Command::new(BIN).args(["conductor", "call", &format!("ws://{addr}"), "answer"]),
                "tether conductor call",
            ),
            _ => {
                let url = match kind {
                    "tcp" => format!("jstp://{addr}"),
                    "tls" => format!("jstps://{addr}"),
                    "unix" => format!("unix:{addr}"),
                    "ws" => format!("ws://{addr}"),
                    _ => format!("wss://{addr}"),
                };
                run(
                    Command::new(BIN).args([
                        "call",
                        &url,
                        "testApp",
                        "calculator",
                        "answer",
                        "--insecure",
                    ]),
                    &format!("tether call {url}"),
                )
            }
        };
        String::from_utf8_lossy(&out.stdout).contains("42")
    }
}

/// Starts `tether serve` on all six kinds (under `prlimit --nofile=N` when `nofile` is set),
/// logging at `log` level.
fn serve_all(handshake_ms: u64, nofile: Option<u32>, log: &str) -> Serve {
    let certs = certs();
    let sock = certs.dir.path().join("serve.sock");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let handshake = handshake_ms.to_string();
    cmd.arg("serve")
        .args([
            "--tcp",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
        ])
        .args(["--wss", "127.0.0.1:0", "--conductor", "127.0.0.1:0"])
        .arg("--unix")
        .arg(&sock)
        .arg("--cert")
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key)
        .args(["--handshake-timeout", &handshake])
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = Proc(
        cmd.spawn()
            .expect("cannot start tether serve (is prlimit installed?)"),
    );
    let log = LineReader::new("serve's log", proc.0.stderr.take().unwrap());
    let ready = proc
        .stdout_lines("serve's stdout")
        .json("serve's ready line");
    assert_eq!(ready["ready"], true, "serve did not start: {ready}");
    Serve {
        _proc: proc,
        ready,
        log,
        _certs: certs,
    }
}

/// A raw socket to a listener (TCP, or the Unix socket), with [`DEADLINE`] on reads.
enum Raw {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Raw {
    fn connect(serve: &Serve, kind: &str) -> Raw {
        let addr = serve.addr(kind);
        let raw = if kind == "unix" {
            Raw::Unix(UnixStream::connect(Path::new(&addr)).unwrap())
        } else {
            Raw::Tcp(TcpStream::connect(&addr).unwrap())
        };
        match &raw {
            Raw::Tcp(s) => s.set_read_timeout(Some(DEADLINE)).unwrap(),
            Raw::Unix(s) => s.set_read_timeout(Some(DEADLINE)).unwrap(),
        }
        raw
    }

    fn write(&mut self, bytes: &[u8]) {
        let _ = match self {
            Raw::Tcp(s) => s.write_all(bytes),
            Raw::Unix(s) => s.write_all(bytes),
        };
    }

    /// Waits (up to [`DEADLINE`]) for the server to close; fails the test if it sends bytes
    /// or never closes.
    fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 256];
        loop {
            let read = match self {
                Raw::Tcp(s) => s.read(&mut buf),
                Raw::Unix(s) => s.read(&mut buf),
            };
            match read {
                Ok(0) => return,
                // The TLS/HTTP layer may answer the partial input (an alert, a 4xx) first.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("{what}: not closed within {DEADLINE:?}: {e}"),
            }
        }
    }
}

/// Half of what each kind expects first: the start of a TLS ClientHello, of an HTTP upgrade
/// request, or of a JSTP handshake; never finished.
fn partial_handshake(kind: &str) -> &'static [u8] {
    match kind {
        "tls" | "wss" => &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
        "ws" | "conductor" => b"GET / HTTP/1.1\r\nHost: x\r\n",
        _ => b"{handshake:[0,'testApp'",
    }
}

#[test]
fn slowloris_is_cut_at_the_handshake_timeout_on_every_listener_kind() {
    // The flag is 300 ms; TLS and WebSocket listeners used a fixed 10 s before, and the
    // conductor none at all.
    let mut serve = serve_all(300, None, "warn,tether=debug");
    let mut slow = Vec::new();
    for kind in KINDS {
        for _ in 0..10 {
            let mut s = Raw::connect(&serve, kind);
            s.write(partial_handshake(kind));
            slow.push((kind, s));
        }
    }
    for kind in KINDS {
        assert!(serve.answers(kind), "a normal {kind} client got no answer");
    }
    for (kind, s) in &mut slow {
        s.expect_closed(&format!("a slowloris {kind} socket"));
    }
    // Every cut names the configured deadline, none the old fixed 10 s. (Lines for the TLS,
    // WS, WSS and conductor listeners come from the floor; JSTP's own handshake deadline
    // closes the TCP and Unix ones.)
    let mut floor_cuts = 0;
    while floor_cuts < 40 {
        let line = serve.log.find("a handshake-deadline log line", |l| {
            l.contains("not finished within")
        });
        assert!(line.contains("within 300ms"), "{line}");
        floor_cuts += 1;
    }
    for kind in KINDS {
        assert!(
            serve.answers(kind),
            "a normal {kind} client got no answer afterwards"
        );
    }
}

#[test]
fn every_listener_kind_accepts_again_after_running_out_of_file_descriptors() {
    // 64 descriptors: the six listeners, the runtime and a few dozen connections.
    let mut serve = serve_all(600_000, Some(64), "warn");
    // Hold plain TCP connections until accepting fails for want of descriptors.
    let mut pressure = Vec::new();
    for _ in 0..80 {
        pressure.push(Raw::connect(&serve, "tcp"));
    }
    serve
        .log
        .find("the tcp listener running out of descriptors", |l| {
            l.contains("accept failed")
        });
    // While nothing is left, each other listener meets the same error on its next accept.
    let mut waiting = Vec::new();
    for kind in &KINDS[1..] {
        let addr = serve.addr(kind);
        waiting.push(Raw::connect(&serve, kind));
        serve
            .log
            .find(&format!("the {kind} listener's accept error"), |l| {
                l.contains("accept failed") && l.contains(addr.as_str())
            });
    }
    // Pressure ends: the server sees the connections close and frees their descriptors.
    drop(pressure);
    drop(waiting);
    for kind in KINDS {
        assert!(
            serve.answers(kind),
            "{kind} listener no longer answers after EMFILE"
        );
    }
}

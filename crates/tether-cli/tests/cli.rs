//! The `tether` binary end to end: `serve` on every transport, then `call`, `inspect` and
//! `listen` against it as separate processes, plus the errors a user sees for bad flags.

mod common;

use common::{run, wait_within, LineReader, Proc, BIN, DEADLINE};
use serde_json::{json, Value as Json};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A running `tether serve`, killed on drop.
struct Serve {
    proc: Proc,
    ready: Json,
    _dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Serve {
    fn start(extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let sock = dir.path().join("tether.sock");
        let child = Command::new(BIN)
            .args(["serve", "--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"])
            .args(["--tls", "127.0.0.1:0", "--wss", "127.0.0.1:0"])
            .arg("--unix")
            .arg(&sock)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut proc = Proc(child);
        let ready = proc.stdout_lines("serve").json("serve's ready line");
        assert_eq!(ready["ready"], true, "{ready}");
        Serve {
            proc,
            ready,
            _dir: dir,
            ca: cert,
        }
    }

    fn url(&self, kind: &str) -> String {
        let addr = self.ready[kind][0].as_str().unwrap();
        match kind {
            "tcp" => format!("jstp://{addr}"),
            "tls" => format!("jstps://{addr}"),
            "ws" => format!("ws://{addr}"),
            "wss" => format!("wss://{addr}"),
            "unix" => format!("unix:{addr}"),
            _ => unreachable!(),
        }
    }

    /// Runs a client subcommand against `kind`, trusting the server's certificate.
    fn client(&self, sub: &str, kind: &str, rest: &[&str]) -> Output {
        run(
            Command::new(BIN)
                .arg(sub)
                .arg(self.url(kind))
                .args(rest)
                .arg("--ca")
                .arg(&self.ca),
            &format!("tether {sub} over {kind} {rest:?}"),
        )
    }
}

fn stdout_json(out: &Output) -> Json {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

const KINDS: [&str; 5] = ["tcp", "tls", "unix", "ws", "wss"];

#[test]
fn call_and_inspect_over_every_transport() {
    let serve = Serve::start(&[]);
    for kind in KINDS {
        let out = serve.client(
            "call",
            kind,
            &["testApp", "calculator", "divide", "20", "10"],
        );
        assert!(out.status.success(), "{kind}: {out:?}");
        assert_eq!(stdout_json(&out), json!([2]), "{kind}");

        let out = serve.client("call", kind, &["testApp", "someService", "sayHi", "'Rust'"]);
        assert_eq!(stdout_json(&out), json!(["Hi, Rust!"]), "{kind}");

        let out = serve.client("inspect", kind, &["testApp@^1.0.0", "calculator"]);
        assert!(out.status.success(), "{kind}: {out:?}");
        assert_eq!(
            stdout_json(&out),
            json!(["answer", "divide", "doNothing"]),
            "{kind}"
        );
    }
}

#[test]
fn remote_errors_exit_1_with_their_code() {
    let serve = Serve::start(&[]);
    let cases: [(&[&str], i64); 4] = [
        (&["testApp", "calculator", "divide", "1", "0"], 1),
        (&["otherApp", "calculator", "answer"], 10),
        (&["testApp", "nope", "answer"], 12),
        (&["testApp", "calculator", "nope"], 14),
    ];
    for (args, code) in cases {
        let out = serve.client("call", "tcp", args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(stdout_json(&out)["error"]["code"], code, "{args:?}");
    }
    let out = serve.client("call", "ws", &["testApp", "calculator", "divide", "1", "0"]);
    assert_eq!(
        stdout_json(&out)["error"]["message"],
        "Error: Zero division"
    );
}

#[test]
fn users_log_in_and_wrong_passwords_get_11() {
    let serve = Serve::start(&["--user", "alice:secret", "--user", "bob:hunter2"]);
    let ok = serve.client(
        "call",
        "tls",
        &["testApp", "calculator", "answer", "--login", "bob:hunter2"],
    );
    assert_eq!(stdout_json(&ok), json!([42]));
    let bad = serve.client(
        "call",
        "wss",
        &["testApp", "calculator", "answer", "--login", "alice:wrong"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(stdout_json(&bad)["error"]["code"], 11);
}

#[test]
fn listen_prints_chat_broadcasts_from_other_clients() {
    let serve = Serve::start(&["--user", "alice:pw"]);
    let mut listeners: Vec<(Proc, LineReader)> = ["tcp", "ws"]
        .iter()
        .map(|kind| {
            let child = Command::new(BIN)
                .args([
                    "listen",
                    &serve.url(kind),
                    "testApp",
                    "chat",
                    "--count",
                    "2",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut child = Proc(child);
            let mut lines = child.stdout_lines(&format!("listen over {kind}"));
            assert_eq!(lines.json("the listening line")["listening"], true);
            (child, lines)
        })
        .collect();

    let out = serve.client(
        "call",
        "unix",
        &["testApp", "chat", "send", "'hello'", "--login", "alice:pw"],
    );
    assert_eq!(stdout_json(&out), json!([]));
    let out = serve.client(
        "call",
        "wss",
        &["testApp", "chat", "send", "anonymous words"],
    );
    assert_eq!(stdout_json(&out), json!([]));

    for (child, lines) in &mut listeners {
        assert_eq!(
            lines.json("alice's chat message"),
            json!({"interface": "chat", "event": "message", "args": ["alice", "hello"]})
        );
        assert_eq!(
            lines.json("the anonymous chat message"),
            json!({"interface": "chat", "event": "message", "args": [null, "anonymous words"]})
        );
        assert!(wait_within(&mut child.0, DEADLINE, "listen --count 2").success());
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let tether = |args: &[&str]| run(Command::new(BIN).args(args), &format!("tether {args:?}"));

    let out = tether(&["serve", "--tls", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert"));

    let out = tether(&["serve", "--user", "nopassword"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME:PASSWORD"));

    let out = tether(&["serve", "--tcp", "not an address"]);
    assert_eq!(out.status.code(), Some(2));

    let out = tether(&["serve", "--heartbeat", "soon"]);
    assert_eq!(out.status.code(), Some(2));

    let out = tether(&[
        "call",
        "http://127.0.0.1:1",
        "testApp",
        "calculator",
        "answer",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}

#[cfg(unix)]
#[test]
fn serve_shuts_down_cleanly_on_sigterm() {
    let mut serve = Serve::start(&[]);
    assert!(
        serve.proc.terminate(),
        "serve did not exit cleanly on SIGTERM"
    );
}

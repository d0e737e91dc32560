//! `tether http`: `get`/`post` against Debian's lua-http server (HTTP/1.1, HTTP/2 by prior
//! knowledge, TLS with --ca and --insecure, bodies from stdin and files, --timeout), and
//! `tether http serve DIR` against curl and lua-http's client (HTTP/1.1, h2c, TLS with ALPN).

mod common;

use common::{run, LineReader, Proc, BIN};
use serde_json::Value as Json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Certs {
        _dir: dir,
        cert,
        key,
    }
}

fn lua(args: &[&str]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/lua/http-peer.lua");
    // Debian ships lua-http's pure-Lua dependencies for Lua 5.1/5.2 only; they work on 5.3.
    let path = "/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua;\
                /usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";
    let mut cmd = Command::new("lua5.3");
    cmd.arg(script).args(args).env("LUA_PATH", path);
    cmd
}

/// Starts lua-http's server (TLS with `tls`) and returns it with its port.
fn lua_server(tls: Option<&Certs>) -> (Proc, u64) {
    let mut cmd = lua(&["server"]);
    if let Some(c) = tls {
        cmd.arg(&c.cert).arg(&c.key);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("lua5.3 is not installed (.ci/run installs lua-http)");
    let mut proc = Proc(child);
    let ready = proc.stdout_lines("lua server").json("lua's ready line");
    let port = ready["port"].as_u64().expect("a port");
    (proc, port)
}

fn tether(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("http").args(args);
    cmd
}

/// The output of a spawned child, failing the test if it has not ended within the deadline.
fn wait_output(child: std::process::Child, what: &str) -> Output {
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(common::DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("timed out waiting for {what}")
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `tether http get`/`post` against lua-http's server, over HTTP/1.1 and HTTP/2 (prior
/// knowledge): the body goes to stdout, `-i` prints the head to stderr, a POST body comes
/// from stdin or a file.
#[test]
fn get_and_post_against_lua_http() {
    let (_server, port) = lua_server(None);
    let base = format!("http://127.0.0.1:{port}");
    for (flags, version) in [(vec![], "1.1"), (vec!["--http2"], "2")] {
        let mut args = vec!["get", "-i"];
        args.extend(&flags);
        let url = format!("{base}/a?b=1");
        args.push(&url);
        let out = run(&mut tether(&args), "tether http get");
        assert_eq!(ok(&out), "lua GET /a?b=1 ");
        let head = text(&out.stderr);
        assert!(head.starts_with(&format!("HTTP/{version} 200")), "{head}");
        assert!(head.contains("x-peer: lua-http"), "{head}");

        let mut args = vec!["post"];
        args.extend(&flags);
        let url = format!("{base}/p");
        args.push(&url);
        let mut child = tether(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from stdin").unwrap();
        drop(stdin);
        let out = wait_output(child, "tether http post from stdin");
        assert_eq!(ok(&out), "lua POST /p from stdin");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("body");
        std::fs::write(&file, vec![b'f'; 100_000]).unwrap();
        let mut args = vec!["post", "--data", file.to_str().unwrap()];
        args.extend(&flags);
        args.push(&url);
        let out = run(
            tether(&args).stdin(Stdio::null()),
            "tether http post --data",
        );
        assert_eq!(ok(&out), format!("lua POST /p {}", "f".repeat(100_000)));
    }
}

/// Over TLS: trusting the server's certificate with --ca (ALPN picks HTTP/2, or HTTP/2 only
/// with --http2), or not checking it with --insecure; trusting nothing fails with a message
/// about TLS and status 1.
#[test]
fn get_over_tls_against_lua_http() {
    let certs = certs();
    let (_server, port) = lua_server(Some(&certs));
    let url = format!("https://127.0.0.1:{port}/secure");
    let ca = certs.cert.to_str().unwrap();
    for args in [
        vec!["get", "-i", "--ca", ca, &url],
        vec!["get", "-i", "--http2", "--ca", ca, &url],
        vec!["get", "-i", "--insecure", &url],
    ] {
        let out = run(&mut tether(&args), "tether http get over TLS");
        assert_eq!(ok(&out), "lua GET /secure ", "{args:?}");
        assert!(text(&out.stderr).starts_with("HTTP/2 200"), "{args:?}");
    }
    let out = run(
        &mut tether(&["get", &url]),
        "tether http get, trusting nothing",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("TLS"), "{}", text(&out.stderr));
}

/// `--timeout` bounds a request to a server that never answers (a listener that never
/// accepts: the connection waits in its backlog); bad usage exits 2.
#[test]
fn timeout_and_usage_errors() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", silent.local_addr().unwrap());
    let out = run(
        &mut tether(&["get", "--timeout", "300", &url]),
        "tether http get --timeout",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &mut tether(&["get", "-H", "no colon", &url]),
        "tether http get -H without a colon",
    );
    assert_eq!(out.status.code(), Some(2));
}

/// A running `tether http serve` on a directory with files, with TLS on the same port.
struct Served {
    proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
    certs: Certs,
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/b.json"), "{\"b\":1}").unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    let certs = certs();
    let child = tether(&["serve", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&certs.cert)
        .arg("--key")
        .arg(&certs.key)
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let mut lines: LineReader = proc.stdout_lines("tether http serve");
    let ready: Json = lines.json("the ready line");
    let addr = ready["listening"].as_str().expect("an address").to_owned();
    Served {
        proc,
        addr,
        _dir: dir,
        certs,
    }
}

fn curl(args: &[&str]) -> Output {
    run(
        Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args),
        "curl",
    )
}

/// curl against `tether http serve`: files with their types over HTTP/1.1, h2c and TLS
/// (ALPN h2), `/` serves index.html, HEAD gives the length without a body, a missing file
/// is 404, a path leaving the directory 400, POST 405; a 3 MiB file arrives whole; SIGTERM
/// stops the server cleanly.
#[test]
fn serve_against_curl() {
    let mut served = serve();
    let base = format!("http://{}", served.addr);
    let tls = format!(
        "https://localhost:{}",
        served.addr.rsplit(':').next().unwrap()
    );
    let ca = served.certs.cert.to_str().unwrap().to_owned();
    let fmt = "|%{http_code}|%{content_type}|%{http_version}";
    for (flags, version) in [
        (vec!["--http1.1"], "1.1"),
        (vec!["--http2-prior-knowledge"], "2"),
    ] {
        for (path, expected) in [
            ("/a.txt", "alpha|200|text/plain; charset=utf-8"),
            ("/", "<h1>home</h1>|200|text/html; charset=utf-8"),
            ("/sub/b.json", "{\"b\":1}|200|application/json"),
            ("/missing", "not found\n|404|text/plain; charset=utf-8"),
        ] {
            let url = format!("{base}{path}");
            let mut args = flags.clone();
            args.extend(["-w", fmt, &url]);
            assert_eq!(
                ok(&curl(&args)),
                format!("{expected}|{version}"),
                "{args:?}"
            );
        }
    }
    let tls_url = format!("{tls}/a.txt");
    let out = curl(&["--cacert", &ca, "-w", fmt, &tls_url]);
    assert_eq!(ok(&out), "alpha|200|text/plain; charset=utf-8|2");
    let escape = format!("{base}/../../etc/passwd");
    let out = curl(&[
        "--path-as-is",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &escape,
    ]);
    assert_eq!(ok(&out), "400");
    let post = format!("{base}/a.txt");
    let out = curl(&["-d", "x", "-w", "%{http_code}", "-o", "/dev/null", &post]);
    assert_eq!(ok(&out), "405");
    let head = curl(&["-I", &post]);
    let head = ok(&head).to_ascii_lowercase();
    assert!(head.contains("content-length: 5"), "{head}");
    let big = format!("{base}/big.bin");
    let out = curl(&["--http2-prior-knowledge", &big]);
    assert!(out.status.success());
    assert_eq!(out.stdout, vec![7u8; 3 * 1024 * 1024]);
    assert!(
        served.proc.terminate(),
        "tether http serve did not stop cleanly"
    );
}

/// lua-http's client against `tether http serve`, over HTTP/1.1, HTTP/2 and TLS.
#[test]
fn serve_against_lua_http() {
    let served = serve();
    let port = served.addr.rsplit(':').next().unwrap().to_owned();
    for (url, version) in [
        (format!("http://127.0.0.1:{port}/a.txt"), "1.1"),
        (format!("http://127.0.0.1:{port}/a.txt"), "2"),
        (format!("https://127.0.0.1:{port}/a.txt"), "2"),
        (format!("https://127.0.0.1:{port}/a.txt"), "1.1"),
    ] {
        let out = run(&mut lua(&["get", &url, version]), "lua-http's GET");
        let got: Json = serde_json::from_str(ok(&out).trim()).unwrap();
        assert_eq!(got["status"], 200, "{url} {version}: {got}");
        assert_eq!(got["body"], "alpha");
        assert_eq!(got["type"], "text/plain; charset=utf-8");
        // lua prints the connection's version as a string (`1.1`, `2` or `2.0`).
        let got_version = got["version"].as_str().and_then(|v| v.parse::<f64>().ok());
        assert_eq!(got_version, Some(version.parse().unwrap()), "{got}");
    }
    drop(served);
}

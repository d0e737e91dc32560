//! Session restore against the real `@metarhia/jstp@2.3.0` (interop/jstp-peer.js), both ways,
//! over every transport: their client drops its transport and restores on our server; our
//! client is dropped by their server, restores there, gets its offline call answered once and
//! the event their server emitted while we were away.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it).

use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::reconnect::Backoff;
use tether::transport::{server_config, ListenerOptions};
use tether::{connect, ClientOptions, ConnectionEvent, Server, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

fn node_peer(args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/@metarhia/jstp").exists(),
        "interop/node_modules is missing: run `npm ci --ignore-scripts` in interop/"
    );
    let mut child = Command::new("node")
        .arg(dir.join("jstp-peer.js"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is not installed");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<Json> {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the node peer went silent")
        .unwrap()?;
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
}

/// A throwaway certificate for the TLS and WSS listeners.
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

const KINDS: [&str; 5] = ["tcp", "tls", "unix", "ws", "wss"];

fn url(kind: &str, addr: &str) -> String {
    match kind {
        "tcp" => format!("jstp://{addr}"),
        "tls" => format!("jstps://{addr}"),
        "unix" => format!("unix:{addr}"),
        "ws" => format!("ws://{addr}"),
        "wss" => format!("wss://{addr}"),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_restores_its_session_on_our_server() {
    let certs = certs();
    let chat = ChatHub::new();
    let tls = server_config(&certs.cert, &certs.key).unwrap();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .listener_options(ListenerOptions::default().with_tls(tls))
        .build()
        .unwrap();
    chat.bind(&server);
    let sock = certs.dir.path().join("tether.sock");
    let mut urls = Vec::new();
    for kind in KINDS {
        let endpoint = match kind {
            "unix" => format!("unix:{}", sock.display()),
            other => url(other, "127.0.0.1:0"),
        };
        let addr = server.listen(endpoint.parse().unwrap()).await.unwrap();
        urls.push((kind, url(kind, &addr)));
    }
    let mut events = server.events();
    for (kind, url) in urls {
        let (_node, mut lines) = node_peer(&["client", &url, "restore", "--strict"]);
        let mut steps = Vec::new();
        while let Some(line) = next_json(&mut lines).await {
            if line.get("done").is_some() || line.get("fatal").is_some() {
                assert_eq!(line["done"], true, "{kind}: {line}");
                break;
            }
            assert_ne!(line["pass"], false, "{kind}: {line}");
            steps.push(line["step"].as_str().unwrap_or_default().to_owned());
        }
        for step in [
            "answer",
            "drop",
            "reconnect",
            "bufferedCall",
            "answerAfter",
            "sameSession",
        ] {
            assert!(
                steps.iter().any(|s| s == step),
                "{kind}: no {step} in {steps:?}"
            );
        }
        // Our server saw the restore.
        loop {
            match events.recv().await.unwrap() {
                tether::ServerEvent::RestoreSession(_) => break,
                _ => continue,
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_restores_its_session_on_their_server() {
    let certs = certs();
    let sock = certs.dir.path().join("peer.sock");
    let (_node, mut lines) = node_peer(&[
        "server",
        "--tcp",
        "0",
        "--tls",
        "0",
        "--ws",
        "0",
        "--wss",
        "0",
        "--unix",
        sock.to_str().unwrap(),
        "--cert",
        certs.cert.to_str().unwrap(),
        "--key",
        certs.key.to_str().unwrap(),
    ]);
    let ready = next_json(&mut lines).await.expect("no ready line");
    assert_eq!(ready["ready"], true);
    // Drain the server's event lines so its stdout never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    for kind in KINDS {
        let addr = match kind {
            "unix" => ready["unix"].as_str().unwrap().to_owned(),
            other => format!("127.0.0.1:{}", ready[other]),
        };
        let mut options = ClientOptions::default().reconnector(Backoff::fixed_range(
            Duration::from_millis(300),
            Duration::from_millis(300),
        ));
        options.transport.tls.insecure = true;
        let conn = connect(&url(kind, &addr), "testApp@1.0.0", options)
            .await
            .unwrap();
        let session = conn.session_id();
        let mut events = conn.events();
        assert_eq!(
            conn.call("calculator", "answer", vec![]).await.unwrap(),
            vec![Value::from(42)],
            "{kind}"
        );
        // Their server emits to this connection 100 ms from now, while the transport is down
        // (our reconnect waits 300 ms), then drops the transport.
        conn.call(
            "control",
            "emitLater",
            vec![
                "chat".into(),
                "late".into(),
                Value::from(vec![Value::from(kind)]),
                100.into(),
            ],
        )
        .await
        .unwrap();
        conn.call("control", "drop", vec![]).await.unwrap();
        // Wait until the drop is seen, then call while offline.
        loop {
            if let ConnectionEvent::ReconnectAttempt { .. } = events.recv().await.unwrap() {
                break;
            }
        }
        let offline = {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.call("someService", "say", vec!["offline".into()])
                    .await
            })
        };
        let mut restored = false;
        let mut late = 0;
        while !(restored && late == 1) {
            match tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("no restore")
                .unwrap()
            {
                ConnectionEvent::Reconnect { error: None } => restored = true,
                ConnectionEvent::Reconnect { error: Some(e) } => panic!("{kind}: {e}"),
                ConnectionEvent::Event { iface, event, args } if event == "late" => {
                    assert_eq!(iface, "chat");
                    assert_eq!(args, vec![Value::from(kind)]);
                    late += 1;
                }
                _ => {}
            }
        }
        assert_eq!(
            offline.await.unwrap().unwrap(),
            vec![Value::from("offline")],
            "{kind}"
        );
        assert_eq!(conn.session_id(), session, "{kind}");
        // A round trip after the restore; the late event came exactly once.
        assert_eq!(
            conn.call("calculator", "answer", vec![]).await.unwrap(),
            vec![Value::from(42)]
        );
        while let Ok(ev) = events.try_recv() {
            if let ConnectionEvent::Event { event, .. } = ev {
                assert_ne!(event, "late", "{kind}: event delivered twice");
            }
        }
        conn.close().await;
    }
}

//! Session restore against the real `@metarhia/jstp@2.3.0` (interop/jstp-peer.js), both ways,
//! over every transport: their client drops its transport and restores on our server; our
//! client is dropped by their server, restores there, gets its offline call answered once and
//! the event their server emitted while we were away.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it).

mod common;

use common::{certs, node_server, scenario, url, KINDS};
use std::future::Future;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::reconnect::Backoff;
use tether::transport::{server_config, ListenerOptions};
use tether::{connect, ClientOptions, ConnectionEvent, Server, Value};

/// Upper bound for anything a test waits for; reaching it fails the test.
const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
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
        let addr = within("listen", server.listen(endpoint.parse().unwrap()))
            .await
            .unwrap();
        urls.push((kind, url(kind, &addr)));
    }
    let mut events = server.events();
    for (kind, url) in urls {
        let steps = within(
            "the restore scenario",
            scenario(&url, "restore", &["--strict"]),
        )
        .await;
        let steps: Vec<String> = steps.iter().map(|s| s["step"].to_string()).collect();
        for step in [
            "answer",
            "drop",
            "reconnect",
            "bufferedCall",
            "answerAfter",
            "sameSession",
        ] {
            let quoted = format!("\"{step}\"");
            assert!(steps.contains(&quoted), "{kind}: no {step} in {steps:?}");
        }
        // Our server saw the restore.
        within(&format!("{kind}: ServerEvent::RestoreSession"), async {
            loop {
                if let tether::ServerEvent::RestoreSession(_) = events.recv().await.unwrap() {
                    break;
                }
            }
        })
        .await;
    }
    within("server shutdown", server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_restores_its_session_on_their_server() {
    let certs = certs();
    let (_node, urls) = within("the node server", node_server(&certs, &[])).await;
    for (kind, url) in urls {
        let mut options = ClientOptions::default().reconnector(Backoff::fixed_range(
            Duration::from_millis(300),
            Duration::from_millis(300),
        ));
        options.transport.tls.insecure = true;
        let conn = within("connect", connect(&url, "testApp@1.0.0", options))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let session = conn.session_id();
        let mut events = conn.events();
        assert_eq!(
            within("answer", conn.call("calculator", "answer", vec![]))
                .await
                .unwrap(),
            vec![Value::from(42)],
            "{kind}"
        );
        // Their server emits to this connection 100 ms from now, while the transport is down
        // (our reconnect waits 300 ms), then drops the transport.
        let later = vec![
            "chat".into(),
            "late".into(),
            Value::from(vec![Value::from(kind)]),
            100.into(),
        ];
        within(
            "control.emitLater",
            conn.call("control", "emitLater", later),
        )
        .await
        .unwrap();
        within("control.drop", conn.call("control", "drop", vec![]))
            .await
            .unwrap();
        // Wait until the drop is seen, then call while offline.
        within(&format!("{kind}: a reconnect attempt"), async {
            loop {
                if let ConnectionEvent::ReconnectAttempt { .. } = events.recv().await.unwrap() {
                    break;
                }
            }
        })
        .await;
        let offline = {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.call("someService", "say", vec!["offline".into()])
                    .await
            })
        };
        let (mut restored, mut late) = (false, 0);
        within(&format!("{kind}: the restore and the late event"), async {
            while !(restored && late == 1) {
                match events.recv().await.unwrap() {
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
        })
        .await;
        assert_eq!(
            within("the offline call", offline).await.unwrap().unwrap(),
            vec![Value::from("offline")],
            "{kind}"
        );
        assert_eq!(conn.session_id(), session, "{kind}");
        // A round trip after the restore; the late event came exactly once.
        assert_eq!(
            within("answer", conn.call("calculator", "answer", vec![]))
                .await
                .unwrap(),
            vec![Value::from(42)]
        );
        while let Ok(ev) = events.try_recv() {
            if let ConnectionEvent::Event { event, .. } = ev {
                assert_ne!(event, "late", "{kind}: event delivered twice");
            }
        }
        within("close", conn.close()).await;
    }
}

//! `tether serve --log-format json|text` and `--log FILTER`: JSON lines parse, one line per
//! connection lifecycle event and none per call at the default level, and the filter applies.

mod common;

use common::{spawn_serve, within, DEADLINE};
use serde_json::Value as Json;
use tether::{connect, ClientOptions, Value};

/// Connects, makes `calls` calls, closes, and stops the node; returns its whole log.
async fn workload(args: &[&str], calls: usize) -> Vec<String> {
    let mut served = spawn_serve(args, true);
    assert_eq!(served.first["ready"], true, "{}", served.first);
    let tcp = served.first["tcp"][0].as_str().unwrap().to_owned();
    let conn = within(
        DEADLINE,
        "connect",
        connect(
            &format!("jstp://{tcp}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    for _ in 0..calls {
        let r = within(
            DEADLINE,
            "answer",
            conn.call("calculator", "answer", vec![]),
        )
        .await;
        assert_eq!(r.unwrap(), vec![Value::from(42)]);
    }
    conn.close().await;
    assert!(served.proc.terminate(), "serve exits cleanly on SIGTERM");
    served.log.as_mut().unwrap().rest("serve's log")
}

fn messages(lines: &[Json]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["fields"]["message"].as_str().unwrap_or(""))
        .collect()
}

#[tokio::test]
async fn json_lines_parse_one_line_per_lifecycle_event_none_per_call() {
    let log = workload(&["--tcp", "127.0.0.1:0", "--log-format", "json"], 25).await;
    let lines: Vec<Json> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string(), "{l}");
        assert!(l["level"].is_string(), "{l}");
    }
    // Each lifecycle event once, named in the `event` field.
    let said: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["event"].as_str())
        .collect();
    assert_eq!(
        said,
        ["accepted", "handshake", "detached", "closed"],
        "{log:#?}"
    );
    assert_eq!(
        messages(&lines)
            .iter()
            .filter(|m| **m == "draining")
            .count(),
        1
    );
    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "connection accepted")
        .unwrap();
    assert_eq!(accepted["fields"]["app"], "testApp");
    assert!(accepted["fields"]["remote"]
        .as_str()
        .is_some_and(|r| r.starts_with("127.0.0.1:")));
    let closed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "connection closed")
        .unwrap();
    assert!(closed["fields"]["cause"].is_string(), "{closed}");
    assert_eq!(closed["fields"]["id"], accepted["fields"]["id"]);
    // 25 calls, and not one line about them.
    assert!(
        !log.iter()
            .any(|l| l.contains("answer") || l.contains("calculator")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn text_format_and_a_filter() {
    let text = workload(&["--tcp", "127.0.0.1:0", "--log-format", "text"], 1).await;
    assert!(
        text.iter().any(|l| l.contains("connection accepted")),
        "{text:#?}"
    );
    assert!(text
        .iter()
        .all(|l| serde_json::from_str::<Json>(l).is_err()));

    // --log wins over RUST_LOG (which spawn_serve sets to info): warnings only.
    let quiet = workload(&["--tcp", "127.0.0.1:0", "--log", "warn"], 1).await;
    assert!(
        !quiet.iter().any(|l| l.contains("INFO")),
        "no info lines under --log warn: {quiet:#?}"
    );
}

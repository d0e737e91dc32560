//! `tether serve --conductor`: the example app over the conductor protocol, with a signal for
//! every chat message sent over JSTP.

mod common;

use common::{serve, within, DEADLINE};
use tether::conductor::{AppSignal, ConductorConnection, ConductorError, ConductorOptions, Value};
use tether::{connect, ClientOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_hosts_the_example_app_on_the_conductor_protocol() {
    let (_serve, ready) = serve(&["--tcp", "127.0.0.1:0", "--conductor", "127.0.0.1:0"]);
    let addr = ready["conductor"][0].as_str().unwrap();
    let conductor = ConductorConnection::new(addr, ConductorOptions::default()).unwrap();
    within(DEADLINE, "the conductor handshake", conductor.open(None))
        .await
        .unwrap();
    let mut signals = conductor.signals();
    let request = |name: &'static str, args: Value| {
        within(DEADLINE, name, conductor.request(name, args, None))
    };
    assert_eq!(
        request("answer", Value::Nil).await.unwrap(),
        Value::from(42)
    );
    let args = |a: i64, b: i64| Value::Map(vec![("a".into(), a.into()), ("b".into(), b.into())]);
    assert_eq!(
        request("divide", args(20, 10)).await.unwrap(),
        Value::from(2.0)
    );
    match request("divide", args(1, 0)).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("internal_error", "Zero division")
            )
        }
        other => panic!("{other:?}"),
    }
    let name = Value::Map(vec![("name".into(), "Rust".into())]);
    assert_eq!(
        request("say_hi", name).await.unwrap(),
        Value::from("Hi, Rust!")
    );

    // A chat message over JSTP becomes a conductor signal.
    let url = format!("jstp://{}", ready["tcp"][0].as_str().unwrap());
    let jstp = within(
        DEADLINE,
        "the JSTP handshake",
        connect(&url, "testApp", ClientOptions::default()),
    )
    .await
    .unwrap();
    within(
        DEADLINE,
        "chat.send",
        jstp.call("chat", "send", vec!["hello".into()]),
    )
    .await
    .unwrap();
    let signal = within(DEADLINE, "the chat signal", signals.recv())
        .await
        .unwrap();
    // An app signal from zome `chat`, `{type:"app", value:{cell_id, zome_name, signal}}`.
    let app = AppSignal::from_signal(&signal).unwrap_or_else(|| panic!("{signal}"));
    assert_eq!(signal.as_map().unwrap()[0].1, Value::from("app"));
    assert_eq!(app.zome_name, "chat");
    let expected = Value::Map(vec![
        ("type".into(), "chat".into()),
        ("user".into(), Value::Nil),
        ("text".into(), "hello".into()),
    ]);
    assert_eq!(app.signal, expected);
    within(DEADLINE, "the JSTP close", jstp.close()).await;
    let code = within(DEADLINE, "the conductor close", conductor.close(None)).await;
    assert_eq!(code.unwrap(), 1000);
}

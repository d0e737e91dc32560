//! `tether serve --config FILE` and `--print-config`: keys in kebab or snake case, flags over
//! the file, the printed configuration read back to the same configuration, and a file that
//! actually configures a running node.

mod common;

use common::{run, serve};
use std::process::Command;

fn print_config(args: &[&str]) -> (i32, String, String) {
    let out = run(
        Command::new(common::BIN)
            .arg("serve")
            .args(args)
            .arg("--print-config"),
        "tether serve --print-config",
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn table(text: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("--print-config is not TOML ({e}):\n{text}"))
}

#[test]
fn file_flags_and_print_config_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tether.toml");
    std::fs::write(
        &file,
        r#"
tcp = ["127.0.0.1:3100", "127.0.0.1:3101"]
ws = "127.0.0.1:8100"
handshake_timeout = 4000
client-expiration = 60000
user = ["alice:pw1", "bob:pw2"]
heartbeat = 250
log-format = "json"
"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let (code, out, err) = print_config(&["--config", path]);
    assert_eq!(code, 0, "{err}");
    let t = table(&out);
    let strings = |k: &str| -> Vec<String> {
        t[k].as_array()
            .unwrap_or_else(|| panic!("{k} is a list: {out}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(strings("tcp"), ["127.0.0.1:3100", "127.0.0.1:3101"]);
    assert_eq!(strings("ws"), ["127.0.0.1:8100"]);
    assert_eq!(strings("user"), ["alice:pw1", "bob:pw2"]);
    assert_eq!(t["handshake-timeout"].as_integer(), Some(4000));
    assert_eq!(t["client-expiration"].as_integer(), Some(60000));
    assert_eq!(t["heartbeat"].as_integer(), Some(250));
    assert_eq!(t["log-format"].as_str(), Some("json"));
    // Defaults are shown too, so the output is the whole effective configuration.
    assert_eq!(t["store"].as_str(), Some("memory"));
    assert_eq!(t["drain-timeout"].as_integer(), Some(10000));
    assert!(!t.contains_key("config") && !t.contains_key("print-config"));

    // Flags win: a single value, and a repeatable flag replacing the file's whole list.
    let (code, over, err) = print_config(&[
        "--config",
        path,
        "--handshake-timeout",
        "7000",
        "--tcp",
        "127.0.0.1:3200",
    ]);
    assert_eq!(code, 0, "{err}");
    let o = table(&over);
    assert_eq!(o["handshake-timeout"].as_integer(), Some(7000));
    assert_eq!(o["tcp"].as_array().unwrap().len(), 1);
    assert_eq!(o["tcp"][0].as_str(), Some("127.0.0.1:3200"));
    assert_eq!(
        o["client-expiration"].as_integer(),
        Some(60000),
        "the file still counts"
    );

    // Round trip: the printed configuration, used as the file, prints the same.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &out).unwrap();
    let (code, out2, err) = print_config(&["--config", again.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table(&out2), t);
}

#[test]
fn a_bad_file_is_a_usage_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "tcp = [\"127.0.0.1:0\"]\nno_such_flag = 1\n").unwrap();
    let (code, _, err) = print_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no_such_flag"), "{err}");

    std::fs::write(&file, "handshake-timeout = \"soon\"\n").unwrap();
    let (code, _, err) = print_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("soon"), "{err}");

    let (code, _, err) = print_config(&["--config", "/nonexistent/tether.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/tether.toml"), "{err}");
}

#[test]
fn a_config_file_configures_the_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tether.toml");
    std::fs::write(
        &file,
        "tcp = [\"127.0.0.1:0\"]\nws = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (mut node, ready) = serve(&["--config", file.to_str().unwrap()]);
    assert_eq!(ready["tcp"].as_array().map(Vec::len), Some(1), "{ready}");
    assert_eq!(ready["ws"].as_array().map(Vec::len), Some(1), "{ready}");
    assert!(ready["admin"].is_string(), "{ready}");
    assert!(node.terminate());
}

//! The log: tracing to stderr, as text (a terminal gets colours) or as one JSON object per line,
//! filtered by an `RUST_LOG`-style directive list.
//!
//! At the default level (`info`) `tether serve` writes one line per connection lifecycle event
//! (accepted, handshake, detached, restored, closed with its cause) and none per call; calls and
//! handshake requests are `debug`.

use clap::ValueEnum;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (the message and
    /// the event's fields).
    Json,
}

/// The filter when neither `--log` nor `RUST_LOG` gives one.
pub(crate) const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. `filter` (from `--log`) wins over `RUST_LOG`, which wins
/// over [`DEFAULT_FILTER`]; an unparsable filter falls back to the default with a warning.
pub(crate) fn init(format: LogFormat, filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let mut bad = None;
    let env_filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|e| {
            bad = Some(format!("--log {f:?}: {e}"));
            EnvFilter::new(DEFAULT_FILTER)
        }),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(env_filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    if let Some(bad) = bad {
        tracing::warn!(%bad, "invalid log filter, using {DEFAULT_FILTER}");
    }
}

/// Sets up logging for `command`: `tether serve` reads `--log-format` and `--log` (from the
/// flags or its `--config` file); the other commands log text filtered by `RUST_LOG`.
pub(crate) fn init_for(command: &crate::Command) {
    match command {
        crate::Command::Serve(args) => match crate::config::resolve(args) {
            Ok(effective) => init(effective.ops.log_format, effective.ops.log.as_deref()),
            // serve reports the configuration error itself.
            Err(_) => init(LogFormat::Text, None),
        },
        _ => init(LogFormat::Text, None),
    }
}

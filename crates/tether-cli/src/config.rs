//! `tether serve --config FILE`: every serve flag as a TOML key, flags winning over the file,
//! and `--print-config` to show the effective configuration.
//!
//! No per-flag code: the file becomes command-line arguments that clap parses with the real
//! ones. A key is a flag's long name, in kebab or snake case (`handshake-timeout` or
//! `handshake_timeout`); a string or number is its value, an array repeats the flag, `true`
//! sets a switch (`false` leaves it off). A flag given on the command line replaces the file's
//! value entirely (for repeatable flags too: `--tcp` on the command line drops the file's
//! `tcp` list). `--print-config` writes every flag that has a value, defaults included, in the
//! same format, so its output is a valid `--config` file.

use crate::serve::ServeArgs;
use crate::Failure;
use clap::parser::ValueSource;
use clap::{ArgAction, Args, FromArgMatches};
use std::ffi::OsString;

/// Largest configuration file read, in bytes (1 MiB): far above any real configuration.
pub(crate) const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Flags that are about the file itself and never come from it or go into it.
const NOT_IN_FILE: &[&str] = &["config", "print-config"];

fn command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("tether serve").no_binary_name(true))
}

/// The arguments after `tether serve` on this process's command line.
fn real_args() -> Vec<OsString> {
    let mut args = std::env::args_os().skip(1);
    // `serve` is the first argument: the top-level command takes no options before it.
    for a in args.by_ref() {
        if a == "serve" {
            break;
        }
    }
    args.collect()
}

/// The effective serve arguments: `args` as parsed from the command line, with its
/// `--config` file underneath.
pub(crate) fn resolve(args: &ServeArgs) -> Result<ServeArgs, Failure> {
    if args.ops.config.is_none() {
        return Ok(args.clone());
    }
    let matches = effective_matches(args)?;
    ServeArgs::from_arg_matches(&matches).map_err(|e| Failure::Usage(e.to_string()))
}

/// clap's matches for the file's arguments followed by the real ones.
fn effective_matches(args: &ServeArgs) -> Result<clap::ArgMatches, Failure> {
    let real = real_args();
    let cmd = command();
    let mut argv = match &args.ops.config {
        Some(path) => file_args(&cmd, path, &real)?,
        None => Vec::new(),
    };
    argv.extend(real);
    cmd.try_get_matches_from(&argv)
        .map_err(|e| Failure::Usage(e.to_string()))
}

/// The file's keys as `--long=value` arguments, leaving out flags `real` gives.
fn file_args(
    cmd: &clap::Command,
    path: &std::path::Path,
    real: &[OsString],
) -> Result<Vec<OsString>, Failure> {
    let usage = |msg: String| Failure::Usage(format!("--config {}: {msg}", path.display()));
    let size = std::fs::metadata(path)
        .map_err(|e| usage(e.to_string()))?
        .len();
    if size > MAX_CONFIG_SIZE {
        return Err(usage(format!("larger than {MAX_CONFIG_SIZE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| usage(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| usage(e.to_string()))?;
    let real_matches = cmd
        .clone()
        .try_get_matches_from(real)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let mut out: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !NOT_IN_FILE.contains(&long.as_str()))
            .ok_or_else(|| usage(format!("unknown key {key:?}")))?;
        if real_matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let items: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for item in items {
            let text = match item {
                toml::Value::Boolean(b) if switch => {
                    if *b {
                        out.push(format!("--{long}").into());
                    }
                    continue;
                }
                _ if switch => return Err(usage(format!("{key} is a switch: use true or false"))),
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => return Err(usage(format!("{key}: unsupported value {other}"))),
            };
            out.push(format!("--{long}={text}").into());
        }
    }
    Ok(out)
}

/// The effective configuration as TOML: every flag with a value (defaults included), keyed by
/// its long name. Secrets are printed too: it is the operator's own configuration.
pub(crate) fn print(args: &ServeArgs) -> Result<String, Failure> {
    let matches = effective_matches(args)?;
    let mut table = toml::Table::new();
    for arg in command().get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if NOT_IN_FILE.contains(&long) {
            continue;
        }
        let Some(raw) = matches.get_raw(arg.get_id().as_str()) else {
            continue;
        };
        let mut values = raw.map(|v| scalar(&v.to_string_lossy()));
        let value = match arg.get_action() {
            ArgAction::Append => toml::Value::Array(values.collect()),
            _ => match values.next() {
                Some(v) => v,
                None => continue,
            },
        };
        table.insert(long.to_owned(), value);
    }
    toml::to_string(&table).map_err(|e| Failure::Usage(format!("--print-config: {e}")))
}

/// Numbers print as TOML integers, `true`/`false` as booleans, everything else as strings;
/// [`file_args`] reads each back as the same argument.
fn scalar(text: &str) -> toml::Value {
    match text.parse::<i64>() {
        Ok(i) if i.to_string() == text => toml::Value::Integer(i),
        _ => match text {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => toml::Value::String(text.to_owned()),
        },
    }
}

//! `tether http`: HTTP from the command line, the equivalents of lua-http's request and serve
//! examples. `get`/`post` stream a response body to stdout; `serve` serves a directory's
//! files over HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN with TLS).

use crate::signals::StopSignals;
use crate::Failure;
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use tether::http::{
    ConnectOptions, HttpConnection, HttpError, HttpServer, HttpVersion, ServerOptions,
    ServerStream, TlsMode,
};

/// `tether http …`.
#[derive(Args, Debug)]
pub struct HttpArgs {
    #[command(subcommand)]
    command: HttpCommand,
}

#[derive(Subcommand, Debug)]
enum HttpCommand {
    /// GET a URL; the body goes to stdout as it arrives.
    Get(RequestArgs),
    /// POST a body (from --data FILE, or stdin) to a URL; the response body goes to stdout.
    Post {
        #[command(flatten)]
        request: RequestArgs,
        /// File whose contents are the body; `-` (the default) reads stdin.
        #[arg(long, short = 'd', value_name = "FILE", default_value = "-")]
        data: PathBuf,
    },
    /// Serve the files under DIR over HTTP/1.1 and HTTP/2 until Ctrl-C or SIGTERM; prints one
    /// JSON line with the bound address.
    Serve(ServeArgs),
}

/// Where and how a request goes.
#[derive(Args, Debug)]
struct RequestArgs {
    /// `http://HOST[:PORT]/PATH` or `https://…`.
    url: String,
    /// HTTP/2: by prior knowledge on http:// (h2c), ALPN `h2` only on https://. Default:
    /// HTTP/1.1 on http://, ALPN-negotiated on https://.
    #[arg(long)]
    http2: bool,
    /// A request header `NAME: VALUE` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// PEM file of a CA to trust for https://.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[arg(long)]
    insecure: bool,
    /// Deadline for connecting, for the response head and for each body chunk (ms).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    timeout: u64,
    /// Print the status line and headers (to stderr, so stdout is only the body).
    #[arg(long, short = 'i')]
    include: bool,
    /// Exit with status 22 when the response status is 400 or above (as curl --fail).
    #[arg(long, short = 'f')]
    fail: bool,
}

/// `tether http serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The directory whose files are served (`/` serves its index.html).
    dir: PathBuf,
    /// Listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    listen: String,
    /// PEM certificate chain: with --key, TLS is served too (detected per connection).
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
}

/// Runs `tether http …`. Runtime failures are printed with their causes and end the process
/// with status 1; usage problems are returned.
pub async fn run(args: HttpArgs) -> Result<(), Failure> {
    let result = match args.command {
        HttpCommand::Get(request) => fetch("GET", &request, None).await,
        HttpCommand::Post { request, data } => fetch("POST", &request, Some(&data)).await,
        HttpCommand::Serve(args) => serve(args).await,
    };
    match result {
        Ok(0) => Ok(()),
        Ok(code) => std::process::exit(code),
        Err(Problem::Usage(msg)) => Err(Failure::Usage(msg)),
        Err(Problem::Http(e)) => {
            let mut line = format!("tether: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{line}");
            std::process::exit(1)
        }
    }
}

enum Problem {
    Usage(String),
    Http(HttpError),
}

impl From<HttpError> for Problem {
    fn from(e: HttpError) -> Self {
        Problem::Http(e)
    }
}

fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> Problem {
    move |source| Problem::Http(HttpError::Io { what, source })
}

fn version_text(v: HttpVersion) -> &'static str {
    match v {
        HttpVersion::Http10 => "1.0",
        HttpVersion::Http2 => "2",
        _ => "1.1",
    }
}

/// Sends one request and streams the response body to stdout; returns the exit status.
async fn fetch(method: &str, args: &RequestArgs, body: Option<&Path>) -> Result<i32, Problem> {
    let timeout = Some(Duration::from_millis(args.timeout));
    let (origin, path) = split_url(&args.url)?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            return Err(Problem::Usage(format!("-H expects NAME: VALUE, got {h:?}")));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut options = ConnectOptions {
        http2: args.http2,
        ..Default::default()
    };
    options.tls.ca_pem = args.ca.clone();
    options.tls.insecure = args.insecure;
    let conn = HttpConnection::connect(&origin, options, timeout).await?;
    let mut stream = conn.new_stream()?;
    match body {
        None => stream.write_headers(method, &path, &headers, true).await?,
        Some(file) => {
            stream.write_headers(method, &path, &headers, false).await?;
            // The body streams from its source; a server that answers early (and stops
            // reading) still gets its answer printed below.
            let sent = if file == Path::new("-") {
                send_stdin(&mut stream).await
            } else {
                stream.write_body_from_file(file).await
            };
            if let Err(e) = sent {
                if !e.is_closed() {
                    return Err(e.into());
                }
            }
        }
    }
    let head = stream.get_headers(timeout).await?;
    if args.include {
        let mut text = format!("HTTP/{} {}\n", version_text(head.version), head.status);
        for (name, value) in &head.headers {
            text.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        eprintln!("{text}");
    }
    while let Some(chunk) = stream.get_next_chunk(timeout).await? {
        // Each chunk is written and flushed as it arrives (streaming output).
        let mut out = std::io::stdout().lock();
        out.write_all(&chunk)
            .and_then(|()| out.flush())
            .map_err(io_error("writing to stdout"))?;
    }
    drop(stream);
    conn.shutdown().await;
    Ok(if args.fail && head.status >= 400 {
        22
    } else {
        0
    })
}

/// Sends stdin as the body, 16 KiB at a time, read on a thread of its own (at most four
/// chunks wait to be sent).
async fn send_stdin(stream: &mut tether::http::ClientStream) -> Result<(), HttpError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            let read = stdin.read(&mut buf).map(|n| {
                buf.truncate(n);
                buf
            });
            let end = !matches!(&read, Ok(b) if !b.is_empty());
            if tx.blocking_send(read).is_err() || end {
                return;
            }
        }
    });
    while let Some(read) = rx.recv().await {
        let chunk = read.map_err(|source| HttpError::Io {
            what: "reading stdin",
            source,
        })?;
        if chunk.is_empty() {
            break;
        }
        stream.write_chunk(Bytes::from(chunk), false).await?;
    }
    stream.write_chunk(Bytes::new(), true).await
}

/// `http://host:port/path?q` → (`http://host:port`, `/path?q`).
fn split_url(url: &str) -> Result<(String, String), Problem> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Problem::Usage(format!(
            "expected http:// or https:// URL, got {url:?}"
        )));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    Ok((format!("{scheme}://{authority}"), path))
}

async fn serve(args: ServeArgs) -> Result<i32, Problem> {
    let root = std::fs::canonicalize(&args.dir)
        .map_err(|e| Problem::Usage(format!("{}: {e}", args.dir.display())))?;
    if !root.is_dir() {
        return Err(Problem::Usage(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let config = tether::transport::server_config(cert, key)
                .map_err(|e| Problem::Usage(format!("cannot load --cert/--key: {e}")))?;
            // Plain and TLS on one port: a client starting a TLS handshake gets TLS.
            TlsMode::Auto(config)
        }
        _ => TlsMode::Disabled,
    };
    let stop = StopSignals::install().map_err(io_error("installing signal handlers"))?;
    let root = std::sync::Arc::new(root);
    let server = HttpServer::new(
        ServerOptions::new(move |stream| serve_file(root.clone(), stream))
            .tls(tls)
            .on_error(|e| tracing::debug!(error = %e, "http connection")),
    );
    let addr = server.listen(&args.listen).await?;
    println!("{}", json!({"listening": addr, "dir": args.dir}));
    stop.wait().await;
    server.shutdown().await;
    Ok(0)
}

/// The file a request path names under `root`, or `None` if it leaves `root`.
fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split(['?', '#']).next().unwrap_or("/");
    let decoded = percent_decode(path)?;
    let mut out = root.to_path_buf();
    for component in Path::new(&decoded).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" | "md" => "text/plain; charset=utf-8",
        "css" => "text/css",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

async fn answer(stream: &mut ServerStream, status: u16, text: &str) -> Result<(), HttpError> {
    let length = text.len().to_string();
    let headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", length.as_str()),
    ];
    stream.write_headers(status, &headers, false).await?;
    stream
        .write_chunk(Bytes::copy_from_slice(text.as_bytes()), true)
        .await
}

/// GET and HEAD of files under `root` (a directory serves its `index.html`).
async fn serve_file(
    root: std::sync::Arc<PathBuf>,
    mut stream: ServerStream,
) -> Result<(), HttpError> {
    let head = stream.get_headers().clone();
    if head.method != "GET" && head.method != "HEAD" {
        return answer(&mut stream, 405, "only GET and HEAD\n").await;
    }
    let Some(mut path) = resolve(&root, &head.path) else {
        return answer(&mut stream, 400, "bad path\n").await;
    };
    if path.is_dir() {
        path.push("index.html");
    }
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => m,
        _ => return answer(&mut stream, 404, "not found\n").await,
    };
    // Symbolic links may not lead out of the served directory.
    match tokio::fs::canonicalize(&path).await {
        Ok(real) if real.starts_with(&*root) => {}
        _ => return answer(&mut stream, 404, "not found\n").await,
    }
    let length = meta.len().to_string();
    let headers = [
        ("content-type", content_type(&path)),
        ("content-length", length.as_str()),
    ];
    if head.method == "HEAD" {
        return stream.write_headers(200, &headers, true).await;
    }
    stream.write_headers(200, &headers, false).await?;
    stream.write_body_from_file(&path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let root = Path::new("/srv");
        assert_eq!(
            resolve(root, "/a/b.txt?x=1"),
            Some(PathBuf::from("/srv/a/b.txt"))
        );
        assert_eq!(resolve(root, "/a%20b"), Some(PathBuf::from("/srv/a b")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(resolve(root, "/a%00"), None);
        assert_eq!(resolve(root, "/%zz"), None);
    }

    #[test]
    fn urls_split_into_origin_and_path() {
        let split = |u| match split_url(u) {
            Ok(v) => v,
            Err(_) => panic!("{u}"),
        };
        assert_eq!(
            split("http://h:1/p?q"),
            ("http://h:1".into(), "/p?q".into())
        );
        assert_eq!(split("https://h"), ("https://h".into(), "/".into()));
        assert_eq!(split("http://h?q"), ("http://h".into(), "/?q".into()));
    }
}

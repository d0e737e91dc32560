//! `tether bench`: calls/s over JSTP/TCP and JSTP/WS with many calls in flight, beside a raw TCP
//! echo of the same messages measured in the same process run. The ratio is what to compare
//! across machines; the absolute numbers are not.

use clap::Args;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::{connect, Application, ClientOptions, Error, Interface, Server, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Options of `tether bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Seconds to measure each case (after a warm-up of a quarter of that).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Calls in flight at once on the one connection.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Length of the string argument each call carries.
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// How many times to cut the link for the reconnect-and-restore measurement.
    #[arg(long, default_value_t = 100)]
    restores: usize,
    /// Load an external JSTP server at this URL instead of the in-process cases.
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// With --target: the server process's pid, to report its CPU time per call (and with
    /// --idle, its memory per connection).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// With --target: connections to load at once (each with --in-flight calls).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// With --target: the application to connect to.
    #[arg(long, default_value = "testApp")]
    app: String,
    /// With --target: the interface and method to call with the payload string.
    #[arg(long, default_value = "someService.sayHi", value_name = "IFACE.METHOD")]
    call: String,
    /// With --target: open this many idle connections and report memory per connection
    /// instead of loading.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Serve the floor responder at this address until stopped (a baseline for --target).
    #[arg(long, value_name = "ADDR", conflicts_with = "target")]
    floor: Option<String>,
}

/// Runs every case and prints one JSON line per case.
pub async fn run(args: BenchArgs) -> Result<(), Error> {
    if args.in_flight == 0 || !args.duration.is_finite() || args.duration <= 0.0 {
        return Err(Error::InvalidArgument(
            "--in-flight and --duration must be positive".into(),
        ));
    }
    let measure = Duration::from_secs_f64(args.duration);
    let warmup = measure / 4;
    let payload = "x".repeat(args.payload);
    if let Some(addr) = &args.floor {
        return tokio::task::block_in_place(|| crate::load::run_floor(addr));
    }
    if let Some(url) = &args.target {
        if let Some(count) = args.idle {
            return crate::load::run_idle(url, &args.app, count, args.server_pid).await;
        }
        let (iface, method) = args.call.split_once('.').ok_or_else(|| {
            Error::InvalidArgument(format!("--call {}: expected IFACE.METHOD", args.call))
        })?;
        return crate::load::run_target(crate::load::LoadSpec {
            url,
            app: &args.app,
            iface,
            method,
            payload: &payload,
            connections: args.connections.max(1),
            in_flight: args.in_flight,
            warmup,
            measure,
            server_pid: args.server_pid,
        })
        .await;
    }

    let raw = raw_echo(&args, &payload, warmup, measure).await?;
    report("raw_tcp_echo", &args, raw, None);

    let app = Application::new("bench", "1.0.0")?.interface(
        "echo",
        Interface::new().method("echo", |_conn, args: Vec<Value>| async move {
            Ok(args.into_iter().next().unwrap_or(Value::Null))
        }),
    );
    let server = Server::builder().application(app).build()?;
    for (name, endpoint) in [
        ("jstp_tcp", "jstp://127.0.0.1:0"),
        ("jstp_ws", "ws://127.0.0.1:0"),
    ] {
        let addr = server.listen(endpoint.parse()?).await?;
        let scheme = endpoint.split("://").next().unwrap_or("jstp");
        let rate = jstp_calls(
            &format!("{scheme}://{addr}"),
            &args,
            &payload,
            warmup,
            measure,
        )
        .await?;
        report(name, &args, rate, Some(rate / raw));
    }
    restore_times(&server, args.restores).await?;
    server.shutdown().await;
    Ok(())
}

/// Median and 99th percentile of a list of durations, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0, |d| d.as_micros())
    };
    (at(0.5), at(0.99))
}

/// Reconnect-and-restore time: the link is cut under a live client (through a loopback proxy)
/// and timed until the session is restored, beside a fresh connect-and-handshake measured the
/// same way in the same run.
async fn restore_times(server: &Server, restores: usize) -> Result<(), Error> {
    use tether::reconnect::Backoff;
    use tether::testing::CutProxy;
    if restores == 0 {
        return Ok(());
    }
    let io = |e: std::io::Error| Error::Transport(tether::TransportError::Io(e));
    let addr = server.listen("jstp://127.0.0.1:0".parse()?).await?;
    let target = addr
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("{addr}: {e}")))?;
    let proxy = CutProxy::start(target).await.map_err(io)?;
    let url = format!("jstp://{}", proxy.local_addr());

    let mut fresh = Vec::with_capacity(restores);
    for _ in 0..restores {
        let start = Instant::now();
        let conn = connect(&url, "bench", ClientOptions::default()).await?;
        fresh.push(start.elapsed());
        conn.close().await;
    }

    let options =
        ClientOptions::default().reconnector(Backoff::fixed_range(Duration::ZERO, Duration::ZERO));
    let conn = connect(&url, "bench", options).await?;
    let mut events = conn.events();
    let mut restored = Vec::with_capacity(restores);
    for _ in 0..restores {
        proxy.wait_for_links(1).await;
        let start = Instant::now();
        proxy.cut();
        loop {
            match events.recv().await {
                Ok(tether::ConnectionEvent::Reconnect { error: None }) => break,
                Ok(tether::ConnectionEvent::Close) | Err(_) => return Err(Error::Closed),
                Ok(_) => {}
            }
        }
        restored.push(start.elapsed());
        // A round trip on the restored session, so each sample ends with a working link.
        conn.call("echo", "echo", vec![Value::from(1)]).await?;
    }
    conn.close().await;

    let (fresh_p50, fresh_p99) = percentiles(fresh);
    let (p50, p99) = percentiles(restored);
    println!(
        "{}",
        json!({
            "bench": "reconnect_restore",
            "samples": restores,
            "p50_us": p50,
            "p99_us": p99,
            "fresh_connect_p50_us": fresh_p50,
            "fresh_connect_p99_us": fresh_p99,
            "ratio_to_fresh_connect": ((p50 as f64 / fresh_p50.max(1) as f64) * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}

fn report(name: &str, args: &BenchArgs, rate: f64, ratio: Option<f64>) {
    let mut line = json!({
        "bench": name,
        "in_flight": args.in_flight,
        "payload": args.payload,
        "calls_per_s": rate.round(),
    });
    if let Some(r) = ratio {
        line["ratio_to_raw_echo"] = json!((r * 1000.0).round() / 1000.0);
    }
    println!("{line}");
}

/// Counts completions between the end of the warm-up and the end of the measurement.
struct Window {
    done: AtomicU64,
}

async fn jstp_calls(
    url: &str,
    args: &BenchArgs,
    payload: &str,
    warmup: Duration,
    measure: Duration,
) -> Result<f64, Error> {
    let conn = connect(url, "bench", ClientOptions::default()).await?;
    let window = Arc::new(Window {
        done: AtomicU64::new(0),
    });
    let start = Instant::now();
    let counting_from = start + warmup;
    let end = counting_from + measure;
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight {
        let conn = conn.clone();
        let window = window.clone();
        let arg = Value::from(payload);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                conn.call("echo", "echo", vec![arg.clone()]).await?;
                if Instant::now() >= counting_from {
                    window.done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Protocol(format!("bench task failed: {e}")))??;
    }
    conn.close().await;
    Ok(window.done.load(Ordering::Relaxed) as f64 / measure.as_secs_f64())
}

/// A raw TCP echo of the same NUL-terminated call text, `in_flight` messages outstanding on one
/// connection: the ceiling of what any RPC layer on this machine's loopback can do.
async fn raw_echo(
    args: &BenchArgs,
    payload: &str,
    warmup: Duration,
    measure: Duration,
) -> Result<f64, Error> {
    let io = |e: std::io::Error| Error::Transport(tether::TransportError::Io(e));
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let echo = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let (mut r, mut w) = sock.split();
        tokio::io::copy(&mut r, &mut w).await?;
        Ok::<_, std::io::Error>(())
    });

    let sock = TcpStream::connect(addr).await.map_err(io)?;
    sock.set_nodelay(true).map_err(io)?;
    let (mut reader, mut writer) = sock.into_split();
    let message = format!("{{call:[1,'echo'],echo:['{payload}']}}\0").into_bytes();
    let permits = Arc::new(Semaphore::new(args.in_flight));

    let start = Instant::now();
    let counting_from = start + warmup;
    let end = counting_from + measure;
    let writer_permits = permits.clone();
    let in_flight = args.in_flight;
    let write_task = tokio::spawn(async move {
        // Like the connection driver, write every message that may go out in one syscall.
        let mut batch = Vec::with_capacity(message.len() * in_flight);
        while Instant::now() < end {
            let permit = writer_permits
                .acquire()
                .await
                .map_err(std::io::Error::other)?;
            permit.forget();
            batch.clear();
            batch.extend_from_slice(&message);
            while let Ok(more) = writer_permits.try_acquire() {
                more.forget();
                batch.extend_from_slice(&message);
            }
            writer.write_all(&batch).await?;
        }
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });

    let mut done = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        let frames = buf[..n].iter().filter(|b| **b == 0).count();
        permits.add_permits(frames);
        let now = Instant::now();
        if now >= counting_from && now < end {
            done += frames as u64;
        }
    }
    write_task
        .await
        .map_err(|e| Error::Protocol(format!("bench writer failed: {e}")))?
        .map_err(io)?;
    let _ = echo.await;
    Ok(done as f64 / measure.as_secs_f64())
}

//! `tether bench`'s external modes: load against any JSTP server (tether or `@metarhia/jstp`)
//! with the server process's CPU time per call, a floor responder to compare servers with, and
//! memory per idle connection on both sides.
//!
//! CPU time comes from `/proc/PID/stat` (utime + stime, in the kernel's 100 Hz clock ticks) and
//! memory from `/proc/PID/statm` (resident pages): Linux only. Numbers from one machine compare
//! only with numbers from the same run; report ratios.

use serde_json::json;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether::{connect, ClientOptions, Connection, Error, Value};

/// What `--target` runs against.
pub struct LoadSpec<'a> {
    pub url: &'a str,
    pub app: &'a str,
    pub iface: &'a str,
    pub method: &'a str,
    pub payload: &'a str,
    pub connections: usize,
    pub in_flight: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub server_pid: Option<u32>,
}

/// The kernel's clock ticks per second for `/proc/PID/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

fn proc_cpu(pid: u32) -> Result<Duration, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| Error::InvalidArgument(format!("cannot read /proc/{pid}/stat: {e}")))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Duration::from_secs_f64(
        (ticks(11) + ticks(12)) as f64 / TICKS_PER_S,
    ))
}

/// Resident memory of a process, in bytes.
pub fn proc_rss(pid: u32) -> Result<u64, Error> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .map_err(|e| Error::InvalidArgument(format!("cannot read /proc/{pid}/statm: {e}")))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Ok(pages * 4096)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Calls `iface.method(payload)` with `in_flight` calls outstanding on each of `connections`
/// connections; prints one JSON line with calls/s, latency percentiles and, given the server's
/// pid, its CPU time per call.
pub async fn run_target(spec: LoadSpec<'_>) -> Result<(), Error> {
    let mut conns = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        conns.push(connect(spec.url, spec.app, ClientOptions::default().no_reconnect()).await?);
    }
    let start = Instant::now();
    let counting_from = start + spec.warmup;
    let end = counting_from + spec.measure;
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut tasks = Vec::new();
    for conn in &conns {
        for _ in 0..spec.in_flight {
            let (conn, done, latencies) = (conn.clone(), done.clone(), latencies.clone());
            let (iface, method) = (spec.iface.to_owned(), spec.method.to_owned());
            let arg = Value::from(spec.payload);
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    conn.call(&iface, &method, vec![arg.clone()]).await?;
                    let now = Instant::now();
                    if t >= counting_from && now < end {
                        done.fetch_add(1, Ordering::Relaxed);
                        mine.push(now.duration_since(t).as_micros().min(u32::MAX as u128) as u32);
                    }
                }
                latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(mine);
                Ok::<_, Error>(())
            }));
        }
    }
    // The server's CPU clock and the call count, read together at both ends of the window.
    let mut cpu = None;
    if let Some(pid) = spec.server_pid {
        tokio::time::sleep_until(counting_from.into()).await;
        let (cpu0, n0) = (proc_cpu(pid)?, done.load(Ordering::Relaxed));
        tokio::time::sleep_until(end.into()).await;
        let (cpu1, n1) = (proc_cpu(pid)?, done.load(Ordering::Relaxed));
        cpu = Some((cpu1.saturating_sub(cpu0), n1.saturating_sub(n0)));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Protocol(format!("load task failed: {e}")))??;
    }
    for c in &conns {
        c.close().await;
    }
    let calls = done.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let mut line = json!({
        "bench": "target",
        "url": spec.url,
        "connections": spec.connections,
        "in_flight": spec.in_flight,
        "calls_per_s": (calls as f64 / spec.measure.as_secs_f64()).round(),
        "p50_us": percentile(&lat, 0.5),
        "p99_us": percentile(&lat, 0.99),
    });
    if let Some((used, n)) = cpu {
        let per_call = used.as_secs_f64() * 1e6 / n.max(1) as f64;
        line["server_cpu_us_per_call"] = json!((per_call * 100.0).round() / 100.0);
    }
    println!("{line}");
    Ok(())
}

/// Opens `count` idle, handshaken connections to `url` and prints the resident memory they
/// cost per connection on this side and, given its pid, on the server's.
pub async fn run_idle(
    url: &str,
    app: &str,
    count: usize,
    server_pid: Option<u32>,
) -> Result<(), Error> {
    let me = std::process::id();
    let (client0, server0) = (proc_rss(me)?, server_pid.map(proc_rss).transpose()?);
    let mut conns: Vec<Connection> = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(connect(url, app, ClientOptions::default().no_reconnect()).await?);
    }
    // Let the server finish its side of the last handshakes.
    let last = conns.last().cloned();
    if let Some(c) = last {
        c.ping().await?;
    }
    let (client1, server1) = (proc_rss(me)?, server_pid.map(proc_rss).transpose()?);
    let per = |a: u64, b: u64| (b.saturating_sub(a) as f64 / count.max(1) as f64).round();
    let mut line = json!({
        "bench": "idle",
        "url": url,
        "connections": count,
        "client_bytes_per_connection": per(client0, client1),
    });
    if let (Some(a), Some(b)) = (server0, server1) {
        line["server_bytes_per_connection"] = json!(per(a, b));
    }
    println!("{line}");
    for c in &conns {
        c.close().await;
    }
    Ok(())
}

/// A floor to compare servers with: one thread per connection, splits on NUL, answers a
/// handshake with a session id and every call by its id with a fixed result, one write per
/// read. Nothing a real server could skip, nothing else. Runs until the process ends.
pub fn run_floor(addr: &str) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Transport(tether::TransportError::Io(e));
    let listener = std::net::TcpListener::bind(addr).map_err(io)?;
    println!(
        "{}",
        json!({"ready": true, "floor": listener.local_addr().map_err(io)?.to_string()})
    );
    for sock in listener.incoming() {
        let Ok(sock) = sock else { continue };
        std::thread::spawn(move || floor_connection(sock));
    }
    Ok(())
}

fn floor_connection(mut sock: std::net::TcpStream) {
    let _ = sock.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    let mut out = Vec::new();
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == 0) {
            let msg = &pending[start..start + end];
            start += end + 1;
            if msg.starts_with(b"{handshake:") {
                out.extend_from_slice(b"{handshake:[0],ok:'floor'}\0");
            } else if let Some(rest) = msg.strip_prefix(b"{call:[") {
                let id_len = rest.iter().take_while(|b| **b != b',').count();
                out.extend_from_slice(b"{callback:[");
                out.extend_from_slice(&rest[..id_len]);
                out.extend_from_slice(b"],ok:['Hi']}\0");
            }
        }
        pending.drain(..start);
        if !out.is_empty() {
            if sock.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

//! `tether serve --admin ADDR`: metrics, health and a live admin page on tether's own HTTP
//! server ([`tether::http::HttpServer`]).
//!
//! | path | answer |
//! | --- | --- |
//! | `/metrics` | Prometheus text (the `metrics-exporter-prometheus` recorder) |
//! | `/health` | `200 ok` while the process runs (never needs the token) |
//! | `/ready` | `200` once every listener is bound and while the store answers and the node is not draining; `503` otherwise |
//! | `/` | the admin page (embedded HTML/JS/CSS) |
//! | `/snapshot` | one JSON snapshot of the figures the page shows |
//! | `/events` | the same snapshot every second as server-sent events |
//!
//! With `--admin-token`, every path but `/health` needs `Authorization: Bearer TOKEN` or
//! `?token=TOKEN` (the page passes its own `token` on to `/events`, since `EventSource`
//! cannot set headers).

use bytes::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value as Json};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether::http::{HttpError, HttpServer, ServerOptions, ServerStream};
use tether::store::SessionStore;
use tether::Server;
use tokio::sync::{watch, Semaphore};

const PAGE: &str = include_str!("admin/index.html");
const SCRIPT: &str = include_str!("admin/admin.js");
const STYLE: &str = include_str!("admin/admin.css");

/// Latest errors kept for the page (the oldest go first).
pub(crate) const MAX_ERRORS: usize = 50;
/// Admin pages (event streams) served at once; more get `503`.
pub(crate) const MAX_VIEWERS: usize = 16;
/// Requests handled at once by the admin server (also HTTP/2's stream limit).
pub(crate) const MAX_REQUESTS: usize = 64;
/// How often the page gets a new snapshot.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// How long `/ready` waits for the session store.
pub(crate) const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Histogram buckets for latencies in seconds: 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
/// Histogram buckets for resend-buffer sizes in bytes: 0 to 16 MiB.
const BYTES_BUCKETS: &[f64] = &[
    0.0, 1024.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Installs the process-wide Prometheus recorder and turns on tether's call timing.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(tether::metrics::RESEND_BUFFER_BYTES.into()),
                BYTES_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    tether::metrics::enable();
    Ok(handle)
}

/// What the admin endpoint reports on.
pub(crate) struct AdminState {
    handle: PrometheusHandle,
    server: Server,
    store: Arc<dyn SessionStore>,
    token: Option<String>,
    /// Set once every listener is bound; cleared when draining starts.
    ready: AtomicBool,
    errors: Mutex<VecDeque<Json>>,
    listeners: Mutex<Vec<Json>>,
    /// The conductor-protocol server behind the `conductor` listeners, if any.
    conductor: std::sync::OnceLock<tether::conductor::ConductorServer>,
    viewers: Semaphore,
    stop: watch::Sender<bool>,
}

/// The running admin endpoint.
pub(crate) struct Admin {
    http: HttpServer,
    state: Arc<AdminState>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Admin {
    /// Binds `addr` and serves the admin endpoint.
    pub(crate) async fn start(
        addr: &str,
        token: Option<String>,
        handle: PrometheusHandle,
        server: Server,
        store: Arc<dyn SessionStore>,
    ) -> Result<(Admin, String), HttpError> {
        let state = Arc::new(AdminState {
            handle,
            server: server.clone(),
            store,
            token,
            ready: AtomicBool::new(false),
            errors: Mutex::new(VecDeque::new()),
            listeners: Mutex::new(Vec::new()),
            conductor: std::sync::OnceLock::new(),
            viewers: Semaphore::new(MAX_VIEWERS),
            stop: watch::channel(false).0,
        });
        // The latest errors, from the server's own events.
        let mut events = server.events();
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            use tether::ServerEvent as E;
            loop {
                let message = match events.recv().await {
                    Ok(E::ConnectionError { error, .. }) => error,
                    Ok(E::HandshakeTimeout(c)) => {
                        format!("handshake timeout from {:?}", c.remote_addr())
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        format!("{n} events not shown (too many at once)")
                    }
                    Err(_) => break,
                };
                let Some(state) = weak.upgrade() else { break };
                state.push_error(message);
            }
        });
        // The exporter's histograms need draining now and then when no one scrapes.
        let upkeep = state.handle.clone();
        let mut stopped = state.stop.subscribe();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = every.tick() => upkeep.run_upkeep(),
                    _ = stopped.wait_for(|s| *s) => break,
                }
            }
        });
        let handler_state = state.clone();
        let mut options = ServerOptions::new(move |stream| {
            let state = handler_state.clone();
            async move { state.handle(stream).await }
        });
        options.max_concurrent = MAX_REQUESTS;
        let http = HttpServer::new(options);
        let bound = http.listen(addr).await?;
        Ok((Admin { http, state }, bound))
    }

    /// Records a bound listener for the page and `/ready`.
    pub(crate) fn listener(&self, kind: &str, addr: &str) {
        lock(&self.state.listeners).push(json!({"kind": kind, "addr": addr}));
    }

    /// The conductor server whose clients the `conductor` listener rows count.
    pub(crate) fn conductor(&self, server: &tether::conductor::ConductorServer) {
        let _ = self.state.conductor.set(server.clone());
    }

    /// Every listener is bound: `/ready` may say yes.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::SeqCst);
    }

    /// Ends the event streams and stops the admin server.
    pub(crate) async fn shutdown(&self) {
        let _ = self.state.stop.send(true);
        self.http.shutdown().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a connection with local address `local` came in through the listener bound to
/// `listener`: the same address, or the same port (a listener on 0.0.0.0 or [::] sees the
/// address the client dialled).
fn same_listener(listener: &str, local: &str) -> bool {
    let port = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_owned());
    listener == local || (port(listener).is_some() && port(listener) == port(local))
}

/// Equal in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl AdminState {
    fn push_error(&self, message: String) {
        let mut errors = lock(&self.errors);
        if errors.len() == MAX_ERRORS {
            errors.pop_front();
        }
        errors.push_back(json!({"t": now_ms(), "message": message}));
    }

    fn authorized(&self, stream: &ServerStream) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let head = stream.get_headers();
        let bearer = head
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        bearer
            .or_else(|| query_param(&head.path, "token"))
            .is_some_and(|given| same(given, token))
    }

    async fn handle(self: Arc<Self>, mut stream: ServerStream) -> Result<(), HttpError> {
        let path = stream.get_headers().path.clone();
        let route = path.split('?').next().unwrap_or("");
        if stream.get_headers().method != "GET" && stream.get_headers().method != "HEAD" {
            return reply(&mut stream, 405, "text/plain", "GET only\n").await;
        }
        if route == "/health" {
            return reply(&mut stream, 200, "text/plain", "ok\n").await;
        }
        if !self.authorized(&stream) {
            return reply(&mut stream, 401, "text/plain", "admin token required\n").await;
        }
        match route {
            "/metrics" => {
                let text = self.handle.render();
                reply(&mut stream, 200, "text/plain; version=0.0.4", &text).await
            }
            "/ready" => {
                let (status, body) = self.readiness().await;
                reply(&mut stream, status, "application/json", &body.to_string()).await
            }
            "/" | "/index.html" => reply(&mut stream, 200, "text/html; charset=utf-8", PAGE).await,
            "/admin.js" => reply(&mut stream, 200, "text/javascript", SCRIPT).await,
            "/admin.css" => reply(&mut stream, 200, "text/css", STYLE).await,
            "/snapshot" => {
                let body = self.snapshot().to_string();
                reply(&mut stream, 200, "application/json", &body).await
            }
            "/events" => self.events(stream).await,
            _ => reply(&mut stream, 404, "text/plain", "not found\n").await,
        }
    }

    async fn readiness(&self) -> (u16, Json) {
        let listening = self.ready.load(Ordering::SeqCst);
        // Any read proves the store answers; the id is one no session has.
        let probe = tokio::time::timeout(
            STORE_PROBE_TIMEOUT,
            self.store.get("tether-admin-readiness-probe"),
        )
        .await;
        let store = match probe {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {STORE_PROBE_TIMEOUT:?}")),
        };
        let ok = listening && store.is_ok();
        let body = json!({
            "ready": ok,
            "listeners": listening,
            "store": store.as_ref().map(|()| "ok").unwrap_or_else(|e| e.as_str()),
        });
        (if ok { 200 } else { 503 }, body)
    }

    async fn events(self: Arc<Self>, mut stream: ServerStream) -> Result<(), HttpError> {
        let Ok(_viewer) = self.viewers.try_acquire() else {
            return reply(
                &mut stream,
                503,
                "text/plain",
                "too many admin pages open\n",
            )
            .await;
        };
        let headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ];
        stream.write_headers(200, &headers, false).await?;
        let mut stop = self.stop.subscribe();
        let mut every = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let line = format!("data: {}\n\n", self.snapshot());
            if stream.write_chunk(Bytes::from(line), false).await.is_err() {
                // The page went away.
                return Ok(());
            }
        }
        stream.write_chunk(Bytes::new(), true).await
    }

    /// The page's figures, from the recorder's own rendering (parsed, not re-counted).
    fn snapshot(&self) -> Json {
        let text = self.handle.render();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).ok();
        let samples = scrape.as_ref().map_or(&[][..], |s| &s.samples[..]);
        let sum = |name: &str, filter: &dyn Fn(&prometheus_parse::Sample) -> bool| -> f64 {
            samples
                .iter()
                .filter(|s| s.metric == name && filter(s))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                })
                // Not `sum()`: an empty f64 sum is -0.0, which the page would show as "-0".
                .fold(0.0, |a, b| a + b)
        };
        let all = |_: &prometheus_parse::Sample| true;
        use tether::metrics as m;
        let mut transports: Vec<Json> = Vec::new();
        for s in samples.iter().filter(|s| s.metric == m::CONNECTIONS_OPENED) {
            let (t, p) = (
                s.labels.get("transport").unwrap_or(""),
                s.labels.get("protocol").unwrap_or(""),
            );
            let same_labels = |x: &prometheus_parse::Sample| {
                x.labels.get("transport") == Some(t) && x.labels.get("protocol") == Some(p)
            };
            transports.push(json!({
                "transport": t,
                "protocol": p,
                "opened": sum(m::CONNECTIONS_OPENED, &same_labels),
                "open": sum(m::CONNECTIONS, &same_labels),
            }));
        }
        // Per listener: the handshaken clients that came in through it. The conductor
        // listeners share one server that does not tell its clients apart by listener, so each
        // conductor row counts the clients of them all.
        let clients = self.server.clients();
        let conductor_clients = self.conductor.get().map_or(0, |c| c.clients().len());
        let listeners: Vec<Json> = lock(&self.listeners)
            .iter()
            .map(|l| {
                let addr = l["addr"].as_str().unwrap_or("");
                if l["kind"] == "conductor" {
                    return json!({"kind": "conductor", "addr": addr, "clients": conductor_clients});
                }
                let n = clients
                    .iter()
                    .filter(|c| {
                        c.local_addr()
                            .is_some_and(|local| same_listener(addr, &local))
                    })
                    .count();
                json!({"kind": l["kind"], "addr": addr, "clients": n})
            })
            .collect();
        json!({
            "t": now_ms(),
            "ready": self.ready.load(Ordering::SeqCst),
            "clients": clients.len(),
            // Peers of the node (JSTP, conductor); HTTP, mostly this endpoint's own, is in
            // `transports`.
            "connections": sum(m::CONNECTIONS, &|s| s.labels.get("protocol") != Some("http")),
            "calls": sum(m::CALLS, &all),
            "call_errors": sum(m::CALLS, &|s| s.labels.get("outcome") == Some("error")),
            "events_sent": sum(m::EVENTS_SENT, &all),
            "events_received": sum(m::EVENTS_RECEIVED, &all),
            "sessions": {
                "started": sum(m::SESSIONS_STARTED, &all),
                "detached": sum(m::SESSIONS_DETACHED, &all),
                "restored": sum(m::SESSIONS_RESTORED, &all),
                "expired": sum(m::SESSIONS_EXPIRED, &all),
            },
            "slow_consumers": sum(m::SLOW_CONSUMERS, &all),
            "store": {
                "operations": sum(m::STORE_OPERATIONS, &all),
                "errors": sum(m::STORE_OPERATIONS, &|s| s.labels.get("outcome") == Some("error")),
            },
            "listeners": listeners,
            "transports": transports,
            "errors": lock(&self.errors).iter().rev().cloned().collect::<Vec<_>>(),
        })
    }
}

async fn reply(
    stream: &mut ServerStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> Result<(), HttpError> {
    let len = body.len().to_string();
    let headers = [
        ("content-type", content_type),
        ("content-length", len.as_str()),
        ("cache-control", "no-store"),
    ];
    stream.write_headers(status, &headers, false).await?;
    stream
        .write_chunk(Bytes::copy_from_slice(body.as_bytes()), true)
        .await
}

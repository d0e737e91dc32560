//! The driver: one task per connection that owns its transport and session.
//!
//! A short loop: read a batch of messages → decide → queue what to write → write it in one
//! batch, while commands from handles, method futures, deadlines and timers are served in the
//! same `select!`. Nothing in the loop waits on the peer: writes go through the [`Writer`]'s
//! queue, so a stalled peer never keeps the driver from answering a restore, a close or a
//! timer. Reading pauses (TCP backpressure) while too many calls run or too many replies wait
//! for the transport.
//!
//! **Order.** Calls start in arrival order on this task (no task per call): the synchronous
//! part of each method, and anything it emits, happens in that order; methods that finish at
//! once are answered in arrival order. A method's events are written before its callback.

use super::outbound::{Thresholds, Writer};
use super::{
    ClientHandshake, ClientReconnect, Command, Connection, ConnectionEvent, HandshakeDecision,
    OutgoingRequest, Reply, RequestCmd, Role, ServerHooks, SessionFate,
};
use crate::app::{Application, MethodResult};
use crate::error::Error;
use crate::transport::{self, Endpoint, MessageStream, Transport, TransportError};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::session::RequestKind;
use tether_wire::{
    CallbackResult, ErrorCode, HandshakeResult, Message, PreparedEvent, RemoteErrorArray, Session,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::time::{delay_queue, DelayQueue};

mod handshake;
mod link;

enum PendingKind {
    Request(Reply),
    /// A heartbeat or confirmation ping nobody awaits; unanswered, it means the link is dead.
    Heartbeat,
}

struct Pending {
    kind: PendingKind,
    key: delay_queue::Key,
    timeout: Duration,
}

pub(super) type HandshakeReply = oneshot::Sender<Result<(), Error>>;

type Running = BoxFuture<'static, (i64, MethodResult)>;

/// Where a connection is in its life.
enum Phase {
    /// Waiting for the first handshake (request on a server, response on a client).
    Handshake,
    /// Handshaken, with a transport.
    Open,
    /// Client: transport lost; the next attempt starts at the timer.
    Waiting { endpoint: Endpoint },
    /// Client: a transport is being connected.
    Connecting,
    /// Client: the restore (`fresh`: a new-session) handshake went out on a new transport.
    Restoring { fresh: bool },
    /// Server: transport lost; the session waits for its client until the timer.
    Detached,
}

pub(super) struct Driver {
    conn: Connection,
    role: Role,
    /// The attached transport's two halves (both or neither).
    incoming: Option<MessageStream>,
    writer: Option<Writer>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    closed_tx: watch::Sender<bool>,
    hooks: Option<Arc<dyn ServerHooks>>,
    app: Option<Arc<Application>>,
    pending: HashMap<i64, Pending>,
    /// Made on the first request with a deadline: an idle connection keeps no timer wheel
    /// (several KiB).
    deadlines: Option<DelayQueue<i64>>,
    /// Methods of ours the peer called that have not finished yet.
    calls: FuturesUnordered<Running>,
    /// The session, from the handshake on.
    session: Option<Session>,
    phase: Phase,
    /// The phase's deadline: handshake timeout, next reconnect attempt, restore timeout, or
    /// the end of a detached session's wait.
    timer: Option<tokio::time::Instant>,
    handshake_done: bool,
    ready_notified: bool,
    heartbeat: Option<tokio::time::Interval>,
    /// Client: how to reconnect (`None`: never).
    pub(super) reconnect: Option<ClientReconnect>,
    pub(super) client_handshake: Option<ClientHandshake>,
    connecting: Option<BoxFuture<'static, Result<Transport, Error>>>,
    /// Failed reconnect attempts in a row.
    failures: u32,
    /// Client: the server refused our session; the next transport starts a new one.
    new_session_next: bool,
    /// Buffered bytes and messages sent since we last asked for a confirmation.
    since_ack: (usize, usize),
    thresholds: Thresholds,
    /// The session was given up (its buffer overflowed): never save it for a restore.
    discard_session: bool,
    /// A handle asked to close while commands were drained outside the loop.
    close_requested: bool,
    /// The first handshake's deadline, as a duration (for its timeout error).
    handshake_timeout: Duration,
    /// Server: how long a detached session waits for its client.
    pub(super) client_expiration: Duration,
}

/// Why the driver (or its current transport) stops.
enum Stop {
    /// Local close or a protocol-mandated close: write what is queued, then FIN/close frame.
    Graceful,
    /// The connection ends for good (a protocol violation, or a transport loss that cannot be
    /// recovered).
    Gone(Option<String>),
    /// The transport failed or ended; the session may survive it.
    LinkLost(Option<String>),
    /// Server: this transport now serves another connection that restored its session.
    HandedOver,
}

const REJECT_PREVIEW: usize = 1024;
/// Messages taken from the transport (or commands from handles) in one step before writing.
const BATCH: usize = 64;
/// How long a closing connection may take to write what it has queued and close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

async fn next_incoming(
    incoming: &mut Option<MessageStream>,
) -> Option<Result<String, TransportError>> {
    match incoming {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn tick(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn until(timer: Option<tokio::time::Instant>) {
    match timer {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn connected(
    connecting: &mut Option<BoxFuture<'static, Result<Transport, Error>>>,
) -> Result<Transport, Error> {
    match connecting {
        Some(f) => {
            let r = f.await;
            *connecting = None;
            r
        }
        None => std::future::pending().await,
    }
}

async fn next_deadline(
    deadlines: &mut Option<DelayQueue<i64>>,
) -> Option<delay_queue::Expired<i64>> {
    match deadlines {
        Some(q) if !q.is_empty() => q.next().await,
        _ => std::future::pending().await,
    }
}

async fn write_out(writer: &mut Option<Writer>, session: Option<&Session>) -> Result<(), Stop> {
    match writer {
        Some(w) => std::future::poll_fn(|cx| w.poll_write(cx, session))
            .await
            .map_err(|e| Stop::LinkLost(Some(e.to_string()))),
        None => std::future::pending().await,
    }
}

fn heartbeat_interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// A method's future that did not finish at its first poll, catching a panic as JSTP's
/// internal error (16) instead of taking the connection (or the process) down.
fn guard(id: i64, fut: BoxFuture<'static, MethodResult>) -> Running {
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .map(move |r| {
            let result =
                r.unwrap_or_else(|_| Err(RemoteErrorArray::code(ErrorCode::InternalApiError)));
            (id, result)
        })
        .boxed()
}

impl Driver {
    pub(super) fn new(
        conn: Connection,
        transport: Transport,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
        closed_tx: watch::Sender<bool>,
        hooks: Option<Arc<dyn ServerHooks>>,
        role: Role,
    ) -> Self {
        let app = conn.identity().app.clone();
        let thresholds = Thresholds::new(&conn.shared.config.session);
        Driver {
            role,
            incoming: Some(transport.incoming),
            writer: Some(Writer::new(transport.outgoing)),
            cmd_rx,
            closed_tx,
            hooks,
            app,
            pending: HashMap::new(),
            deadlines: None,
            calls: FuturesUnordered::new(),
            session: None,
            phase: Phase::Handshake,
            timer: None,
            handshake_done: false,
            ready_notified: false,
            heartbeat: None,
            reconnect: None,
            client_handshake: None,
            connecting: None,
            failures: 0,
            new_session_next: false,
            since_ack: (0, 0),
            thresholds,
            discard_session: false,
            close_requested: false,
            handshake_timeout: Duration::ZERO,
            client_expiration: Duration::from_secs(3600),
            conn,
        }
    }

    /// Records a sent request that awaits its answer within `timeout`.
    fn await_answer(&mut self, id: i64, kind: PendingKind, timeout: Duration) {
        let key = self
            .deadlines
            .get_or_insert_with(DelayQueue::new)
            .insert(id, timeout);
        self.pending.insert(id, Pending { kind, key, timeout });
    }

    /// The session's unconfirmed backlog, as an [`Error::SlowConsumer`] reports it.
    fn slow_consumer(&self) -> Error {
        let (bytes, messages) = self
            .session
            .as_ref()
            .map_or((0, 0), |s| (s.buffered_bytes(), s.buffered_len()));
        Error::SlowConsumer { bytes, messages }
    }

    /// Queues every still-unconfirmed message again, in order, after a restore.
    fn resend_buffered(&mut self) {
        if let (Some(session), Some(w)) = (self.session.as_ref(), self.writer.as_mut()) {
            for m in session.buffered() {
                w.push_buffered(m.id);
            }
        }
    }

    fn forget_deadline(&mut self, key: &delay_queue::Key) {
        if let Some(q) = self.deadlines.as_mut() {
            q.remove(key);
        }
    }

    fn emit_event(&self, ev: ConnectionEvent) {
        self.conn.notify(ev);
    }

    /// Whether messages may be written now: a transport, and no restore in progress.
    fn can_write(&self) -> bool {
        self.writer.is_some() && matches!(self.phase, Phase::Open | Phase::Handshake)
    }

    /// Queues an unbuffered message on the current transport regardless of phase.
    fn write(&mut self, msg: &Message) {
        if let Some(w) = self.writer.as_mut() {
            w.push_text(msg.encode());
        }
    }

    /// Records a buffered message in the session and queues it if the transport is usable.
    fn send_buffered(&mut self, id: i64, kind: RequestKind, text: String) -> Result<(), Error> {
        let len = text.len();
        if let Some(session) = self.session.as_mut() {
            session
                .on_send_owned(id, kind, text)
                .map_err(|(e, _)| Error::Session(e))?;
            if self.can_write() {
                if let Some(w) = self.writer.as_mut() {
                    w.push_buffered(id);
                }
            }
        } else if let Some(w) = self.writer.as_mut() {
            w.push_text(text);
        }
        if kind != RequestKind::Ping {
            self.since_ack.0 += len;
            self.since_ack.1 += 1;
        }
        Ok(())
    }

    fn send_buffered_message(&mut self, msg: &Message) -> Result<(), Error> {
        let Some((kind, id)) = RequestKind::of(msg) else {
            self.write(msg);
            return Ok(());
        };
        self.send_buffered(id, kind, msg.encode())
    }

    fn next_id(&self) -> i64 {
        match &self.session {
            Some(s) => s.next_message_id(),
            None => 0,
        }
    }

    pub(super) async fn run(
        mut self,
        handshake_timeout: Duration,
        handshake_reply: Option<HandshakeReply>,
    ) {
        let mut handshake_reply = handshake_reply;
        self.handshake_timeout = handshake_timeout;
        self.timer = Some(tokio::time::Instant::now() + handshake_timeout);
        if let Some(hs) = self.client_handshake.clone() {
            self.write(&Message::HandshakeRequest {
                id: 0,
                app: hs.app,
                version: hs.version,
                auth: hs.auth,
            });
        }
        let stop = match self.main_loop(&mut handshake_reply).await {
            Ok(()) => Stop::Graceful,
            Err(stop) => stop,
        };
        self.shutdown(stop, handshake_reply).await;
    }

    /// Whether to take more messages from the peer now.
    fn reading(&self) -> bool {
        let config = &self.conn.shared.config;
        self.incoming.is_some()
            && self.calls.len() < config.max_calls_in_flight.max(1)
            && self
                .writer
                .as_ref()
                .is_some_and(|w| w.text_backlog() < config.max_reply_backlog.max(1))
    }

    async fn main_loop(
        &mut self,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        loop {
            if self.close_requested {
                return Ok(());
            }
            let reading = self.reading();
            let writing = self.writer.as_ref().is_some_and(Writer::wants_write);
            let step: Result<(), Stop> = tokio::select! {
                written = write_out(&mut self.writer, self.session.as_ref()), if writing => written,
                Some((id, result)) = self.calls.next(), if !self.calls.is_empty() => {
                    self.answer(id, result)
                },
                incoming = next_incoming(&mut self.incoming), if reading => {
                    self.on_incoming(incoming, handshake_reply).await
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Close) | None => return Ok(()),
                    // Batch whatever else is queued before writing.
                    Some(cmd) => self.on_command(cmd).and_then(|()| self.drain_commands(BATCH)),
                },
                Some(expired) = next_deadline(&mut self.deadlines) => {
                    self.on_deadline(expired.into_inner())
                },
                _ = tick(&mut self.heartbeat) => self.send_heartbeat_ping(),
                _ = until(self.timer) => self.on_timer(handshake_reply),
                transport = connected(&mut self.connecting) => self.on_connected(transport),
            };
            let step = step.and_then(|()| self.after_step());
            match step {
                Ok(()) => {}
                Err(Stop::LinkLost(reason)) => self.on_link_lost(reason, handshake_reply)?,
                Err(stop) => return Err(stop),
            }
            self.conn
                .shared
                .flow
                .update(self.session.as_ref(), self.attached());
        }
    }

    fn attached(&self) -> bool {
        self.writer.is_some() && matches!(self.phase, Phase::Open)
    }

    /// After every step: ask for a confirmation when enough went out unconfirmed since the
    /// last request for one (the pong confirms everything before it, so a peer that reads
    /// never lets the buffer fill).
    fn after_step(&mut self) -> Result<(), Stop> {
        if !self.attached() {
            return Ok(());
        }
        let (bytes, messages) = self.since_ack;
        if self.thresholds.wants_ack(bytes, messages) {
            self.send_heartbeat_ping()?;
        }
        Ok(())
    }

    /// A message (or the end) from the transport, then whatever else it has ready.
    async fn on_incoming(
        &mut self,
        incoming: Option<Result<String, TransportError>>,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let mut next = incoming;
        let mut taken = 1;
        loop {
            match next {
                Some(Ok(text)) => self.on_text(text, handshake_reply).await?,
                Some(Err(e)) => return Err(Stop::LinkLost(Some(e.to_string()))),
                None => return Err(Stop::LinkLost(None)),
            }
            if taken == BATCH || !self.reading() {
                return Ok(());
            }
            // Only take a message that will be handled in this step.
            match self.incoming.as_mut().and_then(|s| s.next().now_or_never()) {
                Some(more) => next = more,
                None => return Ok(()),
            }
            taken += 1;
        }
    }

    fn on_deadline(&mut self, id: i64) -> Result<(), Stop> {
        let Some(p) = self.pending.remove(&id) else {
            return Ok(());
        };
        match p.kind {
            PendingKind::Request(reply) => {
                let _ = reply.send(Err(Error::Timeout(p.timeout)));
                Ok(())
            }
            // A ping of ours unanswered for a whole call timeout: the link is dead or the peer
            // does not read; either way the session is better off restored on a new one.
            PendingKind::Heartbeat if self.attached() => {
                let reason = format!(
                    "{} and no pong within {:?}",
                    self.slow_consumer(),
                    p.timeout
                );
                tracing::warn!(conn = self.conn.id(), %reason, "detaching the peer");
                self.emit_event(ConnectionEvent::Error {
                    error: reason.clone(),
                });
                Err(Stop::LinkLost(Some(reason)))
            }
            PendingKind::Heartbeat => Ok(()),
        }
    }

    fn on_timer(&mut self, handshake_reply: &mut Option<HandshakeReply>) -> Result<(), Stop> {
        self.timer = None;
        match std::mem::replace(&mut self.phase, Phase::Open) {
            Phase::Handshake => {
                self.phase = Phase::Handshake;
                if let Some(h) = &self.hooks {
                    h.on_handshake_timeout(&self.conn);
                }
                if let Some(reply) = handshake_reply.take() {
                    let _ = reply.send(Err(Error::Timeout(self.handshake_timeout)));
                }
                Err(Stop::Gone(Some("handshake timeout".into())))
            }
            Phase::Waiting { endpoint } => self.start_attempt(endpoint),
            Phase::Restoring { .. } => {
                self.phase = Phase::Restoring { fresh: false };
                Err(Stop::LinkLost(Some(
                    "no answer to the restore handshake".into(),
                )))
            }
            Phase::Detached => {
                self.phase = Phase::Detached;
                crate::metrics::session_expired();
                Err(Stop::Gone(Some("session expired".into())))
            }
            other => {
                self.phase = other;
                Ok(())
            }
        }
    }

    /// Asks the peer for a confirmation (and proof of life) with a ping nobody awaits.
    fn send_heartbeat_ping(&mut self) -> Result<(), Stop> {
        if !matches!(self.phase, Phase::Open) {
            return Ok(());
        }
        let id = self.next_id();
        if self.send_buffered_message(&Message::Ping { id }).is_err() {
            // Cannot happen while attached (a peer is detached at half the bounds); a full
            // buffer ends the session on the next event anyway.
            return Ok(());
        }
        self.since_ack = (0, 0);
        let timeout = self.conn.shared.config.call_timeout;
        self.await_answer(id, PendingKind::Heartbeat, timeout);
        Ok(())
    }

    fn on_command(&mut self, cmd: Command) -> Result<(), Stop> {
        match cmd {
            Command::Request(request) => {
                let RequestCmd {
                    kind,
                    timeout,
                    reply,
                } = *request;
                if !self.handshake_done {
                    let _ = reply.send(Err(Error::Protocol("handshake not done".into())));
                    return Ok(());
                }
                if self.pending.len() >= self.conn.shared.config.max_pending {
                    let _ = reply.send(Err(Error::QueueFull));
                    return Ok(());
                }
                let id = self.next_id();
                let msg = match kind {
                    OutgoingRequest::Call {
                        iface,
                        method,
                        args,
                    } => Message::Call {
                        id,
                        iface,
                        method,
                        args: tether_wire::Value::Array(args),
                    },
                    OutgoingRequest::Inspect { iface } => Message::Inspect { id, iface },
                    OutgoingRequest::Ping => Message::Ping { id },
                };
                if let Err(e) = self.send_buffered_message(&msg) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                self.await_answer(id, PendingKind::Request(reply), timeout);
                Ok(())
            }
            Command::Emit { event, len } => {
                self.conn.shared.flow.taken(len);
                self.on_emit(&event)
            }
            Command::Overflow => self.overflow(),
            Command::Heartbeat(interval) => {
                self.conn.identity().heartbeat = interval;
                self.heartbeat = interval
                    .filter(|_| matches!(self.phase, Phase::Open))
                    .map(heartbeat_interval);
                Ok(())
            }
            Command::Flush(tx) => {
                let mut n = 0;
                // Every deadline goes with its request.
                self.deadlines = None;
                for (_, p) in self.pending.drain() {
                    if let PendingKind::Request(reply) = p.kind {
                        let _ = reply.send(Err(Error::Flushed));
                        n += 1;
                    }
                }
                let _ = tx.send(n);
                Ok(())
            }
            Command::Adopt(adopt) => {
                let (transport, peer_received) = *adopt;
                self.adopt(transport, peer_received)
            }
            Command::Close => Ok(()),
        }
    }

    fn on_emit(&mut self, event: &PreparedEvent) -> Result<(), Stop> {
        // Handles queue events only once the handshake is done (and so a session exists).
        crate::metrics::event_sent();
        let id = self.next_id();
        match self.send_buffered(id, RequestKind::Event, event.with_id(id)) {
            Ok(()) => Ok(()),
            Err(_) => self.overflow(),
        }
    }

    /// The session's buffer cannot take an event: the peer would miss it for good, so the
    /// session ends (and is not kept for a restore, which would be silently incomplete).
    fn overflow(&mut self) -> Result<(), Stop> {
        let reason = self.slow_consumer();
        crate::metrics::slow_consumer(self.session.as_ref());
        tracing::warn!(conn = self.conn.id(), %reason, "resend buffer full: session ended");
        self.emit_event(ConnectionEvent::Error {
            error: reason.to_string(),
        });
        self.discard_session = true;
        Err(Stop::Gone(Some(format!("session ended: {reason}"))))
    }

    /// A method of ours finished: whatever it queued first (a method's emits travel on the
    /// command channel), then its callback. Callbacks are never buffered: one that cannot be
    /// written is lost with the transport, and the peer learns that as CALLBACK_LOST on
    /// restore.
    fn answer(&mut self, id: i64, result: MethodResult) -> Result<(), Stop> {
        self.drain_commands(usize::MAX)?;
        if self.can_write() {
            let result = match result {
                // A Node peer cannot parse NaN or ±Infinity: answer 16 and say why here.
                Ok(v) if super::check_finite(std::slice::from_ref(&v)).is_err() => {
                    tracing::warn!(
                        conn = self.conn.id(),
                        id,
                        "a method returned a non-finite number"
                    );
                    CallbackResult::Error(RemoteErrorArray::code(ErrorCode::InternalApiError))
                }
                Ok(v) => CallbackResult::Ok(vec![v]),
                Err(e) => CallbackResult::Error(e),
            };
            self.write(&Message::Callback { id, result });
        }
        Ok(())
    }

    /// Serves up to `limit` commands queued so far, in order; a close is noted for the loop.
    fn drain_commands(&mut self, limit: usize) -> Result<(), Stop> {
        for _ in 0..limit {
            let Ok(cmd) = self.cmd_rx.try_recv() else {
                break;
            };
            match cmd {
                Command::Close => {
                    self.close_requested = true;
                    return Ok(());
                }
                cmd => self.on_command(cmd)?,
            }
        }
        Ok(())
    }

    fn heartbeat_setting(&self) -> Option<Duration> {
        self.conn.identity().heartbeat
    }

    fn reject(&self, text: &str, reason: impl Into<String>) {
        let mut preview = text.to_owned();
        if preview.len() > REJECT_PREVIEW {
            let mut cut = REJECT_PREVIEW;
            while !preview.is_char_boundary(cut) {
                cut -= 1;
            }
            preview.truncate(cut);
        }
        let reason = reason.into();
        tracing::debug!(conn = self.conn.id(), %reason, "message rejected");
        self.emit_event(ConnectionEvent::MessageRejected {
            message: preview,
            reason,
        });
    }

    async fn on_text(
        &mut self,
        text: String,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let msg = match Message::parse(&text) {
            Ok(m) => m,
            Err(e) => {
                // `@metarhia/jstp` destroys the transport on a parse error; a message that
                // parses but has a malformed header is only rejected once the handshake is done.
                let fatal = matches!(
                    e,
                    tether_wire::DecodeError::Parse(_) | tether_wire::DecodeError::NotAnObject
                ) || !self.handshake_done;
                self.reject(&text, e.to_string());
                if fatal {
                    let err = format!("invalid message: {e}");
                    self.emit_event(ConnectionEvent::Error { error: err.clone() });
                    return Err(Stop::Gone(Some(err)));
                }
                return Ok(());
            }
        };
        if let Some(session) = self.session.as_mut() {
            session.on_receive(&msg);
        }
        match msg {
            Message::Heartbeat => {
                self.emit_event(ConnectionEvent::Heartbeat);
                Ok(())
            }
            Message::HandshakeRequest {
                app, version, auth, ..
            } => {
                if self.role == Role::Client {
                    // Only servers answer handshakes.
                    self.write(&Message::HandshakeResponse {
                        id: 0,
                        result: HandshakeResult::Error(RemoteErrorArray::code(
                            ErrorCode::NotAServer,
                        )),
                    });
                    self.reject(&text, "handshake request sent to a client");
                    return Err(Stop::Graceful);
                }
                if self.handshake_done {
                    self.reject(&text, "second handshake");
                    return Err(Stop::Gone(Some("second handshake".into())));
                }
                self.server_handshake(app, version, auth).await
            }
            Message::HandshakeResponse { result, .. } => match (self.role, &self.phase) {
                (Role::Client, Phase::Handshake) => {
                    self.client_handshake_response(result, handshake_reply)
                }
                (Role::Client, Phase::Restoring { fresh }) => {
                    let fresh = *fresh;
                    self.client_restore_response(result, fresh)
                }
                _ => {
                    self.reject(&text, "unexpected handshake response");
                    Err(Stop::Gone(Some("unexpected handshake response".into())))
                }
            },
            _ if !self.handshake_done => {
                self.reject(&text, "message before handshake");
                Err(Stop::Gone(Some("message before handshake".into())))
            }
            Message::Call {
                id,
                iface,
                method,
                args,
            } => self.on_call(&text, id, iface, method, args),
            Message::Callback { id, result } => {
                let Some(p) = self.pending.remove(&id) else {
                    self.reject(&text, "callback for an unknown request");
                    return Ok(());
                };
                self.forget_deadline(&p.key);
                let (res, error) = match result {
                    CallbackResult::Ok(values) => (Ok(values), None),
                    CallbackResult::Error(e) => (Err(Error::Remote(e.clone())), Some(e)),
                    CallbackResult::Empty => {
                        self.reject(&text, "callback with neither ok nor error");
                        (
                            Err(Error::Protocol("callback with neither ok nor error".into())),
                            None,
                        )
                    }
                };
                self.emit_event(ConnectionEvent::Callback { id, error });
                if let PendingKind::Request(reply) = p.kind {
                    let _ = reply.send(res);
                }
                Ok(())
            }
            Message::Event {
                iface, event, args, ..
            } => {
                let tether_wire::Value::Array(args) = args else {
                    self.reject(&text, "event arguments are not an array");
                    return Ok(());
                };
                crate::metrics::event_received();
                if let Some(app) = &self.app {
                    app.handle_event(self.conn.clone(), &iface, &event, args.clone());
                }
                self.emit_event(ConnectionEvent::Event { iface, event, args });
                Ok(())
            }
            Message::Inspect { id, iface } => {
                self.emit_event(ConnectionEvent::Inspect {
                    iface: iface.clone(),
                });
                let result = match self.app.as_ref().and_then(|a| a.methods(&iface)) {
                    Some(names) => CallbackResult::Ok(
                        names.into_iter().map(tether_wire::Value::from).collect(),
                    ),
                    None => {
                        CallbackResult::Error(RemoteErrorArray::code(ErrorCode::InterfaceNotFound))
                    }
                };
                self.write(&Message::Callback { id, result });
                Ok(())
            }
            Message::Ping { id } => {
                self.emit_event(ConnectionEvent::Ping { id });
                self.write(&Message::Pong { id });
                Ok(())
            }
            Message::Pong { id } => {
                match self.pending.remove(&id) {
                    Some(p) => {
                        self.forget_deadline(&p.key);
                        if let PendingKind::Request(reply) = p.kind {
                            let _ = reply.send(Ok(Vec::new()));
                        }
                    }
                    None => self.reject(&text, "pong for an unknown ping"),
                }
                self.emit_event(ConnectionEvent::Pong { id });
                Ok(())
            }
            Message::Unknown { kind, .. } => {
                self.reject(&text, format!("unknown message kind '{kind}'"));
                Ok(())
            }
        }
    }

    /// The peer called one of our methods: start it here, now, so calls begin in arrival
    /// order; answer at once if it finished, else keep it running with the others.
    fn on_call(
        &mut self,
        text: &str,
        id: i64,
        iface: String,
        method: String,
        args: tether_wire::Value,
    ) -> Result<(), Stop> {
        let tether_wire::Value::Array(args) = args else {
            self.reject(text, "call arguments are not an array");
            let result = CallbackResult::Error(RemoteErrorArray::code(ErrorCode::InvalidSignature));
            self.write(&Message::Callback { id, result });
            return Ok(());
        };
        if self.conn.watched() {
            self.emit_event(ConnectionEvent::Call {
                iface: iface.clone(),
                method: method.clone(),
                args: args.clone(),
            });
        }
        let started = match &self.app {
            Some(app) => {
                let conn = self.conn.clone();
                // A method whose closure panics before returning its future answers 16 too.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    app.call(conn, &iface, &method, args)
                }))
                .unwrap_or_else(|_| Err(RemoteErrorArray::code(ErrorCode::InternalApiError)))
            }
            None => Err(RemoteErrorArray::code(ErrorCode::InterfaceNotFound)),
        };
        let started = crate::metrics::time_call(&iface, &method, started);
        match started {
            Err(e) => self.answer(id, Err(e)),
            Ok(mut fut) => {
                // First poll here, without a waker: most methods finish at once and need no
                // more (no task, no second allocation). One that waits is polled again from
                // `calls`, which registers the real waker.
                let waker = futures::task::noop_waker_ref();
                let mut cx = std::task::Context::from_waker(waker);
                let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fut.as_mut().poll(&mut cx)
                }));
                match first {
                    Ok(std::task::Poll::Ready(result)) => self.answer(id, result),
                    Ok(std::task::Poll::Pending) => {
                        self.calls.push(guard(id, fut));
                        Ok(())
                    }
                    Err(_) => {
                        self.answer(id, Err(RemoteErrorArray::code(ErrorCode::InternalApiError)))
                    }
                }
            }
        }
    }

    async fn shutdown(mut self, stop: Stop, handshake_reply: Option<HandshakeReply>) {
        crate::metrics::session_left_detached(matches!(self.phase, Phase::Detached));
        let handed_over = matches!(stop, Stop::HandedOver);
        if let Stop::Gone(Some(reason)) | Stop::LinkLost(Some(reason)) = &stop {
            tracing::debug!(conn = self.conn.id(), %reason, "connection closed");
            if let Some(h) = &self.hooks {
                h.on_error(&self.conn, reason);
            }
        }
        self.conn.shared.flow.close();
        self.incoming = None;
        if let Some(mut writer) = self.writer.take() {
            // Orderly close on our side, bounded: a peer that does not read gets no say.
            let session = self.session.as_ref();
            let _ = tokio::time::timeout(CLOSE_GRACE, writer.finish(session)).await;
        }
        self.connecting = None;
        self.calls = FuturesUnordered::new();
        self.cmd_rx.close();
        // Every pending request ends here.
        if let Some(reply) = handshake_reply {
            let _ = reply.send(Err(Error::NoHandshakeResponse));
        }
        for (_, p) in self.pending.drain() {
            if let PendingKind::Request(reply) = p.kind {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                Command::Request(request) => {
                    let _ = request.reply.send(Err(Error::Closed));
                }
                Command::Flush(tx) => {
                    let _ = tx.send(0);
                }
                Command::Emit { len, .. } => self.conn.shared.flow.taken(len),
                // Too late to restore here; dropping the transport ends it too.
                Command::Adopt(_) => {}
                _ => {}
            }
        }
        self.conn.identity().closed = true;
        self.emit_event(ConnectionEvent::Close);
        if let Some(h) = &self.hooks {
            let fate = if handed_over {
                SessionFate::HandedOver
            } else if self.discard_session {
                SessionFate::Discard
            } else {
                match &self.session {
                    Some(s) => SessionFate::Keep(s.encode()),
                    None => SessionFate::HandedOver,
                }
            };
            h.on_close(&self.conn, self.ready_notified, fate).await;
        }
        let _ = self.closed_tx.send(true);
    }
}

//! JSTP sessions, sans IO: the resend buffer, delivery counters and the restore algorithm.
//!
//! A session outlives connections. Each side keeps one [`Session`] per session id and feeds it
//! what goes over the wire:
//!
//! - every outgoing `call`, `event`, `inspect` and `ping` is recorded in serialized form
//!   ([`Session::on_send`] or [`Session::on_send_message`]) until the peer confirms it;
//! - every incoming message goes through [`Session::on_receive`]: a `call`, `event`, `inspect`
//!   or `ping` sets the received count to the absolute value of its id, and a `callback` or
//!   `pong` with id `n` confirms every buffered message whose id has an absolute value up to
//!   `|n|` (delivery is in order on one connection, so the confirmation is cumulative);
//! - after a reconnect the client sends `session:[id, receivedCount]`
//!   ([`Session::restore_request`]), the server answers `ok:<its receivedCount>`
//!   ([`Session::restored_response`]), and each side calls [`Session::restore`] with the count
//!   the peer reported. The returned [`RestorePlan`] says which requests the peer got but whose
//!   reply is lost (fail them with [`ErrorCode::CallbackLost`]), which texts to send again, word
//!   for word and in order, and which id comes next.
//!
//! `handshake`, `callback` and `pong` messages are never buffered, so a lost reply is never
//! sent again; that is why a lost call ends in `CALLBACK_LOST` rather than being run twice.
//!
//! Two deliberate differences from `@metarhia/jstp` 2.3.0, neither visible on the wire:
//!
//! - the confirmed count only grows: an older (or out-of-order) acknowledgement, or a restore
//!   with a lower count, never moves it back, and counts above the highest id sent are clamped
//!   to it, so a bogus id cannot stop later messages from ever being confirmed;
//! - after a restore both sides continue with `latest + delta` (upstream's server continues
//!   with `latest + 1`, which reuses an id), and the id counter lives in the session, so
//!   requests made while offline or before the restore completes never collide with buffered
//!   ones.
//!
//! The buffer is bounded ([`SessionConfig`]); recording a message that does not fit fails with
//! [`SessionError::BufferFull`] and changes nothing. Events are only confirmed by a later
//! callback or pong, so a side that mostly emits events should ping now and then (a heartbeat
//! does) to keep its buffer small.
//!
//! A session's state encodes to one compact mdsf record ([`Session::encode`]) that a session
//! store can keep and [`Session::decode`] rebuilds; it holds what upstream's `Session#toString`
//! holds (id, user name, counters, buffer, user storage) plus the role.

use std::collections::VecDeque;
use std::fmt;

use thiserror::Error;

use crate::error::{ErrorCode, RemoteErrorArray};
use crate::message::{Auth, HandshakeResult, Message};
use crate::parse::parse;
use crate::ser::{write_string_literal, write_value};
use crate::value::{Object, Value};

/// The id every handshake message carries.
pub const HANDSHAKE_ID: i64 = 0;

/// Default [`SessionConfig::max_buffered_messages`]: 16 384 unconfirmed messages.
pub const DEFAULT_MAX_BUFFERED_MESSAGES: usize = 16 * 1024;

/// Default [`SessionConfig::max_buffered_bytes`]: 64 MiB of unconfirmed message text.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;

/// Which end of the connection a session belongs to; it fixes the direction of message ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that sent the handshake request: ids 1, 2, 3, …
    Client,
    /// The side that answered it: ids −1, −2, −3, …
    Server,
}

impl Role {
    /// The step between consecutive ids: `+1` for the client, `−1` for the server.
    pub fn delta(self) -> i64 {
        match self {
            Role::Client => 1,
            Role::Server => -1,
        }
    }

    /// `"client"` or `"server"`, as stored by [`Session::encode`].
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }

    /// The role named by [`Role::as_str`].
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "client" => Some(Role::Client),
            "server" => Some(Role::Server),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of message a session buffers until the peer confirms them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// A remote call; answered by a `callback`.
    Call,
    /// A remote event; never answered.
    Event,
    /// An interface inspection; answered by a `callback`.
    Inspect,
    /// A ping; answered by a `pong`.
    Ping,
}

impl RequestKind {
    /// The kind key on the wire (`call`, `event`, `inspect`, `ping`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Call => "call",
            RequestKind::Event => "event",
            RequestKind::Inspect => "inspect",
            RequestKind::Ping => "ping",
        }
    }

    /// The kind whose wire key is `name`.
    pub fn from_name(name: &str) -> Option<RequestKind> {
        match name {
            "call" => Some(RequestKind::Call),
            "event" => Some(RequestKind::Event),
            "inspect" => Some(RequestKind::Inspect),
            "ping" => Some(RequestKind::Ping),
            _ => None,
        }
    }

    /// The kind and id of `msg` if it is a message sessions buffer, `None` otherwise
    /// (handshakes, callbacks, pongs, heartbeats and unknown kinds).
    pub fn of(msg: &Message) -> Option<(RequestKind, i64)> {
        match msg {
            Message::Call { id, .. } => Some((RequestKind::Call, *id)),
            Message::Event { id, .. } => Some((RequestKind::Event, *id)),
            Message::Inspect { id, .. } => Some((RequestKind::Inspect, *id)),
            Message::Ping { id } => Some((RequestKind::Ping, *id)),
            _ => None,
        }
    }

    /// Whether the sender waits for a reply (`callback` or `pong`): true for all but events.
    /// These are the requests a restore can report as lost.
    pub fn expects_reply(self) -> bool {
        !matches!(self, RequestKind::Event)
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds on a session's resend buffer. Upstream's buffer is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// The most unconfirmed messages kept ([`DEFAULT_MAX_BUFFERED_MESSAGES`] by default).
    pub max_buffered_messages: usize,
    /// The most bytes of unconfirmed message text kept ([`DEFAULT_MAX_BUFFERED_BYTES`] by
    /// default). A single message longer than this can never be recorded.
    pub max_buffered_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_buffered_messages: DEFAULT_MAX_BUFFERED_MESSAGES,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

impl SessionConfig {
    /// No limits, as upstream.
    pub fn unbounded() -> Self {
        SessionConfig {
            max_buffered_messages: usize::MAX,
            max_buffered_bytes: usize::MAX,
        }
    }
}

/// Which bound of [`SessionConfig`] a message would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferLimit {
    /// [`SessionConfig::max_buffered_messages`].
    Messages,
    /// [`SessionConfig::max_buffered_bytes`].
    Bytes,
}

impl fmt::Display for BufferLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BufferLimit::Messages => "message count",
            BufferLimit::Bytes => "byte size",
        })
    }
}

/// What a session refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// Recording the message would exceed a bound of the buffer; nothing was recorded.
    #[error(
        "session buffer full: the {limit} limit is {max} \
         ({messages} messages, {bytes} bytes buffered, {message_bytes} more bytes refused)"
    )]
    BufferFull {
        /// The bound that would be exceeded.
        limit: BufferLimit,
        /// Its configured value.
        max: usize,
        /// Messages buffered now.
        messages: usize,
        /// Bytes buffered now.
        bytes: usize,
        /// The size of the refused message.
        message_bytes: usize,
    },
    /// The id does not move past the latest buffered id in the role's direction (use
    /// [`Session::next_message_id`]); nothing was recorded.
    #[error("message id {id} does not follow the latest buffered id {latest}")]
    IdOutOfOrder {
        /// The id given.
        id: i64,
        /// The latest id buffered so far (0 if none).
        latest: i64,
    },
    /// A stored session could not be decoded or is inconsistent.
    #[error("invalid stored session: {0}")]
    InvalidState(String),
}

/// One sent message kept until the peer confirms it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferedMessage {
    /// Its id (signed, as sent).
    pub id: i64,
    /// Its kind.
    pub kind: RequestKind,
    /// Its text exactly as sent (without any transport framing).
    pub text: String,
}

/// What to do after a restore; see [`Session::restore`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestorePlan {
    /// Ids of requests that expect a reply (calls, inspects, pings) which the peer received
    /// but had not answered before the link dropped. Their replies will never come: fail the
    /// pending ones with [`ErrorCode::CallbackLost`] (−1), after writing [`Self::resend`].
    pub lost_request_ids: Vec<i64>,
    /// The texts to write again, in this order and unchanged (original ids included). They
    /// stay buffered until confirmed.
    pub resend: Vec<String>,
    /// How many buffered messages this restore confirmed (lost requests included).
    pub confirmed: usize,
    /// The id the next request takes (the same as [`Session::next_message_id`]).
    pub next_message_id: i64,
}

/// The sans-IO state of one JSTP session on one side: the resend buffer, the delivery
/// counters, the id counter, and upstream's per-session user storage.
///
/// A client creates one when the server accepts a new session (`ok:'<id>'`), a server when it
/// creates the session. The driver then records what it sends and receives, and restores the
/// session when a new connection takes over.
///
/// ```
/// use tether_wire::session::{Role, Session, SessionConfig};
/// use tether_wire::{HandshakeResult, Message, Value};
///
/// // Client: the server accepted a new session.
/// let mut client = Session::new("8a3c", Role::Client, SessionConfig::default());
/// for n in [20, 30] {
///     let call = Message::Call {
///         id: client.next_message_id(),
///         iface: "calculator".into(),
///         method: "divide".into(),
///         args: Value::from(vec![n, 10]),
///     };
///     let text = client.on_send_message(&call).unwrap(); // write `text` to the transport
///     assert!(text.starts_with("{call:["));
/// }
/// // The server answers call 1 only: that confirms it (and anything before it).
/// client.on_receive(&Message::parse("{callback:[1],ok:[2]}").unwrap());
/// assert_eq!(client.buffered_len(), 1);
/// // The server sends an event; the client counts it as received.
/// client.on_receive(&Message::parse("{event:[-1,'chat'],message:['hi']}").unwrap());
/// assert_eq!(client.received_count(), 1);
///
/// // The link drops. On a new connection the client asks to restore...
/// let request = client.restore_request("testApp", None);
/// assert_eq!(request.encode(), "{handshake:[0,'testApp'],session:['8a3c',1]}");
/// // ...and the server, which had received both calls, answers `ok:2`.
/// let reply = Message::parse("{handshake:[0],ok:2}").unwrap();
/// let Message::HandshakeResponse { result: HandshakeResult::Restored(n), .. } = reply else {
///     unreachable!()
/// };
/// let plan = client.restore(n);
/// assert_eq!(plan.lost_request_ids, vec![2]); // fail call 2 with CALLBACK_LOST
/// assert!(plan.resend.is_empty());
/// assert_eq!(plan.next_message_id, 3);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    id: String,
    role: Role,
    config: SessionConfig,
    username: Option<String>,
    /// Unconfirmed messages, in sending order; their ids strictly grow in absolute value.
    buffer: VecDeque<BufferedMessage>,
    buffered_bytes: usize,
    /// The highest absolute id the peer confirmed (upstream's `guaranteedDeliveredCount`).
    acknowledged: u64,
    /// The absolute id of the last request received (upstream's `receivedCount`).
    received: u64,
    /// The id of the latest buffered message, 0 before the first.
    latest: i64,
    storage: Object,
}

impl Session {
    /// A fresh session: nothing sent or received, ids starting at `role.delta()`.
    pub fn new(id: impl Into<String>, role: Role, config: SessionConfig) -> Self {
        Session {
            id: id.into(),
            role,
            config,
            username: None,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            acknowledged: 0,
            received: 0,
            latest: 0,
            storage: Object::new(),
        }
    }

    /// The session id (a UUID chosen by the server).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which side this session belongs to.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The buffer bounds.
    pub fn config(&self) -> SessionConfig {
        self.config
    }

    /// Changes the buffer bounds. Messages already buffered are kept even if they exceed the
    /// new bounds; only later recordings are refused.
    pub fn set_config(&mut self, config: SessionConfig) {
        self.config = config;
    }

    /// The authenticated user, if any (`None` for anonymous sessions).
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// Sets the authenticated user.
    pub fn set_username(&mut self, username: Option<String>) {
        self.username = username;
    }

    /// Per-session user storage (upstream's `session.get/set`), kept across reconnects and
    /// stored with the session. Values are encoded as on the wire, so object properties
    /// holding `Undefined` are not kept.
    pub fn storage(&self) -> &Object {
        &self.storage
    }

    /// Mutable access to the per-session user storage.
    pub fn storage_mut(&mut self) -> &mut Object {
        &mut self.storage
    }

    /// The absolute id of the last request (`call`, `event`, `inspect`, `ping`) received from
    /// the peer: what this side reports when restoring. It is the last, not the largest, as
    /// upstream counts it.
    pub fn received_count(&self) -> u64 {
        self.received
    }

    /// The highest absolute id of ours the peer confirmed (by a callback, a pong, or a
    /// restore). It never decreases.
    pub fn acknowledged_count(&self) -> u64 {
        self.acknowledged
    }

    /// The id of the latest buffered message, or 0 if nothing was ever buffered.
    pub fn latest_message_id(&self) -> i64 {
        self.latest
    }

    /// The id the next `call`, `event`, `inspect` or `ping` must take: the latest buffered id
    /// plus the role's delta (1, 2, … for a client; −1, −2, … for a server). The handshake
    /// always uses [`HANDSHAKE_ID`] instead.
    pub fn next_message_id(&self) -> i64 {
        self.latest + self.role.delta()
    }

    /// How many sent messages await confirmation.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len()
    }

    /// The total text size of the messages awaiting confirmation.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// The messages awaiting confirmation, in sending order.
    pub fn buffered(&self) -> impl ExactSizeIterator<Item = &BufferedMessage> + '_ {
        self.buffer.iter()
    }

    /// Whether a message of `len` bytes can be recorded now without exceeding the bounds.
    pub fn check_capacity(&self, len: usize) -> Result<(), SessionError> {
        let full = |limit, max| SessionError::BufferFull {
            limit,
            max,
            messages: self.buffer.len(),
            bytes: self.buffered_bytes,
            message_bytes: len,
        };
        if self.buffer.len() >= self.config.max_buffered_messages {
            return Err(full(
                BufferLimit::Messages,
                self.config.max_buffered_messages,
            ));
        }
        if self
            .buffered_bytes
            .checked_add(len)
            .is_none_or(|total| total > self.config.max_buffered_bytes)
        {
            return Err(full(BufferLimit::Bytes, self.config.max_buffered_bytes));
        }
        Ok(())
    }

    /// Records an outgoing `call`, `event`, `inspect` or `ping` with id `id` and its exact
    /// text, before (or instead of, while offline) writing it.
    ///
    /// `id` must move past [`Self::latest_message_id`] in the role's direction; take it from
    /// [`Self::next_message_id`]. On error nothing changes: the message must not be written,
    /// and its id stays free.
    pub fn on_send(&mut self, id: i64, kind: RequestKind, text: &str) -> Result<(), SessionError> {
        self.check_send(id, text.len())?;
        self.record(id, kind, text.to_owned());
        Ok(())
    }

    /// [`Self::on_send`] taking the text by value (no copy). On error the text is given back.
    pub fn on_send_owned(
        &mut self,
        id: i64,
        kind: RequestKind,
        text: String,
    ) -> Result<(), (SessionError, String)> {
        match self.check_send(id, text.len()) {
            Ok(()) => {
                self.record(id, kind, text);
                Ok(())
            }
            Err(e) => Err((e, text)),
        }
    }

    fn check_send(&self, id: i64, len: usize) -> Result<(), SessionError> {
        if id.signum() != self.role.delta() || id.unsigned_abs() <= self.latest.unsigned_abs() {
            return Err(SessionError::IdOutOfOrder {
                id,
                latest: self.latest,
            });
        }
        self.check_capacity(len)
    }

    fn record(&mut self, id: i64, kind: RequestKind, text: String) {
        self.buffered_bytes += text.len();
        self.buffer.push_back(BufferedMessage { id, kind, text });
        self.latest = id;
    }

    /// The text of the buffered message with id `id`, if it is still unconfirmed.
    pub fn buffered_text(&self, id: i64) -> Option<&str> {
        let abs = id.unsigned_abs();
        let i = self
            .buffer
            .binary_search_by_key(&abs, |m| m.id.unsigned_abs())
            .ok()?;
        Some(self.buffer[i].text.as_str())
    }

    /// Encodes `msg`, records it if it is a kind sessions buffer (see [`Self::on_send`]), and
    /// returns the text to write. Other kinds (callbacks, pongs, handshakes) are only encoded.
    pub fn on_send_message(&mut self, msg: &Message) -> Result<String, SessionError> {
        let text = msg.encode();
        if let Some((kind, id)) = RequestKind::of(msg) {
            self.on_send(id, kind, &text)?;
        }
        Ok(text)
    }

    /// Accounts for an incoming message: a `call`, `event`, `inspect` or `ping` sets the
    /// received count; a `callback` or `pong` confirms delivery (see [`Self::acknowledge`]).
    /// Others change nothing. Call it for every message, valid payload or not, as upstream
    /// counts a request before validating it. Returns how many buffered messages were
    /// confirmed.
    pub fn on_receive(&mut self, msg: &Message) -> usize {
        match msg {
            Message::Call { id, .. }
            | Message::Event { id, .. }
            | Message::Inspect { id, .. }
            | Message::Ping { id } => {
                self.note_received(*id);
                0
            }
            Message::Callback { id, .. } | Message::Pong { id } => self.acknowledge(*id),
            _ => 0,
        }
    }

    /// Sets the received count to `|id|`: for a request the driver could not turn into a
    /// [`Message`] but whose id it read (upstream counts those too).
    pub fn note_received(&mut self, id: i64) {
        self.received = id.unsigned_abs();
    }

    /// A `callback` or `pong` with id `id` arrived: confirms every buffered message whose id's
    /// absolute value is at most `|id|`. Cumulative and monotonic: a count at or below the
    /// current one changes nothing, and a count past the latest sent id is clamped to it.
    /// Returns how many buffered messages were confirmed.
    pub fn acknowledge(&mut self, id: i64) -> usize {
        let upto = id.unsigned_abs().min(self.latest.unsigned_abs());
        if upto <= self.acknowledged {
            return 0;
        }
        self.acknowledged = upto;
        self.pop_confirmed(upto, |_| {})
    }

    /// Removes buffered messages up to absolute id `upto`, passing each to `each`.
    fn pop_confirmed(&mut self, upto: u64, mut each: impl FnMut(BufferedMessage)) -> usize {
        let mut n = 0;
        while self
            .buffer
            .front()
            .is_some_and(|m| m.id.unsigned_abs() <= upto)
        {
            if let Some(m) = self.buffer.pop_front() {
                self.buffered_bytes -= m.text.len();
                each(m);
                n += 1;
            }
        }
        n
    }

    /// Restores the session on a new connection, given how many of our messages the peer
    /// says it received (`peer_received_count`: the client's `session:[id, n]` on the server,
    /// the server's `ok:n` on the client).
    ///
    /// As upstream: buffered messages up to that count are dropped as delivered, and those
    /// that expect a reply are listed in [`RestorePlan::lost_request_ids`]; everything still
    /// buffered is to be sent again unchanged, in order; ids continue after the latest one.
    /// Unlike upstream the confirmed count never decreases, and a count past the latest id
    /// sent is clamped to it.
    pub fn restore(&mut self, peer_received_count: u64) -> RestorePlan {
        let mut plan = self.restore_in_place(peer_received_count);
        plan.resend = self.buffer.iter().map(|m| m.text.clone()).collect();
        plan
    }

    /// [`Self::restore`] without copying the texts to send again: [`RestorePlan::resend`] is
    /// left empty, and what is to be resent is everything still [`Self::buffered`], in order.
    /// A driver that writes from the buffer saves a copy of up to the whole buffer.
    pub fn restore_in_place(&mut self, peer_received_count: u64) -> RestorePlan {
        let upto = peer_received_count
            .min(self.latest.unsigned_abs())
            .max(self.acknowledged);
        let mut lost_request_ids = Vec::new();
        let confirmed = self.pop_confirmed(upto, |m| {
            if m.kind.expects_reply() {
                lost_request_ids.push(m.id);
            }
        });
        self.acknowledged = upto;
        RestorePlan {
            lost_request_ids,
            resend: Vec::new(),
            confirmed,
            next_message_id: self.next_message_id(),
        }
    }

    /// Empties the buffer and returns what it held, for a driver giving up on the session
    /// (for example when the server no longer knows it): pending requests among these will
    /// never be answered. Counters and the id sequence are kept.
    pub fn take_buffered(&mut self) -> Vec<BufferedMessage> {
        self.buffered_bytes = 0;
        self.buffer.drain(..).collect()
    }

    // -----------------------------------------------------------------------------------------
    // Handshake helpers

    /// Client: the handshake request that restores this session,
    /// `{handshake:[0,app(,version)],session:[id,receivedCount]}`.
    pub fn restore_request(&self, app: &str, version: Option<&str>) -> Message {
        RestoreRequest {
            app: app.to_owned(),
            version: version.map(str::to_owned),
            session_id: self.id.clone(),
            received_count: self.received,
        }
        .to_message()
    }

    /// Server: the reply accepting a restore, `{handshake:[0],ok:<receivedCount>}`. Send it
    /// before the [`RestorePlan::resend`] texts.
    pub fn restored_response(&self) -> Message {
        Message::HandshakeResponse {
            id: HANDSHAKE_ID,
            result: HandshakeResult::Restored(self.received),
        }
    }

    /// Server: the reply creating this (new) session, `{handshake:[0],ok:'<id>'}`.
    pub fn created_response(&self) -> Message {
        Message::HandshakeResponse {
            id: HANDSHAKE_ID,
            result: HandshakeResult::NewSession(self.id.clone()),
        }
    }

    /// Server: the reply when the session to restore is unknown, `{handshake:[0],error:[11]}`
    /// (the connection is closed right after it, as for every handshake error).
    pub fn unknown_session_response() -> Message {
        Message::HandshakeResponse {
            id: HANDSHAKE_ID,
            result: HandshakeResult::Error(RemoteErrorArray::code(ErrorCode::AuthFailed)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Persistence

    /// A copy of the state, for storing it field by field.
    pub fn to_state(&self) -> SessionState {
        SessionState {
            id: self.id.clone(),
            role: self.role,
            username: self.username.clone(),
            received_count: self.received,
            acknowledged_count: self.acknowledged,
            latest_message_id: self.latest,
            buffer: self.buffer.iter().cloned().collect(),
            storage: self.storage.clone(),
        }
    }

    /// The state, consuming the session.
    pub fn into_state(self) -> SessionState {
        SessionState {
            id: self.id,
            role: self.role,
            username: self.username,
            received_count: self.received,
            acknowledged_count: self.acknowledged,
            latest_message_id: self.latest,
            buffer: self.buffer.into(),
            storage: self.storage,
        }
    }

    /// Rebuilds a session from its state, checking that it is consistent. The buffer is kept
    /// whole even if it exceeds `config`.
    pub fn from_state(state: SessionState, config: SessionConfig) -> Result<Session, SessionError> {
        state.validate()?;
        let buffered_bytes = state.buffer.iter().map(|m| m.text.len()).sum();
        Ok(Session {
            id: state.id,
            role: state.role,
            config,
            username: state.username,
            buffer: state.buffer.into(),
            buffered_bytes,
            acknowledged: state.acknowledged_count,
            received: state.received_count,
            latest: state.latest_message_id,
            storage: state.storage,
        })
    }

    /// The state as one compact text for a session store (see [`SessionState::encode`]).
    pub fn encode(&self) -> String {
        self.to_state().encode()
    }

    /// Rebuilds a session from [`Self::encode`]'s text.
    pub fn decode(text: &str, config: SessionConfig) -> Result<Session, SessionError> {
        Session::from_state(SessionState::decode(text)?, config)
    }
}

/// Everything a session store keeps of a [`Session`]: upstream's stored fields (id, user name,
/// confirmed and received counts, latest buffered id, buffer, user storage) plus the role.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    /// The session id.
    pub id: String,
    /// The side the session belongs to.
    pub role: Role,
    /// The authenticated user, if any.
    pub username: Option<String>,
    /// [`Session::received_count`].
    pub received_count: u64,
    /// [`Session::acknowledged_count`].
    pub acknowledged_count: u64,
    /// [`Session::latest_message_id`].
    pub latest_message_id: i64,
    /// The unconfirmed messages, in sending order.
    pub buffer: Vec<BufferedMessage>,
    /// The user storage.
    pub storage: Object,
}

/// The first key of an encoded session, holding the format version.
const FORMAT_KEY: &str = "tetherSession";
const FORMAT_VERSION: i64 = 1;

impl SessionState {
    /// Encodes the state as one mdsf record, e.g.
    /// `{tetherSession:1,id:'8a3c',role:'client',username:null,received:1,acknowledged:1,`
    /// `latest:2,buffer:[[2,'call','{call:[2,\'calculator\'],divide:[30,10]}']],storage:[]}`.
    /// Storage entries are `[key, value]` pairs so their order survives.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(
            128 + self.buffer.iter().map(|m| m.text.len() + 24).sum::<usize>(),
        );
        out.push('{');
        out.push_str(FORMAT_KEY);
        out.push(':');
        out.push_str(&FORMAT_VERSION.to_string());
        out.push_str(",id:");
        write_string_literal(&self.id, &mut out);
        out.push_str(",role:");
        write_string_literal(self.role.as_str(), &mut out);
        out.push_str(",username:");
        match &self.username {
            Some(u) => write_string_literal(u, &mut out),
            None => out.push_str("null"),
        }
        out.push_str(",received:");
        out.push_str(&self.received_count.to_string());
        out.push_str(",acknowledged:");
        out.push_str(&self.acknowledged_count.to_string());
        out.push_str(",latest:");
        out.push_str(&self.latest_message_id.to_string());
        out.push_str(",buffer:[");
        for (i, m) in self.buffer.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('[');
            out.push_str(&m.id.to_string());
            out.push(',');
            write_string_literal(m.kind.as_str(), &mut out);
            out.push(',');
            write_string_literal(&m.text, &mut out);
            out.push(']');
        }
        out.push_str("],storage:[");
        for (i, (k, v)) in self.storage.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('[');
            write_string_literal(k, &mut out);
            out.push(',');
            // A trailing hole would shorten the pair, so write `undefined` out in full.
            match v {
                Value::Undefined => out.push_str("undefined"),
                v => write_value(v, &mut out),
            }
            out.push(']');
        }
        out.push_str("]}");
        out
    }

    /// Decodes [`Self::encode`]'s text and checks the state is consistent.
    pub fn decode(text: &str) -> Result<SessionState, SessionError> {
        let bad = |what: &str| SessionError::InvalidState(what.to_owned());
        let value = parse(text).map_err(|e| SessionError::InvalidState(e.to_string()))?;
        let obj = value.as_object().ok_or_else(|| bad("not an object"))?;
        match obj.get(FORMAT_KEY).and_then(Value::as_i64) {
            Some(FORMAT_VERSION) => {}
            Some(v) => return Err(SessionError::InvalidState(format!("unknown version {v}"))),
            None => return Err(bad("not a tether session")),
        }
        let string = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(SessionError::InvalidState(format!(
                "'{key}' is not a string"
            ))),
        };
        let int = |v: Option<&Value>, key: &str| {
            v.and_then(Value::as_i64)
                .ok_or_else(|| SessionError::InvalidState(format!("'{key}' is not an integer")))
        };
        let count = |key: &str| {
            u64::try_from(int(obj.get(key), key)?)
                .map_err(|_| SessionError::InvalidState(format!("'{key}' is negative")))
        };
        let id = string("id")?;
        let role = Role::from_name(&string("role")?).ok_or_else(|| bad("unknown role"))?;
        let username = match obj.get("username") {
            None | Some(Value::Null | Value::Undefined) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("'username' is not a string")),
        };
        let received_count = count("received")?;
        let acknowledged_count = count("acknowledged")?;
        let latest_message_id = int(obj.get("latest"), "latest")?;
        let entries = |key: &str| match obj.get(key) {
            Some(Value::Array(a)) => Ok(a.as_slice()),
            None if key == "storage" => Ok(&[][..]),
            _ => Err(SessionError::InvalidState(format!(
                "'{key}' is not an array"
            ))),
        };
        let mut buffer = Vec::new();
        for entry in entries("buffer")? {
            let (id, kind, text) = match entry.as_array() {
                Some([id, Value::String(kind), Value::String(text)]) => (id, kind, text),
                _ => return Err(bad("malformed buffer entry")),
            };
            buffer.push(BufferedMessage {
                id: int(Some(id), "buffer id")?,
                kind: RequestKind::from_name(kind).ok_or_else(|| bad("unknown buffered kind"))?,
                text: text.clone(),
            });
        }
        let mut storage = Object::new();
        for entry in entries("storage")? {
            match entry.as_array() {
                Some([Value::String(k), v]) => storage.insert(k.clone(), v.clone()),
                Some([Value::String(k)]) => storage.insert(k.clone(), Value::Undefined),
                _ => return Err(bad("malformed storage entry")),
            }
        }
        let state = SessionState {
            id,
            role,
            username,
            received_count,
            acknowledged_count,
            latest_message_id,
            buffer,
            storage,
        };
        state.validate()?;
        Ok(state)
    }

    /// Checks the invariants a [`Session`] relies on: ids in the role's direction, buffered
    /// ids strictly growing in absolute value, above the confirmed count and up to the latest
    /// id, and a confirmed count no higher than the latest id.
    pub fn validate(&self) -> Result<(), SessionError> {
        let bad = |what: String| Err(SessionError::InvalidState(what));
        let delta = self.role.delta();
        let latest = self.latest_message_id;
        if latest != 0 && latest.signum() != delta {
            return bad(format!(
                "latest id {latest} has the wrong sign for a {}",
                self.role
            ));
        }
        let latest_abs = latest.unsigned_abs();
        // Ids are JS numbers on the wire: past 2^53 they are no longer exact (and the next id
        // could overflow an i64).
        if latest_abs >= 1 << 53 {
            return bad(format!("latest id {latest} is past 2^53"));
        }
        if self.acknowledged_count > latest_abs {
            return bad(format!(
                "acknowledged count {} is past the latest id {latest}",
                self.acknowledged_count
            ));
        }
        let mut prev = self.acknowledged_count;
        for m in &self.buffer {
            let abs = m.id.unsigned_abs();
            if m.id.signum() != delta || abs <= prev || abs > latest_abs {
                return bad(format!("buffered id {} is out of order", m.id));
            }
            prev = abs;
        }
        Ok(())
    }
}

/// A client's request to restore a session:
/// `{handshake:[0,app(,version)],session:[sessionId,receivedCount]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The application name.
    pub app: String,
    /// The requested version or range, if any.
    pub version: Option<String>,
    /// The session to restore.
    pub session_id: String,
    /// How many of the server's messages the client received (absolute id of the last one).
    pub received_count: u64,
}

impl RestoreRequest {
    /// The request in `msg`, if it is a handshake request with the `session` strategy.
    pub fn from_message(msg: &Message) -> Option<RestoreRequest> {
        match msg {
            Message::HandshakeRequest {
                app,
                version,
                auth: Auth::Session { id, received },
                ..
            } => Some(RestoreRequest {
                app: app.clone(),
                version: version.clone(),
                session_id: id.clone(),
                received_count: *received,
            }),
            _ => None,
        }
    }

    /// The handshake message (id 0).
    pub fn to_message(&self) -> Message {
        Message::HandshakeRequest {
            id: HANDSHAKE_ID,
            app: self.app.clone(),
            version: self.version.clone(),
            auth: Auth::Session {
                id: self.session_id.clone(),
                received: self.received_count,
            },
        }
    }
}

/// What a handshake response means to a client that asked to restore a session.
#[derive(Debug, Clone, PartialEq)]
pub enum RestoreOutcome {
    /// `ok:<n>`: restored; pass `n` to [`Session::restore`].
    Restored {
        /// How many of the client's messages the server received.
        peer_received_count: u64,
    },
    /// `error:[…]`: refused (`[11]` when the server does not know the session).
    Rejected(RemoteErrorArray),
    /// Some other `ok` (a new session id, or a value that is not a count): not a restore.
    Unexpected(HandshakeResult),
}

impl RestoreOutcome {
    /// The outcome carried by `msg`, if it is a handshake response.
    pub fn from_message(msg: &Message) -> Option<RestoreOutcome> {
        match msg {
            Message::HandshakeResponse { result, .. } => Some(match result {
                HandshakeResult::Restored(n) => RestoreOutcome::Restored {
                    peer_received_count: *n,
                },
                HandshakeResult::Error(e) => RestoreOutcome::Rejected(e.clone()),
                other => RestoreOutcome::Unexpected(other.clone()),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: i64) -> Message {
        Message::Call {
            id,
            iface: "calculator".into(),
            method: "answer".into(),
            args: Value::Array(vec![]),
        }
    }

    fn event(id: i64) -> Message {
        Message::Event {
            id,
            iface: "chat".into(),
            event: "message".into(),
            args: Value::from(vec!["hi"]),
        }
    }

    fn callback(id: i64) -> Message {
        Message::Callback {
            id,
            result: crate::CallbackResult::Ok(vec![]),
        }
    }

    fn send(s: &mut Session, make: fn(i64) -> Message) -> i64 {
        let id = s.next_message_id();
        s.on_send_message(&make(id)).unwrap();
        id
    }

    fn ids(s: &Session) -> Vec<i64> {
        s.buffered().map(|m| m.id).collect()
    }

    fn client() -> Session {
        Session::new("sid", Role::Client, SessionConfig::default())
    }

    fn server() -> Session {
        Session::new("sid", Role::Server, SessionConfig::default())
    }

    #[test]
    fn ids_start_at_delta_and_follow_the_latest_buffered() {
        let mut c = client();
        let mut s = server();
        assert_eq!(c.next_message_id(), 1);
        assert_eq!(s.next_message_id(), -1);
        assert_eq!(send(&mut c, call), 1);
        assert_eq!(send(&mut c, event), 2);
        assert_eq!(send(&mut s, event), -1);
        assert_eq!(send(&mut s, call), -2);
        assert_eq!(c.next_message_id(), 3);
        assert_eq!(s.next_message_id(), -3);
    }

    #[test]
    fn only_requests_are_buffered() {
        let mut c = client();
        for msg in [
            call(1),
            event(2),
            Message::Inspect {
                id: 3,
                iface: "x".into(),
            },
            Message::Ping { id: 4 },
        ] {
            c.on_send_message(&msg).unwrap();
        }
        for msg in [
            callback(-1),
            Message::Pong { id: -2 },
            c.restore_request("app", None),
            Message::Heartbeat,
        ] {
            let text = c.on_send_message(&msg).unwrap();
            assert_eq!(text, msg.encode());
        }
        let kinds: Vec<_> = c.buffered().map(|m| m.kind).collect();
        use RequestKind::*;
        assert_eq!(kinds, [Call, Event, Inspect, Ping]);
        assert_eq!(ids(&c), [1, 2, 3, 4]);
        assert_eq!(c.buffered().next().unwrap().text, call(1).encode());
        let bytes: usize = c.buffered().map(|m| m.text.len()).sum();
        assert_eq!(c.buffered_bytes(), bytes);
    }

    #[test]
    fn ids_must_move_away_from_zero_in_the_role_direction() {
        let mut c = client();
        send(&mut c, call);
        for bad in [1, 0, -2] {
            assert_eq!(
                c.on_send(bad, RequestKind::Call, "x"),
                Err(SessionError::IdOutOfOrder { id: bad, latest: 1 })
            );
        }
        // Gaps are fine.
        c.on_send(5, RequestKind::Event, "x").unwrap();
        assert_eq!(c.next_message_id(), 6);
        let mut s = server();
        assert!(s.on_send(1, RequestKind::Call, "x").is_err());
        s.on_send(-1, RequestKind::Call, "x").unwrap();
    }

    #[test]
    fn received_count_is_the_last_request_id_not_the_largest() {
        let mut c = client();
        c.on_receive(&event(-3));
        assert_eq!(c.received_count(), 3);
        c.on_receive(&call(-1));
        assert_eq!(c.received_count(), 1);
        c.on_receive(&Message::Inspect {
            id: -7,
            iface: "x".into(),
        });
        assert_eq!(c.received_count(), 7);
        c.on_receive(&Message::Ping { id: -2 });
        assert_eq!(c.received_count(), 2);
        // Replies, handshakes, heartbeats and unknown kinds are not requests.
        for msg in [
            callback(-9),
            Message::Pong { id: -9 },
            Message::Heartbeat,
            Message::Unknown {
                kind: "state".into(),
                id: Some(-9),
            },
            Session::unknown_session_response(),
        ] {
            c.on_receive(&msg);
        }
        assert_eq!(c.received_count(), 2);
        // A request with invalid arguments still counts, as upstream.
        let bad = Message::parse("{event:[-4,'chat'],message:'not an array'}").unwrap();
        c.on_receive(&bad);
        assert_eq!(c.received_count(), 4);
        c.note_received(-11);
        assert_eq!(c.received_count(), 11);
    }

    #[test]
    fn callback_and_pong_acknowledge_cumulatively() {
        let mut c = client();
        for _ in 0..3 {
            send(&mut c, event);
            send(&mut c, call);
        }
        assert_eq!(c.on_receive(&callback(4)), 4);
        assert_eq!(ids(&c), [5, 6]);
        assert_eq!(c.acknowledged_count(), 4);
        assert_eq!(c.on_receive(&Message::Pong { id: 6 }), 2);
        assert_eq!(c.buffered_len(), 0);
        assert_eq!(c.buffered_bytes(), 0);
        // The sign of the reply's id does not matter (upstream takes the absolute value).
        let mut s = server();
        send(&mut s, call);
        send(&mut s, call);
        assert_eq!(s.acknowledge(1), 1);
        assert_eq!(ids(&s), [-2]);
    }

    #[test]
    fn an_older_acknowledgement_never_unacknowledges() {
        let mut c = client();
        for _ in 0..5 {
            send(&mut c, call);
        }
        c.on_receive(&callback(4));
        assert_eq!(c.on_receive(&callback(2)), 0);
        assert_eq!(c.acknowledged_count(), 4);
        // So a restore reporting less than was confirmed keeps the confirmed count.
        let plan = c.restore(1);
        assert_eq!(plan.confirmed, 0);
        assert!(plan.lost_request_ids.is_empty());
        assert_eq!(plan.resend, [call(5).encode()]);
        assert_eq!(c.acknowledged_count(), 4);
    }

    #[test]
    fn acknowledgements_past_the_latest_id_are_clamped() {
        let mut c = client();
        send(&mut c, call);
        send(&mut c, call);
        assert_eq!(c.acknowledge(1000), 2);
        assert_eq!(c.acknowledged_count(), 2);
        // Later messages are still confirmed normally.
        send(&mut c, call);
        assert_eq!(c.acknowledge(3), 1);
        send(&mut c, event);
        let plan = c.restore(u64::MAX);
        assert_eq!(plan.confirmed, 1);
        assert_eq!(c.acknowledged_count(), 4);
        // Nothing sent at all: the count stays 0.
        let mut fresh = client();
        fresh.acknowledge(9);
        assert_eq!(fresh.acknowledged_count(), 0);
        assert_eq!(fresh.restore(9).next_message_id, 1);
    }

    #[test]
    fn buffer_full_by_message_count() {
        let mut c = Session::new(
            "sid",
            Role::Client,
            SessionConfig {
                max_buffered_messages: 2,
                max_buffered_bytes: usize::MAX,
            },
        );
        send(&mut c, call);
        send(&mut c, call);
        let err = c.on_send_message(&call(3)).unwrap_err();
        assert!(matches!(
            err,
            SessionError::BufferFull {
                limit: BufferLimit::Messages,
                max: 2,
                messages: 2,
                ..
            }
        ));
        // Nothing changed and the id is still free.
        assert_eq!(c.buffered_len(), 2);
        assert_eq!(c.next_message_id(), 3);
        // Confirmation makes room.
        c.on_receive(&callback(1));
        assert_eq!(send(&mut c, call), 3);
    }

    #[test]
    fn buffer_full_by_bytes() {
        let len = call(1).encode().len();
        let mut c = Session::new(
            "sid",
            Role::Client,
            SessionConfig {
                max_buffered_messages: usize::MAX,
                max_buffered_bytes: 2 * len,
            },
        );
        send(&mut c, call);
        send(&mut c, call);
        let err = c.on_send(3, RequestKind::Call, "{}").unwrap_err();
        assert_eq!(
            err,
            SessionError::BufferFull {
                limit: BufferLimit::Bytes,
                max: 2 * len,
                messages: 2,
                bytes: 2 * len,
                message_bytes: 2,
            }
        );
        assert!(err.to_string().contains("byte size limit"));
        assert_eq!(c.check_capacity(0), Ok(()));
        // A message longer than the limit never fits.
        let mut small = Session::new(
            "sid",
            Role::Server,
            SessionConfig {
                max_buffered_messages: 10,
                max_buffered_bytes: 4,
            },
        );
        assert!(small.on_send(-1, RequestKind::Ping, "{ping:[-1]}").is_err());
        assert_eq!(small.buffered_len(), 0);
    }

    #[test]
    fn restore_drops_confirmed_fails_lost_requests_and_resends_the_rest() {
        let mut c = client();
        send(&mut c, call); // 1: answered
        send(&mut c, event); // 2
        send(&mut c, call); // 3
        send(&mut c, |id| Message::Ping { id }); // 4
        send(&mut c, |id| Message::Inspect {
            id,
            iface: "x".into(),
        }); // 5
        send(&mut c, event); // 6
        send(&mut c, call); // 7
        c.on_receive(&callback(1));
        let plan = c.restore(5);
        assert_eq!(plan.lost_request_ids, [3, 4, 5]);
        assert_eq!(plan.confirmed, 4);
        assert_eq!(plan.resend, [event(6).encode(), call(7).encode()]);
        assert_eq!(plan.next_message_id, 8);
        // Resent messages stay buffered until confirmed, and a second restore resends them
        // again.
        assert_eq!(ids(&c), [6, 7]);
        let again = c.restore(5);
        assert_eq!(again.resend, plan.resend);
        assert!(again.lost_request_ids.is_empty());
    }

    #[test]
    fn server_continues_with_latest_plus_delta() {
        let mut s = server();
        for _ in 0..5 {
            send(&mut s, event);
        }
        let plan = s.restore(3);
        assert_eq!(plan.next_message_id, -6);
        assert_eq!(plan.resend, [event(-4).encode(), event(-5).encode()]);
        // Upstream would continue at +1 when nothing was ever buffered; we stay at -1.
        assert_eq!(server().restore(0).next_message_id, -1);
    }

    #[test]
    fn take_buffered_empties_the_buffer_but_keeps_the_id_sequence() {
        let mut c = client();
        send(&mut c, call);
        send(&mut c, event);
        let taken = c.take_buffered();
        assert_eq!(taken.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(c.buffered_len(), 0);
        assert_eq!(c.buffered_bytes(), 0);
        assert_eq!(c.next_message_id(), 3);
    }

    #[test]
    fn handshake_helpers_match_the_wire() {
        let mut c = Session::new("8a3c-uuid", Role::Client, SessionConfig::default());
        c.on_receive(&event(-3));
        assert_eq!(
            c.restore_request("testApp", None).encode(),
            "{handshake:[0,'testApp'],session:['8a3c-uuid',3]}"
        );
        assert_eq!(
            c.restore_request("testApp", Some("^1.0.0")).encode(),
            "{handshake:[0,'testApp','^1.0.0'],session:['8a3c-uuid',3]}"
        );
        let mut s = Session::new("8a3c-uuid", Role::Server, SessionConfig::default());
        assert_eq!(
            s.created_response().encode(),
            "{handshake:[0],ok:'8a3c-uuid'}"
        );
        s.on_receive(&call(4));
        assert_eq!(s.restored_response().encode(), "{handshake:[0],ok:4}");
        assert_eq!(
            Session::unknown_session_response().encode(),
            "{handshake:[0],error:[11]}"
        );
    }

    #[test]
    fn restore_request_and_outcome_parse() {
        let msg = Message::parse("{handshake:[0,'testApp'],session:['8a3c-uuid',3]}").unwrap();
        let req = RestoreRequest::from_message(&msg).unwrap();
        assert_eq!(
            req,
            RestoreRequest {
                app: "testApp".into(),
                version: None,
                session_id: "8a3c-uuid".into(),
                received_count: 3,
            }
        );
        assert_eq!(req.to_message(), msg);
        let login = Message::parse("{handshake:[0,'testApp'],login:['u','p']}").unwrap();
        assert_eq!(RestoreRequest::from_message(&login), None);

        let outcome = |text| RestoreOutcome::from_message(&Message::parse(text).unwrap());
        assert_eq!(
            outcome("{handshake:[0],ok:4}"),
            Some(RestoreOutcome::Restored {
                peer_received_count: 4
            })
        );
        // `ok:0` is a success, as upstream tests `ok !== undefined`.
        assert_eq!(
            outcome("{handshake:[0],ok:0}"),
            Some(RestoreOutcome::Restored {
                peer_received_count: 0
            })
        );
        assert_eq!(
            outcome("{handshake:[0],error:[11]}"),
            Some(RestoreOutcome::Rejected(RemoteErrorArray::code(
                ErrorCode::AuthFailed
            )))
        );
        assert!(matches!(
            outcome("{handshake:[0],ok:'new-uuid'}"),
            Some(RestoreOutcome::Unexpected(HandshakeResult::NewSession(_)))
        ));
        assert_eq!(outcome("{callback:[0],ok:[]}"), None);
    }

    #[test]
    fn state_round_trips_through_text() {
        let mut s = Session::new("8a3c-uuid", Role::Server, SessionConfig::default());
        s.set_username(Some("marcus".into()));
        s.storage_mut().insert("token", Value::from("it's"));
        s.storage_mut().insert("7", Value::from(vec![1, 2]));
        s.storage_mut().insert("gone", Value::Undefined);
        for _ in 0..3 {
            send(&mut s, event);
        }
        s.on_receive(&callback(-1));
        s.on_receive(&call(5));
        let text = s.encode();
        assert!(text.starts_with("{tetherSession:1,id:'8a3c-uuid',role:'server',"));
        assert!(text.contains("buffer:[[-2,'event','{event:[-2,\\'chat\\'],message:[\\'hi\\']}']"));
        let back = Session::decode(&text, s.config()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.buffered_bytes(), s.buffered_bytes());
        // Storage keeps its order, integer-like keys included.
        let keys: Vec<_> = back.storage().iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["token", "7", "gone"]);
        // A fresh anonymous session.
        let fresh = client();
        assert_eq!(
            fresh.encode(),
            "{tetherSession:1,id:'sid',role:'client',username:null,received:0,acknowledged:0,\
             latest:0,buffer:[],storage:[]}"
        );
        assert_eq!(
            Session::decode(&fresh.encode(), fresh.config()).unwrap(),
            fresh
        );
    }

    #[test]
    fn decode_rejects_inconsistent_states() {
        let ok = "{tetherSession:1,id:'s',role:'client',username:null,received:0,\
                  acknowledged:1,latest:3,buffer:[[2,'call','a'],[3,'event','b']],storage:[]}";
        SessionState::decode(ok).unwrap();
        for (bad, why) in [
            ("[]".to_owned(), "not an object"),
            ("{id:'s'}".to_owned(), "not a tether session"),
            (ok.replace(":1,id", ":2,id"), "unknown version"),
            (ok.replace("'client'", "'peer'"), "unknown role"),
            (ok.replace("latest:3", "latest:-3"), "wrong sign"),
            (
                ok.replace("acknowledged:1", "acknowledged:4"),
                "past the latest",
            ),
            (
                ok.replace("acknowledged:1", "acknowledged:2"),
                "out of order",
            ),
            (ok.replace("[3,'event'", "[2,'event'"), "out of order"),
            (ok.replace("latest:3", "latest:2"), "out of order"),
            (ok.replace("'event'", "'pong'"), "unknown buffered kind"),
            (ok.replace("received:0", "received:-1"), "negative"),
            (ok.replace("received:0", "received:0.5"), "not an integer"),
            (
                ok.replace("storage:[]", "storage:[[1,2]]"),
                "malformed storage",
            ),
            (ok.replace(",'b']", "]"), "malformed buffer"),
        ] {
            let err = SessionState::decode(&bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        // Missing optional fields.
        let minimal = "{tetherSession:1,id:'s',role:'server',received:0,acknowledged:0,\
                       latest:0,buffer:[]}";
        let state = SessionState::decode(minimal).unwrap();
        assert_eq!(state.username, None);
        assert!(state.storage.is_empty());
    }

    #[test]
    fn from_state_keeps_an_oversized_buffer() {
        let mut s = client();
        for _ in 0..3 {
            send(&mut s, call);
        }
        let tight = SessionConfig {
            max_buffered_messages: 1,
            max_buffered_bytes: usize::MAX,
        };
        let mut back = Session::from_state(s.to_state(), tight).unwrap();
        assert_eq!(back.buffered_len(), 3);
        assert!(back.on_send_message(&call(4)).is_err());
        assert_eq!(
            Session::from_state(s.clone().into_state(), tight).unwrap(),
            back
        );
    }
}

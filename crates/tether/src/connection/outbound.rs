//! What a connection holds for its peer, and the rules that keep it bounded.
//!
//! The rules are in the `connection` module's docs (delivery and bounds).
//!
//! The [`Writer`] queues what goes to the transport: replies as text, buffered messages by id
//! (their text stays in the session, written from there), so a stalled peer never costs a
//! second copy, and the driver never blocks on a write.

use crate::transport::{MessageSink, TransportError};
use futures::ready;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tether_wire::{Session, SessionConfig};
use tokio::sync::Notify;

/// Where a connection's transport stands, for handles deciding whether to wait.
const ATTACHED: u8 = 0;
const DETACHED: u8 = 1;
const CLOSED: u8 = 2;

/// Outgoing accounting shared between handles and the driver.
pub(crate) struct Flow {
    max_bytes: usize,
    max_messages: usize,
    /// Events handed to the driver and not yet taken into the session.
    queued_bytes: AtomicUsize,
    queued_messages: AtomicUsize,
    /// The session's unconfirmed messages, as the driver last saw them.
    buffered_bytes: AtomicUsize,
    buffered_messages: AtomicUsize,
    state: AtomicU8,
    room: Notify,
}

/// The backlog would pass the session's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Overflow {
    pub bytes: usize,
    pub messages: usize,
}

impl Flow {
    pub(crate) fn new(config: &SessionConfig) -> Self {
        Flow {
            max_bytes: config.max_buffered_bytes,
            max_messages: config.max_buffered_messages,
            queued_bytes: AtomicUsize::new(0),
            queued_messages: AtomicUsize::new(0),
            buffered_bytes: AtomicUsize::new(0),
            buffered_messages: AtomicUsize::new(0),
            state: AtomicU8::new(DETACHED),
            room: Notify::new(),
        }
    }

    fn backlog(&self) -> (usize, usize) {
        (
            self.queued_bytes.load(Ordering::Acquire) + self.buffered_bytes.load(Ordering::Acquire),
            self.queued_messages.load(Ordering::Acquire)
                + self.buffered_messages.load(Ordering::Acquire),
        )
    }

    /// Accounts for an event of `len` bytes about to be queued, unless it would pass the
    /// session's bounds.
    pub(crate) fn admit(&self, len: usize) -> Result<(), Overflow> {
        let (bytes, messages) = self.backlog();
        if bytes.saturating_add(len) > self.max_bytes || messages >= self.max_messages {
            return Err(Overflow { bytes, messages });
        }
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        self.queued_messages.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The driver took a queued event of `len` bytes (into the session, or not at all).
    pub(crate) fn taken(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        self.queued_messages.fetch_sub(1, Ordering::AcqRel);
    }

    /// The driver's view after a step: the session's backlog and whether a transport is
    /// attached. Wakes waiting senders when there is room or nothing to wait for.
    pub(crate) fn update(&self, session: Option<&Session>, attached: bool) {
        let (bytes, messages) = session.map_or((0, 0), |s| (s.buffered_bytes(), s.buffered_len()));
        let before = self.buffered_bytes.swap(bytes, Ordering::AcqRel);
        crate::metrics::resend_buffer_changed(before, bytes);
        self.buffered_messages.store(messages, Ordering::Release);
        let state = if attached { ATTACHED } else { DETACHED };
        let old_state = self.state.swap(state, Ordering::AcqRel);
        if bytes < before || old_state != state {
            self.room.notify_waiters();
        }
    }

    /// The connection is closed for good: nobody waits any more.
    pub(crate) fn close(&self) {
        self.state.store(CLOSED, Ordering::Release);
        // The session's buffer goes with the connection.
        let held = self.buffered_bytes.swap(0, Ordering::AcqRel);
        crate::metrics::resend_buffer_changed(held, 0);
        self.room.notify_waiters();
    }

    fn has_room(&self) -> bool {
        let (bytes, messages) = self.backlog();
        bytes <= self.max_bytes / 4 && messages <= self.max_messages / 4
    }

    /// Waits while the backlog is above a quarter of the bounds and a transport is attached
    /// (a detached or closed connection has nobody to wait for).
    pub(crate) async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() || self.state.load(Ordering::Acquire) != ATTACHED {
                return;
            }
            notified.await;
        }
    }
}

/// When the driver asks for a confirmation (see the module docs).
pub(crate) struct Thresholds {
    ack_bytes: usize,
    ack_messages: usize,
}

impl Thresholds {
    pub(crate) fn new(config: &SessionConfig) -> Self {
        Thresholds {
            ack_bytes: (config.max_buffered_bytes / 8).max(1),
            ack_messages: (config.max_buffered_messages / 8).max(1),
        }
    }

    /// Whether `bytes`/`messages` sent since the last confirmation request call for another.
    pub(crate) fn wants_ack(&self, bytes: usize, messages: usize) -> bool {
        bytes >= self.ack_bytes || messages >= self.ack_messages
    }
}

/// One thing to write.
enum OutItem {
    /// Not buffered (callbacks, pongs, handshakes): the text itself.
    Text(String),
    /// A buffered message, by id: its text is in the session.
    Buffered(i64),
}

/// The write side of an attached transport: a queue the driver fills without waiting, and
/// [`Writer::poll_write`] that hands it to the sink in batches, one flush per batch.
pub(crate) struct Writer {
    sink: MessageSink,
    queue: VecDeque<OutItem>,
    /// Bytes of `Text` items queued.
    text_bytes: usize,
    /// Written since the last flush.
    dirty: bool,
}

impl Writer {
    pub(crate) fn new(sink: MessageSink) -> Self {
        Writer {
            sink,
            queue: VecDeque::new(),
            text_bytes: 0,
            dirty: false,
        }
    }

    /// Queues an unbuffered message.
    pub(crate) fn push_text(&mut self, text: String) {
        self.text_bytes += text.len();
        self.queue.push_back(OutItem::Text(text));
    }

    /// Queues a buffered message, written from the session.
    pub(crate) fn push_buffered(&mut self, id: i64) {
        self.queue.push_back(OutItem::Buffered(id));
    }

    /// Bytes of replies waiting for the transport: past a bound the driver stops reading.
    pub(crate) fn text_backlog(&self) -> usize {
        self.text_bytes
    }

    /// Whether there is anything to write or flush.
    pub(crate) fn wants_write(&self) -> bool {
        !self.queue.is_empty() || self.dirty
    }

    /// Writes everything queued and flushes. Pending while the transport does not take more;
    /// the queue keeps what it has not taken. Cancel-safe.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        session: Option<&Session>,
    ) -> Poll<Result<(), TransportError>> {
        while !self.queue.is_empty() {
            ready!(self.sink.as_mut().poll_ready(cx))?;
            let text = match self.queue.pop_front() {
                Some(OutItem::Text(t)) => {
                    self.text_bytes -= t.len();
                    t
                }
                Some(OutItem::Buffered(id)) => match session.and_then(|s| s.buffered_text(id)) {
                    Some(t) => t.to_owned(),
                    // Confirmed before it was written (a restore said the peer has it).
                    None => continue,
                },
                None => break,
            };
            self.sink.as_mut().start_send(text)?;
            self.dirty = true;
        }
        if self.dirty {
            ready!(self.sink.as_mut().poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what is queued and closes the transport (FIN or WebSocket close).
    pub(crate) async fn finish(&mut self, session: Option<&Session>) {
        let written = std::future::poll_fn(|cx| self.poll_write(cx, session)).await;
        if written.is_ok() {
            let _ = std::future::poll_fn(|cx| self.sink.as_mut().poll_close(cx)).await;
        }
    }

    /// The sink, for a transport handed to another connection (nothing is queued then: a
    /// server hands over right after reading the restore handshake).
    pub(crate) fn into_sink(self) -> MessageSink {
        self.sink
    }
}

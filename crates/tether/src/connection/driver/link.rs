//! Losing and regaining the transport: a server's session waits detached for its client; a
//! client schedules reconnect attempts and sends its restore handshake on each new transport.

use super::*;

impl Driver {
    /// Lets go of the attached transport at once: a dead or stalled peer gets no say in it.
    /// Replies already queued (a handshake response, callbacks) still get a bounded chance to
    /// go out in the background, as they would have with a synchronous write; buffered
    /// messages need no such chance, a restore resends them.
    pub(super) fn drop_link(&mut self) {
        self.incoming = None;
        if let Some(mut writer) = self.writer.take() {
            if writer.wants_write() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_GRACE, writer.finish(None)).await;
                });
            }
        }
    }

    /// The current transport is gone. A handshaken session survives it: a client schedules a
    /// reconnect, a server waits for its client; anything else ends the connection.
    pub(super) fn on_link_lost(
        &mut self,
        reason: Option<String>,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        self.drop_link();
        self.heartbeat = None;
        if !self.handshake_done || self.session.is_none() {
            if let Some(reply) = handshake_reply.take() {
                let _ = reply.send(Err(Error::NoHandshakeResponse));
            }
            return Err(Stop::Gone(reason));
        }
        if let Some(reason) = &reason {
            tracing::debug!(conn = self.conn.id(), %reason, "transport lost");
        }
        match self.role {
            Role::Client => {
                if matches!(self.phase, Phase::Restoring { .. } | Phase::Connecting) {
                    self.failures = self.failures.saturating_add(1);
                    self.emit_event(ConnectionEvent::Reconnect {
                        error: Some(reason.clone().unwrap_or_else(|| "transport closed".into())),
                    });
                }
                let Some(rc) = &self.reconnect else {
                    return Err(Stop::Gone(reason));
                };
                let Some(attempt) = rc.reconnector.next_attempt(self.failures, &rc.endpoint) else {
                    return Err(Stop::Gone(reason));
                };
                self.connecting = None;
                if attempt.delay.is_zero() {
                    // No timer: its millisecond granularity would dominate a fast restore.
                    self.timer = None;
                    return self.start_attempt(attempt.endpoint);
                }
                self.phase = Phase::Waiting {
                    endpoint: attempt.endpoint,
                };
                self.timer = Some(tokio::time::Instant::now() + attempt.delay);
                Ok(())
            }
            Role::Server => {
                if let (Some(h), Some(reason)) = (&self.hooks, &reason) {
                    h.on_error(&self.conn, reason);
                }
                self.phase = Phase::Detached;
                crate::metrics::session_detached(self.session.as_ref());
                self.timer = Some(tokio::time::Instant::now() + self.client_expiration);
                if let (Some(h), Some(s)) = (&self.hooks, &self.session) {
                    h.on_detach(&self.conn, s.encode());
                }
                Ok(())
            }
        }
    }

    /// Client: starts connecting to `endpoint` for a reconnect.
    pub(super) fn start_attempt(&mut self, endpoint: Endpoint) -> Result<(), Stop> {
        self.emit_event(ConnectionEvent::ReconnectAttempt {
            transport: endpoint.to_string(),
        });
        let Some(rc) = self.reconnect.as_mut() else {
            return Err(Stop::Gone(None));
        };
        rc.endpoint.clone_from(&endpoint);
        let config = rc.transport.clone();
        let timeout = rc.handshake_timeout;
        self.connecting = Some(Box::pin(async move {
            match tokio::time::timeout(timeout, transport::connect(&endpoint, &config)).await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Timeout(timeout)),
            }
        }));
        self.phase = Phase::Connecting;
        Ok(())
    }

    pub(super) fn attach(&mut self, transport: Transport) {
        self.conn.identity().info = Some(transport.info);
        self.incoming = Some(transport.incoming);
        self.writer = Some(Writer::new(transport.outgoing));
    }

    /// Client: a reconnect attempt finished connecting (or failed to).
    pub(super) fn on_connected(&mut self, transport: Result<Transport, Error>) -> Result<(), Stop> {
        let transport = match transport {
            Ok(t) => t,
            Err(e) => return Err(Stop::LinkLost(Some(e.to_string()))),
        };
        self.attach(transport);
        let (Some(hs), Some(session), Some(rc)) =
            (&self.client_handshake, &self.session, &self.reconnect)
        else {
            return Err(Stop::Gone(None));
        };
        let fresh = self.new_session_next;
        let msg = if fresh {
            Message::HandshakeRequest {
                id: 0,
                app: hs.app.clone(),
                version: hs.version.clone(),
                auth: hs.auth.clone(),
            }
        } else {
            session.restore_request(&hs.app, hs.version.as_deref())
        };
        self.timer = Some(tokio::time::Instant::now() + rc.handshake_timeout);
        self.phase = Phase::Restoring { fresh };
        self.write(&msg);
        Ok(())
    }
}

//! Handshakes and session restores: the server's decision on a handshake request, the
//! client's reading of the answer, and what a restore resends or fails.

use super::*;

impl Driver {
    /// Server: a new transport restores this connection's session. The old one is dropped at
    /// once, stalled or not.
    pub(super) fn adopt(&mut self, transport: Transport, peer_received: u64) -> Result<(), Stop> {
        crate::metrics::session_left_detached(matches!(self.phase, Phase::Detached));
        self.drop_link();
        self.attach(transport);
        self.timer = None;
        self.restore_session(peer_received, true)
    }

    /// Server: answers a restore with `ok:<received>`, then resends what the client missed.
    pub(super) fn restore_session(
        &mut self,
        peer_received: u64,
        restored: bool,
    ) -> Result<(), Stop> {
        let Some(session) = self.session.as_mut() else {
            return Err(Stop::Gone(Some("no session to restore".into())));
        };
        let response = session.restored_response();
        session.restore_in_place(peer_received);
        let session_id = session.id().to_owned();
        let state = session.encode();
        self.phase = Phase::Open;
        self.write(&response);
        self.resend_buffered();
        self.since_ack = (0, 0);
        self.fail_received_unanswered(peer_received);
        if self.session.as_ref().is_some_and(|s| s.buffered_len() > 0) {
            // Whatever was resent is confirmed by this ping's pong, not a whole ⅛ later.
            self.send_heartbeat_ping()?;
        }
        if let Some(every) = self.heartbeat_setting() {
            self.heartbeat = Some(heartbeat_interval(every));
        }
        self.emit_event(ConnectionEvent::Client { session_id });
        self.ready_notified = true;
        if let Some(h) = &self.hooks {
            h.on_ready(&self.conn, restored, state);
        }
        Ok(())
    }

    /// After a restore: every request of ours the peer received (`|id| <= peer_received`)
    /// that is still unanswered lost its callback with the old transport, since callbacks are
    /// never resent. That covers the session's lost ids, and also requests an out-of-order
    /// callback confirmed early, which `@metarhia/jstp` leaves hanging.
    pub(super) fn fail_received_unanswered(&mut self, peer_received: u64) {
        let lost: Vec<i64> = self
            .pending
            .keys()
            .filter(|id| id.unsigned_abs() <= peer_received)
            .copied()
            .collect();
        self.fail_lost(&lost);
    }

    /// Fails pending requests whose callbacks were lost with the old transport.
    pub(super) fn fail_lost(&mut self, ids: &[i64]) {
        for id in ids {
            if let Some(p) = self.pending.remove(id) {
                self.forget_deadline(&p.key);
                if let PendingKind::Request(reply) = p.kind {
                    let _ = reply.send(Err(Error::CallbackLost));
                }
            }
        }
    }

    pub(super) async fn server_handshake(
        &mut self,
        app: String,
        version: Option<String>,
        auth: tether_wire::Auth,
    ) -> Result<(), Stop> {
        let Some(hooks) = self.hooks.clone() else {
            return Err(Stop::Gone(Some("no server hooks".into())));
        };
        // The decision (authentication, a store look-up) may not outlast the handshake
        // deadline: a stalled store must not hold the connection past it.
        let decision = hooks.handshake(self.conn.clone(), app, version, auth);
        let decision = match self.timer {
            Some(deadline) => match tokio::time::timeout_at(deadline, decision).await {
                Ok(d) => d,
                Err(_) => {
                    hooks.on_handshake_timeout(&self.conn);
                    return Err(Stop::Gone(Some("handshake timeout".into())));
                }
            },
            None => decision.await,
        };
        match decision {
            Ok(HandshakeDecision::New(accepted)) => {
                let mut session = Session::new(
                    accepted.session_id.clone(),
                    Role::Server,
                    self.conn.shared.config.session,
                );
                session.set_username(accepted.username.clone());
                // The response always goes first: nothing else may be written before it.
                let response = session.created_response();
                let state = session.encode();
                self.session = Some(session);
                self.app = Some(accepted.app.clone());
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    id.username = accepted.username;
                    id.session_id = Some(accepted.session_id.clone());
                    id.app = Some(accepted.app);
                }
                self.handshake_done = true;
                self.phase = Phase::Open;
                self.timer = None;
                self.write(&response);
                if let Some(interval) = self.conn.shared.config.heartbeat_interval {
                    self.on_command(Command::Heartbeat(Some(interval)))?;
                }
                self.ready_notified = true;
                self.emit_event(ConnectionEvent::Client {
                    session_id: accepted.session_id,
                });
                hooks.on_ready(&self.conn, false, state);
                Ok(())
            }
            Ok(HandshakeDecision::Restore {
                session,
                app,
                peer_received,
            }) => {
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    id.username = session.username().map(str::to_owned);
                    id.session_id = Some(session.id().to_owned());
                    id.app = Some(app.clone());
                    id.heartbeat = self.conn.shared.config.heartbeat_interval;
                }
                self.session = Some(session);
                self.app = Some(app);
                self.handshake_done = true;
                self.timer = None;
                self.restore_session(peer_received, true)
            }
            Ok(HandshakeDecision::Adopt {
                target,
                peer_received,
            }) => {
                let (Some(incoming), Some(writer)) = (self.incoming.take(), self.writer.take())
                else {
                    return Err(Stop::Gone(None));
                };
                let Some(info) = self.conn.transport_info() else {
                    return Err(Stop::Gone(None));
                };
                let transport = Transport {
                    incoming,
                    outgoing: writer.into_sink(),
                    info,
                };
                let cmd = Command::Adopt(Box::new((transport, peer_received)));
                match target.shared.cmd_tx.send(cmd) {
                    Ok(()) => Err(Stop::HandedOver),
                    Err(mpsc::error::SendError(cmd)) => {
                        // The session's connection ended meanwhile: the session is unknown.
                        if let Command::Adopt(adopt) = cmd {
                            self.attach(adopt.0);
                        }
                        self.write(&Session::unknown_session_response());
                        Err(Stop::Graceful)
                    }
                }
            }
            Err(error) => {
                self.write(&Message::HandshakeResponse {
                    id: 0,
                    result: HandshakeResult::Error(error),
                });
                Err(Stop::Graceful)
            }
        }
    }

    pub(super) fn client_handshake_response(
        &mut self,
        result: HandshakeResult,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let reply = handshake_reply.take();
        match result {
            HandshakeResult::Error(e) => {
                self.emit_event(ConnectionEvent::Handshake {
                    error: Some(e.clone()),
                    ok: None,
                });
                if let Some(r) = reply {
                    let _ = r.send(Err(Error::Remote(e)));
                }
                Err(Stop::Gone(Some("handshake refused".into())))
            }
            ok => {
                let ok_text = match &ok {
                    HandshakeResult::NewSession(s) => s.clone(),
                    HandshakeResult::Restored(n) => n.to_string(),
                    HandshakeResult::OtherOk(v) => v.to_mdsf(),
                    HandshakeResult::Error(_) => unreachable!("handled above"),
                };
                let session_id = match &ok {
                    HandshakeResult::NewSession(s) => Some(s.clone()),
                    _ => None,
                };
                self.start_session(session_id);
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(ok_text),
                });
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                Ok(())
            }
        }
    }

    /// Client: a session the server just created (`None`: the server sent no session id, so
    /// nothing can be restored).
    pub(super) fn start_session(&mut self, session_id: Option<String>) {
        let heartbeat = self.conn.shared.config.heartbeat_interval;
        {
            let mut id = self.conn.identity();
            id.handshake_done = true;
            id.session_id.clone_from(&session_id);
            id.heartbeat = heartbeat;
        }
        self.session = Some(Session::new(
            session_id.clone().unwrap_or_default(),
            Role::Client,
            self.conn.shared.config.session,
        ));
        if session_id.is_none() {
            // Without a session id there is nothing to restore.
            self.reconnect = None;
        }
        self.handshake_done = true;
        self.phase = Phase::Open;
        self.timer = None;
        self.failures = 0;
        self.since_ack = (0, 0);
        self.heartbeat = heartbeat.map(heartbeat_interval);
    }

    /// Client: the answer to a restore (or, after a refused restore, a new-session) handshake.
    pub(super) fn client_restore_response(
        &mut self,
        result: HandshakeResult,
        fresh: bool,
    ) -> Result<(), Stop> {
        match result {
            HandshakeResult::Restored(n) if !fresh => {
                let Some(session) = self.session.as_mut() else {
                    return Err(Stop::Gone(None));
                };
                session.restore_in_place(n);
                self.phase = Phase::Open;
                self.timer = None;
                self.failures = 0;
                self.since_ack = (0, 0);
                self.resend_buffered();
                self.fail_received_unanswered(n);
                self.heartbeat = self.heartbeat_setting().map(heartbeat_interval);
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(n.to_string()),
                });
                self.emit_event(ConnectionEvent::Reconnect { error: None });
                Ok(())
            }
            HandshakeResult::Error(e) if !fresh => {
                self.emit_event(ConnectionEvent::Handshake {
                    error: Some(e.clone()),
                    ok: None,
                });
                let fallback = self
                    .reconnect
                    .as_ref()
                    .is_some_and(|r| r.fallback_to_new_session);
                if fallback && e.code == ErrorCode::AuthFailed.code() {
                    // The server no longer knows the session (and closes this transport, as
                    // after every refused handshake): start a new one on the next transport.
                    // `@metarhia/jstp` would retry the old session forever.
                    self.new_session_next = true;
                }
                Err(Stop::LinkLost(Some(format!(
                    "session restore refused: {e}"
                ))))
            }
            HandshakeResult::NewSession(id) => {
                self.new_session_next = false;
                // A new session: whatever the old one had in flight may or may not have run.
                let old = self.session.as_mut().map(Session::take_buffered);
                for m in old.into_iter().flatten() {
                    self.fail_lost(&[m.id]);
                }
                self.start_session(Some(id.clone()));
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(id),
                });
                self.emit_event(ConnectionEvent::Reconnect { error: None });
                Ok(())
            }
            other => {
                let e = format!("unexpected answer to the restore handshake: {other:?}");
                Err(Stop::LinkLost(Some(e)))
            }
        }
    }
}

//! Sessions: upstream's session and resend scenarios replayed between a client and a server
//! over a simulated link that can drop, and property tests of the restore algorithm.

use proptest::prelude::*;
use std::collections::{BTreeSet, VecDeque};
use tether_wire::session::HANDSHAKE_ID;
use tether_wire::{
    BufferLimit, CallbackResult, ErrorCode, HandshakeResult, Message, RemoteErrorArray,
    RequestKind, RestoreOutcome, RestorePlan, RestoreRequest, Role, Session, SessionConfig,
    SessionError, Value,
};

// ---------------------------------------------------------------------------------------------
// A client and a server over a link that loses whatever is in flight when it drops.

const SESSION_ID: &str = "8a3c6e5e-3b5e-4d1a-9b7e-0c2f1d4e5a6b";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// What one side observed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Log {
    /// Ids of the peer's calls this side ran, in order.
    executed: Vec<i64>,
    /// Ids of the peer's events this side received, in order.
    events: Vec<i64>,
    /// Ids of this side's requests that got their reply.
    resolved: Vec<i64>,
    /// Ids of this side's requests failed with CALLBACK_LOST.
    lost: Vec<i64>,
}

struct Peer {
    session: Session,
    /// Requests awaiting a reply, with whether they are re-issued when lost
    /// (`callMethodWithResend`).
    pending: Vec<(i64, bool)>,
    log: Log,
}

impl Peer {
    fn new(role: Role) -> Self {
        Peer {
            session: Session::new(SESSION_ID, role, SessionConfig::default()),
            pending: Vec::new(),
            log: Log::default(),
        }
    }

    fn take_pending(&mut self, id: i64) -> Option<bool> {
        let i = self.pending.iter().position(|(p, _)| *p == id)?;
        Some(self.pending.remove(i).1)
    }

    /// Sends a request; returns its text if the link is up.
    fn request(&mut self, kind: RequestKind, resend: bool, online: bool) -> Option<String> {
        let id = self.session.next_message_id();
        let msg = match kind {
            RequestKind::Call => Message::Call {
                id,
                iface: "calculator".into(),
                method: "answer".into(),
                args: Value::Array(vec![]),
            },
            RequestKind::Event => Message::Event {
                id,
                iface: "chat".into(),
                event: "message".into(),
                args: Value::from(vec!["Marcus", "Hello"]),
            },
            RequestKind::Inspect => Message::Inspect {
                id,
                iface: "calculator".into(),
            },
            RequestKind::Ping => Message::Ping { id },
        };
        let text = self.session.on_send_message(&msg).unwrap();
        if kind.expects_reply() {
            self.pending.push((id, resend));
        }
        online.then_some(text)
    }

    /// Handles one incoming text; returns the reply to write, if any.
    fn receive(&mut self, text: &str) -> Option<String> {
        let msg = Message::parse(text).unwrap();
        self.session.on_receive(&msg);
        let reply = match msg {
            Message::Call { id, .. } => {
                self.log.executed.push(id);
                Message::Callback {
                    id,
                    result: CallbackResult::Ok(vec![Value::from(42)]),
                }
            }
            Message::Inspect { id, .. } => Message::Callback {
                id,
                result: CallbackResult::Ok(vec![Value::from("answer")]),
            },
            Message::Ping { id } => Message::Pong { id },
            Message::Event { id, .. } => {
                self.log.events.push(id);
                return None;
            }
            Message::Callback { id, .. } | Message::Pong { id } => {
                if self.take_pending(id).is_some() {
                    self.log.resolved.push(id);
                }
                return None;
            }
            other => panic!("unexpected message {other:?}"),
        };
        Some(self.session.on_send_message(&reply).unwrap())
    }

    /// Applies a restore plan as a driver would: write the resends, then fail the lost
    /// requests (re-issuing those made with resend). Returns the texts to write, in order.
    fn apply(&mut self, plan: RestorePlan) -> Vec<String> {
        let mut out = plan.resend;
        for id in plan.lost_request_ids {
            if let Some(resend) = self.take_pending(id) {
                self.log.lost.push(id);
                if resend {
                    out.extend(self.request(RequestKind::Call, true, true));
                }
            }
        }
        out
    }
}

struct World {
    client: Peer,
    server: Peer,
    to_server: VecDeque<String>,
    to_client: VecDeque<String>,
    online: bool,
    /// Every restore handshake: (request, response).
    handshakes: Vec<(String, String)>,
    saved_client: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Call(Side),
    ResendableCall(Side),
    Event(Side),
    Inspect(Side),
    Ping(Side),
    /// Deliver up to n in-flight messages to a side.
    Deliver(Side, usize),
    /// Deliver everything, replies included, until the link is quiet.
    DeliverAll,
    /// The transport dies; in-flight messages are lost.
    Drop,
    /// A new transport comes up and the client restores the session.
    Restore,
    /// The server stores its session and rebuilds it (a new server sharing the store).
    ReloadServer,
    /// The client stores its session (`Session#toString`).
    SaveClient,
    /// The client process dies and a new one restores from the saved session: pending
    /// requests are gone.
    RestartClientFromSaved,
}

impl World {
    fn new() -> Self {
        World {
            client: Peer::new(Role::Client),
            server: Peer::new(Role::Server),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            online: true,
            handshakes: Vec::new(),
            saved_client: None,
        }
    }

    fn peer(&mut self, side: Side) -> (&mut Peer, &mut VecDeque<String>) {
        match side {
            Side::Client => (&mut self.client, &mut self.to_server),
            Side::Server => (&mut self.server, &mut self.to_client),
        }
    }

    fn request(&mut self, side: Side, kind: RequestKind, resend: bool) {
        let online = self.online;
        let (peer, out) = self.peer(side);
        out.extend(peer.request(kind, resend, online));
    }

    /// Delivers up to `n` messages to `to`, queueing their replies; returns how many.
    fn deliver(&mut self, to: Side, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let (receiver, inbox, outbox) = match to {
                Side::Client => (&mut self.client, &mut self.to_client, &mut self.to_server),
                Side::Server => (&mut self.server, &mut self.to_server, &mut self.to_client),
            };
            let Some(text) = inbox.pop_front() else { break };
            outbox.extend(receiver.receive(&text));
            done += 1;
        }
        done
    }

    fn deliver_all(&mut self) {
        while self.deliver(Side::Server, usize::MAX) + self.deliver(Side::Client, usize::MAX) > 0 {}
    }

    fn drop_link(&mut self) {
        self.to_server.clear();
        self.to_client.clear();
        self.online = false;
    }

    fn restore(&mut self) {
        self.drop_link();
        // Client → server: the session strategy.
        let request = self
            .client
            .session
            .restore_request("testApp", None)
            .encode();
        let parsed = Message::parse(&request).unwrap();
        let req = RestoreRequest::from_message(&parsed).unwrap();
        assert_eq!(req.session_id, self.server.session.id());
        // Server: restore, reply with its received count, resend, fail lost requests.
        let plan = self.server.session.restore(req.received_count);
        let response = self.server.session.restored_response().encode();
        self.to_client.push_back(response.clone());
        let texts = self.server.apply(plan);
        self.to_client.extend(texts);
        // Client, on the reply.
        let reply = Message::parse(&self.to_client.pop_front().unwrap()).unwrap();
        let Some(RestoreOutcome::Restored {
            peer_received_count,
        }) = RestoreOutcome::from_message(&reply)
        else {
            panic!("not restored: {reply:?}")
        };
        let plan = self.client.session.restore(peer_received_count);
        self.online = true;
        let texts = self.client.apply(plan);
        self.to_server.extend(texts);
        self.handshakes.push((request, response));
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Call(side) => self.request(side, RequestKind::Call, false),
            Step::ResendableCall(side) => self.request(side, RequestKind::Call, true),
            Step::Event(side) => self.request(side, RequestKind::Event, false),
            Step::Inspect(side) => self.request(side, RequestKind::Inspect, false),
            Step::Ping(side) => self.request(side, RequestKind::Ping, false),
            Step::Deliver(to, n) => {
                self.deliver(to, n);
            }
            Step::DeliverAll => self.deliver_all(),
            Step::Drop => self.drop_link(),
            Step::Restore => self.restore(),
            Step::ReloadServer => {
                let stored = self.server.session.encode();
                self.server.session = Session::decode(&stored, SessionConfig::default()).unwrap();
            }
            Step::SaveClient => self.saved_client = Some(self.client.session.encode()),
            Step::RestartClientFromSaved => {
                let saved = self.saved_client.as_deref().unwrap();
                self.client = Peer {
                    session: Session::decode(saved, SessionConfig::default()).unwrap(),
                    pending: Vec::new(),
                    log: Log::default(),
                };
            }
        }
    }

    fn run(steps: &[Step]) -> World {
        let mut w = World::new();
        for &s in steps {
            w.step(s);
        }
        w
    }
}

fn log(executed: &[i64], events: &[i64], resolved: &[i64], lost: &[i64]) -> Log {
    Log {
        executed: executed.to_vec(),
        events: events.to_vec(),
        resolved: resolved.to_vec(),
        lost: lost.to_vec(),
    }
}

struct Scenario {
    name: &'static str,
    steps: &'static [Step],
    client: Log,
    server: Log,
    /// Next ids (client, server).
    next: (i64, i64),
}

fn scenarios() -> Vec<Scenario> {
    use Side::{Client as C, Server as S};
    use Step::*;
    vec![
        Scenario {
            // session.js
            name: "a call answered before the drop is not run again after the restore",
            steps: &[Call(C), DeliverAll, Drop, Restore, DeliverAll],
            client: log(&[], &[], &[1], &[]),
            server: log(&[1], &[], &[], &[]),
            next: (2, -1),
        },
        Scenario {
            // reconnection.js, custom-reconnector.js
            name: "after a reconnect the same session keeps working and ids continue",
            steps: &[
                Call(C),
                DeliverAll,
                Drop,
                Restore,
                Call(C),
                Ping(C),
                DeliverAll,
            ],
            client: log(&[], &[], &[1, 2, 3], &[]),
            server: log(&[1, 2], &[], &[], &[]),
            next: (4, -1),
        },
        Scenario {
            // resendable-call-from-client.js: a new server sharing the session store.
            name: "a call received but unanswered fails with CALLBACK_LOST; resend runs it again",
            steps: &[
                ResendableCall(C),
                Deliver(S, 1),
                Drop,
                ReloadServer,
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[], &[2], &[1]),
            server: log(&[1, 2], &[], &[], &[]),
            next: (3, -1),
        },
        Scenario {
            // resendable-call-from-closed-client.js
            name: "a call made while closed is sent exactly once after the restore",
            steps: &[Drop, ResendableCall(C), Restore, DeliverAll],
            client: log(&[], &[], &[1], &[]),
            server: log(&[1], &[], &[], &[]),
            next: (2, -1),
        },
        Scenario {
            // resendable-call-from-server.js
            name: "server call received but unanswered fails with CALLBACK_LOST, resent with -2",
            steps: &[ResendableCall(S), Deliver(C, 1), Drop, Restore, DeliverAll],
            client: log(&[-1, -2], &[], &[], &[]),
            server: log(&[], &[], &[-2], &[-1]),
            next: (1, -3),
        },
        Scenario {
            // resendable-call-from-server-to-closed-client.js
            name: "a server call made while the client is away is sent once after the restore",
            steps: &[Drop, ResendableCall(S), ReloadServer, Restore, DeliverAll],
            client: log(&[-1], &[], &[], &[]),
            server: log(&[], &[], &[-1], &[]),
            next: (1, -2),
        },
        Scenario {
            // session-resend-event-on-connection-drop.js
            name: "an event emitted while the client process is dead reaches its successor",
            steps: &[
                SaveClient,
                Drop,
                Event(S),
                RestartClientFromSaved,
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[-1], &[], &[]),
            server: log(&[], &[], &[], &[]),
            next: (1, -2),
        },
        Scenario {
            // The worked example of the notes (section 7.2).
            name: "calls 1-5 with 1-4 received, events -1..-3 with -1,-2 received",
            steps: &[
                Call(C),
                Call(C),
                Call(C),
                Call(C),
                Call(C),
                Event(S),
                Event(S),
                Event(S),
                Deliver(S, 4),
                Deliver(C, 2),
                Drop,
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[-1, -2, -3], &[5], &[1, 2, 3, 4]),
            server: log(&[1, 2, 3, 4, 5], &[], &[], &[]),
            next: (6, -4),
        },
        Scenario {
            name: "events confirmed by a restore are not delivered twice",
            steps: &[Event(C), Event(C), DeliverAll, Drop, Restore, DeliverAll],
            client: log(&[], &[], &[], &[]),
            server: log(&[], &[1, 2], &[], &[]),
            next: (3, -1),
        },
        Scenario {
            // connection-emit-actions.js (heartbeat): a pong confirms the events before it.
            name: "a heartbeat ping confirms buffered events",
            steps: &[
                Event(S),
                Event(S),
                Ping(S),
                DeliverAll,
                Drop,
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[-1, -2], &[], &[]),
            server: log(&[], &[], &[-3], &[]),
            next: (1, -4),
        },
        Scenario {
            name: "a lost ping and a lost inspect fail with CALLBACK_LOST too",
            steps: &[
                Ping(C),
                Inspect(C),
                Deliver(S, 2),
                Drop,
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[], &[], &[1, 2]),
            server: log(&[], &[], &[], &[]),
            next: (3, -1),
        },
        Scenario {
            name: "a resent call lost again in flight is resent again, and runs once",
            steps: &[Call(C), Drop, Restore, Drop, Restore, DeliverAll],
            client: log(&[], &[], &[1], &[]),
            server: log(&[1], &[], &[], &[]),
            next: (2, -1),
        },
        Scenario {
            name: "requests queued while offline keep their order behind the resends",
            steps: &[
                Call(C),
                Event(C),
                Drop,
                Event(C),
                Call(C),
                Restore,
                DeliverAll,
            ],
            client: log(&[], &[], &[1, 4], &[]),
            server: log(&[1, 4], &[2, 3], &[], &[]),
            next: (5, -1),
        },
    ]
}

#[test]
fn upstream_session_scenarios() {
    for sc in scenarios() {
        let w = World::run(sc.steps);
        assert_eq!(w.client.log, sc.client, "{}: client", sc.name);
        assert_eq!(w.server.log, sc.server, "{}: server", sc.name);
        let next = (
            w.client.session.next_message_id(),
            w.server.session.next_message_id(),
        );
        assert_eq!(next, sc.next, "{}: next ids", sc.name);
        assert!(w.client.pending.is_empty(), "{}: client pending", sc.name);
        assert!(w.server.pending.is_empty(), "{}: server pending", sc.name);
    }
}

#[test]
fn worked_example_on_the_wire() {
    use Side::{Client as C, Server as S};
    use Step::*;
    let mut w = World::run(&[
        Call(C),
        Call(C),
        Call(C),
        Call(C),
        Call(C),
        Event(S),
        Event(S),
        Event(S),
        Deliver(S, 4),
        Deliver(C, 2),
        Drop,
        Restore,
    ]);
    assert_eq!(
        w.handshakes,
        [(
            format!("{{handshake:[0,'testApp'],session:['{SESSION_ID}',2]}}"),
            "{handshake:[0],ok:4}".to_owned()
        )]
    );
    let event3 = "{event:[-3,'chat'],message:['Marcus','Hello']}";
    assert_eq!(w.to_client, [event3]);
    assert_eq!(w.to_server, ["{call:[5,'calculator'],answer:[]}"]);
    w.deliver_all();
    assert_eq!(w.client.log.lost, [1, 2, 3, 4]);
}

#[test]
fn unknown_session_is_refused_with_auth_failed() {
    let reply = Session::unknown_session_response();
    assert_eq!(reply.encode(), "{handshake:[0],error:[11]}");
    let parsed = Message::parse(&reply.encode()).unwrap();
    assert_eq!(
        RestoreOutcome::from_message(&parsed),
        Some(RestoreOutcome::Rejected(RemoteErrorArray::code(
            ErrorCode::AuthFailed
        )))
    );
    // A client giving up on the session gets back what it had not had confirmed.
    let mut client = Session::new(SESSION_ID, Role::Client, SessionConfig::default());
    client
        .on_send_message(&Message::Ping {
            id: client.next_message_id(),
        })
        .unwrap();
    let abandoned = client.take_buffered();
    assert_eq!(abandoned.len(), 1);
    assert_eq!(abandoned[0].kind, RequestKind::Ping);
}

#[test]
fn new_session_handshake_on_the_wire() {
    let server = Session::new(SESSION_ID, Role::Server, SessionConfig::default());
    let text = server.created_response().encode();
    assert_eq!(text, format!("{{handshake:[0],ok:'{SESSION_ID}'}}"));
    let Message::HandshakeResponse {
        id: HANDSHAKE_ID,
        result: HandshakeResult::NewSession(sid),
    } = Message::parse(&text).unwrap()
    else {
        panic!()
    };
    let client = Session::new(sid, Role::Client, SessionConfig::default());
    assert_eq!(client.next_message_id(), 1);
    assert_eq!(server.next_message_id(), -1);
}

#[test]
fn session_storage_survives_a_store_round_trip() {
    // session-provider-async.js: `session.set/get` state is kept across a reconnect through
    // the storage provider.
    let mut server = Session::new(SESSION_ID, Role::Server, SessionConfig::default());
    server.set_username(Some("login".into()));
    server
        .storage_mut()
        .insert("counter", Value::from(vec![Value::from(1), Value::Null]));
    let back = Session::decode(&server.encode(), SessionConfig::default()).unwrap();
    assert_eq!(back.username(), Some("login"));
    assert_eq!(back.storage(), server.storage());
}

// ---------------------------------------------------------------------------------------------
// Property tests: one session against a reference model.

#[derive(Debug, Clone)]
enum Op {
    Send(RequestKind, String),
    /// A callback or pong with this id.
    Ack(i64),
    /// A request from the peer with this id.
    Receive(i64),
    Restore(u64),
    /// Store and rebuild the session.
    RoundTrip,
}

fn arb_kind() -> impl Strategy<Value = RequestKind> {
    prop_oneof![
        Just(RequestKind::Call),
        Just(RequestKind::Event),
        Just(RequestKind::Inspect),
        Just(RequestKind::Ping),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (arb_kind(), prop_oneof![any::<String>(), "['\\\\\\x00a-c]{0,6}"])
            .prop_map(|(k, t)| Op::Send(k, t)),
        2 => (-45i64..45).prop_map(Op::Ack),
        1 => (-45i64..45).prop_map(Op::Receive),
        1 => (0u64..48).prop_map(Op::Restore),
        1 => Just(Op::RoundTrip),
    ]
}

fn arb_config() -> impl Strategy<Value = SessionConfig> {
    (
        prop_oneof![Just(usize::MAX), 0usize..12],
        prop_oneof![Just(usize::MAX), 0usize..300],
    )
        .prop_map(|(m, b)| SessionConfig {
            max_buffered_messages: m,
            max_buffered_bytes: b,
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Outstanding,
    /// Confirmed by a callback or pong.
    Acknowledged,
    /// Confirmed by a restore (and, for requests, reported lost).
    Confirmed,
}

struct Sent {
    id: i64,
    kind: RequestKind,
    text: String,
    fate: Fate,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn restore_partitions_every_sent_message(
        role in prop_oneof![Just(Role::Client), Just(Role::Server)],
        config in arb_config(),
        ops in prop::collection::vec(arb_op(), 0..60),
    ) {
        let mut s = Session::new("sid", role, config);
        let mut sent: Vec<Sent> = Vec::new();
        let mut acked = 0u64;
        let mut received = 0u64;
        let mut latest = 0i64;
        for op in ops {
            match op {
                Op::Send(kind, text) => {
                    let id = s.next_message_id();
                    prop_assert_eq!(id, latest + role.delta());
                    let outstanding: Vec<&Sent> =
                        sent.iter().filter(|m| m.fate == Fate::Outstanding).collect();
                    let bytes: usize = outstanding.iter().map(|m| m.text.len()).sum();
                    let fits = outstanding.len() < config.max_buffered_messages
                        && bytes + text.len() <= config.max_buffered_bytes;
                    match s.on_send(id, kind, &text) {
                        Ok(()) => {
                            prop_assert!(fits);
                            latest = id;
                            sent.push(Sent { id, kind, text, fate: Fate::Outstanding });
                        }
                        Err(SessionError::BufferFull { limit, messages, bytes: b, .. }) => {
                            prop_assert!(!fits);
                            prop_assert_eq!(messages, outstanding.len());
                            prop_assert_eq!(b, bytes);
                            if limit == BufferLimit::Messages {
                                prop_assert!(outstanding.len() >= config.max_buffered_messages);
                            }
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Ack(n) => {
                    let before = acked;
                    acked = acked.max(n.unsigned_abs().min(latest.unsigned_abs()));
                    let mut expect = 0;
                    for m in sent.iter_mut() {
                        if m.fate == Fate::Outstanding && m.id.unsigned_abs() <= acked {
                            m.fate = Fate::Acknowledged;
                            expect += 1;
                        }
                    }
                    let released = if n % 2 == 0 {
                        s.on_receive(&Message::Pong { id: n })
                    } else {
                        s.on_receive(&Message::Callback { id: n, result: CallbackResult::Empty })
                    };
                    prop_assert_eq!(released, expect);
                    // Monotonic: an older acknowledgement changes nothing.
                    prop_assert!(s.acknowledged_count() >= before);
                }
                Op::Receive(n) => {
                    s.on_receive(&Message::Ping { id: n });
                    received = n.unsigned_abs();
                }
                Op::Restore(p) => {
                    let before = acked;
                    let upto = before.max(p.min(latest.unsigned_abs()));
                    let plan = s.restore(p);
                    let mut lost = Vec::new();
                    let mut resend = Vec::new();
                    let mut newly = Vec::new();
                    for m in sent.iter_mut() {
                        if m.fate != Fate::Outstanding {
                            continue;
                        }
                        if m.id.unsigned_abs() <= upto {
                            m.fate = Fate::Confirmed;
                            newly.push(m.id);
                            if m.kind.expects_reply() {
                                lost.push(m.id);
                            }
                        } else {
                            resend.push(m.text.clone());
                        }
                    }
                    prop_assert_eq!(&plan.lost_request_ids, &lost);
                    prop_assert_eq!(&plan.resend, &resend);
                    prop_assert_eq!(plan.confirmed, newly.len());
                    prop_assert_eq!(plan.next_message_id, latest + role.delta());
                    // Lost requests lie in (confirmed before, count reported], never events.
                    for id in &plan.lost_request_ids {
                        let abs = id.unsigned_abs();
                        prop_assert!(abs > before && abs <= p);
                        let m = sent.iter().find(|m| m.id == *id).unwrap();
                        prop_assert!(m.kind != RequestKind::Event);
                    }
                    // Every message sent so far is in exactly one place: confirmed earlier,
                    // confirmed now (and then reported lost if it awaits a reply), or resent
                    // (exactly once, at its position).
                    let mut resend_at = 0;
                    for m in &sent {
                        let in_lost = plan.lost_request_ids.contains(&m.id);
                        let now = newly.contains(&m.id);
                        match m.fate {
                            Fate::Outstanding => {
                                prop_assert!(!in_lost);
                                prop_assert_eq!(&plan.resend[resend_at], &m.text);
                                resend_at += 1;
                            }
                            _ if now => {
                                prop_assert!(m.id.unsigned_abs() > before);
                                prop_assert_eq!(in_lost, m.kind.expects_reply());
                            }
                            _ => {
                                prop_assert!(m.id.unsigned_abs() <= before);
                                prop_assert!(!in_lost);
                            }
                        }
                    }
                    prop_assert_eq!(resend_at, plan.resend.len());
                    acked = upto;
                }
                Op::RoundTrip => {
                    let text = s.encode();
                    let back = Session::decode(&text, config).unwrap();
                    prop_assert_eq!(&back, &s);
                    s = back;
                }
            }
            // The session's buffer is exactly the model's outstanding messages, in order.
            let model: Vec<(i64, RequestKind, &str)> = sent
                .iter()
                .filter(|m| m.fate == Fate::Outstanding)
                .map(|m| (m.id, m.kind, m.text.as_str()))
                .collect();
            let real: Vec<(i64, RequestKind, &str)> =
                s.buffered().map(|m| (m.id, m.kind, m.text.as_str())).collect();
            prop_assert_eq!(real, model);
            prop_assert_eq!(s.acknowledged_count(), acked);
            prop_assert_eq!(s.received_count(), received);
            prop_assert_eq!(s.latest_message_id(), latest);
            prop_assert_eq!(
                s.buffered_bytes(),
                s.buffered().map(|m| m.text.len()).sum::<usize>()
            );
        }
    }

    #[test]
    fn resend_is_in_sending_order(
        role in prop_oneof![Just(Role::Client), Just(Role::Server)],
        kinds in prop::collection::vec(arb_kind(), 0..30),
        acks in prop::collection::vec(0u64..35, 0..6),
        peer in 0u64..35,
    ) {
        let mut s = Session::new("sid", role, SessionConfig::unbounded());
        for kind in kinds {
            let id = s.next_message_id();
            s.on_send(id, kind, &format!("{kind}{id}")).unwrap();
        }
        for a in acks {
            s.acknowledge(a as i64 * role.delta());
        }
        let floor = s.acknowledged_count().max(peer.min(s.latest_message_id().unsigned_abs()));
        let plan = s.restore(peer);
        let ids: Vec<i64> = plan
            .resend
            .iter()
            .map(|t| t.trim_start_matches(char::is_alphabetic).parse().unwrap())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id.unsigned_abs());
        sorted.dedup();
        prop_assert_eq!(&ids, &sorted);
        prop_assert!(ids.iter().all(|id| id.unsigned_abs() > floor && id.signum() == role.delta()));
        let expected_len = (s.latest_message_id().unsigned_abs() - floor) as usize;
        prop_assert_eq!(ids.len(), expected_len);
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: two peers over a dropping link.

#[derive(Debug, Clone, Copy)]
enum WorldOp {
    Call(Side),
    Event(Side),
    Ping(Side),
    Deliver(Side, usize),
    Drop,
    Restore,
    ReloadServer,
}

fn arb_side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Client), Just(Side::Server)]
}

fn arb_world_op() -> impl Strategy<Value = WorldOp> {
    prop_oneof![
        3 => arb_side().prop_map(WorldOp::Call),
        3 => arb_side().prop_map(WorldOp::Event),
        1 => arb_side().prop_map(WorldOp::Ping),
        4 => (arb_side(), 0usize..4).prop_map(|(s, n)| WorldOp::Deliver(s, n)),
        1 => Just(WorldOp::Drop),
        1 => Just(WorldOp::Restore),
        1 => Just(WorldOp::ReloadServer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever drops happen, once the link is restored and quiet: every call and event ran
    /// or arrived exactly once, in sending order; every request is either answered or
    /// reported lost, and reported lost only if the peer did receive it.
    #[test]
    fn exactly_once_across_drops(ops in prop::collection::vec(arb_world_op(), 0..80)) {
        let mut w = World::new();
        let mut issued: [Vec<(i64, RequestKind)>; 2] = [Vec::new(), Vec::new()];
        for op in ops {
            match op {
                WorldOp::Call(side) | WorldOp::Event(side) | WorldOp::Ping(side) => {
                    let kind = match op {
                        WorldOp::Call(_) => RequestKind::Call,
                        WorldOp::Event(_) => RequestKind::Event,
                        _ => RequestKind::Ping,
                    };
                    let id = w.peer(side).0.session.next_message_id();
                    issued[side as usize].push((id, kind));
                    w.request(side, kind, false);
                }
                WorldOp::Deliver(to, n) => {
                    w.deliver(to, n);
                }
                WorldOp::Drop => w.drop_link(),
                WorldOp::Restore => w.restore(),
                WorldOp::ReloadServer => w.step(Step::ReloadServer),
            }
        }
        if !w.online {
            w.restore();
        }
        w.deliver_all();
        for (side, peer, other) in [
            (Side::Client, &w.client, &w.server),
            (Side::Server, &w.server, &w.client),
        ] {
            let mine = &issued[side as usize];
            let calls: Vec<i64> =
                mine.iter().filter(|(_, k)| *k == RequestKind::Call).map(|(id, _)| *id).collect();
            let events: Vec<i64> =
                mine.iter().filter(|(_, k)| *k == RequestKind::Event).map(|(id, _)| *id).collect();
            prop_assert_eq!(&other.log.executed, &calls, "{:?} calls", side);
            prop_assert_eq!(&other.log.events, &events, "{:?} events", side);
            prop_assert!(peer.pending.is_empty());
            let requests: BTreeSet<i64> = mine
                .iter()
                .filter(|(_, k)| k.expects_reply())
                .map(|(id, _)| *id)
                .collect();
            let resolved: BTreeSet<i64> = peer.log.resolved.iter().copied().collect();
            let lost: BTreeSet<i64> = peer.log.lost.iter().copied().collect();
            prop_assert_eq!(resolved.len(), peer.log.resolved.len());
            prop_assert_eq!(lost.len(), peer.log.lost.len());
            prop_assert!(resolved.is_disjoint(&lost));
            prop_assert_eq!(&resolved | &lost, requests);
        }
    }
}

//! The bodies of tether-wire's fuzz targets.
//!
//! They live here, free of libfuzzer, so that the crate's ordinary test suite can run them too
//! (`tests/fuzz_bodies.rs` includes this file by path) on stable Rust.

use tether_wire::parse::parse_with_budget;
use tether_wire::ser::array_index;
use tether_wire::{parse, stringify, FrameError, Message, NulFramer, Object, Value};

/// Any bytes → `parse`; whatever parses must serialize, re-parse and classify without panics,
/// and the serializer's output must always be readable again.
pub fn parse_body(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(value) = parse(&text) else {
        return;
    };
    check_value(&value);
}

fn check_value(value: &Value) {
    // `to_mdsf` writes NaN/Infinity, which the parser accepts. The output may be shorter than
    // the input (comments, spacing), so the default heap budget, a multiple of the text's
    // length, could refuse it: readability is what is checked here, with an unbounded budget.
    let loose = value.to_mdsf();
    let reparsed = parse_with_budget(&loose, usize::MAX)
        .unwrap_or_else(|e| panic!("own output {loose:?} unreadable: {e}"));
    let want = after_round_trip(value);
    assert!(
        same(&reparsed, &want),
        "{loose:?} reads back as {reparsed:?}, not {want:?}"
    );
    match stringify(value) {
        Ok(strict) => assert_eq!(strict, loose, "stringify and to_mdsf differ"),
        Err(_) => assert!(loose.contains("NaN") || loose.contains("Infinity")),
    }
    if let Ok(msg) = Message::from_value(value) {
        let wire = msg.encode();
        // As above, readability under an unbounded budget (the compact text may be shorter).
        let back = parse_with_budget(&wire, usize::MAX)
            .map_err(tether_wire::DecodeError::from)
            .and_then(|v| Message::from_value(&v))
            .unwrap_or_else(|e| panic!("{msg:?} encodes to unreadable {wire:?}: {e}"));
        assert_eq!(back.kind(), msg.kind(), "{wire:?}");
    }
}

/// What one serialize/parse trip makes of a value: object properties holding `Undefined`
/// vanish, keys take JS order (array indices first, ascending), and each array loses one
/// trailing `Undefined` (`[1,undefined]` is written `[1,]`, which reads back as `[1]`).
pub fn after_round_trip(value: &Value) -> Value {
    match value {
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(after_round_trip).collect();
            if matches!(items.last(), Some(Value::Undefined)) {
                items.pop();
            }
            Value::Array(items)
        }
        Value::Object(obj) => {
            let kept = || obj.0.iter().filter(|(_, v)| !matches!(v, Value::Undefined));
            let mut indexed: Vec<(u32, &(String, Value))> = kept()
                .filter_map(|p| array_index(&p.0).map(|i| (i, p)))
                .collect();
            indexed.sort_by_key(|e| e.0);
            let mut out = Object::new();
            let others = kept().filter(|(k, _)| array_index(k).is_none());
            for (k, v) in indexed.into_iter().map(|e| e.1).chain(others) {
                out.0.push((k.clone(), after_round_trip(v)));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Structural equality in which NaN equals NaN.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.0
                    .iter()
                    .zip(&y.0)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

/// A small deterministic generator for chunk sizes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Collects what a framer yields for `chunks`, stopping at the first fatal error, and parses
/// each frame as a message (which must not panic).
fn frame(max: usize, chunks: &mut dyn Iterator<Item = &[u8]>) -> Vec<Result<String, FrameError>> {
    let mut framer = NulFramer::new(max);
    let mut out = Vec::new();
    for chunk in chunks {
        framer.push(chunk);
        while let Some(result) = framer.next_message() {
            if let Ok(text) = &result {
                assert!(text.len() <= max);
                assert!(!text.contains('\0'));
                if let Ok(msg) = Message::parse(text) {
                    let _ = msg.encode();
                }
            }
            let fatal = matches!(result, Err(FrameError::TooLarge { .. }));
            out.push(result);
            if fatal {
                return out;
            }
        }
        assert!(framer.buffered() <= max, "holding more than the limit");
    }
    out
}

/// Bytes → a NUL-framed stream fed in arbitrary chunks; every frame goes to `Message::parse`,
/// and the frames must not depend on the chunking.
///
/// The first two bytes choose the size limit and the chunking; the rest is the stream.
pub fn framer_body(data: &[u8]) {
    let (head, stream) = data.split_at(data.len().min(2));
    let seed = head.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let max = match head.first() {
        Some(&b) if b & 1 == 1 => usize::from(b >> 1) + 1,
        _ => tether_wire::DEFAULT_MAX_MESSAGE_SIZE,
    };
    let whole = frame(max, &mut std::iter::once(stream));
    let mut rng = Lcg(seed);
    let mut rest = stream;
    let mut chunked_input = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let n = (rng.next() as usize % 17).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    });
    let chunked = frame(max, &mut chunked_input);
    assert_eq!(whole, chunked, "framing depends on chunking");
}

/// Any bytes → the conductor envelope decoder; whatever decodes must re-encode to an envelope
/// that decodes to the same message, and payload splitting must never panic.
pub fn conductor_body(data: &[u8]) {
    use tether_wire::conductor::{split_payload, WireMessage};
    let _ = split_payload(data);
    let Ok(msg) = WireMessage::decode(data) else {
        return;
    };
    let again = WireMessage::decode(&msg.encode())
        .unwrap_or_else(|e| panic!("{msg:?} re-encodes to an unreadable envelope: {e}"));
    assert_eq!(again, msg);
    match &msg {
        WireMessage::Signal { data } | WireMessage::Request { data, .. } => {
            let _ = split_payload(data);
        }
        WireMessage::Response { data, .. } => {
            if let Some(d) = data {
                let _ = split_payload(d);
            }
        }
    }
}

/// A script of session operations, one per line (unknown lines are skipped, so mutations
/// stay meaningful):
///
/// - `C` / `S`: start over with a fresh client / server session;
/// - `L<messages> <bytes>`: change the buffer bounds;
/// - `+<message>`: send it with the id the session hands out (requests are buffered);
/// - `*<message>`: the same through `on_send_owned`;
/// - `><message>`: send it with the id it carries (may be refused as out of order);
/// - `<<message>`: receive it;
/// - `R<count>`: restore with this peer received count (decimal, else the raw bytes);
/// - `H<message>`: a handshake carrying a restore (`session:[id,n]` or `ok:n`), applied as a
///   driver would;
/// - `D<text>`: replace the session by a stored one, if it decodes;
/// - `K<key> <value>`: put a value into the user storage; `U<name>`: set the user;
/// - `T`: drop the buffer; `E`: check that the stored form round-trips.
///
/// After every step the session must satisfy what `session.rs` documents: the stored-state
/// invariants, monotonic confirmed count and ids, restores that never grow the buffer and
/// resend exactly what is left, refusals that change nothing.
pub fn session_body(data: &[u8]) {
    use tether_wire::{RequestKind, Role, Session, SessionConfig};
    let text = String::from_utf8_lossy(data);
    let mut session = Session::new("fuzz", Role::Client, SessionConfig::default());
    let mut floor = Floor::of(&session);
    for line in text.split('\n') {
        let Some(op) = line.chars().next() else {
            continue;
        };
        let arg = &line[op.len_utf8()..];
        match op {
            'C' | 'S' => {
                let role = if op == 'C' {
                    Role::Client
                } else {
                    Role::Server
                };
                session = Session::new("fuzz", role, session.config());
                floor = Floor::of(&session);
            }
            'L' => {
                let mut nums = arg
                    .split(' ')
                    .map(|n| n.parse::<usize>().unwrap_or(usize::MAX));
                session.set_config(SessionConfig {
                    max_buffered_messages: nums.next().unwrap_or(usize::MAX),
                    max_buffered_bytes: nums.next().unwrap_or(usize::MAX),
                });
            }
            '+' | '*' | '>' => {
                if let Ok(msg) = Message::parse(arg) {
                    let fresh = op != '>';
                    let msg = if fresh {
                        with_id(msg, session.next_message_id())
                    } else {
                        msg
                    };
                    // Ids past 2^53 are refused by the stored form (`SessionState::validate`)
                    // but not by `on_send`; a driver only sends the ids the session hands out.
                    let safe = RequestKind::of(&msg).is_none_or(|(_, id)| id.unsigned_abs() < SAFE);
                    if fresh || safe {
                        check_send(&mut session, &msg, fresh, op == '*');
                    }
                }
            }
            '<' => {
                if let Ok(msg) = Message::parse(arg) {
                    check_receive(&mut session, &msg);
                }
            }
            'R' => {
                let count = arg.trim().parse::<u64>().unwrap_or_else(|_| {
                    arg.bytes()
                        .take(8)
                        .fold(0, |acc, b| (acc << 8) | u64::from(b))
                });
                check_restore(&mut session, count);
            }
            'H' => {
                if let Ok(msg) = Message::parse(arg) {
                    check_handshake(&mut session, &msg);
                }
            }
            'D' => {
                let config = session.config();
                let state = tether_wire::SessionState::decode(arg);
                match Session::decode(arg, config) {
                    Ok(decoded) => {
                        assert!(
                            state.is_ok(),
                            "Session decodes {arg:?}, SessionState does not"
                        );
                        check_round_trip(&decoded);
                        session = decoded;
                        floor = Floor::of(&session);
                    }
                    Err(_) => assert!(state.is_err(), "SessionState decodes {arg:?}"),
                }
            }
            'K' => {
                let (key, value) = arg.split_once(' ').unwrap_or((arg, "undefined"));
                if let Ok(value) = parse(value) {
                    session.storage_mut().insert(key, value);
                }
            }
            'U' => session.set_username((!arg.is_empty()).then(|| arg.to_owned())),
            'T' => {
                let before: Vec<_> = session.buffered().cloned().collect();
                assert_eq!(session.take_buffered(), before);
                assert_eq!((session.buffered_len(), session.buffered_bytes()), (0, 0));
            }
            'E' => check_round_trip(&session),
            _ => {}
        }
        check_invariants(&session);
        floor.rise(&session);
    }
    check_round_trip(&session);
    check_handshake_helpers(&session);
}

/// What may only grow while a session lives on (a decoded or fresh session starts over).
struct Floor {
    acknowledged: u64,
    latest: u64,
}

impl Floor {
    fn of(s: &tether_wire::Session) -> Floor {
        Floor {
            acknowledged: s.acknowledged_count(),
            latest: s.latest_message_id().unsigned_abs(),
        }
    }

    fn rise(&mut self, s: &tether_wire::Session) {
        assert!(
            s.acknowledged_count() >= self.acknowledged,
            "confirmed count went back from {} to {}",
            self.acknowledged,
            s.acknowledged_count()
        );
        assert!(
            s.latest_message_id().unsigned_abs() >= self.latest,
            "latest id went back"
        );
        *self = Floor::of(s);
    }
}

fn with_id(msg: Message, new: i64) -> Message {
    match msg {
        Message::Call {
            iface,
            method,
            args,
            ..
        } => Message::Call {
            id: new,
            iface,
            method,
            args,
        },
        Message::Event {
            iface, event, args, ..
        } => Message::Event {
            id: new,
            iface,
            event,
            args,
        },
        Message::Inspect { iface, .. } => Message::Inspect { id: new, iface },
        Message::Ping { .. } => Message::Ping { id: new },
        other => other,
    }
}

/// 2^53: ids and counts below it are exact as JS numbers, hence on the wire and when stored.
const SAFE: u64 = 1 << 53;

fn check_invariants(s: &tether_wire::Session) {
    // What `SessionState::validate` checks, spelled out, as a live session may hold ids past
    // 2^53 (which only the stored form refuses).
    let (delta, latest) = (s.role().delta(), s.latest_message_id());
    assert!(
        latest == 0 || latest.signum() == delta,
        "latest id {latest}"
    );
    assert!(s.acknowledged_count() <= latest.unsigned_abs());
    let mut prev = s.acknowledged_count();
    for m in s.buffered() {
        let abs = m.id.unsigned_abs();
        assert!(
            m.id.signum() == delta && abs > prev && abs <= latest.unsigned_abs(),
            "buffered id {} out of order",
            m.id
        );
        prev = abs;
        assert_eq!(s.buffered_text(m.id), Some(m.text.as_str()));
    }
    assert_eq!(s.buffered_text(s.next_message_id()), None);
    if let Ok(confirmed @ 1..) = i64::try_from(s.acknowledged_count()) {
        assert_eq!(s.buffered_text(confirmed * delta), None);
    }
    if latest.unsigned_abs() < SAFE {
        let state = s.to_state();
        if let Err(e) = state.validate() {
            panic!("session breaks its own invariants: {e}\n{state:?}");
        }
    }
    let bytes: usize = s.buffered().map(|m| m.text.len()).sum();
    assert_eq!(s.buffered_bytes(), bytes, "byte count drifted");
    assert_eq!(s.buffered().len(), s.buffered_len());
    assert_eq!(
        s.next_message_id(),
        s.latest_message_id() + s.role().delta()
    );
}

fn check_send(s: &mut tether_wire::Session, msg: &Message, fresh_id: bool, owned: bool) {
    use tether_wire::{RequestKind, SessionError};
    let before = s.clone();
    let text = msg.encode();
    let request = RequestKind::of(msg);
    let result = match request {
        Some((kind, id)) if owned => match s.on_send_owned(id, kind, text.clone()) {
            Ok(()) => Ok(text.clone()),
            Err((e, back)) => {
                assert_eq!(back, text, "on_send_owned gave back another text");
                Err(e)
            }
        },
        _ => s.on_send_message(msg),
    };
    // `on_send`'s contract: the id must move past the latest one in the role's direction.
    let moves_past = request.is_some_and(|(_, id)| {
        id.signum() == before.role().delta()
            && id.unsigned_abs() > before.latest_message_id().unsigned_abs()
    });
    match result {
        Ok(sent) => {
            assert_eq!(sent, text);
            if let Some((kind, id)) = request {
                assert!(
                    moves_past,
                    "recorded id {id} after {}",
                    before.latest_message_id()
                );
                assert!(
                    before.check_capacity(text.len()).is_ok(),
                    "recorded a message past the bounds {:?}",
                    before.config()
                );
                assert_eq!(s.buffered_len(), before.buffered_len() + 1);
                let last = s.buffered().last().map(|m| (m.id, m.kind, m.text.as_str()));
                assert_eq!(last, Some((id, kind, text.as_str())));
                assert_eq!(s.latest_message_id(), id);
                // Ids past 2^53 may not be exact on the wire (JSTP numbers are doubles).
                if id != i64::MAX && id as f64 as i64 == id {
                    let back = Message::parse(&sent).expect("a sent request reads back");
                    assert_eq!(RequestKind::of(&back), Some((kind, id)));
                }
            } else {
                assert_eq!(
                    s.encode(),
                    before.encode(),
                    "a non-request changed the session"
                );
            }
        }
        Err(e) => {
            assert!(request.is_some(), "refused a non-request: {e}");
            assert_eq!(
                s.encode(),
                before.encode(),
                "a refused send changed the session"
            );
            assert_eq!(s.buffered_bytes(), before.buffered_bytes());
            match e {
                SessionError::BufferFull { .. } => {
                    assert!(before.check_capacity(text.len()).is_err());
                }
                SessionError::IdOutOfOrder { .. } => {
                    assert!(!fresh_id, "refused the id it handed out: {e}");
                    assert!(!moves_past, "refused an id that moves on: {e}");
                }
                SessionError::InvalidState(_) => panic!("send failed with {e}"),
            }
        }
    }
}

fn check_receive(s: &mut tether_wire::Session, msg: &Message) {
    let before = s.clone();
    let confirmed = s.on_receive(msg);
    assert_eq!(s.buffered_len() + confirmed, before.buffered_len());
    assert_eq!(s.latest_message_id(), before.latest_message_id());
    match msg {
        Message::Call { id, .. }
        | Message::Event { id, .. }
        | Message::Inspect { id, .. }
        | Message::Ping { id } => {
            assert_eq!(s.received_count(), id.unsigned_abs());
            assert_eq!(confirmed, 0);
        }
        Message::Callback { id, .. } | Message::Pong { id } => {
            let upto = id
                .unsigned_abs()
                .min(before.latest_message_id().unsigned_abs());
            assert_eq!(
                s.acknowledged_count(),
                before.acknowledged_count().max(upto)
            );
            assert!(s.buffered().all(|m| m.id.unsigned_abs() > upto));
            assert_eq!(s.received_count(), before.received_count());
        }
        _ => assert_eq!(s.encode(), before.encode(), "{msg:?} changed the session"),
    }
}

/// `Session::restore` as documented: drop what the peer got (clamped, never below what was
/// already confirmed), report the lost requests among it, resend the rest unchanged.
fn check_restore(s: &mut tether_wire::Session, peer_received: u64) {
    let before = s.clone();
    let mut in_place = s.clone();
    let plan = s.restore(peer_received);
    let quiet = in_place.restore_in_place(peer_received);
    assert_eq!(
        in_place.encode(),
        s.encode(),
        "restore_in_place left another state"
    );
    assert!(quiet.resend.is_empty());
    assert_eq!(
        (
            &quiet.lost_request_ids,
            quiet.confirmed,
            quiet.next_message_id
        ),
        (&plan.lost_request_ids, plan.confirmed, plan.next_message_id)
    );
    let upto = peer_received
        .min(before.latest_message_id().unsigned_abs())
        .max(before.acknowledged_count());
    assert_eq!(s.acknowledged_count(), upto);
    assert!(
        s.buffered_len() <= before.buffered_len(),
        "restore grew the buffer"
    );
    let (gone, kept): (Vec<_>, Vec<_>) = before
        .buffered()
        .cloned()
        .partition(|m| m.id.unsigned_abs() <= upto);
    assert_eq!(s.buffered().cloned().collect::<Vec<_>>(), kept);
    assert_eq!(plan.confirmed, gone.len());
    let lost: Vec<i64> = gone
        .iter()
        .filter(|m| m.kind.expects_reply())
        .map(|m| m.id)
        .collect();
    assert_eq!(plan.lost_request_ids, lost);
    let resend: Vec<&str> = kept.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(plan.resend, resend);
    assert_eq!(s.latest_message_id(), before.latest_message_id());
    assert_eq!(plan.next_message_id, s.next_message_id());
    assert_eq!(s.received_count(), before.received_count());
    // A second restore with the same count has nothing left to confirm.
    let again = s.restore(peer_received);
    assert_eq!(
        (again.confirmed, again.lost_request_ids.len()),
        (0, 0),
        "restore is not idempotent"
    );
    assert_eq!(again.resend, plan.resend);
}

/// A handshake as the driver applies it: a server restores with the client's
/// `session:[id, n]`, a client with the server's `ok:n`.
fn check_handshake(s: &mut tether_wire::Session, msg: &Message) {
    use tether_wire::{RestoreOutcome, RestoreRequest, Role};
    match (s.role(), RestoreRequest::from_message(msg)) {
        (Role::Server, Some(req)) => {
            check_restore(s, req.received_count);
            return;
        }
        (_, Some(_)) => return,
        _ => {}
    }
    if let (
        Role::Client,
        Some(RestoreOutcome::Restored {
            peer_received_count,
        }),
    ) = (s.role(), RestoreOutcome::from_message(msg))
    {
        check_restore(s, peer_received_count);
    }
}

/// Whether every count and id is below 2^53, where the stored form is exact (past it the
/// decimal-to-double trip loses integers, as in upstream's JavaScript, and
/// `SessionState::validate` refuses latest ids).
fn exact_in_double(s: &tether_wire::Session) -> bool {
    let exact = |n: u64| n < SAFE;
    exact(s.received_count())
        && exact(s.acknowledged_count())
        && exact(s.latest_message_id().unsigned_abs())
        && s.buffered().all(|m| exact(m.id.unsigned_abs()))
}

fn check_round_trip(s: &tether_wire::Session) {
    let text = s.encode();
    let decoded = tether_wire::Session::decode(&text, s.config());
    if !exact_in_double(s) {
        return;
    }
    let back = decoded.unwrap_or_else(|e| panic!("own stored form {text:?} unreadable: {e}"));
    let (a, b) = (s.to_state(), back.to_state());
    assert_eq!(
        (&a.id, a.role, &a.username, &a.buffer),
        (&b.id, b.role, &b.username, &b.buffer)
    );
    assert_eq!(
        (a.received_count, a.acknowledged_count, a.latest_message_id),
        (b.received_count, b.acknowledged_count, b.latest_message_id)
    );
    let keys = |o: &Object| o.iter().map(|(k, _)| k.to_owned()).collect::<Vec<_>>();
    assert_eq!(keys(&a.storage), keys(&b.storage), "{text:?}");
    for ((_, va), (_, vb)) in a.storage.iter().zip(b.storage.iter()) {
        let want = after_round_trip(va);
        assert!(
            same(vb, &want),
            "{text:?}: stored {va:?} came back as {vb:?}"
        );
    }
}

/// The restore handshakes this session writes must read back with its own counts.
fn check_handshake_helpers(s: &tether_wire::Session) {
    use tether_wire::{RestoreOutcome, RestoreRequest};
    if s.received_count() > i64::MAX as u64 {
        return;
    }
    let request = s.restore_request("testApp", Some("^1.0.0"));
    let read = Message::parse(&request.encode()).expect("own restore request reads back");
    assert_eq!(
        RestoreRequest::from_message(&read).map(|r| (r.session_id, r.received_count)),
        Some((s.id().to_owned(), s.received_count()))
    );
    let response = Message::parse(&s.restored_response().encode()).expect("own ok:n reads back");
    assert_eq!(
        RestoreOutcome::from_message(&response),
        Some(RestoreOutcome::Restored {
            peer_received_count: s.received_count()
        })
    );
}

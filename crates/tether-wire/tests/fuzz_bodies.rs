//! Runs the cargo-fuzz target bodies (`fuzz/src/lib.rs`) over the committed seed corpus
//! (`fuzz/corpus/<target>/`) and a few thousand pseudo-random inputs, so that stable CI
//! exercises them without libfuzzer or nightly.

#[path = "../fuzz/src/lib.rs"]
mod bodies;

use bodies::{conductor_body, framer_body, parse_body, session_body};

/// The committed seeds of one fuzz target; a missing or empty corpus fails the test.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("corpus entry").path()).expect("seed"))
        .collect();
    assert!(
        seeds.len() >= 10,
        "{}: only {} seeds",
        dir.display(),
        seeds.len()
    );
    seeds.sort();
    seeds
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ",",
    ":",
    "'a'",
    "\"b\"",
    "'it\\'s'",
    "1",
    "-2.5e3",
    ".5",
    "+7",
    "0x1F",
    "0b101",
    "0o17",
    "07",
    "1e",
    "null",
    "undefined",
    "NaN",
    "-Infinity",
    "true",
    "false",
    "key",
    "$k",
    "é",
    "'\\u{1F600}'",
    "'\\ud83d'",
    "'\\ude00'",
    "'\\x41\\101\\0'",
    "/*c*/",
    "//c\n",
    "/*",
    " ",
    "\t",
    "\0",
    "\\",
    "'",
    "\"",
    "call",
    "callback",
    "handshake",
    "ok",
    "error",
    "ping",
    "pong",
    "event",
    "inspect",
    "login",
    "session",
    "[0,'app']",
    "[1]",
    "[-1,'i']",
    "9007199254740993",
    "1e400",
    "'7'",
    "'0'",
    "'01'",
];

const SEEDS: &[&str] = &[
    "{handshake:[0,'testApp']}",
    "{handshake:[0],ok:'8a3c1f0e-2b7d-4c9a-9e61-0f5d3b2a7c14'}",
    "{handshake:[0,'testApp','^1.0.0'],login:['login','password']}",
    "{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',3]}",
    "{handshake:[0],ok:4}",
    "{handshake:[0],error:[42,'Locked']}",
    "{call:[1,'calculator'],divide:[20,10]}",
    "{callback:[3],ok:[1,,null,3]}",
    "{callback:[2],error:[1,'Error: Zero division',{a:[1,]}]}",
    "{event:[-1,'chat'],message:['Marcus','Hello \\\"there\\\"! it\\'s é … \\u0000 \\ud800 😀']}",
    "{call:[4,'i'],m:[1.5,0,1e+21,1e-7,NaN,Infinity,0.30000000000000004,{'7':5,a:1,'b-c':2},]}",
    "{'0':6,'a b':1,'':2,'é':3,_x:4,$:5,'-1':7,'1.5':8,'01':9}",
    "{inspect:[2,'someService']}",
    "{ping:[-2]}",
    "{}",
];

fn token_soup(rng: &mut Rng) -> Vec<u8> {
    let mut out = String::new();
    for _ in 0..rng.below(40) {
        out.push_str(TOKENS[rng.below(TOKENS.len())]);
    }
    out.into_bytes()
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(4) {
            0 if at < out.len() => {
                out.remove(at);
            }
            1 if at < out.len() => out[at] ^= 1 << rng.below(8),
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(at..at, t.iter().copied());
            }
            _ => out.insert(at, rng.next() as u8),
        }
    }
    out
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    (0..rng.below(64)).map(|_| rng.next() as u8).collect()
}

fn inputs() -> Vec<Vec<u8>> {
    let mut rng = Rng(0x7e7e_0000_dead_beef);
    let mut all: Vec<Vec<u8>> = SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    for seed in corpus("parse") {
        for _ in 0..20 {
            all.push(mutate(&mut rng, &seed));
        }
        all.push(seed);
    }
    for i in 0..4000 {
        let input = match i % 4 {
            0 => random_bytes(&mut rng),
            1 => token_soup(&mut rng),
            _ => {
                let seed = SEEDS[rng.below(SEEDS.len())];
                mutate(&mut rng, seed.as_bytes())
            }
        };
        all.push(input);
    }
    // Deep nesting, just inside and past the limit.
    for depth in [127, 128, 129, 5000] {
        all.push(format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes());
        all.push("{a:".repeat(depth).into_bytes());
    }
    all
}

#[test]
fn parse_target_body() {
    for input in inputs() {
        parse_body(&input);
    }
}

#[test]
fn framer_target_body() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for input in inputs() {
        // A stream of several frames, with a random head choosing limit and chunking.
        let mut data = vec![rng.next() as u8, rng.next() as u8];
        for _ in 0..=rng.below(3) {
            data.extend_from_slice(&input);
            data.push(0);
        }
        data.extend_from_slice(&input[..rng.below(input.len() + 1)]);
        framer_body(&data);
        framer_body(&input);
    }
    for seed in corpus("framer") {
        framer_body(&seed);
        for _ in 0..50 {
            framer_body(&mutate(&mut rng, &seed));
        }
    }
}

#[test]
fn conductor_target_body() {
    let mut rng = Rng(0x5eed_c0de);
    // Valid envelopes, then mutations of them, then noise.
    let seeds: Vec<Vec<u8>> = [
        tether_wire::conductor::WireMessage::Request {
            id: 7,
            data: tether_wire::conductor::request_payload("answer", 1.into()),
        },
        tether_wire::conductor::WireMessage::Response { id: 7, data: None },
        tether_wire::conductor::WireMessage::Signal {
            data: tether_wire::conductor::error_payload("internal_error", "x"),
        },
    ]
    .iter()
    .map(|m| m.encode())
    .chain(corpus("conductor"))
    .collect();
    for seed in &seeds {
        conductor_body(seed);
        for _ in 0..1000 {
            conductor_body(&mutate(&mut rng, seed));
        }
    }
    for _ in 0..1000 {
        conductor_body(&random_bytes(&mut rng));
    }
}

/// Lines the session script mutator splices in: hostile restore counts, stored states at the
/// edges of the id range, and the other operations of `session_body`.
const SESSION_LINES: &[&str] = &[
    "C",
    "S",
    "E",
    "T",
    "L1 64",
    "R0",
    "R1",
    "R2",
    "R3",
    "R18446744073709551615",
    "R9223372036854775808",
    "R9007199254740993",
    "+{call:[0,'a'],b:[]}",
    "+{event:[0,'a'],e:[]}",
    "+{inspect:[0,'a']}",
    "+{ping:[0]}",
    "*{call:[0,'a'],b:[]}",
    ">{call:[7,'a'],b:[]}",
    ">{ping:[-7]}",
    "<{callback:[1],ok:[]}",
    "<{pong:[-3]}",
    "<{pong:[9223372036854774784]}",
    "<{call:[-9223372036854775808,'a'],b:[]}",
    "<{event:[2,'a'],e:[]}",
    "H{handshake:[0],ok:1}",
    "H{handshake:[0,'testApp'],session:['x',2]}",
    "D{tetherSession:1,id:'x',role:'client',received:0,acknowledged:0,latest:9223372036854774784,buffer:[]}",
    "D{tetherSession:1,id:'x',role:'server',received:5,acknowledged:1,latest:-3,buffer:[[-2,'call','c'],[-3,'event','e']]}",
    "Kk [1,undefined]",
    "Uuser",
];

#[test]
fn session_target_body() {
    let mut rng = Rng(0x5e55_1014);
    for seed in corpus("session") {
        session_body(&seed);
        let text = String::from_utf8_lossy(&seed).into_owned();
        for _ in 0..60 {
            let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
            for _ in 0..=rng.below(4) {
                let at = rng.below(lines.len() + 1);
                match rng.below(3) {
                    0 if at < lines.len() => {
                        lines.remove(at);
                    }
                    1 if at < lines.len() => {
                        let line = mutate(&mut rng, lines[at].as_bytes());
                        lines[at] = String::from_utf8_lossy(&line).into_owned();
                    }
                    _ => lines.insert(at, SESSION_LINES[rng.below(SESSION_LINES.len())].into()),
                }
            }
            session_body(lines.join("\n").as_bytes());
        }
    }
}

/// Found by the session fuzz target: a stored server session whose latest id was i64::MIN
/// passed `Session::decode`'s validation, and then computing the next id overflowed.
#[test]
fn stored_server_session_at_the_lowest_id() {
    session_body(
        b"D{tetherSession:1,id:'x',role:'server',received:0,acknowledged:0,\
          latest:-9223372036854775808,buffer:[]}\nR1\n+{ping:[0]}",
    );
}

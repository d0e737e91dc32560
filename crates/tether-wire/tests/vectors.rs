//! Byte-exact vectors: the wire examples of the protocol notes (section 3.2) and the outputs
//! checked against mdsf's own serializer and parser on Node (section 4.4).

use tether_wire::message::object;
use tether_wire::{
    parse, stringify, Auth, CallbackResult, HandshakeResult, Message, NulFramer, Object,
    RemoteErrorArray, SerializeError, Value,
};

fn arr(items: Vec<Value>) -> Value {
    Value::Array(items)
}

/// Every message example from the notes: it parses, and re-encodes byte for byte.
const WIRE_EXAMPLES: &[&str] = &[
    "{handshake:[0,'testApp']}",
    "{handshake:[0],ok:'8a3c1f0e-2b7d-4c9a-9e61-0f5d3b2a7c14'}",
    "{handshake:[0,'testApp'],login:['login','password']}",
    "{handshake:[0,'testApp','^1.0.0']}",
    "{handshake:[0,'testApp'],session:['8a3c1f0e-2b7d-4c9a-9e61-0f5d3b2a7c14',3]}",
    "{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',3]}",
    "{handshake:[0],ok:4}",
    "{handshake:[0],error:[10]}",
    "{handshake:[0],error:[11]}",
    "{handshake:[0],error:[15]}",
    "{handshake:[0],error:[42,'Locked']}",
    "{handshake:[0,'app'],marcus:'7b458e1a'}",
    "{call:[1,'calculator'],answer:[]}",
    "{call:[1,'calculator'],divide:[20,10]}",
    "{callback:[1],ok:[42]}",
    "{callback:[2],error:[1,'Error: Zero division']}",
    "{callback:[3],ok:[1,,null,3]}",
    "{inspect:[2,'someService']}",
    "{callback:[2],ok:['sayHi','say']}",
    "{event:[-1,'chat'],message:['Marcus','Hello']}",
    "{event:[-1,'chat'],message:['Marcus','Hello \\\"there\\\"! it\\'s é … \\u0000 😀']}",
    "{ping:[-2]}",
    "{pong:[-2]}",
    "{}",
];

#[test]
fn wire_examples_parse_and_reencode_byte_identical() {
    for &text in WIRE_EXAMPLES {
        let msg = Message::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(msg.encode(), text, "{msg:?}");
        // The generic value path gives the same bytes too.
        assert_eq!(stringify(&parse(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn wire_examples_mean_what_the_notes_say() {
    let p = |t: &str| Message::parse(t).unwrap();
    assert_eq!(
        p("{handshake:[0,'testApp']}"),
        Message::HandshakeRequest {
            id: 0,
            app: "testApp".into(),
            version: None,
            auth: Auth::Anonymous
        }
    );
    assert_eq!(
        p("{handshake:[0,'testApp','^1.0.0']}"),
        Message::HandshakeRequest {
            id: 0,
            app: "testApp".into(),
            version: Some("^1.0.0".into()),
            auth: Auth::Anonymous
        }
    );
    assert_eq!(
        p("{handshake:[0,'testApp'],login:['login','password']}"),
        Message::HandshakeRequest {
            id: 0,
            app: "testApp".into(),
            version: None,
            auth: Auth::Login {
                user: "login".into(),
                password: "password".into()
            }
        }
    );
    assert_eq!(
        p("{handshake:[0,'app'],marcus:'7b458e1a'}"),
        Message::HandshakeRequest {
            id: 0,
            app: "app".into(),
            version: None,
            auth: Auth::Custom {
                strategy: "marcus".into(),
                credentials: "7b458e1a".into()
            }
        }
    );
    assert_eq!(
        p("{handshake:[0],ok:4}"),
        Message::HandshakeResponse {
            id: 0,
            result: HandshakeResult::Restored(4)
        }
    );
    assert_eq!(
        p("{handshake:[0],error:[42,'Locked']}"),
        Message::HandshakeResponse {
            id: 0,
            result: HandshakeResult::Error(RemoteErrorArray::new(42, "Locked"))
        }
    );
    assert_eq!(
        p("{callback:[3],ok:[1,,null,3]}"),
        Message::Callback {
            id: 3,
            result: CallbackResult::Ok(vec![1.into(), Value::Undefined, Value::Null, 3.into()])
        }
    );
    assert_eq!(
        p("{inspect:[2,'someService']}"),
        Message::Inspect {
            id: 2,
            iface: "someService".into()
        }
    );
    assert_eq!(p("{ping:[-2]}"), Message::Ping { id: -2 });
    assert_eq!(p("{pong:[-2]}"), Message::Pong { id: -2 });
    assert_eq!(p("{}"), Message::Heartbeat);
}

#[test]
fn session_restore_request_vector() {
    let msg = Message::HandshakeRequest {
        id: 0,
        app: "testApp".into(),
        version: None,
        auth: Auth::Session {
            id: "9b71d224-bd62-4c3b-a5d3-1234567890ab".into(),
            received: 3,
        },
    };
    assert_eq!(
        msg.encode(),
        "{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',3]}"
    );
}

#[test]
fn callback_with_undefined_result_vector() {
    let ok = vec![1.into(), Value::Undefined, Value::Null, 3.into()];
    let msg = Message::Callback {
        id: 3,
        result: CallbackResult::Ok(ok.clone()),
    };
    assert_eq!(msg.encode(), "{callback:[3],ok:[1,,null,3]}");
    let v = object([("callback", arr(vec![3.into()])), ("ok", arr(ok))]);
    assert_eq!(stringify(&v).unwrap(), "{callback:[3],ok:[1,,null,3]}");
    // `ok:[undefined]` goes out as `ok:[]`.
    let msg = Message::Callback {
        id: 1,
        result: CallbackResult::Ok(vec![Value::Undefined]),
    };
    assert_eq!(msg.encode(), "{callback:[1],ok:[]}");
}

#[test]
fn event_string_escapes_vector() {
    let text = "Hello \"there\"! it's é … \0 😀";
    let msg = Message::Event {
        id: -1,
        iface: "chat".into(),
        event: "message".into(),
        args: arr(vec!["Marcus".into(), text.into()]),
    };
    let wire = r#"{event:[-1,'chat'],message:['Marcus','Hello \"there\"! it\'s é … \u0000 😀']}"#;
    assert_eq!(msg.encode(), wire);
    assert_eq!(Message::parse(wire).unwrap(), msg);

    // The notes' full string also holds a lone surrogate (`\ud800`): it parses as its UTF-16
    // code units and encodes back to exactly upstream's text.
    let upstream =
        r#"{event:[-1,'chat'],message:['Marcus','Hello \"there\"! it\'s é … \u0000 \ud800 😀']}"#;
    let parsed = Message::parse(upstream).unwrap();
    let Message::Event { args, .. } = &parsed else {
        panic!("not an event");
    };
    let mut units: Vec<u16> = "Hello \"there\"! it's é … \0 ".encode_utf16().collect();
    units.push(0xd800);
    units.extend(" 😀".encode_utf16());
    assert_eq!(args.as_array().unwrap()[1], Value::Utf16(units));
    assert_eq!(parsed.encode(), upstream);
}

#[test]
fn numbers_and_keys_vector() {
    // In JS: {a:1,'b-c':2,$x:3,'1a':4,'7':5}; the engine moves '7' to the front.
    let inner = object([
        ("a", Value::from(1)),
        ("b-c", 2.into()),
        ("$x", 3.into()),
        ("1a", 4.into()),
        ("7", 5.into()),
    ]);
    let args = arr(vec![
        1.5.into(),
        (-0.0).into(),
        1e21.into(),
        1e-7.into(),
        f64::NAN.into(),
        f64::INFINITY.into(),
        123456789012345680000.0.into(),
        (0.1 + 0.2).into(),
        true.into(),
        false.into(),
        inner,
        // A Date (after toJSON) and a Buffer (base64) are plain strings by the time they are
        // serialized; a function element serializes to nothing, like `Undefined`.
        "1970-01-01T00:00:00.000Z".into(),
        "aGk=".into(),
        Value::Undefined,
    ]);
    let msg = Message::Call {
        id: 4,
        iface: "i".into(),
        method: "m".into(),
        args: args.clone(),
    };
    let wire = "{call:[4,'i'],m:[1.5,0,1e+21,1e-7,NaN,Infinity,123456789012345680000,\
                0.30000000000000004,true,false,{'7':5,a:1,'b-c':2,$x:3,'1a':4},\
                '1970-01-01T00:00:00.000Z','aGk=',]}";
    assert_eq!(msg.encode(), wire);
    let payload = wire
        .strip_prefix("{call:[4,'i'],m:")
        .unwrap()
        .strip_suffix('}')
        .unwrap();
    assert_eq!(args.to_mdsf(), payload);
    // `stringify` refuses the non-finite numbers.
    assert!(matches!(
        stringify(&args),
        Err(SerializeError::NonFinite(n)) if n.is_nan()
    ));

    // Parsing it back (NaN and Infinity are accepted, as the native parser does): the only
    // difference on re-encoding is the trailing comma, since `[…,x,]` reads as `[…,x]`.
    let back = Message::parse(wire).unwrap();
    let Message::Call { args: parsed, .. } = &back else {
        panic!("not a call")
    };
    let parsed = parsed.as_array().unwrap();
    assert_eq!(parsed.len(), 13);
    assert!(parsed[4].as_f64().unwrap().is_nan());
    assert_eq!(parsed[6], Value::from(123456789012345680000.0));
    assert_eq!(back.encode(), wire.replace("'aGk=',]", "'aGk=']"));
}

#[test]
fn key_order_and_quoting_vector() {
    let v = object([
        ("a b", Value::from(1)),
        ("", 2.into()),
        ("é", 3.into()),
        ("_x", 4.into()),
        ("$", 5.into()),
        ("0", 6.into()),
        ("-1", 7.into()),
        ("1.5", 8.into()),
        ("01", 9.into()),
    ]);
    let wire = "{'0':6,'a b':1,'':2,'é':3,_x:4,$:5,'-1':7,'1.5':8,'01':9}";
    assert_eq!(stringify(&v).unwrap(), wire);
    // Parsing keeps wire order, which is already JS order here, so it re-encodes identically.
    let back = parse(wire).unwrap();
    assert_eq!(stringify(&back).unwrap(), wire);
    let keys: Vec<&str> = back.as_object().unwrap().iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["0", "a b", "", "é", "_x", "$", "-1", "1.5", "01"]);
}

#[test]
fn framer_vector() {
    let mut f = NulFramer::new(tether_wire::DEFAULT_MAX_MESSAGE_SIZE);
    f.push(b"{ping:[1]}\0{pong:[1]}\0{call:[2,'a'],b:[]}\0{partial");
    let mut messages = Vec::new();
    while let Some(frame) = f.next_message() {
        messages.push(Message::parse(&frame.unwrap()).unwrap());
    }
    assert_eq!(
        messages,
        vec![
            Message::Ping { id: 1 },
            Message::Pong { id: 1 },
            Message::Call {
                id: 2,
                iface: "a".into(),
                method: "b".into(),
                args: arr(vec![]),
            },
        ]
    );
    assert_eq!(f.buffered(), "{partial".len());
}

#[test]
fn undefined_verb_payload_is_left_out() {
    // As a JS property holding `undefined` would be.
    let msg = Message::Call {
        id: 1,
        iface: "i".into(),
        method: "m".into(),
        args: Value::Undefined,
    };
    assert_eq!(msg.encode(), "{call:[1,'i']}");
    let mut o = Object::new();
    o.insert("call", arr(vec![1.into(), "i".into()]));
    o.insert("m", Value::Undefined);
    assert_eq!(stringify(&Value::Object(o)).unwrap(), "{call:[1,'i']}");
}

#[test]
fn error_arrays_on_the_wire() {
    let msg = Message::Callback {
        id: 5,
        result: CallbackResult::Error(RemoteErrorArray {
            code: 1,
            message: None,
            info: vec!["x".into()],
        }),
    };
    assert_eq!(msg.encode(), "{callback:[5],error:[1,,'x']}");
    assert_eq!(Message::parse(&msg.encode()).unwrap(), msg);
}

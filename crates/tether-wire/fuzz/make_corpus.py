#!/usr/bin/env python3
"""Writes the committed seed corpus under corpus/<target>/: hand-made JSTP messages,
handshakes, restore scripts and conductor envelopes. Rerun after editing; file names are
content hashes, so unchanged seeds keep their names.

    python3 crates/tether-wire/fuzz/make_corpus.py
"""

import hashlib
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# Real messages, as @metarhia/jstp 2.3.0 and tether write them, plus edge cases of the format.
MESSAGES = [
    "{handshake:[0,'testApp']}",
    "{handshake:[0,'testApp','^1.0.0']}",
    "{handshake:[0],ok:'8a3c1f0e-2b7d-4c9a-9e61-0f5d3b2a7c14'}",
    "{handshake:[0,'testApp','^1.0.0'],login:['login','password']}",
    "{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',3]}",
    "{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',0]}",
    "{handshake:[0,'testApp'],token:['abc']}",
    "{handshake:[0],ok:4}",
    "{handshake:[0],ok:0}",
    "{handshake:[0],error:[11]}",
    "{handshake:[0],error:[42,'Locked']}",
    "{call:[1,'calculator'],divide:[20,10]}",
    "{call:[2,'calculator'],answer:[]}",
    "{call:[-1,'auth'],check:['x']}",
    "{callback:[1],ok:[2]}",
    "{callback:[3],ok:[1,,null,3]}",
    "{callback:[2],error:[1,'Error: Zero division',{a:[1,]}]}",
    "{callback:[-1],error:[16]}",
    "{event:[-1,'chat'],message:['Marcus','Hello \\\"there\\\"! it\\'s \u00e9 \\u0000 \\ud800 \U0001F600']}",
    "{event:[3,'chat'],send:['hi']}",
    "{call:[4,'i'],m:[1.5,0,1e+21,1e-7,NaN,Infinity,-0,0.30000000000000004,{'7':5,a:1,'b-c':2},]}",
    "{'0':6,'a b':1,'':2,'\u00e9':3,_x:4,$:5,'-1':7,'1.5':8,'01':9}",
    "{inspect:[2,'someService']}",
    "{callback:[2],ok:['sayHi','say']}",
    "{ping:[-2]}",
    "{pong:[-2]}",
    "{ping:[5]}",
    "{}",
    "{state:[7,'x'],inc:['a',1]}",
    "{call:[9007199254740993,'i'],m:[0x1F,0b101,0o17,07,.5,+7]}",
    "{call:[-9223372036854775808,'i'],m:[]}",
    "{event:[9223372036854774784,'i'],e:[/*c*/undefined,//c\n]}",
    "{call:[1,'x'],y:['\\x41\\101\\0\\u{1F600}']}",
    "[" * 127 + "1" + "]" * 127,
]


def msgpack(v):
    """A minimal MessagePack encoder (maps, strings, ints, bin, nil, bools, arrays)."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if 0 <= v < 1 << 8:
            return b"\xcc" + struct.pack(">B", v)
        if 0 <= v < 1 << 16:
            return b"\xcd" + struct.pack(">H", v)
        if 0 <= v < 1 << 32:
            return b"\xce" + struct.pack(">I", v)
        if 0 <= v < 1 << 64:
            return b"\xcf" + struct.pack(">Q", v)
        if -32 <= v < 0:
            return struct.pack(">b", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        if len(b) < 32:
            return bytes([0xA0 | len(b)]) + b
        return b"\xd9" + bytes([len(b)]) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        return bytes([0x90 | len(v)]) + b"".join(msgpack(x) for x in v)
    if isinstance(v, dict):
        return bytes([0x80 | len(v)]) + b"".join(msgpack(k) + msgpack(x) for k, x in v.items())
    raise TypeError(v)


def payload(kind, data):
    return msgpack({"type": kind, "data": data})


CONDUCTOR = [
    # tether's key order, the npm client's (type, data, id), and the old capitalised tags.
    msgpack({"type": "request", "id": 0, "data": payload("answer", None)}),
    msgpack({"type": "request", "data": payload("divide", {"a": 20, "b": 10}), "id": 1}),
    msgpack({"type": "request", "id": 2, "data": payload("say_hi", {"name": "Marcus"})}),
    msgpack({"type": "Request", "id": 4294967296, "data": payload("answer", [1, 2.5, True])}),
    msgpack({"type": "response", "id": 0, "data": payload("answer", 42)}),
    msgpack({"type": "response", "id": 1, "data": None}),
    msgpack({"type": "Response", "id": 1, "data": payload("error", {"type": "internal_error", "data": "x"})}),
    msgpack({"type": "response", "id": 3, "data": payload("error", {"type": "deserialization", "data": "unknown"})}),
    msgpack({"type": "signal", "data": payload("chat", {"user": "Marcus", "text": "hi"})}),
    msgpack({"type": "Signal", "data": b""}),
    msgpack({"type": "request", "id": 18446744073709551615, "data": b"\x80"}),
    msgpack({"type": "request", "id": -1, "data": payload("answer", None)}),
    msgpack({"type": "request", "data": payload("answer", None)}),
    msgpack({"type": "nope", "id": 0}),
    msgpack({"id": 0, "data": b"\xc0", "extra": [1, {"k": None}]}),
    msgpack([1, 2, 3]),
    b"\x91" * 300 + b"\xc0",
]

# Session scripts (see session_body in src/lib.rs for the operations).
STORED_CLIENT = (
    "{tetherSession:1,id:'8a3c',role:'client',username:null,received:1,acknowledged:1,"
    "latest:2,buffer:[[2,'call','{call:[2,\\'calculator\\'],divide:[30,10]}']],storage:[]}"
)
STORED_SERVER = (
    "{tetherSession:1,id:'9b71d224-bd62-4c3b-a5d3-1234567890ab',role:'server',username:'marcus',"
    "received:3,acknowledged:1,latest:-4,buffer:[[-2,'event','{event:[-2,\\'chat\\'],message:[\\'a\\']}'],"
    "[-4,'ping','{ping:[-4]}']],storage:[['counter',5],['gone',undefined],['o',{b:1,'1':[2,,]}]]}"
)
SESSION = [
    # The documented client example: call 2 is lost, nothing to resend.
    "C\n+{call:[0,'calculator'],divide:[20,10]}\n+{call:[0,'calculator'],divide:[30,10]}\n"
    "<{callback:[1],ok:[2]}\n<{event:[-1,'chat'],message:['hi']}\nE\nH{handshake:[0],ok:2}\n"
    "+{ping:[0]}\nE",
    # A server: events and a call out, a call in, then the client's restore request.
    "S\n+{event:[0,'chat'],message:['Marcus','hi']}\n+{call:[0,'auth'],check:[]}\n"
    "<{call:[1,'calculator'],answer:[]}\n<{ping:[2]}\n"
    "H{handshake:[0,'testApp'],session:['9b71d224-bd62-4c3b-a5d3-1234567890ab',1]}\n"
    "+{inspect:[0,'someService']}\nE",
    # Hostile restore counts.
    "C\n+{call:[0,'a'],b:[]}\n+{event:[0,'a'],e:[]}\n+{ping:[0]}\nR18446744073709551615\nR0\nR1",
    "S\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\nR9223372036854775808\nR2",
    "C\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\nR2\nR1\nR0\nR3\nR4",
    "C\n+{inspect:[0,'x']}\nR\xff\xff\xff\xff\xff\xff\xff\xff",
    "C\n+{call:[0,'a'],b:[]}\nH{handshake:[0],ok:9223372036854774784}\nH{handshake:[0],ok:-1}",
    "S\n+{ping:[0]}\nH{handshake:[0,'testApp'],session:['x',9007199254740993]}",
    # Confirmations: cumulative, clamped, stale, from the wrong side.
    "C\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\n+{event:[0,'a'],e:[]}\n"
    "<{pong:[2]}\n<{callback:[1],ok:[]}\n<{callback:[-99],ok:[]}\n<{pong:[100]}",
    "S\n+{event:[0,'chat'],message:['x']}\n<{callback:[-5],error:[16]}\n<{call:[-3,'a'],b:[]}",
    # Ids given by hand: repeated, out of order, wrong sign, zero.
    "C\n>{call:[5,'a'],b:[]}\n>{call:[5,'a'],b:[]}\n>{call:[3,'a'],b:[]}\n>{call:[-6,'a'],b:[]}\n>{ping:[0]}\n"
    ">{callback:[1],ok:[]}\n>{handshake:[0,'testApp']}\n+{ping:[0]}",
    # A bounded buffer that fills up, then drains.
    "L2 100\nC\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\n+{call:[0,'a'],b:[]}\n"
    "<{callback:[2],ok:[]}\n+{call:[0,'a'],b:[]}",
    "L10 20\nC\n+{call:[0,'calculator'],divide:[20,10]}\n+{ping:[0]}",
    "L0 0\nS\n+{ping:[0]}",
    # Stored sessions, good and broken.
    "D" + STORED_CLIENT + "\nH{handshake:[0],ok:2}\n+{ping:[0]}\nE",
    "D" + STORED_SERVER + "\nR3\n+{event:[0,'chat'],m:[]}\nE",
    "D" + STORED_SERVER.replace("acknowledged:1", "acknowledged:5"),
    "D" + STORED_CLIENT.replace("latest:2", "latest:-2"),
    "D" + STORED_CLIENT.replace("tetherSession:1", "tetherSession:2"),
    "D" + STORED_CLIENT.replace("'call'", "'callback'"),
    "D" + STORED_CLIENT.replace("received:1", "received:-1"),
    "D{tetherSession:1,id:'x',role:'client',received:0,acknowledged:0,latest:0,buffer:[]}\nT\nE",
    "D{tetherSession:1,id:'x',role:'client',received:9007199254740992,acknowledged:9007199254740992,"
    "latest:9007199254740992,buffer:[]}\n+{ping:[0]}\nE",
    "D{tetherSession:1,id:'x',role:'server',received:9007199254740993,acknowledged:9007199254740990,"
    "latest:-9007199254740991,buffer:[[-9007199254740991,'call','c']]}\n*{ping:[0]}\nR9007199254740992\nE",
    "D{tetherSession:1,id:'x',role:'server',received:0,acknowledged:0,"
    "latest:-9223372036854775808,buffer:[]}\nR1\n+{ping:[0]}",
    # Sends through on_send_owned.
    "S\nL3 1000\n*{event:[0,'chat'],message:['a']}\n*{call:[0,'a'],b:[]}\n*{ping:[0]}\n*{ping:[0]}\n"
    ">{call:[-2,'a'],b:[]}\n<{pong:[-2]}\n*{inspect:[0,'x']}\nR3\nE",
    # Storage and user name.
    "C\nKk {a:1,b:undefined,'2':[1,undefined]}\nKn NaN\nKu\nUmarcus\nE\nU\nE",
    "S\n+{call:[0,'a'],b:[]}\nT\n+{ping:[0]}\nR1\nE",
]

def framer_seeds():
    # Two head bytes (an odd first byte picks a small limit), then NUL-framed messages.
    out = []
    heads = [b"\x00\x00", b"\x00\x07", b"\x21\x05", b"\x41\x00", b"\xff\xff", b"\x03\x01"]
    groups = [MESSAGES[0:3], MESSAGES[11:15], MESSAGES[18:22], MESSAGES[22:27], ["{}", "", "{}"]]
    for i, group in enumerate(groups):
        stream = b"".join(m.encode() + b"\0" for m in group)
        out.append(heads[i % len(heads)] + stream)
        out.append(heads[(i + 1) % len(heads)] + stream + group[0].encode()[:5])
    out.append(b"\x00\x00" + b"x" * 300 + b"\0{}\0")
    out.append(b"\x01\x00" + b"{ping:[1]}\0")
    return out


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for s in seeds:
        data = s.encode() if isinstance(s, str) else s
        name = hashlib.sha1(data).hexdigest()
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def script_bytes(script):
    # A script may carry raw bytes (a restore count that is not decimal): write those as is.
    return script.encode("latin-1") if "\xff" in script else script.encode()


if __name__ == "__main__":
    write("parse", MESSAGES)
    write("framer", framer_seeds())
    write("conductor", CONDUCTOR)
    write("session", [script_bytes(s) for s in SESSION])

#!/usr/bin/env python3
"""Writes the committed seed corpus of the `address` target: multiserver addresses of every
transport tether dials, with alternatives, shs keys and escapes, plus near misses.

    python3 crates/tether/fuzz/make_corpus.py
"""

import hashlib
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0="

ADDRESSES = [
    "net:127.0.0.1:3000",
    "net:localhost:8008",
    f"net:1.2.3.4:8008~shs:{KEY}",
    f"net:host:8008~shs:{KEY};wss://host~shs:{KEY}",
    f"net:127.0.0.1:3000~shs:{KEY};ws://127.0.0.1:8080~shs:{KEY}",
    "net:fe80::1065:74a4:4016:6266:4849:8889",
    "net:fe80::1:3000",
    "net:[::1]:3000",
    "tls:localhost:443",
    "tls:example.com:8443~noauth",
    "ws://127.0.0.1:8080",
    "ws://h:8080/path?q=1",
    "wss://h",
    "wss://user@h:1/",
    "unix:/tmp/x.sock~noauth",
    "unix:/tmp/t.sock",
    "unix:///tmp/t.sock",
    "unix://relative",
    "onion:xyz.onion:8080",
    "onion:x.onion:1;net:fe80::1:3000",
    "dht:a!:b!;c!~d!!e:",
    "dht:a!:b!;c!~d!!e",
    "bt:00!:11!:22!:33!:44!:55~noauth",
    f"shs:{KEY}",
    f"shs2:{KEY}",
    f"net:h:1~shs:@{KEY[:-1]}=.ed25519",
    "net:h:1~shs:notakey",
    "net:h:1~shs:AAAA",
    "net:h:1;",
    ";net:h:1",
    "net:h:99999",
    "net:host",
    "net::1",
    "Net:1",
    "n:1",
    "net:a b:1",
    "net:a!x",
    "ws:",
    "",
    f"@{KEY}.ed25519",
    KEY,
]

if __name__ == "__main__":
    d = os.path.join(HERE, "corpus", "address")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for a in ADDRESSES:
        data = a.encode()
        with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)

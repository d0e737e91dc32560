// Node peer for tether's conductor interop tests.
//
// CLIENT  node conductor-peer.mjs client URL
//   Drives the real npm client @whi/holochain-websocket against URL and prints one JSON line
//   per step: {"step":S,"ok":true,"result":R} or {"step":S,"ok":false,"error":{"name":N,
//   "message":M}}, then {"done":true}. Steps: open, answer (answer, no args), divide
//   (divide {a:20,b:10}), divideByZero (divide {a:1,b:0}), unknown (no_such_method),
//   timeout (never, 200 ms timeout), close (the close code).
//
// SERVER  node conductor-peer.mjs server [--cert FILE --key FILE]
//   A server on the same ws + @msgpack/msgpack pair the npm clients use (written here, not a
//   Holochain conductor). With --cert and --key (PEM) it serves wss:// on Node's https
//   server, else ws://. Prints {"ready":true,"port":N,"tls":BOOL}. Requests (payload {type, data}):
//     answer -> 42; echo -> data; fail -> error {type:'ribosome_error', data:'boom'};
//     cancel -> a response with no data; signal -> signals data first, then answers 'sent';
//     never -> no answer; garbage -> sends a non-msgpack binary frame, then answers 'ok';
//     anything else -> error {type:'deserialization', ...}.
//   Envelopes are {type:'response'|'signal', id, data: <msgpack bytes>}.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { encode, decode } from '@msgpack/msgpack';
import { WebSocketServer } from 'ws';
import HolochainWebsocket from '@whi/holochain-websocket';

const { Connection } = HolochainWebsocket;
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const [mode, url] = process.argv.slice(2);
const flag = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? undefined : process.argv[i + 1];
};

async function step(name, f) {
  try {
    out({ step: name, ok: true, result: (await f()) ?? null });
  } catch (error) {
    out({ step: name, ok: false, error: { name: error?.constructor?.name, message: String(error?.message ?? error) } });
  }
}

async function client() {
  const conn = new Connection(url, { timeout: 5000 });
  await step('open', () => conn.open());
  await step('answer', () => conn.request('answer'));
  await step('divide', () => conn.request('divide', { a: 20, b: 10 }));
  await step('divideByZero', () => conn.request('divide', { a: 1, b: 0 }));
  await step('unknown', () => conn.request('no_such_method', null));
  await step('timeout', () => conn.request('never', null, 200));
  await step('close', () => conn.close());
  out({ done: true });
  process.exit(0);
}

function server() {
  const [cert, key] = [flag('cert'), flag('key')];
  let wss;
  if (cert && key) {
    const https = createServer({ cert: readFileSync(cert), key: readFileSync(key) });
    wss = new WebSocketServer({ server: https });
    https.listen(0, '127.0.0.1', () => out({ ready: true, port: https.address().port, tls: true }));
  } else {
    wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    wss.on('listening', () => out({ ready: true, port: wss.address().port, tls: false }));
  }
  wss.on('connection', (ws) => {
    const send = (msg) => ws.send(encode(msg));
    const respond = (id, payload) =>
      send({ type: 'response', id, data: payload === null ? null : encode(payload) });
    ws.on('message', (raw) => {
      let msg;
      try {
        msg = decode(raw);
      } catch (error) {
        ws.close(1002, 'invalid envelope');
        return;
      }
      if (msg.type !== 'request') return;
      const { type, data } = decode(msg.data);
      switch (type) {
        case 'answer': return respond(msg.id, { type: 'answer', data: 42 });
        case 'echo': return respond(msg.id, { type: 'echo', data });
        case 'fail':
          return respond(msg.id, { type: 'error', data: { type: 'ribosome_error', data: 'boom' } });
        case 'cancel': return respond(msg.id, null);
        case 'signal':
          send({ type: 'signal', data: encode(data) });
          return respond(msg.id, { type: 'signal', data: 'sent' });
        case 'never': return undefined;
        case 'garbage':
          ws.send(Buffer.from([0xc1, 0xff, 0x00]));
          return respond(msg.id, { type: 'garbage', data: 'ok' });
        default:
          return respond(msg.id, {
            type: 'error',
            data: { type: 'deserialization', data: `unknown request type '${type}'` },
          });
      }
    });
  });
}

if (mode === 'client') await client();
else if (mode === 'server') server();
else {
  process.stderr.write('usage: node conductor-peer.mjs client URL | server [--cert F --key F]\n');
  process.exit(2);
}

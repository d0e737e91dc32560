// Node peer for tether's conductor interop tests.
//
// CLIENT  node conductor-peer.mjs client URL
//   Drives the real npm client @whi/holochain-websocket against URL and prints one JSON line
//   per step: {"step":S,"ok":true,"result":R} or {"step":S,"ok":false,"error":{"name":N,
//   "message":M}}, then {"done":true}. Steps: open, answer (answer, no args), divide
//   (divide {a:20,b:10}), divideByZero (divide {a:1,b:0}), unknown (no_such_method),
//   timeout (never, 200 ms timeout), close (the close code).
//
// SPARTAN  node conductor-peer.mjs spartan URL TOKEN
//   Drives @spartan-hc/holochain-websocket 1.3.3 (the seed's Connection API; {type:{m:null},
//   data} requests, {App:…} signals): open, authenticate (TOKEN: comma-separated bytes), answer,
//   divide, divideByZero, unknown, flush (two requests left pending, then flushed: the
//   count and both errors), timeout, then prints {"waiting":"signal"} and, when the app signal
//   arrives, a step "signal" with {zome, type, data, dna, agent} (hashes as strings), then close.
//
// HCCLIENT  node conductor-peer.mjs hcclient URL TOKEN ORIGIN
//   Drives @holochain/client 0.21.0's WsClient ({type, value} payloads): connect with ORIGIN,
//   authenticate, answer, divide, divideByZero (the raw error payload), then {"waiting":
//   "signal"} and the app signal (step "signal": {type, zome_name, payload, cell_id lengths}),
//   then close. Steps print as for CLIENT.
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
import * as Spartan from '@spartan-hc/holochain-websocket';
import { WsClient } from '@holochain/client';

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

const tokenArg = (s) => new Uint8Array(s.split(',').map(Number));
const errorOf = (error) => ({ name: error?.constructor?.name, message: String(error?.message ?? error) });

async function spartan() {
  const conn = new Spartan.Connection(url, { timeout: 5000 });
  await step('open', () => conn.open());
  await step('authenticate', () => conn.authenticate(tokenArg(process.argv[4])));
  await step('answer', () => conn.request('answer'));
  await step('divide', () => conn.request('divide', { a: 20, b: 10 }));
  await step('divideByZero', () => conn.request('divide', { a: 1, b: 0 }));
  await step('unknown', () => conn.request('no_such_method', null));
  await step('flush', async () => {
    const pending = [conn.request('never'), conn.request('never')].map((p) => p.catch(errorOf));
    // Both are pending once a request sent after them is answered.
    await conn.request('answer');
    const count = conn.flush();
    return { count, errors: await Promise.all(pending) };
  });
  // After flush: a timed-out request stays in spartan's pending table.
  await step('timeout', () => conn.request('never', null, 200));
  const signal = new Promise((resolve) => conn.on('signal', resolve));
  out({ waiting: 'signal' });
  await step('signal', async () => {
    const s = await signal;
    return { zome: s.zome, type: s.signal.type, data: s.signal.data, dna: String(s.dna), agent: String(s.agent) };
  });
  await step('close', () => conn.close());
  out({ done: true });
  process.exit(0);
}

async function hcclient() {
  const [token, origin] = [process.argv[4], process.argv[5]];
  let client;
  await step('open', async () => {
    client = await WsClient.connect(url, { origin });
  });
  await step('authenticate', () => client.authenticate({ token: [...tokenArg(token)] }));
  await step('answer', () => client.request({ type: 'answer' }));
  await step('divide', () => client.request({ type: 'divide', value: { a: 20, b: 10 } }));
  await step('divideByZero', () => client.request({ type: 'divide', value: { a: 1, b: 0 } }));
  const signal = new Promise((resolve) => client.on('signal', resolve));
  out({ waiting: 'signal' });
  await step('signal', async () => {
    const s = await signal;
    const v = s.value;
    return { type: s.type, zome_name: v.zome_name, payload: v.payload, cell_id: v.cell_id.map((h) => h.length) };
  });
  await step('close', async () => (await client.close()).code);
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
      const payload = decode(msg.data);
      const { type } = payload;
      // Answer in the dialect asked in: {type, value} (Holochain 0.5+) or {type, data}.
      const key = 'value' in payload ? 'value' : 'data';
      const data = payload[key];
      const tagged = (t, content) => ({ type: t, [key]: content });
      switch (type) {
        case 'answer': return respond(msg.id, tagged('answer', 42));
        case 'echo': return respond(msg.id, tagged('echo', data));
        case 'fail':
          return respond(msg.id, tagged('error', tagged('ribosome_error', 'boom')));
        case 'cancel': return respond(msg.id, null);
        case 'signal':
          send({ type: 'signal', data: encode(data) });
          return respond(msg.id, tagged('signal', 'sent'));
        case 'never': return undefined;
        case 'garbage':
          ws.send(Buffer.from([0xc1, 0xff, 0x00]));
          return respond(msg.id, tagged('garbage', 'ok'));
        default:
          return respond(msg.id, tagged('error', tagged('deserialization', `unknown request type '${type}'`)));
      }
    });
  });
}

if (mode === 'client') await client();
else if (mode === 'spartan') await spartan();
else if (mode === 'hcclient') await hcclient();
else if (mode === 'server') server();
else {
  process.stderr.write('usage: node conductor-peer.mjs client URL | spartan URL TOKEN | hcclient URL TOKEN ORIGIN | server [--cert F --key F]\n');
  process.exit(2);
}

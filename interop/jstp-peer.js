#!/usr/bin/env node
'use strict';

// Node peer for tether's interop tests. It drives the real npm package
// @metarhia/jstp (2.3.0) either as a server hosting the shared test
// application or as a client running a named scenario.
//
// stdout carries JSON lines only (one object per line); logs go to stderr.
//
// SERVER  node jstp-peer.js server [--host 127.0.0.1] [--tcp P] [--tls P]
//           [--ws P] [--wss P] [--unix PATH] [--cert F --key F]
//           [--heartbeat MS] [--login USER:PASS]... [--trace]
//   Apps testApp@1.0.0 and testApp@2.0.0 (same interfaces; no version in the
//   handshake picks 2.0.0): calculator.answer/divide/doNothing,
//   someService.sayHi/say, someOtherService.method/otherMethod, version.get
//   (-> '1.0.0' / '2.0.0'), chat.send(text) (call or event; broadcasts
//   chat.message(username, text) to every client), events.<any> events
//   (echoed back as events.echo(name, ...args)), control.emit(iface, event,
//   args), control.emitLater(iface, event, args, ms), control.callClient(
//   iface, method, args), control.inspectClient(iface), control.ping(),
//   control.drop(), control.end(). Arity is strict (jstp rule): other
//   argument counts get error 17.
//   Lines: {"ready":true,"tcp":N|null,"tls":..,"ws":..,"wss":..,"unix":PATH|null}
//   then {"event":E,"conn":ID,"transport":"tcp|tls|ws|wss|unix",...} with E
//   connect/reconnect (app, version, username, session), disconnect,
//   handshakeRequest (app, strategy), handshakeTimeout (alreadyClosed),
//   connectionError (message), call (iface, method, args), remoteEvent
//   (iface, name, args), inspect (iface), callback (error, ok), ping/pong
//   (id), heartbeat, rejected (message), in/out (message, only --trace);
//   also {"event":"uncaughtException","message":..}.
//
// CLIENT  node jstp-peer.js client URL SCENARIO [options]
//   URL jstp://h:p | jstps://h:p | ws://h:p | wss://h:p | unix:/path
//   Lines: {"step":S,"ok":true,"result":R[,"pass":B]} or
//          {"step":S,"ok":false,"error":{"code":C,"message":M}[,"pass":B]},
//   then {"done":true} (exit 0; with --strict exit 1 if any "pass":false),
//   or {"fatal":true,"error":{"code":null,"message":M}} (exit 1).
//   Scenarios are the SCENARIOS object below; each documents its options.

const fs = require('fs');
const path = require('path');
const net = require('net');
const tls = require('tls');
const { StringDecoder } = require('string_decoder');

// Development logging events (incomingMessage, outgoingMessage, heartbeat)
// are only emitted by jstp when NODE_ENV is not 'production'; several
// scenarios and the server trace rely on them.
if (process.env.NODE_ENV === 'production') delete process.env.NODE_ENV;

// mdsf prints two long warnings when its native addon is missing (it always
// is on Node 20: the addon cannot be built there and we install with
// --ignore-scripts); it then uses its JS parser. Replace them with one line.
const quietRequire = id => {
  const warnings = [];
  const originalWarn = console.warn;
  console.warn = (...args) => warnings.push(args.join(' '));
  try {
    return require(id);
  } finally {
    console.warn = originalWarn;
    for (const warning of warnings) {
      if (/mdsf/.test(warning)) continue;
      originalWarn(warning);
    }
    if (warnings.some(warning => /native addon is not built/.test(warning))) {
      process.stderr.write('[jstp-peer] mdsf: no native addon, using its JS parser\n');
    }
  }
};

const jstp = quietRequire('@metarhia/jstp');
const jstpDir = path.dirname(require.resolve('@metarhia/jstp'));
const mdsf = require(require.resolve('mdsf', { paths: [jstpDir] }));
const WebSocketClient = require(require.resolve('websocket', {
  paths: [jstpDir],
})).client;

const USAGE = `usage:
  node jstp-peer.js server [--host ADDR] [--tcp PORT] [--tls PORT] [--ws PORT]
                           [--wss PORT] [--unix PATH] [--cert FILE --key FILE]
                           [--heartbeat MS] [--login USER:PASS]... [--trace]
  node jstp-peer.js client URL SCENARIO [options]
    URL: jstp://host:port | jstps://host:port | ws://host:port[/path]
         | wss://host:port[/path] | unix:/path/to/socket
    scenarios: %SCENARIOS%
    common options: --app APP --user NAME --password PASS --timeout MS --strict`;

// ---------------------------------------------------------------- output

const jsonReplacer = (key, value) => {
  if (typeof value === 'bigint') return value.toString();
  if (value instanceof Error) return errorJson(value);
  return value;
};

// Writes one JSON object as one line. stdout writes to pipes and files are
// synchronous on Linux, and exit() below waits for the stream anyway.
const out = obj => {
  let line;
  try {
    line = JSON.stringify(obj, jsonReplacer);
  } catch (error) {
    line = JSON.stringify({ unprintable: String(error && error.message) });
  }
  process.stdout.write(line + '\n');
};

const log = (...args) => {
  process.stderr.write(
    `[jstp-peer ${process.pid}] ${args
      .map(a => (typeof a === 'string' ? a : safeInspect(a)))
      .join(' ')}\n`
  );
};

const safeInspect = value => {
  try {
    return require('util').inspect(value, { depth: 4 });
  } catch (error) {
    return String(value);
  }
};

// Exits once everything written to stdout has been handed to the OS.
let exiting = false;
const exit = code => {
  if (exiting) return;
  exiting = true;
  process.exitCode = code;
  process.stdout.write('', () => process.exit(code));
  // Safety net in case the stream never drains (reader gone).
  setTimeout(() => process.exit(code), 2000).unref();
};

const errorJson = error => {
  if (error === null || error === undefined) return null;
  if (typeof error === 'number') {
    const messages = jstp.RemoteError.defaultMessages;
    return { code: error, message: messages[error] || String(error) };
  }
  if (typeof error === 'object') {
    const result = {
      code: error.code === undefined ? null : error.code,
      message: error.message === undefined ? String(error) : error.message,
    };
    if (Array.isArray(error.info)) result.info = error.info;
    return result;
  }
  return { code: null, message: String(error) };
};

const fatal = (message, code = null) => {
  out({ fatal: true, error: { code, message: String(message) } });
  exit(1);
};

// Kill ourselves if the process that spawned us goes away, so that a
// crashed test never leaves a peer listening behind.
const watchParent = () => {
  const parent = process.ppid;
  setInterval(() => {
    if (process.ppid !== parent) {
      log('parent process is gone, exiting');
      process.exit(0);
    }
  }, 500).unref();
};

// ---------------------------------------------------------------- argv

// Flags that take no value.
const BOOLEAN_FLAGS = new Set([
  'trace',
  'strict',
  'trigger',
  'no-nul',
  'no-protocol',
  'help',
]);

const parseArgs = argv => {
  const positional = [];
  const flags = new Map();
  const ordered = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--') || arg === '--') {
      positional.push(arg);
      continue;
    }
    let name = arg.slice(2);
    let value;
    const eq = name.indexOf('=');
    if (eq !== -1) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    } else if (BOOLEAN_FLAGS.has(name)) {
      value = true;
    } else {
      if (i + 1 >= argv.length) throw new Error(`flag --${name} needs a value`);
      value = argv[++i];
    }
    if (!flags.has(name)) flags.set(name, []);
    flags.get(name).push(value);
    ordered.push([name, value]);
  }
  return {
    positional,
    ordered,
    has: name => flags.has(name),
    get: (name, fallback) =>
      flags.has(name) ? flags.get(name)[flags.get(name).length - 1] : fallback,
    all: name => flags.get(name) || [],
    int: (name, fallback) => {
      if (!flags.has(name)) return fallback;
      const raw = flags.get(name)[flags.get(name).length - 1];
      const n = Number(raw);
      if (!Number.isInteger(n)) throw new Error(`--${name} expects an integer`);
      return n;
    },
    json: (name, fallback) => {
      if (!flags.has(name)) return fallback;
      return JSON.parse(flags.get(name)[flags.get(name).length - 1]);
    },
  };
};

// ================================================================ server

// The shared fixture: upstream's testApp plus the interfaces the interop
// tests need. Every method follows jstp's strict arity rule: the function
// takes (connection, ...args, callback), so a call with a different number
// of arguments is answered with error 17.
const buildApi = (version, peer) => ({
  calculator: {
    answer(connection, callback) {
      callback(null, 42);
    },
    divide(connection, dividend, divisor, callback) {
      if (!divisor) {
        callback(new Error('Zero division'));
        return;
      }
      callback(null, dividend / divisor);
    },
    doNothing(connection, callback) {
      callback(null);
    },
  },
  someService: {
    sayHi(connection, name, callback) {
      callback(null, `Hi, ${name}!`);
    },
    say(connection, word, callback) {
      callback(null, word);
    },
  },
  someOtherService: {
    method(connection, argument, callback) {
      callback(null, argument);
    },
    otherMethod(connection, callback) {
      callback(null);
    },
  },
  version: {
    get(connection, callback) {
      callback(null, version);
    },
  },
  chat: {
    send(connection, text, callback) {
      callback(null);
      peer.broadcastChat(connection, text);
    },
  },
  control: {
    // Reply first, then send the event to the caller only.
    emit(connection, iface, event, args, callback) {
      if (typeof iface !== 'string' || typeof event !== 'string') {
        callback(jstp.ERR_INVALID_SIGNATURE);
        return;
      }
      callback(null);
      setImmediate(() => {
        connection.emitRemoteEvent(iface, event, toArgs(args));
      });
    },
    // Same as emit, after a delay in milliseconds.
    emitLater(connection, iface, event, args, delay, callback) {
      callback(null);
      setTimeout(() => {
        connection.emitRemoteEvent(iface, event, toArgs(args));
      }, Number(delay) || 0);
    },
    // Calls a method of the calling client's application. The results are
    // passed through as this call's results; a failure is passed through as
    // this call's error (so the code the client answered reaches the caller).
    callClient(connection, iface, method, args, callback) {
      connection.callMethod(iface, method, toArgs(args), (error, ...res) => {
        if (error) callback(error);
        else callback(null, ...res);
      });
    },
    // Inspects an interface of the calling client; returns its method names.
    inspectClient(connection, iface, callback) {
      connection.inspectInterface(iface, (error, proxy) => {
        if (error) {
          callback(error);
          return;
        }
        callback(null, proxyMethodNames(proxy));
      });
    },
    // Pings the calling client and answers once its pong came back.
    ping(connection, callback) {
      connection.ping(() => callback(null));
    },
    // Answers, then drops the transport without a goodbye (the session stays
    // restorable).
    drop(connection, callback) {
      callback(null);
      setTimeout(() => dropTransport(connection), 20);
    },
    // Answers, then closes the connection cleanly.
    end(connection, callback) {
      callback(null);
      setTimeout(() => connection.close(), 20);
    },
  },
});

const toArgs = args => {
  if (args === undefined || args === null) return [];
  return Array.isArray(args) ? args : [args];
};

// RemoteProxy keeps one own function per inspected method (names that clash
// with EventEmitter members are skipped by jstp itself).
const proxyMethodNames = proxy =>
  Object.keys(proxy).filter(key => typeof proxy[key] === 'function');

const dropTransport = connection => {
  const raw = connection.getTransport();
  if (!raw) return;
  if (typeof raw.destroy === 'function') raw.destroy();
  else if (typeof raw.drop === 'function') raw.drop(1006, 'dropped', true);
};

// Application that also records events of any name on the `events`
// interface and echoes them back to the sender as events.echo(name, ...args).
class PeerApplication extends jstp.Application {
  constructor(name, api, eventHandlers, peer) {
    super(name, api, eventHandlers);
    this.peer = peer;
  }

  handleEvent(connection, iface, event, args) {
    if (iface === 'events') {
      connection.emitRemoteEvent('events', 'echo', [event, ...args]);
      return;
    }
    super.handleEvent(connection, iface, event, args);
  }
}

const runServer = opts => {
  const host = opts.get('host', '127.0.0.1');
  const trace = opts.has('trace');
  const heartbeat = opts.int('heartbeat', 0);
  const logins = new Map();
  for (const pair of opts.all('login')) {
    const colon = pair.indexOf(':');
    if (colon === -1) throw new Error('--login expects USER:PASSWORD');
    logins.set(pair.slice(0, colon), pair.slice(colon + 1));
  }

  // Connections with a completed handshake, over every listener (chat
  // broadcasts reach all of them; restored sessions are included).
  const clients = new Set();
  const closedConnections = new WeakSet();

  const peer = {
    broadcastChat(sender, text) {
      for (const connection of clients) {
        connection.emitRemoteEvent('chat', 'message', [sender.username, text]);
      }
    },
  };

  const eventHandlers = {
    chat: {
      send(connection, text) {
        peer.broadcastChat(connection, text);
      },
    },
  };

  const applications = [
    new PeerApplication('testApp@1.0.0', buildApi('1.0.0', peer),
      eventHandlers, peer),
    new PeerApplication('testApp@2.0.0', buildApi('2.0.0', peer),
      eventHandlers, peer),
  ];

  const authPolicy = (connection, application, strategy, credentials, cb) => {
    if (
      strategy === 'login' &&
      Array.isArray(credentials) &&
      logins.has(credentials[0]) &&
      logins.get(credentials[0]) === credentials[1]
    ) {
      cb(null, credentials[0]);
      return;
    }
    cb(new jstp.RemoteError(jstp.ERR_AUTH_FAILED));
  };

  const baseOptions = {
    applications,
    heartbeatInterval: heartbeat > 0 ? heartbeat : undefined,
  };
  if (logins.size > 0) baseOptions.authPolicy = authPolicy;

  let tlsOptions = null;
  const needTls = opts.has('tls') || opts.has('wss');
  if (needTls) {
    if (!opts.has('cert') || !opts.has('key')) {
      throw new Error('--tls/--wss need --cert FILE and --key FILE');
    }
    tlsOptions = {
      cert: fs.readFileSync(opts.get('cert')),
      key: fs.readFileSync(opts.get('key')),
    };
  }


  const connectionInfo = connection => ({
    app: connection.application ? connection.application.name : null,
    version: connection.application ? connection.application.version : null,
    username: connection.username,
    session: connection.session ? connection.session.id : null,
  });

  // A Connection never moves between listeners (a session is restored only
  // through the server that created it), so the listener names the transport.
  const attach = (server, name) => {
    const describe = (connection, extra) =>
      Object.assign({ conn: connection.id, transport: name }, extra);
    server.on('connect', connection => {
      clients.add(connection);
      out({ event: 'connect', ...describe(connection, connectionInfo(connection)) });
    });
    server.on('reconnect', connection => {
      clients.add(connection);
      out({ event: 'reconnect', ...describe(connection, connectionInfo(connection)) });
    });
    server.on('disconnect', connection => {
      clients.delete(connection);
      closedConnections.add(connection);
      out({ event: 'disconnect', ...describe(connection) });
    });
    server.on('handshakeRequest', (connection, app, strategy) => {
      out({
        event: 'handshakeRequest',
        ...describe(connection, { app, strategy }),
      });
    });
    // Upstream also fires this 3 s after a handshake that was rejected (its
    // timer is not cleared); "alreadyClosed" tells those apart from a real
    // timeout of a silent, still open connection.
    server.on('handshakeTimeout', connection => {
      out({
        event: 'handshakeTimeout',
        ...describe(connection, { alreadyClosed: closedConnections.has(connection) }),
      });
    });
    server.on('connectionError', (error, connection) => {
      out({
        event: 'connectionError',
        ...describe(connection, { message: error && error.message }),
      });
    });
    server.on('error', error => {
      out({ event: 'serverError', transport: name, message: error.message });
    });
    server.on('log', (connection, kind, ...args) => {
      const base = describe(connection);
      switch (kind) {
        case 'call':
          out({ event: 'call', ...base, iface: args[0], method: args[1], args: args[2] });
          break;
        case 'event':
          out({ event: 'remoteEvent', ...base, iface: args[0], name: args[1], args: args[2] });
          break;
        case 'inspect':
          out({ event: 'inspect', ...base, iface: args[0] });
          break;
        case 'callback':
          out({ event: 'callback', ...base, error: args[0] === undefined ? null : args[0], ok: args[1] === undefined ? null : args[1] });
          break;
        case 'messageRejected':
          out({ event: 'rejected', ...base, message: stringifyMessage(args[0]) });
          break;
        case 'heartbeat':
          out({ event: 'heartbeat', ...base });
          break;
        case 'incomingMessage': {
          const message = args[0];
          const messageKind = message && Object.keys(message)[0];
          if (messageKind === 'ping' || messageKind === 'pong') {
            out({ event: messageKind, ...base, id: message[messageKind][0] });
          }
          if (trace) out({ event: 'in', ...base, message: stringifyMessage(message) });
          break;
        }
        case 'outgoingMessage':
          if (trace) out({ event: 'out', ...base, message: stringifyMessage(args[0]) });
          break;
        default:
          break;
      }
    });
  };

  const listeners = [];
  const ready = { ready: true, tcp: null, tls: null, ws: null, wss: null, unix: null };

  const listen = (name, server, where) =>
    new Promise((resolve, reject) => {
      attach(server, name);
      server.once('error', reject);
      const done = () => {
        server.removeListener('error', reject);
        const address = server.address();
        ready[name] = typeof address === 'string' ? address : address.port;
        resolve();
      };
      if (typeof where === 'string') server.listen(where, done);
      else server.listen(where, host, done);
      listeners.push(server);
    });

  const portOf = flag => {
    const port = opts.int(flag);
    if (port < 0 || port > 65535) throw new Error(`--${flag}: bad port`);
    return port;
  };

  const tasks = [];
  if (opts.has('tcp')) {
    tasks.push(listen('tcp', jstp.net.createServer(baseOptions), portOf('tcp')));
  }
  if (opts.has('tls')) {
    tasks.push(
      listen('tls', jstp.tls.createServer({ ...baseOptions, ...tlsOptions }),
        portOf('tls'))
    );
  }
  if (opts.has('ws')) {
    tasks.push(listen('ws', jstp.ws.createServer(baseOptions, {}), portOf('ws')));
  }
  if (opts.has('wss')) {
    tasks.push(
      listen('wss', jstp.wss.createServer({ ...baseOptions, ...tlsOptions }, {}),
        portOf('wss'))
    );
  }
  let unixPath = null;
  if (opts.has('unix')) {
    unixPath = path.resolve(opts.get('unix'));
    try {
      if (fs.statSync(unixPath).isSocket()) fs.unlinkSync(unixPath);
    } catch (error) {
      // no stale socket
    }
    tasks.push(listen('unix', jstp.net.createServer(baseOptions), unixPath));
  }
  if (tasks.length === 0) throw new Error('no listener given (--tcp/--tls/--ws/--wss/--unix)');

  const shutdown = signal => {
    log(`${signal}: shutting down`);
    for (const server of listeners) {
      try {
        server.close();
      } catch (error) {
        // already closed
      }
    }
    if (unixPath) {
      try {
        fs.unlinkSync(unixPath);
      } catch (error) {
        // gone already
      }
    }
    exit(0);
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  // A peer in a test run must survive upstream's crash paths (for example a
  // handshake response sent to the server); report them instead.
  process.on('uncaughtException', error => {
    log('uncaught exception:', error);
    out({ event: 'uncaughtException', message: error && error.message });
  });

  Promise.all(tasks).then(
    () => {
      out(ready);
      log('listening', JSON.stringify(ready));
    },
    error => fatal(`listen failed: ${error.message}`, error.code || null)
  );
};

const stringifyMessage = message => {
  try {
    return mdsf.stringify(message);
  } catch (error) {
    return String(message);
  }
};

// ================================================================ client

const parseTarget = url => {
  if (url.startsWith('unix:')) {
    let socketPath = url.slice('unix:'.length);
    if (socketPath.startsWith('//')) socketPath = socketPath.slice(2);
    return { kind: 'net', raw: 'unix', args: () => [socketPath], path: socketPath };
  }
  const parsed = new URL(url);
  const scheme = parsed.protocol.replace(/:$/, '');
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  const port = Number(parsed.port);
  switch (scheme) {
    case 'jstp':
    case 'tcp':
      return { kind: 'net', raw: 'tcp', host, port, args: () => [port, host] };
    case 'jstps':
    case 'tls':
      return {
        kind: 'tls',
        raw: 'tls',
        host,
        port,
        args: () => [{ host, port, rejectUnauthorized: false }],
      };
    case 'ws':
      return { kind: 'ws', raw: 'ws', url, args: () => [null, url] };
    case 'wss':
      return {
        kind: 'wss',
        raw: 'wss',
        url,
        // A fresh config object each time: the websocket client deletes
        // tlsOptions from the config it is given.
        args: () => [{ tlsOptions: { rejectUnauthorized: false } }, url],
      };
    default:
      throw new Error(`unsupported URL scheme: ${scheme}`);
  }
};

// A step outcome is { ok: true, result } or { ok: false, error }.
const success = result => ({ ok: true, result: result === undefined ? null : result });
const failure = error => ({ ok: false, error: errorJson(error) });

const sameJson = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// Expectations produce the optional "pass" field of a step line.
const expectResult = value => outcome => outcome.ok && sameJson(outcome.result, value);
const expectCode = code => outcome => !outcome.ok && outcome.error.code === code;
const expectOk = () => outcome => outcome.ok;

class ClientRun {
  constructor(target, opts) {
    this.target = target;
    this.opts = opts;
    this.failures = 0;
    this.connections = [];
  }

  // Prints one step line and returns the outcome.
  step(name, outcome, expect) {
    const line = { step: name, ok: outcome.ok };
    if (outcome.ok) line.result = outcome.result === undefined ? null : outcome.result;
    else line.error = outcome.error;
    if (expect) {
      line.pass = Boolean(expect(outcome));
      if (!line.pass) this.failures++;
    }
    out(line);
    return outcome;
  }

  // Connects with the transport matching the URL and performs the handshake
  // through SimpleConnectPolicy. Prints the "handshake" step.
  async open({ app, user, password, client = {}, expect, stepName = 'handshake' } = {}) {
    const appName = app || this.opts.get('app', 'testApp');
    const login = user !== undefined ? user : this.opts.get('user');
    const pass = password !== undefined ? password : this.opts.get('password');
    const clientObject = Object.assign(
      {
        connectPolicy: new jstp.SimpleConnectPolicy(login, pass),
        reconnector: () => {},
      },
      client
    );
    const transport = jstp[this.target.kind];
    const { error, connection, session } = await new Promise(resolve => {
      let settled = false;
      try {
        transport.connect(appName, clientObject, ...this.target.args(),
          (error, connection, session) => {
            if (settled) return;
            settled = true;
            resolve({ error, connection, session });
          });
      } catch (error) {
        resolve({ error });
      }
    });
    if (connection) {
      this.connections.push(connection);
      // Transport errors after the handshake are reported, not thrown.
      connection.on('error', err => {
        if (!exiting) log('connection error:', err && err.message);
      });
    }
    if (error) {
      this.step(stepName, failure(error), expect);
      return { error, connection };
    }
    this.step(
      stepName,
      success({
        session: session ? session.id : connection.session && connection.session.id,
        username: connection.username,
      }),
      expect
    );
    return { connection, session };
  }

  // Like open() but a failed handshake aborts the scenario.
  async mustOpen(options = {}) {
    const result = await this.open({ expect: expectOk(), ...options });
    if (!result.connection || result.error) {
      throw new Error('handshake failed');
    }
    return result.connection;
  }

  call(connection, iface, method, args) {
    return new Promise(resolve => {
      connection.callMethod(iface, method, args, (error, ...results) => {
        resolve(error ? failure(error) : success(results));
      });
    });
  }

  inspect(connection, iface) {
    return new Promise(resolve => {
      connection.inspectInterface(iface, (error, proxy) => {
        resolve(error ? failure(error) : success(proxyMethodNames(proxy)));
      });
    });
  }

  ping(connection) {
    return new Promise(resolve => connection.ping(() => resolve(success(null))));
  }

  // Resolves once predicate() is true, re-checking whenever poke() is called.
  waitUntil(predicate) {
    return new Promise(resolve => {
      if (predicate()) {
        resolve();
        return;
      }
      this._waiters = this._waiters || [];
      this._waiters.push({ predicate, resolve });
    });
  }

  poke() {
    if (!this._waiters) return;
    this._waiters = this._waiters.filter(waiter => {
      if (waiter.predicate()) {
        waiter.resolve();
        return false;
      }
      return true;
    });
  }

  // Closes every connection and waits (briefly) for them to finish so that
  // nothing queued is lost.
  async closeAll() {
    await Promise.all(
      this.connections.map(
        connection =>
          new Promise(resolve => {
            if (connection._closed && !connection.transport) {
              resolve();
              return;
            }
            const timer = setTimeout(resolve, 1000);
            connection.once('close', () => {
              clearTimeout(timer);
              resolve();
            });
            try {
              if (connection._closed) {
                clearTimeout(timer);
                resolve();
              } else {
                connection.close();
              }
            } catch (error) {
              clearTimeout(timer);
              resolve();
            }
          })
      )
    );
  }

  // Watches one connection's received remote events.
  collectEvents(connection, onEvent, { quiet = false } = {}) {
    connection.on('event', (iface, event, args) => {
      if (!quiet) this.step('event', success({ iface, event, args }));
      onEvent(iface, event, args);
      this.poke();
    });
  }
}

// Each scenario is an async function (run, opts, connection helpers) that
// prints steps. Add new ones here.
const SCENARIOS = {
  // Anonymous handshake, the fixture's methods, errors, inspect, ping.
  async basic(run) {
    const c = await run.mustOpen();
    const call = (name, iface, method, args, expect) =>
      run.call(c, iface, method, args).then(o => run.step(name, o, expect));
    await call('answer', 'calculator', 'answer', [], expectResult([42]));
    await call('divide', 'calculator', 'divide', [20, 10], expectResult([2]));
    await call('divideByZero', 'calculator', 'divide', [1, 0],
      o => !o.ok && o.error.code === 1 && /Zero division/.test(o.error.message));
    await call('doNothing', 'calculator', 'doNothing', [], expectResult([]));
    await call('sayHi', 'someService', 'sayHi', ['Rust'], expectResult(['Hi, Rust!']));
    await call('say', 'someService', 'say', ['hello'], expectResult(['hello']));
    // A JS string may hold a lone surrogate; it must come back as the same UTF-16 code units
    // (printed as numbers: JSON readers refuse a lone surrogate escape).
    const units = s => Array.from({ length: s.length }, (_, i) => s.charCodeAt(i));
    const lone = await run.call(c, 'someService', 'say', ['\ud800x']);
    run.step('sayLoneSurrogate',
      lone.ok ? { ok: true, result: lone.result.map(v => typeof v === 'string' ? units(v) : v) } : lone,
      expectResult([[0xd800, 0x78]]));
    const nested = { list: [1, 'two', null, true], text: 'it\'s "quoted"', n: -1.5 };
    await call('method', 'someOtherService', 'method', [nested], expectResult([nested]));
    await call('otherMethod', 'someOtherService', 'otherMethod', [], expectResult([]));
    await call('unknownInterface', '__nonexistent_interface__', '__nonexistent_method__', [],
      expectCode(jstp.ERR_INTERFACE_NOT_FOUND));
    await call('unknownMethod', 'calculator', '__nonexistent_method__', [],
      expectCode(jstp.ERR_METHOD_NOT_FOUND));
    run.step('inspectCalculator', await run.inspect(c, 'calculator'),
      expectResult(['answer', 'divide', 'doNothing']));
    run.step('inspectSomeService', await run.inspect(c, 'someService'),
      expectResult(['sayHi', 'say']));
    run.step('inspectUnknown', await run.inspect(c, '__nonexistent_interface__'),
      expectCode(jstp.ERR_INTERFACE_NOT_FOUND));
    run.step('ping', await run.ping(c), expectOk());
  },

  // Login handshake (--user, --password; defaults login/password).
  async login(run, opts) {
    const user = opts.get('user', 'login');
    const password = opts.get('password', 'password');
    const c = await run.mustOpen({
      user,
      password,
      expect: o => o.ok && o.result.username === user,
    });
    run.step('answer', await run.call(c, 'calculator', 'answer', []), expectResult([42]));
  },

  // Login with wrong credentials: expects error 11.
  async badlogin(run, opts) {
    await run.open({
      user: opts.get('user', 'login'),
      password: opts.get('password', 'wrong password'),
      expect: expectCode(jstp.ERR_AUTH_FAILED),
    });
  },

  // Handshake to an application that does not exist: expects error 10.
  async unknownapp(run, opts) {
    await run.open({
      app: opts.get('app', '__nonexistent_app__'),
      expect: expectCode(jstp.ERR_APP_NOT_FOUND),
    });
  },

  // Handshake with --app (e.g. 'testApp@^1.0.0') then version.get.
  // --expect VERSION checks the result; --expect CODE (a number) expects the
  // handshake to fail with that code.
  async version(run, opts) {
    const wanted = opts.get('expect');
    const wantedCode = wanted !== undefined && /^-?\d+$/.test(wanted) ? Number(wanted) : null;
    const { connection } = await run.open({
      app: opts.get('app', 'testApp@^1.0.0'),
      expect: wanted === undefined ? undefined
        : wantedCode !== null ? expectCode(wantedCode) : expectOk(),
    });
    if (!connection || !connection.handshakeDone) return;
    run.step('version', await run.call(connection, 'version', 'get', []),
      wanted === undefined || wantedCode !== null ? undefined : expectResult([wanted]));
  },

  // Chat: optionally send --send TEXT (--via call|event, default call) and
  // wait for --expect N chat.message events (default 1; 0 = don't wait);
  // with --match TEXT only messages carrying that text count. Every event
  // received is printed as an "event" step.
  async events(run, opts) {
    const c = await run.mustOpen();
    const expected = opts.int('expect', 1);
    const match = opts.get('match');
    let received = 0;
    run.collectEvents(c, (iface, event, args) => {
      if (iface !== 'chat' || event !== 'message') return;
      if (match === undefined || args[1] === match) received++;
    });
    if (opts.has('send')) {
      const text = opts.get('send');
      if (opts.get('via', 'call') === 'event') {
        c.emitRemoteEvent('chat', 'send', [text]);
        run.step('send', success(null));
      } else {
        run.step('send', await run.call(c, 'chat', 'send', [text]), expectResult([]));
      }
    }
    await run.waitUntil(() => received >= expected);
  },

  // Emits events.<--event NAME>(...--args JSON) and waits for the server's
  // echo events.echo(NAME, ...args).
  async echo(run, opts) {
    const c = await run.mustOpen();
    const name = opts.get('event', 'hello');
    const args = opts.json('args', ['from node', 1, { nested: [true, null] }]);
    let echo = null;
    run.collectEvents(c, (iface, event, eventArgs) => {
      if (iface === 'events' && event === 'echo' && eventArgs[0] === name) {
        echo = eventArgs;
      }
    });
    c.emitRemoteEvent('events', name, args);
    run.step('emit', success({ iface: 'events', event: name, args }));
    await run.waitUntil(() => echo !== null);
    run.step('echo', success(echo), expectResult([name, ...args]));
  },

  // Asks the server (control.emit) to send us --iface/--event/--args and
  // waits for it.
  async 'server-events'(run, opts) {
    const c = await run.mustOpen();
    const iface = opts.get('iface', 'events');
    const name = opts.get('event', 'notice');
    const args = opts.json('args', ['from server', 2]);
    let got = null;
    run.collectEvents(c, (i, e, a) => {
      if (i === iface && e === name) got = a;
    });
    run.step('request', await run.call(c, 'control', 'emit', [iface, name, args]),
      expectResult([]));
    await run.waitUntil(() => got !== null);
    run.step('received', success(got), expectResult(args));
  },

  // Offers clientIface { echo(x) -> x, add(a, b) -> a + b } to the server and
  // prints every call it serves ("served" steps). Ends after --expect N
  // served calls or when the server closes. --trigger makes the client ask
  // the server (control.*) to inspect and call it.
  async 'serve-client'(run, opts) {
    let served = 0;
    let closed = false;
    const record = (method, args) => {
      served++;
      run.step('served', success({ iface: 'clientIface', method, args }));
      setImmediate(() => run.poke());
    };
    const application = new jstp.Application('tetherPeerClient', {
      clientIface: {
        echo(connection, value, callback) {
          record('echo', [value]);
          callback(null, value);
        },
        add(connection, a, b, callback) {
          record('add', [a, b]);
          callback(null, a + b);
        },
      },
    });
    const c = await run.mustOpen({ client: { application } });
    c.on('close', () => {
      closed = true;
      if (!c.closedIntentionally) run.step('close', success(null));
      run.poke();
    });
    const expected = opts.has('expect') ? opts.int('expect') : null;
    if (opts.has('trigger')) {
      const control = (name, args, expect) =>
        run.call(c, 'control', name, args).then(o => run.step(name, o, expect));
      await control('inspectClient', ['clientIface'], expectResult([['echo', 'add']]));
      await control('callClient', ['clientIface', 'echo', ['ping']], expectResult(['ping']));
      await control('callClient', ['clientIface', 'add', [2, 3]], expectResult([5]));
      await control('callClient', ['clientIface', 'nope', []],
        expectCode(jstp.ERR_METHOD_NOT_FOUND));
      await control('callClient', ['noIface', 'nope', []],
        expectCode(jstp.ERR_INTERFACE_NOT_FOUND));
      await control('ping', [], expectResult([]));
    }
    await run.waitUntil(() => closed || (expected !== null && served >= expected));
  },

  // Client heartbeat every --interval MS (default 100; 0 = off). Prints
  // ping-sent / pong / ping-received / pong-sent / heartbeat steps; ends
  // after --expect N pongs (default 3) and --expect-pings M pings received
  // from the server (default 0).
  async heartbeat(run, opts) {
    const interval = opts.int('interval', 100);
    const wantPongs = opts.int('expect', 3);
    const wantPings = opts.int('expect-pings', 0);
    let pongs = 0;
    let pings = 0;
    const c = await run.mustOpen({
      client: interval > 0 ? { heartbeatInterval: interval } : {},
    });
    c.on('outgoingMessage', message => {
      const kind = Object.keys(message)[0];
      if (kind === 'ping') run.step('ping-sent', success({ id: message.ping[0] }));
      if (kind === 'pong') run.step('pong-sent', success({ id: message.pong[0] }));
    });
    c.on('incomingMessage', message => {
      const kind = Object.keys(message)[0];
      if (kind === 'pong') {
        pongs++;
        run.step('pong', success({ id: message.pong[0] }));
      } else if (kind === 'ping') {
        pings++;
        run.step('ping-received', success({ id: message.ping[0] }));
      }
      setImmediate(() => run.poke());
    });
    c.on('heartbeat', () => run.step('heartbeat', success(null)));
    await run.waitUntil(() => pongs >= wantPongs && pings >= wantPings);
    c.stopHeartbeat();
  },

  // Session restore: call, drop the transport, make a call while offline,
  // let jstp reconnect with the session, check the buffered call is answered
  // exactly once and the session id is kept.
  async restore(run) {
    let reconnected = null;
    // jstp's reconnect takes the transport name (wss reconnects through
    // 'ws') and the connect arguments; pass fresh ones (see parseTarget).
    const transportName = run.target.kind === 'wss' ? 'ws' : run.target.kind;
    const client = {
      reconnector: (connection, reconnectFn) => {
        if (connection.closedIntentionally) return;
        setTimeout(() => reconnectFn(transportName, ...run.target.args()), 100);
      },
    };
    const c = await run.mustOpen({ client });
    const sessionId = c.session.id;
    c.on('reconnect', error => {
      reconnected = error ? failure(error) : success(null);
      run.poke();
    });
    run.step('answer', await run.call(c, 'calculator', 'answer', []), expectResult([42]));
    await new Promise(resolve => {
      c.once('close', resolve);
      dropTransport(c);
    });
    run.step('drop', success(null));
    const offline = run.call(c, 'someService', 'say', ['offline']);
    await run.waitUntil(() => reconnected !== null);
    run.step('reconnect', reconnected, expectOk());
    run.step('bufferedCall', await offline, expectResult(['offline']));
    run.step('answerAfter', await run.call(c, 'calculator', 'answer', []), expectResult([42]));
    run.step('sameSession', success(c.session.id), expectResult(sessionId));
  },

  // Pipelining: --calls N calls someService.say(i) without waiting and prints
  // the order their callbacks arrived in ("callbacks"); then --chat M chat.send
  // calls of 'p<i>' without waiting, and prints the order this client's own
  // chat.message events arrived in ("chat"), once all M are in.
  async pipeline(run, opts) {
    const c = await run.mustOpen();
    const calls = opts.int('calls', 4);
    const first = opts.int('first', 100);
    const order = [];
    await Promise.all(Array.from({ length: calls }, (_, k) =>
      run.call(c, 'someService', 'say', [first + k]).then(o => {
        order.push(o.ok ? o.result[0] : o);
      })));
    run.step('callbacks', success(order));
    const chat = opts.int('chat', 0);
    if (chat === 0) return;
    const seen = [];
    run.collectEvents(c, (iface, event, args) => {
      if (iface === 'chat' && event === 'message' && /^p\d+$/.test(args[1])) {
        seen.push(Number(args[1].slice(1)));
      }
    }, { quiet: true });
    const answers = await Promise.all(Array.from({ length: chat }, (_, i) =>
      run.call(c, 'chat', 'send', [`p${i}`])));
    run.step('sent', success(answers.filter(o => o.ok).length), expectResult(chat));
    await run.waitUntil(() => seen.length >= chat);
    run.step('chat', success(seen));
  },

  // No handshake: connect a raw socket / WebSocket, send every --send TEXT
  // (sockets: NUL appended unless --no-nul; WS: one text message each) and
  // every --send-hex HEX (raw bytes / one binary message) in argv order,
  // --delay MS apart. Prints "frame" steps for what arrives (split on NUL
  // for sockets), then "close". Ends on close, after --expect N frames, or
  // after --wait MS (default 5000; prints a "wait-elapsed" step).
  raw: runRaw,
};

async function runRaw(run, opts) {
  const target = run.target;
  const delay = opts.int('delay', 0);
  const expected = opts.has('expect') ? opts.int('expect') : null;
  const waitMs = opts.int('wait', 5000);
  const sends = opts.ordered.filter(([name]) => name === 'send' || name === 'send-hex');
  let frames = 0;
  let finished = false;
  const frame = text => {
    frames++;
    run.step('frame', success(text));
    run.poke();
  };

  let sendOne;
  let closeIt;
  let closed = false;

  if (target.raw === 'ws' || target.raw === 'wss') {
    const protocols = opts.has('no-protocol') ? [] : [opts.get('protocol', 'metarhia-jstp')];
    const wsClient = new WebSocketClient(
      target.raw === 'wss' ? { tlsOptions: { rejectUnauthorized: false } } : {}
    );
    const connection = await new Promise(resolve => {
      wsClient.once('connect', resolve);
      wsClient.once('connectFailed', error => {
        run.step('connect', failure(error));
        resolve(null);
      });
      wsClient.connect(target.url, protocols);
    });
    if (!connection) return;
    run.step('connect', success({ protocol: connection.protocol || null }));
    connection.on('message', message => {
      if (message.type === 'utf8') frame(message.utf8Data);
      else frame({ binary: message.binaryData.toString('hex') });
    });
    connection.on('error', error => run.step('error', failure(error)));
    connection.on('close', (code, reason) => {
      closed = true;
      run.step('close', success({ code, reason: reason || '' }));
      run.poke();
    });
    sendOne = ([name, value]) => {
      if (name === 'send') connection.sendUTF(value);
      else connection.sendBytes(Buffer.from(value, 'hex'));
    };
    closeIt = () => connection.close();
  } else {
    const socket = await new Promise(resolve => {
      let s;
      const onError = error => {
        run.step('connect', failure(error));
        resolve(null);
      };
      if (target.raw === 'tls') {
        s = tls.connect({ host: target.host, port: target.port, rejectUnauthorized: false },
          () => {
            s.removeListener('error', onError);
            resolve(s);
          });
      } else {
        s = target.raw === 'unix' ? net.connect(target.path) : net.connect(target.port, target.host);
        s.once('connect', () => {
          s.removeListener('error', onError);
          resolve(s);
        });
      }
      s.once('error', onError);
    });
    if (!socket) return;
    run.step('connect', success(null));
    const decoder = new StringDecoder('utf8');
    let buffer = '';
    socket.on('data', chunk => {
      buffer += decoder.write(chunk);
      let index;
      while ((index = buffer.indexOf('\0')) !== -1) {
        const text = buffer.slice(0, index);
        buffer = buffer.slice(index + 1);
        frame(text);
      }
    });
    socket.on('error', error => run.step('error', failure(error)));
    socket.on('close', hadError => {
      buffer += decoder.end();
      if (buffer.length > 0) run.step('partial', success(buffer));
      closed = true;
      run.step('close', success({ hadError }));
      run.poke();
    });
    const nul = !opts.has('no-nul');
    sendOne = ([name, value]) => {
      if (name === 'send') socket.write(nul ? value + '\0' : value);
      else socket.write(Buffer.from(value, 'hex'));
    };
    closeIt = () => socket.end();
  }

  for (const item of sends) {
    if (delay > 0) await new Promise(resolve => setTimeout(resolve, delay));
    if (closed) break;
    sendOne(item);
  }
  const timer = setTimeout(() => {
    if (!finished) run.step('wait-elapsed', success(waitMs));
    finished = true;
    run.poke();
  }, waitMs);
  await run.waitUntil(() => finished || closed || (expected !== null && frames >= expected));
  finished = true;
  clearTimeout(timer);
  if (!closed) {
    closeIt();
    await Promise.race([
      run.waitUntil(() => closed),
      new Promise(resolve => setTimeout(resolve, 1000)),
    ]);
  }
}

const runClient = async opts => {
  const [url, scenarioName] = opts.positional;
  if (!url || !scenarioName) throw new Error('client needs URL and SCENARIO');
  const scenario = SCENARIOS[scenarioName];
  if (!scenario) {
    throw new Error(`unknown scenario '${scenarioName}' (have: ${Object.keys(SCENARIOS).join(', ')})`);
  }
  const target = parseTarget(url);
  const run = new ClientRun(target, opts);

  const timeoutMs = Math.max(opts.int('timeout', 10000),
    scenarioName === 'raw' ? opts.int('wait', 5000) + 3000 : 0);
  const timer = setTimeout(() => {
    fatal(`scenario '${scenarioName}' timed out after ${timeoutMs} ms`);
  }, timeoutMs);
  timer.unref();

  process.on('uncaughtException', error => {
    log('uncaught exception:', error);
    fatal(`uncaught exception: ${error && error.message}`);
  });

  try {
    await scenario(run, opts);
  } catch (error) {
    log('scenario failed:', error);
    await run.closeAll().catch(() => {});
    fatal(error && error.message ? error.message : String(error));
    return;
  }
  await run.closeAll();
  clearTimeout(timer);
  out({ done: true });
  exit(opts.has('strict') && run.failures > 0 ? 1 : 0);
};

// ================================================================ main

const main = () => {
  const [mode, ...rest] = process.argv.slice(2);
  let opts;
  try {
    opts = parseArgs(rest);
  } catch (error) {
    fatal(error.message);
    return;
  }
  const usage = USAGE.replace('%SCENARIOS%', Object.keys(SCENARIOS).join(', '));
  if (!mode || mode === '--help' || opts.has('help')) {
    process.stderr.write(usage + '\n');
    exit(mode ? 0 : 2);
    return;
  }
  watchParent();
  try {
    if (mode === 'server') runServer(opts);
    else if (mode === 'client') {
      runClient(opts).catch(error => fatal(error.message));
    } else {
      process.stderr.write(usage + '\n');
      fatal(`unknown mode '${mode}'`);
    }
  } catch (error) {
    log(error);
    fatal(error.message);
  }
};

main();

#!/usr/bin/env bash
# Self-test of the Node interop peer: jstp-peer.js as a client against
# jstp-peer.js as a server (both the real @metarhia/jstp 2.3.0) over TCP, TLS,
# WebSocket, secure WebSocket and a Unix socket, every scenario.
# Needs: node, openssl, and `npm ci --ignore-scripts` done in interop/.
# Exits non-zero on the first failure, after printing the outputs involved.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
peer="$here/jstp-peer.js"

if [ ! -d node_modules/@metarhia/jstp ]; then
  echo "selftest: interop/node_modules is missing; run 'npm ci --ignore-scripts' in interop/" >&2
  exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/jstp-peer-selftest.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# Throwaway self-signed certificate (never committed).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" >/dev/null 2>&1

failures=0
runs=0
seq_no=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# start_server NAME ARGS... : starts a peer server, waits for its ready line
# and leaves it in $tmp/NAME.out.
start_server() {
  local name="$1"
  shift
  node "$peer" server "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
  pids+=("$!")
  for _ in $(seq 1 100); do
    if grep -q '"ready":true' "$tmp/$name.out" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "selftest: server $name did not become ready" >&2
  cat "$tmp/$name.out" "$tmp/$name.err" >&2
  exit 1
}

# field FILE KEY : a field of the ready line.
field() {
  node -e '
    const lines = require("fs").readFileSync(process.argv[1], "utf8").split("\n");
    const ready = lines.filter(Boolean).map(l => JSON.parse(l)).find(o => o.ready);
    process.stdout.write(String(ready[process.argv[2]]));
  ' "$1" "$2"
}

# check FILE [REGEX...] : every line is JSON, the last line is {"done":true},
# no step has "pass":false and every REGEX matches some line.
check() {
  node -e '
    const [file, ...patterns] = process.argv.slice(1);
    const lines = require("fs").readFileSync(file, "utf8").split("\n");
    if (lines.pop() !== "") throw new Error("output does not end with a newline");
    for (const line of lines) JSON.parse(line);
    if (lines[lines.length - 1] !== "{\"done\":true}") throw new Error("no done line at the end");
    const bad = lines.filter(l => l.includes("\"pass\":false"));
    if (bad.length) throw new Error("failed steps:\n" + bad.join("\n"));
    for (const p of patterns) {
      if (!lines.some(l => new RegExp(p).test(l))) throw new Error("no line matches " + p);
    }
  ' "$@"
}

# client LABEL URL SCENARIO [ARGS...] -- [REGEX...] : runs one scenario with
# --strict and checks its output.
client() {
  local label="$1" url="$2"
  shift 2
  local args=() patterns=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  patterns=("$@")
  seq_no=$((seq_no + 1))
  local outf="$tmp/client-${BASHPID}-$seq_no.out"
  local rc=0
  node "$peer" client "$url" "${args[@]}" --strict >"$outf" 2>"$outf.err" || rc=$?
  local why=""
  if [ "$rc" -ne 0 ]; then
    why="exit code $rc"
  elif ! why="$(check "$outf" "${patterns[@]+"${patterns[@]}"}" 2>&1)"; then
    :
  else
    why=""
  fi
  if [ -n "$why" ]; then
    fail "$label: ${args[*]} ($url): $why"
    sed 's/^/    out: /' "$outf" >&2
    sed 's/^/    err: /' "$outf.err" >&2
  else
    echo "ok   $label: ${args[*]}"
  fi
  [ "$BASHPID" = "$$" ] && runs=$((runs + 1))
  return 0
}

start_server main --tcp 0 --tls 0 --ws 0 --wss 0 --unix "$tmp/peer.sock" \
  --cert "$tmp/cert.pem" --key "$tmp/key.pem" --login login:password
ready="$tmp/main.out"
declare -A urls=(
  [tcp]="jstp://127.0.0.1:$(field "$ready" tcp)"
  [tls]="jstps://127.0.0.1:$(field "$ready" tls)"
  [ws]="ws://127.0.0.1:$(field "$ready" ws)"
  [wss]="wss://127.0.0.1:$(field "$ready" wss)"
  [unix]="unix:$(field "$ready" unix)"
)

# Every scenario over one transport; the five transports run in parallel,
# each into its own log.
transport_suite() {
  local t="$1" u="$2"
  client "$t" "$u" basic
  client "$t" "$u" login --user login --password password -- '"username":"login"'
  client "$t" "$u" badlogin --user login --password nope
  client "$t" "$u" unknownapp
  client "$t" "$u" version --app 'testApp@^1.0.0' --expect 1.0.0
  client "$t" "$u" version --app 'testApp@1' --expect 1.0.0
  client "$t" "$u" version --app 'testApp@>1.0.0' --expect 2.0.0
  client "$t" "$u" version --app 'testApp' --expect 2.0.0
  client "$t" "$u" version --app 'testApp@9999' --expect 10
  client "$t" "$u" events --send "hello over $t" --match "hello over $t" -- '"event":"message","args":\[null,"hello over '"$t"'"\]'
  client "$t" "$u" events --send "event over $t" --match "event over $t" --via event -- '"args":\[null,"event over '"$t"'"\]'
  client "$t" "$u" echo
  client "$t" "$u" echo --event custom --args '["a",{"b":[1,2]}]'
  client "$t" "$u" server-events
  client "$t" "$u" serve-client --trigger --expect 2 -- '"step":"served".*"method":"echo"' '"step":"served".*"method":"add"'
  client "$t" "$u" heartbeat --interval 50 --expect 3 -- '"step":"pong"'
  client "$t" "$u" restore
  client "$t" "$u" raw --send "{handshake:[0,'testApp']}" --expect 1 -- '"result":"\{handshake:\[0\],ok:'"'"
  client "$t" "$u" raw --send "{handshake:[0,'__nope__']}" -- '"result":"\{handshake:\[0\],error:\[10\]\}"' '"step":"close"'
  client "$t" "$u" raw --send "{call:[1,'calculator'],answer:[]}" -- '"step":"close"'
  client "$t" "$u" raw --send "not a message" -- '"step":"close"'
  [ "$failures" -eq 0 ]
}

suites=()
for t in tcp tls ws wss unix; do
  (transport_suite "$t" "${urls[$t]}") >"$tmp/suite-$t.log" 2>&1 &
  suites+=("$t:$!")
done
for entry in "${suites[@]}"; do
  t="${entry%%:*}"
  rc=0
  wait "${entry#*:}" || rc=$?
  cat "$tmp/suite-$t.log"
  runs=$((runs + $(grep -c '^ok \|^FAIL:' "$tmp/suite-$t.log" || true)))
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
done

# The WebSocket server refuses a client that does not offer metarhia-jstp.
client ws "${urls[ws]}" raw --no-protocol -- '"step":"connect","ok":false'

# A chat message reaches clients on other transports.
listener_out="$tmp/listener.out"
node "$peer" client "${urls[tcp]}" events --expect 3 --strict >"$listener_out" 2>"$tmp/listener.err" &
listener=$!
pids+=("$listener")
for _ in $(seq 1 100); do
  grep -q '"step":"handshake"' "$listener_out" 2>/dev/null && break
  sleep 0.1
done
client ws "${urls[ws]}" events --send "from ws" --match "from ws"
client wss "${urls[wss]}" events --send "from wss" --match "from wss"
client unix "${urls[unix]}" events --send "from unix" --match "from unix"
rc=0
wait "$listener" || rc=$?
if [ "$rc" -ne 0 ] || ! why="$(check "$listener_out" '"from ws"' '"from wss"' '"from unix"' 2>&1)"; then
  fail "broadcast listener (exit $rc): ${why:-}"
  sed 's/^/    out: /' "$listener_out" >&2
else
  echo "ok   broadcast across transports"
fi

# A silent connection is closed by the 3 s handshake timeout.
client tcp "${urls[tcp]}" raw --wait 6000 -- '"step":"close"'
if grep -q '"event":"handshakeTimeout".*"alreadyClosed":false' "$ready"; then
  echo "ok   server reported handshakeTimeout"
else
  fail "server did not report a handshake timeout"
fi

# Server-side heartbeat reaches the client.
start_server hb --tcp 0 --ws 0 --heartbeat 50
client tcp "jstp://127.0.0.1:$(field "$tmp/hb.out" tcp)" heartbeat --interval 0 --expect 0 --expect-pings 2 -- '"step":"ping-received"' '"step":"pong-sent"'
client ws "ws://127.0.0.1:$(field "$tmp/hb.out" ws)" heartbeat --interval 0 --expect 0 --expect-pings 2 -- '"step":"ping-received"'

# The servers' own output: valid JSON lines, nothing crashed.
for s in main hb; do
  if ! node -e '
      const lines = require("fs").readFileSync(process.argv[1], "utf8").split("\n").filter(Boolean);
      for (const l of lines) JSON.parse(l);
      if (lines.some(l => l.includes("uncaughtException") || l.includes("fatal"))) process.exit(1);
    ' "$tmp/$s.out"; then
    fail "server $s output"
    sed 's/^/    out: /' "$tmp/$s.out" >&2
    sed 's/^/    err: /' "$tmp/$s.err" >&2
  fi
done

echo "selftest: $runs client runs, $failures failure(s)"
[ "$failures" -eq 0 ]

#!/usr/bin/env bash
# Server cost per call, measured as users would: one external `tether bench --target` client
# (16 calls in flight on one connection, someService.sayHi with a 16-character string) pointed
# in turn at a floor responder, Node 20 + @metarhia/jstp 2.3.0 (interop/bench-server.js) and
# `tether serve`, over TCP and WS, ROUNDS times. Each line is the server process's CPU time per
# call (utime + stime over the calls answered); then memory per idle connection (--idle N).
# Compare the ratios printed at the end, not the absolute numbers.
#   bash benches/servers.sh [ROUNDS] [SECONDS] [IDLE]
# Needs a release build (cargo build --release -p tether-cli) and `npm ci` in interop/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${TETHER_BIN:-$root/target/release/tether}"
rounds="${1:-3}"
secs="${2:-3}"
idle="${3:-2000}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start() { # start CMD... ; prints "PID READYLINE" (runs in a subshell: the caller records PID)
  local out; out="$(mktemp)"
  "$@" >"$out" 2>/dev/null &
  local pid=$!
  for _ in $(seq 1 200); do [ -s "$out" ] && break; sleep 0.05; done
  echo "$pid $(head -n1 "$out")"
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])$2)" "$1"; }

read -r fpid fready < <(start "$bin" bench --floor 127.0.0.1:0)
pids+=("$fpid")
read -r npid nready < <(start node "$root/interop/bench-server.js")
pids+=("$npid")
read -r tpid tready < <(start "$bin" serve --tcp 127.0.0.1:0 --ws 127.0.0.1:0)
pids+=("$tpid")
floor="jstp://$(field "$fready" "['floor']")"
node_tcp="jstp://127.0.0.1:$(field "$nready" "['tcp']")"
node_ws="ws://127.0.0.1:$(field "$nready" "['ws']")"
tether_tcp="jstp://$(field "$tready" "['tcp'][0]")"
tether_ws="ws://$(field "$tready" "['ws'][0]")"

measure() { # URL PID → the JSON line
  "$bin" bench --target "$1" --server-pid "$2" --duration "$secs" --in-flight 16 --payload 16
}
for r in $(seq 1 "$rounds"); do
  measure "$floor" "$fpid" | sed "s/^/{\"round\":$r,\"server\":\"floor\"} /"
  measure "$node_tcp" "$npid" | sed "s/^/{\"round\":$r,\"server\":\"node\"} /"
  measure "$tether_tcp" "$tpid" | sed "s/^/{\"round\":$r,\"server\":\"tether\"} /"
  measure "$node_ws" "$npid" | sed "s/^/{\"round\":$r,\"server\":\"node\"} /"
  measure "$tether_ws" "$tpid" | sed "s/^/{\"round\":$r,\"server\":\"tether\"} /"
done
"$bin" bench --target "$tether_tcp" --idle "$idle" --server-pid "$tpid"
"$bin" bench --target "$tether_ws" --idle "$idle" --server-pid "$tpid"

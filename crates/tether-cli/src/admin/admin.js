// The admin page: one snapshot a second over server-sent events from tether itself; rates and
// charts are computed here from consecutive snapshots (5 minutes of history, 300 points).
"use strict";
const HISTORY = 300;
const history = [];
const token = new URLSearchParams(location.search).get("token");
const suffix = token ? "?token=" + encodeURIComponent(token) : "";

function set(id, value) {
  document.getElementById(id).textContent = String(value);
}

function rows(id, items, cells) {
  const body = document.getElementById(id);
  body.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const c of cells(item)) {
      const td = document.createElement("td");
      td.textContent = String(c);
      tr.append(td);
    }
    return tr;
  }));
}

function chart(id, values) {
  // One rate is still a line (a flat one), so the chart shows from the second snapshot on.
  if (values.length === 1) values = [values[0], values[0]];
  const max = Math.max(1, ...values);
  const step = 300 / Math.max(1, HISTORY - 1);
  const offset = HISTORY - values.length;
  const points = values.map((v, i) =>
    ((offset + i) * step).toFixed(1) + "," + (58 - (v / max) * 56).toFixed(1));
  document.querySelector("#" + id + " polyline").setAttribute("points", points.join(" "));
}

function rate(key) {
  if (history.length < 2) return 0;
  const a = history[history.length - 2];
  const b = history[history.length - 1];
  const seconds = Math.max(0.001, (b.t - a.t) / 1000);
  return Math.max(0, (key(b) - key(a)) / seconds);
}

function show(s) {
  history.push(s);
  if (history.length > HISTORY) history.shift();
  const events = (x) => x.events_sent + x.events_received;
  set("connections", s.connections);
  set("clients", s.clients);
  set("calls", s.calls);
  set("call-errors", s.call_errors);
  set("calls-rate", rate((x) => x.calls).toFixed(1));
  set("events", events(s));
  set("events-rate", rate(events).toFixed(1));
  set("sessions-started", s.sessions.started);
  set("sessions-detached", s.sessions.detached);
  set("sessions-restored", s.sessions.restored);
  set("sessions-expired", s.sessions.expired);
  set("store-ops", s.store.operations);
  set("store-errors", s.store.errors);
  set("slow", s.slow_consumers);
  const rates = (key) => history.slice(1).map((b, i) =>
    Math.max(0, (key(b) - key(history[i])) / Math.max(0.001, (b.t - history[i].t) / 1000)));
  chart("calls-chart", rates((x) => x.calls));
  chart("events-chart", rates(events));
  rows("listeners", s.listeners, (l) => [l.kind, l.addr, l.clients]);
  rows("transports", s.transports, (t) => [t.transport, t.protocol, t.open, t.opened]);
  const list = document.getElementById("errors");
  list.replaceChildren(...s.errors.map((e) => {
    const li = document.createElement("li");
    li.textContent = new Date(e.t).toISOString() + " " + e.message;
    return li;
  }));
  const status = document.getElementById("status");
  status.textContent = s.ready ? "ready" : "not ready";
  status.className = "status live";
  document.body.dataset.updated = String(s.t);
}

const source = new EventSource("events" + suffix);
source.onmessage = (m) => show(JSON.parse(m.data));
source.onerror = () => {
  const status = document.getElementById("status");
  status.textContent = "disconnected, retrying";
  status.className = "status down";
};

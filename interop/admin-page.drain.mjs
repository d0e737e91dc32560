// The operating guide's graceful restart with a real @metarhia/jstp 2.3.0 client, for
// crates/tether-cli/tests/admin_cli.rs (beside admin-page.mjs, the admin page's driver).
//
//   node admin-page.drain.mjs PORT
//
// Connects to jstp://127.0.0.1:PORT (testApp) with a reconnector that retries every 100 ms,
// calls calculator.answer and prints {"step":"connected","session":ID}. On a stdin line (the
// node it talked to was SIGTERMed and has exited) it calls chat.send('during the restart')
// with no node up and prints {"step":"queued"}; once jstp has reconnected and restored the
// session (on whatever node now listens on PORT) it prints {"step":"reconnected","error":E},
// then {"step":"call","ok":B} when the queued call is answered, {"step":"event"} when the
// broadcast it caused arrives, and {"step":"done","session":ID} before exiting 0. Anything
// unexpected prints {"error":...} and exits 1; the test's deadlines bound every wait.
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(import.meta.url);
const jstp = require("@metarhia/jstp");
const port = Number(process.argv[2]);
const out = (line) => console.log(JSON.stringify(line));
const fail = (error) => {
  out({ error: String(error && error.message ? error.message : error) });
  process.exit(1);
};

const client = {
  connectPolicy: new jstp.SimpleConnectPolicy(),
  reconnector: (connection, reconnectFn) => {
    if (connection.closedIntentionally) return;
    // A node may not listen yet: jstp calls the reconnector again after each failure.
    setTimeout(() => reconnectFn("net", port, "127.0.0.1"), 100);
  },
};

jstp.net.connect("testApp", client, port, "127.0.0.1", (error, connection, session) => {
  if (error) return fail(error);
  const sessionId = session.id;
  let sawEvent = false;
  let answered = null;
  const finish = () => {
    if (!sawEvent || answered === null) return;
    out({ step: "done", session: connection.session.id });
    connection.close();
    process.exit(0);
  };
  connection.on("error", () => {});
  connection.on("event", (iface, event, args) => {
    if (iface === "chat" && event === "message" && args.includes("during the restart")) {
      sawEvent = true;
      out({ step: "event" });
      finish();
    }
  });
  connection.on("reconnect", (err) =>
    out({ step: "reconnected", error: err ? String(err.message || err) : null }),
  );
  connection.callMethod("calculator", "answer", [], (err, value) => {
    if (err || value !== 42) return fail(err || `answer ${value}`);
    out({ step: "connected", session: sessionId });
    const lines = readline.createInterface({ input: process.stdin });
    lines.once("line", () => {
      connection.callMethod("chat", "send", ["during the restart"], (err) => {
        answered = !err;
        out({ step: "call", ok: !err, error: err ? String(err.message || err) : null });
        finish();
      });
      out({ step: "queued" });
    });
  });
});

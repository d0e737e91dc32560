// Drives `tether serve --admin`'s page in headless Chromium over CDP (puppeteer-core), for
// crates/tether-cli/tests/admin_cli.rs.
//
//   node admin-page.mjs URL SCREENSHOT
//
// Protocol on stdio, one JSON line each: it loads URL and waits until the page has rendered a
// snapshot from the server, then prints {"stage":"rendered", ...figures}. It then reads lines
// from stdin, each {"calls":N,"clients":M}: it waits until the page shows at least those
// figures (updated by the page's own event stream), prints {"stage":"updated", ...figures},
// and after the last line saves a screenshot to SCREENSHOT and prints {"stage":"done"}.
// Every wait has a deadline (WAIT_MS); a miss prints {"error":...} and exits 1.
import puppeteer from "puppeteer-core";
import readline from "node:readline";

const [url, screenshot] = process.argv.slice(2);
const WAIT_MS = 20000;
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const fail = async (error) => {
  console.log(JSON.stringify({ error: String(error) }));
  await browser.close();
  process.exit(1);
};
const figures = (page) =>
  page.evaluate(() => {
    const n = (id) => Number(document.getElementById(id).textContent);
    return {
      calls: n("calls"),
      clients: n("clients"),
      connections: n("connections"),
      events: n("events"),
      status: document.getElementById("status").textContent,
      listeners: document.getElementById("listeners").rows.length,
      listenerClients: Number(document.getElementById("listeners").rows[0]?.cells[2]?.textContent),
      updated: document.body.dataset.updated || null,
    };
  });
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 800 });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url, { waitUntil: "load", timeout: WAIT_MS });
  await page.waitForFunction(() => document.body.dataset.updated, { timeout: WAIT_MS });
  console.log(JSON.stringify({ stage: "rendered", errors, ...(await figures(page)) }));
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const want = JSON.parse(line);
    await page.waitForFunction(
      (w) =>
        Number(document.getElementById("calls").textContent) >= w.calls &&
        Number(document.getElementById("clients").textContent) >= w.clients,
      { timeout: WAIT_MS },
      want,
    );
    console.log(JSON.stringify({ stage: "updated", errors, ...(await figures(page)) }));
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ stage: "done" }));
  await browser.close();
} catch (e) {
  await fail(e);
}

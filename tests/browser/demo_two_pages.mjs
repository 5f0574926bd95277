// Two real browser pages on the ndo demo (`ndo serve --websocket-port P --demo`): a stroke drawn
// and a message posted in page A (http://127.0.0.1:Q) appear in page B (http://localhost:Q),
// delivered by NATS (B's copy arrives as a `stroke`/`message` event on B's own WebSocket
// connection), a page opened afterwards loads both from the objects' history, and clear in B
// empties A's board. Used by tests/test_browser_demo.py.
//
// Usage: node demo_two_pages.mjs <demoUrl> <objectId> <chromiumPath> [timeoutMs]
// Drives headless Chromium through playwright-core (no browser download: the given binary, e.g.
// Debian's /usr/bin/chromium). Each page gets its own browser context (a fresh profile: no
// storage, cookies or BroadcastChannel shared with the other), so the only way from A to B is
// the server. Prints one line per check, then "RESULT ok" (exit 0) or "RESULT failed: ..."
// (exit 1). Every wait is bounded; the whole run is bounded by timeoutMs (default 60000).
import { chromium } from "playwright-core";

const [url, objectId, executablePath, timeoutArg] = process.argv.slice(2);
if (!url || !objectId || !executablePath) {
  console.log("RESULT failed: usage: node demo_two_pages.mjs <demoUrl> <objectId> <chromiumPath> [timeoutMs]");
  process.exit(2);
}
const TOTAL_MS = Number(timeoutArg ?? 60000);
const STEP_MS = Math.min(15000, TOTAL_MS);

const watchdog = setTimeout(() => {
  console.log(`RESULT failed: the run took over ${TOTAL_MS} ms`);
  process.exit(1);
}, TOTAL_MS);

function check(condition, what, detail = "") {
  if (!condition) throw new Error(`${what}${detail ? `: ${detail}` : ""}`);
  console.log(`ok   ${what}`);
}

const snapshot = (page) => page.evaluate(() => window.ndoDemo.snapshot());

async function open(browser, name, log, pageUrl = url) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.on("console", (m) => log.push(`${name} console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log.push(`${name} page error: ${e.message}`));
  page.on("requestfailed", (r) => log.push(`${name} request failed: ${r.url()} ${r.failure()?.errorText}`));
  await page.goto(`${pageUrl}#${objectId}`, { timeout: STEP_MS });
  await page.waitForFunction(() => window.ndoDemo?.ready || window.ndoDemo?.error, null, { timeout: STEP_MS });
  const state = await snapshot(page);
  check(state.ready && !state.error, `page ${name} (${new URL(pageUrl).host}) connected to object "${state.objectId}"`, state.error);
  return page;
}

async function main() {
  const log = [];
  const browser = await chromium.launch({
    executablePath,
    headless: true, // playwright adds --headless and a fresh --user-data-dir (a temporary profile)
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: STEP_MS,
  });
  try {
    console.log(`browser: ${browser.version()}`);
    const a = await open(browser, "A", log);
    // B comes from the page's other origin: ndo serve allows both for the WebSocket.
    const b = await open(browser, "B", log, url.replace("//127.0.0.1:", "//localhost:"));
    const [stateA, stateB] = [await snapshot(a), await snapshot(b)];
    check(stateA.clientId !== stateB.clientId, "A and B have NATS connections of their own",
      `${stateA.clientId} vs ${stateB.clientId}`);
    check(stateB.strokes.length === 0 && stateB.messages.length === 0, "B starts empty");

    // A stroke drawn with the mouse in A.
    const box = await a.locator("#canvas").boundingBox();
    await a.mouse.move(box.x + 60, box.y + 60);
    await a.mouse.down();
    for (let i = 1; i <= 10; i++) await a.mouse.move(box.x + 60 + i * 20, box.y + 60 + i * 10);
    await a.mouse.up();
    await a.waitForFunction(() => window.ndoDemo.strokes.size === 1, null, { timeout: STEP_MS });
    const [mine] = (await snapshot(a)).strokes;
    check(mine.source === "self" && mine.points.length >= 2, `A drew stroke ${mine.seq} (${mine.points.length} points)`);

    await b.waitForFunction((seq) => window.ndoDemo.strokes.has(seq), mine.seq, { timeout: STEP_MS });
    const theirs = (await snapshot(b)).strokes.find((s) => s.seq === mine.seq);
    check(theirs.source === "event", "B got the stroke as a NATS event", theirs.source);
    check(JSON.stringify(theirs.points) === JSON.stringify(mine.points) && theirs.color === mine.color,
      "B's stroke has A's points and colour");
    const [px, py] = theirs.points[Math.floor(theirs.points.length / 2)];
    const ink = await b.evaluate(([x, y]) =>
      document.getElementById("canvas").getContext("2d").getImageData(x, y, 1, 1).data[3], [px, py]);
    check(ink > 0, `B's canvas is painted at (${px}, ${py})`, `alpha ${ink}`);
    await b.locator("#stroke-count", { hasText: "1 strokes" }).waitFor({ timeout: STEP_MS });

    // A chat message posted in A.
    const text = `hello from A ${Date.now()}`;
    await a.fill("#user", "alice");
    await a.fill("#text", text);
    await a.press("#text", "Enter");
    await b.locator("#messages li", { hasText: text }).waitFor({ timeout: STEP_MS });
    const message = (await snapshot(b)).messages.find((m) => m.text === text);
    check(message?.source === "event" && message.user === "alice", "B shows A's message, got as a NATS event");
    check(await a.inputValue("#text") === "", "A's message box is empty again");

    // A third page, opened afterwards, loads both from the objects' history.
    const c = await open(browser, "C", log);
    const stateC = await snapshot(c);
    check(stateC.strokes.some((s) => s.seq === mine.seq && s.source === "history"), "C loaded the stroke from history");
    check(stateC.messages.some((m) => m.text === text && m.source === "history"), "C loaded the message from history");

    // Clear in B empties A's board.
    await b.click("#clear");
    await a.waitForFunction(() => window.ndoDemo.strokes.size === 0, null, { timeout: STEP_MS });
    check(true, "clear in B emptied A's board");

    const errors = log.filter((line) => / page error| request failed|console\.error/.test(line));
    check(errors.length === 0, "no page errors", errors.join("; "));
    console.log("RESULT ok");
  } catch (err) {
    for (const line of log) console.log(`log  ${line}`);
    console.log(`RESULT failed: ${err.message.split("\n")[0]}`);
    process.exitCode = 1;
  } finally {
    await browser.close();
    clearTimeout(watchdog);
  }
}

main().catch((err) => {
  console.log(`RESULT failed: ${err.message.split("\n")[0]}`);
  process.exit(1);
});

// Browser test of the demo page, /client.js and /admin in headless Chromium.
// Run by tests/browser.rs, which starts redis, three nodes and wsc-lb, and
// passes:
//   LB_URL    http://127.0.0.1:PORT (wsc-lb in front of the nodes)
//   NODES     JSON [{"id","addr","pid"}] of the nodes
//   API_KEY   the nodes' --api-key
//   HISTORY   the nodes' --history-size (resume steps 8 and 9)
//   OUT_DIR   where screenshots go (one per step)
//   CHROMIUM  (optional) the browser, default /usr/bin/chromium
// Exits 0 when every check passed; prints one line per step.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const LB = process.env.LB_URL;
const NODES = JSON.parse(process.env.NODES || "[]");
const API_KEY = process.env.API_KEY;
const HISTORY = Number(process.env.HISTORY || 50);
const OUT = process.env.OUT_DIR || "target/browser-test";
const T = 20_000; // deadline for each condition
if (!LB || NODES.length < 3 || !API_KEY) {
  console.error("cluster.test.mjs: LB_URL, NODES (3) and API_KEY are required");
  process.exit(2);
}
mkdirSync(OUT, { recursive: true });
const started = Date.now();
const step = (s) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${s}`);
function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

// playwright's launch() gives Chromium a fresh, empty --user-data-dir itself.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
const pages = [];
async function shot(name) {
  for (const [who, p] of pages) {
    await p.screenshot({ path: join(OUT, `${name}-${who}.png`), fullPage: true });
  }
}

try {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 760 } });
  const open = async (who, to) => {
    const p = await ctx.newPage();
    p.on("pageerror", (e) => console.error(`[${who}] page error: ${e.message}`));
    await p.goto(`${LB}/?user=${who}&to=${to}`);
    await p.waitForFunction(() => window.demo?.client?.connected, null, { timeout: T });
    pages.push([who, p]);
    return p;
  };
  const nodeOf = (p) => p.evaluate(() => window.demo.client.node);

  // 1. Two pages, on different nodes (the LB hands out nodes in turn; if
  //    both land on one node, bob reconnects until he is elsewhere).
  const alice = await open("alice", "bob");
  let bob = await open("bob", "alice");
  for (let i = 0; i < 10 && (await nodeOf(bob)) === (await nodeOf(alice)); i++) {
    pages.pop();
    await bob.close();
    bob = await open("bob", "alice");
  }
  const aliceNode = await nodeOf(alice);
  const bobNode = await nodeOf(bob);
  check(aliceNode !== bobNode, `alice and bob on different nodes (${aliceNode})`);
  step(`alice on ${aliceNode}, bob on ${bobNode}`);
  await shot("1-connected");

  // 2. Messages both ways, through the page's own form.
  const sendVia = async (p, payload) => {
    await p.fill("#payload", JSON.stringify(payload));
    await p.click("#send");
  };
  await sendVia(alice, { text: "hi bob" });
  await sendVia(bob, { text: "hi alice" });
  await bob.waitForFunction(
    () => window.demo.received.some((m) => m.from === "alice" && m.payload.text === "hi bob"), null, { timeout: T });
  await alice.waitForFunction(
    () => window.demo.received.some((m) => m.from === "bob" && m.payload.text === "hi alice"), null, { timeout: T });
  step("messages exchanged both ways");
  // Topics: alice subscribes through the form; a publish reaches her.
  await alice.fill("#topic", "news");
  await alice.click("#sub");
  await alice.waitForFunction(() => window.demo.client.subscribed.has("news"), null, { timeout: T });
  const publish = async (payload) => {
    // Straight to bob's node (never killed): a pooled keep-alive connection
    // through the LB could lead to the node killed below.
    const r = await fetch(`http://${NODES.find((n) => n.id === bobNode).addr}/api/send`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ topic: "news", payload }),
    });
    check(r.status === 202, `POST /api/send (topic) answered ${r.status}`);
  };
  await publish({ news: 1 });
  await alice.waitForFunction(
    () => window.demo.received.some((m) => m.topic === "news" && m.payload.news === 1), null, { timeout: T });
  step("topic message received");
  await shot("2-exchanged");

  // 3. The operator page, through the LB, with the API key.
  const adm = await ctx.newPage();
  adm.on("pageerror", (e) => console.error(`[admin] page error: ${e.message}`));
  pages.push(["admin", adm]);
  await adm.goto(`${LB}/admin`);
  await adm.fill("#key", "wrong");
  await adm.click("#login button");
  await adm.waitForFunction(() => document.getElementById("err").textContent.includes("wrong"), null, { timeout: T });
  await adm.fill("#key", API_KEY);
  await adm.click("#login button");
  await adm.waitForFunction((n) => window.admin.nodes.length === n, NODES.length, { timeout: T });
  check(await adm.locator(`svg g[data-node="${aliceNode}"]`).count() === 1, "admin draws alice's node");
  step("admin shows all nodes");
  await shot("3-admin");

  // 4. A burst of messages to alice through a survivor; alice's node is
  //    SIGKILLed after a third of them, some of them in flight.
  const victim = NODES.find((n) => n.id === aliceNode);
  check(victim, `alice's node ${aliceNode} is one of ours`);
  const survivor = NODES.find((n) => n.id !== aliceNode);
  const reconnectsBefore = await alice.evaluate(() => window.demo.client.reconnects);
  const recoveredBefore = await alice.evaluate(() => window.demo.recovered.length);
  const apiSend = async (node, to, payload) => {
    const r = await fetch(`http://${node.addr}/api/send`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ to, payload }),
    });
    check(r.status === 202, `POST /api/send answered ${r.status}`);
    return (await r.json()).id;
  };
  // Fewer than --history-size, so the resume can recover all of them.
  const BURST = Math.min(30, HISTORY - 10);
  // A third of the burst is sent before the kill: the first half of it is
  // shown by alice's page; for the second half her node is frozen (SIGSTOP),
  // so those are routed to it (its lease is still live) and stay in flight
  // there when it is SIGKILLed. The rest is sent after.
  const FIRST = Math.floor(BURST / 3);
  const HALF = Math.floor(FIRST / 2);
  const burst = [];
  const gap = []; // sent after the kill
  for (let i = 0; i < HALF; i++) burst.push(await apiSend(survivor, "alice", { burst: i }));
  await alice.waitForFunction((n) => window.demo.received.filter((m) => m.payload?.burst !== undefined).length === n,
    HALF, { timeout: T });
  process.kill(victim.pid, "SIGSTOP");
  for (let i = HALF; i < FIRST; i++) burst.push(await apiSend(survivor, "alice", { burst: i }));
  await new Promise((r) => setTimeout(r, 50)); // routed (to the frozen node) by now
  process.kill(victim.pid, "SIGKILL");
  const shownAtKill = await alice.evaluate(() => window.demo.received.filter((m) => m.payload?.burst !== undefined).length);
  step(`killed ${victim.id} (pid ${victim.pid}) after ${FIRST} of ${BURST} messages; ${FIRST - shownAtKill} in flight`);
  for (let i = FIRST; i < BURST; i++) {
    const id = await apiSend(survivor, "alice", { burst: i });
    burst.push(id);
    gap.push(id);
  }
  step(`sent ${burst.length} messages to alice, ${gap.length} of them after the kill`);

  // 5. Alice's page reconnects by itself, to another node, and gets them.
  await alice.waitForFunction(
    ([n, dead]) => window.demo.client.reconnects > n && window.demo.client.connected && window.demo.client.node !== dead,
    [reconnectsBefore, aliceNode], { timeout: T });
  const newNode = await nodeOf(alice);
  step(`alice reconnected to ${newNode}`);
  await alice.waitForFunction(
    (ids) => ids.every((id) => window.demo.received.some((m) => m.id === id)), burst, { timeout: T });
  step("burst messages arrived");
  // The reconnect resumed (since/epoch) and the node answered recovered.
  const recs = await alice.evaluate((n) => window.demo.recovered.slice(n), recoveredBefore);
  check(recs.length >= 1, "a recovered event after the reconnect");
  check(recs.every((r) => r.recovered === true && r.since != null),
    `every resume after the kill recovered: ${JSON.stringify(recs)}`);
  step(`resumed after #${recs[0].since}: recovered true`);
  // The subscription was made again on the new node by the client itself.
  await alice.waitForFunction(() => window.demo.client.subscribed.has("news"), null, { timeout: T });
  await publish({ news: 2 });
  await alice.waitForFunction(
    () => window.demo.received.some((m) => m.topic === "news" && m.payload.news === 2), null, { timeout: T });
  step("topic re-subscribed after reconnect");
  await shot("4-reconnected");

  // 6. The admin page sees the killed node go (reaped); only then, when no
  //    redelivery is left to come, each gap message was shown exactly once.
  await adm.waitForFunction((dead) => !window.admin.nodes.includes(dead) && window.admin.reaps.some((r) => r.id === dead),
    aliceNode, { timeout: T });
  check(await adm.locator(`svg g[data-node="${aliceNode}"]`).count() === 0, "admin no longer draws the killed node");
  step("admin shows the killed node reaped");
  // Bob still reaches alice on her new node.
  await sendVia(bob, { text: "after" });
  await alice.waitForFunction(
    () => window.demo.received.some((m) => m.from === "bob" && m.payload.text === "after"), null, { timeout: T });
  const ids = await alice.evaluate(() => window.demo.received.map((m) => m.id));
  for (const id of burst) {
    const n = ids.filter((x) => x === id).length;
    check(n === 1, `burst message ${id} shown ${n} times, want 1`);
  }
  check(new Set(ids).size === ids.length, `alice's page shows no id twice: ${ids}`);
  // In order: the burst as shown, by seq (one epoch, strictly increasing),
  // and every payload once.
  const shown = await alice.evaluate(
    () => window.demo.received.filter((m) => m.payload && m.payload.burst !== undefined)
      .map((m) => ({ seq: m.seq, epoch: m.epoch, i: m.payload.burst })));
  check(shown.every((m) => Number.isInteger(m.seq) && m.epoch === shown[0].epoch),
    `burst messages carry seq and one epoch: ${JSON.stringify(shown)}`);
  for (let k = 1; k < shown.length; k++) {
    check(shown[k].seq > shown[k - 1].seq, `seqs strictly increasing: ${shown.map((m) => m.seq)}`);
  }
  check(shown.map((m) => m.i).sort((x, y) => x - y).join() === [...Array(BURST).keys()].join(),
    `every burst payload shown once: ${shown.map((m) => m.i)}`);
  const inSendOrder = shown.every((m, k) => k === 0 || m.i > shown[k - 1].i);
  const dups = await alice.evaluate(() => window.demo.client.duplicates);
  step(`each burst message shown once, seqs #${shown[0].seq}..#${shown.at(-1).seq} increasing` +
    `${inSendOrder ? " (send order)" : ""} (${dups} redelivered duplicates dropped by the client)`);

  // 7. De-duplication itself: a redelivered frame (same id) is dropped.
  const before = ids.length;
  const dropped = await alice.evaluate((id) => {
    const c = window.demo.client;
    const d = c.duplicates;
    c._frame(c.ws, JSON.stringify({ type: "message", id, from: null, payload: { gap: "again" } }));
    return c.duplicates - d;
  }, gap[0]);
  check(dropped === 1, "a redelivered id is counted as a duplicate");
  check((await alice.evaluate(() => window.demo.received.length)) === before, "a redelivered id is not shown");
  await shot("5-dedupe");

  // 8. Offline for a short while (the demo's disconnect button), then a
  //    reload of the page: the client resumes from sessionStorage and every
  //    message sent meanwhile follows, once each: recovered true.
  const offline = async (p) => {
    await p.click("#disconnect");
    await p.waitForFunction(() => window.demo.client.ws === null && !window.demo.client.connected, null, { timeout: T });
    // Let the node see the close (the user has no connection left).
    await new Promise((r) => setTimeout(r, 300));
    return p.evaluate(() => window.demo.client.position);
  };
  const sendMany = async (n, tag) => {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await apiSend(survivor, "alice", { [tag]: i }));
    return out;
  };
  const shownOf = (p, tag) => p.evaluate((t) => window.demo.received
    .filter((m) => m.payload && m.payload[t] !== undefined).map((m) => ({ id: m.id, seq: m.seq, i: m.payload[t] })), tag);
  const before8 = await offline(alice);
  check(before8 && before8.epoch && Number.isInteger(before8.seq), `a position to resume from: ${JSON.stringify(before8)}`);
  const SHORT = 5;
  const short = await sendMany(SHORT, "short");
  await alice.reload();
  await alice.waitForFunction(() => window.demo.client?.connected && window.demo.recovered.length > 0, null, { timeout: T });
  const rec8 = await alice.evaluate(() => window.demo.recovered[0]);
  check(rec8.recovered === true && rec8.since === before8.seq && rec8.epoch === before8.epoch,
    `a reload resumes from sessionStorage (since #${before8.seq}): ${JSON.stringify(rec8)}`);
  await alice.waitForFunction(
    (ids) => ids.every((id) => window.demo.received.some((m) => m.id === id)), short, { timeout: T });
  await new Promise((r) => setTimeout(r, 300)); // room for a duplicate to show
  const s8 = await shownOf(alice, "short");
  check(s8.length === SHORT && s8.every((m, k) => m.i === k && (k === 0 || m.seq > s8[k - 1].seq)),
    `the ${SHORT} messages sent while offline shown once, in order: ${JSON.stringify(s8)}`);
  step(`offline ${SHORT} messages, page reloaded: resumed after #${rec8.since}, recovered true, each shown once`);
  await shot("6-resumed");

  // 9. Offline while more than --history-size messages are sent: the resume
  //    cannot be served from history; the client says recovered false, and
  //    the mailbox (every message, kept for the offline user) is shown.
  const before9 = await offline(alice);
  const LONG = HISTORY + 30;
  const long = await sendMany(LONG, "long");
  step(`alice offline at #${before9.seq}; sent ${LONG} messages (history keeps ${HISTORY})`);
  const recBefore9 = await alice.evaluate(() => window.demo.recovered.length);
  await alice.click("#connect");
  await alice.waitForFunction((n) => window.demo.client?.connected && window.demo.recovered.length > n,
    recBefore9, { timeout: T });
  const rec9 = await alice.evaluate((n) => window.demo.recovered[n], recBefore9);
  check(rec9.recovered === false && rec9.since === before9.seq,
    `a resume past the history answers recovered false: ${JSON.stringify(rec9)}`);
  check(rec9.seq >= before9.seq + LONG, `the welcome gives the current position (#${rec9.seq})`);
  check(await alice.locator("#log .gap").count() >= 1, "the demo page shows the failed resume");
  await alice.waitForFunction(
    (ids) => ids.every((id) => window.demo.received.some((m) => m.id === id)), long, { timeout: T });
  await new Promise((r) => setTimeout(r, 300));
  const s9 = await shownOf(alice, "long");
  check(s9.length === LONG && new Set(s9.map((m) => m.i)).size === LONG,
    `after recovered false the mailbox is shown, once each: ${s9.length} of ${LONG}`);
  step(`resume after #${rec9.since}: recovered false (history at #${rec9.seq}); mailbox of ${s9.length} shown`);
  await shot("7-not-recovered");

  // 10. The app closes bob's connection (POST /api/disconnect, code 4000-
  //     4099): the client reports a close it will not reconnect after, and
  //     stays closed.
  const bobReconnects = await bob.evaluate(() => window.demo.client.reconnects);
  const r10 = await fetch(`http://${survivor.addr}/api/disconnect`, {
    method: "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ user: "bob", code: 4003, reason: "banned for the test" }),
  });
  check(r10.status === 202, `POST /api/disconnect answered ${r10.status}`);
  await bob.waitForFunction(() => window.demo.client.closed !== null, null, { timeout: T });
  const closed = await bob.evaluate(() => window.demo.client.closed);
  check(closed.code === 4003 && closed.reason === "banned for the test", `bob closed by the app: ${JSON.stringify(closed)}`);
  await new Promise((r) => setTimeout(r, 2000)); // longer than any reconnect delay after the first
  const after10 = await bob.evaluate(() => ({ c: window.demo.client.connected, r: window.demo.client.reconnects,
    ws: window.demo.client.ws, connect: document.getElementById("connect").disabled }));
  check(!after10.c && after10.ws === null && after10.r === bobReconnects, `bob stays closed: ${JSON.stringify(after10)}`);
  check(after10.connect === false, "the demo page offers to connect again");
  step(`app closed bob's connection (${closed.code} ${closed.reason}): not reconnected`);
  await shot("8-app-closed");
  step("PASS");
} catch (e) {
  failed = true;
  console.error("FAIL:", e.message);
  try { await shot("failure"); } catch {}
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);

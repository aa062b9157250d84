// Browser test of the demo page, /client.js and /admin in headless Chromium.
// Run by tests/browser.rs, which starts redis, three nodes and wsc-lb, and
// passes:
//   LB_URL    http://127.0.0.1:PORT (wsc-lb in front of the nodes)
//   NODES     JSON [{"id","addr","pid"}] of the nodes
//   API_KEY   the nodes' --api-key
//   OUT_DIR   where screenshots go (one per step)
//   CHROMIUM  (optional) the browser, default /usr/bin/chromium
// Exits 0 when every check passed; prints one line per step.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const LB = process.env.LB_URL;
const NODES = JSON.parse(process.env.NODES || "[]");
const API_KEY = process.env.API_KEY;
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

  // 4. SIGKILL alice's node; send to alice during the gap via a survivor.
  const victim = NODES.find((n) => n.id === aliceNode);
  check(victim, `alice's node ${aliceNode} is one of ours`);
  const survivor = NODES.find((n) => n.id !== aliceNode);
  const reconnectsBefore = await alice.evaluate(() => window.demo.client.reconnects);
  process.kill(victim.pid, "SIGKILL");
  step(`killed ${victim.id} (pid ${victim.pid})`);
  const gap = [];
  for (let i = 0; i < 5; i++) {
    const r = await fetch(`http://${survivor.addr}/api/send`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ to: "alice", payload: { gap: i } }),
    });
    check(r.status === 202, `POST /api/send answered ${r.status}`);
    gap.push((await r.json()).id);
  }
  step(`sent ${gap.length} messages to alice during the gap`);

  // 5. Alice's page reconnects by itself, to another node, and gets them.
  await alice.waitForFunction(
    ([n, dead]) => window.demo.client.reconnects > n && window.demo.client.connected && window.demo.client.node !== dead,
    [reconnectsBefore, aliceNode], { timeout: T });
  const newNode = await nodeOf(alice);
  step(`alice reconnected to ${newNode}`);
  await alice.waitForFunction(
    (ids) => ids.every((id) => window.demo.received.some((m) => m.id === id)), gap, { timeout: T });
  step("gap messages arrived");
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
  for (const id of gap) {
    const n = ids.filter((x) => x === id).length;
    check(n === 1, `gap message ${id} shown ${n} times, want 1`);
  }
  check(new Set(ids).size === ids.length, `alice's page shows no id twice: ${ids}`);
  const dups = await alice.evaluate(() => window.demo.client.duplicates);
  step(`each gap message shown once (${dups} redelivered duplicates dropped by the client)`);

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
  await shot("5-final");
  step("PASS");
} catch (e) {
  failed = true;
  console.error("FAIL:", e.message);
  try { await shot("failure"); } catch {}
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);

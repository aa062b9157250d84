// Browser test of the demo page, /client.js and /admin in headless Chromium.
// Run by tests/browser.rs, which starts redis, three nodes and wsc-lb, and
// passes:
//   LB_URL    http://127.0.0.1:PORT (wsc-lb in front of the nodes)
//   NODES     JSON [{"id","addr","pid"}] of the nodes
//   API_KEY   the nodes' --api-key
//   HISTORY   the nodes' --history-size (resume steps 8 and 9)
//   SECRET    the nodes' --jwt-secret (HS256), for the token steps 11 and
//             12 (the pages sign their own tokens; the nodes run with
//             --jwt-leeway-s 0, so a token is over at its exp)
//   OUT_DIR   where screenshots go (one per step)
//   CHROMIUM  (optional) the browser, default /usr/bin/chromium
// Exits 0 when every check passed; prints one line per step.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const LB = process.env.LB_URL;
const NODES = JSON.parse(process.env.NODES || "[]");
const API_KEY = process.env.API_KEY;
const SECRET = process.env.SECRET;
const HISTORY = Number(process.env.HISTORY || 50);
const OUT = process.env.OUT_DIR || "target/browser-test";
const T = 20_000; // deadline for each condition
if (!LB || NODES.length < 3 || !API_KEY || !SECRET) {
  console.error("cluster.test.mjs: LB_URL, NODES (3), API_KEY and SECRET are required");
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
    // The page loads and connects without a console error (a 404 for
    // /favicon.ico was one).
    const errors = [];
    const onConsole = (m) => m.type() === "error" && errors.push(m.text());
    p.on("console", onConsole);
    await p.goto(`${LB}/?user=${who}&to=${to}`);
    await p.waitForFunction(() => window.demo?.client?.connected, null, { timeout: T });
    p.off("console", onConsole);
    check(errors.length === 0, `${who}'s page loaded without console errors: ${JSON.stringify(errors)}`);
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

  // Token steps: a page (the demo page, not connected) makes its own
  // clients from /client.js, with a getToken that signs HS256 tokens in the
  // page (WebCrypto) with the nodes' secret, each valid for TOKEN_S.
  const TOKEN_S = 6;
  const tokens = await ctx.newPage();
  tokens.on("pageerror", (e) => console.error(`[tokens] page error: ${e.message}`));
  pages.push(["tokens", tokens]);
  await tokens.goto(`${LB}/`);
  await tokens.evaluate(async (secret) => {
    const { WsClusterClient } = await import("/client.js");
    const enc = new TextEncoder();
    const b64u = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    const log = (text) => {
      const d = document.createElement("div");
      d.className = "sys";
      d.textContent = new Date().toLocaleTimeString() + "  " + text;
      document.getElementById("log").prepend(d);
    };
    window.t = {
      WsClusterClient,
      clients: {},
      async sign(sub, lifeS) {
        const now = Math.floor(Date.now() / 1000);
        const part = (o) => b64u(enc.encode(JSON.stringify(o)));
        const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, iat: now, exp: now + lifeS })}`;
        const sig = new Uint8Array(await crypto.subtle.sign("HMAC", key, enc.encode(body)));
        return `${body}.${b64u(sig)}`;
      },
      // A client whose getToken gives tokens for subs[0], then subs[1], ...
      // (the last one from then on); its events, timed, in t.clients[name].
      start(name, subs, lifeS) {
        let calls = 0;
        const getToken = () => window.t.sign(subs[Math.min(calls++, subs.length - 1)], lifeS);
        const c = new WsClusterClient({ getToken });
        const rec = { c, events: [], calls: () => calls };
        for (const ev of ["open", "recovered", "message", "refreshed", "refresh_failed", "close", "error"]) {
          c.on(ev, (a) => {
            const at = Date.now();
            const v = ev === "error" ? { code: a.code ?? null, message: a.message ?? String(a) } : a;
            rec.events.push({ ev, at, v });
            log(`${name}: ${ev} ${JSON.stringify(v)}`);
          });
        }
        window.t.clients[name] = rec;
      },
      events(name, ev) {
        return window.t.clients[name].events.filter((e) => e.ev === ev).map((e) => ({ at: e.at, ...e.v }));
      },
    };
  }, SECRET);

  // 11. A token valid for TOKEN_S; the client refreshes it by itself on the
  //     open connection: 15 s later it is the same connection (no close, no
  //     reconnect), `refreshed` fired at least twice, and it still gets
  //     messages.
  await tokens.evaluate((s) => window.t.start("carol", ["carol"], s), TOKEN_S);
  await tokens.waitForFunction(() => window.t.clients.carol.c.connected, null, { timeout: T });
  const carol0 = await tokens.evaluate(() => {
    const c = window.t.clients.carol.c;
    return { conn: c.welcome.conn, user: c.welcome.user, exp: c.tokenExp };
  });
  check(carol0.user === "carol" && Number.isInteger(carol0.exp), `carol connected with a token: ${JSON.stringify(carol0)}`);
  await new Promise((r) => setTimeout(r, 15_000));
  const carol1 = await tokens.evaluate(() => {
    const r = window.t.clients.carol;
    return {
      conn: r.c.welcome?.conn, connected: r.c.connected, reconnects: r.c.reconnects, exp: r.c.tokenExp,
      refreshed: window.t.events("carol", "refreshed"), failed: window.t.events("carol", "refresh_failed"),
      closes: window.t.events("carol", "close"), opens: window.t.events("carol", "open").length,
    };
  });
  check(carol1.connected && carol1.conn === carol0.conn && carol1.reconnects === 0 && carol1.opens === 1 &&
    carol1.closes.length === 0, `carol still on her first connection after 15 s: ${JSON.stringify(carol1)}`);
  check(carol1.refreshed.length >= 2 && carol1.failed.length === 0,
    `refreshed at least twice, never refused: ${JSON.stringify(carol1)}`);
  check(carol1.exp >= carol0.exp + 10 && carol1.refreshed.at(-1).exp === carol1.exp,
    `the expiry moved on with the refreshes (${carol0.exp} -> ${carol1.exp})`);
  const toCarol = await apiSend(survivor, "carol", { after: "refreshes" });
  await tokens.waitForFunction((id) => window.t.events("carol", "message").some((m) => m.id === id), toCarol, { timeout: T });
  step(`carol's ${TOKEN_S} s token refreshed ${carol1.refreshed.length} times in 15 s on one connection ` +
    `(${carol0.conn.slice(0, 8)}), exp ${carol0.exp} -> ${carol1.exp}; a message still arrives`);
  await tokens.evaluate(() => window.t.clients.carol.c.close());
  await shot("9-refreshed");

  // 12. getToken now gives a token for another user: the refresh is refused
  //     (forbidden), the old expiry stands, and the server closes the
  //     connection with 4001 at that expiry; the client then reconnects
  //     with a fresh token (whatever getToken gives: here the other user's).
  await tokens.evaluate((s) => window.t.start("dave", ["dave", "mallory"], s), TOKEN_S);
  await tokens.waitForFunction(() => window.t.clients.dave.c.connected, null, { timeout: T });
  const dave0 = await tokens.evaluate(() => {
    const c = window.t.clients.dave.c;
    return { conn: c.welcome.conn, user: c.welcome.user, exp: c.tokenExp };
  });
  check(dave0.user === "dave", `dave connected: ${JSON.stringify(dave0)}`);
  await tokens.waitForFunction(() => window.t.events("dave", "close").length > 0, null, { timeout: T });
  const dave1 = await tokens.evaluate(() => ({
    failed: window.t.events("dave", "refresh_failed"), refreshed: window.t.events("dave", "refreshed"),
    errors: window.t.events("dave", "error"), close: window.t.events("dave", "close")[0],
  }));
  check(dave1.refreshed.length === 0 && dave1.failed.length >= 1 &&
    dave1.failed.every((f) => f.code === "forbidden" && f.exp === dave0.exp),
    `the refresh with another user's token is refused, the old expiry stands: ${JSON.stringify(dave1)}`);
  check(dave1.errors.some((e) => e.code === "forbidden"), `the refusal is an error event too: ${JSON.stringify(dave1.errors)}`);
  check(dave1.failed[0].at < dave1.close.at, "refused before the close");
  check(dave1.close.code === 4001 && dave1.close.willReconnect === true,
    `closed with 4001 (token expired), to reconnect with a new token: ${JSON.stringify(dave1.close)}`);
  const late = dave1.close.at - dave0.exp * 1000;
  check(late > -1000 && late < 2500, `closed at the old expiry: ${late} ms after exp ${dave0.exp}`);
  await tokens.waitForFunction(() => window.t.events("dave", "open").length === 2, null, { timeout: T });
  const dave2 = await tokens.evaluate(() => ({ user: window.t.clients.dave.c.welcome.user,
    rec: window.t.events("dave", "recovered").at(-1) }));
  check(dave2.user === "mallory", `after 4001 the client reconnected with a fresh token: ${JSON.stringify(dave2)}`);
  check(dave2.rec.since === null, `no resume from dave's position for another user: ${JSON.stringify(dave2.rec)}`);
  step(`refresh with another user's token refused (forbidden); closed 4001 ${late} ms after the old exp; ` +
    `reconnected with a fresh token (as ${dave2.user})`);
  // The app's own 4001 (POST /api/disconnect) is final even with getToken:
  // its reason, not the server's "token expired", and no reconnect.
  const r12 = await fetch(`http://${survivor.addr}/api/disconnect`, {
    method: "POST",
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ user: "mallory", code: 4001, reason: "closed by the app" }),
  });
  check(r12.status === 202, `POST /api/disconnect 4001 answered ${r12.status}`);
  await tokens.waitForFunction(() => window.t.events("dave", "close").length === 2, null, { timeout: T });
  const dave3 = await tokens.evaluate(() => window.t.events("dave", "close")[1]);
  check(dave3.code === 4001 && dave3.reason === "closed by the app" && dave3.willReconnect === false,
    `the app's 4001 is final: ${JSON.stringify(dave3)}`);
  await new Promise((r) => setTimeout(r, 2000)); // longer than a 4001 reconnect delay
  const dave4 = await tokens.evaluate(() => ({ opens: window.t.events("dave", "open").length,
    connected: window.t.clients.dave.c.connected }));
  check(dave4.opens === 2 && !dave4.connected, `not reconnected after the app's 4001: ${JSON.stringify(dave4)}`);
  step("the app's 4001 (with its reason) closed dave's client for good");
  await tokens.evaluate(() => window.t.clients.dave.c.close());
  await shot("10-refresh-refused");

  // 13. Rolling upgrade: a welcome without `epoch` (a node of the previous
  //     release, simulated by feeding the frame to the client) makes the
  //     client drop its position: recovered false, reason "unsupported";
  //     its next connect asks no resume (welcome recovered null) and takes
  //     the position that welcome gives.
  //     (First a reconnect, so that the connection is a resumed one.)
  await tokens.evaluate((s) => window.t.start("erin", ["erin"], s), 60);
  await tokens.waitForFunction(() => window.t.clients.erin.c.position !== null, null, { timeout: T });
  await tokens.evaluate(() => window.t.clients.erin.c.ws.close());
  await tokens.waitForFunction(() => window.t.events("erin", "open").length === 2, null, { timeout: T });
  const erin = await tokens.evaluate(() => {
    const c = window.t.clients.erin.c;
    const resumed = window.t.events("erin", "recovered").at(-1);
    c._frame(c.ws, JSON.stringify({ type: "welcome", node: "old-release", conn: "x", user: "erin" }));
    return { resumed, rec: window.t.events("erin", "recovered").at(-1), position: c.position };
  });
  check(erin.resumed.recovered === true, `erin's reconnect resumed: ${JSON.stringify(erin.resumed)}`);
  check(erin.rec.recovered === false && erin.rec.reason === "unsupported" && erin.position === null &&
    erin.rec.since === erin.resumed.since,
    `a welcome without epoch: recovered false, unsupported, position forgotten: ${JSON.stringify(erin)}`);
  await tokens.evaluate(() => window.t.clients.erin.c.ws.close());
  await tokens.waitForFunction(() => window.t.events("erin", "open").length === 4, null, { timeout: T });
  const erin2 = await tokens.evaluate(() => ({ rec: window.t.events("erin", "recovered").at(-1),
    position: window.t.clients.erin.c.position }));
  check(erin2.rec.recovered === null && erin2.rec.since === null && erin2.position !== null,
    `the next connect asked no resume and took a new position: ${JSON.stringify(erin2)}`);
  step(`a welcome without epoch: recovered false (unsupported); the reconnect asked no resume, now at #${erin2.position.seq}`);
  await tokens.evaluate(() => window.t.clients.erin.c.close());
  await shot("11-unsupported");

  // 14. `persist` keeps the newest seqs seen, not only the position: a
  //     page reloaded (a new client on the same storage) resumes, and a
  //     redelivery of a message the old page showed (as a dead node's
  //     messages re-routed to the mailbox would be) is dropped, not shown
  //     again; a new message still is.
  await tokens.evaluate(() => {
    const mem = new Map();
    const storage = { getItem: (k) => mem.get(k) ?? null, setItem: (k, v) => mem.set(k, v) };
    window.t.frank = (n) => {
      const c = new window.t.WsClusterClient({ getToken: () => window.t.sign("frank", 60), persist: true,
        storage, storageKey: "t14" });
      const rec = { c, msgs: [], recs: [] };
      c.on("message", (m) => rec.msgs.push(m));
      c.on("recovered", (r) => rec.recs.push(r));
      window.t[`frank${n}`] = rec;
    };
    window.t.frank(1);
  });
  await tokens.waitForFunction(() => window.t.frank1.c.connected, null, { timeout: T });
  for (const n of [1, 2]) await apiSend(survivor, "frank", { n });
  await tokens.waitForFunction(() => window.t.frank1.msgs.length === 2, null, { timeout: T });
  await tokens.evaluate(() => { window.t.frank1.c.close(); window.t.frank(2); });
  await tokens.waitForFunction(() => window.t.frank2.recs.length === 1, null, { timeout: T });
  const frank = await tokens.evaluate(() => {
    const { c, msgs, recs } = window.t.frank2;
    const old = window.t.frank1.msgs[0];
    c._frame(c.ws, JSON.stringify({ type: "message", ...old })); // a redelivery
    const fresh = { ...old, id: `${old.id}-new`, seq: window.t.frank1.msgs[1].seq + 1 };
    c._frame(c.ws, JSON.stringify({ type: "message", ...fresh }));
    return { rec: recs[0], shown: msgs.map((m) => m.seq), duplicates: c.duplicates, seqs: window.t.frank1.msgs.map((m) => m.seq) };
  });
  check(frank.rec.recovered === true && frank.rec.since === frank.seqs[1],
    `the reloaded client resumed after #${frank.seqs[1]}: ${JSON.stringify(frank.rec)}`);
  check(frank.duplicates === 1 && frank.shown.length === 1 && frank.shown[0] === frank.seqs[1] + 1,
    `a redelivery of #${frank.seqs[0]} after the reload is dropped, a new message shown: ${JSON.stringify(frank)}`);
  step(`a reloaded page drops a redelivery of #${frank.seqs[0]} it showed before the reload`);
  await tokens.evaluate(() => window.t.frank2.c.close());
  step("PASS");
} catch (e) {
  failed = true;
  console.error("FAIL:", e.message);
  try { await shot("failure"); } catch {}
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);

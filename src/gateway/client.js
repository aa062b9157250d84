// wscluster client: a dependency-free ES module, served by every node at
// /client.js.
//
//   import { WsClusterClient } from "/client.js";
//   const c = new WsClusterClient({ url: "wss://chat.example.com/ws",
//                                   getToken: async () => (await fetch("/token")).text() });
//   c.on("open", (welcome) => console.log("on node", welcome.node));
//   c.on("message", (m) => console.log(m.from, m.payload));
//   await c.subscribe("news");
//   const id = await c.send("bob", { text: "hi" });
//
// - Reconnects by itself: exponential backoff with full jitter (capped); a
//   node that goes away (close 1012) is left faster, still jittered, so a
//   drained node's clients do not all land on the survivors at once.
// - Drops redelivered messages by `id` (the last `dedupeSize` ids are kept).
// - Subscriptions are made again after every reconnect.
// - Options: url (ws:// or wss:// URL of /ws; default: this page's host),
//   token (string) or getToken (async () => string, called before every
//   connection attempt), user (development servers only: ?user=NAME),
//   minDelayMs (500), maxDelayMs (15000), restartDelayMs (1000),
//   dedupeSize (10000), sendTimeoutMs (10000).
// - Events (`on(name, fn)` returns a function that removes the listener):
//   "open" (the welcome frame: {node, conn, user}), "message" (a message
//   frame, once per id), "close" ({code, reason, reconnectInMs}), "error" (an
//   error frame from the server, or an Error).

export class WsClusterClient {
  constructor(opts = {}) {
    this.opts = Object.assign(
      {
        minDelayMs: 500,
        maxDelayMs: 15000,
        restartDelayMs: 1000,
        dedupeSize: 10000,
        sendTimeoutMs: 10000,
      },
      opts,
    );
    if (!this.opts.url) {
      const proto = globalThis.location && location.protocol === "https:" ? "wss" : "ws";
      this.opts.url = `${proto}://${globalThis.location ? location.host : "localhost"}/ws`;
    }
    this.ws = null;
    this.welcome = null; // the current connection's welcome frame
    this.reconnects = 0; // connections opened after the first
    this.opens = 0;
    this.duplicates = 0; // messages dropped as already seen
    this._listeners = { open: [], message: [], close: [], error: [] };
    this._topics = new Set();
    this.subscribed = new Set(); // topics the server confirmed on this connection
    this._pending = new Map(); // ref -> {resolve, reject, timer, kind, topic}
    this._ref = 0;
    this._attempt = 0;
    this._timer = null;
    this._stopped = false;
    this._seen = new Set();
    this._fifo = new Array(this.opts.dedupeSize);
    this._fifoAt = 0;
    this._connect();
  }

  /** True while a connection is open and welcomed. */
  get connected() {
    return this.welcome !== null && this.ws !== null && this.ws.readyState === 1;
  }

  /** The id of the node this client is on, or null. */
  get node() {
    return this.welcome ? this.welcome.node : null;
  }

  on(name, fn) {
    const list = this._listeners[name];
    if (!list) throw new Error(`unknown event ${name}`);
    list.push(fn);
    return () => {
      const i = list.indexOf(fn);
      if (i >= 0) list.splice(i, 1);
    };
  }

  /**
   * Send `payload` (any JSON value) to user `to`. Resolves with the message
   * id once the server has accepted it durably (`sent`), rejects on an error
   * for it, on a timeout, or when the connection closes first (the message
   * may then have been accepted or not).
   */
  send(to, payload) {
    return this._request({ type: "send", to, payload }, "send");
  }

  /** Subscribe to a topic, now and after every reconnect. */
  subscribe(topic) {
    this._topics.add(topic);
    if (!this.connected) return Promise.resolve(topic);
    return this._request({ type: "subscribe", topic }, "subscribe", topic);
  }

  unsubscribe(topic) {
    this._topics.delete(topic);
    if (this.connected) this._raw({ type: "unsubscribe", topic });
  }

  /** Close for good: no reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    if (this.ws) this.ws.close(1000, "client closed");
  }

  // ---- internals ----

  _emit(name, arg) {
    for (const fn of this._listeners[name].slice()) {
      try {
        fn(arg);
      } catch (e) {
        console.error(`wscluster client: ${name} listener failed`, e);
      }
    }
  }

  _raw(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  _request(frame, kind, topic) {
    if (!this.connected) return Promise.reject(new Error("not connected"));
    const ref = `c${++this._ref}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new Error(`${kind} timed out`));
      }, this.opts.sendTimeoutMs);
      this._pending.set(ref, { resolve, reject, timer, kind, topic });
      try {
        this._raw(Object.assign({ ref }, frame));
      } catch (e) {
        clearTimeout(timer);
        this._pending.delete(ref);
        reject(e);
      }
    });
  }

  _settle(ref, ok, value) {
    const p = this._pending.get(ref);
    if (!p) return false;
    this._pending.delete(ref);
    clearTimeout(p.timer);
    (ok ? p.resolve : p.reject)(value);
    return true;
  }

  /** True the first time an id is seen (bounded memory: a Set + a ring). */
  _firstSight(id) {
    if (this._seen.has(id)) return false;
    const old = this._fifo[this._fifoAt];
    if (old !== undefined) this._seen.delete(old);
    this._fifo[this._fifoAt] = id;
    this._fifoAt = (this._fifoAt + 1) % this._fifo.length;
    this._seen.add(id);
    return true;
  }

  async _connect() {
    if (this._stopped) return;
    let url;
    try {
      const u = new URL(this.opts.url, globalThis.location ? location.href : undefined);
      let token = this.opts.token;
      if (this.opts.getToken) token = await this.opts.getToken();
      if (token) u.searchParams.set("token", token);
      else if (this.opts.user) u.searchParams.set("user", this.opts.user);
      url = u.toString();
    } catch (e) {
      this._emit("error", e instanceof Error ? e : new Error(String(e)));
      this._schedule(null);
      return;
    }
    if (this._stopped) return;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      this._emit("error", e);
      this._schedule(null);
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => this._frame(ws, ev.data);
    ws.onclose = (ev) => this._closed(ws, ev.code, ev.reason);
    // A failed connection also fires close: reconnect is scheduled there.
    ws.onerror = () => {};
  }

  _frame(ws, data) {
    if (ws !== this.ws) return;
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    switch (f.type) {
      case "welcome":
        this.welcome = f;
        this._attempt = 0;
        if (this.opens++ > 0) this.reconnects++;
        for (const t of this._topics) {
          this._request({ type: "subscribe", topic: t }, "subscribe", t).catch((e) =>
            this._emit("error", e),
          );
        }
        this._emit("open", f);
        break;
      case "message":
        if (this._firstSight(f.id)) this._emit("message", f);
        else this.duplicates++;
        break;
      case "sent":
        this._settle(f.ref, true, f.id);
        break;
      case "unsubscribed":
        this.subscribed.delete(f.topic);
        break;
      case "subscribed":
        this.subscribed.add(f.topic);
        for (const [ref, p] of this._pending) {
          if (p.kind === "subscribe" && p.topic === f.topic) {
            this._settle(ref, true, f.topic);
            break;
          }
        }
        break;
      case "error": {
        const err = Object.assign(new Error(f.message || f.code), { code: f.code, ref: f.ref });
        if (f.ref == null || !this._settle(f.ref, false, err)) this._emit("error", f);
        break;
      }
      default:
        break;
    }
  }

  _closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.welcome = null;
    this.subscribed.clear();
    for (const [ref, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new Error(`connection closed before ${p.kind} was answered`));
      this._pending.delete(ref);
    }
    const delay = this._stopped ? null : this._schedule(code);
    this._emit("close", { code, reason, reconnectInMs: delay });
  }

  /** Schedule the next attempt; returns its delay in ms. */
  _schedule(code) {
    if (this._stopped) return null;
    const o = this.opts;
    let delay;
    if (code === 1012) {
      // Node going away: the load balancer has others. Fast, but jittered.
      this._attempt = 0;
      delay = Math.random() * o.restartDelayMs;
    } else {
      const cap = Math.min(o.maxDelayMs, o.minDelayMs * 2 ** this._attempt);
      this._attempt = Math.min(this._attempt + 1, 30);
      delay = Math.random() * cap; // full jitter
    }
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
    return Math.round(delay);
  }
}

export default WsClusterClient;

// wscluster client: a dependency-free ES module, served by every node at
// /client.js (load it with `import`, or `<script type="module">`).
//
//   import { WsClusterClient } from "/client.js";
//   const c = new WsClusterClient({ url: "wss://chat.example.com/ws",
//                                   getToken: async () => (await fetch("/token")).text() });
//   c.on("open", (welcome) => console.log("on node", welcome.node));
//   c.on("message", (m) => console.log(m.from, m.payload));
//   c.on("recovered", (r) => { if (r.recovered === false) reloadState(); });
//   await c.subscribe("news");
//   const id = await c.send("bob", { text: "hi" });
//
// - Reconnects by itself: exponential backoff with full jitter (capped); a
//   node that goes away (close 1012) is left faster, still jittered, so a
//   drained node's clients do not all land on the survivors at once.
// - Never reconnects after a close code 4000-4099 (the app closed it), except
//   4001 (token expired) when it has getToken: it fetches a new token and
//   reconnects.
// - Resume: keeps the user's history position (the `epoch` and the last
//   `seq`, from `welcome` and from user messages) and reconnects with
//   `since=<seq>&epoch=<epoch>`, so every message sent while it was away
//   follows the new `welcome` (`recovered: true`), or it learns that this
//   could not be promised (`recovered: false`: reload the app's state). The
//   first connection resumes only from the `resume` option or, with
//   `persist`, from sessionStorage (the position survives a page reload).
// - Drops redelivered messages: user messages by (`epoch`, `seq`) (the last
//   `historyDedupeSize` seqs per epoch), all messages by `id` (the last
//   `dedupeSize` ids). A message under a new epoch is new. A seq already seen
//   under the same epoch with another id means the server lost data: that
//   is reported as `recovered: false` (and the message shown), not dropped.
// - Subscriptions are made again after every reconnect.
// - Options: url (ws:// or wss:// URL of /ws; default: this page's host),
//   token (string) or getToken (async () => string, called before every
//   connection attempt), user (development servers only: ?user=NAME),
//   minDelayMs (500), maxDelayMs (15000), restartDelayMs (1000),
//   dedupeSize (10000), historyDedupeSize (1000), sendTimeoutMs (10000),
//   resume ({epoch, seq}: resume from there on the first connection),
//   persist (false; true keeps the position in sessionStorage), storageKey
//   ("wscluster:resume"), storage (a Storage; default sessionStorage).
// - Events (`on(name, fn)` returns a function that removes the listener):
//   "open" (the welcome frame: {node, conn, user, epoch, seq, recovered}),
//   "recovered" ({recovered: true|false|null, epoch, seq, since}, after every
//   welcome, before the messages that follow it: null when no resume was
//   asked, false when some messages may be missing; also false, with
//   `reason`, when a gap shows up on an open connection), "message" (a
//   message frame, once per message), "close" ({code, reason, reconnectInMs,
//   willReconnect}; reconnectInMs is null and willReconnect false when the
//   client will not reconnect), "error" (an error frame from the server, or
//   an Error).
// - State: `epoch` and `seq` (the position a reconnect resumes from; also
//   `position`), `welcome`, `node`, `connected`, `reconnects`, `duplicates`,
//   `closed` ({code, reason} once it stopped for good).

export class WsClusterClient {
  constructor(opts = {}) {
    this.opts = Object.assign(
      {
        minDelayMs: 500,
        maxDelayMs: 15000,
        restartDelayMs: 1000,
        dedupeSize: 10000,
        historyDedupeSize: 1000,
        sendTimeoutMs: 10000,
        persist: false,
        storageKey: "wscluster:resume",
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
    this.closed = null; // {code, reason} once closed for good
    // History position: the user's epoch and the seq a reconnect resumes
    // after (every seq up to it was seen, or came before this client's
    // first welcome). Null until known.
    this.epoch = null;
    this.seq = null;
    this._listeners = { open: [], recovered: [], message: [], close: [], error: [] };
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
    this._seqs = new Map(); // seq -> id under this.epoch, oldest first
    this._oldEpochs = new Map(); // epoch -> its seq map, for late redeliveries
    this._since = null; // the seq the current attempt asked to resume after
    this._restored = false; // the first connection resumes from storage
    const r = this.opts.resume;
    if (r && this._validPosition(r.epoch, r.seq)) this._setPosition(r.epoch, r.seq);
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

  /** Where a reconnect resumes from: {epoch, seq}, or null. */
  get position() {
    return this._validPosition(this.epoch, this.seq) ? { epoch: this.epoch, seq: this.seq } : null;
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

  /**
   * Close for good: no reconnect. The position stays readable (`position`)
   * and, with `persist`, stored: a new client resumes from it.
   */
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

  // ---- history position ----

  _validPosition(epoch, seq) {
    return typeof epoch === "string" && epoch !== "" && Number.isSafeInteger(seq) && seq >= 0;
  }

  /** Start over under `epoch` at `seq`: the seqs seen before are forgotten. */
  _setPosition(epoch, seq) {
    if (this.epoch !== null && this.epoch !== epoch && this._seqs.size > 0) {
      this._oldEpochs.delete(this.epoch);
      this._oldEpochs.set(this.epoch, this._seqs);
      while (this._oldEpochs.size > 3) this._oldEpochs.delete(this._oldEpochs.keys().next().value);
    }
    this._oldEpochs.delete(epoch);
    this.epoch = epoch;
    this.seq = seq;
    this._seqs = new Map();
    this._store();
  }

  /** Record (seq, id) under the current epoch; move the position on. */
  _note(seq, id) {
    const seqs = this._seqs;
    seqs.set(seq, id);
    if (seqs.size > this.opts.historyDedupeSize) {
      const oldest = seqs.keys().next().value;
      seqs.delete(oldest);
      // A hole older than the whole window is not coming: step over it.
      if (this.seq !== null && oldest > this.seq) this.seq = oldest;
    }
    if (this.seq === null) this.seq = seq;
    while (seqs.has(this.seq + 1)) this.seq++;
    this._store();
  }

  /** The user this client connects as, when it can tell (for storage). */
  _userHint(token) {
    if (this.opts.user) return String(this.opts.user);
    if (!token) return null;
    try {
      const b = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(b + "===".slice((b.length + 3) % 4))).sub ?? null;
    } catch {
      return null;
    }
  }

  _storage() {
    if (!this.opts.persist) return null;
    try {
      return this.opts.storage || globalThis.sessionStorage || null;
    } catch {
      return null; // sessionStorage can throw (e.g. disabled storage)
    }
  }

  _store() {
    const st = this._storage();
    if (!st || !this.position) return;
    try {
      st.setItem(
        this.opts.storageKey,
        JSON.stringify({ user: this._user ?? null, epoch: this.epoch, seq: this.seq }),
      );
    } catch {
      // quota or disabled storage: resume still works within this page
    }
  }

  _restore(user) {
    this._restored = true;
    const st = this._storage();
    if (!st || this.position) return;
    try {
      const v = JSON.parse(st.getItem(this.opts.storageKey));
      if (!v || (user && v.user && v.user !== user)) return;
      if (this._validPosition(v.epoch, v.seq)) this._setPosition(v.epoch, v.seq);
    } catch {
      // nothing stored, or not ours
    }
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
      if (this._user === undefined) this._user = this._userHint(token);
      if (!this._restored) this._restore(this._user);
      // Both or neither: the position a reconnect resumes from.
      this._since = null;
      if (this.position) {
        this._since = this.seq;
        u.searchParams.set("since", String(this.seq));
        u.searchParams.set("epoch", this.epoch);
      }
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

  _welcome(f) {
    const asked = this._since !== null;
    const recovered = asked && typeof f.recovered === "boolean" ? f.recovered : null;
    if (!this._validPosition(f.epoch, f.seq)) {
      // History off (epoch ""), or a server without it: nothing to resume.
      this.epoch = null;
      this.seq = null;
      this._seqs = new Map();
    } else if (!(recovered === true && f.epoch === this.epoch)) {
      // Fresh start (no resume asked, or recovered false): whatever the
      // user had up to f.seq comes from the mailbox or is gone; every later
      // message comes to this connection. (On recovered true every message
      // after our seq follows: the position stays.)
      this._setPosition(f.epoch, f.seq);
    }
    return {
      recovered,
      epoch: typeof f.epoch === "string" ? f.epoch : null,
      seq: Number.isSafeInteger(f.seq) ? f.seq : null,
      since: this._since,
    };
  }

  /** A gap found on an open connection: report it, start over at `seq`. */
  _gap(epoch, seq, reason) {
    this._setPosition(epoch, seq);
    this._emit("recovered", { recovered: false, epoch, seq, since: null, reason });
  }

  /** True when a message frame is new (to be shown), false for a repeat. */
  _fresh(f) {
    if (typeof f.epoch !== "string" || f.epoch === "" || !Number.isSafeInteger(f.seq)) {
      return this._firstSight(f.id); // a topic message, or history off
    }
    if (f.epoch !== this.epoch) {
      const old = this._oldEpochs.get(f.epoch);
      if (old) {
        // A late redelivery under an epoch this client has moved on from.
        if (old.get(f.seq) === f.id || !this._firstSight(f.id)) return false;
        old.set(f.seq, f.id);
        return true;
      }
      if (this.epoch === null) this._setPosition(f.epoch, Math.max(0, f.seq - 1));
      // The user's counter started again: messages before may be lost.
      else this._gap(f.epoch, 0, "epoch");
    }
    const had = this._seqs.get(f.seq);
    if (had === f.id) return false;
    if (had !== undefined) {
      // Same (epoch, seq), another message: the server lost data.
      this._gap(f.epoch, Math.max(0, f.seq - 1), "seq_reused");
      this._firstSight(f.id);
      this._note(f.seq, f.id);
      return true;
    }
    const first = this._firstSight(f.id);
    this._note(f.seq, f.id);
    return first;
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
      case "welcome": {
        this.welcome = f;
        this._attempt = 0;
        if (this.opens++ > 0) this.reconnects++;
        const rec = this._welcome(f);
        for (const t of this._topics) {
          this._request({ type: "subscribe", topic: t }, "subscribe", t).catch((e) =>
            this._emit("error", e),
          );
        }
        this._emit("open", f);
        this._emit("recovered", rec);
        break;
      }
      case "message":
        if (this._fresh(f)) this._emit("message", f);
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

  /** Close codes after which the client stays closed. */
  _final(code) {
    if (code === 4001) return !this.opts.getToken; // token expired: a new one may do
    return code >= 4000 && code <= 4099; // closed by the app
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
    if (!this._stopped && this._final(code)) {
      this._stopped = true;
      clearTimeout(this._timer);
    }
    if (this._stopped) this.closed = { code, reason };
    const delay = this._stopped ? null : this._schedule(code);
    this._emit("close", { code, reason, reconnectInMs: delay, willReconnect: delay !== null });
  }

  /** Schedule the next attempt; returns its delay in ms. */
  _schedule(code) {
    if (this._stopped) return null;
    const o = this.opts;
    let delay;
    if (code === 1012 || code === 4001) {
      // Node going away: the load balancer has others. Token expired: a
      // fresh one from getToken. Fast, but jittered.
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

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
//   the server's own 4001 (reason "token expired") when it has getToken: it
//   fetches a new token and reconnects. An app's 4001 (POST /api/disconnect
//   keeps the app's reason) is final, as every app close is.
// - Token refresh: with getToken, and a token that has an `exp` (read from
//   the JWT payload, not verified), it calls getToken shortly before expiry
//   (at 85 % of the time left, at least refreshMarginMs before `exp`) and
//   sends `{"type":"refresh","token":..}` on the open connection: the
//   connection lives on, no reconnect. `refreshed` schedules the next one
//   from the new `exp`; a refused refresh (`forbidden`) keeps the old expiry
//   (and is retried while there is time); if the server then closes with
//   4001, the client reconnects with a fresh token. The current token
//   (the last accepted) is reused by reconnects while it is valid; getToken
//   is called again after a 4001, after an attempt that failed, or when it
//   is about to expire.
// - Resume: keeps the user's history position (the `epoch` and the last
//   `seq`, from `welcome` and from user messages) and reconnects with
//   `since=<seq>&epoch=<epoch>`, so every message sent while it was away
//   follows the new `welcome` (`recovered: true`), or it learns that this
//   could not be promised (`recovered: false`: reload the app's state). The
//   first connection resumes only from the `resume` option or, with
//   `persist`, from sessionStorage (the position, and the newest seqs seen,
//   survive a page reload).
//   A `welcome` without `epoch` comes from a server without history (an
//   older release, e.g. during a rolling upgrade): the position is
//   forgotten (`recovered: false`, reason "unsupported", when one was held)
//   until a welcome with an epoch gives a new one.
// - Drops redelivered messages: user messages by (`epoch`, `seq`) (the last
//   `historyDedupeSize` seqs per epoch), all messages by `id` (the last
//   `dedupeSize` ids). A message under a new epoch is new. A seq already seen
//   under the same epoch with another id means the server lost data: that
//   is reported as `recovered: false` (and the message shown), not dropped.
// - Subscriptions are made again after every reconnect.
// - Options: url (ws:// or wss:// URL of /ws; default: this page's host),
//   token (string; with getToken, used for the first connection) or
//   getToken (async () => string), user (development servers only:
//   ?user=NAME), minDelayMs (500), maxDelayMs (15000), restartDelayMs
//   (1000), dedupeSize (10000), historyDedupeSize (1000), sendTimeoutMs
//   (10000), autoRefresh (true), refreshMarginMs (3000), resume ({epoch,
//   seq}: resume from there on the first connection), persist (false; true
//   keeps the position in sessionStorage), storageKey ("wscluster:resume"),
//   storage (a Storage; default sessionStorage).
// - Events (`on(name, fn)` returns a function that removes the listener):
//   "open" (the welcome frame: {node, conn, user, epoch, seq, recovered}),
//   "recovered" ({recovered: true|false|null, epoch, seq, since, reason},
//   after every welcome, before the messages that follow it: null when no
//   resume was asked, false when some messages may be missing, with
//   `reason` "history" (not kept that far back), "epoch" (the user's
//   history started again), "history_off", "unsupported" (a server without
//   history) or, on an open connection, "seq_reused"; reason is null
//   otherwise), "message" (a message frame, once per message), "refreshed"
//   ({exp}: the server took a new token; the connection now lasts until
//   exp), "refresh_failed" ({code, message, exp}: refused, e.g. code
//   "forbidden", or getToken failed; exp is the expiry that still stands),
//   "close" ({code, reason, reconnectInMs, willReconnect}; reconnectInMs is
//   null and willReconnect false when the client will not reconnect),
//   "error" (an error frame from the server, or an Error; a failed refresh
//   is reported here too).
// - Methods: send(to, payload), subscribe(topic), unsubscribe(topic),
//   refresh(token?) (refresh now, with `token` or one from getToken;
//   resolves with the new exp), close().
// - State: `epoch` and `seq` (the position a reconnect resumes from; also
//   `position`), `welcome`, `node`, `connected`, `reconnects`, `duplicates`,
//   `token` and `tokenExp` (the current token and its exp, unix s),
//   `closed` ({code, reason} once it stopped for good).

// Error codes that answer a `refresh` (which carries no ref).
const REFRESH_ERRORS = new Set(["forbidden", "unknown_type", "rate_limited"]);
// How many of the newest (seq, id)s seen `persist` keeps across reloads.
const STORED_SEEN = 64;
// The reason of the server's own 4001 (the session's token expired).
const TOKEN_EXPIRED = "token expired";

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
        autoRefresh: true,
        refreshMarginMs: 3000,
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
    this._listeners = {
      open: [], recovered: [], message: [], refreshed: [], refresh_failed: [], close: [], error: [],
    };
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
    // The current token (the last one the server took, or the one being
    // tried) and what its payload says; reused by a reconnect while good.
    this.token = null;
    this._claims = null; // {sub, exp, iat} of this.token (exp/iat may be null)
    this._tokenAt = 0; // Date.now() when this.token was obtained
    this._reuseToken = false;
    this._refresh = null; // the refresh in flight: {ws, token, promise, ...}
    this._refreshTimer = null;
    if (this.opts.token) {
      this._setToken(String(this.opts.token));
      this._reuseToken = true;
    }
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

  /** The current token's `exp` (unix s), or null. */
  get tokenExp() {
    return this._claims && Number.isFinite(this._claims.exp) ? this._claims.exp : null;
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
   * Give the open connection a new token (`token`, or one from getToken)
   * before the current one expires. Resolves with the new `exp` once the
   * server took it (`refreshed`); rejects when it was refused (the error
   * has `code`, e.g. "forbidden": the old expiry stands), on a timeout, or
   * when the connection closes first. Done by itself with getToken.
   */
  refresh(token) {
    if (this._refresh) return this._refresh.promise;
    if (!this.connected) return Promise.reject(new Error("not connected"));
    const r = { ws: this.ws, token: null, timer: null };
    r.promise = new Promise((resolve, reject) => {
      r.resolve = resolve;
      r.reject = reject;
    });
    this._refresh = r;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    (async () => {
      const t = token ?? (this.opts.getToken ? await this.opts.getToken() : null);
      if (this._refresh !== r) return; // the connection closed meanwhile
      if (!t) throw new Error("no token to refresh with (no getToken)");
      if (r.ws !== this.ws || !this.connected) throw new Error("not connected");
      r.token = String(t);
      r.timer = setTimeout(() => this._refreshDone(r, new Error("refresh timed out")), this.opts.sendTimeoutMs);
      this._raw({ type: "refresh", token: r.token });
    })().catch((e) => this._refreshDone(r, e instanceof Error ? e : new Error(String(e))));
    return r.promise;
  }

  /**
   * Close for good: no reconnect. The position stays readable (`position`)
   * and, with `persist`, stored: a new client resumes from it.
   */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
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
    return WsClusterClient.claims(token)?.sub ?? null;
  }

  /** A JWT's payload (base64url JSON; not verified), or null. */
  static claims(token) {
    try {
      const b = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bin = atob(b + "===".slice((b.length + 3) % 4));
      const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
      const v = JSON.parse(new TextDecoder().decode(bytes));
      return v && typeof v === "object" ? v : null;
    } catch {
      return null;
    }
  }

  // ---- token and refresh ----

  _setToken(token, exp) {
    const c = WsClusterClient.claims(token) || {};
    this.token = token;
    this._tokenAt = Date.now();
    this._claims = {
      sub: typeof c.sub === "string" ? c.sub : null,
      exp: Number.isFinite(exp) ? exp : Number.isFinite(c.exp) ? c.exp : null,
      iat: Number.isFinite(c.iat) ? c.iat : null,
    };
  }

  /**
   * Milliseconds the current token has left, or null (no exp). By this
   * clock, and by `iat` when the token has one (a clock running behind the
   * issuer's would otherwise think it has more time than it has).
   */
  _tokenLeftMs() {
    const exp = this.tokenExp;
    if (exp === null) return null;
    let left = exp * 1000 - Date.now();
    const iat = this._claims.iat;
    if (iat !== null && iat <= exp) left = Math.min(left, (exp - iat) * 1000 - (Date.now() - this._tokenAt));
    return left;
  }

  /** The token for a connection attempt: the current one while good, else a new one. */
  async _tokenForAttempt() {
    if (!this.opts.getToken) return this.opts.token || null;
    const left = this._tokenLeftMs();
    if (this.token && this._reuseToken && (left === null || left > this.opts.refreshMarginMs)) {
      return this.token;
    }
    const t = await this.opts.getToken();
    if (t) this._setToken(String(t));
    return t ? String(t) : null;
  }

  /** Schedule the next automatic refresh from the current token's exp. */
  _planRefresh(afterFailure) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.opts.getToken || !this.opts.autoRefresh || !this.connected || this._refresh) return;
    const left = this._tokenLeftMs();
    if (left === null) return;
    const margin = this.opts.refreshMarginMs;
    let delay;
    if (afterFailure) {
      // Refused (or getToken failed): once more halfway to the margin, if
      // there is time; else the server's 4001 brings a reconnect.
      if (left - margin < 2000) return;
      delay = (left - margin) / 2;
    } else {
      // 85 % of the time left, at least `margin` before exp; a lifetime
      // shorter than that: half of it.
      if (left < 1000) return;
      delay = Math.max(Math.min(left * 0.85, left - margin), left / 2);
    }
    const ws = this.ws;
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (ws === this.ws && this.connected) this.refresh().catch(() => {});
    }, delay);
  }

  /**
   * End the refresh `r`: accepted (`exp`) or failed (`err`). `quiet`: the
   * connection closed; no event. `reported`: the error frame was emitted.
   */
  _refreshDone(r, err, exp, { quiet = false, reported = false } = {}) {
    if (this._refresh !== r) return;
    this._refresh = null;
    clearTimeout(r.timer);
    if (!err) {
      this._setToken(r.token, exp);
      this._reuseToken = true;
      this._emit("refreshed", { exp: this.tokenExp });
      r.resolve(this.tokenExp);
      this._planRefresh(false);
      return;
    }
    r.reject(err);
    if (quiet) return;
    this._emit("refresh_failed", { code: err.code ?? null, message: err.message, exp: this.tokenExp });
    if (!reported) this._emit("error", err);
    this._planRefresh(true);
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
    // The newest (seq, id)s seen too: a redelivery right after a reload
    // (e.g. a dead node's messages re-routed to the mailbox) is still a
    // repeat in the new page.
    const seen = [];
    let skip = this._seqs.size - STORED_SEEN;
    for (const [seq, id] of this._seqs) if (skip-- <= 0) seen.push([seq, id]);
    try {
      st.setItem(
        this.opts.storageKey,
        JSON.stringify({ user: this._user ?? null, epoch: this.epoch, seq: this.seq, seen }),
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
      if (!this._validPosition(v.epoch, v.seq)) return;
      this._setPosition(v.epoch, v.seq);
      for (const e of Array.isArray(v.seen) ? v.seen : []) {
        if (!Array.isArray(e) || !Number.isSafeInteger(e[0]) || typeof e[1] !== "string") continue;
        this._seqs.set(e[0], e[1]);
        this._firstSight(e[1]);
      }
    } catch {
      // nothing stored, or not ours
    }
  }

  async _connect() {
    if (this._stopped) return;
    let url;
    try {
      const u = new URL(this.opts.url, globalThis.location ? location.href : undefined);
      const token = await this._tokenForAttempt();
      if (token) u.searchParams.set("token", token);
      else if (this.opts.user) u.searchParams.set("user", this.opts.user);
      const user = this._userHint(token);
      if (this._user === undefined) this._user = user;
      else if (user && this._user && user !== this._user) {
        // getToken now gives another user: the position was the other's.
        this._forget();
        this._user = user;
      }
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
    const askedEpoch = this.epoch;
    if (f.epoch === undefined) {
      // A server without history (an older release, during a rolling
      // upgrade): it ignored the resume; the position means nothing there.
      // Resume again only from a welcome that gives one.
      this._forget();
      return {
        recovered: asked ? false : null,
        epoch: null,
        seq: null,
        since: this._since,
        reason: asked ? "unsupported" : null,
      };
    }
    const recovered = asked && typeof f.recovered === "boolean" ? f.recovered : null;
    let reason = null;
    if (recovered === false) {
      reason = f.epoch === "" ? "history_off" : f.epoch !== askedEpoch ? "epoch" : "history";
    }
    if (!this._validPosition(f.epoch, f.seq)) {
      // History off (epoch ""): nothing to resume.
      this._forget();
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
      reason,
    };
  }

  /** No position any more (nor in storage): the next connect resumes nothing. */
  _forget() {
    this.epoch = null;
    this.seq = null;
    this._seqs = new Map();
    const st = this._storage();
    if (!st) return;
    try {
      st.removeItem(this.opts.storageKey);
    } catch {
      // disabled storage
    }
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
        this._reuseToken = true; // the token worked
        this._emit("open", f);
        this._emit("recovered", rec);
        this._planRefresh(false);
        break;
      }
      case "message":
        if (this._fresh(f)) this._emit("message", f);
        else this.duplicates++;
        break;
      case "sent":
        this._settle(f.ref, true, f.id);
        break;
      case "refreshed":
        if (this._refresh && this._refresh.token !== null) {
          this._refreshDone(this._refresh, null, Number.isFinite(f.exp) ? f.exp : undefined);
        }
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
        // A refresh is answered without a ref: "forbidden" (refused), or
        // "unknown_type" from a server that does not know refresh.
        const r = this._refresh;
        if (r && r.token !== null && f.ref == null && REFRESH_ERRORS.has(f.code)) {
          this._refreshDone(r, err, undefined, { reported: true });
        }
        break;
      }
      default:
        break;
    }
  }

  /** Close codes after which the client stays closed. */
  _final(code, reason) {
    // The token expired: a new one may do.
    if (code === 4001 && reason === TOKEN_EXPIRED) return !this.opts.getToken;
    return code >= 4000 && code <= 4099; // closed by the app
  }

  _closed(ws, code, reason) {
    if (ws !== this.ws) return;
    // A token that did not get a welcome, or expired (4001): ask for a new one.
    if (this.welcome === null || code === 4001) this._reuseToken = false;
    this.ws = null;
    this.welcome = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this._refresh) {
      this._refreshDone(this._refresh, new Error("connection closed before refresh was answered"), undefined, {
        quiet: true,
      });
    }
    this.subscribed.clear();
    for (const [ref, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new Error(`connection closed before ${p.kind} was answered`));
      this._pending.delete(ref);
    }
    if (!this._stopped && this._final(code, reason)) {
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

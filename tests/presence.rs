//! Issue 15: presence, events and control (contract §10), and token expiry
//! and refresh (§3). Real redis-server, real nodes, real WebSocket clients.
//!
//! `<p>:events` is read as an app applies it: per user, an event whose `n`
//! is not above the last one applied is a repeat and is dropped; what is
//! left must alternate `online`/`offline`, starting with `online`, and end
//! where `/api/presence` says the user is.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn now_s() -> u64 {
    now_ms() / 1000
}

/// `prefix-000`, `prefix-001`, …
fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// An HS256 token for `sub` expiring at `exp` (Unix s), signed with `secret`.
fn hs256(secret: &str, sub: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `GET /api/presence?user=…` with the bearer `key` (none: no header).
async fn get_presence(node: &NodeProc, users: &[String], key: Option<&str>) -> (u16, Value) {
    let q: Vec<String> = users.iter().map(|u| format!("user={u}")).collect();
    let mut req = reqwest::Client::new().get(node.http(&format!("/api/presence?{}", q.join("&"))));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("GET /api/presence");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Live connections per user by `/api/presence` on `node`; `online`
/// must agree with the count.
async fn presence(node: &NodeProc, users: &[String]) -> HashMap<String, u64> {
    let (status, body) = get_presence(node, users, Some(API_KEY)).await;
    assert_eq!(status, 200, "presence on {}: {body}", node.name);
    let map = body["users"].as_object().expect("\"users\" object");
    assert_eq!(map.len(), users.len(), "one answer per user: {body}");
    users
        .iter()
        .map(|u| {
            let e = map
                .get(u)
                .unwrap_or_else(|| panic!("{u} missing from presence"));
            let n = e["connections"]
                .as_u64()
                .unwrap_or_else(|| panic!("{u}: connections in {e}"));
            assert_eq!(e["online"], json!(n > 0), "{u}: online vs count in {e}");
            (u.clone(), n)
        })
        .collect()
}

/// `POST /api/disconnect` with `body` and the bearer `key`.
async fn post_disconnect(node: &NodeProc, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(node.http("/api/disconnect"))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("POST /api/disconnect");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// One `<p>:events` entry.
#[derive(Debug, Clone)]
struct Ev {
    id: String,
    f: HashMap<String, String>,
}

impl Ev {
    fn get(&self, k: &str) -> &str {
        self.f.get(k).map(String::as_str).unwrap_or("")
    }
    fn ty(&self) -> &str {
        self.get("type")
    }
    fn n(&self) -> u64 {
        self.get("n")
            .parse()
            .unwrap_or_else(|_| panic!("event without a numeric n: {self:?}"))
    }
    fn short(&self) -> String {
        format!(
            "{} {}(n {}, node {}, conn {})",
            self.id,
            self.ty(),
            self.get("n"),
            self.get("node"),
            self.get("conn")
        )
    }
}

/// Every entry of `wsc:events`, oldest first.
fn events(redis: &Redis) -> Vec<Ev> {
    let mut r = redis.conn();
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("wsc:events")
        .arg("-")
        .arg("+")
        .query(&mut r)
        .expect("XRANGE wsc:events");
    v.into_iter()
        .map(|(id, f)| Ev {
            id,
            f: f.into_iter().collect(),
        })
        .collect()
}

/// Node events of type `ty` about `node`.
fn node_events(evs: &[Ev], ty: &str, node: &str) -> Vec<Ev> {
    evs.iter()
        .filter(|e| e.ty() == ty && e.get("node") == node)
        .cloned()
        .collect()
}

/// The `online`/`offline` events of `user` as an app applies them: one
/// whose `n` is not above the last applied is a repeat and is dropped (it
/// must repeat what it claims to: the same type and conn as the applied
/// event with its `n`). Every event carries `at_ms`, `node`, `conn`, `n`.
fn applied(evs: &[Ev], user: &str) -> Vec<Ev> {
    let mut out: Vec<Ev> = Vec::new();
    let mut last: Option<u64> = None;
    for e in evs
        .iter()
        .filter(|e| (e.ty() == "online" || e.ty() == "offline") && e.get("user") == user)
    {
        for k in ["at_ms", "node", "conn", "n"] {
            assert!(!e.get(k).is_empty(), "event without {k}: {e:?}");
        }
        assert!(e.get("at_ms").parse::<u64>().is_ok(), "at_ms: {e:?}");
        let n = e.n();
        if last.is_some_and(|l| n <= l) {
            if let Some(a) = out.iter().find(|a| a.n() == n) {
                assert_eq!(
                    (a.ty(), a.get("conn")),
                    (e.ty(), e.get("conn")),
                    "{user}: a repeat ({}) differs from the event it repeats ({})",
                    e.short(),
                    a.short()
                );
            }
            continue;
        }
        last = Some(n);
        out.push(e.clone());
    }
    out
}

fn describe(seq: &[Ev]) -> String {
    seq.iter().map(Ev::short).collect::<Vec<_>>().join(", ")
}

/// Why `user`'s applied events do not alternate `online`/`offline` from
/// `online` (None: they do).
fn alternation_error(user: &str, seq: &[Ev]) -> Option<String> {
    seq.iter().enumerate().find_map(|(i, e)| {
        let want = if i % 2 == 0 { "online" } else { "offline" };
        (e.ty() != want).then(|| {
            format!(
                "{user}: applied event {i} is {}, expected {want}; applied: [{}]",
                e.ty(),
                describe(seq)
            )
        })
    })
}

/// The types of `user`'s applied events.
fn types(evs: &[Ev], user: &str) -> Vec<String> {
    applied(evs, user)
        .iter()
        .map(|e| e.ty().to_owned())
        .collect()
}

type Wss = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// A close frame: code and reason.
    Closed(u16, String),
    /// Closed without a close frame, or broken.
    Broken,
    /// Still open when the time was up.
    Quiet,
}

/// A WebSocket client that sees close reasons and never panics on a
/// failed write (the server may close first).
struct Peer {
    ws: Wss,
    welcome: Value,
}

impl Peer {
    async fn try_open(url: &str) -> Result<Peer, String> {
        let (ws, _) = tokio::time::timeout(T, connect_async(url))
            .await
            .map_err(|_| "connect timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut p = Peer {
            ws,
            welcome: Value::Null,
        };
        match p.next(T).await {
            Ok(w) if w["type"] == "welcome" => {
                p.welcome = w;
                Ok(p)
            }
            Ok(v) => Err(format!("first frame is not welcome: {v}")),
            Err(e) => Err(format!("no welcome: {e:?}")),
        }
    }

    async fn open(url: &str) -> Peer {
        Self::try_open(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// `?user=` (the nodes run with `--dev`).
    async fn dev(node: &NodeProc, user: &str) -> Peer {
        Self::open(&node.ws_url(&format!("user={user}"))).await
    }

    fn conn(&self) -> String {
        self.welcome["conn"].as_str().unwrap_or_default().to_owned()
    }

    fn user(&self) -> String {
        self.welcome["user"].as_str().unwrap_or_default().to_owned()
    }

    async fn send(&mut self, v: Value) {
        let _ = self.ws.send(WsMessage::Text(v.to_string().into())).await;
    }

    /// The next JSON frame, or how the connection ended.
    async fn next(&mut self, timeout: Duration) -> Result<Value, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(End::Quiet),
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    return Ok(serde_json::from_str(t.as_str()).expect("frames are JSON"));
                }
                Ok(Some(Ok(WsMessage::Close(f)))) => {
                    return Err(match f {
                        Some(f) => End::Closed(f.code.into(), f.reason.to_string()),
                        None => End::Broken,
                    });
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return Err(End::Broken),
            }
        }
    }

    /// How the connection ends within `timeout` (frames are skipped).
    async fn end(&mut self, timeout: Duration) -> End {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(e) = self.next(left).await {
                return e;
            }
        }
    }

    /// Nothing closes it for `quiet`, and a ping then gets its pong.
    async fn assert_open(&mut self, quiet: Duration, what: &str) {
        let e = self.end(quiet).await;
        assert_eq!(e, End::Quiet, "{what}: {} closed", self.conn());
        self.send(json!({"type": "ping"})).await;
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(v) if v["type"] == "pong" => return,
                Ok(_) => {}
                Err(e) => panic!("{what}: no pong from {}: {e:?}", self.conn()),
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A node stopped with SIGSTOP; SIGCONT when thawed or dropped (on every
/// path, a failed assertion included).
struct Frozen(i32);

impl Frozen {
    fn stop(node: &NodeProc) -> Frozen {
        node.signal(libc::SIGSTOP);
        Frozen(node.pid())
    }
    fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        wscluster_testkit::signal(self.0, libc::SIGCONT);
    }
}

/// Wait until every one of `users` has `want` applied events.
async fn wait_applied(redis: &Redis, users: &[String], want: usize, what: &str) {
    eventually(what, T, || async {
        let evs = events(redis);
        users
            .iter()
            .all(|u| applied(&evs, u).len() == want)
            .then_some(())
    })
    .await;
}

// ---------------------------------------------------------------- 1. presence

/// `/api/presence` counts a multi-device user's connections on every node,
/// answers a user never seen with offline/0, answers 1,000 users at once
/// (exactly those connected online), refuses more than 1,000 or none or a
/// bad id with 400, a missing or wrong key with 401, and is 404 on a node
/// without `--api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_connections_on_every_node() {
    let (redis, nodes) = cluster(2).await;
    let mut m0 = Peer::dev(&nodes[0], "multi").await;
    let m1 = Peer::dev(&nodes[1], "multi").await;
    let _s = Peer::dev(&nodes[1], "single").await;
    let users = strings(&["multi", "single", "never-seen"]);
    for n in &nodes {
        let p = presence(n, &users).await;
        assert_eq!(p["multi"], 2, "on {}", n.name);
        assert_eq!(p["single"], 1, "on {}", n.name);
        assert_eq!(p["never-seen"], 0, "on {}", n.name);
    }
    let (status, body) =
        get_presence(&nodes[0], &strings(&["multi", "never-seen"]), Some(API_KEY)).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"users": {
            "multi": {"online": true, "connections": 2},
            "never-seen": {"online": false, "connections": 0},
        }})
    );

    // One device goes: counted down, still online.
    m1.close().await;
    eventually("multi counted down to 1", T, || async {
        (presence(&nodes[0], &users).await["multi"] == 1).then_some(())
    })
    .await;
    m0.assert_open(Duration::ZERO, "multi's other device").await;

    // 1,000 users in one request: 20 of them online, 10 of those twice.
    let many: Vec<String> = (0..1000).map(|i| format!("pu-{i:04}")).collect();
    let mut want: HashMap<String, u64> = many.iter().map(|u| (u.clone(), 0)).collect();
    let mut peers = Vec::new();
    for (i, u) in many.iter().enumerate().filter(|(i, _)| i % 50 == 7) {
        let home = (i / 50) % 2;
        peers.push(Peer::dev(&nodes[home], u).await);
        *want.get_mut(u).unwrap() += 1;
        if i % 100 == 7 {
            peers.push(Peer::dev(&nodes[1 - home], u).await);
            *want.get_mut(u).unwrap() += 1;
        }
    }
    let got = presence(&nodes[1], &many).await;
    assert_eq!(got, want, "presence of 1,000 users");
    assert_eq!(got.values().filter(|n| **n > 0).count(), 20);

    // Over 1,000, none, or a bad id: 400.
    let mut over = many.clone();
    over.push("pu-1000".into());
    assert_eq!(get_presence(&nodes[0], &over, Some(API_KEY)).await.0, 400);
    assert_eq!(get_presence(&nodes[0], &[], Some(API_KEY)).await.0, 400);
    assert_eq!(
        get_presence(&nodes[0], &strings(&["ok", "bad%20user"]), Some(API_KEY))
            .await
            .0,
        400
    );
    // No key or a wrong one: 401.
    assert_eq!(get_presence(&nodes[0], &users, None).await.0, 401);
    assert_eq!(get_presence(&nodes[0], &users, Some("wrong")).await.0, 401);

    // A node without --api-key has neither endpoint (as /api/send).
    let mut args = fast_args(&redis);
    let i = args.iter().position(|a| a == "--api-key").unwrap();
    args.drain(i..i + 2);
    let nokey = NodeProc::start("nokey", &args);
    nokey.wait_ready().await;
    assert_eq!(get_presence(&nokey, &users, Some(API_KEY)).await.0, 404);
    assert_eq!(
        post_disconnect(&nokey, json!({"user": "multi"}), Some(API_KEY))
            .await
            .0,
        404
    );
}

// ---------------------------------------------------------------- 2. events

/// `online` on the user's first connection anywhere (with its node and
/// conn), nothing for a second device on another node nor when the first
/// closes, `offline` when the last closes (naming it); `node_joined` for
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_online_on_first_offline_on_last() {
    let (redis, nodes) = cluster(2).await;
    let ids = [nodes[0].node_id().await, nodes[1].node_id().await];
    let evs = events(&redis);
    for id in &ids {
        let joined = node_events(&evs, "node_joined", id);
        assert_eq!(joined.len(), 1, "one node_joined for {id}: {evs:?}");
        assert!(joined[0].get("at_ms").parse::<u64>().is_ok());
    }

    let first = Peer::dev(&nodes[0], "eve").await;
    let first_conn = first.conn();
    wait_applied(&redis, &strings(&["eve"]), 1, "eve online").await;
    let online = applied(&events(&redis), "eve").remove(0);
    assert_eq!(online.ty(), "online");
    assert_eq!(online.get("node"), ids[0]);
    assert_eq!(online.get("conn"), first_conn);

    let second = Peer::dev(&nodes[1], "eve").await;
    let second_conn = second.conn();
    first.close().await;
    eventually("eve's first device unregistered", T, || async {
        (presence(&nodes[0], &strings(&["eve"])).await["eve"] == 1).then_some(())
    })
    .await;
    second.close().await;
    wait_applied(&redis, &strings(&["eve"]), 2, "eve offline").await;
    let evs = events(&redis);
    let seq = applied(&evs, "eve");
    assert_eq!(
        types(&evs, "eve"),
        ["online", "offline"],
        "eve: [{}]",
        describe(&seq)
    );
    let offline = &seq[1];
    assert_eq!(offline.get("node"), ids[1], "offline names the last node");
    assert_eq!(
        offline.get("conn"),
        second_conn,
        "offline names the last conn"
    );
    assert!(offline.n() > online.n());
    assert!(
        offline.get("at_ms").parse::<u64>().unwrap() >= online.get("at_ms").parse::<u64>().unwrap()
    );
    // Everything else about eve in the stream is a repeat of these two.
    for e in evs.iter().filter(|e| e.get("user") == "eve") {
        assert!(
            e.n() == online.n() || e.n() == offline.n(),
            "an event beyond the two transitions: {e:?}"
        );
    }
    assert_eq!(presence(&nodes[1], &strings(&["eve"])).await["eve"], 0);
}

/// `--events-max 5`: after 10 users came and went (21 events with the
/// node's `node_joined`), `<p>:events` holds exactly the newest 5 (§10),
/// the last `offline` among them. (An approximate `MAXLEN ~` kept all 21.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_keep_exactly_the_newest_events_max() {
    let (redis, nodes) = cluster_with(1, &["--events-max", "5"]).await;
    let node = &nodes[0];
    let users = names("cap", 10);
    for u in &users {
        Peer::dev(node, u).await.close().await;
    }
    let last = users.last().expect("users").clone();
    eventually("the last user's offline", T, || async {
        let evs = events(&redis);
        evs.iter()
            .any(|e| e.get("user") == last && e.ty() == "offline")
            .then_some(())
    })
    .await;
    let evs = events(&redis);
    assert_eq!(evs.len(), 5, "exactly --events-max kept: {evs:?}");
    assert!(
        evs.iter()
            .any(|e| e.get("user") == last && e.ty() == "offline"),
        "the newest kept: {evs:?}"
    );
}

// ---------------------------------------------------------------- 3. SIGKILL

/// A node holding 50 users is SIGKILLed; 15 of them are also on the
/// survivor, 5 more only there. After the reap: each user only on the dead
/// node got exactly one `offline` (naming the dead node and its conn), the
/// others none; `node_reaped` names the survivor as `by`; presence agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_reaper_takes_its_users_offline() {
    let (redis, mut nodes) = cluster(2).await;
    let a_id = nodes[0].node_id().await;
    let b_id = nodes[1].node_id().await;
    let on_a = names("k", 50);
    let (shared, a_only) = on_a.split_at(15);
    let b_only = names("kb", 5);
    let mut conn_on_a: HashMap<String, String> = HashMap::new();
    let mut peers = Vec::new();
    for u in &on_a {
        let p = Peer::dev(&nodes[0], u).await;
        conn_on_a.insert(u.clone(), p.conn());
        peers.push(p);
    }
    for u in shared.iter().chain(&b_only) {
        peers.push(Peer::dev(&nodes[1], u).await);
    }
    let all: Vec<String> = on_a.iter().chain(&b_only).cloned().collect();
    wait_applied(&redis, &all, 1, "everyone online").await;

    let killed = Instant::now();
    nodes[0].kill9();
    let reaped = eventually("node_reaped for the killed node", T, || async {
        node_events(&events(&redis), "node_reaped", &a_id).pop()
    })
    .await;
    eprintln!("reaped {:?} after the kill", killed.elapsed());
    assert_eq!(reaped.get("by"), b_id, "reaped by the survivor");
    wait_applied(&redis, a_only, 2, "users only on the dead node offline").await;

    let evs = events(&redis);
    let elsewhere: Vec<String> = shared.iter().chain(&b_only).cloned().collect();
    only_theirs_went_offline(&evs, &nodes[1], &a_id, a_only, &elsewhere, Some(&conn_on_a)).await;
}

/// After node `gone` ended: each user of `gone_only` (connected only there)
/// went online then offline, the offline naming `gone` (and the user's
/// conn there, when `conns` has it); each of `elsewhere` (also connected to
/// `survivor`) is still just online; presence on `survivor` agrees.
async fn only_theirs_went_offline(
    evs: &[Ev],
    survivor: &NodeProc,
    gone: &str,
    gone_only: &[String],
    elsewhere: &[String],
    conns: Option<&HashMap<String, String>>,
) {
    for u in gone_only {
        let seq = applied(evs, u);
        assert_eq!(
            types(evs, u),
            ["online", "offline"],
            "{u}: [{}]",
            describe(&seq)
        );
        assert_eq!(seq[1].get("node"), gone, "{u}: offline names the node");
        if let Some(c) = conns {
            assert_eq!(seq[1].get("conn"), c[u], "{u}: and its conn");
        }
    }
    for u in elsewhere {
        assert_eq!(
            types(evs, u),
            ["online"],
            "{u} still has a connection on the survivor: [{}]",
            describe(&applied(evs, u))
        );
    }
    let all: Vec<String> = gone_only.iter().chain(elsewhere).cloned().collect();
    let p = presence(survivor, &all).await;
    for u in gone_only {
        assert_eq!(p[u], 0, "{u}");
    }
    for u in elsewhere {
        assert_eq!(p[u], 1, "{u}");
    }
}

// ---------------------------------------------------------------- 4. drain

/// A drained node (SIGTERM) closes its sockets with 1012; its users go
/// offline unless connected elsewhere; `node_left` (not `node_reaped`)
/// tells apps it left; presence agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_takes_its_users_offline() {
    let (redis, mut nodes) = cluster(2).await;
    let a_id = nodes[0].node_id().await;
    let on_a = names("d", 20);
    let (shared, a_only) = on_a.split_at(8);
    let b_only = names("db", 4);
    let mut peers_a = Vec::new();
    for u in &on_a {
        peers_a.push(Peer::dev(&nodes[0], u).await);
    }
    let mut peers_b = Vec::new();
    for u in shared.iter().chain(&b_only) {
        peers_b.push(Peer::dev(&nodes[1], u).await);
    }
    let all: Vec<String> = on_a.iter().chain(&b_only).cloned().collect();
    wait_applied(&redis, &all, 1, "everyone online").await;

    nodes[0].signal(libc::SIGTERM);
    for p in &mut peers_a {
        match p.end(T).await {
            End::Closed(1012, _) => {}
            e => panic!("{} on the drained node: {e:?}, expected 1012", p.user()),
        }
    }
    assert_eq!(
        nodes[0].wait_exit(Duration::from_secs(5)).await,
        Some(0),
        "drained node exits 0"
    );
    let left = eventually("node_left", T, || async {
        node_events(&events(&redis), "node_left", &a_id).pop()
    })
    .await;
    assert!(left.get("at_ms").parse::<u64>().is_ok());
    wait_applied(&redis, a_only, 2, "users only on the drained node offline").await;

    let evs = events(&redis);
    assert!(
        node_events(&evs, "node_reaped", &a_id).is_empty(),
        "a drain that finished is node_left, not node_reaped"
    );
    let elsewhere: Vec<String> = shared.iter().chain(&b_only).cloned().collect();
    only_theirs_went_offline(&evs, &nodes[1], &a_id, a_only, &elsewhere, None).await;
    for p in &mut peers_b {
        p.assert_open(Duration::ZERO, "on the survivor").await;
    }
}

/// A draining node frozen (SIGSTOP) past its reap lock is reaped by the
/// survivor (`node_reaped`); thawed, it finishes its drain and exits 0, but
/// says no `node_left` for the id already reaped (§10: one end per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_frozen_past_the_lease_is_reaped_not_left() {
    let (redis, mut nodes) = cluster_with(2, &["--drain-ms", "4000"]).await;
    let a_id = nodes[0].node_id().await;
    let users = names("dz", 30);
    let mut peers = Vec::new();
    for u in &users {
        peers.push(Peer::dev(&nodes[0], u).await);
    }
    wait_applied(&redis, &users, 1, "everyone online").await;

    nodes[0].signal(libc::SIGTERM);
    // Mid-drain: some sockets closed, most still open (4 s window).
    let first = peers[0].end(T).await;
    assert!(matches!(first, End::Closed(1012, _)), "{first:?}");
    let frozen = Frozen::stop(&nodes[0]);
    eventually("the survivor reaps the frozen drainer", T, || async {
        node_events(&events(&redis), "node_reaped", &a_id).pop()
    })
    .await;
    frozen.thaw();
    assert_eq!(
        nodes[0].wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "the thawed drainer exits 0"
    );
    wait_applied(&redis, &users, 2, "its users offline").await;
    let evs = events(&redis);
    assert_eq!(node_events(&evs, "node_reaped", &a_id).len(), 1);
    assert!(
        node_events(&evs, "node_left", &a_id).is_empty(),
        "node_left after node_reaped for {a_id}"
    );
    for u in &users {
        if let Some(e) = alternation_error(u, &applied(&evs, u)) {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------- 5. SIGSTOP

/// A node is frozen (SIGSTOP) past its lease twice, then thawed; its
/// connections survive under a new node id each time.
///
/// Round 1: it loses its lease but is not reaped while frozen (the test
/// holds the reaper's lock on it, `<p>:reaping:{id}`, an internal key: the
/// one white-box step, checked by asserting no `node_reaped` came before
/// the lock lapsed). It re-registers under a new id with no
/// `online`/`offline` at all, even once its old id is reaped later.
///
/// Round 2: frozen 2.5 s, past lease TTL + 2 heartbeats: the survivor
/// reaps it, its users only there get `offline` from the reaper (naming the
/// old id), then `online` again on the re-registration (naming the new
/// id): truthful, not a flap. Users also on the survivor never go offline.
/// Presence counts every connection again after each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_past_the_lease_ends_online() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let b_id = b.node_id().await;
    let a_only = names("fa", 12);
    let shared = names("fs", 6);
    let b_only = names("fb", 4);
    let mut peers = Vec::new();
    for u in a_only.iter().chain(&shared) {
        peers.push(Peer::dev(a, u).await);
    }
    for u in shared.iter().chain(&b_only) {
        peers.push(Peer::dev(b, u).await);
    }
    let all: Vec<String> = a_only
        .iter()
        .chain(&shared)
        .chain(&b_only)
        .cloned()
        .collect();
    let want: HashMap<String, u64> = all
        .iter()
        .map(|u| (u.clone(), if shared.contains(u) { 2 } else { 1 }))
        .collect();
    wait_applied(&redis, &all, 1, "everyone online").await;
    let mut r = redis.conn();

    // Round 1: lease lost, not reaped while frozen.
    let old = a.node_id().await;
    let before = events(&redis).len();
    let () = redis::cmd("SET")
        .arg(format!("wsc:reaping:{{{old}}}"))
        .arg("held-by-the-test")
        .arg("PX")
        .arg(4000)
        .query(&mut r)
        .expect("SET reap lock");
    let frozen = Frozen::stop(a);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    frozen.thaw();
    let new = eventually("the thawed node under a new id", T, || async {
        let id = a.node_id().await;
        (id != old).then_some(id)
    })
    .await;
    eventually("presence counts every connection again", T, || async {
        (presence(b, &all).await == want).then_some(())
    })
    .await;
    assert!(
        node_events(&events(&redis), "node_reaped", &old).is_empty(),
        "reaped while the test held its reap lock: the round does not test what it says"
    );
    // Once the lock lapses, the old id is reaped with nothing left on it.
    eventually("the old id reaped once the lock lapsed", T, || async {
        node_events(&events(&redis), "node_reaped", &old).pop()
    })
    .await;
    let evs = events(&redis);
    let user_events: Vec<String> = evs[before..]
        .iter()
        .filter(|e| e.ty() == "online" || e.ty() == "offline")
        .map(|e| format!("{} {}", e.get("user"), e.short()))
        .collect();
    assert!(
        user_events.is_empty(),
        "lease lost ({old} -> {new}), not reaped meanwhile: no user events expected, got {user_events:#?}"
    );

    // Round 2: reaped while frozen.
    let old2 = new;
    let frozen = Frozen::stop(a);
    // Reaped within TTL + 2 heartbeats (1.4 s here) while frozen.
    let reaped = eventually("the frozen node reaped", Duration::from_secs(5), || async {
        let r = node_events(&events(&redis), "node_reaped", &old2);
        (!r.is_empty()).then_some(r)
    })
    .await;
    frozen.thaw();
    assert_eq!(
        reaped.iter().map(|e| e.get("by")).collect::<Vec<_>>(),
        [b_id.as_str()],
        "reaped by the survivor"
    );
    let new2 = eventually("the thawed node under a new id", T, || async {
        let id = a.node_id().await;
        (id != old2).then_some(id)
    })
    .await;
    eventually("presence counts every connection again", T, || async {
        (presence(b, &all).await == want).then_some(())
    })
    .await;
    for p in &mut peers {
        p.assert_open(
            Duration::ZERO,
            "a connection of the frozen or the live node",
        )
        .await;
    }
    wait_applied(
        &redis,
        &a_only,
        3,
        "users only on the frozen node online again",
    )
    .await;
    let evs = events(&redis);
    for u in &a_only {
        let seq = applied(&evs, u);
        assert_eq!(
            types(&evs, u),
            ["online", "offline", "online"],
            "{u}: [{}]",
            describe(&seq)
        );
        assert_eq!(seq[1].get("node"), old2, "{u}: offline names the reaped id");
        assert_eq!(
            seq[2].get("node"),
            new2,
            "{u}: online again names the new id"
        );
        assert_eq!(
            seq[1].get("conn"),
            seq[2].get("conn"),
            "{u}: the same connection"
        );
    }
    for u in shared.iter().chain(&b_only) {
        assert_eq!(
            types(&evs, u),
            ["online"],
            "{u} kept a connection on the live node: [{}]",
            describe(&applied(&evs, u))
        );
    }
    assert_eq!(presence(b, &all).await, want);
}

// ---------------------------------------------------------------- 6. churn

/// 200 users (50 with two devices) connect and disconnect at random over 3
/// nodes for 12 s while one node is SIGKILLed and a new one joins. Once
/// every client has closed and things settle, per user the applied events
/// alternate from `online` and end `offline`, and presence says offline
/// for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_events_alternate_and_match_presence() {
    let (redis, mut nodes) = cluster(3).await;
    let victim_id = nodes[1].node_id().await;
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    let users = names("c", 200);
    let until = Instant::now() + Duration::from_secs(12);
    let connects = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let devices = if i % 4 == 0 { 2 } else { 1 };
        for d in 0..devices {
            let (u, addrs, connects) = (u.clone(), addrs.clone(), connects.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64((i * 2 + d) as u64);
                while Instant::now() < until {
                    let addr = {
                        let a = addrs.lock().unwrap();
                        a[rng.random_range(0..a.len())].clone()
                    };
                    let hold = Duration::from_millis(rng.random_range(200..1500));
                    let pause = Duration::from_millis(rng.random_range(0..400));
                    let polite = rng.random_bool(0.8);
                    if let Ok(mut p) = Peer::try_open(&format!("ws://{addr}/ws?user={u}")).await {
                        connects.fetch_add(1, Ordering::Relaxed);
                        let _ = p.end(hold).await;
                        if polite {
                            p.close().await;
                        }
                        // Otherwise dropped: the TCP connection just ends.
                    }
                    tokio::time::sleep(pause).await;
                }
            }));
        }
    }
    // The schedule of faults: a kill at 4 s, a new node at 6 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    addrs.lock().unwrap().retain(|a| *a != nodes[1].addr);
    nodes[1].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = NodeProc::start("n3", &fast_args(&redis));
    fresh.wait_ready().await;
    let fresh_id = fresh.node_id().await;
    addrs.lock().unwrap().push(fresh.addr.clone());
    for t in tasks {
        t.await.expect("client task");
    }
    let connects = connects.load(Ordering::Relaxed);
    eprintln!("churn: {connects} connections");
    assert!(connects > 1000, "only {connects} connections");

    // Settle: every user offline in the events and in presence.
    let live = [&nodes[0], &nodes[2], &fresh];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let evs = events(&redis);
        let mut wrong: Vec<String> = users
            .iter()
            .filter_map(|u| {
                let seq = applied(&evs, u);
                alternation_error(u, &seq).or_else(|| {
                    (seq.last().map(Ev::ty) != Some("offline"))
                        .then(|| format!("{u} not offline in the events: [{}]", describe(&seq)))
                })
            })
            .collect();
        let p = presence(live[0], &users).await;
        wrong.extend(
            p.iter()
                .filter(|(_, n)| **n > 0)
                .map(|(u, n)| format!("{u}: presence says {n} connections")),
        );
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} users wrong after settling: {:#?}",
            wrong.len(),
            wrong.iter().take(20).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let evs = events(&redis);
    let transitions: usize = users.iter().map(|u| applied(&evs, u).len()).sum();
    eprintln!(
        "churn: {} events, {transitions} applied transitions",
        evs.len()
    );
    assert!(users.iter().all(|u| !applied(&evs, u).is_empty()));
    for n in live {
        let p = presence(n, &users).await;
        assert!(p.values().all(|c| *c == 0), "presence on {}", n.name);
    }
    let reaped = node_events(&evs, "node_reaped", &victim_id);
    assert!(!reaped.is_empty(), "the killed node was reaped");
    assert_eq!(node_events(&evs, "node_joined", &fresh_id).len(), 1);
}

// ---------------------------------------------------------------- 7. disconnect

/// `POST /api/disconnect` closes the user's connections on two nodes with
/// the code and reason within a second and answers how many; a connection
/// the user opens after the call and another user's stay open. Bad codes,
/// long reasons (bytes, not characters), a bad body: 400; no key: 401.
/// Without a code: 4000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_everywhere() {
    let (_redis, nodes) = cluster(3).await;
    let mut d0 = Peer::dev(&nodes[0], "dora").await;
    let mut d1 = Peer::dev(&nodes[1], "dora").await;
    let mut otto = Peer::dev(&nodes[0], "otto").await;
    let asked = Instant::now();
    let (status, body) = post_disconnect(
        &nodes[2],
        json!({"user": "dora", "code": 4005, "reason": "bye"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!((status, body), (202, json!({"connections": 2})));
    // Opened after the call: not one of those it closes.
    let mut later = Peer::dev(&nodes[0], "dora").await;
    for (p, name) in [(&mut d0, "dora on n0"), (&mut d1, "dora on n1")] {
        let e = p.end(T).await;
        let took = asked.elapsed();
        assert_eq!(e, End::Closed(4005, "bye".into()), "{name}");
        assert!(
            took < Duration::from_secs(1),
            "{name} closed after {took:?}"
        );
    }
    later
        .assert_open(Duration::from_millis(1500), "dora's later connection")
        .await;
    otto.assert_open(Duration::ZERO, "another user").await;
    assert_eq!(presence(&nodes[1], &strings(&["dora"])).await["dora"], 1);

    let bad = [
        (json!({"user": "dora", "code": 3999}), "code 3999"),
        (json!({"user": "dora", "code": 4100}), "code 4100"),
        (json!({"user": "dora", "code": "x"}), "code \"x\""),
        (json!({"user": "dora", "code": 4000.5}), "code 4000.5"),
        (
            json!({"user": "dora", "code": 4005, "reason": "r".repeat(121)}),
            "reason of 121 bytes",
        ),
        (
            json!({"user": "dora", "reason": "é".repeat(61)}),
            "reason of 61 characters, 122 bytes",
        ),
        (json!({"code": 4005}), "no user"),
        (json!({"user": "bad user"}), "bad user id"),
    ];
    for (body, what) in bad {
        let (status, answer) = post_disconnect(&nodes[0], body, Some(API_KEY)).await;
        assert_eq!(status, 400, "{what}: {answer}");
    }
    let r = reqwest::Client::new()
        .post(nodes[0].http("/api/disconnect"))
        .bearer_auth(API_KEY)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "bad JSON");
    let ok = json!({"user": "dora"});
    assert_eq!(post_disconnect(&nodes[0], ok.clone(), None).await.0, 401);
    assert_eq!(post_disconnect(&nodes[0], ok, Some("wrong")).await.0, 401);
    // 120 bytes is allowed; a user with no connection: 0.
    let (status, body) = post_disconnect(
        &nodes[1],
        json!({"user": "nobody", "code": 4099, "reason": "é".repeat(60)}),
        Some(API_KEY),
    )
    .await;
    assert_eq!((status, body), (202, json!({"connections": 0})));
    later
        .assert_open(Duration::from_millis(500), "after refused disconnects")
        .await;

    // No code: 4000.
    let (status, body) = post_disconnect(&nodes[2], json!({"user": "dora"}), Some(API_KEY)).await;
    assert_eq!((status, body), (202, json!({"connections": 1})));
    match later.end(T).await {
        End::Closed(4000, _) => {}
        e => panic!("default code: {e:?}"),
    }
    // 4001 is the app's too: its reason, not the token-expiry one.
    let mut again = Peer::dev(&nodes[1], "dora").await;
    let (status, _) = post_disconnect(
        &nodes[0],
        json!({"user": "dora", "code": 4001, "reason": "app says"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(again.end(T).await, End::Closed(4001, "app says".into()));
    otto.assert_open(Duration::ZERO, "another user").await;
}

// ---------------------------------------------------------------- 8. disconnect and a frozen node

/// The user's node is frozen (SIGSTOP) past its lease. A disconnect for
/// `fay` made at once, and one for `gus` made once the lease is seen
/// expired, are both accepted; connections the users open afterwards on
/// the live node are never closed by them; after SIGCONT the frozen node's
/// connections are closed with the codes (under the node's new id, from
/// its old inbox or routed again by the reaper). If the reaper had already
/// removed `gus`'s connection when his disconnect read the user's
/// connections, there was nothing of his left to close: that case is
/// logged, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_reaches_a_frozen_node() {
    let (redis, nodes) = cluster(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut fay_a = Peer::dev(a, "fay").await;
    let mut gus_a = Peer::dev(a, "gus").await;
    let gus_conn = gus_a.conn();
    let a_id = a.node_id().await;
    let frozen = Frozen::stop(a);

    let (status, body) = post_disconnect(
        b,
        json!({"user": "fay", "code": 4007, "reason": "frozen"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(
        body["connections"].as_u64().is_some_and(|n| n <= 1),
        "{body}"
    );
    let mut fay_b = Peer::dev(b, "fay").await;

    eventually("the frozen node's lease seen expired", T, || async {
        (presence(b, &strings(&["gus"])).await["gus"] == 0).then_some(())
    })
    .await;
    let field = |r: &mut TestConn| -> Option<String> {
        redis::cmd("HGET")
            .arg("wsc:user:{gus}")
            .arg(&gus_conn)
            .query(r)
            .expect("HGET")
    };
    let mut r = redis.conn();
    let (status, body) = post_disconnect(
        b,
        json!({"user": "gus", "code": 4008, "reason": "late"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!((status, body), (202, json!({"connections": 0})));
    // Fields of a frozen node only go (reaped), never come back under the
    // old id: still there now, it was there when the disconnect read it.
    let gus_owed = field(&mut r).is_some();
    let mut gus_b = Peer::dev(b, "gus").await;

    // Once reaped (TTL + 2 heartbeats after its last renewal), thaw.
    eventually("the frozen node reaped", Duration::from_secs(5), || async {
        (!node_events(&events(&redis), "node_reaped", &a_id).is_empty()).then_some(())
    })
    .await;
    frozen.thaw();
    let e = fay_a.end(T).await;
    assert_eq!(
        e,
        End::Closed(4007, "frozen".into()),
        "fay on the thawed node"
    );
    if gus_owed {
        let e = gus_a.end(T).await;
        assert_eq!(
            e,
            End::Closed(4008, "late".into()),
            "gus on the thawed node"
        );
    } else {
        eprintln!("gus: reaped before his disconnect read his connections; not asserted");
    }
    fay_b
        .assert_open(Duration::from_millis(1500), "fay's later connection")
        .await;
    gus_b
        .assert_open(Duration::ZERO, "gus's later connection")
        .await;
    let p = presence(b, &strings(&["fay"])).await;
    assert_eq!(p["fay"], 1);
}

/// A disconnect waits in the inbox of a node that is then SIGKILLed (it
/// was frozen, so the close was never read). The node is still reaped
/// within the contract's bound (lease TTL + 2 heartbeats, with slack), its
/// user goes offline, and it leaves `<p>:nodes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_pending_for_a_dead_node_does_not_block_its_reap() {
    let (redis, mut nodes) = cluster(2).await;
    let a_id = nodes[0].node_id().await;
    let b_id = nodes[1].node_id().await;
    let hal = Peer::dev(&nodes[0], "hal").await;
    wait_applied(&redis, &strings(&["hal"]), 1, "hal online").await;
    nodes[0].signal(libc::SIGSTOP);
    let (status, body) = post_disconnect(
        &nodes[1],
        json!({"user": "hal", "code": 4009}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    {
        let mut r = redis.conn();
        let pending: u64 = redis::cmd("XLEN")
            .arg(format!("wsc:inbox:{{{a_id}}}"))
            .query(&mut r)
            .unwrap();
        assert!(pending >= 1, "the close waits in the frozen node's inbox");
    }
    nodes[0].kill9();
    let killed = Instant::now();
    let reaped = eventually("node_reaped for the dead node", T, || async {
        node_events(&events(&redis), "node_reaped", &a_id).pop()
    })
    .await;
    eprintln!("reaped {:?} after the kill", killed.elapsed());
    assert_eq!(reaped.get("by"), b_id);
    let mut r = redis.conn();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("wsc:nodes")
        .arg(&a_id)
        .query(&mut r)
        .unwrap();
    assert_eq!(score, None, "the dead node left <p>:nodes");
    wait_applied(&redis, &strings(&["hal"]), 2, "hal offline").await;
    assert_eq!(presence(&nodes[1], &strings(&["hal"])).await["hal"], 0);
    drop(hal);
}

// ---------------------------------------------------------------- 9. token expiry

/// Read until `p` closes; it must be 4001, at `exp` (Unix s) or up to
/// 2.5 s after it (the server counts whole seconds), never before.
async fn closes_at_expiry(p: &mut Peer, exp: u64, what: &str) {
    let wait = Duration::from_millis((exp * 1000 + 5000).saturating_sub(now_ms()));
    let e = p.end(wait).await;
    let at = now_ms();
    assert!(
        matches!(e, End::Closed(4001, _)),
        "{what}: expected a 4001 close, got {e:?}"
    );
    assert!(
        at + 100 >= exp * 1000,
        "{what}: closed {} ms before exp",
        exp * 1000 - at
    );
    assert!(
        at <= exp * 1000 + 2500,
        "{what}: closed {} ms after exp",
        at - exp * 1000
    );
}

/// With `--jwt-leeway-s 0`: a connection closes with 4001 when its token's
/// `exp` passes; a `refresh` with a valid token for the same user answers
/// `refreshed` with the new `exp` and moves the close; one with another
/// user's token, a forged one, an expired one or garbage answers `error`
/// `forbidden` and the old expiry stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_4001_and_refresh_moves_it() {
    let redis = Redis::start();
    let node = NodeProc::start(
        "n",
        &timed_args(&redis.url(), "200", "1000", &["--jwt-leeway-s", "0"]),
    );
    node.wait_ready().await;
    let url = |t: &str| node.ws_url(&format!("token={t}"));
    let now = now_s();
    let (exp_a, exp_b, exp_c) = (now + 2, now + 2, now + 3);
    let mut a = Peer::open(&url(&hs256(SECRET, "tia", exp_a))).await;
    let mut b = Peer::open(&url(&hs256(SECRET, "tob", exp_b))).await;
    let mut c = Peer::open(&url(&hs256(SECRET, "cyd", exp_c))).await;

    let new_exp = now + 5;
    b.send(json!({"type": "refresh", "token": hs256(SECRET, "tob", new_exp)}))
        .await;
    let r = b.next(T).await.expect("refresh answer");
    assert_eq!(r, json!({"type": "refreshed", "exp": new_exp}));

    let refused = [
        (
            hs256(SECRET, "someone-else", now + 3600),
            "another user's token",
        ),
        (hs256("not-the-secret", "cyd", now + 3600), "forged token"),
        (hs256(SECRET, "cyd", now - 60), "expired token"),
        ("garbage".to_owned(), "garbage"),
    ];
    for (token, what) in refused {
        c.send(json!({"type": "refresh", "token": token})).await;
        let r = c.next(T).await.expect("refresh answer");
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some("forbidden")),
            "{what}: {r}"
        );
    }

    closes_at_expiry(&mut a, exp_a, "no refresh").await;
    closes_at_expiry(&mut c, exp_c, "refused refreshes").await;
    // b's first token has expired by now (its close would have come within
    // a second of exp_b): still open.
    let past_old = Duration::from_millis(((exp_b + 1) * 1000 + 300).saturating_sub(now_ms()));
    b.assert_open(past_old, "refreshed connection past its first token")
        .await;
    closes_at_expiry(&mut b, new_exp, "refreshed").await;
}

/// A user's last connection removed by a node that knows nothing of
/// presence (the previous release, in a rolling upgrade: it only deletes
/// the field) is made offline by the sweep of online users, and /admin's
/// count follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_removed_without_presence_is_swept_offline() {
    let (redis, nodes) = cluster(2).await;
    let p = Peer::dev(&nodes[0], "ivy").await;
    let conn = p.conn();
    wait_applied(&redis, &strings(&["ivy"]), 1, "ivy online").await;
    // What an old node does when its session ends: HDEL, nothing more.
    let mut r = redis.conn();
    let _: i64 = redis::cmd("HDEL")
        .arg("wsc:user:{ivy}")
        .arg(&conn)
        .query(&mut r)
        .expect("hdel");
    wait_applied(&redis, &strings(&["ivy"]), 2, "ivy swept offline").await;
    let evs = events(&redis);
    assert_eq!(types(&evs, "ivy"), ["online", "offline"]);
    let off = applied(&evs, "ivy").remove(1);
    assert_eq!(
        off.get("conn"),
        conn,
        "offline names the recorded connection"
    );
    let online: i64 = redis::cmd("ZCOUNT")
        .arg("wsc:online")
        .arg(0)
        .arg("+inf")
        .query(&mut r)
        .expect("zcount");
    assert_eq!(online, 0, "nobody online in the set");
    drop(p);
}

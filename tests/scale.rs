//! Scale and churn (issue 12): a node holding thousands of sockets that
//! loses its lease takes exactly one new id and re-registers them all; a
//! long churn of nodes (drained, killed, frozen) and users leaves Redis
//! holding only what live nodes, mailboxes and the app's streams need.
//!
//! Real redis-server, real node processes, real WebSocket clients. The two
//! tests take turns ([`SERIAL`]): each loads this 2-core machine on its own.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::Commands;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTP client whose requests cannot hang on a frozen node.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client")
}

/// A counter or gauge from `/metrics` (a line `name value`, no labels).
async fn metric(http: &reqwest::Client, node: &NodeProc, name: &str) -> Option<f64> {
    let text = http
        .get(node.http("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == name).then(|| it.next()?.parse().ok())?
    })
}

/// This node's id (`GET /cluster` → `node`), if it answers.
async fn node_id_of(http: &reqwest::Client, node: &NodeProc) -> Option<String> {
    let v: Value = http
        .get(node.http("/cluster"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["node"].as_str().map(str::to_owned)
}

async fn is_ready(http: &reqwest::Client, node: &NodeProc) -> bool {
    http.get(node.http("/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;
/// An idle socket and its connection id, or why it could not be opened.
type Opened = Result<(RawWs, String), String>;

/// An idle client socket as cheap as tungstenite allows: small read
/// buffer, writes not buffered. Connects from `src` (a 127.0.0.x address,
/// so many sockets do not exhaust one address's ephemeral ports) and reads
/// the welcome; returns the socket and its connection id.
async fn open_idle(node: SocketAddr, src: Ipv4Addr, user: &str) -> Opened {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    // Choose the port at connect, not at bind: bind would need a port free
    // of every connection (TIME_WAIT ones of earlier runs too), and slows
    // down as they fill the range.
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!(
                "IP_BIND_ADDRESS_NO_PORT: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    sock.bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let tcp = sock
        .connect(node)
        .await
        .map_err(|e| format!("connect from {src}: {e}"))?;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = format!("ws://{node}/ws?user={user}");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg))
        .await
        .map_err(|e| format!("upgrade {user}: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                if v["type"] != "welcome" {
                    return Err(format!("{user}: first frame not welcome: {v}"));
                }
                let conn = v["conn"].as_str().unwrap_or_default().to_owned();
                return Ok((ws, conn));
            }
            Some(Ok(_)) => continue,
            other => return Err(format!("{user}: no welcome: {other:?}")),
        }
    }
}

/// Read `ws` until the `message` frame with entry id `id` arrives.
async fn expect_message(ws: &mut RawWs, what: &str, id: &str, timeout: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
                if v["type"] == "message" && v["id"] == id {
                    return v;
                }
                seen.push(v);
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("{what}: socket ended ({other:?}); saw {seen:?}"),
            Err(_) => panic!("{what}: message {id} not received within {timeout:?}; saw {seen:?}"),
        }
    }
}

/// Issue 12 item 3: a node frozen past its lease while holding N sockets
/// comes back under exactly one new id, re-registers all N (same
/// connection ids) while renewing the new lease, and delivers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregistration_at_scale_takes_one_new_id() {
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("SCALE_SOCKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let redis = Redis::start();
    let args = timed_args(
        &redis.url(),
        "100",
        "400",
        &["--dev", "--max-connections", "20000"],
    );
    let a = NodeProc::start("A", &args);
    let b = NodeProc::start("B", &args);
    a.wait_ready().await;
    b.wait_ready().await;
    let http = http();
    let mut r = redis.conn();

    // N idle sockets on A, users u0..u{N-1}, from several source addresses
    // (at most 8,000 per address: ephemeral ports are ~28k per address).
    let target: SocketAddr = a.addr.parse().expect("node address");
    let sources = n.div_ceil(8_000).max(1);
    let t_connect = Instant::now();
    let mut opened: Vec<(usize, Opened)> = futures::stream::iter(0..n)
        .map(|i| async move {
            let src = Ipv4Addr::new(127, 0, 0, 1 + (i % sources) as u8);
            (i, open_idle(target, src, &format!("u{i}")).await)
        })
        .buffer_unordered(200)
        .collect()
        .await;
    opened.sort_by_key(|(i, _)| *i);
    let mut failed = Vec::new();
    let mut socks = Vec::with_capacity(n);
    let mut conns = Vec::with_capacity(n);
    for (i, res) in opened {
        match res {
            Ok((ws, c)) => {
                socks.push(ws);
                conns.push(c);
            }
            Err(e) => failed.push((i, e)),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} sockets failed to open; first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let connected_in = t_connect.elapsed();
    let old = a.node_id().await;
    let hlen: usize = r.hlen(format!("wsc:conns:{{{old}}}")).unwrap();
    assert_eq!(hlen, n, "every socket registered before the freeze");
    assert_eq!(
        metric(&http, &a, "wsc_lease_losses_total").await,
        Some(0.0),
        "no lease lost before the freeze"
    );

    // Freeze A past its lease (400 ms) and past the reap (ttl + 2 beats).
    a.signal(libc::SIGSTOP);
    // A message while A is frozen: to A's old inbox or u3's mailbox, then
    // to u3's socket once A has re-registered it.
    let during = xadd_to(&mut r, "u3", "\"during\"");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old_member: Option<f64> = r.zscore("wsc:nodes", &old).unwrap();
    a.signal(libc::SIGCONT);
    let t0 = Instant::now();

    // Back under a new id, ready, all N in its index, a member.
    let conns_key = |id: &str| format!("wsc:conns:{{{id}}}");
    let deadline = t0 + Duration::from_secs(15);
    let mut ready_at = None;
    let new = loop {
        let id = node_id_of(&http, &a).await;
        let ready = is_ready(&http, &a).await;
        if ready && ready_at.is_none() && id.as_deref().is_some_and(|i| i != old) {
            ready_at = Some(t0.elapsed());
        }
        let last = match id {
            Some(id) if id != old => {
                let hlen: usize = r.hlen(conns_key(&id)).unwrap_or(0);
                let member: Option<f64> = r.zscore("wsc:nodes", &id).unwrap_or(None);
                if ready && hlen == n && member.is_some() {
                    break id;
                }
                format!("id {id}, ready {ready}, index {hlen}/{n}, member {member:?}")
            }
            id => format!("id still {id:?} (old {old}), ready {ready}"),
        };
        if Instant::now() > deadline {
            let losses = metric(&http, &a, "wsc_lease_losses_total").await;
            panic!(
                "A not re-registered within 15 s of SIGCONT; last: {last}; \
                 wsc_lease_losses_total {losses:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let indexed_in = t0.elapsed();
    // Every user's hash names the same connection id, under the new id only.
    let users_ok = || -> Result<(), String> {
        let mut c = redis.conn_for("wsc:user:{u0}");
        let mut bad = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let mut p = redis::pipe();
            for &i in chunk {
                p.cmd("HGETALL").arg(format!("wsc:user:{{u{i}}}"));
            }
            let got: Vec<HashMap<String, String>> = if matches!(c, TestConn::Single(_)) {
                p.query(&mut c).map_err(|e| e.to_string())?
            } else {
                // On a cluster, one user at a time (their slots differ).
                let mut rc = redis.conn();
                chunk
                    .iter()
                    .map(|i| rc.hgetall(format!("wsc:user:{{u{i}}}")))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?
            };
            for (&i, h) in chunk.iter().zip(&got) {
                if h.len() != 1 || h.get(&conns[i]) != Some(&new) {
                    bad.push(format!("u{i}: {h:?}"));
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} users not (only) on {new} with their conn id; first: {:?}",
                bad.len(),
                &bad[..bad.len().min(5)]
            ))
        }
    };
    wait_until(
        "every user hash names its conn on the new id",
        Duration::from_secs(10),
        users_ok,
    );
    let users_in = t0.elapsed();

    // Exactly one new id: the lease loss counter stays 1 and the id stays.
    let watch = Instant::now();
    let mut samples = 0;
    while watch.elapsed() < Duration::from_secs(3) {
        let losses = metric(&http, &a, "wsc_lease_losses_total").await;
        let id = node_id_of(&http, &a).await;
        assert_eq!(
            losses,
            Some(1.0),
            "exactly one lease loss ({samples} samples after re-registration)"
        );
        assert_eq!(id.as_deref(), Some(new.as_str()), "the new id holds");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hlen: usize = r.hlen(conns_key(&new)).unwrap();
    assert_eq!(hlen, n, "all N still indexed under the new id");

    // The old id is gone for good: member, inbox and index.
    wait_until("old id reaped", Duration::from_secs(10), || {
        let member: Option<f64> = r.zscore("wsc:nodes", &old).map_err(|e| e.to_string())?;
        let inbox: bool = r
            .exists(format!("wsc:inbox:{{{old}}}"))
            .map_err(|e| e.to_string())?;
        let index: bool = r.exists(conns_key(&old)).map_err(|e| e.to_string())?;
        if member.is_none() && !inbox && !index {
            Ok(())
        } else {
            Err(format!("member {member:?}, inbox {inbox}, index {index}"))
        }
    });

    // Delivery works: the message sent while frozen, and one sent now.
    expect_message(
        &mut socks[3],
        "u3 (sent while A was frozen)",
        &during,
        Duration::from_secs(10),
    )
    .await;
    let now = xadd_to(&mut r, "u7", "1");
    let m = expect_message(&mut socks[7], "u7", &now, Duration::from_secs(10)).await;
    assert_eq!(m["payload"], 1);

    eprintln!(
        "reregistration_at_scale: {n} sockets opened in {connected_in:?} from {sources} source address(es); \
         old id still a member at SIGCONT: {}; after SIGCONT: ready under new id in {:?}, \
         all {n} indexed in {indexed_in:?}, every user hash on the new id in {users_in:?}; \
         wsc_lease_losses_total = 1 over {samples} samples in 3 s",
        old_member.is_some(),
        ready_at.unwrap_or(indexed_in),
    );
    drop(socks);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGTERM: drain and leave.
    Term,
    /// SIGKILL.
    Kill,
    /// SIGSTOP past the lease, then SIGCONT: back under a new id.
    StopCont,
    /// SIGSTOP past the lease, then SIGKILL.
    StopKill,
}

const FAULTS: [Fault; 6] = [
    Fault::Term,
    Fault::Kill,
    Fault::StopCont,
    Fault::StopKill,
    Fault::Term,
    Fault::Kill,
];

/// Nodes started over the churn test.
const CHURN_NODES: usize = 20;
/// Distinct connecting users (`c0`..) and concurrent client tasks.
const CHURN_USERS: usize = 1000;
const CHURN_CLIENTS: usize = 50;
/// Users messaged who never connect (`off0`..): their messages must all
/// end in their mailboxes.
const OFFLINE_USERS: usize = 40;
/// How long the keyspace may take to settle once the churn stopped.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct ChurnStats {
    sessions: AtomicUsize,
    connect_failed: AtomicUsize,
    ended_by_server: AtomicUsize,
    messages: AtomicUsize,
}

/// One client session: connect as `user` to `addr`, read the welcome, read
/// frames for `hold`, then close properly. Errors are expected under churn.
async fn session(addr: &str, user: &str, hold: Duration, st: &ChurnStats) {
    let url = format!("ws://{addr}/ws?user={user}");
    let step = Duration::from_secs(3);
    let Ok(Ok((mut ws, _))) =
        tokio::time::timeout(step, tokio_tungstenite::connect_async(&url)).await
    else {
        st.connect_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match tokio::time::timeout(step, ws.next()).await {
        Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str().contains("\"welcome\"") => {}
        _ => {
            st.connect_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    st.sessions.fetch_add(1, Ordering::Relaxed);
    let until = tokio::time::Instant::now() + hold;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                if t.as_str().contains("\"message\"") {
                    st.messages.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => {
                // Drained (1012), killed, or an error: the session is over.
                st.ended_by_server.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Start node `n<started>`, wait until it is ready, and offer it to clients.
async fn start_node(
    args: &[String],
    addrs: &Mutex<Vec<String>>,
    started: &mut usize,
    alive: &mut Vec<NodeProc>,
) {
    let n = NodeProc::start(&format!("n{started}"), args);
    *started += 1;
    n.wait_ready().await;
    addrs.lock().unwrap().push(n.addr.clone());
    alive.push(n);
}

/// What the app sent during the churn.
#[derive(Default)]
struct Sent {
    /// Every user who got at least one message.
    users: BTreeSet<String>,
    /// Entry ids per never-connecting user.
    offline: BTreeMap<String, Vec<String>>,
    total: usize,
}

/// The whole keyspace, checked against what `live` (node ids) and `sent`
/// allow. `Ok` with a summary, or `Err` listing every unexpected key.
fn keyspace_clean(
    r: &mut TestConn,
    live: &BTreeSet<String>,
    sent: &Sent,
) -> Result<String, String> {
    let q = |e: redis::RedisError| e.to_string();
    let keys: Vec<String> = r
        .scan::<String>()
        .map_err(q)?
        .collect::<Result<_, _>>()
        .map_err(q)?;
    let mut problems = Vec::new();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let brace = |k: &str, prefix: &str| -> Option<String> {
        k.strip_prefix(prefix)?
            .strip_prefix('{')?
            .strip_suffix('}')
            .map(str::to_owned)
    };
    for key in &keys {
        let ty: String = redis::cmd("TYPE").arg(key).query(r).map_err(q)?;
        let len = |r: &mut TestConn| -> String {
            let cmd = match ty.as_str() {
                "stream" => "XLEN",
                "hash" => "HLEN",
                "zset" => "ZCARD",
                "set" => "SCARD",
                "list" => "LLEN",
                _ => "STRLEN",
            };
            redis::cmd(cmd)
                .arg(key)
                .query::<i64>(r)
                .map(|n| n.to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        let mut bad = |why: &str, r: &mut TestConn| {
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(r).unwrap_or(-3);
            problems.push(format!("{key} ({ty}, len {}, pttl {ttl}): {why}", len(r)));
        };
        if key == "wsc:nodes" {
            kinds.insert("nodes", 1);
            let members: BTreeSet<String> = r.zrange(key, 0, -1).map_err(q)?;
            if &members != live {
                bad(&format!("members {members:?}, live nodes {live:?}"), r);
            }
        } else if key == "wsc:send" {
            kinds.insert("send", 1);
            let xlen: usize = r.xlen(key).map_err(q)?;
            if xlen != 0 {
                bad("send stream not empty", r);
            }
            let consumers: Vec<HashMap<String, String>> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(key)
                .arg("router")
                .query(r)
                .map_err(q)?;
            for c in &consumers {
                let name = c.get("name").cloned().unwrap_or_default();
                let pending = c.get("pending").cloned().unwrap_or_default();
                if !live.contains(&name) || pending != "0" {
                    bad(
                        &format!(
                            "router consumer {name} (pending {pending}, idle {} ms) is not a live node with nothing pending",
                            c.get("idle").cloned().unwrap_or_default()
                        ),
                        r,
                    );
                }
            }
        } else if key == "wsc:versions" {
            // Each live node's release; a reaped node's goes with it.
            kinds.insert("versions", 1);
            let fields: HashMap<String, String> = r.hgetall(key).map_err(q)?;
            let ids: BTreeSet<String> = fields.keys().cloned().collect();
            if &ids != live {
                bad(&format!("versions of {ids:?}, live nodes {live:?}"), r);
            }
        } else if key == "wsc:online" {
            // Every client left: nobody online (offline members may stay).
            kinds.insert("online", 1);
            let n: usize = redis::cmd("ZCOUNT")
                .arg(key)
                .arg(0)
                .arg("+inf")
                .query(r)
                .map_err(q)?;
            if n != 0 {
                bad(&format!("{n} users still marked online"), r);
            }
        } else if key == "wsc:dead" || key == "wsc:topics" || key == "wsc:events" {
            *kinds.entry("dead/topics/events").or_default() += 1;
        } else if brace(key, "wsc:seq:")
            .or_else(|| brace(key, "wsc:history:"))
            .is_some()
        {
            // History (contract §9): kept for a while, never forever.
            *kinds.entry("seq/history").or_default() += 1;
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(r).map_err(q)?;
            if ttl <= 0 {
                bad("history kept without an expiry", r);
            }
        } else if let Some(user) = brace(key, "wsc:presence:") {
            // Every client left: offline, its event out, expiring.
            *kinds.entry("presence").or_default() += 1;
            let p: HashMap<String, String> = r.hgetall(key).map_err(q)?;
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(r).map_err(q)?;
            if p.get("state").map(String::as_str) != Some("off")
                || p.contains_key("pend")
                || ttl <= 0
            {
                bad(&format!("presence of {user} not settled offline: {p:?}"), r);
            }
        } else if let Some(shard) = key.strip_prefix("wsc:router:") {
            *kinds.entry("router lease").or_default() += 1;
            let holder: Option<String> = r.get(key).map_err(q)?;
            if shard.parse::<u32>().is_err() || !holder.as_ref().is_some_and(|h| live.contains(h)) {
                bad(
                    &format!("router lease held by {holder:?}, not a live node"),
                    r,
                );
            }
        } else if let Some(id) = brace(key, "wsc:inbox:") {
            *kinds.entry("inbox").or_default() += 1;
            if !live.contains(&id) {
                bad("inbox of a node that is not live", r);
            }
        } else if let Some(id) = brace(key, "wsc:conns:") {
            *kinds.entry("conns").or_default() += 1;
            let hlen: usize = r.hlen(key).map_err(q)?;
            if !live.contains(&id) {
                bad("connection index of a node that is not live", r);
            } else if hlen != 0 {
                let fields: HashMap<String, String> = r.hgetall(key).map_err(q)?;
                bad(
                    &format!("connections indexed though every client left: {fields:?}"),
                    r,
                );
            }
        } else if let Some(user) =
            brace(key, "wsc:mailbox:").or_else(|| brace(key, "wsc:mailbox-bytes:"))
        {
            *kinds.entry("mailbox").or_default() += 1;
            if !sent.users.contains(&user) {
                bad("mailbox of a user who was never sent a message", r);
            }
        } else if let Some(user) = brace(key, "wsc:user:") {
            let fields: HashMap<String, String> = r.hgetall(key).map_err(q)?;
            bad(
                &format!("connections of {user} though every client left: {fields:?}"),
                r,
            );
        } else {
            bad("not a key the cluster should hold now", r);
        }
    }
    if !keys.iter().any(|k| k == "wsc:nodes") {
        problems.push(format!("wsc:nodes missing; live nodes {live:?}"));
    }
    if problems.is_empty() {
        Ok(format!("{} keys: {kinds:?}", keys.len()))
    } else {
        Err(format!(
            "{} unexpected of {} keys (live nodes {live:?}):\n  {}",
            problems.len(),
            keys.len(),
            problems.join("\n  ")
        ))
    }
}

/// Issue 12 item 6: 20 nodes come and go (drained, killed, frozen and
/// woken or killed), ~1,000 users connect and leave, apps send meanwhile
/// (some to users who never connect). Once all stops, the keyspace holds
/// only what the live nodes, mailboxes and streams need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_redis_clean() {
    let _serial = SERIAL.lock().await;
    // SCAN of the whole keyspace: one redis-server, whatever the suite runs on.
    let redis = Redis::start_with(&[], |port, _| {
        (
            vec!["--port".into(), port.to_string()],
            format!("redis://127.0.0.1:{port}/"),
        )
    });
    let args = fast_args(&redis);
    let http = http();
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("churn_leaves_redis_clean: seed {seed} (CHURN_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let t_start = Instant::now();

    // Addresses of nodes clients may use now (ready, not under a fault).
    let addrs: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut alive: Vec<NodeProc> = Vec::new();
    let mut started = 0usize;
    for _ in 0..3 {
        start_node(&args, &addrs, &mut started, &mut alive).await;
    }

    // Clients: each task loops over sessions of users c0.. (mod 1000).
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ChurnStats::default());
    let next_user = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CHURN_CLIENTS)
        .map(|t| {
            let (stop, stats, next_user, addrs) = (
                stop.clone(),
                stats.clone(),
                next_user.clone(),
                addrs.clone(),
            );
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64 + 1));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let addr = {
                        let a = addrs.lock().unwrap();
                        (!a.is_empty()).then(|| a[rng.random_range(0..a.len())].clone())
                    };
                    let Some(addr) = addr else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let k = next_user.fetch_add(1, Ordering::Relaxed) % CHURN_USERS;
                    let hold = Duration::from_millis(rng.random_range(50..400));
                    session(&addr, &format!("c{k}"), hold, &stats).await;
                }
            })
        })
        .collect();

    // The app: a message every ~15 ms to a random user, a quarter of them
    // to users who never connect.
    let sender = {
        let stop = stop.clone();
        let mut r = redis.conn();
        let mut rng = StdRng::seed_from_u64(seed.rotate_left(7));
        std::thread::spawn(move || {
            let mut sent = Sent::default();
            while !stop.load(Ordering::Relaxed) {
                let offline = rng.random_range(0..4) == 0;
                let user = if offline {
                    format!("off{}", rng.random_range(0..OFFLINE_USERS))
                } else {
                    format!("c{}", rng.random_range(0..CHURN_USERS))
                };
                let id = xadd_to(&mut r, &user, &sent.total.to_string());
                sent.total += 1;
                if offline {
                    sent.offline.entry(user.clone()).or_default().push(id);
                }
                sent.users.insert(user);
                std::thread::sleep(Duration::from_millis(15));
            }
            sent
        })
    };

    // The churn: keep 3-4 nodes alive; start until 4, then fault one.
    let mut leaving: Vec<NodeProc> = Vec::new();
    let mut dead: Vec<NodeProc> = Vec::new();
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut step = 0usize;
    while started < CHURN_NODES {
        while alive.len() < 4 && started < CHURN_NODES {
            start_node(&args, &addrs, &mut started, &mut alive).await;
        }
        // Let clients use the cluster as it is now.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let fault = FAULTS[step % FAULTS.len()];
        step += 1;
        *faults.entry(fault).or_default() += 1;
        let mut victim = alive.remove(rng.random_range(0..alive.len()));
        addrs.lock().unwrap().retain(|a| *a != victim.addr);
        match fault {
            Fault::Term => {
                victim.signal(libc::SIGTERM);
                leaving.push(victim);
            }
            Fault::Kill => {
                victim.kill9();
                dead.push(victim);
            }
            Fault::StopCont | Fault::StopKill => {
                victim.signal(libc::SIGSTOP);
                // Hold the fault past the lease (1 s) and the reap.
                tokio::time::sleep(Duration::from_millis(1600)).await;
                if fault == Fault::StopCont {
                    victim.signal(libc::SIGCONT);
                    addrs.lock().unwrap().push(victim.addr.clone());
                    alive.push(victim);
                } else {
                    victim.kill9();
                    dead.push(victim);
                }
            }
        }
    }
    let churn_took = t_start.elapsed();

    // Stop: clients close, the app stops, drained nodes exit.
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(15), c)
            .await
            .expect("client tasks end")
            .expect("client task");
    }
    let sent = sender.join().expect("sender thread");
    for n in &mut leaving {
        let status = n.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status, Some(0), "node {} drained and exited 0", n.name);
    }
    for n in &alive {
        n.wait_ready().await;
    }

    // Settle: the keyspace holds only what live nodes, mailboxes and
    // streams need (idle router consumers go after 2 lease TTLs).
    let t_settle = Instant::now();
    let mut r = redis.conn();
    let deadline = t_settle + SETTLE;
    let summary = loop {
        let mut live = BTreeSet::new();
        let mut why = None;
        for n in &alive {
            match node_id_of(&http, n).await {
                Some(id) => {
                    live.insert(id);
                }
                None => why = Some(format!("node {} did not answer /cluster", n.name)),
            }
        }
        let res = match why {
            Some(w) => Err(w),
            None => keyspace_clean(&mut r, &live, &sent),
        };
        match res {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                panic!("keyspace not clean {SETTLE:?} after the churn stopped: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let settled_in = t_settle.elapsed();

    // Nothing sent to a user who never connected was lost: it is in the
    // mailbox (duplicates allowed, at-least-once).
    let mut missing = Vec::new();
    for (user, ids) in &sent.offline {
        let entries: redis::streams::StreamRangeReply = r
            .xrange_all(format!("wsc:mailbox:{{{user}}}"))
            .expect("xrange mailbox");
        let held: BTreeSet<String> = entries
            .ids
            .iter()
            .filter_map(|e| e.get::<String>("id"))
            .collect();
        missing.extend(
            ids.iter()
                .filter(|id| !held.contains(*id))
                .map(|id| format!("{user}: {id}")),
        );
    }
    assert!(
        missing.is_empty(),
        "{} messages to never-connected users not in their mailboxes: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    eprintln!(
        "churn_leaves_redis_clean: {started} nodes over {churn_took:?} (faults {faults:?}), {} alive at the end; \
         {} client sessions ({} connects failed, {} ended by the server), {} messages received; \
         {} sent ({} to {} never-connected users, all in mailboxes); keyspace clean {settled_in:?} after stop: {summary}",
        alive.len(),
        stats.sessions.load(Ordering::Relaxed),
        stats.connect_failed.load(Ordering::Relaxed),
        stats.ended_by_server.load(Ordering::Relaxed),
        stats.messages.load(Ordering::Relaxed),
        sent.total,
        sent.offline.values().map(Vec::len).sum::<usize>(),
        sent.offline.len(),
    );
    drop(dead);
}

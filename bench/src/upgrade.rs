//! `upgrade`: a rolling upgrade and a rollback under traffic (issue 17).
//!
//! One `redis-server` on a free port; N nodes of the previous release
//! behind `wsc-lb --control`; clients (one per user) that connect through
//! the load balancer, reconnect through it whenever their connection ends,
//! and resume with `since`/`epoch` as `/client.js` does; a producer adding
//! user messages (`XADD <p>:send * to <u> payload <json>`) and some topic
//! messages at a steady rate. The nodes are then replaced one at a time by
//! nodes of the current release (start the new node, add it to the load
//! balancer, SIGTERM an old one, wait for it to exit 0, take it out of the
//! load balancer), and rolled back the same way.
//!
//! For each half (upgrade, rollback) it reports messages sent, delivered,
//! lost and duplicated, and how resumes were answered; it checks what the
//! two releases are expected to do to each other (old nodes give a welcome
//! without `epoch`/`seq` and messages without `seq`; a `recovered:true`
//! replay is complete and in order; a duplicate has the same `id`), and
//! reports as deviations what is off in Redis afterwards: presence on the
//! all-current cluster, online/offline alternation in `<p>:events`, and
//! `<p>:mailbox-bytes` counts against the mailboxes. Loss, a misrouted
//! message, a duplicate with another id, a broken replay or a node that did
//! not drain to exit 0 makes it fail.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wscluster_testkit::http::wait_ready;
use wscluster_testkit::{NodeLog, NodeProcess, RedisServer, tmpdir};

use crate::cluster::cluster_view;
use crate::ws::{Ws, now_us};

const PREFIX: &str = "wsc";
const TOPIC: &str = "news";

#[derive(clap::Args, Clone, Debug)]
pub struct UpgradeArgs {
    /// The previous release's `wscluster` binary.
    #[arg(long)]
    pub old_bin: PathBuf,
    /// The current release's `wscluster` binary.
    #[arg(long)]
    pub new_bin: PathBuf,
    /// `wsc-lb` (it must accept `--control`).
    #[arg(long)]
    pub lb_bin: PathBuf,
    /// What to call the previous release in the report.
    #[arg(long, default_value = "previous")]
    pub old_label: String,
    /// The short form: fewer users, shorter phases, --drain-ms 2000.
    #[arg(long)]
    pub short: bool,
    /// Nodes in the cluster (each replaced in turn).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Users (default 200; short 60).
    #[arg(long)]
    pub users: Option<usize>,
    /// Messages per second, user and topic together (default 400; short 200).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Share of the messages that go to the topic.
    #[arg(long, default_value_t = 0.1)]
    pub topic_share: f64,
    /// Every k-th user has a second client (device) as well (0: none).
    #[arg(long, default_value_t = 5)]
    pub second_device_every: usize,
    /// Every k-th user's client subscribes to the topic.
    #[arg(long, default_value_t = 4)]
    pub subscriber_every: usize,
    /// Mean life of a client's connection, seconds, before the client
    /// closes it and reconnects (resuming) by itself; 0: only when a node
    /// closes it (default 10; short 5).
    #[arg(long)]
    pub churn_s: Option<f64>,
    /// `--drain-ms` of the nodes (default 5000, the nodes' own; short 2000).
    #[arg(long)]
    pub drain_ms: Option<u64>,
    /// Traffic before the first replacement, seconds (default 10; short 4).
    #[arg(long)]
    pub warmup_s: Option<f64>,
    /// Traffic after each replacement, seconds (default 6; short 3).
    #[arg(long)]
    pub settle_s: Option<f64>,
    /// Traffic on the all-new and the all-old cluster after each half,
    /// seconds (default 15; short 5).
    #[arg(long)]
    pub steady_s: Option<f64>,
    /// Keep the nodes' logs (their directory is printed).
    #[arg(long)]
    pub keep_logs: bool,
    /// Append the run's JSON line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

struct Plan {
    users: usize,
    rate: f64,
    drain_ms: u64,
    warmup: Duration,
    settle: Duration,
    steady: Duration,
    churn: Duration,
}

impl UpgradeArgs {
    fn plan(&self) -> Plan {
        let (users, rate, drain, warm, settle, steady, churn) = if self.short {
            (60, 200.0, 2000, 4.0, 3.0, 5.0, 5.0)
        } else {
            (200, 400.0, 5000, 10.0, 6.0, 15.0, 10.0)
        };
        let secs = |o: Option<f64>, d: f64| Duration::from_secs_f64(o.unwrap_or(d).max(0.0));
        Plan {
            users: self.users.unwrap_or(users).max(1),
            rate: self.rate.unwrap_or(rate).max(1.0),
            drain_ms: self.drain_ms.unwrap_or(drain),
            warmup: secs(self.warmup_s, warm),
            settle: secs(self.settle_s, settle),
            steady: secs(self.steady_s, steady),
            churn: secs(self.churn_s, churn),
        }
    }
}

// ------------------------------------------------------------ accounting

/// The two halves of the run.
const PHASES: [&str; 2] = ["upgrade", "rollback"];

/// Counters of one half (by when the message was sent, or when the
/// connection was opened).
#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    /// Upgrades refused (HTTP status: 503 while a node starts or drains,
    /// 429…) or failed (no backend, reset).
    refused: AtomicU64,
    welcome_old: AtomicU64,
    welcome_new: AtomicU64,
    /// A node id no node of ours had when it started (a node that took a
    /// new id after losing its lease).
    welcome_unknown: AtomicU64,
    /// Deviation: an old node's welcome carrying `epoch`.
    old_welcome_epoch: AtomicU64,
    /// Deviation: a new node's welcome without a non-empty `epoch`.
    new_welcome_no_epoch: AtomicU64,
    resumes: AtomicU64,
    recovered_true: AtomicU64,
    recovered_false: AtomicU64,
    /// A resume a node did not answer (`recovered` absent or null).
    recovered_none_old: AtomicU64,
    /// Deviation: a new node that did not answer a resume.
    recovered_none_new: AtomicU64,
    /// Deviation: after `recovered:true`, the replay (since+1 ..= the
    /// welcome's seq) did not follow at once and in order.
    replay_broken: AtomicU64,
    /// Deviation: a message with `seq` on a connection to an old node.
    old_msg_seq: AtomicU64,
    /// Expected while an old router routes: a message without `seq` on a
    /// connection to a new node.
    new_msg_no_seq: AtomicU64,
    /// A message under an epoch other than the client's (the counter
    /// started again).
    epoch_changes: AtomicU64,
    closed_by_server: AtomicU64,
    /// Connections the client closed by itself (churn).
    client_closes: AtomicU64,
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// One user message.
struct Rec {
    to: u32,
    phase: u8,
    /// The id `XADD` gave it.
    id: Option<String>,
    /// The id it first arrived with.
    seen_id: Option<String>,
    /// Receipts by each of the user's devices (clients).
    receipts: [u32; 2],
}

impl Rec {
    fn delivered(&self) -> bool {
        self.receipts.iter().any(|r| *r > 0)
    }
}

#[derive(Default)]
struct Book {
    msgs: Mutex<Vec<Rec>>,
    /// Receipts per topic message.
    topic: Mutex<Vec<u32>>,
    delivered: AtomicU64,
    dups: [AtomicU64; 2],
    /// A duplicate whose id differs from the first copy's.
    dup_other_id: AtomicU64,
    misrouted: AtomicU64,
    unparsed: AtomicU64,
}

impl Book {
    fn add(&self, to: u32, phase: u8) -> u64 {
        let mut m = self.msgs.lock().unwrap_or_else(|e| e.into_inner());
        m.push(Rec {
            to,
            phase,
            id: None,
            seen_id: None,
            receipts: [0; 2],
        });
        (m.len() - 1) as u64
    }

    fn set_id(&self, n: u64, id: String) {
        let mut m = self.msgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = m.get_mut(n as usize) {
            r.id = Some(id);
        }
    }

    /// Message `n` arrived at device `dev` of `user` with `id`. A
    /// duplicate is a second copy on the same device.
    fn receive(&self, n: u64, id: &str, user: u32, dev: usize) {
        let mut m = self.msgs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = m.get_mut(n as usize) else {
            bump(&self.unparsed);
            return;
        };
        if r.to != user {
            bump(&self.misrouted);
            return;
        }
        let dev = dev.min(1);
        r.receipts[dev] += 1;
        if r.receipts[dev] > 1 {
            bump(&self.dups[usize::from(r.phase)]);
        }
        match &r.seen_id {
            None => {
                r.seen_id = Some(id.to_owned());
                bump(&self.delivered);
            }
            Some(first) if first != id => bump(&self.dup_other_id),
            Some(_) => {}
        }
    }

    fn missing(&self) -> Vec<(u64, u32)> {
        let m = self.msgs.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .enumerate()
            .filter(|(_, r)| !r.delivered())
            .map(|(i, r)| (i as u64, r.to))
            .collect()
    }

    fn topic_add(&self) -> u64 {
        let mut t = self.topic.lock().unwrap_or_else(|e| e.into_inner());
        t.push(0);
        (t.len() - 1) as u64
    }

    fn topic_receive(&self, n: u64) {
        let mut t = self.topic.lock().unwrap_or_else(|e| e.into_inner());
        match t.get_mut(n as usize) {
            Some(c) => *c += 1,
            None => bump(&self.unparsed),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Version {
    Old,
    New,
}

/// What the clients and the producer share with the driver.
struct Ctx {
    lb: String,
    users: usize,
    /// Clients: one per user, two for some.
    clients: usize,
    subscriber_every: usize,
    /// Mean life of a client's connection before it leaves and reconnects
    /// by itself (zero: only when a node closes it).
    churn: Duration,
    phase: AtomicUsize,
    stats: [Stats; 2],
    book: Book,
    /// Node id → release, as each node told on start.
    versions: RwLock<HashMap<String, Version>>,
    /// Clients connected now.
    connected: AtomicU64,
    /// Bumped to make every client close (gracefully) and reconnect.
    cycle: watch::Sender<u64>,
    stop: AtomicBool,
    /// The producer stops adding.
    producing: AtomicBool,
}

impl Ctx {
    fn phase(&self) -> usize {
        self.phase.load(Ordering::Relaxed).min(1)
    }
    fn stats(&self) -> &Stats {
        &self.stats[self.phase()]
    }
    fn version(&self, node: &str) -> Option<Version> {
        self.versions.read().ok()?.get(node).copied()
    }
}

// ------------------------------------------------------------ clients

/// The history position a client resumes from, kept as `/client.js` keeps
/// it: the epoch, and the highest seq up to which it has every message.
#[derive(Default)]
struct Position {
    epoch: Option<String>,
    seq: u64,
    /// Seqs seen above `seq` (holes below them).
    above: BTreeSet<u64>,
}

impl Position {
    fn set(&mut self, epoch: &str, seq: u64) {
        self.epoch = Some(epoch.to_owned());
        self.seq = seq;
        self.above.clear();
    }

    fn note(&mut self, seq: u64) {
        if seq > self.seq {
            self.above.insert(seq);
        }
        // As /client.js: a hole older than the last 1,000 seqs is not
        // coming; step over it.
        while self.above.len() > 1000 {
            if let Some(m) = self.above.pop_first() {
                self.seq = self.seq.max(m);
            }
        }
        while self.above.remove(&(self.seq + 1)) {
            self.seq += 1;
        }
    }
}

/// Where the replay after a `recovered:true` welcome stands.
struct Replay {
    next: u64,
    last: u64,
}

async fn open(ctx: &Ctx, user: &str, pos: &Position) -> Result<Ws> {
    let mut url = format!("ws://{}/ws?user={user}", ctx.lb);
    if let Some(e) = &pos.epoch {
        url.push_str(&format!("&since={}&epoch={e}", pos.seq));
    }
    let fut = async {
        let stream = TcpStream::connect(&ctx.lb).await.context("tcp connect")?;
        stream.set_nodelay(true)?;
        let (ws, _) = client_async(url, stream).await?;
        Ok::<_, anyhow::Error>(ws)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("connect: timeout"))?
}

/// Device `dev` (0, or 1 for a user's second client) of user `i`.
async fn client(ctx: Arc<Ctx>, i: usize, dev: usize) {
    let user = format!("u{i}");
    let uid = i as u32;
    let subscriber = dev == 0 && ctx.subscriber_every > 0 && i.is_multiple_of(ctx.subscriber_every);
    let mut rng = StdRng::seed_from_u64(0xc11e ^ i as u64 ^ (dev as u64) << 32);
    let mut pos = Position::default();
    let mut cycle = ctx.cycle.subscribe();
    while !ctx.stop.load(Ordering::Relaxed) {
        let stats = ctx.stats();
        bump(&stats.connects);
        let asked = pos.epoch.clone().map(|e| (e, pos.seq));
        let mut ws = match open(&ctx, &user, &pos).await {
            Ok(ws) => ws,
            Err(_) => {
                bump(&stats.refused);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
                continue;
            }
        };
        cycle.borrow_and_update();
        ctx.connected.fetch_add(1, Ordering::Relaxed);
        let mut node: Option<Version> = None;
        let mut welcomed = false;
        let mut replay: Option<Replay> = None;
        // One timer: first the end of this connection's life (client churn:
        // a client that leaves by itself), then, once closing, how long to
        // wait for the server's close.
        let life = if ctx.churn.is_zero() {
            Duration::from_secs(86_400)
        } else {
            ctx.churn.mul_f64(rng.random_range(0.5..1.5))
        };
        let timer = tokio::time::sleep(life);
        tokio::pin!(timer);
        let closing_for = Duration::from_secs(5);
        // Asked to stop while connecting: leave at once.
        let mut closing = ctx.stop.load(Ordering::Relaxed);
        if closing {
            let _ = ws.close(None).await;
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + closing_for);
        }
        loop {
            let frame = tokio::select! {
                f = ws.next() => f,
                r = cycle.changed(), if !closing => {
                    if r.is_err() {
                        break;
                    }
                    // Leave as a real client does: Close, then read until
                    // the server closes (what it wrote before still counts).
                    closing = true;
                    let _ = ws.close(None).await;
                    timer.as_mut().reset(tokio::time::Instant::now() + closing_for);
                    continue;
                }
                _ = &mut timer => {
                    if closing {
                        break;
                    }
                    bump(&stats.client_closes);
                    closing = true;
                    let _ = ws.close(None).await;
                    timer.as_mut().reset(tokio::time::Instant::now() + closing_for);
                    continue;
                }
            };
            let t = match frame {
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => {
                    if !closing {
                        bump(&stats.closed_by_server);
                    }
                    break;
                }
                Some(Ok(_)) => continue,
            };
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                bump(&ctx.book.unparsed);
                continue;
            };
            match v["type"].as_str() {
                Some("welcome") if !welcomed => {
                    welcomed = true;
                    node = on_welcome(&ctx, &v, asked.as_ref(), &mut pos, &mut replay);
                    if subscriber {
                        let f = json!({"type":"subscribe","topic":TOPIC}).to_string();
                        let _ = ws.send(WsMessage::Text(f.into())).await;
                    }
                }
                Some("message") => on_message(&ctx, &v, (uid, dev), node, &mut pos, &mut replay),
                _ => {}
            }
        }
        // (A connection that ended in the middle of its replay is not a
        // broken replay: the rest comes with the next resume.)
        ctx.connected.fetch_sub(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
    }
}

fn on_welcome(
    ctx: &Ctx,
    v: &Value,
    asked: Option<&(String, u64)>,
    pos: &mut Position,
    replay: &mut Option<Replay>,
) -> Option<Version> {
    let stats = ctx.stats();
    let version = ctx.version(v["node"].as_str().unwrap_or_default());
    let epoch = v["epoch"].as_str().filter(|e| !e.is_empty());
    let seq = v["seq"].as_u64();
    match version {
        Some(Version::Old) => {
            bump(&stats.welcome_old);
            if v.get("epoch").is_some() {
                bump(&stats.old_welcome_epoch);
            }
        }
        Some(Version::New) => {
            bump(&stats.welcome_new);
            if epoch.is_none() {
                bump(&stats.new_welcome_no_epoch);
            }
        }
        None => bump(&stats.welcome_unknown),
    }
    let recovered = v["recovered"].as_bool();
    if let Some((asked_epoch, since)) = asked {
        bump(&stats.resumes);
        match recovered {
            Some(true) => bump(&stats.recovered_true),
            Some(false) => bump(&stats.recovered_false),
            None if version == Some(Version::New) => bump(&stats.recovered_none_new),
            None => bump(&stats.recovered_none_old),
        }
        if recovered == Some(true)
            && let Some(s) = seq
            && s > *since
            && epoch == Some(asked_epoch.as_str())
        {
            *replay = Some(Replay {
                next: since + 1,
                last: s,
            });
        }
    }
    // As /client.js: no position without history (an old node); keep it on
    // recovered:true under the same epoch; else start over at the welcome's.
    match (epoch, seq) {
        (Some(e), Some(s)) => {
            if !(recovered == Some(true) && pos.epoch.as_deref() == Some(e)) {
                pos.set(e, s);
            }
        }
        _ => *pos = Position::default(),
    }
    version
}

/// The number after `"key":` in the payload (a JSON object of ours).
fn payload_num(p: &Value, key: &str) -> Option<u64> {
    p.get(key)?.as_u64()
}

fn on_message(
    ctx: &Ctx,
    v: &Value,
    (uid, dev): (u32, usize),
    node: Option<Version>,
    pos: &mut Position,
    replay: &mut Option<Replay>,
) {
    let stats = ctx.stats();
    let p = &v["payload"];
    if v.get("topic").is_some() {
        match payload_num(p, "n") {
            Some(n) if p["k"] == "t" => ctx.book.topic_receive(n),
            _ => bump(&ctx.book.unparsed),
        }
        return;
    }
    let (Some(n), Some(id)) = (payload_num(p, "n"), v["id"].as_str()) else {
        bump(&ctx.book.unparsed);
        return;
    };
    let seq = v["seq"].as_u64().filter(|s| *s > 0);
    let epoch = v["epoch"].as_str().filter(|e| !e.is_empty());
    match (node, seq) {
        (Some(Version::Old), Some(_)) => bump(&stats.old_msg_seq),
        (Some(Version::New), None) => bump(&stats.new_msg_no_seq),
        _ => {}
    }
    if let Some(r) = replay.as_mut() {
        if seq == Some(r.next) {
            r.next += 1;
            if r.next > r.last {
                *replay = None;
            }
        } else {
            bump(&stats.replay_broken);
            eprintln!(
                "upgrade: u{uid}: replay expected seq {} (through {}), got {:?} (id {id})",
                r.next, r.last, seq
            );
            *replay = None;
        }
    }
    if let (Some(s), Some(e)) = (seq, epoch) {
        match pos.epoch.as_deref() {
            Some(cur) if cur == e => {}
            None => pos.set(e, s.saturating_sub(1)),
            Some(_) => {
                bump(&stats.epoch_changes);
                pos.set(e, 0);
            }
        }
        pos.note(s);
    }
    ctx.book.receive(n, id, uid, dev);
}

// ------------------------------------------------------------ producer

async fn producer(ctx: Arc<Ctx>, redis_url: String, rate: f64, topic_share: f64) -> Result<()> {
    let client = redis::Client::open(redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let send = wscluster::keys::Keys::new(PREFIX).send(0);
    let mut rng = StdRng::seed_from_u64(0x9e0d);
    let started = Instant::now();
    let mut done = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while ctx.producing.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        let k = due.saturating_sub(done).min(1000);
        if k == 0 {
            continue;
        }
        let phase = ctx.phase() as u8;
        let mut pipe = redis::pipe();
        let mut users = Vec::with_capacity(k as usize);
        for _ in 0..k {
            if rng.random_bool(topic_share.clamp(0.0, 1.0)) {
                let n = ctx.book.topic_add();
                let payload = json!({"k":"t","n":n,"ts":now_us()}).to_string();
                pipe.cmd("XADD")
                    .arg(&send)
                    .arg("*")
                    .arg("topic")
                    .arg(TOPIC)
                    .arg("payload")
                    .arg(payload);
                users.push(None);
            } else {
                let to = rng.random_range(0..ctx.users) as u32;
                let n = ctx.book.add(to, phase);
                let payload = json!({"k":"u","n":n,"to":format!("u{to}"),"ts":now_us()});
                pipe.cmd("XADD")
                    .arg(&send)
                    .arg("*")
                    .arg("to")
                    .arg(format!("u{to}"))
                    .arg("payload")
                    .arg(payload.to_string());
                users.push(Some(n));
            }
        }
        let ids: Vec<String> = pipe
            .query_async(&mut conn)
            .await
            .context("XADD to the send stream")?;
        for (n, id) in users.into_iter().zip(ids) {
            if let Some(n) = n {
                ctx.book.set_id(n, id);
            }
        }
        done += k;
    }
    Ok(())
}

// ------------------------------------------------------------ processes

struct Lb {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    addr: String,
}

impl Lb {
    async fn start(bin: &Path, log: &Path) -> Result<Lb> {
        let err = std::fs::File::create(log)?;
        let mut child = tokio::process::Command::new(bin)
            .args(["--control", "127.0.0.1:0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("lb stdin"))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("lb stdout"))?;
        let mut stdout = BufReader::new(out).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
            .await
            .map_err(|_| anyhow!("wsc-lb did not start"))??
            .unwrap_or_default();
        let addr = line
            .strip_prefix("wsc-lb listening on ")
            .ok_or_else(|| anyhow!("unexpected wsc-lb output: {line:?}"))?
            .to_owned();
        Ok(Lb {
            child,
            stdin,
            stdout,
            addr,
        })
    }

    /// `add ADDR` or `remove ADDR`; the backends after it.
    async fn control(&mut self, cmd: &str, addr: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{cmd} {addr}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(5), self.stdout.next_line())
            .await
            .map_err(|_| anyhow!("wsc-lb did not answer {cmd}"))??
            .unwrap_or_default();
        line.strip_prefix("wsc-lb backends")
            .map(|s| s.trim().to_owned())
            .ok_or_else(|| anyhow!("wsc-lb answered {line:?} to {cmd}"))
    }
}

struct Node {
    name: String,
    version: Version,
    addr: String,
    id: String,
    process: NodeProcess,
}

struct Procs {
    dir: PathBuf,
    redis_url: String,
    drain_ms: u64,
    old_bin: PathBuf,
    new_bin: PathBuf,
    started: usize,
}

impl Procs {
    async fn start(&mut self, ctx: &Ctx, version: Version) -> Result<Node> {
        self.started += 1;
        let (bin, tag) = match version {
            Version::Old => (&self.old_bin, "old"),
            Version::New => (&self.new_bin, "new"),
        };
        let name = format!("{tag}-{}", self.started);
        let args: Vec<String> = [
            "--redis-url",
            &self.redis_url,
            "--prefix",
            PREFIX,
            "--dev",
            "--drain-ms",
            &self.drain_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = NodeLog::File(self.dir.join(format!("{name}.log")));
        let process = NodeProcess::launch(
            bin,
            &name,
            &args,
            &[("RUST_LOG", "info")],
            log,
            Duration::from_secs(15),
        )?;
        let addr = process.addr().to_owned();
        wait_ready(&addr, Duration::from_secs(15))
            .await
            .with_context(|| format!("node {name} at {addr} not ready"))?;
        let view = cluster_view(&addr).await?;
        let id = view["node"]
            .as_str()
            .ok_or_else(|| anyhow!("{name}: /cluster without a node id: {view}"))?
            .to_owned();
        if let Ok(mut v) = ctx.versions.write() {
            v.insert(id.clone(), version);
        }
        Ok(Node {
            name,
            version,
            addr,
            id,
            process,
        })
    }
}

// ------------------------------------------------------------ the run

fn stamp(t0: Instant) -> String {
    format!("{:6.1}s", t0.elapsed().as_secs_f64())
}

fn progress(ctx: &Ctx, t0: Instant) {
    let sent = ctx.book.msgs.lock().map(|m| m.len()).unwrap_or(0);
    println!(
        "{} sent {sent}, delivered {}, clients connected {}/{}",
        stamp(t0),
        get(&ctx.book.delivered),
        get(&ctx.connected),
        ctx.clients
    );
}

/// Traffic for `d`, a progress line every 5 s.
async fn run_for(ctx: &Ctx, t0: Instant, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
        progress(ctx, t0);
    }
}

/// One drain: the node exits 0 within --drain-ms + 10 s.
struct Drain {
    node: String,
    version: Version,
    exit: Option<i32>,
    secs: f64,
}

/// The cluster being replaced node by node.
struct Rolling {
    procs: Procs,
    lb: Lb,
    nodes: Vec<Node>,
    drains: Vec<Drain>,
    settle: Duration,
    t0: Instant,
}

impl Rolling {
    /// Replace each node by one of release `to`: start it, add it to the
    /// LB, SIGTERM the old one, wait for its exit, take it out of the LB;
    /// then traffic for `settle`.
    async fn replace_all(&mut self, ctx: &Ctx, to: Version) -> Result<()> {
        let count = self.nodes.len();
        let t0 = self.t0;
        for step in 1..=count {
            let fresh = self.procs.start(ctx, to).await?;
            let backends = self.lb.control("add", &fresh.addr).await?;
            println!(
                "{} step {step}/{count}: {} ({:?}, id {}) ready at {}; LB: {backends}",
                stamp(t0),
                fresh.name,
                fresh.version,
                short_id(&fresh.id),
                fresh.addr
            );
            let mut old = self.nodes.remove(0);
            self.nodes.push(fresh);
            let t = Instant::now();
            old.process.signal(libc::SIGTERM);
            let exit = old
                .process
                .wait_exit(Duration::from_millis(self.procs.drain_ms + 10_000))
                .await;
            let secs = t.elapsed().as_secs_f64();
            let backends = self.lb.control("remove", &old.addr).await?;
            println!(
                "{} step {step}/{count}: {} ({:?}) SIGTERM -> {} after {secs:.1}s; LB: {backends}",
                stamp(t0),
                old.name,
                old.version,
                match exit {
                    Some(c) => format!("exit {c}"),
                    None => "no exit (killed)".into(),
                }
            );
            self.drains.push(Drain {
                node: old.name.clone(),
                version: old.version,
                exit,
                secs,
            });
            drop(old);
            run_for(ctx, t0, self.settle).await;
        }
        Ok(())
    }
}

fn short_id(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// Wait until every user message arrived, or none arrived for `quiet`
/// (at most `max`). The missing ones.
async fn await_all(ctx: &Ctx, quiet: Duration, max: Duration) -> Vec<(u64, u32)> {
    let start = Instant::now();
    let mut last = get(&ctx.book.delivered);
    let mut changed = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let d = get(&ctx.book.delivered);
        if d != last {
            last = d;
            changed = Instant::now();
        }
        let missing = ctx.book.missing();
        if missing.is_empty() || changed.elapsed() > quiet || start.elapsed() > max {
            return missing;
        }
    }
}

/// Where the missing messages are: for each stream of the prefix
/// (mailboxes, inboxes, taking streams, the send stream), how many of them
/// it holds.
async fn locate(redis_url: &str, missing: &[(u64, u32)]) -> Result<Vec<(String, usize)>> {
    let want: std::collections::HashSet<u64> = missing.iter().map(|(n, _)| *n).collect();
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:*"))
        .query_async(&mut conn)
        .await?;
    let mut out = Vec::new();
    for k in keys {
        let ty: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await?;
        if ty != "stream" {
            continue;
        }
        let entries: redis::Value = redis::cmd("XRANGE")
            .arg(&k)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        let hits = stream_payloads(&entries)
            .into_iter()
            .filter_map(|p| serde_json::from_slice::<Value>(&p).ok())
            .filter(|p| p["k"] == "u" && p["n"].as_u64().is_some_and(|n| want.contains(&n)))
            .count();
        if hits > 0 {
            out.push((k, hits));
        }
    }
    Ok(out)
}

/// Presence when every node is of the current release (contract §10): a
/// user with a connection in `<p>:user:{u}` is `on` in `<p>:presence:{u}`
/// (both read in one transaction), and one without is not (a stale online:
/// its last connection was on a node of the previous release, which emits
/// no offline; the presence sweep should have caught it).
async fn presence_check(redis_url: &str, users: usize) -> Result<Presence> {
    let keys = wscluster::keys::Keys::new(PREFIX);
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut p = Presence::default();
    for i in 0..users {
        let u = wscluster::ids::UserId::parse(&format!("u{i}")).map_err(|e| anyhow!("{e}"))?;
        let (n, state): (u64, Option<String>) = redis::pipe()
            .atomic()
            .cmd("HLEN")
            .arg(keys.user(&u))
            .cmd("HGET")
            .arg(keys.presence(&u))
            .arg("state")
            .query_async(&mut conn)
            .await?;
        let on = state.as_deref() == Some("on");
        if n > 0 {
            p.connected += 1;
            if !on {
                p.not_online
                    .push(format!("u{i} ({})", state.as_deref().unwrap_or("none")));
            }
        } else if on {
            p.stale_online.push(format!("u{i}"));
        }
    }
    Ok(p)
}

/// What [`presence_check`] found: users with a connection, those of them
/// not online, and users online without a connection.
#[derive(Default)]
struct Presence {
    connected: u64,
    not_online: Vec<String>,
    stale_online: Vec<String>,
}

/// The presence events of the whole run: online and offline count, and
/// the users whose events (repeats dropped, ordered by `n`) do not
/// alternate starting with `online` (contract §10).
async fn events_check(redis_url: &str) -> Result<(u64, u64, Vec<String>)> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(wscluster::keys::Keys::new(PREFIX).events())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    let mut per_user: HashMap<String, std::collections::BTreeMap<u64, String>> = HashMap::new();
    let (mut on, mut off) = (0, 0);
    for f in stream_fields(&v) {
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (Some(kind), Some(user), Some(n)) = (get("type"), get("user"), get("n")) else {
            continue;
        };
        match kind.as_str() {
            "online" => on += 1,
            "offline" => off += 1,
            _ => continue,
        }
        let n: u64 = n.parse().unwrap_or(0);
        per_user.entry(user).or_default().insert(n, kind);
    }
    let mut broken = Vec::new();
    for (user, evs) in &per_user {
        let mut want = "online";
        for kind in evs.values() {
            if kind != want {
                broken.push(user.clone());
                break;
            }
            want = if want == "online" {
                "offline"
            } else {
                "online"
            };
        }
    }
    broken.sort();
    Ok((on, off, broken))
}

/// `<p>:mailbox-bytes:{u}` (the current release's count of the payload
/// bytes in a user's mailbox) against what the mailbox holds. The users
/// whose count is off: user, counted, held.
async fn mailbox_bytes_check(redis_url: &str) -> Result<Vec<(String, i64, i64)>> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:mailbox-bytes:*"))
        .query_async(&mut conn)
        .await?;
    let mut out = Vec::new();
    for k in keys {
        let counted: i64 = redis::cmd("GET")
            .arg(&k)
            .query_async::<Option<i64>>(&mut conn)
            .await?
            .unwrap_or(0);
        let mailbox = k.replacen(":mailbox-bytes:", ":mailbox:", 1);
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(&mailbox)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await?;
        let held: i64 = stream_payloads(&v).iter().map(|p| p.len() as i64).sum();
        if counted != held {
            let user = k
                .split_once('{')
                .map(|(_, u)| u.trim_end_matches('}').to_owned())
                .unwrap_or(k.clone());
            out.push((user, counted, held));
        }
    }
    Ok(out)
}

/// Warnings and errors in one node's log.
struct LogNotes {
    node: String,
    warn: usize,
    error: usize,
    /// A few distinct ones (level and message, without the timestamp).
    samples: Vec<String>,
}

/// The WARN and ERROR lines of every node's log (`<name>.log` in `dir`).
fn scan_logs(dir: &Path, drains: &[Drain]) -> Vec<LogNotes> {
    let mut names: Vec<String> = drains.iter().map(|d| d.node.clone()).collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = f.strip_suffix(".log")
                && (n.starts_with("old-") || n.starts_with("new-"))
                && !names.iter().any(|x| x == n)
            {
                names.push(n.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for node in names {
        let text = std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap_or_default();
        let mut notes = LogNotes {
            node,
            warn: 0,
            error: 0,
            samples: Vec::new(),
        };
        for line in text.lines() {
            let level = if line.contains(" WARN ") {
                notes.warn += 1;
                "WARN"
            } else if line.contains(" ERROR ") {
                notes.error += 1;
                "ERROR"
            } else {
                continue;
            };
            let msg = line
                .split_once(&format!(" {level} "))
                .map(|(_, m)| m.trim())
                .unwrap_or(line);
            // One sample per distinct message head (module and text).
            let head: String = msg.chars().take(60).collect();
            if notes.samples.len() < 3 && !notes.samples.iter().any(|s| s.contains(&head)) {
                notes.samples.push(format!(
                    "{level} {}",
                    msg.chars().take(200).collect::<String>()
                ));
            }
        }
        if notes.warn + notes.error > 0 {
            out.push(notes);
        }
    }
    out
}

/// The fields of each entry of an `XRANGE` reply.
fn stream_fields(v: &redis::Value) -> Vec<Vec<(String, String)>> {
    let redis::Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let redis::Value::Array(pair) = e else {
            continue;
        };
        let Some(redis::Value::Array(fields)) = pair.get(1) else {
            continue;
        };
        out.push(
            fields
                .chunks(2)
                .filter_map(|kv| match kv {
                    [redis::Value::BulkString(k), redis::Value::BulkString(v)] => Some((
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )),
                    _ => None,
                })
                .collect(),
        );
    }
    out
}

/// The `payload` values of an `XRANGE` reply (of a dead letter too: its
/// `entry` field holds the original fields as a JSON object).
fn stream_payloads(v: &redis::Value) -> Vec<Vec<u8>> {
    stream_fields(v)
        .into_iter()
        .filter_map(|f| {
            f.iter()
                .find(|(k, _)| k == "payload")
                .map(|(_, v)| v.clone())
                .or_else(|| {
                    let (_, e) = f.iter().find(|(k, _)| k == "entry")?;
                    let e: Value = serde_json::from_str(e).ok()?;
                    e["payload"].as_str().map(str::to_owned)
                })
        })
        .map(String::into_bytes)
        .collect()
}

/// Does user `i` have a second device?
fn two_devices(a: &UpgradeArgs, i: usize) -> bool {
    a.second_device_every > 0 && i % a.second_device_every == 1 % a.second_device_every
}

pub async fn run(a: &UpgradeArgs) -> Result<bool> {
    let plan = a.plan();
    for b in [&a.old_bin, &a.new_bin, &a.lb_bin] {
        if !b.exists() {
            bail!("{} not found", b.display());
        }
    }
    let dir = tmpdir("upgrade").context("scratch directory")?;
    let result = run_in(a, &plan, &dir).await;
    if a.keep_logs || !matches!(result, Ok(true)) {
        eprintln!("upgrade: logs in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(a: &UpgradeArgs, plan: &Plan, dir: &Path) -> Result<bool> {
    let t0 = Instant::now();
    let old = a.old_label.as_str();
    println!(
        "upgrade: {} nodes, {} users ({} subscribed to {TOPIC:?}), {} msg/s ({:.0}% topic), --drain-ms {}, client reconnects every ~{:.0} s",
        a.nodes,
        plan.users,
        (0..plan.users)
            .filter(|i| a.subscriber_every > 0 && i.is_multiple_of(a.subscriber_every))
            .count(),
        plan.rate,
        a.topic_share * 100.0,
        plan.drain_ms,
        plan.churn.as_secs_f64()
    );
    let redis = RedisServer::start(dir)?;
    let mut procs = Procs {
        dir: dir.to_owned(),
        redis_url: redis.url(),
        drain_ms: plan.drain_ms,
        old_bin: a.old_bin.clone(),
        new_bin: a.new_bin.clone(),
        started: 0,
    };
    let mut lb = Lb::start(&a.lb_bin, &dir.join("lb.log")).await?;
    let (cycle, _) = watch::channel(0u64);
    let ctx = Arc::new(Ctx {
        lb: lb.addr.clone(),
        users: plan.users,
        clients: plan.users + (0..plan.users).filter(|i| two_devices(a, *i)).count(),
        subscriber_every: a.subscriber_every,
        churn: plan.churn,
        phase: AtomicUsize::new(0),
        stats: Default::default(),
        book: Book::default(),
        versions: RwLock::new(HashMap::new()),
        connected: AtomicU64::new(0),
        cycle,
        stop: AtomicBool::new(false),
        producing: AtomicBool::new(true),
    });

    // 3 old nodes behind the LB.
    let mut nodes = Vec::new();
    for _ in 0..a.nodes.max(1) {
        let n = procs.start(&ctx, Version::Old).await?;
        lb.control("add", &n.addr).await?;
        nodes.push(n);
    }
    println!(
        "{} {} {old} nodes ({}) behind wsc-lb on {}; Redis on {}",
        stamp(t0),
        nodes.len(),
        nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", "),
        lb.addr,
        redis.url()
    );

    let mut clients = Vec::new();
    for i in 0..plan.users {
        clients.push(tokio::spawn(client(ctx.clone(), i, 0)));
        if two_devices(a, i) {
            clients.push(tokio::spawn(client(ctx.clone(), i, 1)));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&ctx.connected) < clients.len() as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} clients connected within 30 s",
                get(&ctx.connected),
                clients.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} {} clients connected", stamp(t0), clients.len());
    let prod = tokio::spawn(producer(ctx.clone(), redis.url(), plan.rate, a.topic_share));

    let mut roll = Rolling {
        procs,
        lb,
        nodes,
        drains: Vec::new(),
        settle: plan.settle,
        t0,
    };
    run_for(&ctx, t0, plan.warmup).await;
    println!(
        "{} == upgrade: {old} -> current, one node at a time",
        stamp(t0)
    );
    roll.replace_all(&ctx, Version::New).await?;
    run_for(&ctx, t0, plan.steady).await;
    let presence = presence_check(&redis.url(), plan.users).await?;
    println!(
        "{} presence on the all-current cluster: {} users with a connection, {} of them not online; {} online without one",
        stamp(t0),
        presence.connected,
        presence.not_online.len(),
        presence.stale_online.len()
    );
    ctx.phase.store(1, Ordering::Relaxed);
    println!(
        "{} == rollback: current -> {old}, one node at a time",
        stamp(t0)
    );
    roll.replace_all(&ctx, Version::Old).await?;
    run_for(&ctx, t0, plan.steady).await;
    ctx.producing.store(false, Ordering::Relaxed);
    prod.await.map_err(|e| anyhow!("producer: {e}"))??;
    println!(
        "{} producer stopped; waiting for the last deliveries",
        stamp(t0)
    );

    let mut missing = await_all(&ctx, Duration::from_secs(5), Duration::from_secs(30)).await;
    let before_sweep = missing.len();
    let mut located = Vec::new();
    if !missing.is_empty() {
        located = match locate(&redis.url(), &missing).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("upgrade: looking for the missing messages in Redis: {e:#}");
                Vec::new()
            }
        };
        println!(
            "{} {} message(s) not delivered yet; in Redis: {}; every client reconnects once",
            stamp(t0),
            missing.len(),
            if located.is_empty() {
                "nowhere".to_owned()
            } else {
                located
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        ctx.cycle.send_modify(|c| *c += 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        missing = await_all(&ctx, Duration::from_secs(5), Duration::from_secs(30)).await;
    }
    ctx.stop.store(true, Ordering::Relaxed);
    ctx.cycle.send_modify(|c| *c += 1);
    for c in clients {
        let abort = c.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let Rolling {
        nodes,
        mut lb,
        drains,
        ..
    } = roll;
    drop(nodes);
    let _ = lb.child.kill().await;
    let events = events_check(&redis.url()).await?;
    let bytes = mailbox_bytes_check(&redis.url()).await?;
    drop(redis);
    let logs = scan_logs(dir, &drains);
    let end = End {
        drains,
        missing,
        before_sweep,
        located,
        logs,
        presence,
        events,
        bytes,
    };
    Ok(report(a, &ctx, &end, t0))
}

/// How the run ended.
struct End {
    drains: Vec<Drain>,
    /// User messages never delivered (after every client reconnected once).
    missing: Vec<(u64, u32)>,
    /// How many were missing before that.
    before_sweep: usize,
    /// Where those were in Redis: stream, how many.
    located: Vec<(String, usize)>,
    logs: Vec<LogNotes>,
    /// [`presence_check`] at the end of the upgrade.
    presence: Presence,
    /// [`events_check`] at the end.
    events: (u64, u64, Vec<String>),
    /// [`mailbox_bytes_check`] at the end.
    bytes: Vec<(String, i64, i64)>,
}

fn report(a: &UpgradeArgs, ctx: &Ctx, end: &End, t0: Instant) -> bool {
    let End {
        drains,
        missing,
        before_sweep,
        located,
        logs,
        presence,
        events,
        bytes,
    } = end;
    let before_sweep = *before_sweep;
    let old = a.old_label.as_str();
    let (sent, delivered) = {
        let m = ctx.msgs_by_phase();
        (m.0, m.1)
    };
    let lost_by = |p: usize| {
        let m = ctx.book.msgs.lock().unwrap_or_else(|e| e.into_inner());
        missing
            .iter()
            .filter(|(n, _)| {
                m.get(*n as usize)
                    .is_some_and(|r| usize::from(r.phase) == p)
            })
            .count() as u64
    };
    let topic = ctx.book.topic.lock().map(|t| t.clone()).unwrap_or_default();
    let subscribers = (0..ctx.users)
        .filter(|i| a.subscriber_every > 0 && i.is_multiple_of(a.subscriber_every))
        .count();
    let mut phases = Vec::new();
    let mut deviations: Vec<String> = Vec::new();
    println!();
    println!("upgrade: results ({:.0} s)", t0.elapsed().as_secs_f64());
    for (p, name) in PHASES.iter().enumerate() {
        let s = &ctx.stats[p];
        let lost = lost_by(p);
        let dups = get(&ctx.book.dups[p]);
        let label = if p == 0 {
            format!("{old} -> current")
        } else {
            format!("current -> {old}")
        };
        println!(
            "  {name:<8} ({label}): sent {}, delivered {}, lost {lost}, duplicates {dups}; \
             resumes {}: recovered true {}, false {}, unanswered by {old} nodes {}",
            sent[p],
            delivered[p],
            get(&s.resumes),
            get(&s.recovered_true),
            get(&s.recovered_false),
            get(&s.recovered_none_old),
        );
        println!(
            "           connections {} (refused or failed {}, closed by a node {}, by the client {}); welcomes from {old} nodes {}, current nodes {}{}; \
             messages without seq on current nodes {} (routed by a {old} router)",
            get(&s.connects),
            get(&s.refused),
            get(&s.closed_by_server),
            get(&s.client_closes),
            get(&s.welcome_old),
            get(&s.welcome_new),
            match get(&s.welcome_unknown) {
                0 => String::new(),
                n => format!(", nodes with a new id {n}"),
            },
            get(&s.new_msg_no_seq),
        );
        for (what, n) in [
            (
                "welcome with epoch from a {old} node",
                get(&s.old_welcome_epoch),
            ),
            (
                "welcome without epoch from a current node",
                get(&s.new_welcome_no_epoch),
            ),
            (
                "resume not answered by a current node",
                get(&s.recovered_none_new),
            ),
            ("message with seq from a {old} node", get(&s.old_msg_seq)),
            (
                "recovered:true replay incomplete or out of order",
                get(&s.replay_broken),
            ),
            ("message under another epoch", get(&s.epoch_changes)),
        ] {
            if n > 0 {
                deviations.push(format!("{name}: {} x{n}", what.replace("{old}", old)));
            }
        }
        phases.push(json!({
            "phase": name,
            "sent": sent[p],
            "delivered": delivered[p],
            "lost": lost,
            "duplicates": dups,
            "resumes": get(&s.resumes),
            "recovered_true": get(&s.recovered_true),
            "recovered_false": get(&s.recovered_false),
            "recovered_unanswered_old": get(&s.recovered_none_old),
            "recovered_unanswered_new": get(&s.recovered_none_new),
            "connections": get(&s.connects),
            "refused": get(&s.refused),
            "closed_by_server": get(&s.closed_by_server),
            "client_closes": get(&s.client_closes),
            "welcome_old": get(&s.welcome_old),
            "welcome_new": get(&s.welcome_new),
            "welcome_unknown": get(&s.welcome_unknown),
            "new_msg_no_seq": get(&s.new_msg_no_seq),
            "old_msg_seq": get(&s.old_msg_seq),
            "replay_broken": get(&s.replay_broken),
        }));
    }
    let topic_receipts: u64 = topic.iter().map(|c| u64::from(*c)).sum();
    let topic_reached = topic.iter().filter(|c| **c > 0).count();
    println!(
        "  topic {TOPIC:?} (at most once, not checked): sent {}, reached at least one of {subscribers} subscribers {topic_reached}, receipts {topic_receipts}",
        topic.len()
    );
    let drain_line: Vec<String> = drains
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d.node,
                match d.exit {
                    Some(c) => format!("exit {c} in {:.1}s", d.secs),
                    None => format!("no exit within {:.1}s", d.secs),
                }
            )
        })
        .collect();
    println!("  drains: {}", drain_line.join(", "));
    if logs.is_empty() {
        println!("  node logs: no WARN or ERROR line");
    }
    for l in logs {
        println!(
            "  node log {}: {} WARN, {} ERROR; e.g. {}",
            l.node,
            l.warn,
            l.error,
            l.samples.join(" | ")
        );
    }
    let failed_drains: Vec<&Drain> = drains.iter().filter(|d| d.exit != Some(0)).collect();
    let misrouted = get(&ctx.book.misrouted);
    let other_id = get(&ctx.book.dup_other_id);
    let id_mismatch = {
        let m = ctx.book.msgs.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|r| matches!((&r.id, &r.seen_id), (Some(a), Some(b)) if a != b))
            .count() as u64
    };
    if before_sweep > missing.len() {
        deviations.push(format!(
            "{} message(s) arrived only after every client reconnected (they waited in {})",
            before_sweep - missing.len(),
            if located.is_empty() {
                "no stream found".to_owned()
            } else {
                located
                    .iter()
                    .map(|(k, n)| format!("{k} ({n})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    println!(
        "  presence events (whole run): online {}, offline {}; users whose events do not alternate: {}",
        events.0,
        events.1,
        events.2.len()
    );
    if !presence.not_online.is_empty() {
        deviations.push(format!(
            "after the upgrade, {} of {} users with a connection not online in their presence: {}",
            presence.not_online.len(),
            presence.connected,
            presence
                .not_online
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !presence.stale_online.is_empty() {
        deviations.push(format!(
            "after the upgrade, {} user(s) online in their presence without a connection: {}",
            presence.stale_online.len(),
            presence
                .stale_online
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !events.2.is_empty() {
        deviations.push(format!(
            "{} user(s) whose online/offline events do not alternate: {}",
            events.2.len(),
            events
                .2
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !bytes.is_empty() {
        let over = bytes.iter().filter(|(_, c, h)| c > h).count();
        let worst = bytes.iter().map(|(_, c, h)| c - h).max().unwrap_or(0);
        deviations.push(format!(
            "{} mailbox byte count(s) off (<p>:mailbox-bytes vs the mailbox's payloads; {over} too high, worst by {worst} B): {}",
            bytes.len(),
            bytes
                .iter()
                .take(5)
                .map(|(u, c, h)| format!("{u} counted {c} held {h}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if get(&ctx.book.unparsed) > 0 {
        deviations.push(format!(
            "{} frame(s) not understood",
            get(&ctx.book.unparsed)
        ));
    }
    if deviations.is_empty() {
        println!(
            "  compatibility: as expected ({old} nodes: welcome without epoch/seq, messages without seq; duplicates with the same id)"
        );
    } else {
        for d in &deviations {
            println!("  DEVIATION {d}");
        }
    }
    let lost = missing.len() as u64;
    let replay_broken: u64 = ctx.stats.iter().map(|s| get(&s.replay_broken)).sum();
    let mut fail = Vec::new();
    if lost > 0 {
        let sample: Vec<String> = missing
            .iter()
            .take(10)
            .map(|(n, u)| format!("#{n} to u{u}"))
            .collect();
        fail.push(format!(
            "{lost} user message(s) lost (e.g. {})",
            sample.join(", ")
        ));
    }
    if misrouted > 0 {
        fail.push(format!("{misrouted} message(s) reached another user"));
    }
    if other_id + id_mismatch > 0 {
        fail.push(format!(
            "{} message(s) arrived with another id than XADD gave or than their first copy",
            other_id + id_mismatch
        ));
    }
    if replay_broken > 0 {
        fail.push(format!(
            "{replay_broken} recovered:true replay(s) incomplete or out of order"
        ));
    }
    if !failed_drains.is_empty() {
        fail.push(format!(
            "{} node(s) did not drain to exit 0: {}",
            failed_drains.len(),
            failed_drains
                .iter()
                .map(|d| format!("{} ({:?})", d.node, d.version))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let line = json!({
        "scenario": "upgrade",
        "from": old,
        "short": a.short,
        "users": ctx.users,
        "phases": phases,
        "lost": lost,
        "late_after_reconnect": before_sweep - missing.len(),
        "topic": {"sent": topic.len(), "reached": topic_reached, "receipts": topic_receipts},
        "drains": drains.iter().map(|d| json!({"node": d.node, "exit": d.exit, "secs": d.secs})).collect::<Vec<_>>(),
        "presence_after_upgrade": {"connected": presence.connected, "not_online": presence.not_online.len(), "stale_online": presence.stale_online.len()},
        "events": {"online": events.0, "offline": events.1, "not_alternating": events.2.len()},
        "mailbox_bytes_off": bytes.len(),
        "deviations": deviations,
        "log_warnings": logs.iter().map(|l| json!({"node": l.node, "warn": l.warn, "error": l.error, "samples": l.samples})).collect::<Vec<_>>(),
        "failures": fail,
        "secs": t0.elapsed().as_secs_f64().round(),
        "time_unix_s": now_us() / 1_000_000,
    });
    if let Some(p) = &a.json {
        use std::io::Write;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{line}");
            }
            Err(e) => eprintln!("upgrade: {}: {e}", p.display()),
        }
    }
    if fail.is_empty() {
        println!("upgrade: PASS (no user message lost)");
        true
    } else {
        for f in &fail {
            println!("upgrade: FAIL {f}");
        }
        false
    }
}

impl Ctx {
    /// Sent and delivered user messages per half.
    fn msgs_by_phase(&self) -> ([u64; 2], [u64; 2]) {
        let m = self.book.msgs.lock().unwrap_or_else(|e| e.into_inner());
        let (mut sent, mut delivered) = ([0u64; 2], [0u64; 2]);
        for r in m.iter() {
            let p = usize::from(r.phase).min(1);
            sent[p] += 1;
            if r.delivered() {
                delivered[p] += 1;
            }
        }
        (sent, delivered)
    }
}

//! Chaos soak (issue 3): one redis-server, four nodes, clients that
//! reconnect round-robin, and a producer, while random nodes are killed
//! (SIGKILL), drained (SIGTERM), frozen (SIGSTOP/SIGCONT) and started
//! again. At the end every message id is accounted for.
//!
//! The clients leave sockets the way real ones do, never dropping one with
//! frames unread: on stop they send a Close frame and read until the
//! server closes; a socket on a silent (frozen) node is handed to a
//! background reader that does the same while the client reconnects
//! elsewhere at once (the node may wake and write to it).
//!
//! Two more faults, off by default (the long form in `scripts/chaos.sh`
//! turns them on):
//! - `CHAOS_REDIS_RESTART=1` (single Redis only): once, mid-run, Redis is
//!   restarted empty at a quiet point: the producer pauses, every id sent
//!   so far is received, then Redis restarts without its data (which the
//!   contract does not promise to survive), the nodes heal under new ids,
//!   and the producer goes on.
//! - `CHAOS_STALLERS=N`: N more users, sent to like the others, whose
//!   clients stop reading for 3–15 s at a time (on sockets with a small
//!   receive buffer), then read on until the server closes the connection
//!   (a stall that blocks the server's writes for 10 s: close 1013; or a
//!   fault), and reconnect. `CHAOS_STALLER_PAYLOAD=B` makes their messages'
//!   payload a JSON string of B bytes (default: the others' payload), so
//!   more than their receive buffer waits unread in a stall.
//!
//! The clients resume (contract §9): each remembers its user's epoch and
//! the highest seq up to which it has seen every message (as `/client.js`
//! does), and reconnects with `since`/`epoch` after every disconnect. Per
//! resume: `recovered:true` means the messages `since+1..=seq` (the
//! welcome's seq) follow the welcome on that connection at once, in that
//! order: anything else there is a **gap**. `recovered:false` resets the
//! expectation to the welcome's position; it is expected when the user's
//! epoch changed (a Redis restart emptied it) or when more was missed than
//! the history holds, and a **failure** otherwise (same epoch, everything
//! after `since` still within `--history-size`). At the end, the seqs seen
//! under the user's current epoch above its last reset must have no hole
//! (a gap too). One (epoch, seq) with two ids, or one id under two
//! positions, is a **seq conflict**. Gaps, seq conflicts, unexpected
//! `recovered:false` answers and malformed welcomes fail the soak; so does
//! a user's epoch changing without a Redis restart.
//!
//! `CHAOS_SECS` sets the run's length: the producer and the faults take its
//! first 80 %; settling and collecting follow (seconds when all is well). Short form (default) runs in
//! `scripts/test.sh`; the long form is `scripts/chaos.sh` (CHAOS_MESSAGES /
//! CHAOS_SECS / CHAOS_USERS / CHAOS_REDIS_RESTART / CHAOS_STALLERS).

mod common;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use rand::Rng;
use redis::Commands;
use redis::streams::{StreamId, StreamRangeReply};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, client_async, connect_async};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a client that stops keeps reading after its Close frame.
const LEAVE_ON_STOP: Duration = Duration::from_secs(10);
/// How long a socket abandoned on a silent (frozen) node is still read in
/// the background: the node may wake and write to it.
const LEAVE_ABANDONED: Duration = Duration::from_secs(30);
/// Silence after which a client takes its node for frozen and moves on.
const SILENCE: Duration = Duration::from_secs(3);
/// A staller's socket receive buffer (set before connect).
const STALLER_RCVBUF: u32 = 4096;
/// The nodes' `--history-size` (the server's default, made explicit: the
/// resume checks depend on it).
const HISTORY_SIZE: u64 = 200;

#[derive(Default)]
struct Seen {
    /// Every message id received, with its (epoch, seq) (`""`, 0 without).
    ids: HashMap<String, (String, u64)>,
    duplicates: u64,
    /// Node ids from welcome frames (whose inboxes a failure report reads).
    nodes: HashSet<String>,
    /// How sockets were left (`stop/…` by a stopping client, `abandoned/…`
    /// on a silent node): the server `closed`, the `bound` passed, or the
    /// test finished collecting first (`cut`).
    left: BTreeMap<String, u64>,
    /// Ids sent and not received yet, id → user (the producer adds what it
    /// sent unless already received; receiving removes), so "all delivered
    /// so far" is cheap to ask with a million ids.
    outstanding: HashMap<String, String>,
    /// Stallers: `stalls` begun, and how their connections ended (`close
    /// <code>` from the server, `eof` without a Close frame, `silent`).
    stallers: BTreeMap<String, u64>,
    /// Each staller connection's story, for a failure report.
    staller_conns: Vec<StallerConn>,
    /// History positions and the resume checks.
    hist: Hist,
}

impl Seen {
    /// Record a frame `user`'s client read: a message (its id, and its
    /// position in the user's history), or a welcome (its node). `conn`
    /// is the client's current connection, which the per-connection
    /// checks follow; `None` for a socket it is leaving, whose messages
    /// are only recorded (and move the position on).
    fn record(&mut self, user: &str, text: &str, conn: Option<&mut ConnView>) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        if v["type"] == "message"
            && let Some(id) = v["id"].as_str()
        {
            let pos = match (v["epoch"].as_str(), v["seq"].as_u64()) {
                (Some(e), Some(s)) if !e.is_empty() => Some((e, s)),
                _ => None,
            };
            let owned = pos.map_or((String::new(), 0), |(e, s)| (e.to_owned(), s));
            match self.ids.entry(id.to_owned()) {
                Entry::Vacant(v) => {
                    v.insert(owned);
                    self.outstanding.remove(id);
                }
                Entry::Occupied(o) => {
                    self.duplicates += 1;
                    if *o.get() != owned {
                        // A redelivery keeps its position (contract §3).
                        self.hist.conflict(format!(
                            "{user}: {id} came at {:?} and at {owned:?}",
                            o.get()
                        ));
                        return;
                    }
                }
            }
            match pos {
                Some((e, s)) => self.hist.message(user, id, e, s, conn),
                None => {
                    self.hist.unsequenced += 1;
                    self.hist
                        .sample(format!("{user}: a message without seq/epoch: {v}"));
                }
            }
        } else if v["type"] == "welcome" {
            if let Some(n) = v["node"].as_str() {
                self.nodes.insert(n.to_owned());
            }
            if let Some(conn) = conn {
                self.hist.welcome(user, &v, conn);
            }
        }
    }

    /// The query `user`'s client connects with: a resume from its position
    /// once it has one (and that position, for its [`ConnView`]).
    fn query(&self, user: &str) -> (String, Option<(String, u64)>) {
        match self.hist.users.get(user).and_then(UserHist::position) {
            Some((epoch, since)) => (
                format!("user={user}&since={since}&epoch={}", enc(&epoch)),
                Some((epoch, since)),
            ),
            None => (format!("user={user}"), None),
        }
    }

    /// The producer sent these ids (a client may have received some already).
    fn sent(&mut self, ids: &[String], to: &[String]) {
        for (id, user) in ids.iter().zip(to) {
            if !self.ids.contains_key(id) {
                self.outstanding.insert(id.clone(), user.clone());
            }
        }
    }

    fn tally_staller(&mut self, what: String) {
        *self.stallers.entry(what).or_default() += 1;
    }

    fn missing<'a>(&self, sent: &'a [(String, String)]) -> Vec<&'a (String, String)> {
        sent.iter()
            .filter(|(id, _)| !self.ids.contains_key(id))
            .collect()
    }
}

/// How many failure samples are kept for the report.
const SAMPLES: usize = 20;

/// History positions (contract §9) and the resume checks, per user.
#[derive(Default)]
struct Hist {
    /// The nodes' `--history-size`.
    history_size: u64,
    users: HashMap<String, UserHist>,
    /// Welcomes on the clients' connections (a first connect or a resume).
    welcomes: u64,
    /// Resumes answered `recovered:true`, and `recovered:false`.
    resumed_true: u64,
    resumed_false: u64,
    /// The `recovered:false` answers by cause: the user's epoch had
    /// changed (expected after a Redis restart), more was missed than the
    /// history holds (expected), or neither (a failure).
    false_new_epoch: u64,
    false_beyond_history: u64,
    false_unexpected: u64,
    /// Failures: a `recovered:true` replay that was not `since+1..=seq` in
    /// order, or a hole in the seqs seen at the end (one per user).
    gaps: u64,
    /// Failures: one (epoch, seq) with two ids, or one id at two positions.
    seq_conflicts: u64,
    /// Failures: a welcome not as contract §3 has it (no epoch/seq, a
    /// `recovered` that does not answer what was asked, `recovered:true`
    /// under another epoch or behind `since`).
    bad_welcomes: u64,
    /// Failures: a user message without `seq`/`epoch` (history is on).
    unsequenced: u64,
    /// Replays checked to their end (the connection lasted that long).
    replays: u64,
    /// Informative: a message read on the current connection ahead of a
    /// lower seq not seen yet (live order is promised only while no node
    /// fails, §7: it happens when a frozen node wakes; resuming from the
    /// highest seq up to which all were seen covers it).
    out_of_order: u64,
    /// Messages under an epoch new to the client on its connection (the
    /// user's counter started again: a Redis restart).
    epoch_changes: u64,
    /// The first failures, for the report.
    samples: Vec<String>,
}

/// What a user's clients have seen of its history.
#[derive(Default)]
struct UserHist {
    /// The epoch a resume asks for (`None` before the first welcome).
    epoch: Option<String>,
    /// Every seq above `base` under `epoch` is expected: the welcome's
    /// seq at the first connect, a `recovered:false` or a new epoch.
    base: u64,
    /// `base+1..=upto` were all seen: the `since` of the next resume.
    upto: u64,
    /// The epochs the client moved on from (their late redeliveries are
    /// only checked for conflicts).
    retired: HashSet<String>,
    /// seq → id, per epoch.
    seqs: HashMap<String, HashMap<u64, String>>,
}

impl UserHist {
    fn position(&self) -> Option<(String, u64)> {
        self.epoch.clone().map(|e| (e, self.upto))
    }

    /// Expect every seq above `at` under `epoch` from now on.
    fn reset(&mut self, epoch: &str, at: u64) {
        if let Some(old) = self.epoch.replace(epoch.to_owned())
            && old != epoch
        {
            self.retired.insert(old);
        }
        self.base = at;
        self.upto = at;
        self.advance();
    }

    /// Move `upto` over the seqs seen.
    fn advance(&mut self) {
        if let Some(seqs) = self.epoch.as_ref().and_then(|e| self.seqs.get(e)) {
            while seqs.contains_key(&(self.upto + 1)) {
                self.upto += 1;
            }
        }
    }

    /// The seqs above `upto` not seen under the current epoch, up to the
    /// highest one seen: (how many, the first few).
    fn holes(&self) -> (u64, Vec<u64>) {
        let Some(seqs) = self.epoch.as_ref().and_then(|e| self.seqs.get(e)) else {
            return (0, Vec::new());
        };
        let max = seqs.keys().copied().max().unwrap_or(0);
        let missing: Vec<u64> = (self.upto + 1..=max)
            .filter(|s| !seqs.contains_key(s))
            .collect();
        (missing.len() as u64, missing.into_iter().take(10).collect())
    }
}

/// One connection of a client, for the checks made per connection.
struct ConnView {
    /// The resume asked for: (epoch, since).
    asked: Option<(String, u64)>,
    /// The welcome's conn id, for a report.
    conn: String,
    /// After `recovered:true`: the replay still expected.
    replay: Option<Replay>,
}

/// A replay expected after `recovered:true`: `next..=upto` under `epoch`,
/// in order, before anything else of that epoch.
struct Replay {
    epoch: String,
    since: u64,
    next: u64,
    upto: u64,
}

impl ConnView {
    fn new(asked: Option<(String, u64)>) -> Self {
        ConnView {
            asked,
            conn: String::new(),
            replay: None,
        }
    }
}

impl Hist {
    fn sample(&mut self, s: String) {
        if self.samples.len() < SAMPLES {
            self.samples.push(s);
        }
    }

    fn conflict(&mut self, s: String) {
        self.seq_conflicts += 1;
        self.sample(format!("seq conflict: {s}"));
    }

    /// A welcome on `user`'s current connection.
    fn welcome(&mut self, user: &str, v: &serde_json::Value, conn: &mut ConnView) {
        conn.conn = v["conn"].as_str().unwrap_or("?").to_owned();
        self.welcomes += 1;
        let (Some(e), Some(w)) = (v["epoch"].as_str(), v["seq"].as_u64()) else {
            self.bad_welcomes += 1;
            self.sample(format!("{user}: a welcome without epoch/seq: {v}"));
            return;
        };
        let rec = &v["recovered"];
        let history_size = self.history_size;
        let h = self.users.entry(user.to_owned()).or_default();
        let mut bad = None;
        match (&conn.asked, rec.as_bool()) {
            (None, _) => {
                if !rec.is_null() {
                    bad = Some("recovered answers no resume");
                }
                h.reset(e, w);
            }
            (Some((asked, since)), Some(true)) => {
                self.resumed_true += 1;
                if e != asked || w < *since {
                    bad = Some("recovered:true at another position");
                    h.reset(e, w);
                } else if w > *since {
                    conn.replay = Some(Replay {
                        epoch: e.to_owned(),
                        since: *since,
                        next: since + 1,
                        upto: w,
                    });
                } else {
                    self.replays += 1;
                }
            }
            (Some((asked, since)), Some(false)) => {
                self.resumed_false += 1;
                if e != asked {
                    self.false_new_epoch += 1;
                } else if w >= *since && w - since > history_size {
                    self.false_beyond_history += 1;
                } else {
                    // The epoch matches, `since` is not ahead of the seq
                    // the client saw, and the history holds the newest
                    // `history_size`: every message after `since` is in
                    // it, so the answer should have been true (§9) (or
                    // the counter went back, behind what the client saw).
                    self.false_unexpected += 1;
                    if self.samples.len() < SAMPLES {
                        self.samples.push(format!(
                            "{user} conn {}: resume since {since} under {asked}: recovered:false \
                             at seq {w} of the same epoch (history size {history_size})",
                            conn.conn
                        ));
                    }
                }
                h.reset(e, w);
            }
            (Some(_), None) => {
                bad = Some("a resume not answered");
                h.reset(e, w);
            }
        }
        if let Some(why) = bad {
            self.bad_welcomes += 1;
            self.sample(format!(
                "{user}: {why}: asked {:?}, welcome {v}",
                conn.asked
            ));
        }
    }

    /// A message at (`epoch`, `seq`) read by `user`'s client: on its
    /// current connection (`conn`), or on one it is leaving.
    fn message(
        &mut self,
        user: &str,
        id: &str,
        epoch: &str,
        seq: u64,
        mut conn: Option<&mut ConnView>,
    ) {
        // The replay after `recovered:true`: since+1..=seq, in order.
        if let Some(c) = conn.as_deref_mut()
            && let Some(r) = c.replay.as_mut()
            && r.epoch == epoch
        {
            if seq == r.next {
                r.next += 1;
                if r.next > r.upto {
                    c.replay = None;
                    self.replays += 1;
                }
            } else {
                self.gaps += 1;
                let s = format!(
                    "gap: {user} conn {}: recovered:true after since {} (epoch {epoch}, \
                     welcome seq {}): seq {} expected, seq {seq} ({id}) came",
                    c.conn, r.since, r.upto, r.next
                );
                c.replay = None;
                self.sample(s);
            }
        }
        let primary = conn.is_some();
        let h = self.users.entry(user.to_owned()).or_default();
        match h.seqs.entry(epoch.to_owned()).or_default().entry(seq) {
            Entry::Occupied(o) => {
                if o.get() != id {
                    let s = format!("{user}: {epoch}/{seq} is {} and {id}", o.get());
                    self.conflict(s);
                }
                return;
            }
            Entry::Vacant(v) => {
                v.insert(id.to_owned());
            }
        }
        if h.epoch.as_deref() == Some(epoch) {
            if primary && seq > h.upto + 1 {
                self.out_of_order += 1;
            }
            h.advance();
        } else if primary && !h.retired.contains(epoch) {
            // The user's counter started again (Redis lost it) while this
            // connection was open: expect what follows the lowest seq seen
            // under it (a leaving socket may have had some first).
            self.epoch_changes += 1;
            let lowest = h.seqs[epoch].keys().copied().min().unwrap_or(seq);
            h.reset(epoch, lowest.saturating_sub(1));
        }
    }

    /// At the end: a hole under a user's current epoch is a gap.
    fn final_check(&mut self) {
        let mut found = Vec::new();
        for (user, h) in &self.users {
            let (n, first) = h.holes();
            if n > 0 {
                found.push(format!(
                    "gap: {user}: {n} seqs never seen under {:?} above {} (base {}), e.g. {first:?}",
                    h.epoch, h.upto, h.base
                ));
            }
        }
        for s in found {
            self.gaps += 1;
            self.sample(s);
        }
    }

    /// The counters, for the summary line.
    fn summary(&self) -> String {
        format!(
            "resumed_true={} resumed_false={} gaps={} seq_conflicts={}",
            self.resumed_true, self.resumed_false, self.gaps, self.seq_conflicts
        )
    }

    /// The rest, for a second line.
    fn details(&self) -> String {
        format!(
            "welcomes {}; recovered:false by cause: new epoch {}, beyond history {}, \
             unexpected {}; replays checked {}; bad welcomes {}; unsequenced {}; epoch changes on a \
             connection {}; out of order (live) {}",
            self.welcomes,
            self.false_new_epoch,
            self.false_beyond_history,
            self.false_unexpected,
            self.replays,
            self.bad_welcomes,
            self.unsequenced,
            self.epoch_changes,
            self.out_of_order
        )
    }
}

/// Leave a socket the way a real client does: send a Close frame, then keep
/// reading (and recording message ids) until the server closes the
/// connection, `bound` passes, or `cut` is cancelled. Frames the server
/// wrote before it saw the Close are read, not lost with a dropped socket.
async fn leave(
    why: &'static str,
    user: String,
    mut ws: Ws,
    seen: Arc<Mutex<Seen>>,
    bound: Duration,
    cut: CancellationToken,
) -> String {
    let deadline = tokio::time::Instant::now() + bound;
    // A frozen node does not read; the frame waits in the socket buffers.
    let sent_close = tokio::time::timeout_at(deadline, ws.close(None)).await;
    let (mut read, mut close) = (0u64, None);
    let (how, detail) = loop {
        let next = tokio::select! {
            _ = cut.cancelled() => break ("cut", String::new()),
            n = tokio::time::timeout_at(deadline, ws.next()) => n,
        };
        match next {
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                read += 1;
                seen.lock().unwrap().record(&user, t.as_str(), None);
            }
            Ok(Some(Ok(WsMessage::Close(f)))) => close = f.map(|f| u16::from(f.code)),
            // Pings.
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => break ("closed", format!(" ({e})")),
            Ok(None) => break ("closed", String::new()),
            Err(_) => break ("bound", String::new()),
        }
    };
    *seen
        .lock()
        .unwrap()
        .left
        .entry(format!("{why}/{how}"))
        .or_default() += 1;
    format!(
        "left ({why}, own Close sent: {}): read {read} more, server close {close:?}, {how}{detail}",
        matches!(sent_close, Ok(Ok(())))
    )
}

/// Sockets the clients abandoned on silent nodes, read in the background
/// until the server closes them (see [`leave`]).
#[derive(Clone)]
struct Abandoned {
    tasks: TaskTracker,
    /// Cancelled when the test has finished collecting.
    collected: CancellationToken,
}

impl Abandoned {
    fn new() -> Self {
        Self {
            tasks: TaskTracker::new(),
            collected: CancellationToken::new(),
        }
    }

    fn hand_over(&self, ws: Ws, user: &str, seen: &Arc<Mutex<Seen>>) {
        self.tasks.spawn(leave(
            "abandoned",
            user.to_owned(),
            ws,
            seen.clone(),
            LEAVE_ABANDONED,
            self.collected.clone(),
        ));
    }

    /// Stop them (collecting is over) and wait for them, bounded; how many
    /// were still running.
    async fn finish(&self, bound: Duration) -> usize {
        self.collected.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(bound, self.tasks.wait()).await;
        self.tasks.len()
    }
}

/// The next node address, round-robin from `i`.
fn next_addr(addrs: &Mutex<Vec<String>>, i: &mut usize) -> String {
    let a = addrs.lock().unwrap();
    *i = (*i + 1) % a.len();
    a[*i].clone()
}

/// A user's client: connects to the nodes round-robin, reconnects on any
/// close (resuming from its position once it has one), records every
/// message. On `stop` it leaves its socket with a closing handshake; a
/// socket on a silent node is handed to `abandoned`.
async fn user_loop(
    user: String,
    addrs: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    abandoned: Abandoned,
) {
    let mut i = rand::rng().random_range(0..4usize);
    while !stop.is_cancelled() {
        let addr = next_addr(&addrs, &mut i);
        let (query, asked) = seen.lock().unwrap().query(&user);
        let url = format!("ws://{addr}/ws?{query}");
        let mut view = ConnView::new(asked);
        let conn = tokio::time::timeout(Duration::from_secs(2), connect_async(url.as_str())).await;
        let Ok(Ok((mut ws, _))) = conn else {
            // Connection refused (a killed node) or timed out: the next one.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    leave("stop", user.clone(), ws, seen.clone(), LEAVE_ON_STOP, CancellationToken::new()).await;
                    return;
                }
                n = tokio::time::timeout(SILENCE, ws.next()) => n,
            };
            match next {
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    seen.lock()
                        .unwrap()
                        .record(&user, t.as_str(), Some(&mut view))
                }
                Ok(Some(Ok(_))) => {}
                // Closed or errored: go elsewhere.
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {
                    // Silent for a while: maybe a node frozen with SIGSTOP
                    // (a real client notices by ping timeouts). Move on at
                    // once, but read the old socket to its end meanwhile:
                    // the node may wake and write to it.
                    abandoned.hand_over(ws, &user, &seen);
                    break;
                }
            }
        }
    }
}

fn spawn_users(
    users: &[String],
    addrs: &Arc<Mutex<Vec<String>>>,
    seen: &Arc<Mutex<Seen>>,
    stop: &CancellationToken,
    abandoned: &Abandoned,
) -> Vec<tokio::task::JoinHandle<()>> {
    users
        .iter()
        .map(|u| {
            tokio::spawn(user_loop(
                u.clone(),
                addrs.clone(),
                seen.clone(),
                stop.clone(),
                abandoned.clone(),
            ))
        })
        .collect()
}

/// Connect with `query` (`user=…`, maybe a resume) on a socket whose
/// receive buffer is set small before connecting (so the window stays
/// small and a stall soon blocks the server's writes).
async fn connect_small(addr: &str, query: &str) -> Option<Ws> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let sock = if sa.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .ok()?;
    sock.set_recv_buffer_size(STALLER_RCVBUF).ok()?;
    let tcp = sock.connect(sa).await.ok()?;
    let url = format!("ws://{addr}/ws?{query}");
    let (ws, _) = client_async(url, MaybeTlsStream::Plain(tcp)).await.ok()?;
    Some(ws)
}

/// A user whose client stops reading now and then: on each connection it
/// reads for a random 1–10 s, stops reading for a random 3–15 s, reads
/// again, and so on until the server closes the connection (a stall that
/// blocks its writes for 10 s: close 1013; or a fault), then
/// reconnects elsewhere (resuming, as [`user_loop`] does). It records every
/// message it reads, and leaves on `stop` as [`user_loop`] does.
async fn staller_loop(
    user: String,
    addrs: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    abandoned: Abandoned,
) {
    let mut i = rand::rng().random_range(0..4usize);
    while !stop.is_cancelled() {
        let addr = next_addr(&addrs, &mut i);
        let (query, asked) = seen.lock().unwrap().query(&user);
        let mut view = ConnView::new(asked);
        let conn = tokio::time::timeout(Duration::from_secs(2), connect_small(&addr, &query)).await;
        let Ok(Some(mut ws)) = conn else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut log = StallerConn::new(&user, &addr);
        let mut close_code: Option<u16> = None;
        let ended = 'conn: loop {
            // Read for a while.
            let read_until = tokio::time::Instant::now()
                + Duration::from_millis(rand::rng().random_range(1000..=10_000));
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => {
                        log.note("stop");
                        let left = leave("stop", user.clone(), ws, seen.clone(), LEAVE_ON_STOP, CancellationToken::new()).await;
                        log.event(left);
                        seen.lock().unwrap().staller_conns.push(log);
                        return;
                    }
                    _ = tokio::time::sleep_until(read_until) => break,
                    n = tokio::time::timeout(SILENCE, ws.next()) => n,
                };
                match next {
                    Ok(Some(Ok(WsMessage::Text(t)))) => {
                        log.read(t.as_str());
                        seen.lock()
                            .unwrap()
                            .record(&user, t.as_str(), Some(&mut view));
                    }
                    Ok(Some(Ok(WsMessage::Close(f)))) => {
                        close_code = f.map(|f| u16::from(f.code));
                        log.note(&format!("close {close_code:?}"));
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => {
                        log.note(&format!("error {e}"));
                        break 'conn false;
                    }
                    Ok(None) => {
                        log.note("end of stream");
                        break 'conn false;
                    }
                    Err(_) => {
                        // A silent (frozen) node, as in `user_loop`; its
                        // story ends when the background reader is done.
                        log.note("silent: abandoned");
                        let (seen, cut) = (seen.clone(), abandoned.collected.clone());
                        let mut log = std::mem::replace(&mut log, StallerConn::new(&user, &addr));
                        let user = user.clone();
                        abandoned.tasks.spawn(async move {
                            let left =
                                leave("abandoned", user, ws, seen.clone(), LEAVE_ABANDONED, cut)
                                    .await;
                            log.event(left);
                            seen.lock().unwrap().staller_conns.push(log);
                        });
                        break 'conn true;
                    }
                }
            }
            // Then stop reading for a while.
            seen.lock().unwrap().tally_staller("stalls".to_owned());
            let stall = Duration::from_millis(rand::rng().random_range(3000..=15_000));
            log.note(&format!("stall {stall:?}"));
            tokio::select! {
                _ = stop.cancelled() => {
                    log.event("stop".to_owned());
                    let left = leave("stop", user.clone(), ws, seen.clone(), LEAVE_ON_STOP, CancellationToken::new()).await;
                    log.event(left);
                    seen.lock().unwrap().staller_conns.push(log);
                    return;
                }
                _ = tokio::time::sleep(stall) => {}
            }
            log.event("resume".to_owned());
        };
        let how = match (ended, close_code) {
            (true, _) => "silent".to_owned(),
            (false, Some(code)) => format!("close {code}"),
            (false, None) => "eof".to_owned(),
        };
        let mut s = seen.lock().unwrap();
        s.tally_staller(how);
        if !ended {
            s.staller_conns.push(log);
        }
    }
}

/// What happened on one staller connection, for a failure report.
struct StallerConn {
    user: String,
    addr: String,
    /// (Unix ms, what).
    events: Vec<(u64, String)>,
    /// Messages read since the last event, and the last id read.
    read: u64,
    last_id: Option<String>,
}

impl StallerConn {
    fn new(user: &str, addr: &str) -> Self {
        let mut c = StallerConn {
            user: user.to_owned(),
            addr: addr.to_owned(),
            events: Vec::new(),
            read: 0,
            last_id: None,
        };
        c.event("connected".to_owned());
        c
    }

    fn event(&mut self, what: String) {
        self.events.push((unix_ms(), what));
    }

    fn read(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        if v["type"] == "welcome" {
            self.event(format!("welcome node {} conn {}", v["node"], v["conn"]));
        } else if let Some(id) = v["id"].as_str() {
            self.read += 1;
            self.last_id = Some(id.to_owned());
        }
    }

    /// An event, after what was read since the last one: "read N (last
    /// id X); what".
    fn note(&mut self, what: &str) {
        let s = format!("read {} (last {:?}); {what}", self.read, self.last_id);
        self.read = 0;
        self.event(s);
    }

    fn report(&self, t0_unix_ms: u64, names: &HashMap<String, String>) -> String {
        let name = names.get(&self.addr).map_or("?", String::as_str);
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(ms, what)| {
                format!(
                    "{:.1}s {what}",
                    ms.saturating_sub(t0_unix_ms) as f64 / 1000.0
                )
            })
            .collect();
        format!(
            "  {} on {name} ({}): {}",
            self.user,
            self.addr,
            events.join("; ")
        )
    }
}

/// Wait for the user tasks (each leaves within [`LEAVE_ON_STOP`] after its
/// stop token); how many were still running after `bound`.
async fn join_users(tasks: Vec<tokio::task::JoinHandle<()>>, bound: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + bound;
    let mut late = 0;
    for t in tasks {
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            late += 1;
        }
    }
    late
}

/// An internal entry (inbox, mailbox, taking) or dead letter for `id`.
fn entry_for(e: &StreamId, field: &str, id: &str) -> bool {
    e.get::<String>(field).as_deref() == Some(id)
}

/// Where the missing messages are in Redis, for a failure report: for a
/// sample, the send stream (and the router's pending entry), the user's
/// mailbox, every inbox, the dead letters, the user's connections (and
/// the mailbox pages they had taken).
fn where_are(redis: &Redis, missing: &[&(String, String)], seen_nodes: &HashSet<String>) -> String {
    let mut r = redis.conn();
    let mut range = |key: &str| -> Vec<StreamId> {
        r.xrange_all::<_, StreamRangeReply>(key)
            .map(|x| x.ids)
            .unwrap_or_default()
    };
    let mut nodes: Vec<String> = seen_nodes.iter().cloned().collect();
    let mut r2 = redis.conn();
    let live: Vec<String> = r2.zrange("wsc:nodes", 0, -1).unwrap_or_default();
    nodes.extend(live.iter().cloned());
    nodes.sort();
    nodes.dedup();
    let inboxes: Vec<(String, Vec<StreamId>)> = nodes
        .iter()
        .map(|n| (n.clone(), range(&format!("wsc:inbox:{{{n}}}"))))
        .collect();
    let dead = range("wsc:dead");
    let mut out = format!(
        "live nodes {live:?}; inboxes {:?}; dead letters {}\n",
        inboxes
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(n, e)| (n.as_str(), e.len()))
            .collect::<Vec<_>>(),
        dead.len()
    );
    for (id, user) in missing.iter().take(10) {
        // Public id `n/<entry id>` for send shard n ≥ 1.
        let (send, raw) = match id.split_once('/') {
            Some((n, raw)) => (format!("wsc:send:{n}"), raw),
            None => ("wsc:send".to_owned(), id.as_str()),
        };
        let in_send = r2
            .xrange::<_, _, _, StreamRangeReply>(&send, raw, raw)
            .map(|x| !x.ids.is_empty());
        // (consumer, idle ms, deliveries) of the router group's entry.
        let pending: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
            .arg(&send)
            .arg("router")
            .arg(raw)
            .arg(raw)
            .arg(1)
            .query(&mut r2);
        let mailbox: Vec<String> = range(&format!("wsc:mailbox:{{{user}}}"))
            .iter()
            .filter(|e| entry_for(e, "id", id))
            .map(|e| e.id.clone())
            .collect();
        let in_inboxes: Vec<String> = inboxes
            .iter()
            .flat_map(|(n, es)| {
                es.iter()
                    .filter(|e| entry_for(e, "id", id))
                    .map(move |e| format!("{n}:{}", e.id))
            })
            .collect();
        let dead_letters: Vec<String> = dead
            .iter()
            .filter(|e| entry_for(e, "id", raw))
            .map(|e| format!("{} ({:?})", e.id, e.get::<String>("reason")))
            .collect();
        let conns: Vec<(String, String)> = r2
            .hgetall(format!("wsc:user:{{{user}}}"))
            .unwrap_or_default();
        let taking: Vec<String> = conns
            .iter()
            .flat_map(|(c, _)| {
                range(&format!("wsc:taking:{{{user}}}:{c}"))
                    .into_iter()
                    .filter(|e| entry_for(e, "id", id))
                    .map(move |e| format!("{c}:{}", e.id))
            })
            .collect();
        out.push_str(&format!(
            "  {id} to {user}: in {send} {in_send:?}, router pending {pending:?}; \
             mailbox {mailbox:?}; inboxes {in_inboxes:?}; dead {dead_letters:?}; \
             connections {conns:?}; taken {taking:?}\n"
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    let messages = env_or("CHAOS_MESSAGES", 20_000);
    let secs = env_or("CHAOS_SECS", 25);
    let users = env_or("CHAOS_USERS", 40);
    let stallers = env_or("CHAOS_STALLERS", 0);
    let staller_payload = match env_or("CHAOS_STALLER_PAYLOAD", 0) {
        0 => "1".to_owned(),
        b => serde_json::to_string(&"x".repeat((b as usize).saturating_sub(2))).unwrap(),
    };
    let restart_redis = env_or("CHAOS_REDIS_RESTART", 0) == 1;
    if restart_redis && on_redis_cluster() {
        println!("chaos: CHAOS_REDIS_RESTART ignored on Redis Cluster");
    }
    let restart_redis = restart_redis && !on_redis_cluster();
    let mut redis = Redis::start();
    let mut args = fast_args(&redis);
    args.extend(["--history-size".to_owned(), HISTORY_SIZE.to_string()]);
    let mut nodes: Vec<NodeProc> = (0..4)
        .map(|i| NodeProc::start(&format!("c{i}"), &args))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    // For a failure report: node names by address, and the logs of the
    // nodes replaced.
    let mut names: HashMap<String, String> = nodes
        .iter()
        .map(|n| (n.addr.clone(), n.name.clone()))
        .collect();
    let mut retired: Vec<(String, String)> = Vec::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    seen.lock().unwrap().hist.history_size = HISTORY_SIZE;
    let abandoned = Abandoned::new();
    let stop_clients = CancellationToken::new();
    let plain_users: Vec<String> = (0..users).map(|u| format!("cu{u}")).collect();
    let staller_users: Vec<String> = (0..stallers).map(|u| format!("cs{u}")).collect();
    let mut tasks = spawn_users(&plain_users, &addrs, &seen, &stop_clients, &abandoned);
    tasks.extend(staller_users.iter().map(|u| {
        tokio::spawn(staller_loop(
            u.clone(),
            addrs.clone(),
            seen.clone(),
            stop_clients.clone(),
            abandoned.clone(),
        ))
    }));

    // Producer: pipelined XADDs spread over the first 80 % of the run;
    // (id, user) of each. Each round holds `pause`, so whoever takes it
    // (the Redis restart) finds every id sent so far recorded. The pace is
    // the time left over the rounds left, so a pause is caught up evenly.
    let pause = Arc::new(tokio::sync::Mutex::new(()));
    let producer = {
        let url = redis.url();
        let seen = seen.clone();
        let pause = pause.clone();
        let recipients = users + stallers;
        tokio::spawn(async move {
            // The node's own connection type: one Redis or a Redis Cluster
            // (the pipeline has one key, so one slot).
            let redis = wscluster::Connector::open(&url, on_redis_cluster()).unwrap();
            let mut conn = redis.shared().await.unwrap();
            let batch = 50u64;
            let rounds = messages / batch;
            let end = Instant::now() + Duration::from_secs(secs).mul_f64(0.8);
            let mut sent = Vec::with_capacity(messages as usize);
            for round in 0..rounds {
                {
                    let _round = pause.lock().await;
                    let mut pipe = redis::pipe();
                    let to: Vec<String> = (0..batch)
                        .map(|_| match rand::rng().random_range(0..recipients) {
                            u if u < users => format!("cu{u}"),
                            u => format!("cs{}", u - users),
                        })
                        .collect();
                    for u in &to {
                        let payload = if u.starts_with("cs") {
                            staller_payload.as_str()
                        } else {
                            "1"
                        };
                        pipe.cmd("XADD")
                            .arg("wsc:send")
                            .arg("*")
                            .arg("to")
                            .arg(u)
                            .arg("payload")
                            .arg(payload);
                    }
                    loop {
                        match pipe.query_async::<Vec<String>>(&mut conn).await {
                            Ok(ids) => {
                                seen.lock().unwrap().sent(&ids, &to);
                                sent.extend(ids.into_iter().zip(to));
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                }
                let left = (rounds - round) as u32;
                tokio::time::sleep(end.saturating_duration_since(Instant::now()) / left).await;
            }
            sent
        })
    };

    // Chaos: every ~1.5 s, one fault on one node; at least three stay up.
    // With CHAOS_REDIS_RESTART, once past the middle, Redis restarts empty
    // instead.
    let t0 = Instant::now();
    let t0_unix_ms = unix_ms();
    let mut faults: HashMap<&str, u32> = HashMap::new();
    let mut timeline: Vec<String> = Vec::new();
    let mut generation = 4;
    let mut restart_pending = restart_redis;
    while t0.elapsed() < Duration::from_secs(secs).mul_f64(0.8) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if restart_pending && t0.elapsed() >= Duration::from_secs(secs).mul_f64(0.4) {
            restart_pending = false;
            *faults.entry("redis_restart").or_default() += 1;
            let line = restart_redis_empty(&mut redis, &nodes, &seen, &pause, t0).await;
            println!("chaos: {line}");
            timeline.push(line);
            continue;
        }
        let victim = rand::rng().random_range(0..nodes.len());
        let kind = ["kill", "term", "stop"][rand::rng().random_range(0..3)];
        *faults.entry(kind).or_default() += 1;
        timeline.push(format!(
            "{:.1}s {kind} {}",
            t0.elapsed().as_secs_f64(),
            nodes[victim].name
        ));
        match kind {
            "kill" => nodes[victim].kill9(),
            "term" => {
                nodes[victim].signal(libc::SIGTERM);
                let code = nodes[victim].wait_exit(Duration::from_secs(4)).await;
                assert_eq!(code, Some(0), "drained node exits 0");
            }
            _ => {
                nodes[victim].signal(libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(1500)).await; // frozen past its 1 s lease
                nodes[victim].signal(libc::SIGCONT);
                continue;
            }
        }
        // Start a replacement, as an autoscaling group would.
        let fresh = NodeProc::start(&format!("c{generation}"), &args);
        generation += 1;
        fresh.wait_ready().await;
        addrs.lock().unwrap()[victim] = fresh.addr.clone();
        names.insert(fresh.addr.clone(), fresh.name.clone());
        let old = std::mem::replace(&mut nodes[victim], fresh);
        retired.push((old.name.clone(), old.log()));
    }
    let sent = producer.await.unwrap();

    // Settle: everything routed and delivered; then every user reconnects
    // once to collect what waits in a mailbox.
    // Routing done: the send stream is empty.
    eventually("send stream routed", Duration::from_secs(60), || {
        let mut r = redis.conn();
        async move { (r.xlen::<_, usize>("wsc:send").ok()? == 0).then_some(()) }
    })
    .await;
    // Inboxes usually drain within a second or two; what is still there is
    // reported (a diagnostic, not the check: whatever is undelivered must
    // still show up below, or the soak fails on `lost`).
    let settle = Instant::now();
    let inboxes = loop {
        let mut r = redis.conn();
        let ids: Vec<String> = r.zrange("wsc:nodes", 0, -1).unwrap_or_default();
        let mut left = Vec::new();
        for id in ids {
            let n: usize = r.xlen(format!("wsc:inbox:{{{id}}}")).unwrap_or(0);
            if n > 0 {
                left.push((id, n));
            }
        }
        if left.is_empty() || settle.elapsed() > Duration::from_secs(20) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !inboxes.is_empty() {
        println!("chaos: inboxes not drained after 20 s: {inboxes:?}");
    }
    // The clients leave (Close, then read until the server closes): what
    // a server had not written yet goes back to the mailbox.
    stop_clients.cancel();
    let late = join_users(tasks, LEAVE_ON_STOP + Duration::from_secs(5)).await;
    if late > 0 {
        println!("chaos: {late} clients still leaving after the stop");
    }
    // Everyone (the stallers too) reads normally in the final round.
    let final_round = CancellationToken::new();
    let everyone: Vec<String> = plain_users.iter().chain(&staller_users).cloned().collect();
    let tasks = spawn_users(&everyone, &addrs, &seen, &final_round, &abandoned);
    let total = sent.len();
    // Poll until every id has arrived or 30 s have passed; the check comes
    // after the readers have finished.
    let collect_until = Instant::now() + Duration::from_secs(30);
    eventually(
        "every message accounted for, or 30 s",
        Duration::from_secs(40),
        || {
            let done = seen.lock().unwrap().outstanding.is_empty();
            async move { (done || Instant::now() > collect_until).then_some(()) }
        },
    )
    .await;
    final_round.cancel();
    let late = join_users(tasks, LEAVE_ON_STOP + Duration::from_secs(5)).await;
    let still_reading = abandoned.finish(Duration::from_secs(10)).await;
    if late + still_reading > 0 {
        println!(
            "chaos: {late} clients still leaving, {still_reading} abandoned sockets still read"
        );
    }
    let mut s = seen.lock().unwrap();
    s.hist.final_check();
    let missing = s.missing(&sent);
    let lost = missing.len();
    let faults: BTreeMap<&str, u32> = faults.into_iter().collect();
    let stalled = if stallers > 0 {
        format!(" stallers={stallers} {:?}", s.stallers)
    } else {
        String::new()
    };
    println!(
        "sent={total} delivered={} lost={lost} duplicates={} {} faults={faults:?}{stalled} sockets_left={:?} elapsed={:?}",
        total - lost,
        s.duplicates,
        s.hist.summary(),
        s.left,
        t0.elapsed()
    );
    println!("chaos: resumes: {}", s.hist.details());
    for line in &s.hist.samples {
        println!("chaos: {line}");
    }
    if lost > 0 {
        // When each was sent: an entry id starts with its Unix ms.
        let ages: Vec<String> = missing
            .iter()
            .take(10)
            .map(|(id, _)| {
                let at = id_ms(id).saturating_sub(t0_unix_ms) as f64 / 1000.0;
                format!("{id} at {at:.1}s")
            })
            .collect();
        // Per user, runs of missing ids (by send time, split at gaps of
        // over 5 s): "user: count sent from–to".
        let mut by_user: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, user) in &missing {
            by_user.entry(user.as_str()).or_default().push(id_ms(id));
        }
        let mut runs: Vec<String> = Vec::new();
        for (user, mut ms) in by_user {
            ms.sort_unstable();
            let mut start = 0;
            for i in 1..=ms.len() {
                if i == ms.len() || ms[i] - ms[i - 1] > 5000 {
                    let at = |m: u64| m.saturating_sub(t0_unix_ms) as f64 / 1000.0;
                    runs.push(format!(
                        "{user}: {} sent {:.1}–{:.1}s",
                        i - start,
                        at(ms[start]),
                        at(ms[i - 1])
                    ));
                    start = i;
                }
            }
        }
        println!(
            "chaos: {lost} missing: {runs:?}; sample {ages:?}\nfaults: {timeline:?}\n{}",
            where_are(&redis, &missing, &s.nodes)
        );
        // The staller connections that were open (give or take 5 s) when
        // a missing message to their user was sent.
        for c in &s.staller_conns {
            let (Some(first), Some(last)) = (c.events.first(), c.events.last()) else {
                continue;
            };
            let open = first.0.saturating_sub(5000)..=last.0 + 5000;
            if missing
                .iter()
                .any(|(id, user)| *user == c.user && open.contains(&id_ms(id)))
            {
                println!("chaos: staller{}", c.report(t0_unix_ms, &names));
            }
        }
        // Every node's log, the replaced ones too.
        let dir = std::env::temp_dir().join(format!("chaos-logs-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            for (name, log) in retired
                .iter()
                .cloned()
                .chain(nodes.iter().map(|n| (n.name.clone(), n.log())))
            {
                let _ = std::fs::write(dir.join(format!("{name}.log")), log);
            }
            println!("chaos: node logs in {}", dir.display());
        }
    }
    assert_eq!(lost, 0, "every message id sent is received");
    let h = &s.hist;
    assert_eq!(
        h.gaps, 0,
        "no gap after recovered:true (see the samples above)"
    );
    assert_eq!(
        h.seq_conflicts, 0,
        "one id per (epoch, seq), one position per id"
    );
    assert_eq!(
        h.false_unexpected, 0,
        "recovered:false only for a new epoch or more missed than the history holds"
    );
    assert_eq!(h.bad_welcomes, 0, "every welcome as contract §3 has it");
    assert_eq!(h.unsequenced, 0, "every user message carries seq and epoch");
    if !restart_redis {
        assert_eq!(
            h.false_new_epoch + h.epoch_changes,
            0,
            "no user's epoch changes without a Redis restart"
        );
    }
}

/// The Unix ms an entry id starts with (`<ms>-<n>`, maybe after `<shard>/`).
fn id_ms(id: &str) -> u64 {
    id.rsplit('/')
        .next()
        .and_then(|raw| raw.split('-').next())
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Restart Redis empty at a quiet point: pause the producer, wait until
/// every id sent so far has been received, restart Redis without its data,
/// wait until every node is back (under a new id in the new `wsc:nodes`,
/// /readyz 200), then let the producer go on. A line for the fault
/// timeline.
async fn restart_redis_empty(
    redis: &mut Redis,
    nodes: &[NodeProc],
    seen: &Arc<Mutex<Seen>>,
    pause: &tokio::sync::Mutex<()>,
    t0: Instant,
) -> String {
    let at = t0.elapsed();
    let _paused = pause.lock().await;
    let quiet = Instant::now();
    let bound = Duration::from_secs(90);
    loop {
        let outstanding: Vec<(String, String)> = {
            let s = seen.lock().unwrap();
            s.outstanding
                .iter()
                .take(10)
                .map(|(id, user)| (id.clone(), user.clone()))
                .collect()
        };
        if outstanding.is_empty() {
            break;
        }
        if quiet.elapsed() > bound {
            // Not delivered in all that time: most likely lost already.
            // Report where they are, and go on: they count as lost in the
            // final check.
            let s = seen.lock().unwrap();
            let sample: Vec<&(String, String)> = outstanding.iter().collect();
            println!(
                "chaos: before the Redis restart, {} ids sent were still not received after \
                 {bound:?} (restarting anyway; the final check counts them), e.g.\n{}",
                s.outstanding.len(),
                where_are(redis, &sample, &s.nodes)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet_took = quiet.elapsed();
    let before: HashSet<String> = redis.conn().zrange("wsc:nodes", 0, -1).unwrap_or_default();
    tokio::task::block_in_place(|| redis.restart_empty());
    let down = Instant::now();
    let want = nodes.len();
    let urls: Vec<String> = nodes.iter().map(|n| n.http("/readyz")).collect();
    eventually(
        "every node back under a new id after the empty Redis restart",
        Duration::from_secs(30),
        || {
            let mut r = redis.conn();
            let urls = urls.clone();
            let before = &before;
            async move {
                let members: Vec<String> = r.zrange("wsc:nodes", 0, -1).ok()?;
                // A node never writes under its old id again (contract §6).
                assert!(
                    members.iter().all(|m| !before.contains(m)),
                    "a node rejoined under its old id: {members:?}"
                );
                if members.len() < want {
                    return None;
                }
                for u in &urls {
                    if reqwest::get(u).await.ok()?.status() != 200 {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    format!(
        "{:.1}s redis restart empty (quiet after {:.1}s, nodes back in {:.1}s)",
        at.as_secs_f64(),
        quiet_took.as_secs_f64(),
        down.elapsed().as_secs_f64()
    )
}

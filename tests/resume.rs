//! History and resume (contract §9) and idempotent sends (§4), black-box:
//! real redis-server (or a Redis Cluster), real nodes, real sockets. Every
//! user-addressed message carries the user's `seq` and `epoch`; a client
//! that reconnects with `since`/`epoch` gets every message after `since`
//! (`recovered:true`) or is told it cannot (`recovered:false`), whatever
//! happened to its connection or its node.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use redis::Commands;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

// ------------------------------------------------ helpers

fn history_key(user: &str) -> String {
    format!("wsc:history:{{{user}}}")
}

fn mailbox_key(user: &str) -> String {
    format!("wsc:mailbox:{{{user}}}")
}

fn user_key(user: &str) -> String {
    format!("wsc:user:{{{user}}}")
}

/// The query of a resume: `user=..&since=..&epoch=..`.
fn resume_query(user: &str, since: u64, epoch: &str) -> String {
    format!("user={user}&since={since}&epoch={}", enc(epoch))
}

/// Connect as `user` (dev) asking for every message after `since`.
async fn resume(node: &NodeProc, user: &str, since: u64, epoch: &str) -> Client {
    Client::connect(&node.ws_url(&resume_query(user, since, epoch))).await
}

fn seq_of(v: &Value) -> u64 {
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("a user message carries a seq: {v}"))
}

fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a message carries an id: {v}"))
        .to_owned()
}

/// `(id, seq)` of each message, for failure messages.
fn brief(msgs: &[Value]) -> Vec<(String, Option<u64>)> {
    msgs.iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("?").to_owned(),
                m["seq"].as_u64(),
            )
        })
        .collect()
}

/// The welcome's position: its epoch (a string) and seq (an integer).
fn position(c: &Client) -> (String, u64) {
    let w = &c.welcome;
    let epoch = w["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome has a string epoch: {w}"))
        .to_owned();
    let seq = w["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("welcome has an integer seq: {w}"));
    (epoch, seq)
}

/// The welcome answers a resume with `recovered` = `want`, at `epoch`/`seq`.
fn assert_welcome(c: &Client, recovered: Value, epoch: &str, seq: u64) {
    let w = &c.welcome;
    assert_eq!(w.get("recovered"), Some(&recovered), "recovered: {w}");
    assert_eq!(position(c), (epoch.to_owned(), seq), "position: {w}");
}

/// Exactly `n` `message` frames, in arrival order (other frames skipped).
async fn take_msgs(c: &mut Client, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_frame(left).await {
            Some(v) if v["type"] == "message" => out.push(v),
            Some(_) => {}
            None => panic!(
                "got {} of {n} messages within {timeout:?}: {:?}",
                out.len(),
                brief(&out)
            ),
        }
    }
    out
}

/// Every `message` frame until none came for `quiet` (reading on also
/// answers the server's confirmation pings).
async fn msgs_until_quiet(c: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(v) = c.next_frame(quiet).await {
        if v["type"] == "message" {
            out.push(v);
        }
    }
    out
}

/// Read `message` frames until every id of `want` has come; all of them,
/// in arrival order.
async fn msgs_until_ids(c: &mut Client, want: &[String], timeout: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut missing: HashSet<&String> = want.iter().collect();
    let mut out = Vec::new();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_frame(left).await {
            Some(v) if v["type"] == "message" => {
                if let Some(id) = v["id"].as_str() {
                    missing.remove(&id.to_owned());
                }
                out.push(v);
            }
            Some(_) => {}
            None => panic!(
                "{} of {} ids still missing after {timeout:?}: {missing:?}; got {:?}",
                missing.len(),
                want.len(),
                brief(&out)
            ),
        }
    }
    out
}

fn xlen(redis: &Redis, key: &str) -> usize {
    redis.conn_for(key).xlen(key).unwrap_or(0)
}

fn exists(redis: &Redis, key: &str) -> bool {
    redis.conn_for(key).exists(key).unwrap_or(true)
}

/// Wait until `user` has no registered connection (its next messages go
/// to the mailbox).
async fn offline(redis: &Redis, user: &str) {
    let key = user_key(user);
    eventually(&format!("{user} offline"), T, || async {
        let n: usize = redis.conn_for(&key).hlen(&key).ok()?;
        (n == 0).then_some(())
    })
    .await;
}

/// Wait until `user`'s mailbox holds `n` messages.
async fn mailboxed(redis: &Redis, user: &str, n: usize) {
    let key = mailbox_key(user);
    eventually(&format!("{n} messages in {key}"), T, || async {
        (xlen(redis, &key) == n).then_some(())
    })
    .await;
}

/// Wait until `user`'s history holds `n` messages.
async fn history_len(redis: &Redis, user: &str, n: usize) {
    let key = history_key(user);
    eventually(&format!("{n} messages in {key}"), T, || async {
        (xlen(redis, &key) == n).then_some(())
    })
    .await;
}

/// Read on until quiet (so the last confirmation ping is answered), check
/// nothing more came, close, and wait until the user is offline.
async fn leave(mut c: Client, redis: &Redis, user: &str) {
    let extra = msgs_until_quiet(&mut c, Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "no more messages: {:?}", brief(&extra));
    c.close().await;
    offline(redis, user).await;
}

/// Connect as `user` on `node`, receive `n` messages (seq 1..=n of a new
/// user), leave; the user's epoch.
async fn seen_then_offline(node: &NodeProc, redis: &Redis, user: &str, n: usize) -> String {
    let mut c = Client::dev(node, user).await;
    let (epoch, seq) = position(&c);
    assert!(!epoch.is_empty(), "an epoch: {}", c.welcome);
    assert_eq!(seq, 0, "a new user: {}", c.welcome);
    let ids = send_many(&mut redis.conn_for("wsc:send"), user, n, 10);
    let got = take_msgs(&mut c, n, T).await;
    let want: Vec<(String, Option<u64>)> = ids
        .iter()
        .zip(1..)
        .map(|(id, s)| (id.clone(), Some(s)))
        .collect();
    assert_eq!(brief(&got), want, "seq 1..={n} in order");
    leave(c, redis, user).await;
    epoch
}

/// `msgs` are exactly `ids` with seqs `first..`, under `epoch`, payloads
/// `{"n": 0..}` in order (as [`send_many`] adds them).
fn assert_run(msgs: &[Value], ids: &[String], first: u64, epoch: &str) {
    let want: Vec<(String, Option<u64>)> = ids
        .iter()
        .zip(first..)
        .map(|(id, s)| (id.clone(), Some(s)))
        .collect();
    assert_eq!(brief(msgs), want, "ids with seqs from {first}, in order");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["epoch"], epoch, "epoch of {m}");
        assert_eq!(m["payload"]["n"], i, "payload order: {m}");
    }
}

/// The index of the node that routes (the send stream's router).
async fn router_of(nodes: &[NodeProc]) -> usize {
    eventually("a router", T, || async {
        for (i, n) in nodes.iter().enumerate() {
            if n.cluster().await["router"] == true {
                return Some(i);
            }
        }
        None
    })
    .await
}

/// `n` messages for `user` (`{"n": from..}`), 50 every 2 ms (faster than
/// a router numbers them), from a thread: their ids.
fn paced_burst(
    mut r: TestConn,
    user: &str,
    from: usize,
    n: usize,
) -> std::thread::JoinHandle<Vec<String>> {
    let user = user.to_owned();
    std::thread::spawn(move || {
        let mut ids = Vec::with_capacity(n);
        for start in (from..from + n).step_by(50) {
            let mut pipe = redis::pipe();
            for i in start..(start + 50).min(from + n) {
                pipe.cmd("XADD")
                    .arg("wsc:send")
                    .arg("*")
                    .arg("to")
                    .arg(&user)
                    .arg("payload")
                    .arg(json!({ "n": i }).to_string());
            }
            let v: Vec<String> = pipe.query(&mut r).expect("xadd");
            ids.extend(v);
            // Pacing the producer, not waiting for anything.
            std::thread::sleep(Duration::from_millis(2));
        }
        ids
    })
}

/// Checks what a resumed connection received, given what the client had
/// seen before (`known`: id → seq over every earlier frame, and `since`):
/// a frame whose seq was seen already is a repeat with the same id;
/// the others come in seq order from `since + 1` with no gap. Returns the
/// first-time seqs in arrival order and the number of repeats.
fn check_resumed(
    msgs: &[Value],
    known: &mut HashMap<u64, String>,
    since: u64,
    epoch: &str,
) -> (Vec<u64>, usize) {
    let mut fresh = Vec::new();
    let mut repeats = 0;
    for m in msgs {
        assert_eq!(m["epoch"], epoch, "epoch of {m}");
        let (seq, id) = (seq_of(m), id_of(m));
        match known.get(&seq) {
            Some(first) => {
                assert_eq!(*first, id, "a repeat of seq {seq} has the same id: {m}");
                repeats += 1;
            }
            None => {
                assert!(seq > since, "seq {seq} <= since {since} never seen: {m}");
                known.insert(seq, id);
                fresh.push(seq);
            }
        }
    }
    let want: Vec<u64> = (since + 1..since + 1 + fresh.len() as u64).collect();
    assert_eq!(
        fresh, want,
        "after `since` {since}: every seq once, in order, no gap (repeats dropped)"
    );
    (fresh, repeats)
}

/// Every id has one seq, every seq one id.
fn assert_one_seq_per_id(msgs: &[Value]) {
    let mut by_id: HashMap<String, u64> = HashMap::new();
    let mut by_seq: HashMap<u64, String> = HashMap::new();
    for m in msgs {
        let (id, seq) = (id_of(m), seq_of(m));
        let s = *by_id.entry(id.clone()).or_insert(seq);
        assert_eq!(s, seq, "{id} delivered with seq {s} and {seq}");
        let i = by_seq.entry(seq).or_insert(id.clone());
        assert_eq!(*i, id, "seq {seq} given to {i} and {id}");
    }
}

// ------------------------------------------------ 1. positions on a fresh connect

/// A new user's welcome: a non-empty epoch, seq 0, `recovered` null. Its
/// messages carry seq 1, 2, 3… under that epoch; topic messages carry no
/// seq or epoch. A later connection's welcome reports the position reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_connect_positions() {
    let (redis, nodes) = cluster(1).await;
    let mut r = redis.conn_for("wsc:send");
    let mut c = Client::dev(&nodes[0], "fresh").await;
    let (epoch, seq) = position(&c);
    assert!(!epoch.is_empty(), "an epoch: {}", c.welcome);
    assert_eq!(seq, 0, "a new user starts at 0: {}", c.welcome);
    assert_eq!(
        c.welcome.get("recovered"),
        Some(&Value::Null),
        "no resume asked: {}",
        c.welcome
    );
    c.send_json(json!({"type": "subscribe", "topic": "news"}))
        .await;
    c.expect("subscribed", T, |v| v["type"] == "subscribed")
        .await;
    let ids = send_many(&mut r, "fresh", 3, 10);
    let topic_id: String = redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("topic")
        .arg("news")
        .arg("payload")
        .arg("{\"t\":1}")
        .query(&mut r)
        .unwrap();
    let got = take_msgs(&mut c, 4, T).await;
    let (topic, user): (Vec<Value>, Vec<Value>) =
        got.into_iter().partition(|m| m.get("topic").is_some());
    assert_run(&user, &ids, 1, &epoch);
    assert_eq!(topic.len(), 1, "{topic:?}");
    assert_eq!(topic[0]["id"], topic_id.as_str());
    assert!(
        topic[0].get("seq").is_none() && topic[0].get("epoch").is_none(),
        "a topic message has no seq/epoch: {}",
        topic[0]
    );
    leave(c, &redis, "fresh").await;
    let again = Client::dev(&nodes[0], "fresh").await;
    assert_welcome(&again, Value::Null, &epoch, 3);
}

// ------------------------------------------------ 2. a reset with unread frames

/// A client reads its first 5 messages, then stops reading while 190 more
/// (2 KB each) are written to it, and resets its TCP connection: what the
/// kernel held is gone. Resuming through the other node with
/// `since=5` recovers every one of them, in seq order, before a later
/// live message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_reset_with_unread_frames() {
    let (redis, nodes) = cluster(2).await;
    let user = "unread";
    let mut r = redis.conn_for("wsc:send");
    let mut ws = raw_ws(&nodes[0], &format!("user={user}"), 4096).await;
    let w = next_json(&mut ws, T).await.expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    let epoch = w["epoch"].as_str().expect("epoch").to_owned();
    let first = send_many(&mut r, user, 5, 10);
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let v = next_json(&mut ws, T).await.expect("first messages");
        if v["type"] == "message" {
            seen.push(v);
        }
    }
    // Read on a moment, as a client does: that answers the server's ping
    // after them.
    while let Some(v) = next_json(&mut ws, Duration::from_millis(300)).await {
        assert_ne!(v["type"], "message", "only 5 sent: {v}");
    }
    assert_run(&seen, &first, 1, &epoch);
    let since = 5;
    // Never read again.
    let burst = send_many(&mut r, user, 190, 2000);
    history_len(&redis, user, 195).await;
    reset(ws);
    offline(&redis, user).await;

    let mut c = resume(&nodes[1], user, since, &epoch).await;
    assert_welcome(&c, json!(true), &epoch, 195);
    let replay = take_msgs(&mut c, 190, T).await;
    let mut known: HashMap<u64, String> = first
        .iter()
        .cloned()
        .zip(1..)
        .map(|(i, s)| (s, i))
        .collect();
    let (fresh, repeats) = check_resumed(&replay, &mut known, since, &epoch);
    assert_eq!(
        repeats,
        0,
        "the replay follows welcome at once: {:?}",
        brief(&replay)
    );
    assert_run(&replay, &burst, 6, &epoch);
    assert_eq!(fresh.len(), 190);
    // Later messages come after them, numbered on.
    let live = send_many(&mut r, user, 3, 10);
    let tail = msgs_until_ids(&mut c, &live, T).await;
    let (fresh, repeats) = check_resumed(&tail, &mut known, 195, &epoch);
    assert_eq!(fresh, vec![196, 197, 198], "{:?}", brief(&tail));
    eprintln!("reset with unread frames: 190 recovered, {repeats} repeats after them");
}

// ------------------------------------------------ 3, 4, 12. node killed or drained mid-burst

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    Kill,
    Drain,
    /// SIGSTOP past the lease: the node is reaped while frozen (woken at
    /// the end).
    Stop,
}

/// Two nodes (history 2,000); the client on the router's node reads 3
/// messages, then 50 of a burst of 1,000, stops reading while 100 more are
/// routed, and its node is SIGKILLed (the client's unread frames are lost
/// with its connection) or drained (the client reads until the 1012
/// close) mid-burst. It resumes on the other node with the last seq it saw:
/// `recovered:true`, and every message after it arrives once (repeats only
/// with the same id and seq), first-time seqs in order with no gap; every
/// message has one seq and the seqs are exactly 1..=1003. The router is
/// busy when it dies: entries it numbered but had not acknowledged are
/// routed again by its successor, with the seq they had.
async fn fault_mid_burst_then_resume(redis: Redis, fault: Fault) {
    const TOTAL: usize = 1003;
    let user = match fault {
        Fault::Kill => "killed",
        Fault::Drain => "drained",
        Fault::Stop => "frozen",
    };
    let mut args = fast_args(&redis);
    args.extend(["--history-size".to_owned(), "2000".to_owned()]);
    let mut nodes = vec![NodeProc::start("a", &args), NodeProc::start("b", &args)];
    for n in &nodes {
        n.wait_ready().await;
    }
    // The client on the router's node: its end also hands routing over.
    if router_of(&nodes).await == 1 {
        nodes.swap(0, 1);
    }
    let mut c = Client::dev(&nodes[0], user).await;
    let (epoch, _) = position(&c);
    let mut r = redis.conn_for("wsc:send");
    let mut ids = send_many(&mut r, user, 3, 10);
    let mut before = take_msgs(&mut c, 3, T).await;
    assert_run(&before, &ids, 1, &epoch);
    let burst = paced_burst(redis.conn_for("wsc:send"), user, 3, TOTAL - 3);
    before.extend(take_msgs(&mut c, 50, T).await);
    // The client reads no further while 100 more are routed (written to
    // it, or on their way): frames in flight when the fault comes.
    let key = history_key(user);
    eventually("100 more routed", T, || async {
        (xlen(&redis, &key) >= 153).then_some(())
    })
    .await;
    match fault {
        Fault::Kill => {
            nodes[0].kill9();
            // What it had not read is lost with the connection.
            drop(c);
        }
        Fault::Stop => {
            nodes[0].signal(libc::SIGSTOP);
            // A phone gives up on a frozen server: its unread frames go.
            drop(c);
        }
        Fault::Drain => {
            nodes[0].signal(libc::SIGTERM);
            // A drained client reads what comes until the close.
            let (rest, code) = c.frames_until_close(T).await;
            assert_eq!(code, Some(1012), "drained with 1012");
            before.extend(rest.into_iter().filter(|v| v["type"] == "message"));
        }
    }
    ids.extend(burst.join().expect("burst"));
    assert_eq!(ids.len(), TOTAL);
    // One connection, no repeats: seqs 1.. in order.
    let mut known: HashMap<u64, String> = HashMap::new();
    let (fresh, _) = check_resumed(&before, &mut known, 0, &epoch);
    let since = *fresh.last().unwrap();

    let mut c = resume(&nodes[1], user, since, &epoch).await;
    let (e, at) = position(&c);
    assert_eq!(
        (c.welcome.get("recovered"), e.as_str()),
        (Some(&json!(true)), epoch.as_str()),
        "{}",
        c.welcome
    );
    assert!(
        (since..=TOTAL as u64).contains(&at),
        "welcome seq {at}, since {since}"
    );
    let mut after = msgs_until_ids(&mut c, &ids[since as usize..], Duration::from_secs(20)).await;
    // Repeats come late, if at all (a reap, a claim): listen on a little.
    after.extend(msgs_until_quiet(&mut c, Duration::from_millis(1500)).await);
    let all: Vec<Value> = before.iter().chain(&after).cloned().collect();
    assert_one_seq_per_id(&all);
    let (fresh, repeats) = check_resumed(&after, &mut known, since, &epoch);
    // A slow drain may hand the whole burst over before its close: then
    // nothing is left after `since` (= TOTAL).
    assert_eq!(
        fresh.last().copied().unwrap_or(since),
        TOTAL as u64,
        "{TOTAL} messages numbered 1..={TOTAL} (a higher seq: one was numbered twice)"
    );
    let delivered: HashSet<String> = all.iter().map(id_of).collect();
    assert_eq!(
        delivered,
        ids.iter().cloned().collect(),
        "every id delivered"
    );
    // Not asserted (order is promised only while no node fails): seqs
    // that differ from the order the entries were added in.
    let added: HashMap<&str, u64> = ids.iter().map(String::as_str).zip(1..).collect();
    let out_of_order = all
        .iter()
        .filter(|m| added.get(m["id"].as_str().unwrap_or("")) != Some(&seq_of(m)))
        .count();
    if fault == Fault::Drain {
        let status = nodes[0].wait_exit(Duration::from_secs(3)).await;
        assert_eq!(status, Some(0), "a drained node exits 0");
    }
    if fault == Fault::Stop {
        nodes[0].signal(libc::SIGCONT);
    }
    eprintln!(
        "{fault:?} mid-burst: {} read before, resumed at since {since} (welcome seq {at}), {repeats} repeats, {out_of_order} seqs not in add order",
        before.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_sigkill_mid_burst() {
    fault_mid_burst_then_resume(Redis::start(), Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_drain_mid_burst() {
    fault_mid_burst_then_resume(Redis::start(), Fault::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_sigstop_past_the_lease_mid_burst() {
    fault_mid_burst_then_resume(Redis::start(), Fault::Stop).await;
}

/// The same on a 3-primary Redis Cluster in every run (the whole file runs
/// on one under `WSC_TEST_REDIS_CLUSTER=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_sigkill_on_redis_cluster() {
    fault_mid_burst_then_resume(Redis::start_cluster(), Fault::Kill).await;
}

// ------------------------------------------------ 5. recovered:false

/// Another epoch: `recovered:false` with the current position, and the
/// mailbox delivered as on a fresh connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_wrong_epoch() {
    let (redis, nodes) = cluster(1).await;
    let epoch = seen_then_offline(&nodes[0], &redis, "we", 3).await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "we", 4, 10);
    mailboxed(&redis, "we", 4).await;
    let mut c = resume(&nodes[0], "we", 3, "not-the-epoch").await;
    assert_welcome(&c, json!(false), &epoch, 7);
    let got = take_msgs(&mut c, 4, T).await;
    assert_run(&got, &ids, 4, &epoch);
    leave(c, &redis, "we").await;
}

/// `--history-size 10`, 30 messages while offline: `since` is older than
/// what is kept, so `recovered:false`; the mailbox still brings all 30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_since_older_than_history() {
    let (redis, nodes) = cluster_with(1, &["--history-size", "10"]).await;
    let epoch = seen_then_offline(&nodes[0], &redis, "old", 2).await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "old", 30, 10);
    mailboxed(&redis, "old", 30).await;
    let mut c = resume(&nodes[0], "old", 2, &epoch).await;
    assert_welcome(&c, json!(false), &epoch, 32);
    let got = take_msgs(&mut c, 30, T).await;
    assert_run(&got, &ids, 3, &epoch);
    leave(c, &redis, "old").await;
}

/// `since` beyond the current seq: `recovered:false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_since_ahead_of_seq() {
    let (redis, nodes) = cluster(1).await;
    let epoch = seen_then_offline(&nodes[0], &redis, "ahead", 2).await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "ahead", 2, 10);
    mailboxed(&redis, "ahead", 2).await;
    let mut c = resume(&nodes[0], "ahead", 50, &epoch).await;
    assert_welcome(&c, json!(false), &epoch, 4);
    let got = take_msgs(&mut c, 2, T).await;
    assert_run(&got, &ids, 3, &epoch);
    leave(c, &redis, "ahead").await;
}

/// `--history-ttl-s 1`: once the history key is gone the messages after
/// `since` cannot be promised: `recovered:false`, same epoch (the counter
/// outlives the history), and the mailbox still brings them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_history_expired() {
    let (redis, nodes) = cluster_with(1, &["--history-ttl-s", "1"]).await;
    let epoch = seen_then_offline(&nodes[0], &redis, "exp", 3).await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "exp", 2, 10);
    mailboxed(&redis, "exp", 2).await;
    let key = history_key("exp");
    eventually("history expired", T, || async {
        (!exists(&redis, &key)).then_some(())
    })
    .await;
    let mut c = resume(&nodes[0], "exp", 3, &epoch).await;
    assert_welcome(&c, json!(false), &epoch, 5);
    let got = take_msgs(&mut c, 2, T).await;
    assert_run(&got, &ids, 4, &epoch);
    leave(c, &redis, "exp").await;
}

/// Redis emptied (FLUSHALL) under a running node: the user's counter starts
/// again under a new epoch; a resume with the old one gets
/// `recovered:false` and the new position, and the mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_redis_emptied() {
    let (redis, nodes) = cluster(1).await;
    let old_node = nodes[0].node_id().await;
    let old = seen_then_offline(&nodes[0], &redis, "fl", 2).await;
    redis.flushall();
    // The node finds its lease gone and joins again under a new id.
    eventually("node back under a new id", T, || async {
        let id = nodes[0].node_id().await;
        let mut r = redis.conn_for("wsc:nodes");
        let live: Option<f64> = r.zscore("wsc:nodes", &id).ok()?;
        (id != old_node && live.is_some()).then_some(())
    })
    .await;
    nodes[0].wait_ready().await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "fl", 2, 10);
    mailboxed(&redis, "fl", 2).await;
    let mut c = resume(&nodes[0], "fl", 2, &old).await;
    let (epoch, _) = position(&c);
    assert!(
        !epoch.is_empty() && epoch != old,
        "a new epoch: {}",
        c.welcome
    );
    assert_welcome(&c, json!(false), &epoch, 2);
    let got = take_msgs(&mut c, 2, T).await;
    assert_run(&got, &ids, 1, &epoch);
    leave(c, &redis, "fl").await;
}

// ------------------------------------------------ 6. malformed resume requests

/// Malformed `since`/`epoch` (not a non-negative integer, one without the
/// other): HTTP 400 before the upgrade. Well-formed ones upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resume_is_400() {
    let (redis, nodes) = cluster(1).await;
    let n = &nodes[0];
    let c = Client::dev(n, "mal").await;
    let (epoch, _) = position(&c);
    leave(c, &redis, "mal").await;
    let e = enc(&epoch);
    for q in [
        format!("since=abc&epoch={e}"),
        format!("since=-1&epoch={e}"),
        format!("since=1.5&epoch={e}"),
        format!("since=&epoch={e}"),
        "since=3".to_owned(),
        format!("epoch={e}"),
        format!("since=1&epoch={}", "e".repeat(129)),
        "since=1&epoch=a%0Ab".to_owned(),
    ] {
        let url = n.ws_url(&format!("user=mal&{q}"));
        assert_eq!(connect_status(&url).await, 400, "{q}");
    }
    // Also with a token rather than ?user=.
    let url = n.ws_url(&format!("token={}&since=x&epoch={e}", token("mal", None)));
    assert_eq!(connect_status(&url).await, 400, "since=x with a token");
    // Well-formed: upgraded (recovered, nothing after 0).
    let c = resume(n, "mal", 0, &epoch).await;
    assert_welcome(&c, json!(true), &epoch, 0);
    let c2 = Client::connect(&n.ws_url(&format!("user=mal&since=0&epoch={e}"))).await;
    assert_eq!(c2.welcome["recovered"], true);
    // An epoch that is not this user's, whatever it looks like, is another
    // epoch (§9: "a random string"), not a malformed value.
    let other = enc("old epoch: 1.2/x@y");
    let c3 = Client::connect(&n.ws_url(&format!("user=mal&since=0&epoch={other}"))).await;
    assert_eq!(c3.welcome["recovered"], false);
}

// ------------------------------------------------ 7. mailbox and history overlap

/// While the user is offline 5 messages go to its mailbox and its history;
/// a resume with the seq it had gets `recovered:true` and each of the 5
/// exactly once, then nothing more; the mailbox is emptied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_and_history_overlap() {
    let (redis, nodes) = cluster(1).await;
    let epoch = seen_then_offline(&nodes[0], &redis, "ov", 3).await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "ov", 5, 10);
    mailboxed(&redis, "ov", 5).await;
    history_len(&redis, "ov", 8).await;
    // With a token this time.
    let url = nodes[0].ws_url(&format!(
        "token={}&since=3&epoch={}",
        token("ov", None),
        enc(&epoch)
    ));
    let mut c = Client::connect(&url).await;
    assert_welcome(&c, json!(true), &epoch, 8);
    let mut got = take_msgs(&mut c, 5, T).await;
    got.extend(msgs_until_quiet(&mut c, Duration::from_secs(1)).await);
    assert_run(&got, &ids, 4, &epoch);
    leave(c, &redis, "ov").await;
    mailboxed(&redis, "ov", 0).await;
    let mut again = Client::dev(&nodes[0], "ov").await;
    assert_welcome(&again, Value::Null, &epoch, 8);
    let extra = msgs_until_quiet(&mut again, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "delivered once: {:?}", brief(&extra));
}

// ------------------------------------------------ 8. history off

/// `--history-size 0`: welcome epoch "" seq 0, messages without seq/epoch,
/// no history key, and a resume answers `recovered:false` (the mailbox
/// still delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_off() {
    let (redis, nodes) = cluster_with(1, &["--history-size", "0"]).await;
    let mut c = Client::dev(&nodes[0], "off").await;
    assert_welcome(&c, Value::Null, "", 0);
    let ids = send_many(&mut redis.conn_for("wsc:send"), "off", 2, 10);
    let got = take_msgs(&mut c, 2, T).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ids);
    for m in &got {
        assert!(
            m.get("seq").is_none() && m.get("epoch").is_none(),
            "no seq/epoch with history off: {m}"
        );
    }
    leave(c, &redis, "off").await;
    let ids = send_many(&mut redis.conn_for("wsc:send"), "off", 2, 10);
    mailboxed(&redis, "off", 2).await;
    let mut c = resume(&nodes[0], "off", 2, "some-epoch").await;
    assert_welcome(&c, json!(false), "", 0);
    let got = take_msgs(&mut c, 2, T).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ids);
    assert!(got.iter().all(|m| m.get("seq").is_none()), "{got:?}");
    assert!(!exists(&redis, &history_key("off")), "no history kept");
    leave(c, &redis, "off").await;
}

// ------------------------------------------------ 9. multi-device

/// Two connections of one user on different nodes: the same epoch, and
/// the same seq for the same message id (app and client sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_device_same_seq() {
    let (redis, nodes) = cluster(2).await;
    let mut a = Client::dev(&nodes[0], "md").await;
    let mut b = Client::dev(&nodes[1], "md").await;
    let (epoch, _) = position(&a);
    assert_eq!(position(&b), (epoch.clone(), 0));
    let mut alice = Client::dev(&nodes[1], "alice").await;
    let mut ids = send_many(&mut redis.conn_for("wsc:send"), "md", 10, 10);
    alice
        .send_json(json!({"type": "send", "to": "md", "payload": "hi", "ref": 1}))
        .await;
    let sent = alice.expect("sent", T, |v| v["type"] == "sent").await;
    ids.push(id_of(&sent));
    let mut seen: Vec<HashMap<String, u64>> = Vec::new();
    for c in [&mut a, &mut b] {
        let got = msgs_until_ids(c, &ids, T).await;
        assert_eq!(got.len(), 11, "each once: {:?}", brief(&got));
        assert!(got.iter().all(|m| m["epoch"] == epoch.as_str()));
        seen.push(got.iter().map(|m| (id_of(m), seq_of(m))).collect());
    }
    assert_eq!(seen[0], seen[1], "same seq for the same id on both devices");
    let mut seqs: Vec<u64> = seen[0].values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
}

// ------------------------------------------------ 10. idempotency

/// `idem` on `XADD`: a second entry with the same key for the same user
/// is not delivered (counted in `wsc_messages_deduplicated_total`); another
/// key, or the same key for another user, is a new message.
/// `idempotency_key` on `POST /api/send`: a retry answers 202 with the
/// first `id` and delivers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_sends() {
    let (redis, nodes) = cluster(1).await;
    let n = &nodes[0];
    let mut r = redis.conn_for("wsc:send");
    let mut c = Client::dev(n, "idem").await;
    let mut other = Client::dev(n, "idem-other").await;
    let before = metric(n, "wsc_messages_deduplicated_total")
        .await
        .unwrap_or(0.0);
    let xadd_idem = |r: &mut TestConn, to: &str, payload: &str, key: &str| -> String {
        redis::cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("to")
            .arg(to)
            .arg("payload")
            .arg(payload)
            .arg("idem")
            .arg(key)
            .query(r)
            .unwrap()
    };
    let first = xadd_idem(&mut r, "idem", "{\"try\":1}", "k1");
    let _retry = xadd_idem(&mut r, "idem", "{\"try\":2}", "k1");
    let k2 = xadd_idem(&mut r, "idem", "{\"try\":3}", "k2");
    let sentinel = xadd_to(&mut r, "idem", "\"sentinel\"");
    let to_other = xadd_idem(&mut r, "idem-other", "{\"try\":1}", "k1");
    let got = msgs_until_ids(&mut c, std::slice::from_ref(&sentinel), T).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        vec![first.clone(), k2.clone(), sentinel.clone()],
        "the retry is not delivered: {got:?}"
    );
    assert_eq!(got[0]["payload"], json!({"try": 1}));
    assert_eq!(got.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 2, 3]);
    other
        .expect("same key, another user", T, is_msg(&to_other))
        .await;
    eventually("counted as deduplicated", T, || async {
        let now = metric(n, "wsc_messages_deduplicated_total").await?;
        (now == before + 1.0).then_some(())
    })
    .await;

    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(n.http("/api/send"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let mut answers = Vec::new();
    for body in [
        json!({"to": "idem", "payload": {"api": 1}, "idempotency_key": "ak"}),
        json!({"to": "idem", "payload": {"api": 1}, "idempotency_key": "ak"}),
        json!({"to": "idem-other", "payload": {"api": 2}, "idempotency_key": "ak"}),
    ] {
        let resp = post(body.clone()).await.unwrap();
        assert_eq!(resp.status(), 202, "{body}");
        let v: Value = resp.json().await.unwrap();
        answers.push(v["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(answers[0], answers[1], "a retry answers the first id");
    assert_ne!(answers[0], answers[2], "another recipient: another message");
    let sentinel = xadd_to(&mut r, "idem", "\"sentinel 2\"");
    let got = msgs_until_ids(&mut c, std::slice::from_ref(&sentinel), T).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        vec![answers[0].clone(), sentinel.clone()],
        "the API retry is not delivered: {got:?}"
    );
    other
        .expect("API: same key, another user", T, is_msg(&answers[2]))
        .await;
    let extra = msgs_until_quiet(&mut c, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "nothing more: {:?}", brief(&extra));
    // The seqs: one per delivered message, none for the retries.
    let seqs: Vec<u64> = got.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![4, 5], "retries take no seq");
}

// ------------------------------------------------ 11. a re-routed message keeps its seq

/// The user's node is frozen (SIGSTOP) past its lease right after 5
/// messages were routed to it; the reaper routes them again (to the
/// mailbox). On another node they arrive with the seqs first assigned,
/// 3..=7 in order, and the next message gets 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerouted_message_keeps_its_seq() {
    let (redis, mut nodes) = cluster(2).await;
    // The user on the node that does not route: its messages are routed
    // to its inbox while it is frozen.
    if router_of(&nodes).await == 0 {
        nodes.swap(0, 1);
    }
    let frozen_id = nodes[0].node_id().await;
    let mut c = Client::dev(&nodes[0], "rr").await;
    let (epoch, _) = position(&c);
    let first = send_many(&mut redis.conn_for("wsc:send"), "rr", 2, 10);
    let got = take_msgs(&mut c, 2, T).await;
    assert_run(&got, &first, 1, &epoch);
    let extra = msgs_until_quiet(&mut c, Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "{:?}", brief(&extra));
    // Kept open: the node holds a connection of rr when it freezes.
    nodes[0].signal(libc::SIGSTOP);
    let ids = send_many(&mut redis.conn_for("wsc:send"), "rr", 5, 10);
    let inbox = format!("wsc:inbox:{{{frozen_id}}}");
    eventually("the frozen node reaped", T, || async {
        let mut r = redis.conn_for("wsc:nodes");
        let member: Option<f64> = r.zscore("wsc:nodes", &frozen_id).ok()?;
        (member.is_none() && !exists(&redis, &inbox)).then_some(())
    })
    .await;
    let rerouted = metric(&nodes[1], "wsc_messages_rerouted_total")
        .await
        .unwrap_or(0.0);
    assert!(
        rerouted >= 1.0,
        "scenario: the reaper routed the frozen node's messages again ({rerouted})"
    );
    let mut moved = Client::dev(&nodes[1], "rr").await;
    assert_welcome(&moved, Value::Null, &epoch, 7);
    let got = take_msgs(&mut moved, 5, T).await;
    assert_run(&got, &ids, 3, &epoch);
    let extra = msgs_until_quiet(&mut moved, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "once: {:?}", brief(&extra));
    nodes[0].signal(libc::SIGCONT);
    // The woken node re-registers its connection (same conn id, new
    // node id); then both devices get the next messages with 8, 9.
    let key = user_key("rr");
    let conn = c.conn_id();
    eventually(
        "the woken node's connection registered again",
        T,
        || async {
            let mut r = redis.conn_for(&key);
            let node: Option<String> = r.hget(&key, &conn).ok()?;
            node.is_some_and(|n| n != frozen_id).then_some(())
        },
    )
    .await;
    let next = send_many(&mut redis.conn_for("wsc:send"), "rr", 2, 10);
    let got = msgs_until_ids(&mut moved, &next, T).await;
    assert_run(&got, &next, 8, &epoch);
    let woke = msgs_until_ids(&mut c, &next, T).await;
    let known: HashMap<String, u64> = ids
        .iter()
        .cloned()
        .zip(3..)
        .chain(next.iter().cloned().zip(8..))
        .collect();
    for m in &woke {
        assert_eq!(known.get(&id_of(m)), Some(&seq_of(m)), "same seq: {m}");
    }
}

// ------------------------------------------------ standalone

/// Standalone (no Redis, the in-process bus): the same positions, resume,
/// and idempotent API sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_resume() {
    let n = NodeProc::start(
        "solo",
        &["--dev".into(), "--api-key".into(), API_KEY.into()],
    );
    n.wait_ready().await;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(n.http("/api/send"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let send = |i: usize, key: Option<&str>| {
        let mut body = json!({"to": "solo", "payload": {"n": i}});
        if let Some(k) = key {
            body["idempotency_key"] = json!(k);
        }
        let resp = post(body);
        async move {
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 202);
            let v: Value = resp.json().await.unwrap();
            v["id"].as_str().expect("an id").to_owned()
        }
    };
    let mut c = Client::dev(&n, "solo").await;
    let (epoch, seq) = position(&c);
    assert!(!epoch.is_empty() && seq == 0, "{}", c.welcome);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send(i, None).await);
    }
    let got = take_msgs(&mut c, 3, T).await;
    assert_run(&got, &ids, 1, &epoch);
    let extra = msgs_until_quiet(&mut c, Duration::from_millis(300)).await;
    assert!(extra.is_empty(), "{:?}", brief(&extra));
    c.close().await;
    eventually("solo offline", T, || async {
        (metric(&n, "wsc_connections").await? == 0.0).then_some(())
    })
    .await;
    let a = send(0, Some("s1")).await;
    assert_eq!(send(0, Some("s1")).await, a, "a retry answers the first id");
    let b = send(1, None).await;
    let mut c = resume(&n, "solo", 3, &epoch).await;
    assert_welcome(&c, json!(true), &epoch, 5);
    let mut got = take_msgs(&mut c, 2, T).await;
    got.extend(msgs_until_quiet(&mut c, Duration::from_millis(500)).await);
    assert_run(&got, &[a, b], 4, &epoch);
    c.close().await;
    let c = resume(&n, "solo", 3, "another-epoch").await;
    assert_welcome(&c, json!(false), &epoch, 5);
}

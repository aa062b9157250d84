//! Failure handling (issue 3): every test really does the fault — SIGKILL,
//! SIGSTOP/SIGCONT, SIGTERM, killing and restarting redis-server empty.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use redis::Commands;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// Reaper: SIGKILL a node holding connections; its member, inbox and
/// sessions go; messages sent in the gap reach the users on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_reap() {
    let (redis, mut nodes) = cluster(3).await;
    let mut r = redis.conn();
    let dead_id = nodes[0].node_id().await;
    let users: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(Client::dev(&nodes[0], u).await);
    }
    let t0 = Instant::now();
    nodes[0].kill9();
    // Messages in the gap: routed to the dead node's inbox while its lease
    // still looks valid, then re-routed by the reaper.
    let gap: Vec<String> = users
        .iter()
        .map(|u| xadd_to(&mut r, u, "\"gap\""))
        .collect();
    node_gone(&redis, &dead_id).await;
    let reaped_after = t0.elapsed();
    for u in &users {
        let fields: std::collections::HashMap<String, String> =
            r.hgetall(format!("wsc:user:{{{u}}}")).unwrap();
        assert!(
            fields.values().all(|n| *n != dead_id),
            "sessions of the dead node removed: {fields:?}"
        );
    }
    let reaped: u64 = {
        let mut total = 0;
        for n in &nodes[1..] {
            let m = reqwest::get(n.http("/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            total += m
                .lines()
                .find(|l| l.starts_with("wsc_nodes_reaped_total"))
                .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    };
    assert_eq!(reaped, 1, "exactly one reaper reaped it");
    for (u, id) in users.iter().zip(&gap) {
        let mut c = Client::dev(&nodes[1], u).await;
        c.expect("gap message after reconnect", T, is_msg(id)).await;
    }
    eprintln!(
        "sigkill_reap: member, inbox and sessions gone {reaped_after:?} after SIGKILL (lease ttl 1000 ms, heartbeat 200 ms)"
    );
}

/// Frozen node: SIGSTOP past the lease, reaped meanwhile; its user
/// reconnects elsewhere and gets the messages; on SIGCONT the node takes a
/// new id, never the old one, and its clients get messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn();
    let old_id = nodes[0].node_id().await;
    let mut frozen_client = Client::dev(&nodes[0], "fz").await;
    nodes[0].signal(libc::SIGSTOP);
    let during: Vec<String> = (0..5)
        .map(|i| xadd_to(&mut r, "fz", &i.to_string()))
        .collect();
    node_gone(&redis, &old_id).await;
    let mut moved = Client::dev(&nodes[1], "fz").await;
    for id in &during {
        moved
            .expect("message sent while frozen", T, is_msg(id))
            .await;
    }
    nodes[0].signal(libc::SIGCONT);
    // It comes back under a new id; the old one is never resurrected.
    let new_id = eventually("woken node rejoins", T, || {
        let url = nodes[0].http("/cluster");
        let old = old_id.clone();
        async move {
            let v: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            let id = v["node"].as_str()?.to_owned();
            (id != old
                && v["nodes"]
                    .as_array()?
                    .iter()
                    .any(|n| n["id"] == id.as_str()))
            .then_some(id)
        }
    })
    .await;
    let members: Vec<String> = r.zrange("wsc:nodes", 0, -1).unwrap();
    assert!(
        !members.contains(&old_id),
        "old id not resurrected: {members:?}"
    );
    let inbox_old: bool = r.exists(format!("wsc:inbox:{{{old_id}}}")).unwrap();
    assert!(!inbox_old, "old inbox not recreated");
    let conns: std::collections::HashMap<String, String> = r.hgetall("wsc:user:{fz}").unwrap();
    assert_eq!(
        conns.get(&frozen_client.conn_id()),
        Some(&new_id),
        "same conn id, new node id"
    );
    // The woken node's client gets new messages (so does the other device).
    let after = xadd_to(&mut r, "fz", "\"after wake\"");
    frozen_client
        .expect("message after wake", T, is_msg(&after))
        .await;
    moved.expect("message after wake", T, is_msg(&after)).await;
}

/// A router frozen past its lease and thawed while a successor leads takes
/// not one more step under the lapsed lease: Redis (`MONITOR`) sees no
/// `XAUTOCLAIM` naming its old id after the thaw (§6: at most one node
/// routes a send stream). It used to claim entries idle a lease TTL into
/// its old consumer before noticing. Single Redis only (`MONITOR`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thawed_router_takes_no_step_under_its_old_lease() {
    let (redis, nodes) = cluster(2).await;
    if redis.is_cluster() {
        eprintln!("MONITOR of one Redis: not on a Redis Cluster");
        return;
    }
    let router = eventually("a router", T, || async {
        for (i, n) in nodes.iter().enumerate() {
            if n.cluster().await["router"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    let (a, b) = (&nodes[router], &nodes[1 - router]);
    let a_id = a.node_id().await;
    a.signal(libc::SIGSTOP);
    eventually("the other node routes", T, || async {
        (b.cluster().await["router"] == true).then_some(())
    })
    .await;
    // Its node lease lapsed too (the router lease may lapse first): reaped,
    // so the thaw must end in a new id.
    node_gone(&redis, &a_id).await;
    let port: String = (redis.url().rsplit(':').next().unwrap_or_default())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("wsc-monitor-{}-{port}.txt", std::process::id()));
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &port, "monitor"])
        .stdout(std::fs::File::create(&log).expect("monitor log"))
        .spawn()
        .expect("redis-cli monitor");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("MONITOR running", T, || async {
        read().contains("OK").then_some(())
    })
    .await;
    a.signal(libc::SIGCONT);
    eventually("the thawed node rejoins under a new id", T, || async {
        (a.cluster().await["node"] != a_id.as_str()).then_some(())
    })
    .await;
    // Everything the thaw set off has reached Redis before this marker.
    let mut r = redis.conn();
    let _: String = redis::cmd("ECHO").arg("thaw-marker").query(&mut r).unwrap();
    let seen = eventually("the marker in MONITOR", T, || async {
        let text = read();
        text.contains("thaw-marker").then_some(text)
    })
    .await;
    let _ = monitor.kill();
    let _ = monitor.wait();
    let _ = std::fs::remove_file(&log);
    let claims: Vec<&str> = seen
        .lines()
        .filter(|l| l.contains("\"XAUTOCLAIM\"") && l.contains(a_id.as_str()))
        .collect();
    assert!(claims.is_empty(), "claimed under the old lease: {claims:?}");
}

/// Re-route bound: a message that reaches a node where its user is not is
/// routed again, at most 3 times, then goes to the mailbox. Plus a user who
/// keeps moving between nodes loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reroute_bound_and_moving_user() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn();
    let n0 = nodes[0].node_id().await;
    let mut m = Client::dev(&nodes[1], "mover").await;
    let put = |r: &mut TestConn, id: &str, hops: u32| {
        let _: String = redis::cmd("XADD")
            .arg(format!("wsc:inbox:{{{n0}}}"))
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("to")
            .arg("mover")
            .arg("payload")
            .arg("1")
            .arg("hops")
            .arg(hops)
            .arg("t")
            .arg(0)
            .query(r)
            .unwrap();
    };
    // Not on node 0: routed again to node 1.
    put(&mut r, "1-1", 0);
    m.expect("re-routed message", T, is_msg("1-1")).await;
    // Already routed 3 times: the next re-route goes to the mailbox (node
    // 0 mailboxes it rather than routing it again), and since the user is
    // online its node is told to read the mailbox: it arrives from there.
    put(&mut r, "1-2", 3);
    eventually("bounded re-route lands in the mailbox", T, || async {
        let text = reqwest::get(nodes[0].http("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("wsc_messages_mailboxed_total 1\n")
            .then_some(())
    })
    .await;
    m.expect("mailboxed message read while online", T, is_msg("1-2"))
        .await;
    m.close().await;

    // A user who keeps moving: every message arrives, live or from the
    // mailbox on the next connect.
    let mut sent = Vec::new();
    let mut seen = HashSet::new();
    for hop in 0..9 {
        let mut c = Client::dev(&nodes[hop % 3], "mover").await;
        for f in c.backlog.drain(..) {
            seen.insert(f["id"].as_str().unwrap_or_default().to_owned());
        }
        for _ in 0..20 {
            sent.push(xadd_to(&mut r, "mover", "2"));
        }
        while let Some(f) = c.next_frame(Duration::from_millis(150)).await {
            if f["type"] == "message" {
                seen.insert(f["id"].as_str().unwrap().to_owned());
            }
        }
        c.close().await;
    }
    let mut last = Client::dev(&nodes[0], "mover").await;
    while let Some(f) = last.next_frame(Duration::from_millis(500)).await {
        seen.insert(f["id"].as_str().unwrap_or_default().to_owned());
    }
    let lost: Vec<&String> = sent.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "lost {} of {}: {lost:?}",
        lost.len(),
        sent.len()
    );
}

/// Redis lost and restarted empty: sockets stay, /readyz 503, then every
/// node comes back under a new id with its connections, and routing works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_empty() {
    let (mut redis, nodes) = cluster(3).await;
    let old: HashSet<String> = futures::future::join_all(nodes.iter().map(|n| n.node_id()))
        .await
        .into_iter()
        .collect();
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push(Client::dev(n, &format!("r{i}")).await);
    }
    redis.kill();
    for n in &nodes {
        eventually("readyz 503 without redis", T, || {
            let url = n.http("/readyz");
            async move { (reqwest::get(url).await.ok()?.status() == 503).then_some(()) }
        })
        .await;
    }
    // Sockets are kept.
    for c in clients.iter_mut() {
        c.send_json(serde_json::json!({"type":"ping"})).await;
        c.expect("pong while redis is down", T, |v| v["type"] == "pong")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // stay down past the lease TTL
    redis.restart_empty();
    let t0 = Instant::now();
    for n in &nodes {
        eventually(
            "ready again after redis restart",
            Duration::from_secs(5),
            || {
                let url = n.http("/readyz");
                async move { (reqwest::get(url).await.ok()?.status() == 200).then_some(()) }
            },
        )
        .await;
    }
    let back = t0.elapsed();
    let mut r = redis.conn();
    let members: HashSet<String> = r.zrange("wsc:nodes", 0, -1).unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.is_disjoint(&old), "new ids after an empty restart");
    for (i, c) in clients.iter_mut().enumerate() {
        let conns: std::collections::HashMap<String, String> =
            eventually("re-registered", T, || {
                let mut r = redis.conn();
                async move {
                    let m: std::collections::HashMap<String, String> =
                        r.hgetall(format!("wsc:user:{{r{i}}}")).ok()?;
                    (!m.is_empty()).then_some(m)
                }
            })
            .await;
        assert!(
            conns.contains_key(&c.conn_id()),
            "same connection id re-registered"
        );
        let id = xadd_to(&mut r, &format!("r{i}"), "\"after restart\"");
        c.expect("routing works again", T, is_msg(&id)).await;
    }
    eprintln!("redis_restart_empty: all nodes ready {back:?} after redis came back");
}

/// Cut off from Redis (§8): `/readyz` turns 503 once the heartbeats have
/// failed for a heartbeat, long before a 10 s lease would lapse, while
/// `/healthz` stays 200; Redis back, ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_503_when_cut_off_before_the_lease_lapses() {
    let mut redis = Redis::start();
    let n = NodeProc::start("cut", &timed_args(&redis.url(), "200", "10000", &["--dev"]));
    n.wait_ready().await;
    redis.kill();
    let killed = Instant::now();
    eventually("readyz 503 without redis", Duration::from_secs(5), || {
        let url = n.http("/readyz");
        async move { (reqwest::get(url).await.ok()?.status() == 503).then_some(()) }
    })
    .await;
    let took = killed.elapsed();
    eprintln!("readyz 503 {took:?} after redis died (heartbeat 200 ms, lease 10 s)");
    assert_eq!(
        reqwest::get(n.http("/healthz")).await.unwrap().status(),
        200
    );
    redis.restart_empty();
    n.wait_ready().await;
}

/// Redis down when a node boots: 503 until it answers (the retries are
/// logged), then it joins within 2 s of Redis answering (§6 Join), even
/// after its retries have backed off to their longest wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_boot() {
    let mut redis = Redis::start();
    redis.kill();
    let n = NodeProc::start("early", &fast_args(&redis));
    eventually("retries backed off to their longest wait", T, || async {
        (n.log().matches("redis unreachable at boot").count() >= 8).then_some(())
    })
    .await;
    assert_eq!(reqwest::get(n.http("/readyz")).await.unwrap().status(), 503);
    assert_eq!(
        reqwest::get(n.http("/healthz")).await.unwrap().status(),
        200
    );
    redis.restart_empty();
    let answered = Instant::now();
    n.wait_ready().await;
    let took = answered.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "ready {took:?} after Redis answered"
    );
    // Whenever Redis comes up, the next attempt is at most this far off.
    let waits: Vec<u64> = n
        .log()
        .lines()
        .filter(|l| l.contains("redis unreachable at boot"))
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(waits.len() >= 8, "retry waits logged: {waits:?}");
    assert!(
        waits.iter().all(|&w| w <= 1000),
        "a boot retry waits at most 1 s (ready within 2 s of Redis): {waits:?}"
    );
    let mut c = Client::dev(&n, "boot").await;
    let id = xadd_to(&mut redis.conn(), "boot", "1");
    c.expect("routed after a late redis", T, is_msg(&id)).await;
}

/// SIGKILL in the middle of a drain: a survivor finishes the reap and the
/// messages in the inbox are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain() {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    let i = args.iter().position(|a| a == "--drain-ms").unwrap();
    args[i + 1] = "5000".into();
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|i| NodeProc::start(&format!("d{i}"), &args))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    let mut r = redis.conn();
    let id0 = nodes[0].node_id().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(Client::dev(&nodes[0], &format!("m{i}")).await);
    }
    // Park messages in node 0's inbox as if routed just before the drain.
    let parked: Vec<String> = (0..10)
        .map(|i| {
            redis::cmd("XADD")
                .arg(format!("wsc:inbox:{{{id0}}}"))
                .arg("*")
                .arg("id")
                .arg(format!("9-{i}"))
                .arg("to")
                .arg(format!("nobody{i}"))
                .arg("payload")
                .arg("1")
                .arg("hops")
                .arg(3)
                .arg("t")
                .arg(0)
                .query::<String>(&mut r)
                .map(|_| format!("9-{i}"))
                .unwrap()
        })
        .collect();
    let _ = parked;
    nodes[0].signal(libc::SIGTERM);
    eventually("draining", T, || {
        let url = nodes[0].http("/readyz");
        async move { (reqwest::get(url).await.ok()?.status() == 503).then_some(()) }
    })
    .await;
    nodes[0].kill9();
    node_gone(&redis, &id0).await;
    // The parked messages were routed again by the survivor (to mailboxes).
    // At-least-once: the dying node may have mailboxed some before the
    // kill and not yet deleted them, so a copy (same id) may come twice.
    for i in 0..10 {
        let v: redis::streams::StreamRangeReply =
            r.xrange_all(format!("wsc:mailbox:{{nobody{i}}}")).unwrap();
        assert!(
            !v.ids.is_empty(),
            "parked message {i} re-routed by the survivor"
        );
        for e in &v.ids {
            assert_eq!(
                e.get::<String>("id").as_deref(),
                Some(format!("9-{i}").as_str())
            );
        }
    }
    let _ = nodes.remove(0);
}

/// Drain at scale: thousands of connections closed with 1012 in batches
/// spread over the window, exit 0 within the window plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_at_scale() {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    let i = args.iter().position(|a| a == "--drain-ms").unwrap();
    args[i + 1] = "2000".into();
    let mut n = NodeProc::start("big", &args);
    let other = NodeProc::start("other", &args);
    n.wait_ready().await;
    other.wait_ready().await;
    const N: usize = 2000;
    let mut clients = Vec::with_capacity(N);
    for chunk in 0..(N / 100) {
        let batch = futures::future::join_all((0..100).map(|j| {
            let url = n.ws_url(&format!("user=big{}", chunk * 100 + j));
            async move { Client::connect(&url).await }
        }))
        .await;
        clients.extend(batch);
    }
    let Drained {
        closes,
        status,
        exit_after,
    } = n
        .drain_watched(&mut clients, Duration::from_secs(6), Duration::from_secs(4))
        .await;
    assert_eq!(status, Some(0));
    assert!(
        closes.iter().all(|(c, _)| *c == Some(1012)),
        "every socket closed with 1012"
    );
    let first = closes.iter().map(|c| c.1).min().unwrap();
    let last = closes.iter().map(|c| c.1).max().unwrap();
    // Spread over the window, not all at once.
    assert!(
        last - first > Duration::from_millis(1000),
        "closes spread: first {first:?}, last {last:?}"
    );
    let per_100ms = {
        let mut buckets = std::collections::HashMap::new();
        for (_, t) in &closes {
            *buckets.entry(t.as_millis() / 100).or_insert(0usize) += 1;
        }
        buckets.values().copied().max().unwrap()
    };
    assert!(
        per_100ms < N / 4,
        "no storm: at most {per_100ms} closes in any 100 ms"
    );
    eprintln!(
        "drain_at_scale: {N} sockets closed from {first:?} to {last:?}, at most {per_100ms} per 100 ms; exit after {exit_after:?}"
    );
    assert!(
        exit_after < Duration::from_millis(2000 + 1000 + 500),
        "exit within drain + 1 s: {exit_after:?}"
    );
}

/// Mailbox pages a node of the previous release moved aside for a
/// connection (`<p>:taking:{user}:<conn>`) and had not written when it died
/// are routed again by the reaper of this release (rolling upgrades).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_mailbox_survives_a_kill() {
    let (redis, mut nodes) = cluster(3).await;
    let mut r = redis.conn();
    let dead = nodes[0].node_id().await;
    // As if node 0 had just taken this page for connection c-1 of "tk".
    let _: () = r
        .hset(format!("wsc:conns:{{{dead}}}"), "c-1", "tk")
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("wsc:taking:{tk}:c-1")
        .arg("*")
        .arg("id")
        .arg("7-7")
        .arg("to")
        .arg("tk")
        .arg("payload")
        .arg("\"taken\"")
        .arg("hops")
        .arg(0)
        .arg("t")
        .arg(0)
        .query(&mut r)
        .unwrap();
    let mut c = Client::dev(&nodes[1], "tk").await;
    nodes[0].kill9();
    node_gone(&redis, &dead).await;
    c.expect("taken message routed again", T, is_msg("7-7"))
        .await;
    let left: bool = r.exists("wsc:taking:{tk}:c-1").unwrap();
    assert!(!left, "the taken copy is cleared");
}

/// Entries a former router read but never routed (its lease lapsed while
/// it was reading) are claimed by the current router once idle for a lease
/// TTL, not only at takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_router_reads_are_claimed() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn_for("wsc:send");
    let mut c = Client::dev(&nodes[1], "orphan").await;
    // Routing has started (the router group exists).
    eventually("a router", T, || {
        let mut r = redis.conn();
        async move {
            let v: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg("wsc:send")
                .query(&mut r)
                .ok()?;
            format!("{v:?}").contains("router").then_some(())
        }
    })
    .await;
    // A ghost consumer of the router group reads the entries as a lapsed
    // leader would, and never acks. MULTI/EXEC: the ghost surely gets them
    // before the blocked leader wakes up.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..3 {
        pipe.cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("to")
            .arg("orphan")
            .arg("payload")
            .arg(i);
    }
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg("router")
        .arg("ghost")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg("wsc:send")
        .arg(">")
        .ignore();
    let ids: Vec<String> = pipe.query(&mut r).unwrap();
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("wsc:send")
        .arg("router")
        .query(&mut r)
        .unwrap();
    assert_eq!(pending[0], redis::Value::Int(3), "the ghost holds them");
    // The leader claims them from the ghost once idle for a lease TTL.
    for id in &ids {
        c.expect("message read by the ghost", T, is_msg(id)).await;
    }
    eventually("nothing left pending", T, || {
        let mut r = redis.conn();
        async move {
            let v: Vec<redis::Value> = redis::cmd("XPENDING")
                .arg("wsc:send")
                .arg("router")
                .query(&mut r)
                .ok()?;
            (v.first() == Some(&redis::Value::Int(0))).then_some(())
        }
    })
    .await;
}

/// A mailbox read whose reply is lost (a dropped connection after the
/// script ran) loses nothing: entries leave the mailbox only when the
/// connection says they are written, so reading again returns the same
/// page; deleting what was written and reading on returns the rest, and
/// the last delete leaves no key behind. Runs the node's own script on the
/// test's Redis (single or cluster: its keys share the user's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_mailbox_take_reply_is_taken_again() {
    let redis = Redis::start();
    let mut r = redis.conn();
    let (user, mailbox, bytes) = (
        "wsc:user:{lost}",
        "wsc:mailbox:{lost}",
        "wsc:mailbox-bytes:{lost}",
    );
    for i in 0..150 {
        let _: String = redis::cmd("XADD")
            .arg(mailbox)
            .arg("*")
            .arg("id")
            .arg(format!("m{i}"))
            .arg("to")
            .arg("lost")
            .arg("payload")
            .arg(i.to_string())
            .query(&mut r)
            .unwrap();
    }
    let take = |r: &mut TestConn,
                after: &str,
                page: usize,
                del: &[String]|
     -> (i64, Vec<(String, String)>) {
        let v: redis::Value = redis::cmd("EVAL")
            .arg(wscluster::lua::TAKE_MAILBOX)
            .arg(3)
            .arg(user)
            .arg(mailbox)
            .arg(bytes)
            .arg(60_000)
            .arg(page)
            .arg(after)
            .arg(del)
            .query(r)
            .unwrap();
        let (more, entries): (i64, Vec<(String, Vec<String>)>) =
            redis::from_redis_value(v).unwrap();
        let ids = entries
            .into_iter()
            .map(|(id, f)| (id, f.get(1).cloned().unwrap_or_default()))
            .collect();
        (more, ids)
    };
    let (more, first) = take(&mut r, "-", 100, &[]);
    assert_eq!((more, first.len()), (1, 100));
    // That reply is "lost": the connection reads again, and gets it again.
    let (more, again) = take(&mut r, "-", 100, &[]);
    assert_eq!((more, &again), (1, &first), "a lost page is read again");
    // Written: delete it and read on.
    let written: Vec<String> = again.iter().map(|(id, _)| id.clone()).collect();
    let after = format!("({}", written.last().unwrap());
    let (more, rest) = take(&mut r, &after, 100, &written);
    assert_eq!(more, 0);
    let got: Vec<String> = first.iter().chain(&rest).map(|(_, m)| m.clone()).collect();
    let want: Vec<String> = (0..150).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    let len: usize = redis::cmd("XLEN").arg(mailbox).query(&mut r).unwrap();
    assert_eq!(len, 50, "only what is written leaves the mailbox");
    let written: Vec<String> = rest.iter().map(|(id, _)| id.clone()).collect();
    let (_, none) = take(&mut r, "-", 0, &written);
    assert!(none.is_empty());
    let left: bool = r.exists(mailbox).unwrap();
    assert!(!left, "an emptied mailbox leaves no key");
}

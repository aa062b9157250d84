//! wscluster on a real Redis Cluster (`common::RedisCluster`: cluster-enabled
//! `redis-server` processes joined with `redis-cli --cluster create`).
//!
//! The core and failure tests also run against a cluster (`scripts/test.sh`
//! runs them again with `WSC_TEST_REDIS_CLUSTER=1`); this file holds what
//! only a cluster has: keys spread over primaries, and a primary failover.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use redis::Commands;
use serde_json::json;

/// Twenty hash tags spread over three primaries; every key reads back.
#[test]
fn three_primaries_serve_every_slot() {
    let t0 = Instant::now();
    let cluster = RedisCluster::start(3, 0);
    eprintln!("cluster up in {:?}", t0.elapsed());
    let mut conn = cluster.conn();
    let keys: Vec<String> = ('a'..='t').map(|t| format!("{{{t}}}x")).collect();
    for k in &keys {
        let () = conn
            .set(k, format!("v-{k}"))
            .expect("SET through the cluster");
    }
    let mut primaries = HashSet::new();
    for k in &keys {
        let v: String = conn.get(k).expect("GET through the cluster");
        assert_eq!(v, format!("v-{k}"));
        let port = cluster.primary_port_for_key(k);
        assert!(
            cluster.ports().contains(&port),
            "{k} on unknown port {port}"
        );
        // The key really lives on that process.
        let n: i64 = cluster.node_conn(port).exists(k).expect("EXISTS");
        assert_eq!(n, 1, "{k} on 127.0.0.1:{port}");
        primaries.insert(port);
    }
    assert!(
        primaries.len() >= 2,
        "20 hash tags all on one primary: {primaries:?}"
    );
}

/// A primary is SIGKILLed; its replica takes over its slots, the
/// replicated value survives and a fresh cluster connection can write.
#[test]
fn primary_failover_with_replica() {
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start(3, 1);
    eprintln!("cluster up in {:?}", t0.elapsed());
    let key = "{failover}k";
    let mut conn = cluster.conn();
    let () = conn.set(key, "v1").expect("SET");
    // WAIT goes to every primary: the write reached its replica.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query(&mut conn)
        .expect("WAIT");
    assert_eq!(acked, 1, "v1 replicated");
    drop(conn);

    let old = cluster.primary_port_for_key(key);
    cluster.kill_port(old);
    let took = cluster.wait_failover(old, Duration::from_secs(10));
    eprintln!("failover of 127.0.0.1:{old} took {took:?}");
    let new = cluster.primary_port_for_key(key);
    assert_ne!(new, old, "slot still on the killed primary");

    let t0 = Instant::now();
    let v: String = wait_until("write after failover", Duration::from_secs(5), || {
        let mut c = cluster
            .client()
            .get_connection()
            .map_err(|e| e.to_string())?;
        let before: String = c.get(key).map_err(|e| e.to_string())?;
        let () = c.set(key, "v2").map_err(|e| e.to_string())?;
        let after: String = c.get(key).map_err(|e| e.to_string())?;
        Ok(format!("{before}->{after}"))
    });
    eprintln!("first write after failover took {:?}", t0.elapsed());
    assert_eq!(v, "v1->v2");
    let on_new: String = cluster.node_conn(new).get(key).expect("GET on new primary");
    assert_eq!(on_new, "v2");
}

/// The tests that run wscluster nodes on a cluster take turns: each runs
/// 3–6 redis-servers and 3 nodes, and two at once on a 2-core machine
/// starve their 200 ms heartbeats.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Add a message for `user` to `wsc:send`, retrying (fresh cluster
/// connection each time) while its slot has no primary.
fn xadd_retrying(rc: &RedisCluster, user: &str, payload: &str) -> String {
    wait_until("XADD accepted", Duration::from_secs(20), || {
        let mut c = rc.client().get_connection().map_err(|e| e.to_string())?;
        try_xadd_to(&mut c, user, payload).map_err(|e| e.to_string())
    })
}

/// Where a user's messages may be, for a failure message: the send
/// stream, the user's connections and mailbox, the nodes and their inboxes.
fn where_is(rc: &RedisCluster, user: &str) -> String {
    let Ok(mut c) = rc.client().get_connection() else {
        return "(no cluster connection)".into();
    };
    let send: Result<usize, _> = c.xlen("wsc:send");
    let pending: Result<redis::Value, _> = redis::cmd("XPENDING")
        .arg("wsc:send")
        .arg("router")
        .query(&mut c);
    let conns: Result<Vec<(String, String)>, _> = c.hgetall(format!("wsc:user:{{{user}}}"));
    let mailbox: Result<usize, _> = c.xlen(format!("wsc:mailbox:{{{user}}}"));
    let nodes: Vec<(String, f64)> = c.zrange_withscores("wsc:nodes", 0, -1).unwrap_or_default();
    let inboxes: Vec<(String, Result<usize, _>)> = nodes
        .iter()
        .map(|(n, _)| (n.clone(), c.xlen(format!("wsc:inbox:{{{n}}}"))))
        .collect();
    format!(
        "send {send:?}, pending {pending:?}, {user}'s connections {conns:?}, mailbox {mailbox:?}, nodes {nodes:?}, inboxes {inboxes:?}"
    )
}

/// Three ready wscluster nodes on `rc`, with test timings (heartbeat
/// 200 ms, lease 1 s).
async fn three_nodes_on(rc: &RedisCluster) -> Vec<NodeProc> {
    let args = timed_args(&rc.seeds(), "200", "1000", &["--dev"]);
    let nodes: Vec<NodeProc> = (0..3)
        .map(|i| NodeProc::start(&format!("n{i}"), &args))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    nodes
}

/// Add one message per user and wait for each to reach its client.
async fn each_gets_one(rc: &RedisCluster, users: &[String], clients: &mut [Client], what: &str) {
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let id = xadd_retrying(rc, u, &format!("{what:?}"));
        c.expect(what, Duration::from_secs(10), is_msg(&id)).await;
    }
}

/// Three wscluster nodes on 3 primaries with a replica each. Users' keys
/// and inboxes spread over the primaries. The primary holding `wsc:nodes`
/// (every lease) is SIGKILLed: its replica takes over, the nodes ride it
/// out (with 1 s leases they lose them and rejoin under new ids, keeping
/// their sockets), and routing recovers: every message added during and
/// after the failover reaches its user, client sends work, and the cluster
/// view settles on three live nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failover_routing_recovers() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut rc = RedisCluster::start(3, 1);
    let nodes = three_nodes_on(&rc).await;
    let users: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(Client::dev(&nodes[i % 3], u).await);
    }
    // The per-user keys are spread over the primaries: the cluster shares
    // the load, not one slot.
    let homes: HashSet<u16> = users
        .iter()
        .map(|u| rc.primary_port_for_key(&format!("wsc:user:{{{u}}}")))
        .collect();
    assert!(homes.len() >= 2, "user keys on one primary: {homes:?}");
    each_gets_one(&rc, &users, &mut clients, "message before the failover").await;

    let victim = rc.primary_port_for_key("wsc:nodes");
    let t0 = Instant::now();
    rc.kill_port(victim);
    // Apps keep adding while the slot moves.
    let during: Vec<String> = users
        .iter()
        .map(|u| xadd_retrying(&rc, u, "\"during\""))
        .collect();
    let took = rc.wait_failover(victim, Duration::from_secs(20));
    for ((u, c), id) in users.iter().zip(clients.iter_mut()).zip(&during) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match c.next_frame(left.min(Duration::from_secs(1))).await {
                Some(f) if is_msg(id)(&f) => break,
                Some(f) => seen.push(f),
                None if Instant::now() < deadline => {}
                None => panic!(
                    "{u}: message {id} added during the failover not delivered in 30 s; saw {seen:?}; {}",
                    where_is(&rc, u)
                ),
            }
        }
    }
    let recovered = t0.elapsed();
    // Every node is ready again and sees exactly the three live nodes (the
    // ids they lost were reaped).
    for n in &nodes {
        eventually(
            "node ready and three live nodes",
            Duration::from_secs(20),
            || async {
                let ready = reqwest::get(n.http("/readyz"))
                    .await
                    .ok()?
                    .status()
                    .is_success();
                let v = n.cluster().await;
                (ready && v["nodes"].as_array()?.len() == 3).then_some(())
            },
        )
        .await;
    }
    // After: app messages and client sends, between all nodes.
    each_gets_one(&rc, &users, &mut clients, "message after the failover").await;
    let (a, rest) = clients.split_at_mut(1);
    a[0].send_json(json!({"type":"send","to":"f1","payload":"hi","ref":1}))
        .await;
    let sent = a[0]
        .expect("sent", Duration::from_secs(10), |v| v["type"] == "sent")
        .await;
    let sid = sent["id"].as_str().unwrap_or_default().to_owned();
    rest[0]
        .expect(
            "client send after the failover",
            Duration::from_secs(10),
            is_msg(&sid),
        )
        .await;
    eprintln!(
        "primary_failover_routing_recovers: redis failover {took:?}; every message delivered {recovered:?} after the kill"
    );
}

/// Users of [`slot_migration_under_traffic`] and the messages added for them
/// (message `seq` goes to user `seq % MIG_USERS`).
const MIG_USERS: usize = 6;
const MIG_TOTAL: usize = 900;

/// What a client of [`slot_migration_under_traffic`] received: `(seq, id)`
/// of every `message` frame, in order, the seqs still missing, and when it
/// had them all.
type Received = (Vec<(usize, String)>, Vec<usize>, Option<Instant>);

/// Read `message` frames until every seq in `want` arrived and `stop` is
/// set (later frames are duplicates, still recorded), or until `timeout`.
async fn collect_seqs(
    mut c: Client,
    want: Vec<usize>,
    timeout: Duration,
    stop: Arc<AtomicBool>,
) -> Received {
    let mut missing: HashSet<usize> = want.into_iter().collect();
    let mut got = Vec::new();
    let mut complete = None;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if missing.is_empty() {
            complete.get_or_insert_with(Instant::now);
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let asked = Instant::now();
        match c.next_frame(left.min(Duration::from_millis(100))).await {
            Some(v) if v["type"] == "message" => {
                let Some(seq) = v["payload"]["seq"].as_u64() else {
                    continue; // not one of ours
                };
                let seq = seq as usize;
                missing.remove(&seq);
                got.push((seq, v["id"].as_str().unwrap_or_default().to_owned()));
            }
            Some(_) => {}
            // Closed (not a timeout): nothing more will come.
            None if asked.elapsed() < Duration::from_millis(50) => break,
            None => {}
        }
    }
    let mut missing: Vec<usize> = missing.into_iter().collect();
    missing.sort_unstable();
    c.close().await;
    (got, missing, complete)
}

/// Live resharding under traffic. Three wscluster nodes on 3 primaries, six
/// users spread over them, and an app adding a burst of one message per user every 20 ms. While
/// it does, four slots move to another primary the way `redis-cli
/// --cluster reshard` moves them (`SETSLOT IMPORTING/MIGRATING`, `MIGRATE`,
/// `SETSLOT NODE`), each staying in the migrating state for ~170 ms: the
/// send stream's (with its consumer group), one user's (connections hash,
/// mailbox), the lease set's (`wsc:nodes`) and a node inbox's. The nodes
/// meet `ASK` (and `TRYAGAIN`) while a slot migrates and `MOVED` after;
/// every message still reaches its user with the id the app got
/// (duplicates are allowed, and counted), none is dead-lettered, the send
/// stream drains (every entry acknowledged and deleted) and every node is
/// ready at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slot_migration_under_traffic() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let t_start = Instant::now();
    let rc = RedisCluster::start(3, 0);
    let t_cluster = t_start.elapsed();
    let nodes = three_nodes_on(&rc).await;
    let users: Vec<String> = (0..MIG_USERS).map(|i| format!("mig{i}")).collect();
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(Client::dev(&nodes[i % nodes.len()], u).await);
    }
    // Routing works before anything moves.
    each_gets_one(&rc, &users, &mut clients, "message before the migration").await;
    let t_ready = t_start.elapsed();

    // A node that does not route: its inbox carries the messages for its
    // users (the router's own users get theirs directly).
    let mut inbox_key = None;
    for n in &nodes {
        let v = n.cluster().await;
        if v["router"] == false {
            inbox_key = Some(format!(
                "wsc:inbox:{{{}}}",
                v["node"].as_str().unwrap_or_default()
            ));
            break;
        }
    }
    let inbox_key = inbox_key.expect("a node that does not route");

    // Each client reads until it has every message meant for it (and on,
    // counting duplicates, until the send stream drained).
    let stop_reading = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let want: Vec<usize> = (0..MIG_TOTAL).filter(|s| s % MIG_USERS == i).collect();
            tokio::spawn(collect_seqs(
                c,
                want,
                Duration::from_secs(30),
                stop_reading.clone(),
            ))
        })
        .collect();

    // The app: a burst of XADDs every 20 ms, on its own cluster connection (the
    // redis crate follows MOVED/ASK); an error costs a fresh connection and
    // a retry.
    let urls = rc.urls();
    let app_users = users.clone();
    let app = std::thread::spawn(move || {
        let client = redis::cluster::ClusterClient::new(urls).expect("cluster client");
        let mut conn: Option<redis::cluster::ClusterConnection> = None;
        let mut ids = Vec::with_capacity(MIG_TOTAL);
        let mut errors = Vec::new();
        let t0 = Instant::now();
        for seq in 0..MIG_TOTAL {
            let user = &app_users[seq % MIG_USERS];
            let payload = json!({ "seq": seq }).to_string();
            let deadline = Instant::now() + Duration::from_secs(20);
            let id = loop {
                let r = match conn.as_mut() {
                    Some(c) => Ok(c),
                    None => client.get_connection().map(|c| conn.insert(c)),
                }
                .and_then(|c| try_xadd_to(c, user, &payload));
                match r {
                    Ok(id) => break id,
                    Err(e) => {
                        errors.push(format!("seq {seq} at {:?}: {e}", t0.elapsed()));
                        assert!(Instant::now() < deadline, "XADD seq {seq}: {errors:?}");
                        conn = None;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            ids.push(id);
            // Bursts of one message per user, so a router batch holds
            // several commands for one inbox (one slot): the pipelines that
            // a migrating slot breaks.
            if seq % MIG_USERS == MIG_USERS - 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        (ids, errors, t0.elapsed())
    });

    // Meanwhile, move four slots, each to the next primary: the send
    // stream's, a user's, the lease set's and a node inbox's.
    let user_key = format!("wsc:user:{{{}}}", users[0]);
    let migrations = tokio::task::block_in_place(|| {
        std::thread::sleep(Duration::from_millis(500));
        rc.reset_stats();
        let primaries = rc.primary_ports();
        let mut done = Vec::new();
        for key in ["wsc:send", &user_key, "wsc:nodes", &inbox_key] {
            let from = rc.primary_port_for_key(key);
            let i = primaries
                .iter()
                .position(|&p| p == from)
                .expect("owner is a primary");
            let to = primaries[(i + 1) % primaries.len()];
            let m = rc.migrate_slot_of(key, to, Duration::from_millis(80));
            assert_eq!(rc.primary_port_for_key(key), to, "{key} moved");
            eprintln!("migrated {key}: {m:?}");
            done.push((key.to_owned(), m));
            std::thread::sleep(Duration::from_millis(200));
        }
        done
    });
    let t_migrated = t_start.elapsed();
    let (app_ids, app_errors, app_took) =
        tokio::task::block_in_place(|| app.join().expect("app thread"));
    let t_added = t_start.elapsed();

    let mut conn = rc.conn();
    // The send stream drains (every entry acknowledged and deleted); if it
    // does not, what is left and whether it is still pending.
    let (drained, left) = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = conn.xlen("wsc:send").unwrap_or(-1);
            if n == 0 {
                return (t_start.elapsed(), None);
            }
            if Instant::now() > deadline {
                let ids: Vec<String> = conn
                    .xrange_all::<_, redis::streams::StreamRangeReply>("wsc:send")
                    .map(|r| r.ids.into_iter().map(|e| e.id).collect())
                    .unwrap_or_default();
                let groups: redis::Value = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg("wsc:send")
                    .query(&mut conn)
                    .unwrap_or(redis::Value::Nil);
                let pending: redis::Value = redis::cmd("XPENDING")
                    .arg("wsc:send")
                    .arg("router")
                    .query(&mut conn)
                    .unwrap_or(redis::Value::Nil);
                let seqs: Vec<usize> = ids.iter().filter_map(|id| ids_pos(&app_ids, id)).collect();
                return (
                    t_start.elapsed(),
                    Some(format!(
                        "XLEN wsc:send = {n}: ids {ids:?} (seqs {seqs:?}); \
                         XINFO GROUPS {groups:?}; XPENDING {pending:?}"
                    )),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });

    // Every message reached its user, with the id the app got.
    stop_reading.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    let mut t_delivered = Duration::ZERO;
    let (mut duplicates, mut reordered) = (0, 0);
    for (i, r) in readers.into_iter().enumerate() {
        let (got, missing, complete) = r.await.expect("reader task");
        if let Some(t) = complete {
            t_delivered = t_delivered.max(t.duration_since(t_start));
        }
        let user = &users[i];
        if !missing.is_empty() {
            failures.push(format!("{user}: {} missing: {missing:?}", missing.len()));
        }
        let mut seen = HashSet::new();
        let mut last = None;
        for (seq, id) in &got {
            if id != &app_ids[*seq] {
                failures.push(format!(
                    "{user}: seq {seq} as {id}, added as {}",
                    app_ids[*seq]
                ));
            }
            if !seen.insert(id.clone()) {
                duplicates += 1;
                continue;
            }
            if last.is_some_and(|l| *seq < l) {
                reordered += 1;
            }
            last = Some(*seq);
        }
    }

    for n in &nodes {
        n.wait_ready().await;
    }
    let t_end = t_start.elapsed();
    let dead: i64 = conn.xlen("wsc:dead").expect("XLEN wsc:dead");
    let stats = rc.error_stats();
    let calls = rc.failed_calls();

    // What the nodes logged about it.
    for n in &nodes {
        let log = n.log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        eprintln!("---- node {}: {} WARN/ERROR lines ----", n.name, bad.len());
        for l in bad {
            eprintln!("{l}");
        }
    }
    eprintln!(
        "slot_migration_under_traffic: cluster up {t_cluster:?}, nodes ready {t_ready:?}; \
         migrations done {t_migrated:?}; app added {MIG_TOTAL} in {app_took:?} \
         (done {t_added:?}, {} XADD errors {app_errors:?}); all delivered {t_delivered:?}; \
         send drained {drained:?}; nodes ready {t_end:?}",
        app_errors.len()
    );
    for (key, m) in &migrations {
        eprintln!(
            "  {key}: slot {} {} -> {}, {} keys in {} rounds, migrating {:?}, agreed after {:?}",
            m.slot, m.from, m.to, m.keys, m.rounds, m.migrating, m.took
        );
    }
    eprintln!(
        "  redirects/errors during the migrations (INFO errorstats): {stats:?}; \
         duplicates {duplicates}; reordered {reordered}; dead letters {dead}"
    );
    eprintln!("  failed/rejected calls (INFO commandstats): {calls:?}");
    assert!(
        failures.is_empty(),
        "lost or mismatched messages: {failures:#?}"
    );
    assert_eq!(dead, 0, "entries in wsc:dead");
    assert!(left.is_none(), "wsc:send not drained: {left:?}");
}

/// The position of `id` in `ids`.
fn ids_pos(ids: &[String], id: &str) -> Option<usize> {
    ids.iter().position(|i| i == id)
}

/// History and resume across a primary failover (issue 14): the primary
/// holding a user's slot (its history and seq counter) is SIGKILLed and
/// its replica takes over. A client that resumes afterwards is told
/// `recovered:true` only with every message after its `since`, in order
/// and contiguous; if the failover lost writes, it must say `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_primary_failover() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut rc = RedisCluster::start(3, 1);
    let nodes = three_nodes_on(&rc).await;
    let user = "rho";
    let mut c = Client::dev(&nodes[0], user).await;
    let mut before = Vec::new();
    for i in 0..5 {
        let id = xadd_retrying(&rc, user, &format!("{i}"));
        before.push(
            c.expect("before", Duration::from_secs(10), is_msg(&id))
                .await,
        );
    }
    let since = before.last().and_then(|m| m["seq"].as_u64()).expect("seq");
    let epoch = before[0]["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(since, 5, "seqs 1..5: {before:?}");
    drop(c);
    let victim = rc.primary_port_for_key(&format!("wsc:seq:{{{user}}}"));
    rc.kill_port(victim);
    let during: Vec<String> = (5..10)
        .map(|i| xadd_retrying(&rc, user, &format!("{i}")))
        .collect();
    rc.wait_failover(victim, Duration::from_secs(20));
    let after: Vec<String> = (10..13)
        .map(|i| xadd_retrying(&rc, user, &format!("{i}")))
        .collect();
    // Resume once the nodes hold leases again (they may be new ones).
    for n in &nodes {
        eventually("node ready", Duration::from_secs(30), || async {
            let r = reqwest::get(n.http("/readyz")).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }
    let query = format!("user={user}&since={since}&epoch={epoch}");
    // Readiness can still flip: a node whose lease the failover lost
    // rejoins under a new id a moment later (503 meanwhile, §8).
    let c = Client::connect_retrying(&nodes[1].ws_url(&query), Duration::from_secs(20)).await;
    let w = c.welcome.clone();
    let mut r = (c, w);
    let (ref mut client, ref welcome) = r;
    let mut got: Vec<serde_json::Value> = Vec::new();
    let want: HashSet<&String> = during.iter().chain(&after).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got
        .iter()
        .filter(|m| want.contains(&m["id"].as_str().unwrap_or_default().to_owned()))
        .count()
        < want.len()
        && Instant::now() < deadline
    {
        if let Some(f) = client.next_frame(Duration::from_secs(1)).await
            && f["type"] == "message"
        {
            got.push(f);
        }
    }
    let ids: Vec<&str> = got.iter().filter_map(|m| m["id"].as_str()).collect();
    for id in &want {
        assert!(ids.contains(&id.as_str()), "{id} not delivered: {got:?}");
    }
    match welcome["recovered"].as_bool() {
        Some(true) => {
            // Every message after `since` came, contiguous, in order.
            assert_eq!(welcome["epoch"], epoch.as_str());
            let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
            let mut first: Vec<u64> = Vec::new();
            for s in seqs {
                if !first.contains(&s) {
                    first.push(s);
                }
            }
            let expect: Vec<u64> = (since + 1..=since + first.len() as u64).collect();
            assert_eq!(
                first, expect,
                "recovered:true with a gap or out of order: {got:?}"
            );
            assert!(first.len() >= want.len());
        }
        Some(false) => {
            eprintln!("resume_across_a_primary_failover: the failover lost writes; recovered:false")
        }
        None => panic!("resume not answered: {welcome}"),
    }
}

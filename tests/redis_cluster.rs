//! wscluster on a real Redis Cluster (`common::RedisCluster`: cluster-enabled
//! `redis-server` processes joined with `redis-cli --cluster create`).
//!
//! The core and failure tests also run against a cluster (`scripts/test.sh`
//! runs them again with `WSC_TEST_REDIS_CLUSTER=1`); this file holds what
//! only a cluster has: keys spread over primaries, and a primary failover.

mod common;

use std::collections::HashSet;
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

/// Add a message for `user` to `wsc:send`, retrying (fresh cluster
/// connection each time) while its slot has no primary.
fn xadd_retrying(rc: &RedisCluster, user: &str, payload: &str) -> String {
    wait_until("XADD accepted", Duration::from_secs(20), || {
        let mut c = rc.client().get_connection().map_err(|e| e.to_string())?;
        redis::cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("to")
            .arg(user)
            .arg("payload")
            .arg(payload)
            .query::<String>(&mut c)
            .map_err(|e| e.to_string())
    })
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
    let mut rc = RedisCluster::start(3, 1);
    let args = timed_args(&rc.seeds(), "200", "1000", &["--dev"]);
    let nodes: Vec<NodeProc> = (0..3)
        .map(|i| NodeProc::start(&format!("n{i}"), &args))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
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
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let id = xadd_retrying(&rc, u, "\"before\"");
        c.expect(
            "message before the failover",
            Duration::from_secs(10),
            is_msg(&id),
        )
        .await;
    }

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
        c.expect(
            &format!("{u}: message added during the failover"),
            Duration::from_secs(30),
            is_msg(id),
        )
        .await;
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
    for (u, c) in users.iter().zip(clients.iter_mut()) {
        let id = xadd_retrying(&rc, u, "\"after\"");
        c.expect(
            "message after the failover",
            Duration::from_secs(10),
            is_msg(&id),
        )
        .await;
    }
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

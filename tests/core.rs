//! Core behaviour (issue 2): every test runs a real redis-server, three real
//! nodes (child processes) and real WebSocket clients.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use redis::Commands;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// 1. Self-assigned ids and leases; /cluster lists every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_lease() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn();
    let ids: HashSet<String> = futures::future::join_all(nodes.iter().map(|n| n.node_id()))
        .await
        .into_iter()
        .collect();
    assert_eq!(ids.len(), 3, "three distinct ids: {ids:?}");
    for id in &ids {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id} is a uuid");
        let exists: bool = r.exists(format!("wsc:inbox:{{{id}}}")).unwrap();
        assert!(exists, "inbox of {id} exists");
    }
    let members: Vec<(String, f64)> = r.zrange_withscores("wsc:nodes", 0, -1).unwrap();
    assert_eq!(
        members.iter().map(|m| m.0.clone()).collect::<HashSet<_>>(),
        ids
    );
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut r).unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    for (_, score) in &members {
        let s = *score as u64;
        assert!(
            s > now_ms && s <= now_ms + 1000,
            "expiry {s} is Redis TIME + ttl ({now_ms})"
        );
    }
    // Every node's /cluster lists all three with their expiries (within a
    // heartbeat: the view is read at most once per heartbeat).
    for n in &nodes {
        let c = eventually("/cluster lists every node", T, || async {
            let c = n.cluster().await;
            (c["nodes"].as_array()?.len() == ids.len()).then_some(c)
        })
        .await;
        let listed: HashSet<String> = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                assert!(x["lease_expires_ms"].as_u64().unwrap() > now_ms - 1000);
                x["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(listed, ids);
    }
    // Leases are renewed: after a few heartbeats each expiry has moved on.
    let before: f64 = members[0].1;
    let id0 = members[0].0.clone();
    eventually("lease renewed", T, || {
        let mut r = redis.conn();
        let id0 = id0.clone();
        async move {
            let s: f64 = r.zscore("wsc:nodes", &id0).ok()?;
            (s > before + 300.0).then_some(())
        }
    })
    .await;
}

/// 2. Auth before the upgrade; welcome after registration; entry removed
/// on close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_auth_and_registration() {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    args.retain(|a| a != "--dev");
    let strict = NodeProc::start("strict", &args);
    strict.wait_ready().await;
    // No token, forged, expired, ?user without --dev: 401.
    assert_eq!(connect_status(&strict.ws_url("")).await, 401);
    assert_eq!(connect_status(&strict.ws_url("user=bob")).await, 401);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"bob","exp": 9999999999u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"wrong"),
    )
    .unwrap();
    assert_eq!(
        connect_status(&strict.ws_url(&format!("token={forged}"))).await,
        401
    );
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub":"bob","exp": 1000}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        connect_status(&strict.ws_url(&format!("token={expired}"))).await,
        401
    );
    // ?token= works, and so does Authorization: Bearer.
    let c = Client::token(&strict, "bob", None).await;
    assert_eq!(c.welcome["user"], "bob");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        strict.ws_url(""),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token("carol", None)).parse().unwrap(),
    );
    let (mut ws2, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    use futures::StreamExt;
    let w = ws2.next().await.unwrap().unwrap();
    assert!(w.to_text().unwrap().contains("\"carol\""));

    // Welcome is sent once registered: the hash already holds the conn.
    let mut r = redis.conn();
    let node = strict.node_id().await;
    let field: Option<String> = r.hget("wsc:user:{bob}", c.conn_id()).unwrap();
    assert_eq!(field.as_deref(), Some(node.as_str()));
    assert_eq!(c.node(), node);
    let conn_id = c.conn_id();
    c.close().await;
    eventually("conn removed on close", T, || {
        let mut r = redis.conn();
        let conn_id = conn_id.clone();
        async move {
            let f: Option<String> = r.hget("wsc:user:{bob}", &conn_id).ok()?;
            f.is_none().then_some(())
        }
    })
    .await;
    // --dev accepts ?user=.
    let (_redis2, nodes) = cluster(1).await;
    let d = Client::dev(&nodes[0], "dave").await;
    assert_eq!(d.welcome["user"], "dave");
}

/// 3 + 4. Routing through the streams, across nodes, to every device;
/// client sends get `sent`; routed entries leave the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_multi_device() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn();
    let mut devices = Vec::new();
    for n in &nodes {
        devices.push(Client::dev(n, "bob").await);
    }
    let mut alice = Client::dev(&nodes[0], "alice").await;
    // An app's XADD reaches every device with the same id.
    let id = xadd_to(&mut r, "bob", r#"{"hello":"world"}"#);
    for d in devices.iter_mut() {
        let m = d.expect("app message", T, is_msg(&id)).await;
        assert_eq!(m["payload"], json!({"hello":"world"}));
        assert_eq!(m["from"], Value::Null);
    }
    // A client send: `sent` with the ref once durable; `from` is the
    // authenticated user whatever the frame says.
    alice
        .send_json(json!({"type":"send","to":"bob","payload":[1,2],"ref":"r1","from":"mallory"}))
        .await;
    let sent = alice.expect("sent", T, |v| v["type"] == "sent").await;
    assert_eq!(sent["ref"], "r1");
    let sid = sent["id"].as_str().unwrap().to_owned();
    for d in devices.iter_mut() {
        let m = d.expect("client message", T, is_msg(&sid)).await;
        assert_eq!(m["from"], "alice");
        assert_eq!(m["payload"], json!([1, 2]));
    }
    // A frame many times the socket's read chunk (256 bytes) arrives whole.
    let big = "z".repeat(40_000);
    alice
        .send_json(json!({"type":"send","to":"bob","payload":{"big":big},"ref":"r2"}))
        .await;
    let sent = alice
        .expect("sent", T, |v| v["type"] == "sent" && v["ref"] == "r2")
        .await;
    let bid = sent["id"].as_str().unwrap().to_owned();
    for d in devices.iter_mut() {
        let m = d.expect("big client message", T, is_msg(&bid)).await;
        assert_eq!(m["payload"]["big"].as_str().map(str::len), Some(40_000));
    }
    // Routed entries leave <p>:send; delivered ones leave the inboxes once
    // the clients confirm reading them (their pong to the ping after the
    // messages, sent as a client reads on).
    for d in devices.iter_mut() {
        assert!(d.next_frame(Duration::from_millis(100)).await.is_none());
    }
    eventually("streams drained", T, || {
        let mut r = redis.conn();
        async move {
            let send: usize = r.xlen("wsc:send").ok()?;
            let ids: Vec<String> = r.zrange("wsc:nodes", 0, -1).ok()?;
            let mut inboxes = 0usize;
            for id in ids {
                let n: usize = r.xlen(format!("wsc:inbox:{{{id}}}")).ok()?;
                inboxes += n;
            }
            (send == 0 && inboxes == 0).then_some(())
        }
    })
    .await;
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("wsc:send")
        .arg("router")
        .query(&mut r)
        .unwrap();
    assert_eq!(
        pending[0],
        redis::Value::Int(0),
        "nothing pending in the router group"
    );
}

/// 5. Mailbox: kept while offline (capped), delivered in order on connect,
/// removed, never delivered twice; no race with a user who just connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox() {
    let (redis, nodes) = cluster_with(3, &["--mailbox-max", "5"]).await;
    let mut r = redis.conn();
    let ids: Vec<String> = (0..8)
        .map(|i| xadd_to(&mut r, "offline", &format!("{{\"n\":{i}}}")))
        .collect();
    eventually("mailboxed", T, || {
        let mut r = redis.conn();
        async move {
            let n: usize = r.xlen("wsc:mailbox:{offline}").ok()?;
            let send: usize = r.xlen("wsc:send").ok()?;
            (n == 5 && send == 0).then_some(())
        }
    })
    .await;
    // Capped at --mailbox-max, oldest dropped first.
    let mut c = Client::dev(&nodes[1], "offline").await;
    let got = c.messages(5, T).await;
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        got_ids,
        ids[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // Once read (the client's pong to the ping after the page), the
    // mailbox and its byte count are gone. Reading on answers the ping.
    let deadline = std::time::Instant::now() + T;
    loop {
        assert!(c.next_frame(Duration::from_millis(50)).await.is_none());
        let mut r = redis.conn_for("wsc:mailbox:{offline}");
        let n: usize = redis::cmd("EXISTS")
            .arg("wsc:mailbox:{offline}")
            .arg("wsc:mailbox-bytes:{offline}")
            .query(&mut r)
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mailbox removed once read"
        );
    }
    c.close().await;
    // Never twice: a new connection gets nothing old, only what is new.
    let mut c2 = Client::dev(&nodes[2], "offline").await;
    let fresh = xadd_to(&mut r, "offline", "\"new\"");
    let m = c2.next_frame(T).await.unwrap();
    assert_eq!(m["id"], fresh, "only the new message: {m}");
    // Expiry: a mailboxed message expires after --mailbox-ttl-s.
    let ttl: i64 = {
        c2.close().await;
        let id = xadd_to(&mut r, "offline", "1");
        eventually("mailboxed again", T, || {
            let mut r = redis.conn();
            async move {
                let n: usize = r.xlen("wsc:mailbox:{offline}").ok()?;
                (n >= 1).then_some(())
            }
        })
        .await;
        let _ = id;
        r.pttl("wsc:mailbox:{offline}").unwrap()
    };
    assert!(
        ttl > 86_000_000 && ttl <= 86_400_000,
        "mailbox expires with the ttl: {ttl}"
    );
}

/// 5b. Mailbox entries older than --mailbox-ttl-s are not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_expiry() {
    let (redis, nodes) = cluster_with(1, &["--mailbox-ttl-s", "1"]).await;
    let mut r = redis.conn();
    xadd_to(&mut r, "late", "\"old\"");
    eventually("mailboxed", T, || {
        let mut r = redis.conn();
        async move { (r.xlen::<_, usize>("wsc:mailbox:{late}").ok()? == 1).then_some(()) }
    })
    .await;
    // Wait until, by Redis's clock, the entry is older than the TTL.
    let added: u64 = {
        let v: redis::streams::StreamRangeReply = r.xrange_all("wsc:mailbox:{late}").unwrap();
        v.ids[0].id.split('-').next().unwrap().parse().unwrap()
    };
    eventually("mailbox entry past its ttl", T, || {
        let mut r = redis.conn();
        async move {
            let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut r).ok()?;
            (s * 1000 + us / 1000 > added + 1000).then_some(())
        }
    })
    .await;
    let mut c = Client::dev(&nodes[0], "late").await;
    assert!(
        c.next_frame(Duration::from_millis(500)).await.is_none(),
        "expired message not delivered"
    );
}

/// 6. Topics: subscribe/unsubscribe acks, token grants, fan-out to every
/// node, not kept for offline users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn();
    let mut subs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c = Client::token(n, &format!("s{i}"), Some(&["news/*", "exact"])).await;
        c.send_json(json!({"type":"subscribe","topic":"news/sport"}))
            .await;
        let ack = c
            .expect("subscribed", T, |v| v["type"] == "subscribed")
            .await;
        assert_eq!(ack["topic"], "news/sport");
        subs.push(c);
    }
    // Not allowed by the token: forbidden_topic; no claim: no topics.
    subs[0]
        .send_json(json!({"type":"subscribe","topic":"other","ref":"s1"}))
        .await;
    let e = subs[0]
        .expect("forbidden", T, |v| v["type"] == "error")
        .await;
    assert_eq!(e["code"], "forbidden_topic");
    assert_eq!(e["ref"], "s1", "the frame's ref, as for every error");
    let mut none = Client::token(&nodes[0], "nobody", None).await;
    none.send_json(json!({"type":"subscribe","topic":"exact"}))
        .await;
    assert_eq!(
        none.expect("forbidden", T, |v| v["type"] == "error").await["code"],
        "forbidden_topic"
    );

    let id: String = redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("topic")
        .arg("news/sport")
        .arg("payload")
        .arg("{\"goal\":1}")
        .query(&mut r)
        .unwrap();
    for c in subs.iter_mut() {
        let m = c.expect("topic message", T, is_msg(&id)).await;
        assert_eq!(m["topic"], "news/sport");
        assert_eq!(m["payload"], json!({"goal":1}));
    }
    // Unsubscribe: no more messages for that connection.
    subs[1]
        .send_json(json!({"type":"unsubscribe","topic":"news/sport"}))
        .await;
    subs[1]
        .expect("unsubscribed", T, |v| v["type"] == "unsubscribed")
        .await;
    let id2: String = redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("topic")
        .arg("news/sport")
        .arg("payload")
        .arg("2")
        .query(&mut r)
        .unwrap();
    subs[0]
        .expect("second topic message", T, is_msg(&id2))
        .await;
    subs[2]
        .expect("second topic message", T, is_msg(&id2))
        .await;
    assert!(
        subs[1]
            .next_frame(Duration::from_millis(500))
            .await
            .is_none(),
        "unsubscribed gets nothing"
    );
    // Not kept for offline users: no mailbox was made.
    let keys: Vec<String> = r.keys("wsc:mailbox:*").unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// 7. Order: 2,000 entries for one user arrive in order; one router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_and_single_router() {
    let (redis, nodes) = cluster(3).await;
    let mut r = redis.conn_for("wsc:send");
    let mut c = Client::dev(&nodes[2], "ordered").await;
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("to")
            .arg("ordered")
            .arg("payload")
            .arg(i.to_string());
    }
    let ids: Vec<String> = pipe.query(&mut r).unwrap();
    let got = c.messages(2000, Duration::from_secs(30)).await;
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        got_ids,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "in order, no duplicates"
    );
    let mut routers = 0;
    for n in &nodes {
        let v = n.cluster().await;
        if v["router"] == true {
            routers += 1;
            assert_eq!(v["shards"], json!([0]));
        }
    }
    assert_eq!(routers, 1, "exactly one node routes the send stream");
}

/// 8. Bad input: bad entries go to <p>:dead with a reason and routing goes
/// on; bad frames get error frames; an oversized frame closes with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() {
    let (redis, nodes) = cluster_with(
        3,
        &["--max-payload-bytes", "100", "--max-frame-bytes", "1000"],
    )
    .await;
    let mut r = redis.conn();
    let mut c = Client::dev(&nodes[1], "good").await;
    let big = format!("\"{}\"", "x".repeat(200));
    type Fields<'a> = Vec<(&'a [u8], &'a [u8])>;
    let cases: Vec<(Fields, &str)> = vec![
        (vec![(b"payload", b"1")], "no_target"),
        (
            vec![(b"to", b"a"), (b"topic", b"t"), (b"payload", b"1")],
            "both_targets",
        ),
        (vec![(b"to", b"bad user"), (b"payload", b"1")], "bad_user"),
        (
            vec![(b"topic", b"bad topic"), (b"payload", b"1")],
            "bad_topic",
        ),
        (vec![(b"to", b"good")], "no_payload"),
        (vec![(b"to", b"good"), (b"payload", b"{nope")], "bad_json"),
        (vec![(b"to", b"good"), (b"payload", b"NaN")], "bad_json"),
        (
            vec![(b"to", b"good"), (b"payload", big.as_bytes())],
            "too_large",
        ),
        (vec![(b"to", &[0xff, 0xfe]), (b"payload", b"1")], "not_utf8"),
    ];
    let mut added = Vec::new();
    for (fields, reason) in &cases {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("wsc:send").arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        let id: String = cmd.query(&mut r).unwrap();
        added.push((id, *reason));
    }
    let ok = xadd_to(&mut r, "good", "\"after the bad ones\"");
    c.expect("good message after bad ones", T, is_msg(&ok))
        .await;
    let dead: Vec<Value> = eventually("dead letters", T, || {
        let mut r = redis.conn();
        let n = cases.len();
        async move {
            let v: redis::streams::StreamRangeReply = r.xrange_all("wsc:dead").ok()?;
            (v.ids.len() == n).then(|| {
                v.ids
                    .iter()
                    .map(|e| {
                        let get = |k: &str| -> String {
                            e.get::<String>(k).unwrap_or_default()
                        };
                        json!({"reason": get("reason"), "stream": get("stream"), "id": get("id"), "entry": get("entry")})
                    })
                    .collect()
            })
        }
    })
    .await;
    for ((id, reason), d) in added.iter().zip(&dead) {
        assert_eq!(d["reason"], *reason, "{d}");
        assert_eq!(d["stream"], "wsc:send");
        assert_eq!(d["id"], *id);
        let entry: Value =
            serde_json::from_str(d["entry"].as_str().unwrap()).expect("entry is a JSON object");
        assert!(entry.is_object());
    }
    let nu: Value = serde_json::from_str(dead[8]["entry"].as_str().unwrap()).unwrap();
    assert_eq!(
        nu["to"], "\u{fffd}\u{fffd}",
        "non-UTF-8 bytes become U+FFFD"
    );
    // Deleted by the acker once the batch is handed off (asynchronously).
    eventually("bad entries leave the send stream too", T, || async {
        let n: usize = redis.conn_for("wsc:send").xlen("wsc:send").ok()?;
        (n == 0).then_some(())
    })
    .await;

    // Bad frames: error frames, the connection stays open.
    for (frame, code) in [
        ("{nope", "bad_json"),
        ("[1]", "bad_frame"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (
            r#"{"type":"send","to":"x y","payload":1,"ref":5}"#,
            "bad_frame",
        ),
        (
            r#"{"type":"send","to":"x","payload":"this payload is longer than one hundred bytes, which is the limit set for this test run, so it must be refused"}"#,
            "bad_frame",
        ),
    ] {
        c.send_text(frame).await;
        let e = c.expect("error frame", T, |v| v["type"] == "error").await;
        assert_eq!(e["code"], code, "{frame}");
        if frame.contains("\"ref\":5") {
            assert_eq!(e["ref"], 5);
        }
    }
    c.send_json(json!({"type":"ping"})).await;
    c.expect("pong", T, |v| v["type"] == "pong").await;
    // Over --max-frame-bytes: close 1009.
    c.send_text(&format!(
        "{{\"type\":\"ping\",\"x\":\"{}\"}}",
        "y".repeat(2000)
    ))
    .await;
    assert_eq!(c.close_code(T).await, Some(1009));
}

/// 9. HTTP: /api/send, health, readiness, metrics, cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_and_ops() {
    let (_redis, nodes) = cluster_with(3, &["--max-payload-bytes", "50"]).await;
    let mut c = Client::dev(&nodes[2], "api-user").await;
    let http = reqwest::Client::new();
    let post = |body: Value, key: &'static str| {
        http.post(nodes[0].http("/api/send"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let r = post(json!({"to":"api-user","payload":{"k":"v"}}), API_KEY)
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = c.expect("api message", T, is_msg(&id)).await;
    assert_eq!(m["payload"], json!({"k":"v"}));
    // `null` is JSON (§4: RFC 8259): a payload, not a missing one.
    let r = post(json!({"to":"api-user","payload":null}), API_KEY)
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "payload null");
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = c.expect("null payload", T, is_msg(&id)).await;
    assert!(m["payload"].is_null() && m.get("payload").is_some(), "{m}");
    assert_eq!(
        post(json!({"to":"api-user"}), API_KEY)
            .await
            .unwrap()
            .status(),
        400,
        "no payload"
    );
    assert_eq!(
        post(json!({"to":"api-user","payload":1}), "wrong")
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post(json!({"to":"bad user","payload":1}), API_KEY)
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(json!({"payload":1}), API_KEY).await.unwrap().status(),
        400
    );
    assert_eq!(
        post(json!({"to":"a","topic":"b","payload":1}), API_KEY)
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(json!({"to":"a"}), API_KEY).await.unwrap().status(),
        400
    );
    assert_eq!(
        post(json!({"to":"a","payload":"x".repeat(100)}), API_KEY)
            .await
            .unwrap()
            .status(),
        413
    );
    let r = http
        .post(nodes[0].http("/api/send"))
        .bearer_auth(API_KEY)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("bad JSON"));

    for n in &nodes {
        assert_eq!(
            reqwest::get(n.http("/healthz")).await.unwrap().status(),
            200
        );
        assert_eq!(reqwest::get(n.http("/readyz")).await.unwrap().status(), 200);
    }
    let text = reqwest::get(nodes[2].http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "wsc_connections 1",
        "wsc_messages_delivered_total 2", // {"k":"v"} and null
        "wsc_messages_routed_total",
        "wsc_messages_rerouted_total",
        "wsc_messages_mailboxed_total",
        "wsc_messages_dead_total",
        "wsc_nodes_reaped_total",
        "wsc_route_latency_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }
    // Counts are at most a heartbeat old (one read per heartbeat).
    eventually("/cluster counts the connection", T, || async {
        let v = nodes[1].cluster().await;
        let nodes = v["nodes"].as_array()?;
        let conns: u64 = nodes.iter().filter_map(|n| n["connections"].as_u64()).sum();
        (nodes.len() == 3 && conns == 1).then_some(())
    })
    .await;

    // Without --api-key the endpoint is 404.
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    let i = args.iter().position(|a| a == "--api-key").unwrap();
    args.drain(i..i + 2);
    let n = NodeProc::start("nokey", &args);
    n.wait_ready().await;
    let r = http
        .post(n.http("/api/send"))
        .bearer_auth(API_KEY)
        .json(&json!({"to":"a","payload":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// 10. Standalone: no Redis at all, the same gateway on the in-process bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone() {
    let n = NodeProc::start(
        "solo",
        &["--dev".into(), "--api-key".into(), API_KEY.into()],
    );
    n.wait_ready().await;
    let page = reqwest::get(n.http("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("wscluster"), "demo page");
    let mut a = Client::dev(&n, "ann").await;
    let mut b = Client::dev(&n, "ben").await;
    a.send_json(json!({"type":"send","to":"ben","payload":"hi","ref":1}))
        .await;
    let sent = a.expect("sent", T, |v| v["type"] == "sent").await;
    let m = b.expect("message", T, |v| v["type"] == "message").await;
    assert_eq!(m["id"], sent["id"]);
    assert_eq!(m["from"], "ann");
    // Offline user: mailbox, delivered on connect.
    a.send_json(json!({"type":"send","to":"cat","payload":"later"}))
        .await;
    a.expect("sent", T, |v| v["type"] == "sent").await;
    let mut c = Client::dev(&n, "cat").await;
    assert_eq!(
        c.expect("mailbox", T, |v| v["type"] == "message").await["payload"],
        "later"
    );
    let v = n.cluster().await;
    assert_eq!(v["nodes"][0]["lease_expires_ms"], Value::Null);
}

/// 11. Graceful leave: 503, close 1012, nothing lost, inbox and member
/// gone, exit 0 within drain + 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave() {
    let (redis, mut nodes) = cluster(3).await;
    let mut r = redis.conn();
    let leaving_id = nodes[0].node_id().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(Client::dev(&nodes[0], &format!("u{i}")).await);
    }
    let t0 = std::time::Instant::now();
    nodes[0].signal(libc::SIGTERM);
    eventually("readyz 503 while draining", T, || {
        let url = nodes[0].http("/readyz");
        async move {
            let s = reqwest::get(url).await.ok()?.status();
            (s == 503).then_some(())
        }
    })
    .await;
    // Messages sent during the drain are not lost.
    let ids: Vec<String> = (0..20)
        .map(|i| xadd_to(&mut r, &format!("u{i}"), "\"during drain\""))
        .collect();
    let mut got = Vec::new();
    for c in clients.iter_mut() {
        got.push(c.until_close(Duration::from_secs(5)).await);
    }
    let codes: Vec<Option<u16>> = got.iter().map(|g| g.1).collect();
    assert!(
        codes.iter().all(|c| *c == Some(1012)),
        "all closed with 1012: {codes:?}"
    );
    let status = nodes[0].wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status, Some(0), "exit 0");
    assert!(
        t0.elapsed() < Duration::from_millis(1000 + 1000 + 500),
        "within drain + 1 s: {:?}",
        t0.elapsed()
    );
    let member: Option<f64> = r.zscore("wsc:nodes", &leaving_id).unwrap();
    assert!(member.is_none(), "left <p>:nodes");
    let inbox: bool = r.exists(format!("wsc:inbox:{{{leaving_id}}}")).unwrap();
    assert!(!inbox, "inbox deleted");
    // Whatever a client did not get before the close reaches it when it
    // reconnects to a survivor (from the mailbox).
    let mut late = 0;
    for (i, id) in ids.iter().enumerate() {
        if got[i].0.contains(id) {
            continue;
        }
        late += 1;
        let mut c = Client::dev(&nodes[1 + i % 2], &format!("u{i}")).await;
        c.expect("message sent during the drain", T, is_msg(id))
            .await;
    }
    eprintln!(
        "graceful_leave: {} of 20 delivered before the close, {late} after reconnecting",
        20 - late
    );
    let _ = nodes.remove(0);
}

/// `--log-format json`: every line is a JSON object; the lines about a
/// node and a session carry its ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs() {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    args.extend(["--log-format".to_string(), "json".to_string()]);
    let n = NodeProc::start("json", &args);
    n.wait_ready().await;
    let c = Client::dev(&n, "logged").await;
    let id = n.node_id().await;
    c.close().await;
    let log = eventually("session end logged", T, || {
        let log = n.log();
        async move { log.contains("session ended").then_some(log) }
    })
    .await;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["node"] == id.as_str()),
        "a line names the node"
    );
    let end = lines
        .iter()
        .find(|l| l["fields"]["message"] == "session ended")
        .unwrap();
    assert_eq!(end["fields"]["user"], "logged");
    assert!(
        end["fields"]["conn"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
}

/// `--send-shards`: entries for user or topic x go to shard CRC32(x) mod K
/// (`<p>:send` for 0, `<p>:send:<n>` otherwise), ids are `n/`-prefixed for
/// n ≥ 1, and every shard has exactly one router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_shards() {
    const K: u32 = 3;
    let (redis, nodes) = cluster_with(3, &["--send-shards", "3"]).await;
    let mut r = redis.conn();
    // One user per shard.
    let mut users: Vec<Option<String>> = vec![None; K as usize];
    for i in 0.. {
        let u = format!("sh{i}");
        let shard = crc32fast::hash(u.as_bytes()) % K;
        users[shard as usize].get_or_insert(u);
        if users.iter().all(Option::is_some) {
            break;
        }
    }
    let users: Vec<String> = users.into_iter().map(Option::unwrap).collect();
    let mut sender = Client::dev(&nodes[0], "sender").await;
    for (shard, u) in users.iter().enumerate() {
        let mut c = Client::dev(&nodes[(shard + 1) % 3], u).await;
        let key = if shard == 0 {
            "wsc:send".to_string()
        } else {
            format!("wsc:send:{shard}")
        };
        let raw: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("to")
            .arg(u)
            .arg("payload")
            .arg("1")
            .query(&mut r)
            .unwrap();
        let id = if shard == 0 {
            raw
        } else {
            format!("{shard}/{raw}")
        };
        c.expect("app message on its shard", T, is_msg(&id)).await;
        // A client send lands on the recipient's shard too.
        sender
            .send_json(json!({"type":"send","to":u,"payload":2}))
            .await;
        let sent = sender.expect("sent", T, |v| v["type"] == "sent").await;
        let sid = sent["id"].as_str().unwrap().to_owned();
        if shard == 0 {
            assert!(!sid.contains('/'), "{sid}");
        } else {
            assert!(
                sid.starts_with(&format!("{shard}/")),
                "{sid} on shard {shard}"
            );
        }
        c.expect("client message on its shard", T, is_msg(&sid))
            .await;
    }
    // Each shard is routed by exactly one node, and the routers spread:
    // one shard per node once all three are up (the first node up took
    // every shard and hands the extra ones over).
    eventually("one shard per node", Duration::from_secs(15), || async {
        let mut per_node = Vec::new();
        let mut all = Vec::new();
        for n in &nodes {
            let shards: Vec<u64> = n.cluster().await["shards"]
                .as_array()?
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            per_node.push(shards.len());
            all.extend(shards);
        }
        all.sort();
        (per_node == [1, 1, 1] && all == [0, 1, 2]).then_some(())
    })
    .await;
    // Every shard still routes after the hand-overs.
    for (shard, u) in users.iter().enumerate() {
        let mut c = Client::dev(&nodes[shard % 3], u).await;
        sender
            .send_json(json!({"type":"send","to":u,"payload":3}))
            .await;
        let sent = sender.expect("sent", T, |v| v["type"] == "sent").await;
        let sid = sent["id"].as_str().unwrap().to_owned();
        c.expect("message after the routers spread", T, is_msg(&sid))
            .await;
    }
}

/// `/cluster` is right from the first `/readyz` 200 (contract §8): a lone
/// node routes every send shard by then, whatever its heartbeat. (It used
/// to be ready first and take the shards up to a heartbeat and a quarter
/// later: `router: false`, `shards: []` in between.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_routes_every_shard_once_ready() {
    let (_redis, nodes) = cluster_with(
        1,
        &[
            "--send-shards",
            "3",
            "--heartbeat-ms",
            "1000",
            "--lease-ttl-ms",
            "3000",
        ],
    )
    .await;
    let v: Value = reqwest::get(nodes[0].http("/cluster"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["router"], true, "{v}");
    assert_eq!(v["shards"], json!([0, 1, 2]), "{v}");
}

/// Bad configuration (contract §2): exit code 2 at once, nothing logged
/// before, and one line on stderr naming the setting — whether the value
/// came from a flag, from the environment, or is a file that is not a key.
/// Boolean variables take `1`/`0`/`yes`/`no` as well as `true`/`false`.
#[test]
fn bad_configuration_is_one_line_naming_the_setting() {
    let bad_pem = std::env::temp_dir().join(format!("wsc-bad-{}.pem", std::process::id()));
    std::fs::write(&bad_pem, "not a key\n").unwrap();
    let pem = bad_pem.to_string_lossy().into_owned();
    // (flags, environment, what the line must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--dev", "--heartbeat-ms", "abc"],
            vec![],
            "--heartbeat-ms",
        ),
        (
            vec!["--dev"],
            vec![("WSC_HEARTBEAT_MS", "abc")],
            "WSC_HEARTBEAT_MS",
        ),
        (
            vec!["--dev", "--heartbeat-ms", "1000", "--lease-ttl-ms", "2000"],
            vec![],
            "--lease-ttl-ms",
        ),
        (vec![], vec![], "--jwt-secret"),
        (
            vec!["--dev", "--redis-url", "http://nope"],
            vec![],
            "--redis-url",
        ),
        (vec!["--jwt-public-key", &pem], vec![], "--jwt-public-key"),
        (vec![], vec![("WSC_DEV", "maybe")], "WSC_DEV"),
        (vec!["--dev", "--log-format", "xml"], vec![], "--log-format"),
        // `WSC_DEV=1` is read as on: the error is about the heartbeat.
        (
            vec!["--heartbeat-ms", "5"],
            vec![("WSC_DEV", "1")],
            "--heartbeat-ms",
        ),
    ];
    for (args, env, names) in cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wscluster"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSC_")) {
            cmd.env_remove(k);
        }
        cmd.args(&args).envs(env.iter().copied());
        let out = cmd.output().expect("run wscluster");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let case = format!("{args:?} {env:?}");
        assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
        assert!(out.stdout.is_empty(), "{case}: logged before failing");
        assert_eq!(lines.len(), 1, "{case}: one line: {stderr}");
        assert!(lines[0].contains(names), "{case}: names {names}: {stderr}");
    }
    let _ = std::fs::remove_file(bad_pem);
}

/// A clean close right after a burst was read repeats nothing (contract
/// §7: duplicates only around failures): the user's other device gets no
/// message twice, and none lands in the mailbox. The client reads on for
/// 10 ms after its last message, as a library that reads its socket in
/// the background does (it answers the ping that followed the burst). (The
/// burst's tail used to wait up to 50 ms for its confirmation ping, and a
/// close within that window routed it again: to the other device, or to
/// the mailbox.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_after_a_burst_repeats_nothing() {
    let (redis, nodes) = cluster(2).await;
    // Pipelined adds: a connection to the send stream's own Redis node.
    let mut r = redis.conn_for("wsc:send");
    for round in 0..2 {
        // Two devices, on two nodes.
        let user = format!("burst{round}");
        let mut a = Client::dev(&nodes[0], &user).await;
        let mut b = Client::dev(&nodes[1], &user).await;
        send_many(&mut r, &user, 40, 10);
        a.messages(40, T).await;
        assert_eq!(a.next_frame(Duration::from_millis(10)).await, None);
        a.close().await;
        b.messages(40, T).await;
        let extra = b.next_frame(Duration::from_millis(1000)).await;
        assert!(
            extra.is_none(),
            "round {round}: the other device got {extra:?}"
        );
        // One device: nothing for the next connection.
        let user = format!("alone{round}");
        let mut c = Client::dev(&nodes[round % 2], &user).await;
        send_many(&mut r, &user, 40, 10);
        c.messages(40, T).await;
        assert_eq!(c.next_frame(Duration::from_millis(10)).await, None);
        c.close().await;
        let mut c = Client::dev(&nodes[(round + 1) % 2], &user).await;
        let extra = c.next_frame(Duration::from_millis(1000)).await;
        assert!(
            extra.is_none(),
            "round {round}: the next connection got {extra:?}"
        );
    }
}

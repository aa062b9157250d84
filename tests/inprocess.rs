//! The gateway in-process, against the in-process bus (a standalone node:
//! no Redis, no child process): `Node::build` and `Node::run` in this test's
//! runtime, real WebSocket clients, and a clean leave.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use wscluster::{Config, Node};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("ok");
        if let WsMessage::Text(t) = m {
            return serde_json::from_str(t.as_str()).expect("json");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_gateway_in_process() {
    let cfg = Config::try_parse_from([
        "wscluster",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--drain-ms",
        "200",
    ])
    .expect("config");
    let node = Node::build(cfg).await.expect("node");
    let addr = node.local_addr();
    let stop = CancellationToken::new();
    let running = tokio::spawn(node.run(stop.clone()));

    let (mut ann, _) = connect_async(format!("ws://{addr}/ws?user=ann"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ann).await["type"], "welcome");
    // Offline: kept in the in-process mailbox, delivered on connect.
    ann.send(WsMessage::Text(
        json!({"type": "send", "to": "bob", "payload": {"n": 1}, "ref": 1})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let sent = next_json(&mut ann).await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let (mut bob, _) = connect_async(format!("ws://{addr}/ws?user=bob"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut bob).await["type"], "welcome");
    let m = next_json(&mut bob).await;
    assert_eq!(
        (m["type"].as_str(), &m["payload"]),
        (Some("message"), &json!({"n": 1}))
    );
    assert_eq!(m["from"], "ann");
    assert_eq!(m["id"], sent["id"]);
    // Live.
    ann.send(WsMessage::Text(
        json!({"type": "send", "to": "bob", "payload": 2})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut bob).await["payload"], 2);
    // Bad input gets an error frame, and the connection stays.
    ann.send(WsMessage::Text("{".into())).await.unwrap();
    loop {
        let f = next_json(&mut ann).await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "bad_json");
            break;
        }
    }
    // Leave: sockets closed with 1012, `run` returns.
    stop.cancel();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), bob.next()).await {
            Ok(Some(Ok(WsMessage::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1012));
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("run returns after the drain")
        .expect("no panic")
        .expect("clean leave");
}

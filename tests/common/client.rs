//! Clients: tokens, and a WebSocket client that reads JSON frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::SECRET;
use super::node::NodeProc;

/// A HS256 token for `sub`, valid for an hour, with optional topics.
pub fn token(sub: &str, topics: Option<&[&str]>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(t) = topics {
        claims["topics"] = json!(t);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client.
pub struct Client {
    ws: Ws,
    pub welcome: Value,
    /// Frames read but not yet taken.
    pub backlog: Vec<Value>,
}

/// How a connection attempt ended before the upgrade.
pub async fn connect_status(url: &str) -> u16 {
    match connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("connect {url}: {e}"),
    }
}

impl Client {
    /// Connect with `?user=` (dev) and read the welcome.
    pub async fn dev(node: &NodeProc, user: &str) -> Client {
        Self::connect(&node.ws_url(&format!("user={user}"))).await
    }

    /// Connect with a token.
    pub async fn token(node: &NodeProc, user: &str, topics: Option<&[&str]>) -> Client {
        Self::connect(&node.ws_url(&format!("token={}", token(user, topics)))).await
    }

    pub async fn connect(url: &str) -> Client {
        match Self::try_connect(url).await {
            Ok(c) => c,
            Err((status, body)) => panic!("connect {url}: HTTP {status}: {body}"),
        }
    }

    /// Connect as a client that retries would: a 503 before the upgrade
    /// (contract §8: starting, rejoining, cut off from Redis) is tried
    /// again until `timeout`; any other refusal fails at once.
    pub async fn connect_retrying(url: &str, timeout: Duration) -> Client {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut refusals = Vec::new();
        loop {
            match Self::try_connect(url).await {
                Ok(c) => {
                    if !refusals.is_empty() {
                        eprintln!("connect {url}: upgraded after 503s: {refusals:?}");
                    }
                    return c;
                }
                Err((503, body)) if tokio::time::Instant::now() < deadline => {
                    refusals.push(body);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((status, body)) => {
                    panic!("connect {url}: HTTP {status}: {body}; 503s before: {refusals:?}")
                }
            }
        }
    }

    /// Connect and read the welcome; an HTTP refusal is its status and body.
    pub async fn try_connect(url: &str) -> Result<Client, (u16, String)> {
        let req = url.into_client_request().expect("request");
        let ws = match tokio::time::timeout(Duration::from_secs(10), connect_async(req))
            .await
            .expect("connect timeout")
        {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                let body = r
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default();
                return Err((r.status().as_u16(), body));
            }
            Err(e) => panic!("connect {url}: {e}"),
        };
        let mut c = Client {
            ws,
            welcome: Value::Null,
            backlog: Vec::new(),
        };
        let w = c
            .next_frame(Duration::from_secs(10))
            .await
            .expect("welcome");
        assert_eq!(w["type"], "welcome", "first frame must be welcome: {w}");
        c.welcome = w;
        Ok(c)
    }

    pub fn conn_id(&self) -> String {
        self.welcome["conn"].as_str().unwrap_or_default().to_owned()
    }

    pub fn node(&self) -> String {
        self.welcome["node"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(WsMessage::Text(s.to_owned().into()))
            .await
            .expect("ws send");
    }

    /// Next JSON frame, or None on close/timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Value> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(WsMessage::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Read until a frame matches `pred` (others are kept in the backlog).
    pub async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(msg) = tokio::time::timeout(left, self.ws.next())
                .await
                .ok()
                .flatten()
            else {
                panic!("no frame matching {what} within {timeout:?}; saw {seen:?}");
            };
            match msg {
                Ok(WsMessage::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
                    if pred(&v) {
                        self.backlog.extend(seen);
                        return v;
                    }
                    seen.push(v);
                }
                Ok(WsMessage::Close(c)) => {
                    panic!("closed ({c:?}) while waiting for {what}; saw {seen:?}")
                }
                Err(e) => panic!("error {e} while waiting for {what}; saw {seen:?}"),
                Ok(_) => {}
            }
        }
    }

    /// Collect `message` frames until `n` distinct ids are seen.
    pub async fn messages(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while ids.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(v) if v["type"] == "message" => {
                    ids.insert(v["id"].as_str().unwrap_or_default().to_owned());
                    out.push(v);
                }
                Some(_) => {}
                None => panic!("got {} of {n} messages: {:?}", ids.len(), out.last()),
            }
        }
        out
    }

    /// Read until the server closes: the message ids seen and the close code.
    pub async fn until_close(&mut self, timeout: Duration) -> (Vec<String>, Option<u16>) {
        let mut ids: Vec<String> = self
            .backlog
            .drain(..)
            .filter(|v| v["type"] == "message")
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return (ids, None);
            };
            match msg {
                Ok(WsMessage::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                        && v["type"] == "message"
                    {
                        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                }
                Ok(WsMessage::Close(f)) => return (ids, f.map(|f| f.code.into())),
                Err(_) => return (ids, None),
                Ok(_) => {}
            }
        }
    }

    /// Every JSON frame until the server closes (or the connection breaks,
    /// or `timeout` passes), backlog first, and the close code if a close
    /// frame came.
    pub async fn frames_until_close(&mut self, timeout: Duration) -> (Vec<Value>, Option<u16>) {
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return (frames, None);
            };
            match msg {
                Ok(WsMessage::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        frames.push(v);
                    }
                }
                Ok(WsMessage::Close(f)) => return (frames, f.map(|f| f.code.into())),
                Err(_) => return (frames, None),
                Ok(_) => {}
            }
        }
    }

    /// The close code the server sends next (None if none within timeout).
    pub async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        self.until_close(timeout).await.1
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Matches the `message` frame with entry id `id`.
pub fn is_msg(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["type"] == "message" && v["id"] == id
}

/// `s` percent-encoded for a query string.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

//! Test harness: a real `redis-server` per test, real nodes (child
//! processes of the built binary), real WebSocket clients, and an
//! `eventually` helper that polls with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";

/// Poll `f` until it returns `Some`, or panic after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wsc-test-{tag}-{}-{}",
        std::process::id(),
        uuid_like()
    ));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn uuid_like() -> String {
    format!("{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// A `redis-server` on a free port, no persistence; killed on drop, its log
/// printed if the test failed.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// Extra server arguments (password, TLS), kept for restarts.
    extra: Vec<String>,
    /// Port arguments and the URL to reach it, for a given port.
    url_for: fn(u16, &[String]) -> (Vec<String>, String),
}

fn plain(port: u16, _extra: &[String]) -> (Vec<String>, String) {
    (
        vec!["--port".into(), port.to_string()],
        format!("redis://127.0.0.1:{port}/"),
    )
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[], plain)
    }

    /// A redis-server with extra arguments; `url_for(port, extra)` gives
    /// the port arguments and the URL this process reaches it with.
    pub fn start_with(
        extra: &[String],
        url_for: fn(u16, &[String]) -> (Vec<String>, String),
    ) -> Redis {
        let dir = tmpdir("redis");
        for _ in 0..5 {
            let mut r = Redis {
                port: free_port(),
                child: None,
                dir: dir.clone(),
                extra: extra.to_vec(),
                url_for,
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("could not start redis-server with {extra:?} (is it installed?)");
    }

    /// Start the server on `self.port`; false if it did not come up.
    fn spawn(&mut self) -> bool {
        let log = self.dir.join("redis.log");
        let (port_args, _) = (self.url_for)(self.port, &self.extra);
        let child = Command::new("redis-server")
            .args(&port_args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().unwrap_or(".")])
            .args(["--logfile", log.to_str().unwrap_or("redis.log")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false; // port clash: try another
            }
            if redis::Client::open(self.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        (self.url_for)(self.port, &self.extra).1
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart on the same port, empty (no persistence).
    pub fn restart_empty(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}",
                self.port,
                self.log()
            );
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node: a child process of the built binary. Its log is captured and
/// printed if the test failed.
pub struct NodeProc {
    pub addr: String,
    child: Child,
    log: Arc<Mutex<String>>,
    pub name: String,
}

/// Node arguments without `--dev`, with the given heartbeat and lease TTL.
pub fn timed_args(
    redis_url: &str,
    heartbeat_ms: &str,
    ttl_ms: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = [
        "--redis-url",
        redis_url,
        "--heartbeat-ms",
        heartbeat_ms,
        "--lease-ttl-ms",
        ttl_ms,
        "--drain-ms",
        "1000",
        "--jwt-secret",
        SECRET,
        "--api-key",
        API_KEY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Fast timings for tests (heartbeat 200 ms, lease 1 s), with `--dev`.
pub fn fast_args(redis: &Redis) -> Vec<String> {
    timed_args(&redis.url(), "200", "1000", &["--dev"])
}

impl NodeProc {
    pub fn start(name: &str, args: &[String]) -> NodeProc {
        Self::start_env(name, args, &[])
    }

    pub fn start_env(name: &str, args: &[String], env: &[(&str, &str)]) -> NodeProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wscluster"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info,wscluster=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn wscluster");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&strip_ansi(&line));
                        l.push('\n');
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let found = log.lock().ok().and_then(|l| {
                // Text logs: `listen=ADDR`; JSON logs: `"listen":"ADDR"`.
                if let Some(rest) = l.split("listen=").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
                let rest = l.split("\"listen\":\"").nth(1)?;
                rest.split('"').next().map(str::to_owned)
            });
            if let Some(a) = found {
                break a;
            }
            if Instant::now() > deadline {
                // Not yet owned by a NodeProc: kill it here or it outlives the test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {name} did not start:\n{}", log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        NodeProc {
            addr,
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Wait for the process to exit; its status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let url = self.http("/readyz");
        eventually(
            &format!("{} ready", self.name),
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let r = reqwest::get(&url).await.ok()?;
                    (r.status() == 200).then_some(())
                }
            },
        )
        .await;
    }

    pub async fn cluster(&self) -> Value {
        reqwest::get(self.http("/cluster"))
            .await
            .expect("GET /cluster")
            .json()
            .await
            .expect("cluster json")
    }

    pub async fn node_id(&self) -> String {
        self.cluster().await["node"]
            .as_str()
            .expect("node id")
            .to_owned()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.name, self.log());
        }
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Start a redis-server and `n` nodes with fast timings, all ready.
pub async fn cluster(n: usize) -> (Redis, Vec<NodeProc>) {
    cluster_with(n, &[]).await
}

pub async fn cluster_with(n: usize, extra: &[&str]) -> (Redis, Vec<NodeProc>) {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    args.extend(extra.iter().map(|s| s.to_string()));
    let nodes: Vec<NodeProc> = (0..n)
        .map(|i| NodeProc::start(&format!("n{i}"), &args))
        .collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    (redis, nodes)
}

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
        let req = url.into_client_request().expect("request");
        let (ws, _) = tokio::time::timeout(Duration::from_secs(10), connect_async(req))
            .await
            .expect("connect timeout")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
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
        c
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

    /// The close code the server sends next (None if none within timeout).
    pub async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        self.until_close(timeout).await.1
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// `XADD <p>:send * to <user> payload <json>`.
pub fn xadd_to(r: &mut redis::Connection, user: &str, payload: &str) -> String {
    redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("to")
        .arg(user)
        .arg("payload")
        .arg(payload)
        .query(r)
        .expect("xadd")
}

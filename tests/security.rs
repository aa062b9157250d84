//! Security and abuse resistance (issue 6). Every test runs a real
//! redis-server, real nodes (child processes) and real WebSocket clients;
//! each fails if the defence it covers is removed.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use redis::Commands;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderName;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Node arguments with fast timings and without `--dev`.
fn strict_args(redis_url: &str, extra: &[&str]) -> Vec<String> {
    timed_args(redis_url, "200", "1000", extra)
}

async fn start_nodes(names_args: Vec<(&str, Vec<String>)>) -> Vec<NodeProc> {
    let nodes: Vec<NodeProc> = names_args
        .into_iter()
        .map(|(n, a)| NodeProc::start(n, &a))
        .collect();
    for n in &nodes {
        n.wait_ready().await;
    }
    nodes
}

/// An HS256 token with arbitrary claims.
fn hs(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now_s() + 3600})
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned token (`alg` as given, empty signature).
fn unsigned(alg: &str, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// HTTP status of an upgrade attempt with extra headers (101 = upgraded).
async fn status_with(url: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().expect("header value"),
        );
    }
    match tokio::time::timeout(T, connect_async(req))
        .await
        .expect("connect timeout")
    {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("connect {url}: {e}"),
    }
}

async fn token_status(node: &NodeProc, token: &str) -> u16 {
    connect_status(&node.ws_url(&format!("token={token}"))).await
}

type Wss = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

enum Next {
    Frame(Value),
    Closed(Option<u16>),
    Timeout,
}

/// A WebSocket client that keeps every frame it reads in `log` and never
/// panics on a failed write (the server may close first).
struct Conn {
    ws: Wss,
    user: String,
    conn_id: String,
    log: Vec<Value>,
    closed: Option<Option<u16>>,
}

impl Conn {
    async fn open(url: &str, headers: &[(&str, &str)]) -> Conn {
        let mut req = url.into_client_request().expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(T, connect_async(req))
            .await
            .expect("connect timeout")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = Conn {
            ws,
            user: String::new(),
            conn_id: String::new(),
            log: Vec::new(),
            closed: None,
        };
        match c.next(T).await {
            Next::Frame(w) if w["type"] == "welcome" => {
                c.user = w["user"].as_str().unwrap_or_default().to_owned();
                c.conn_id = w["conn"].as_str().unwrap_or_default().to_owned();
            }
            _ => panic!("no welcome from {url}"),
        }
        c
    }

    async fn token(node: &NodeProc, token: &str) -> Conn {
        Conn::open(&node.ws_url(&format!("token={token}")), &[]).await
    }

    async fn send(&mut self, v: &Value) -> bool {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    async fn next(&mut self, timeout: Duration) -> Next {
        if let Some(c) = self.closed {
            return Next::Closed(c);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(msg) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return Next::Timeout;
            };
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("frames are JSON");
                    self.log.push(v.clone());
                    return Next::Frame(v);
                }
                Some(Ok(WsMessage::Close(f))) => {
                    let code = f.map(|f| u16::from(f.code));
                    self.closed = Some(code);
                    return Next::Closed(code);
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return Next::Closed(None);
                }
            }
        }
    }

    /// Read until a frame matches `pred`.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(v) if pred(&v) => return v,
                Next::Frame(_) => {}
                Next::Closed(c) => panic!("{}: closed ({c:?}) waiting for {what}", self.user),
                Next::Timeout => panic!(
                    "{}: timed out waiting for {what}; log tail {:?}",
                    self.user,
                    self.log.iter().rev().take(5).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Read until closed; the close code.
    async fn until_close(&mut self, timeout: Duration) -> Option<Option<u16>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(_) => {}
                Next::Closed(c) => return Some(c),
                Next::Timeout => return None,
            }
        }
    }

    fn message_ids(&self) -> HashSet<String> {
        self.log
            .iter()
            .filter(|v| v["type"] == "message")
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wsc-sec-{tag}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- 1. tokens

/// HS256: accepted with the secret; forged, `alg: none`, expired, future
/// `nbf`, missing `exp` and bad `sub` refused with 401; `--jwt-leeway-s`
/// honoured both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_hs256() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "strict",
        strict_args(&redis.url(), &["--jwt-leeway-s", "60"]),
    )])
    .await;
    let n = &nodes[0];
    let s = SECRET.as_bytes();
    let now = now_s();

    // Accepted, by query and header.
    let c = Conn::token(n, &hs(s, &claims("alice"))).await;
    assert_eq!(c.user, "alice");
    let c2 = Conn::open(
        &n.ws_url(""),
        &[(
            "authorization",
            &format!("Bearer {}", hs(s, &claims("bob"))),
        )],
    )
    .await;
    assert_eq!(c2.user, "bob");

    let cases: Vec<(&str, String, u16)> = vec![
        ("no token", String::new(), 401),
        ("garbage", "not.a.jwt".into(), 401),
        ("forged", hs(b"other-secret", &claims("alice")), 401),
        ("alg none", unsigned("none", &claims("alice")), 401),
        ("alg None", unsigned("None", &claims("alice")), 401),
        (
            "alg HS256 unsigned",
            unsigned("HS256", &claims("alice")),
            401,
        ),
        (
            "HS384 with the right secret (algorithm pinned)",
            encode(
                &Header::new(Algorithm::HS384),
                &claims("alice"),
                &EncodingKey::from_secret(s),
            )
            .unwrap(),
            401,
        ),
        (
            "expired an hour ago",
            hs(s, &json!({"sub":"alice","exp": now - 3600})),
            401,
        ),
        (
            "expired 20 s ago, leeway 60",
            hs(s, &json!({"sub":"alice","exp": now - 20})),
            101,
        ),
        (
            "expired 120 s ago, leeway 60",
            hs(s, &json!({"sub":"alice","exp": now - 120})),
            401,
        ),
        ("no exp", hs(s, &json!({"sub":"alice"})), 401),
        (
            "exp as a string",
            hs(s, &json!({"sub":"alice","exp": "9999999999"})),
            401,
        ),
        (
            "nbf in an hour",
            hs(
                s,
                &json!({"sub":"alice","exp": now + 7200, "nbf": now + 3600}),
            ),
            401,
        ),
        (
            "nbf in 120 s, leeway 60",
            hs(
                s,
                &json!({"sub":"alice","exp": now + 7200, "nbf": now + 120}),
            ),
            401,
        ),
        (
            "nbf in 20 s, leeway 60",
            hs(
                s,
                &json!({"sub":"alice","exp": now + 7200, "nbf": now + 20}),
            ),
            101,
        ),
        ("no sub", hs(s, &json!({"exp": now + 3600})), 401),
        ("sub with a space", hs(s, &claims("a b")), 401),
        ("sub with a hash tag", hs(s, &claims("a}{b")), 401),
        ("sub with a star", hs(s, &claims("a*")), 401),
        ("sub with a slash", hs(s, &claims("a/b")), 401),
        ("sub with a newline", hs(s, &claims("a\nb")), 401),
        ("sub non-ASCII", hs(s, &claims("é")), 401),
        ("empty sub", hs(s, &claims("")), 401),
        ("sub of 129", hs(s, &claims(&"x".repeat(129))), 401),
        ("sub of 128", hs(s, &claims(&"x".repeat(128))), 101),
        (
            "sub as a number",
            hs(s, &json!({"sub": 5, "exp": now + 3600})),
            401,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, tok, want) in &cases {
        let got = if tok.is_empty() {
            connect_status(&n.ws_url("")).await
        } else {
            token_status(n, tok).await
        };
        if got != *want {
            wrong.push(format!("{what}: got {got}, want {want}"));
        }
    }
    // Without --dev, ?user= is no way in.
    let got = connect_status(&n.ws_url("user=alice")).await;
    if got != 401 {
        wrong.push(format!("?user without --dev: got {got}"));
    }
    assert!(wrong.is_empty(), "token checks: {wrong:#?}");
}

/// `--jwt-audience` / `--jwt-issuer`: checked when set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_audience_issuer() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "aud",
        strict_args(
            &redis.url(),
            &[
                "--jwt-audience",
                "wsc-app",
                "--jwt-issuer",
                "https://idp.example",
            ],
        ),
    )])
    .await;
    let n = &nodes[0];
    let s = SECRET.as_bytes();
    let exp = now_s() + 3600;
    let iss = "https://idp.example";
    let cases: Vec<(&str, Value, u16)> = vec![
        (
            "right aud and iss",
            json!({"sub":"a","exp":exp,"aud":"wsc-app","iss":iss}),
            101,
        ),
        (
            "aud as a list",
            json!({"sub":"a","exp":exp,"aud":["other","wsc-app"],"iss":iss}),
            101,
        ),
        (
            "wrong aud",
            json!({"sub":"a","exp":exp,"aud":"other","iss":iss}),
            401,
        ),
        (
            "wrong iss",
            json!({"sub":"a","exp":exp,"aud":"wsc-app","iss":"https://evil.example"}),
            401,
        ),
        ("no aud", json!({"sub":"a","exp":exp,"iss":iss}), 401),
        ("no iss", json!({"sub":"a","exp":exp,"aud":"wsc-app"}), 401),
        ("neither", json!({"sub":"a","exp":exp}), 401),
    ];
    let mut wrong = Vec::new();
    for (what, c, want) in &cases {
        let got = token_status(n, &hs(s, c)).await;
        if got != *want {
            wrong.push(format!("{what}: got {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "audience/issuer checks: {wrong:#?}");
}

/// RS256 and ES256 with `--jwt-public-key`: the right key and algorithm
/// are accepted; HS256 signed with the public key's bytes (algorithm
/// confusion), the other family, another key, a stronger variant of the
/// same family, `alg: none` and HS256 with `--jwt-secret` are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_public_keys() {
    let dir = tmp_dir("keys");
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa_pub.pem"],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa2.pem",
        ],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec_pub.pem"],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec2.pem",
        ],
    );
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap();
    let rsa2 = EncodingKey::from_rsa_pem(&read("rsa2.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&read("ec.pem")).unwrap();
    let ec2 = EncodingKey::from_ec_pem(&read("ec2.pem")).unwrap();
    let rsa_pub = read("rsa_pub.pem");
    let ec_pub = read("ec_pub.pem");

    let redis = Redis::start();
    let rsa_path = dir.join("rsa_pub.pem");
    let ec_path = dir.join("ec_pub.pem");
    let nodes = start_nodes(vec![
        (
            "rsa",
            strict_args(
                &redis.url(),
                &["--jwt-public-key", rsa_path.to_str().unwrap()],
            ),
        ),
        (
            "ec",
            strict_args(
                &redis.url(),
                &["--jwt-public-key", ec_path.to_str().unwrap()],
            ),
        ),
    ])
    .await;
    let sign = |alg: Algorithm, key: &EncodingKey, sub: &str| {
        encode(&Header::new(alg), &claims(sub), key).unwrap()
    };
    let (rn, en) = (&nodes[0], &nodes[1]);

    // Accepted.
    let c = Conn::token(rn, &sign(Algorithm::RS256, &rsa, "rsa-user")).await;
    assert_eq!(c.user, "rsa-user");
    let c = Conn::token(en, &sign(Algorithm::ES256, &ec, "ec-user")).await;
    assert_eq!(c.user, "ec-user");

    let cases: Vec<(&str, &NodeProc, String)> = vec![
        (
            "rsa node: HS256 with the public key as secret",
            rn,
            hs(&rsa_pub, &claims("x")),
        ),
        (
            "rsa node: HS256 with the trimmed public key as secret",
            rn,
            hs(
                String::from_utf8_lossy(&rsa_pub).trim().as_bytes(),
                &claims("x"),
            ),
        ),
        (
            "rsa node: HS256 with --jwt-secret",
            rn,
            hs(SECRET.as_bytes(), &claims("x")),
        ),
        ("rsa node: ES256", rn, sign(Algorithm::ES256, &ec, "x")),
        (
            "rsa node: RS256 by another key",
            rn,
            sign(Algorithm::RS256, &rsa2, "x"),
        ),
        (
            "rsa node: RS384 by the right key",
            rn,
            sign(Algorithm::RS384, &rsa, "x"),
        ),
        (
            "rsa node: PS256 by the right key",
            rn,
            sign(Algorithm::PS256, &rsa, "x"),
        ),
        ("rsa node: alg none", rn, unsigned("none", &claims("x"))),
        (
            "rsa node: RS256 unsigned",
            rn,
            unsigned("RS256", &claims("x")),
        ),
        (
            "rsa node: RS256 expired",
            rn,
            encode(
                &Header::new(Algorithm::RS256),
                &json!({"sub":"x","exp": now_s() - 3600}),
                &rsa,
            )
            .unwrap(),
        ),
        (
            "rsa node: RS256 bad sub",
            rn,
            sign(Algorithm::RS256, &rsa, "x}y"),
        ),
        (
            "ec node: HS256 with the public key as secret",
            en,
            hs(&ec_pub, &claims("x")),
        ),
        ("ec node: RS256", en, sign(Algorithm::RS256, &rsa, "x")),
        (
            "ec node: ES256 by another key",
            en,
            sign(Algorithm::ES256, &ec2, "x"),
        ),
        ("ec node: alg none", en, unsigned("none", &claims("x"))),
    ];
    let mut wrong = Vec::new();
    for (what, node, tok) in &cases {
        let got = token_status(node, tok).await;
        if got != 401 {
            wrong.push(format!("{what}: got {got}, want 401"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(wrong.is_empty(), "public-key checks: {wrong:#?}");
}

// ---------------------------------------------------------------- 2. origins

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins() {
    let redis = Redis::start();
    let u = redis.url();
    let nodes = start_nodes(vec![
        (
            "listed",
            strict_args(
                &u,
                &["--allowed-origins", "https://a.example, https://b.example/"],
            ),
        ),
        ("unset", strict_args(&u, &[])),
        ("unset-dev", strict_args(&u, &["--dev"])),
        ("star", strict_args(&u, &["--allowed-origins", "*"])),
    ])
    .await;
    let tok = token("o-user", None);
    let url = |n: &NodeProc| n.ws_url(&format!("token={tok}"));
    let o = |s: &'static str| vec![("origin", s)];
    let none: Vec<(&str, &str)> = vec![];
    type Case<'a> = (&'a str, &'a NodeProc, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case> = vec![
        ("listed: evil", &nodes[0], o("https://evil.example"), 403),
        ("listed: a", &nodes[0], o("https://a.example"), 101),
        (
            "listed: b (configured with a slash)",
            &nodes[0],
            o("https://b.example"),
            101,
        ),
        (
            "listed: a with a trailing slash",
            &nodes[0],
            o("https://a.example/"),
            101,
        ),
        (
            "listed: http instead of https",
            &nodes[0],
            o("http://a.example"),
            403,
        ),
        (
            "listed: a suffix",
            &nodes[0],
            o("https://a.example.evil.com"),
            403,
        ),
        (
            "listed: a prefix",
            &nodes[0],
            o("https://evila.example"),
            403,
        ),
        (
            "listed: other port",
            &nodes[0],
            o("https://a.example:8443"),
            403,
        ),
        ("listed: null", &nodes[0], o("null"), 403),
        ("listed: empty", &nodes[0], o(""), 403),
        ("listed: no Origin", &nodes[0], none.clone(), 101),
        ("unset: evil", &nodes[1], o("https://evil.example"), 403),
        ("unset: a", &nodes[1], o("https://a.example"), 403),
        ("unset: null", &nodes[1], o("null"), 403),
        ("unset: no Origin", &nodes[1], none.clone(), 101),
        ("unset+dev: evil", &nodes[2], o("https://evil.example"), 101),
        ("unset+dev: no Origin", &nodes[2], none.clone(), 101),
        ("star: evil", &nodes[3], o("https://evil.example"), 101),
        ("star: null", &nodes[3], o("null"), 101),
        ("star: no Origin", &nodes[3], none.clone(), 101),
    ];
    let mut wrong = Vec::new();
    for (what, n, h, want) in &cases {
        let got = status_with(&url(n), h).await;
        if got != *want {
            wrong.push(format!("{what}: got {got}, want {want}"));
        }
    }
    // The origin check comes before anything else: no token, bad origin: 403.
    let got = status_with(&nodes[0].ws_url(""), &o("https://evil.example")).await;
    if got != 403 {
        wrong.push(format!("listed: evil without a token: got {got}, want 403"));
    }
    assert!(wrong.is_empty(), "origin checks: {wrong:#?}");
}

// ---------------------------------------------------------------- 3. limits

/// `--max-connections 3`: the 4th gets 503; once one closes, room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_connections_per_node() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-connections", "3"]),
    )])
    .await;
    let n = &nodes[0];
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(Conn::token(n, &token(&format!("c{i}"), None)).await);
    }
    assert_eq!(token_status(n, &token("c3", None)).await, 503);
    assert_eq!(token_status(n, &token("c0", None)).await, 503);
    // A bad token is still 401, not a way to probe.
    assert_eq!(token_status(n, "x.y.z").await, 401);
    let first = held.remove(0);
    close(first).await;
    let c = eventually("room after a close", T, || async {
        let url = n.ws_url(&format!("token={}", token("c3", None)));
        match connect_async(url.as_str()).await {
            Ok((ws, _)) => Some(ws),
            Err(_) => None,
        }
    })
    .await;
    drop(c);
}

async fn close(mut c: Conn) {
    let _ = c.ws.close(None).await;
}

/// `--max-conns-per-user 2`, counted over the cluster: two connections on
/// two nodes, the third on a third node gets 429; other users unaffected;
/// after a close there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_connections_per_user_cluster() {
    let redis = Redis::start();
    let a = strict_args(&redis.url(), &["--max-conns-per-user", "2"]);
    let nodes = start_nodes(vec![("n0", a.clone()), ("n1", a.clone()), ("n2", a)]).await;
    let c0 = Conn::token(&nodes[0], &token("pu", None)).await;
    let _c1 = Conn::token(&nodes[1], &token("pu", None)).await;
    assert_eq!(token_status(&nodes[2], &token("pu", None)).await, 429);
    assert_eq!(token_status(&nodes[0], &token("pu", None)).await, 429);
    let _other = Conn::token(&nodes[2], &token("someone-else", None)).await;
    // Fields naming nodes that are not live — absent from `<p>:nodes`, or
    // with an expired lease — are not connections (§5), on any node,
    // whether it has seen those nodes or not.
    let mut r = redis.conn();
    let _: () = redis::cmd("ZADD")
        .arg("wsc:nodes")
        .arg(1)
        .arg("22222222-2222-4222-8222-222222222222")
        .query(&mut r)
        .unwrap();
    for (conn, node) in [
        ("ghost-1", "00000000-0000-4000-8000-000000000000"),
        ("ghost-2", "11111111-1111-4111-8111-111111111111"),
        ("ghost-3", "22222222-2222-4222-8222-222222222222"),
    ] {
        let _: () = r.hset("wsc:user:{pu2}", conn, node).unwrap();
    }
    let _pu2 = Conn::token(&nodes[1], &token("pu2", None)).await;
    close(c0).await;
    let c = eventually("room for pu after a close", T, || async {
        let url = nodes[2].ws_url(&format!("token={}", token("pu", None)));
        connect_async(url.as_str()).await.ok().map(|(ws, _)| ws)
    })
    .await;
    drop(c);
}

/// `--max-msgs-per-sec 5`: a burst of twice the rate is served, then
/// `rate_limited` error frames; a flood that goes on is closed with 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_rate() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-msgs-per-sec", "5"]),
    )])
    .await;
    let mut c = Conn::token(&nodes[0], &token("flood", None)).await;
    for _ in 0..15 {
        assert!(c.send(&json!({"type":"ping"})).await);
    }
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..15 {
        let v = c
            .wait_for("reply", |v| v["type"] == "pong" || v["type"] == "error")
            .await;
        if v["type"] == "pong" {
            pongs += 1;
        } else {
            assert_eq!(v["code"], "rate_limited", "{v}");
            limited += 1;
        }
    }
    assert!(
        (10..=12).contains(&pongs),
        "a burst of 2 x 5 served: {pongs} pongs"
    );
    assert!(limited >= 3, "the rest rate_limited: {limited}");
    // The flood goes on: closed with 1008.
    for _ in 0..60 {
        if !c.send(&json!({"type":"ping"})).await {
            break;
        }
    }
    let code = c.until_close(T).await;
    assert_eq!(code, Some(Some(1008)), "flood closed with 1008");
    // A client sending `send` frames is limited the same way (nothing added
    // past the burst).
    let mut s = Conn::token(&nodes[0], &token("flood2", None)).await;
    for k in 0..15 {
        s.send(&json!({"type":"send","to":"sink","payload":k,"ref":k}))
            .await;
    }
    let mut sent = 0;
    for _ in 0..15 {
        let v = s
            .wait_for("reply", |v| v["type"] == "sent" || v["type"] == "error")
            .await;
        if v["type"] == "sent" {
            sent += 1;
        }
    }
    assert!((10..=12).contains(&sent), "{sent} sends accepted");
    let mailboxed: usize = eventually("sends mailboxed", T, || {
        let mut r = redis.conn();
        async move {
            let n: usize = r.xlen("wsc:mailbox:{sink}").ok()?;
            (n >= sent).then_some(n)
        }
    })
    .await;
    assert_eq!(mailboxed, sent, "only accepted sends were added");
}

async fn sub(c: &mut Conn, kind: &str, t: &str) -> Value {
    c.send(&json!({"type": kind, "topic": t})).await;
    c.wait_for("topic reply", |v| {
        matches!(
            v["type"].as_str(),
            Some("subscribed" | "unsubscribed" | "error")
        )
    })
    .await
}

/// A steady flood at ten times `--max-msgs-per-sec` (a ping every 10 ms at
/// 10/s) gets some frames through between refusals and is still closed
/// with 1008 (contract §3: "rate limit exceeded repeatedly"), within
/// seconds. (Refusals counted only in a row never closed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_rate_steady_flood() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-msgs-per-sec", "10"]),
    )])
    .await;
    let mut c = Conn::token(&nodes[0], &token("steady", None)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < deadline {
        tick.tick().await;
        if !c.send(&json!({"type":"ping"})).await {
            break;
        }
    }
    let code = c.until_close(T).await;
    let pongs = c.log.iter().filter(|v| v["type"] == "pong").count();
    assert_eq!(
        code,
        Some(Some(1008)),
        "steady flood closed ({pongs} pongs)"
    );
}

/// The rate limit covers every data frame: a flood of binary frames (each
/// answered with an error frame) is limited and closed with 1008 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_rate_binary_frames() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-msgs-per-sec", "5"]),
    )])
    .await;
    let mut c = Conn::token(&nodes[0], &token("binflood", None)).await;
    for _ in 0..100 {
        if c.ws
            .send(WsMessage::Binary(vec![0u8; 16].into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let code = c.until_close(T).await;
    let limited = c.log.iter().filter(|v| v["code"] == "rate_limited").count();
    let answered = c.log.iter().filter(|v| v["code"] == "bad_frame").count();
    assert!(
        code == Some(Some(1008)) || limited > 0,
        "100 binary frames at 5/s: not rate limited ({answered} answered with bad_frame, {limited} rate_limited, close {code:?})"
    );
    assert_eq!(code, Some(Some(1008)), "binary flood closed with 1008");
}

/// `--max-connections 3` holds under a burst of concurrent upgrades too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_connections_per_node_concurrent() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-connections", "3"]),
    )])
    .await;
    let n = &nodes[0];
    let attempts = (0..20).map(|i| {
        let url = n.ws_url(&format!("token={}", token(&format!("burst{i}"), None)));
        async move { connect_async(url.as_str()).await.ok().map(|(ws, _)| ws) }
    });
    let held: Vec<Wss> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .flatten()
        .collect();
    let count = eventually("registry settles", T, || async {
        let m = reqwest::get(n.http("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        m.lines()
            .find_map(|l| l.strip_prefix("wsc_connections "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v as usize == held.len())
    })
    .await;
    assert!(
        held.len() <= 3,
        "20 concurrent upgrades with --max-connections 3: {} upgraded, wsc_connections {count}",
        held.len()
    );
}

/// `--max-topics-per-conn 2`: the third subscription gets `bad_frame`;
/// re-subscribing is fine; after an unsubscribe there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_topics_per_conn() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(&redis.url(), &["--max-topics-per-conn", "2"]),
    )])
    .await;
    let mut c = Conn::token(&nodes[0], &token("subber", Some(&["t/*"]))).await;
    assert_eq!(sub(&mut c, "subscribe", "t/1").await["type"], "subscribed");
    assert_eq!(sub(&mut c, "subscribe", "t/2").await["type"], "subscribed");
    let e = sub(&mut c, "subscribe", "t/3").await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_frame")),
        "{e}"
    );
    assert_eq!(sub(&mut c, "subscribe", "t/1").await["type"], "subscribed");
    assert_eq!(
        sub(&mut c, "unsubscribe", "t/1").await["type"],
        "unsubscribed"
    );
    assert_eq!(sub(&mut c, "subscribe", "t/3").await["type"], "subscribed");
    // The refused subscription really is not held: t/1 messages do not come.
    let mut r = redis.conn();
    for t in ["t/1", "t/2", "t/3"] {
        let _: String = redis::cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("topic")
            .arg(t)
            .arg("payload")
            .arg(json!({"t": t}).to_string())
            .query(&mut r)
            .unwrap();
    }
    c.wait_for("t/2", |v| v["type"] == "message" && v["topic"] == "t/2")
        .await;
    c.wait_for("t/3", |v| v["type"] == "message" && v["topic"] == "t/3")
        .await;
    assert!(
        !c.log
            .iter()
            .any(|v| v["type"] == "message" && v["topic"] == "t/1"),
        "unsubscribed topic delivered"
    );
}

/// `XADD` `n` messages of about 2 KB to `user`, pipelined; their ids.
/// Read `c` until every id of `want` not in `already` has come, or
/// `timeout`; the message ids it got.
async fn collect(
    c: &mut Conn,
    want: &[String],
    already: &HashSet<String>,
    timeout: Duration,
) -> HashSet<String> {
    let mut outstanding: HashSet<&str> = want
        .iter()
        .map(String::as_str)
        .filter(|i| !already.contains(*i))
        .collect();
    let mut got: HashSet<String> = HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !outstanding.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next(left).await {
            Next::Frame(v) => {
                if let Some(id) = v["id"].as_str() {
                    outstanding.remove(id);
                    got.insert(id.to_owned());
                }
            }
            Next::Closed(_) | Next::Timeout => break,
        }
    }
    // Keep memory flat: the frames are counted, not kept.
    c.log.clear();
    got
}

/// A client that never reads while many messages are routed to it is
/// closed by the server (1008 or 1013) and its undelivered messages are not
/// lost: every id reaches it at least once across that connection and the
/// next one. (Production lease timings, so this is about the outbox, not
/// about leases under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_closed_and_nothing_lost() {
    const N: usize = 20_000;
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        timed_args(
            &redis.url(),
            "1000",
            "5000",
            &[
                "--mailbox-max",
                "100000",
                "--mailbox-max-bytes",
                "100000000",
            ],
        ),
    )])
    .await;
    let mut slow = Conn::token(&nodes[0], &token("slow", None)).await;
    let slow_conn = slow.conn_id.clone();
    // From here `slow` does not read its socket.
    let mut r = redis.conn();
    let ids = send_many(&mut r, "slow", N, 2000);
    // The server closes it without the client reading: it leaves the
    // user's connections.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let mut closed_by_server = false;
    while Instant::now() < deadline {
        let f: Option<String> = r.hget("wsc:user:{slow}", &slow_conn).unwrap();
        if f.is_none() {
            closed_by_server = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = started.elapsed();
    let state_at_close = redis_state(&redis, &nodes[0], "slow").await;
    // Now read what it was sent, and how it was closed.
    let got_a = collect(&mut slow, &ids, &HashSet::new(), Duration::from_secs(20)).await;
    let code = slow.until_close(Duration::from_secs(10)).await;
    // Reconnect: the rest arrives. A reconnect in the middle of the flood
    // may overflow again (a burst larger than the outbox closes even a
    // fast reader with 1013, by contract): reconnect until every id came.
    let mut got_b: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reconnects = 0;
    while Instant::now() < deadline {
        let seen: HashSet<String> = got_a.union(&got_b).cloned().collect();
        if ids.iter().all(|i| seen.contains(i)) {
            break;
        }
        reconnects += 1;
        let mut again = Conn::token(&nodes[0], &token("slow", None)).await;
        let left = deadline.saturating_duration_since(Instant::now());
        got_b.extend(collect(&mut again, &ids, &seen, left).await);
    }
    eprintln!("slow consumer: the rest came over {reconnects} reconnect(s)");
    let missing = ids
        .iter()
        .filter(|i| !got_a.contains(*i) && !got_b.contains(*i))
        .count();
    let state = redis_state(&redis, &nodes[0], "slow").await;
    let lost_lease = nodes[0].log().contains("lease lost");
    let mut failures = Vec::new();
    if !closed_by_server {
        failures.push(format!(
            "the server did not close the non-reading connection within {waited:?} (it stayed registered; {state_at_close})"
        ));
    }
    if !matches!(code, Some(Some(1008 | 1013))) {
        failures.push(format!("closed with {code:?}, want 1008 or 1013"));
    }
    if got_a.len() >= N {
        failures.push("the slow connection got everything: no back-pressure".into());
    }
    if missing > 0 {
        failures.push(format!(
            "{missing} of {N} messages lost (first connection got {}, second {}; node lost its lease: {lost_lease}; {state})",
            got_a.len(),
            got_b.len()
        ));
    }
    assert!(failures.is_empty(), "slow consumer: {failures:#?}");
}

/// A user whose mailbox holds many messages (here: 15,000 of 2 KB, under
/// `--mailbox-max` and `--mailbox-max-bytes`) gets every one of them on
/// connect, with the fast test timings (a 30 MB mailbox must not cost the
/// node its lease, or if it does, nothing may be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_mailbox_not_lost_on_connect() {
    const N: usize = 15_000;
    let redis = Redis::start();
    let nodes = start_nodes(vec![(
        "n",
        strict_args(
            &redis.url(),
            &[
                "--mailbox-max",
                "100000",
                "--mailbox-max-bytes",
                "100000000",
            ],
        ),
    )])
    .await;
    let mut r = redis.conn();
    let ids = send_many(&mut r, "away", N, 2000);
    // Routed entries leave the send stream (duplicates around a router
    // change are allowed, so the mailbox may hold more than N).
    eventually("all mailboxed", Duration::from_secs(40), || {
        let mut r = redis.conn();
        async move {
            let n: usize = r.xlen("wsc:mailbox:{away}").ok()?;
            let send: usize = r.xlen("wsc:send").ok()?;
            (n >= N && send == 0).then_some(())
        }
    })
    .await;
    let mut c = Conn::token(&nodes[0], &token("away", None)).await;
    let got = collect(&mut c, &ids, &HashSet::new(), Duration::from_secs(15)).await;
    let missing = ids.iter().filter(|i| !got.contains(*i)).count();
    let log = nodes[0].log();
    let lease_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lease lost") || l.contains("re-registered"))
        .collect();
    assert_eq!(
        missing,
        0,
        "{missing} of {N} mailboxed messages lost on connect; node log: {lease_lines:#?}; {}",
        redis_state(&redis, &nodes[0], "away").await
    );
}

/// Where messages are, for failure reports.
async fn redis_state(redis: &Redis, node: &NodeProc, user: &str) -> String {
    let mut r = redis.conn();
    let send: usize = r.xlen("wsc:send").unwrap_or(0);
    let mailbox: usize = r.xlen(format!("wsc:mailbox:{{{user}}}")).unwrap_or(0);
    let dead: usize = r.xlen("wsc:dead").unwrap_or(0);
    let conns: Vec<(String, String)> = r
        .hgetall(format!("wsc:user:{{{user}}}"))
        .unwrap_or_default();
    let ids: Vec<String> = r.zrange("wsc:nodes", 0, -1).unwrap_or_default();
    let inboxes: Vec<usize> = ids
        .iter()
        .map(|id| r.xlen(format!("wsc:inbox:{{{id}}}")).unwrap_or(0))
        .collect();
    let metrics = match reqwest::get(node.http("/metrics")).await {
        Ok(m) => m.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let m: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("wsc_") && !l.contains("bucket"))
        .collect();
    format!(
        "send={send} mailbox={mailbox} dead={dead} user_conns={} inboxes={inboxes:?} metrics={m:?}",
        conns.len()
    )
}

// ---------------------------------------------------------------- 4. hostile input

/// An oversized payload in the send stream goes to `<p>:dead` (too_large)
/// and never reaches the client; routing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_dead_lettered() {
    let redis = Redis::start();
    let nodes = start_nodes(vec![
        (
            "n0",
            strict_args(&redis.url(), &["--max-payload-bytes", "1000"]),
        ),
        (
            "n1",
            strict_args(&redis.url(), &["--max-payload-bytes", "1000"]),
        ),
    ])
    .await;
    let mut c = Conn::token(&nodes[1], &token("victim", Some(&["big"]))).await;
    c.send(&json!({"type":"subscribe","topic":"big"})).await;
    c.wait_for("subscribed", |v| v["type"] == "subscribed")
        .await;
    let mut r = redis.conn();
    let big = json!({"x": "y".repeat(5000)}).to_string();
    let just_over = format!("\"{}\"", "z".repeat(999)); // 1001 bytes
    let at_limit = format!("\"{}\"", "z".repeat(998)); // 1000 bytes
    let add = |r: &mut TestConn, k: &str, t: &str, p: &str| -> String {
        redis::cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg(k)
            .arg(t)
            .arg("payload")
            .arg(p)
            .query(r)
            .unwrap()
    };
    let bad1 = add(&mut r, "to", "victim", &big);
    let bad2 = add(&mut r, "to", "victim", &just_over);
    let bad3 = add(&mut r, "topic", "big", &big);
    let ok = add(&mut r, "to", "victim", &at_limit);
    let m = c
        .wait_for("the message at the limit", |v| v["id"] == ok)
        .await;
    assert_eq!(m["payload"].as_str().map(str::len), Some(998));
    let marker = add(&mut r, "topic", "big", "\"end\"");
    c.wait_for("topic marker", |v| v["id"] == marker).await;
    for bad in [&bad1, &bad2, &bad3] {
        assert!(
            !c.log.iter().any(|v| v["id"] == **bad),
            "oversized {bad} reached the client"
        );
    }
    assert!(
        !c.log.iter().any(|v| v.to_string().len() > 2500),
        "no frame carries an oversized payload"
    );
    let dead: Vec<(String, String)> = eventually("dead letters", T, || {
        let mut r = redis.conn();
        async move {
            let v: redis::streams::StreamRangeReply = r.xrange_all("wsc:dead").ok()?;
            let d: Vec<(String, String)> = v
                .ids
                .iter()
                .map(|e| {
                    (
                        e.get::<String>("id").unwrap_or_default(),
                        e.get::<String>("reason").unwrap_or_default(),
                    )
                })
                .collect();
            (d.len() >= 3).then_some(d)
        }
    })
    .await;
    for bad in [&bad1, &bad2, &bad3] {
        assert!(
            dead.contains(&(bad.to_string(), "too_large".to_owned())),
            "{bad} dead-lettered as too_large: {dead:?}"
        );
    }
    // Not in any mailbox or inbox either.
    let keys: Vec<String> = r.keys("wsc:mailbox:*").unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // A client frame and the HTTP API refuse it too.
    c.send(&json!({"type":"send","to":"victim","payload": {"x": "y".repeat(5000)},"ref":"big"}))
        .await;
    let e = c.wait_for("refusal", |v| v["ref"] == "big").await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    let resp = reqwest::Client::new()
        .post(nodes[0].http("/api/send"))
        .bearer_auth(API_KEY)
        .json(&json!({"to":"victim","payload":{"x":"y".repeat(5000)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

// ---------------------------------------------------------------- 5. isolation

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What user `i`'s token allows (None: no `topics` claim).
fn grants(i: usize) -> Option<Vec<String>> {
    if i % 4 == 3 {
        None
    } else {
        Some(vec![format!("room{}", i % 5), format!("grp{}/*", i % 3)])
    }
}

/// The contract's grant rule, written here independently.
fn allowed(g: &Option<Vec<String>>, t: &str) -> bool {
    g.as_ref().is_some_and(|l| {
        l.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => t.starts_with(prefix),
            None => p == t,
        })
    })
}

/// 30 users on 3 nodes, tokens with different `topics` claims, random
/// traffic (app XADDs, client sends, topic publishes to allowed and
/// forbidden topics): every client receives only messages addressed to its
/// own user or to topics its token allows, and every direct message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_many_users() {
    const USERS: usize = 30;
    let redis = Redis::start();
    let a = strict_args(&redis.url(), &[]);
    let nodes = start_nodes(vec![("n0", a.clone()), ("n1", a.clone()), ("n2", a)]).await;
    let universe: Vec<String> = (0..6)
        .map(|i| format!("room{i}"))
        .chain((0..4).map(|i| format!("grp{i}/a")))
        .chain(["grp0/b".to_owned(), "grp1".to_owned(), "secret".to_owned()])
        .collect();
    let user = |i: usize| format!("u{i}");

    // Connect and subscribe: to every topic of the universe; the token
    // decides.
    let mut clients: Vec<Conn> = Vec::new();
    for i in 0..USERS {
        let g = grants(i);
        let refs: Option<Vec<&str>> = g.as_ref().map(|v| v.iter().map(String::as_str).collect());
        let tok = token(&user(i), refs.as_deref());
        clients.push(Conn::token(&nodes[i % 3], &tok).await);
    }
    let mut subscribed: Vec<HashSet<String>> = vec![HashSet::new(); USERS];
    for (i, c) in clients.iter_mut().enumerate() {
        for t in &universe {
            c.send(&json!({"type":"subscribe","topic":t})).await;
        }
        for _ in &universe {
            let v = c
                .wait_for("subscribe reply", |v| {
                    v["type"] == "subscribed" || v["type"] == "error"
                })
                .await;
            if v["type"] == "subscribed" {
                subscribed[i].insert(v["topic"].as_str().unwrap().to_owned());
            } else {
                assert_eq!(v["code"], "forbidden_topic", "{v}");
            }
        }
        let want: HashSet<String> = universe
            .iter()
            .filter(|t| allowed(&grants(i), t))
            .cloned()
            .collect();
        assert_eq!(subscribed[i], want, "u{i} holds exactly its allowed topics");
        // Hostile recipients are refused before reaching any key.
        for bad in ["u1}", "{u1}", "u 1", "*", "u1\r\nDEL x", ""] {
            c.send(&json!({"type":"send","to":bad,"payload":1,"ref":"bad"}))
                .await;
            let e = c.wait_for("refusal", |v| v["ref"] == "bad").await;
            assert_eq!(e["code"], "bad_frame", "{bad:?}: {e}");
        }
    }

    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut expected: Vec<HashSet<String>> = vec![HashSet::new(); USERS];
    // Client sends, `from` spoofed in the frame.
    let mut pending_refs: Vec<Vec<(String, usize)>> = vec![Vec::new(); USERS];
    for k in 0..150 {
        let s = rng.below(USERS);
        let to = rng.below(USERS);
        let r = format!("r{k}");
        clients[s]
            .send(
                &json!({"type":"send","to":user(to),"from":user((s + 1) % USERS),
                "payload":{"to":user(to),"from":user(s),"k":k},"ref":r}),
            )
            .await;
        pending_refs[s].push((r, to));
    }
    for (s, refs) in pending_refs.into_iter().enumerate() {
        for (r, to) in refs {
            let v = clients[s]
                .wait_for("sent", |v| v["type"] == "sent" && v["ref"] == r.as_str())
                .await;
            expected[to].insert(v["id"].as_str().unwrap().to_owned());
        }
    }
    // App traffic: direct messages and topic publishes, pipelined.
    let mut r = redis.conn();
    let mut pipe = redis::pipe();
    let mut plan: Vec<Option<usize>> = Vec::new();
    for k in 0..600 {
        if rng.below(3) == 0 {
            let t = &universe[rng.below(universe.len())];
            pipe.cmd("XADD")
                .arg("wsc:send")
                .arg("*")
                .arg("topic")
                .arg(t)
                .arg("payload")
                .arg(json!({"topic": t, "k": k}).to_string());
            plan.push(None);
        } else {
            let to = rng.below(USERS);
            pipe.cmd("XADD")
                .arg("wsc:send")
                .arg("*")
                .arg("to")
                .arg(user(to))
                .arg("payload")
                .arg(json!({"to": user(to), "k": k}).to_string());
            plan.push(Some(to));
        }
    }
    let added: Vec<String> = pipe.query(&mut r).unwrap();
    for (id, to) in added.iter().zip(&plan) {
        if let Some(to) = to {
            expected[*to].insert(id.clone());
        }
    }
    // End markers: one per topic (the topic stream is read in order, so a
    // subscriber that has the marker has every earlier message of it) and
    // one per user.
    let mut pipe = redis::pipe();
    for t in &universe {
        pipe.cmd("XADD")
            .arg("wsc:send")
            .arg("*")
            .arg("topic")
            .arg(t)
            .arg("payload")
            .arg(json!({"topic": t, "end": true}).to_string());
    }
    let _: Vec<String> = pipe.query(&mut r).unwrap();

    // Read every client until it has all its direct messages and the end
    // marker of every topic it holds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reads = clients.iter_mut().enumerate().map(|(i, c)| {
        let want = expected[i].clone();
        let subs = subscribed[i].clone();
        async move {
            loop {
                let ids = c.message_ids();
                let ends: HashSet<String> = c
                    .log
                    .iter()
                    .filter(|v| v["payload"]["end"] == true)
                    .map(|v| v["topic"].as_str().unwrap_or_default().to_owned())
                    .collect();
                if want.is_subset(&ids) && subs.is_subset(&ends) {
                    // A last look for anything that trails.
                    let _ = c.next(Duration::from_millis(300)).await;
                    return;
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match c.next(left).await {
                    Next::Frame(_) => {}
                    Next::Closed(code) => panic!("u{i} closed ({code:?})"),
                    Next::Timeout => return,
                }
            }
        }
    });
    futures::future::join_all(reads).await;

    let mut violations = Vec::new();
    let mut missing = 0usize;
    for (i, c) in clients.iter().enumerate() {
        let me = user(i);
        for v in c.log.iter().filter(|v| v["type"] == "message") {
            match v["topic"].as_str() {
                Some(t) => {
                    if !subscribed[i].contains(t)
                        || !allowed(&grants(i), t)
                        || v["payload"]["topic"] != t
                    {
                        violations.push(format!("{me} got topic message {v}"));
                    }
                }
                None => {
                    if v["payload"]["to"] != me.as_str() {
                        violations.push(format!("{me} got {v}"));
                    }
                    if let Some(f) = v["payload"].get("from")
                        && v["from"] != *f
                    {
                        violations.push(format!("{me}: spoofed or wrong from in {v}"));
                    }
                    if v["payload"].get("from").is_none() && !v["from"].is_null() {
                        violations.push(format!("{me}: app message with a from: {v}"));
                    }
                }
            }
        }
        let ids = c.message_ids();
        missing += expected[i].difference(&ids).count();
        let ends: HashSet<&str> = c
            .log
            .iter()
            .filter(|v| v["payload"]["end"] == true)
            .filter_map(|v| v["topic"].as_str())
            .collect();
        for t in &subscribed[i] {
            if !ends.contains(t.as_str()) {
                violations.push(format!("{me} missed the end marker of {t}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "isolation violations: {violations:#?}"
    );
    assert_eq!(missing, 0, "direct messages missing");
    let total: usize = expected.iter().map(HashSet::len).sum();
    assert!(total >= 500, "traffic was generated: {total}");
}

// ---------------------------------------------------------------- 6. Redis credentials

const PW: &str = "secretpw";
const JWT_SECRET: &str = "jwt-secret-Zq8v1x";
const API_SECRET: &str = "api-key-Kp3m9w";

/// Password in the URL works end to end; the password, the JWT secret and
/// the API key never appear in a node's log (text or JSON, with debug
/// logging, through refusals and a wrong password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_and_no_secrets_in_logs() {
    let dir = tmp_dir("pw");
    let redis = Redis::start_with(&["--requirepass".into(), PW.into()], |p, _| {
        (
            vec!["--port".into(), p.to_string()],
            format!("redis://:{PW}@127.0.0.1:{p}/"),
        )
    });
    let url = format!("redis://:{PW}@127.0.0.1:{}/", redis.port);
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--redis-url",
            &url,
            "--heartbeat-ms",
            "200",
            "--lease-ttl-ms",
            "1000",
            "--jwt-secret",
            JWT_SECRET,
            "--api-key",
            API_SECRET,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let n0 = NodeProc::start("pw0", &args(&[]));
    let n1 = NodeProc::start("pw1", &args(&["--log-format", "json"]));
    // Secrets by environment too.
    let n2 = NodeProc::start_env(
        "pw2",
        &[
            "--heartbeat-ms".into(),
            "200".into(),
            "--lease-ttl-ms".into(),
            "1000".into(),
        ],
        &[
            ("WSC_REDIS_URL", url.as_str()),
            ("WSC_JWT_SECRET", JWT_SECRET),
            ("WSC_API_KEY", API_SECRET),
        ],
    );
    // A node with a wrong password: it keeps retrying and logging.
    let bad_url = format!("redis://:wrong-{PW}@127.0.0.1:{}/", redis.port);
    let bad = NodeProc::start(
        "badpw",
        &[
            "--redis-url".into(),
            bad_url,
            "--jwt-secret".into(),
            JWT_SECRET.into(),
        ],
    );
    for n in [&n0, &n1, &n2] {
        n.wait_ready().await;
    }
    let tok = |u: &str| hs(JWT_SECRET.as_bytes(), &claims(u));
    let mut a = Conn::token(&n0, &tok("pa")).await;
    let mut b = Conn::token(&n1, &tok("pb")).await;
    let mut c = Conn::token(&n2, &tok("pc")).await;
    // App XADD with the password.
    let mut r = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let id = xadd_to(&mut r, "pa", "{\"via\":\"xadd\"}");
    a.wait_for("xadd message", |v| v["id"] == id).await;
    // Client send across nodes.
    b.send(&json!({"type":"send","to":"pc","payload":"hi","ref":1}))
        .await;
    let sent = b.wait_for("sent", |v| v["type"] == "sent").await;
    c.wait_for("client message", |v| v["id"] == sent["id"])
        .await;
    // HTTP API with the key; a wrong key and a wrong token are refused (and
    // logged, maybe).
    let http = reqwest::Client::new();
    let resp = http
        .post(n2.http("/api/send"))
        .bearer_auth(API_SECRET)
        .json(&json!({"to":"pb","payload":{"via":"api"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id: Value = resp.json().await.unwrap();
    b.wait_for("api message", |v| v["id"] == id["id"]).await;
    let resp = http
        .post(n0.http("/api/send"))
        .bearer_auth(format!("{API_SECRET}x"))
        .json(&json!({"to":"pb","payload":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    for n in [&n0, &n1, &n2] {
        let forged = hs(format!("{JWT_SECRET}x").as_bytes(), &claims("pa"));
        assert_eq!(token_status(n, &forged).await, 401);
        // Ops endpoints do not show secrets either.
        for path in ["/cluster", "/metrics", "/readyz"] {
            let body = reqwest::get(n.http(path))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for s in [PW, JWT_SECRET, API_SECRET] {
                assert!(!body.contains(s), "{path} of {} shows {s}", n.name);
            }
        }
    }
    // The wrong-password node has logged its failure at least once.
    // ... with the URL redacted (so the checks below are not vacuous).
    eventually("bad node logs its redis failure", T, || async {
        let log = bad.log();
        (log.contains(":***@") && log.contains("WARN")).then_some(())
    })
    .await;
    assert_eq!(
        reqwest::get(bad.http("/readyz")).await.unwrap().status(),
        503
    );
    for n in [&n0, &n1, &n2, &bad] {
        let log = n.log();
        assert!(!log.is_empty());
        for s in [PW, JWT_SECRET, API_SECRET] {
            assert!(
                !log.contains(s),
                "node {} logs a secret ({s}):\n{}",
                n.name,
                log.lines()
                    .filter(|l| l.contains(s))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    drop((n0, n1, n2, bad));
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rediss://`: Redis listening on TLS only; nodes route over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tmp_dir("tls");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=wsc-test-ca",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
        ],
    );
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let extra: Vec<String> = [
        "--tls-cert-file",
        &p("server.crt"),
        "--tls-key-file",
        &p("server.key"),
        "--tls-ca-cert-file",
        &p("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let redis = Redis::start_with(&extra, |port, _| {
        (
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
            ],
            format!("rediss://127.0.0.1:{port}/#insecure"),
        )
    });
    let url = format!("rediss://127.0.0.1:{}/#insecure", redis.port);
    let a = strict_args(&url, &[]);
    let nodes = start_nodes(vec![("t0", a.clone()), ("t1", a)]).await;
    let mut x = Conn::token(&nodes[0], &token("tx", None)).await;
    let mut y = Conn::token(&nodes[1], &token("ty", None)).await;
    let mut r = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let id = xadd_to(&mut r, "ty", "{\"over\":\"tls\"}");
    y.wait_for("message over TLS", |v| v["id"] == id).await;
    x.send(&json!({"type":"send","to":"ty","payload":2,"ref":1}))
        .await;
    let sent = x.wait_for("sent", |v| v["type"] == "sent").await;
    y.wait_for("client message over TLS", |v| v["id"] == sent["id"])
        .await;
    // Both nodes hold leases in the TLS-only Redis.
    let members: Vec<String> = r.zrange("wsc:nodes", 0, -1).unwrap();
    assert_eq!(members.len(), 2, "{members:?}");
    drop(nodes);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

//! `wsc-lb`: a tiny round-robin TCP reverse proxy for local trials, so a
//! demo or a test reaches a cluster through one URL, as it would behind a
//! real load balancer.
//!
//! ```text
//! wsc-lb [--control] LISTEN_ADDR BACKEND_ADDR...
//! wsc-lb 127.0.0.1:8080 127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083
//! ```
//!
//! Each accepted connection goes to the next backend in turn; a backend that
//! refuses (or does not answer within a second) is skipped for that
//! connection. No health checks, no stickiness, no TLS: bytes are copied
//! both ways until either side closes. It prints `wsc-lb listening on ADDR`
//! once bound.
//!
//! With `--control` the backends can change while it runs (a rolling
//! upgrade): it reads lines `add ADDR` and `remove ADDR` on standard input
//! and answers each with `wsc-lb backends ADDR...` (the list now). A removed
//! backend gets no new connection; those it has are left alone, as a real
//! load balancer draining a target does. With `--control` the list may
//! start empty; without it, standard input is not read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

type Backends = Arc<RwLock<Vec<String>>>;

async fn connect_any(backends: &Backends, next: &AtomicUsize) -> Option<(TcpStream, String)> {
    let list = backends.read().map(|b| b.clone()).unwrap_or_default();
    let start = next.fetch_add(1, Ordering::Relaxed);
    for i in 0..list.len() {
        let b = &list[(start + i) % list.len()];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(b)).await {
            Ok(Ok(s)) => return Some((s, b.clone())),
            Ok(Err(e)) => eprintln!("wsc-lb: backend {b}: {e}; trying the next"),
            Err(_) => eprintln!("wsc-lb: backend {b}: connect timed out; trying the next"),
        }
    }
    None
}

/// `add ADDR` / `remove ADDR` lines on standard input (`--control`).
async fn control(backends: Backends) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        let (cmd, addr) = (words.next(), words.next());
        let Ok(mut list) = backends.write() else {
            return;
        };
        match (cmd, addr) {
            (Some("add"), Some(a)) if !list.iter().any(|b| b == a) => list.push(a.to_owned()),
            (Some("remove"), Some(a)) => list.retain(|b| b != a),
            (Some("add"), Some(_)) | (Some("list"), None) => {}
            _ => eprintln!("wsc-lb: control: {line:?}: expected `add ADDR` or `remove ADDR`"),
        }
        println!("wsc-lb backends {}", list.join(" "));
    }
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let controlled = args.first().is_some_and(|a| a == "--control");
    if controlled {
        args.remove(0);
    }
    if args.len() < 2 - usize::from(controlled) || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: wsc-lb [--control] LISTEN_ADDR BACKEND_ADDR...");
        std::process::exit(2);
    }
    let listen: SocketAddr = match args[0].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsc-lb: listen address {}: {e}", args[0]);
            std::process::exit(2);
        }
    };
    let backends: Backends = Arc::new(RwLock::new(args[1..].to_vec()));
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsc-lb: bind {listen}: {e}");
            std::process::exit(1);
        }
    };
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("wsc-lb listening on {bound}");
    if controlled {
        tokio::spawn(control(backends.clone()));
    }
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("wsc-lb: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let backends = backends.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Some((mut upstream, b)) = connect_any(&backends, &next).await else {
                eprintln!("wsc-lb: {peer}: no backend answered");
                return;
            };
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            drop(b);
        });
    }
}

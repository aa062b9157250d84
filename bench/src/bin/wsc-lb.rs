//! `wsc-lb`: a tiny round-robin TCP reverse proxy for local trials, so a
//! demo or a test reaches a cluster through one URL, as it would behind a
//! real load balancer.
//!
//! ```text
//! wsc-lb LISTEN_ADDR BACKEND_ADDR...
//! wsc-lb 127.0.0.1:8080 127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083
//! ```
//!
//! Each accepted connection goes to the next backend in turn; a backend that
//! refuses (or does not answer within a second) is skipped for that
//! connection. No health checks, no stickiness, no TLS: bytes are copied
//! both ways until either side closes. It prints `wsc-lb listening on ADDR`
//! once bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

async fn connect_any(backends: &[String], next: &AtomicUsize) -> Option<(TcpStream, String)> {
    let start = next.fetch_add(1, Ordering::Relaxed);
    for i in 0..backends.len() {
        let b = &backends[(start + i) % backends.len()];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(b)).await {
            Ok(Ok(s)) => return Some((s, b.clone())),
            Ok(Err(e)) => eprintln!("wsc-lb: backend {b}: {e}; trying the next"),
            Err(_) => eprintln!("wsc-lb: backend {b}: connect timed out; trying the next"),
        }
    }
    None
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: wsc-lb LISTEN_ADDR BACKEND_ADDR...");
        std::process::exit(2);
    }
    let listen: SocketAddr = match args[0].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wsc-lb: listen address {}: {e}", args[0]);
            std::process::exit(2);
        }
    };
    let backends: Arc<Vec<String>> = Arc::new(args[1..].to_vec());
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

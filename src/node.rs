//! A node: build (bind and wire up), then run until cancelled, then leave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::cluster::bus::RedisBus;
use crate::config::{Config, ConfigError};
use crate::gateway::auth::Auth;
use crate::gateway::listener::GuardedListener;
use crate::gateway::session::CLOSE_GOING_AWAY;
use crate::gateway::{self, Shared};
use crate::ids::NodeId;
use crate::local::Registry;
use crate::metrics::Metrics;
use crate::shutdown::drain_schedule;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("--listen (WSC_LISTEN): {0}")]
    Listen(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Bind with a deep accept backlog: when a node dies its clients reconnect
/// to the survivors at once, and the default backlog (128) would drop
/// their SYNs (retried only after a second).
/// Connections that may wait for their first response at once (as many as
/// the accept backlog); see [`GuardedListener`].
const MAX_PENDING_HANDSHAKES: usize = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

pub struct Node {
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Node {
    /// Bind the listener and wire the node up. Redis is connected by
    /// [`Node::run`] (retried with backoff; `/readyz` says when).
    pub async fn build(cfg: Config) -> Result<Node, NodeError> {
        let cfg = Arc::new(cfg);
        let auth = Auth::new(&cfg)?;
        let addr = cfg.listen_addr().map_err(NodeError::Listen)?;
        let listener = bind(addr).map_err(|e| NodeError::Listen(format!("{addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Listen(e.to_string()))?;
        let registry = Arc::new(Registry::new());
        let metrics = Arc::new(Metrics::new());
        let bus: Arc<dyn Bus> = match &cfg.redis_url {
            Some(_) => Arc::new(RedisBus::new(
                cfg.clone(),
                registry.clone(),
                metrics.clone(),
            )),
            None => Arc::new(MemoryBus::new(
                registry.clone(),
                cfg.mailbox_max,
                cfg.mailbox_ttl,
                cfg.mailbox_max_bytes,
            )),
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
        Ok(Node {
            shared: Arc::new(Shared {
                slots,
                cfg,
                registry,
                bus,
                metrics,
                auth,
                sessions: TaskTracker::new(),
                draining: AtomicBool::new(false),
            }),
            listener,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's current id.
    pub fn id(&self) -> NodeId {
        self.shared.bus.node_id()
    }

    /// Serve until `cancel`, then leave the cluster (contract §6, Leave)
    /// and return.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), NodeError> {
        let Node {
            shared,
            listener,
            addr,
        } = self;
        tracing::info!(listen = %addr, "starting");
        let background = TaskTracker::new();
        let stop = CancellationToken::new();
        shared.bus.clone().start(&background, stop.clone());

        let app = gateway::router(shared.clone());
        let server_stop = CancellationToken::new();
        let server = {
            let server_stop = server_stop.clone();
            tokio::spawn(async move {
                let listener = GuardedListener::new(listener, MAX_PENDING_HANDSHAKES);
                axum::serve(listener, app)
                    .with_graceful_shutdown(server_stop.cancelled_owned())
                    .await
            })
        };
        tracing::info!(node = %shared.bus.node_id(), "listening");
        cancel.cancelled().await;

        // Leave: not ready, no routing to us, then close sockets in
        // jittered batches over the drain window, then reap ourselves.
        let started = tokio::time::Instant::now();
        let drain = shared.cfg.drain;
        shared.draining.store(true, Ordering::SeqCst);
        tracing::info!(node = %shared.bus.node_id(), connections = shared.registry.len(), drain_ms = drain.as_millis() as u64, "draining");
        shared.bus.leave_begin().await;
        for (at, batch) in drain_schedule(shared.registry.all(), drain) {
            tokio::time::sleep_until(started + at).await;
            for h in batch {
                h.close(CLOSE_GOING_AWAY);
            }
        }
        // Connections that arrived during the drain (before the 503s).
        for h in shared.registry.all() {
            h.close(CLOSE_GOING_AWAY);
        }
        shared.sessions.close();
        let _ = tokio::time::timeout_at(started + drain, shared.sessions.wait()).await;
        server_stop.cancel();
        shared.bus.leave_finish().await;
        stop.cancel();
        background.close();
        let _ = tokio::time::timeout(Duration::from_millis(500), background.wait()).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), server).await;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
        Ok(())
    }
}

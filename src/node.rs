//! A node: build (bind and wire up), then run until cancelled, then leave.

use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::shutdown::{Lifecycle, Phase, drain_schedule};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
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
    /// The Redis back-end, when there is one (else the in-process bus).
    cluster: Option<Arc<RedisBus>>,
    /// The node's phase: this node is its one owner.
    life: Lifecycle,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Node {
    /// Bind the listener and wire the node up. Redis is connected by
    /// [`Node::run`] (retried with backoff; `/readyz` says when).
    pub async fn build(cfg: Config) -> Result<Node, NodeError> {
        let cfg = Arc::new(cfg);
        let auth = Auth::new(&cfg)?;
        let addr = cfg
            .listen_addr()
            .map_err(|e| NodeError::Listen(e.to_string()))?;
        let listener = bind(addr).map_err(|e| NodeError::Listen(format!("{addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Listen(e.to_string()))?;
        let registry = Arc::new(Registry::new());
        let metrics = Arc::new(Metrics::new());
        let life = Lifecycle::new();
        let cluster = cfg.redis_url.as_ref().map(|_| {
            Arc::new(RedisBus::new(
                cfg.clone(),
                registry.clone(),
                metrics.clone(),
                life.clone(),
            ))
        });
        let bus: Arc<dyn Bus> = match &cluster {
            Some(c) => c.clone(),
            None => Arc::new(MemoryBus::new(
                registry.clone(),
                cfg.mailbox_max,
                cfg.mailbox_ttl,
                cfg.mailbox_max_bytes,
                crate::bus::memory::HistoryConfig {
                    size: cfg.history_size,
                    ttl: cfg.history_ttl,
                    idempotency_ttl: cfg.idempotency_ttl,
                },
            )),
        };
        let conn_slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
        Ok(Node {
            shared: Arc::new(Shared {
                conn_slots,
                cfg,
                registry,
                bus,
                metrics,
                auth,
                sessions: TaskTracker::new(),
                life: life.clone(),
            }),
            cluster,
            life,
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
            cluster,
            life,
            listener,
            addr,
        } = self;
        tracing::info!(listen = %addr, "starting");
        let background = TaskTracker::new();
        let cluster = cluster.map(|c| c.spawn(&background));

        let app = gateway::routes(shared.clone());
        let server = {
            let life = life.clone();
            tokio::spawn(async move {
                let listener = GuardedListener::new(listener, MAX_PENDING_HANDSHAKES);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { life.reached(Phase::SelfReaping).await })
                    .await
            })
        };
        tracing::info!(node = %shared.bus.node_id(), "listening");
        cancel.cancelled().await;

        // Leave (contract §6), in order. 1. Not ready, no new upgrades;
        // routers, reaper and heartbeat stop; the lease expires and the
        // router leases are released, so nothing is routed to us any more.
        let started = tokio::time::Instant::now();
        let drain = shared.cfg.drain;
        tracing::info!(node = %shared.bus.node_id(), connections = shared.registry.len(), drain_ms = drain.as_millis() as u64, "draining");
        life.advance(Phase::Leaving);
        // §6: the node exits within --drain-ms plus a second whatever
        // Redis does; a step Redis does not answer in its share of the
        // window is left to a survivor (the reap lock lapses).
        let exit_by = started + drain + Duration::from_secs(1);
        // A quarter of the window, and at least 200 ms (of the second's
        // grace) when the window is short.
        let begin_for = (drain / 4).max(Duration::from_millis(200));
        if let Some(c) = &cluster
            && tokio::time::timeout(begin_for, c.leave_begin())
                .await
                .is_err()
        {
            tracing::warn!(node = %shared.bus.node_id(), waited_ms = begin_for.as_millis() as u64, "leaving: redis did not answer; a survivor will reap this node");
        }
        // 2. Close the sockets with 1012 in jittered batches over the drain
        //    window (their unwritten messages are routed again).
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
        // 3. Readers and the HTTP server stop; reap ourselves as a survivor
        //    would: route what is left, delete the inbox, leave `<p>:nodes`.
        life.advance(Phase::SelfReaping);
        let reap_by = exit_by - Duration::from_millis(400);
        if let Some(c) = &cluster
            && tokio::time::timeout_at(reap_by, c.leave_finish())
                .await
                .is_err()
        {
            tracing::warn!(node = %shared.bus.node_id(), "self-reap cut short at the drain's end; a survivor will finish it");
        }
        // 4. The rest stops (the acker and publisher drain first).
        life.advance(Phase::Stopped);
        background.close();
        let by = (tokio::time::Instant::now() + Duration::from_millis(500))
            .min(exit_by - Duration::from_millis(150));
        let _ = tokio::time::timeout_at(by, background.wait()).await;
        let by = (tokio::time::Instant::now() + Duration::from_millis(200))
            .min(exit_by - Duration::from_millis(50));
        let _ = tokio::time::timeout_at(by, server).await;
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
        Ok(())
    }
}

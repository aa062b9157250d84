//! The message bus behind the gateway: one trait, two back-ends.
//!
//! - [`memory::MemoryBus`]: a standalone node, no Redis (`--redis-url` unset).
//! - `RedisBus`, in the `cluster` module (which depends on this one, never
//!   the other way): a cluster node — lease, inbox, routers, reaper.
//!
//! The gateway only registers connections, publishes messages and asks for
//! the cluster view; deliveries come back through the shared
//! [`Registry`](crate::local::Registry).

pub mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::ack::AckGuard;
use crate::ids::{NodeId, UserId};
use crate::local::ConnHandle;
use crate::message::{Message, Position, Target};

/// A message to add (from a client `send` or `POST /api/send`).
#[derive(Debug, Clone)]
pub struct Publish {
    pub target: Target,
    /// Checked JSON text.
    pub payload: String,
    pub from: Option<UserId>,
    /// The app's idempotency key (contract §4): a retry with it gets the
    /// first message's id and adds nothing.
    pub idem: Option<String>,
}

/// A page of a user's mailbox. Its entries stay in the mailbox until the
/// connection has written them and says so ([`Bus::take_mailbox`],
/// [`Bus::mailbox_written`]): a lost reply, a closed socket or a dead node
/// leaves them for the next connection.
#[derive(Debug, Default, Clone)]
pub struct Mailbox {
    pub msgs: Vec<Arc<Message>>,
    /// Mailbox entry ids read in this page (unreadable ones included, so
    /// they are deleted too).
    pub ids: Vec<String>,
    /// The last entry id read so far: the next page starts after it.
    pub cursor: Option<String>,
    /// More pages wait.
    pub more: bool,
}

/// A client's resume request: every message of its user after `since`
/// under `epoch` (contract §9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    pub epoch: String,
}

/// What registering a connection found, in one atomic step.
#[derive(Debug, Default, Clone)]
pub struct Registered {
    /// The first page of the mailbox.
    pub mailbox: Mailbox,
    /// The user's history position (for `welcome`).
    pub pos: Position,
    /// The answer to a resume request (`None`: none was made).
    pub recovered: Option<bool>,
    /// With `recovered: Some(true)`: every message after `since`, in order.
    pub replay: Vec<Arc<Message>>,
}

/// Why the bus could not do something.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("node is not connected to the cluster")]
    Unavailable,
}

/// One node as `/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: String,
    pub lease_expires_ms: Option<u64>,
    pub connections: u64,
    /// The node's release; `null` for a release that did not say.
    pub version: Option<String>,
}

/// What `/admin` shows of users.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activity {
    pub online_users: u64,
    pub events: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// The `/cluster` document.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub node: String,
    pub router: bool,
    pub shards: Vec<u32>,
    pub nodes: Vec<NodeView>,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// This node's current id (it changes after a lost lease).
    fn node_id(&self) -> NodeId;

    /// True while the node can serve: holds its lease (standalone: always).
    fn is_ready(&self) -> bool;

    /// True once Redis has been unreachable for a while, though the lease
    /// may not have lapsed yet (contract §8: `/readyz` 503 while cut off).
    fn cut_off(&self) -> bool {
        false
    }

    /// Register a connection already in the registry; returns the first
    /// page of the user's mailbox, oldest first, the user's history
    /// position and the answer to `resume` (all read in one atomic step
    /// with registering). Take the rest with [`Bus::take_mailbox`].
    async fn register(
        &self,
        conn: &ConnHandle,
        resume: Option<&Resume>,
    ) -> Result<Registered, BusError>;

    /// `written` (the last page) is written: delete it from the mailbox and
    /// read the page after it, in one round trip.
    async fn take_mailbox(&self, conn: &ConnHandle, written: &Mailbox)
    -> Result<Mailbox, BusError>;

    /// `written` (the last page) is written: delete it from the mailbox.
    async fn mailbox_written(&self, conn: &ConnHandle, written: &Mailbox);

    /// Forget a connection that closed.
    async fn unregister(&self, conn: &ConnHandle);

    /// A message queued for a connection that closed before writing it:
    /// route it again (the guard is released once that is done).
    fn hand_back(&self, msg: Arc<Message>, guard: Option<Arc<AckGuard>>);

    /// Add a message durably; returns its public id.
    async fn publish(&self, msg: Publish) -> Result<String, BusError>;

    /// Live connections of `user` over the whole cluster.
    async fn user_connections(&self, user: &UserId) -> Result<usize, BusError>;

    async fn cluster_view(&self) -> Result<ClusterView, BusError>;

    /// For `/admin`: users online in the cluster, and the newest events
    /// (each as its fields, `id` first).
    async fn activity(&self) -> Result<Activity, BusError>;

    /// Live connections of each user (contract §10), in order.
    async fn presence(&self, users: &[UserId]) -> Result<Vec<usize>, BusError>;

    /// Close every connection `user` has now, on every node, with `code`
    /// and `reason`; returns how many there were (contract §10).
    async fn disconnect(&self, user: &UserId, code: u16, reason: &str) -> Result<usize, BusError>;
}

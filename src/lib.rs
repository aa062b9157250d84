//! wscluster: a WebSocket server that runs as an elastic cluster with no
//! static server ids, on Redis alone.
//!
//! A node makes a UUID at boot and holds a lease in `<p>:nodes`, renewed by
//! heartbeat. Each node has its own inbox stream. Apps add messages to the
//! send stream; one node at a time (the router, by lease) routes each entry
//! to the inbox of every node holding a connection of its user, or to the
//! user's mailbox. When a node dies, survivors reap it: they route again
//! what its inbox held and remove its sessions. Nothing is lost and nobody
//! edits config. The same code runs on one Redis or on a Redis Cluster
//! (`--redis-cluster`). The public interface is `CONTRACT.md`.
//!
//! # Layout
//!
//! Dependencies flow one way, from the top of this list down to the
//! leaves; no module imports one above it.
//!
//! - [`node`]: `Node::build` and `Node::run`: wires the parts up and owns
//!   shutdown (leave, drain, stop).
//! - [`gateway`]: the HTTP side: WebSocket upgrade, auth (token expiry and
//!   `refresh`), sessions (resume: replay, then mailbox, then live), the app
//!   API (send, presence, disconnect), the ops and admin endpoints, the
//!   guarded listener. Talks to a [`bus::Bus`].
//! - [`cluster`]: the Redis back-end (`RedisBus`, an implementation of
//!   [`bus::Bus`]): lease and heartbeat, re-registration, reconciliation,
//!   the reaper, routing (numbering each user message: seq, history,
//!   idempotency), the send-shard routers, the inbox readers, presence
//!   events and the online sweep, presence counts and disconnects.
//! - [`bus`]: the gateway's one port: the [`bus::Bus`] trait and the
//!   in-process back-end of a standalone node.
//! - [`local`]: this node's connections (by connection, user and topic),
//!   each with its bounded outbox: what both the gateway and the back-ends
//!   deliver to.
//! - [`redis`]: plumbing: connections and pipelines for a single Redis and
//!   Redis Cluster (on a single Redis over plain TCP, connections and a
//!   reply reader of our own), the slot map, the atomic scripts (sent by
//!   `EVALSHA`).
//! - Leaves: [`config`] (flags and `WSC_*` variables, validated), [`ids`]
//!   (`NodeId`, `ConnId`, `UserId`, `Topic`, validated before any key),
//!   [`keys`] (every Redis key name, and the send-shard rule), [`message`]
//!   (a routed message and the server → client frames), [`stream`] (stream
//!   replies as raw bytes), [`ack`] (deferred acknowledgement), [`metrics`]
//!   (the node's registry), [`shutdown`] (signals and the drain schedule),
//!   [`backoff`] (jittered exponential backoff).

mod ack;
mod backoff;
mod bus;
mod cluster;
pub mod config;
mod gateway;
pub mod ids;
pub mod keys;
mod local;
pub mod message;
mod metrics;
mod node;
mod redis;
pub mod shutdown;
pub mod stream;

pub use cluster::entry::{DeadReason, parse_send};
pub use config::Config;
pub use gateway::frames;
pub use node::{Node, NodeError};
/// Redis the node's way (single or cluster), for tools and tests.
pub use redis::conn::{Batch, Connector};
/// The atomic scripts, for tests that run them on their own Redis.
pub use redis::lua;

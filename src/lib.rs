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
//! - [`config`]: flags and `WSC_*` variables, validated.
//! - [`ids`]: `NodeId`, `ConnId`, `UserId`, `Topic` (validated before any key).
//! - [`keys`]: every Redis key name, and the send-shard rule.
//! - [`lua`]: the atomic scripts, one hash slot each.
//! - [`message`]: a routed message and the server → client frames.
//! - [`stream`]: reading stream replies as raw bytes.
//! - [`ack`]: deferred acknowledgement once hand-offs are done.
//! - [`cluster`]: membership — lease, heartbeat, new id after a lost lease,
//!   the reaper.
//! - [`router`]: routing, the send-shard router, inbox and topic readers,
//!   batched publishing and acking.
//! - [`gateway`]: WebSocket upgrade, auth, sessions, the connection
//!   registry, `POST /api/send`.
//! - [`bus`]: the Redis and in-process back-ends behind one trait; the
//!   connection type and pipelines (`bus::conn`) that serve a single Redis
//!   and Redis Cluster alike, and the cluster's slot map (`bus::slots`).
//! - [`ops`]: health, readiness, metrics, cluster view.
//! - [`node`]: `Node::build` and `Node::run`.
//! - [`shutdown`]: signals and the drain schedule.
//! - [`backoff`]: jittered exponential backoff.

pub mod ack;
pub mod backoff;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod ids;
pub mod keys;
pub mod lua;
pub mod message;
pub mod node;
pub mod ops;
pub mod router;
pub mod shutdown;
pub mod stream;

pub use config::Config;
pub use node::Node;

//! Process launchers shared by wscluster's integration tests
//! (`tests/common`) and its benchmark tool (`bench/`), so both start Redis
//! and nodes the same way.
//!
//! - [`RedisServer`]: one `redis-server` on a free port, no persistence
//!   (plain, or with extra arguments such as a password or TLS); restart on
//!   the same port.
//! - [`RedisCluster`]: a Redis Cluster of cluster-enabled `redis-server`s,
//!   with replicas or not, converged before use; the administration tests
//!   need (kill a primary, wait for failover, migrate a slot, error stats).
//! - [`NodeProcess`]: a `wscluster` node as a child process on a port the
//!   launcher chose (another on a bind race), its log captured (in memory or
//!   to a file), ready once it answers `/healthz`.
//! - [`http`]: a minimal HTTP/1.1 `GET`, and waiting for `/readyz`.
//! - Small pieces: [`free_port`], [`tmpdir`], [`strip_ansi`], [`signal`],
//!   [`poll_until`] and [`wait_until`] (polling with a deadline), and
//!   [`workspace_bin`] (a binary of another package of the workspace, for an
//!   integration test).
//!
//! What the bench calls returns errors; what only tests call (failover
//! waits, slot migration) panics naming what it waited for, as a test wants.
//! Every process is killed when its handle is dropped, and its log printed
//! if the thread is panicking (a failed test).

pub mod http;
mod node;
mod proc;
mod redis_cluster;
mod redis_server;
mod wait;

pub use node::{NodeLog, NodeProcess};
pub use proc::{free_port, signal, strip_ansi, tmpdir, workspace_bin};
pub use redis_cluster::{ClusterSpec, RedisCluster, SlotMigration};
pub use redis_server::{Listen, RedisServer, plain};
pub use wait::{poll_until, wait_until};

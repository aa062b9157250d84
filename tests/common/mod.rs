//! Test harness: a real `redis-server` (or Redis Cluster) per test, real nodes (child
//! processes of the built binary), real WebSocket clients, and an
//! `eventually` helper that polls with a deadline.
//!
//! The processes are started by the workspace's `wscluster-testkit` (the
//! bench starts its local clusters with it too); these modules add what
//! tests need on top, and every test file uses them through `common::*`:
//!
//! - `wait`: [`eventually`] (async) and [`wait_until`] (blocking).
//! - `redis`: [`Redis`] (one `redis-server`, or a Redis Cluster under
//!   `WSC_TEST_REDIS_CLUSTER=1`, see [`on_redis_cluster`]), [`TestConn`],
//!   [`RedisCluster`].
//! - `node`: [`NodeProc`], node arguments ([`fast_args`], [`timed_args`]),
//!   [`cluster`] (Redis and `n` ready nodes).
//! - `client`: [`token`], the WebSocket [`Client`], [`connect_status`].
//! - `raw`: [`raw_ws`] (small receive buffer), [`next_json`], [`reset`]
//!   (SO_LINGER 0).
//! - `send`: [`xadd_to`], [`send_many`]: messages added to `<p>:send`.
// Each test file uses a part of the harness: the rest is dead code, and the
// re-exports it does not use unused imports, in that file's crate.
#![allow(dead_code, unused_imports)]

mod client;
mod node;
mod raw;
mod redis;
mod send;
mod wait;

pub use self::client::*;
pub use self::node::*;
pub use self::raw::*;
pub use self::redis::*;
pub use self::send::*;
pub use self::wait::*;

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";

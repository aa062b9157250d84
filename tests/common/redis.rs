//! The Redis a test runs on: one `redis-server`, or under
//! `WSC_TEST_REDIS_CLUSTER=1` a Redis Cluster behind the same interface
//! (both launched by the testkit), and a test's own connection to it.

use std::path::PathBuf;

use wscluster_testkit::{RedisServer, plain, tmpdir};

pub use wscluster_testkit::{RedisCluster, SlotMigration};

/// True when the suite runs against Redis Cluster: `WSC_TEST_REDIS_CLUSTER=1`
/// makes [`Redis::start`] start a 3-primary [`RedisCluster`] instead, so the
/// same tests cover both deployments (`scripts/test.sh` runs the core and
/// failure tests both ways).
pub fn on_redis_cluster() -> bool {
    std::env::var("WSC_TEST_REDIS_CLUSTER").is_ok_and(|v| v == "1" || v == "true")
}

/// A `redis-server` on a free port, no persistence; killed on drop, its log
/// printed if the test failed. Or, under [`on_redis_cluster`], a Redis
/// Cluster behind the same interface.
pub struct Redis {
    pub port: u16,
    /// Set when this is a Redis Cluster (see [`on_redis_cluster`]).
    cluster: Option<RedisCluster>,
    /// Set when this is one `redis-server`.
    server: Option<RedisServer>,
    dir: PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        if on_redis_cluster() {
            let c = RedisCluster::start(3, 0);
            return Redis {
                port: c.ports()[0],
                cluster: Some(c),
                server: None,
                dir: tmpdir("test-redis").expect("tmp dir"),
            };
        }
        Self::start_with(&[], plain)
    }

    /// A 3-primary Redis Cluster whatever `WSC_TEST_REDIS_CLUSTER` says
    /// (for a test that covers the cluster deployment in every run).
    pub fn start_cluster() -> Redis {
        let c = RedisCluster::start(3, 0);
        Redis {
            port: c.ports()[0],
            cluster: Some(c),
            server: None,
            dir: tmpdir("test-redis").expect("tmp dir"),
        }
    }

    /// True when this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// `FLUSHALL` on the server, or on every primary of a cluster: Redis
    /// emptied under running nodes.
    pub fn flushall(&self) {
        match &self.cluster {
            Some(c) => {
                for port in c.primary_ports() {
                    let () = redis::cmd("FLUSHALL")
                        .query(&mut c.node_conn(port))
                        .unwrap_or_else(|e| panic!("FLUSHALL on {port}: {e}"));
                }
            }
            None => {
                let () = redis::cmd("FLUSHALL")
                    .query(&mut self.conn())
                    .expect("FLUSHALL");
            }
        }
    }

    /// A redis-server with extra arguments; `url_for(port, extra)` gives
    /// the port arguments and the URL this process reaches it with.
    pub fn start_with(
        extra: &[String],
        url_for: fn(u16, &[String]) -> (Vec<String>, String),
    ) -> Redis {
        let dir = tmpdir("test-redis").expect("tmp dir");
        let server = RedisServer::start_with(&dir, extra, url_for).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("{e:#} (is redis-server installed?)\n{log}")
        });
        Redis {
            port: server.port,
            cluster: None,
            server: Some(server),
            dir,
        }
    }

    /// The URL nodes get (`--redis-url`): a seed list on a cluster.
    pub fn url(&self) -> String {
        match (&self.cluster, &self.server) {
            (Some(c), _) => c.seeds(),
            (None, Some(s)) => s.url(),
            (None, None) => unreachable!("a Redis is a server or a cluster"),
        }
    }

    /// SIGKILL the server (not for a Redis Cluster).
    pub fn kill(&mut self) {
        assert!(self.cluster.is_none(), "kill: not for a Redis Cluster");
        if let Some(s) = &mut self.server {
            s.kill();
        }
    }

    /// Restart on the same port, empty (no persistence).
    pub fn restart_empty(&mut self) {
        let s = self
            .server
            .as_mut()
            .expect("restart_empty: not for a Redis Cluster");
        s.restart_empty()
            .unwrap_or_else(|e| panic!("redis did not restart: {e:#}"));
    }

    pub fn conn(&self) -> TestConn {
        match &self.cluster {
            Some(c) => TestConn::Cluster(c.conn()),
            None => TestConn::Single(
                redis::Client::open(self.url())
                    .and_then(|c| c.get_connection())
                    .expect("redis connection"),
            ),
        }
    }

    /// A plain connection that takes pipelines (and `MULTI`) on `key`: on
    /// a cluster, to the primary serving its slot.
    pub fn conn_for(&self, key: &str) -> TestConn {
        match &self.cluster {
            Some(c) => TestConn::Single(c.node_conn(c.primary_port_for_key(key))),
            None => self.conn(),
        }
    }

    pub fn log(&self) -> String {
        match (&self.cluster, &self.server) {
            (Some(c), _) => c.log(),
            (None, Some(s)) => s.log(),
            (None, None) => String::new(),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A cluster prints its own logs.
        if std::thread::panicking() && self.cluster.is_none() {
            eprintln!(
                "---- redis-server log (port {}) ----\n{}",
                self.port,
                self.log()
            );
        }
        if let Some(s) = &mut self.server {
            s.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A test's own connection: to one Redis or to a Redis Cluster (routed by
/// key, so single-key commands work the same on both).
#[allow(clippy::large_enum_variant)] // a few per test
pub enum TestConn {
    Single(redis::Connection),
    Cluster(redis::cluster::ClusterConnection),
}

impl redis::ConnectionLike for TestConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            TestConn::Single(c) => c.req_packed_command(cmd),
            TestConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            TestConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            TestConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        // The cluster routes by the command's key, not its packed bytes.
        match self {
            TestConn::Single(c) => c.req_command(cmd),
            TestConn::Cluster(c) => c.req_command(cmd),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            TestConn::Single(c) => c.get_db(),
            TestConn::Cluster(c) => c.get_db(),
        }
    }
    fn supports_pipelining(&self) -> bool {
        match self {
            TestConn::Single(c) => c.supports_pipelining(),
            TestConn::Cluster(c) => c.supports_pipelining(),
        }
    }
    fn check_connection(&mut self) -> bool {
        match self {
            TestConn::Single(c) => c.check_connection(),
            TestConn::Cluster(c) => c.check_connection(),
        }
    }
    fn is_open(&self) -> bool {
        match self {
            TestConn::Single(c) => c.is_open(),
            TestConn::Cluster(c) => c.is_open(),
        }
    }
}

//! Test harness: a real `redis-server` (or Redis Cluster) per test, real nodes (child
//! processes of the built binary), real WebSocket clients, and an
//! `eventually` helper that polls with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";

/// Poll `f` until it returns `Some`, or panic after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wsc-test-{tag}-{}-{}",
        std::process::id(),
        uuid_like()
    ));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn uuid_like() -> String {
    format!("{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

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
    child: Option<Child>,
    dir: PathBuf,
    /// Extra server arguments (password, TLS), kept for restarts.
    extra: Vec<String>,
    /// Port arguments and the URL to reach it, for a given port.
    url_for: fn(u16, &[String]) -> (Vec<String>, String),
}

fn plain(port: u16, _extra: &[String]) -> (Vec<String>, String) {
    (
        vec!["--port".into(), port.to_string()],
        format!("redis://127.0.0.1:{port}/"),
    )
}

impl Redis {
    pub fn start() -> Redis {
        if on_redis_cluster() {
            let c = RedisCluster::start(3, 0);
            return Redis {
                port: c.ports()[0],
                cluster: Some(c),
                child: None,
                dir: tmpdir("redis"),
                extra: Vec::new(),
                url_for: plain,
            };
        }
        Self::start_with(&[], plain)
    }

    /// A redis-server with extra arguments; `url_for(port, extra)` gives
    /// the port arguments and the URL this process reaches it with.
    pub fn start_with(
        extra: &[String],
        url_for: fn(u16, &[String]) -> (Vec<String>, String),
    ) -> Redis {
        let dir = tmpdir("redis");
        for _ in 0..5 {
            let mut r = Redis {
                port: free_port(),
                cluster: None,
                child: None,
                dir: dir.clone(),
                extra: extra.to_vec(),
                url_for,
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("could not start redis-server with {extra:?} (is it installed?)");
    }

    /// Start the server on `self.port`; false if it did not come up.
    fn spawn(&mut self) -> bool {
        let log = self.dir.join("redis.log");
        let (port_args, _) = (self.url_for)(self.port, &self.extra);
        let child = Command::new("redis-server")
            .args(&port_args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().unwrap_or(".")])
            .args(["--logfile", log.to_str().unwrap_or("redis.log")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false; // port clash: try another
            }
            if redis::Client::open(self.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// The URL nodes get (`--redis-url`): a seed list on a cluster.
    pub fn url(&self) -> String {
        match &self.cluster {
            Some(c) => c.seeds(),
            None => (self.url_for)(self.port, &self.extra).1,
        }
    }

    pub fn kill(&mut self) {
        assert!(self.cluster.is_none(), "kill: not for a Redis Cluster");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart on the same port, empty (no persistence).
    pub fn restart_empty(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
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
        match &self.cluster {
            Some(c) => c.log(),
            None => std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default(),
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
        if self.cluster.is_none() {
            self.kill();
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

/// Poll `f` until it returns `Ok`, or panic after `timeout` with the last
/// reason it gave (the blocking twin of [`eventually`]).
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match f() {
            Ok(v) => return v,
            Err(why) => why,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}; last: {why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `redis-server --cluster-enabled yes` process of a [`RedisCluster`].
struct ClusterProc {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// SIGKILLed by the test (kept dead).
    killed: bool,
}

impl ClusterProc {
    /// Start a cluster-enabled server in its own dir under `root`, answering
    /// PING; None if it did not come up (port clash: the caller retries).
    fn spawn(root: &std::path::Path, taken: &[u16]) -> Option<ClusterProc> {
        let port = free_port();
        // The cluster bus gets its own free port (`--cluster-port`, Redis 7)
        // instead of port+10000, which may be taken or out of range.
        let bus = free_port();
        if port == bus || taken.contains(&port) || taken.contains(&bus) {
            return None;
        }
        let dir = root.join(format!("node-{port}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let mut p = ClusterProc {
            port,
            child: None,
            dir,
            killed: false,
        };
        let conf = p.dir.join(format!("nodes-{port}.conf"));
        let log = p.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
            ])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-allow-replica-migration", "no"])
            // Replicas sync at once, not after the 5 s diskless-sync delay.
            .args(["--repl-diskless-sync-delay", "0"])
            .args([
                "--cluster-config-file",
                conf.to_str().unwrap_or("nodes.conf"),
            ])
            .args(["--dir", p.dir.to_str().unwrap_or(".")])
            .args(["--logfile", log.to_str().unwrap_or("redis.log")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        p.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = p.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                p.child = None;
                return None; // port clash: try others
            }
            if p.conn()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
            {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        p.kill();
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain (non-cluster) connection to this process.
    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let c =
            redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(c)
    }

    /// The reply of a text command (`CLUSTER INFO`, `INFO replication`).
    fn text(&self, cmd: &[&str]) -> Result<String, String> {
        let mut c = self.conn().map_err(|e| format!("{}: {e}", self.port))?;
        let mut q = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            q.arg(*a);
        }
        q.query::<String>(&mut c)
            .map_err(|e| format!("{} {cmd:?}: {e}", self.port))
    }

    /// This process's view of the cluster (`CLUSTER NODES`).
    fn view(&self) -> Result<Vec<NodeLine>, String> {
        Ok(self
            .text(&["CLUSTER", "NODES"])?
            .lines()
            .filter_map(NodeLine::parse)
            .collect())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    port: u16,
    flags: Vec<String>,
    /// Slot ranges (inclusive) this node serves as primary.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    /// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
    fn parse(line: &str) -> Option<NodeLine> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let addr = f.get(1)?.split('@').next()?;
        let port = addr.rsplit(':').next()?.parse().ok()?;
        let slots = f
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('[')) // migrating/importing
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        Some(NodeLine {
            port,
            flags: f.get(2)?.split(',').map(str::to_owned).collect(),
            slots,
        })
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.has("master") && self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// A Redis Cluster of real `redis-server` processes on free ports (no
/// persistence, node timeout 1 s), created with `redis-cli --cluster create`
/// and converged; SIGKILLed on drop, their logs printed if the test failed.
pub struct RedisCluster {
    procs: Vec<ClusterProc>,
    root: PathBuf,
    primaries: usize,
    replicas_per_primary: usize,
    /// Slot ranges each killed primary served when it was killed.
    served: std::collections::HashMap<u16, Vec<(u16, u16)>>,
}

impl RedisCluster {
    /// `primaries` (at least 3) primaries with `replicas_per_primary`
    /// replicas each, all slots assigned and every node agreeing.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        assert!(
            primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        let mut c = RedisCluster {
            procs: Vec::new(),
            root: tmpdir("redis-cluster"),
            primaries,
            replicas_per_primary,
            served: Default::default(),
        };
        // From here a panic drops `c`: processes killed, logs printed.
        for _ in 0..primaries * (1 + replicas_per_primary) {
            let taken: Vec<u16> = c.procs.iter().map(|p| p.port).collect();
            let p = (0..5)
                .find_map(|_| ClusterProc::spawn(&c.root, &taken))
                .expect("could not start a cluster-enabled redis-server");
            c.procs.push(p);
        }
        c.create();
        let n = c.procs.len();
        wait_until("redis cluster converged", Duration::from_secs(20), || {
            c.converged(n)
        });
        c
    }

    /// `redis-cli --cluster create`, its output kept in `cli.log`.
    fn create(&self) {
        let out = self.root.join("cli.log");
        let file = std::fs::File::create(&out).expect("cli log");
        let mut cli = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.procs.iter().map(|p| format!("127.0.0.1:{}", p.port)))
            .args(["--cluster-replicas", &self.replicas_per_primary.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cli log"))
            .stderr(file)
            .spawn()
            .expect("redis-cli must be installed with redis-server");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(st)) = cli.try_wait() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = cli.kill();
                let _ = cli.wait();
                panic!("redis-cli --cluster create hung:\n{}", self.cli_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "redis-cli --cluster create failed ({status}):\n{}",
            self.cli_log()
        );
    }

    fn cli_log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.root.join("cli.log")).unwrap_or_default())
    }

    fn live(&self) -> impl Iterator<Item = &ClusterProc> {
        self.procs.iter().filter(|p| !p.killed)
    }

    fn proc(&self, port: u16) -> &ClusterProc {
        self.procs
            .iter()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no cluster process on port {port}"))
    }

    /// Every process: state ok, all slots ok, every process known and
    /// healthy, the expected number of primaries and replicas, and each
    /// replica's link to its primary up.
    fn converged(&self, n: usize) -> Result<(), String> {
        for p in self.live() {
            let info = p.text(&["CLUSTER", "INFO"])?;
            for want in ["cluster_state:ok", "cluster_slots_ok:16384"] {
                if !info.lines().any(|l| l.trim() == want) {
                    return Err(format!("{}: no {want}", p.port));
                }
            }
            let view = p.view()?;
            let bad: Vec<&NodeLine> = view
                .iter()
                .filter(|l| {
                    ["handshake", "noaddr", "fail", "fail?"]
                        .iter()
                        .any(|f| l.has(f))
                })
                .collect();
            if view.len() != n || !bad.is_empty() {
                return Err(format!(
                    "{} sees {} nodes, unhealthy {bad:?}",
                    p.port,
                    view.len()
                ));
            }
            if let Some(q) = self
                .procs
                .iter()
                .find(|q| !view.iter().any(|l| l.port == q.port))
            {
                return Err(format!("{} does not know {}", p.port, q.port));
            }
            let masters = view
                .iter()
                .filter(|l| l.has("master") && !l.slots.is_empty())
                .count();
            let slaves = view.iter().filter(|l| l.has("slave")).count();
            if masters != self.primaries || slaves != self.primaries * self.replicas_per_primary {
                return Err(format!(
                    "{} sees {masters} primaries, {slaves} replicas",
                    p.port
                ));
            }
            let repl = p.text(&["INFO", "replication"])?;
            if repl.lines().any(|l| l.trim() == "role:slave")
                && !repl.lines().any(|l| l.trim() == "master_link_status:up")
            {
                return Err(format!("{}: replica link not up", p.port));
            }
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>` of every process (also killed ones),
    /// comma-separated: a node's `--redis-url` with `--redis-cluster`.
    pub fn seeds(&self) -> String {
        self.urls().join(",")
    }

    /// The URL of every process (also killed ones).
    pub fn urls(&self) -> Vec<String> {
        self.procs.iter().map(ClusterProc::url).collect()
    }

    /// The ports of every process (also killed ones), in creation order.
    pub fn ports(&self) -> Vec<u16> {
        self.procs.iter().map(|p| p.port).collect()
    }

    /// A cluster client seeded with every process.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::new(self.urls()).expect("cluster client")
    }

    /// A fresh (blocking) cluster connection.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        self.client().get_connection().expect("cluster connection")
    }

    /// A plain connection to one process (e.g. to inspect its keys).
    pub fn node_conn(&self, port: u16) -> redis::Connection {
        self.proc(port)
            .conn()
            .unwrap_or_else(|e| panic!("connection to {port}: {e}"))
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let p = self.live().next().expect("a live cluster process");
        let mut c = p.conn().expect("connection");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the process serving `key`'s slot as primary: a live one
    /// that says so itself; failing that (failover not done yet), the one
    /// the live processes name.
    pub fn primary_port_for_key(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        let views: Vec<(u16, Result<Vec<NodeLine>, String>)> =
            self.live().map(|p| (p.port, p.view())).collect();
        let own = views.iter().find_map(|(port, v)| {
            let me = v.as_ref().ok()?.iter().find(|l| l.has("myself"))?;
            me.serves(slot).then_some(*port)
        });
        let named = || {
            views
                .iter()
                .find_map(|(_, v)| Some(v.as_ref().ok()?.iter().find(|l| l.serves(slot))?.port))
        };
        own.or_else(named)
            .unwrap_or_else(|| panic!("no primary for slot {slot} ({key}): {views:?}"))
    }

    /// SIGKILL the process on `port` and keep it dead (its log is still
    /// printed if the test fails).
    pub fn kill_port(&mut self, port: u16) {
        let p = self.proc(port);
        let slots = p
            .view()
            .ok()
            .and_then(|v| v.into_iter().find(|l| l.has("myself") && l.has("master")))
            .map(|l| l.slots)
            .unwrap_or_default();
        self.served.insert(port, slots);
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.port == port)
            .expect("cluster process");
        p.kill();
        p.killed = true;
    }

    /// Wait until the slots `dead_port` served are served by a live process
    /// (which says so itself, as do all live processes) and every live
    /// process reports `cluster_state:ok`; how long that took.
    pub fn wait_failover(&self, dead_port: u16, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        let slots = self.served.get(&dead_port).cloned().unwrap_or_else(|| {
            self.live()
                .find_map(|p| p.view().ok())
                .and_then(|v| v.into_iter().find(|l| l.port == dead_port))
                .map(|l| l.slots)
                .unwrap_or_default()
        });
        let live: Vec<u16> = self.live().map(|p| p.port).collect();
        wait_until(
            &format!("failover of 127.0.0.1:{dead_port} ({slots:?})"),
            timeout,
            || {
                for p in self.live() {
                    let info = p.text(&["CLUSTER", "INFO"])?;
                    if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                        return Err(format!("{}: cluster_state not ok", p.port));
                    }
                    let view = p.view()?;
                    for &(a, _) in &slots {
                        let owner = view.iter().find(|l| l.serves(a)).map(|l| l.port);
                        match owner {
                            Some(o) if o != dead_port && live.contains(&o) => {
                                let me = self.proc(o).view()?;
                                if !me.iter().any(|l| l.has("myself") && l.serves(a)) {
                                    return Err(format!("{o} does not serve slot {a} yet"));
                                }
                            }
                            _ => return Err(format!("{} says slot {a} is on {owner:?}", p.port)),
                        }
                    }
                }
                Ok(())
            },
        );
        t0.elapsed()
    }

    /// The node id of the process on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        self.proc(port)
            .text(&["CLUSTER", "MYID"])
            .unwrap_or_else(|e| panic!("CLUSTER MYID: {e}"))
    }

    /// The ports of the live processes that serve slots as primaries (each
    /// says so itself), in creation order.
    pub fn primary_ports(&self) -> Vec<u16> {
        self.live()
            .filter(|p| {
                p.view().ok().is_some_and(|v| {
                    v.iter()
                        .any(|l| l.has("myself") && l.has("master") && !l.slots.is_empty())
                })
            })
            .map(|p| p.port)
            .collect()
    }

    /// Run `cmd` on the process on `port`; panics with `what` on an error.
    fn admin<T: redis::FromRedisValue>(&self, port: u16, what: &str, cmd: &redis::Cmd) -> T {
        let mut c = self
            .proc(port)
            .conn()
            .unwrap_or_else(|e| panic!("{what}: connection to {port}: {e}"));
        cmd.query(&mut c)
            .unwrap_or_else(|e| panic!("{what} on 127.0.0.1:{port}: {e}"))
    }

    /// Move the hash slot of `key` from its primary to the primary on
    /// `to_port` while clients keep using it, the way `redis-cli --cluster
    /// reshard` does: `SETSLOT IMPORTING` on the target, `SETSLOT MIGRATING`
    /// on the source, then rounds of `GETKEYSINSLOT <slot> 10` + `MIGRATE`
    /// on the source until it has no key of the slot left, then
    /// `SETSLOT NODE` on the target, the source and every other primary;
    /// finally waits until every live process names the target as the
    /// slot's owner and none shows it migrating or importing.
    ///
    /// `pause_each` is slept before the first `MIGRATE`, after each round
    /// and before `SETSLOT NODE`, so clients meet the migrating state:
    /// `ASK` for keys already moved (or new ones), `TRYAGAIN` for a
    /// multi-key command whose keys are split between the two.
    pub fn migrate_slot_of(&self, key: &str, to_port: u16, pause_each: Duration) -> SlotMigration {
        let t0 = Instant::now();
        let slot = self.keyslot(key);
        let from = self.primary_port_for_key(key);
        assert_ne!(from, to_port, "slot {slot} ({key}) is already on {to_port}");
        let primaries = self.primary_ports();
        assert!(
            primaries.contains(&to_port),
            "127.0.0.1:{to_port} is not a primary: {primaries:?}"
        );
        let src_id = self.node_id(from);
        let dst_id = self.node_id(to_port);
        let setslot = |state: &str, id: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(id);
            c
        };
        let () = self.admin(to_port, "SETSLOT IMPORTING", &setslot("IMPORTING", &src_id));
        let () = self.admin(from, "SETSLOT MIGRATING", &setslot("MIGRATING", &dst_id));
        let migrating_since = Instant::now();
        std::thread::sleep(pause_each);
        let (mut keys, mut rounds) = (0, 0);
        loop {
            let batch: Vec<Vec<u8>> = self.admin(
                from,
                "GETKEYSINSLOT",
                redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(10),
            );
            if batch.is_empty() {
                break;
            }
            // No REPLACE: a key on both sides would be a bug of the
            // procedure (clients only create keys on the target via ASK
            // once the source has none of them).
            let _: redis::Value = self.admin(
                from,
                "MIGRATE",
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to_port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&batch),
            );
            keys += batch.len();
            rounds += 1;
            std::thread::sleep(pause_each);
        }
        let () = self.admin(to_port, "SETSLOT NODE (target)", &setslot("NODE", &dst_id));
        let () = self.admin(from, "SETSLOT NODE (source)", &setslot("NODE", &dst_id));
        for &p in primaries.iter().filter(|&&p| p != from && p != to_port) {
            let () = self.admin(p, "SETSLOT NODE", &setslot("NODE", &dst_id));
        }
        let migrating = migrating_since.elapsed();
        let marks = [format!("[{slot}->-"), format!("[{slot}-<-")];
        wait_until(
            &format!("every process: slot {slot} on 127.0.0.1:{to_port}"),
            Duration::from_secs(10),
            || {
                for p in self.live() {
                    let text = p.text(&["CLUSTER", "NODES"])?;
                    if let Some(m) = marks.iter().find(|m| text.contains(m.as_str())) {
                        return Err(format!("{} still shows {m}…", p.port));
                    }
                    let owners: Vec<u16> = text
                        .lines()
                        .filter_map(NodeLine::parse)
                        .filter(|l| l.serves(slot))
                        .map(|l| l.port)
                        .collect();
                    if owners != [to_port] {
                        return Err(format!("{} says slot {slot} is on {owners:?}", p.port));
                    }
                }
                Ok(())
            },
        );
        SlotMigration {
            slot,
            from,
            to: to_port,
            keys,
            rounds,
            migrating,
            took: t0.elapsed(),
        }
    }

    /// Error replies by kind summed over the live processes (`INFO
    /// errorstats`: `ASK`, `MOVED`, `TRYAGAIN`, …).
    pub fn error_stats(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for p in self.live() {
            let Ok(info) = p.text(&["INFO", "errorstats"]) else {
                continue;
            };
            for line in info.lines() {
                // errorstat_ASK:count=3
                let Some((kind, rest)) = line.trim().split_once(':') else {
                    continue;
                };
                let Some(kind) = kind.strip_prefix("errorstat_") else {
                    continue;
                };
                let n: u64 = rest
                    .strip_prefix("count=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                *out.entry(kind.to_owned()).or_insert(0) += n;
            }
        }
        out
    }

    /// Commands that failed or were rejected (redirected), summed over the
    /// live processes (`INFO commandstats`): name → (failed, rejected).
    pub fn failed_calls(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for p in self.live() {
            let Ok(info) = p.text(&["INFO", "commandstats"]) else {
                continue;
            };
            for line in info.lines() {
                // cmdstat_xack:calls=1,usec=…,rejected_calls=0,failed_calls=0
                let Some((name, rest)) = line.trim().split_once(':') else {
                    continue;
                };
                let Some(name) = name.strip_prefix("cmdstat_") else {
                    continue;
                };
                let field = |f: &str| -> u64 {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('=')?.parse().ok())
                        .unwrap_or(0)
                };
                let (failed, rejected) = (field("failed_calls"), field("rejected_calls"));
                if failed + rejected > 0 {
                    let e = out.entry(name.to_owned()).or_insert((0, 0));
                    e.0 += failed;
                    e.1 += rejected;
                }
            }
        }
        out
    }

    /// `CONFIG RESETSTAT` on every live process (zeroes `error_stats`).
    pub fn reset_stats(&self) {
        for p in self.live() {
            let _ = p.text(&["CONFIG", "RESETSTAT"]);
        }
    }

    /// Every process's log (and redis-cli's), with headers.
    pub fn log(&self) -> String {
        let mut s = format!("---- redis-cli --cluster create ----\n{}", self.cli_log());
        for p in &self.procs {
            let dead = if p.killed { " (killed)" } else { "" };
            s.push_str(&format!(
                "---- redis-server cluster node 127.0.0.1:{}{dead} ----\n{}",
                p.port,
                p.log()
            ));
        }
        s
    }
}

/// What [`RedisCluster::migrate_slot_of`] did.
#[derive(Debug, Clone)]
pub struct SlotMigration {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    /// Keys moved with `MIGRATE`, in `rounds` rounds.
    pub keys: usize,
    pub rounds: usize,
    /// From `SETSLOT MIGRATING` until `SETSLOT NODE` on every primary.
    pub migrating: Duration,
    /// Until every process agreed on the new owner.
    pub took: Duration,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        for p in &mut self.procs {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A node: a child process of the built binary. Its log is captured and
/// printed if the test failed.
pub struct NodeProc {
    pub addr: String,
    child: Child,
    log: Arc<Mutex<String>>,
    pub name: String,
}

/// Node arguments without `--dev`, with the given heartbeat and lease TTL.
pub fn timed_args(
    redis_url: &str,
    heartbeat_ms: &str,
    ttl_ms: &str,
    extra: &[&str],
) -> Vec<String> {
    // A comma list is a Redis Cluster seed list (the node insists on the
    // flag for one).
    let cluster: &[&str] = if redis_url.contains(',') {
        &["--redis-cluster"]
    } else {
        &[]
    };
    let mut v: Vec<String> = [
        "--redis-url",
        redis_url,
        "--heartbeat-ms",
        heartbeat_ms,
        "--lease-ttl-ms",
        ttl_ms,
        "--drain-ms",
        "1000",
        "--jwt-secret",
        SECRET,
        "--api-key",
        API_KEY,
    ]
    .iter()
    .chain(cluster)
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Fast timings for tests (heartbeat 200 ms, lease 1 s), with `--dev`.
pub fn fast_args(redis: &Redis) -> Vec<String> {
    timed_args(&redis.url(), "200", "1000", &["--dev"])
}

impl NodeProc {
    pub fn start(name: &str, args: &[String]) -> NodeProc {
        Self::start_env(name, args, &[])
    }

    pub fn start_env(name: &str, args: &[String], env: &[(&str, &str)]) -> NodeProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wscluster"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info,wscluster=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn wscluster");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&strip_ansi(&line));
                        l.push('\n');
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let found = log.lock().ok().and_then(|l| {
                // Text logs: `listen=ADDR`; JSON logs: `"listen":"ADDR"`.
                if let Some(rest) = l.split("listen=").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
                let rest = l.split("\"listen\":\"").nth(1)?;
                rest.split('"').next().map(str::to_owned)
            });
            if let Some(a) = found {
                break a;
            }
            if Instant::now() > deadline {
                // Not yet owned by a NodeProc: kill it here or it outlives the test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {name} did not start:\n{}", log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        NodeProc {
            addr,
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Wait for the process to exit; its status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let url = self.http("/readyz");
        eventually(
            &format!("{} ready", self.name),
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let r = reqwest::get(&url).await.ok()?;
                    (r.status() == 200).then_some(())
                }
            },
        )
        .await;
    }

    pub async fn cluster(&self) -> Value {
        reqwest::get(self.http("/cluster"))
            .await
            .expect("GET /cluster")
            .json()
            .await
            .expect("cluster json")
    }

    pub async fn node_id(&self) -> String {
        self.cluster().await["node"]
            .as_str()
            .expect("node id")
            .to_owned()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.name, self.log());
        }
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Start a redis-server and `n` nodes with fast timings, all ready.
pub async fn cluster(n: usize) -> (Redis, Vec<NodeProc>) {
    cluster_with(n, &[]).await
}

pub async fn cluster_with(n: usize, extra: &[&str]) -> (Redis, Vec<NodeProc>) {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    args.extend(extra.iter().map(|s| s.to_string()));
    let nodes: Vec<NodeProc> = (0..n)
        .map(|i| NodeProc::start(&format!("n{i}"), &args))
        .collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    (redis, nodes)
}

/// A HS256 token for `sub`, valid for an hour, with optional topics.
pub fn token(sub: &str, topics: Option<&[&str]>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(t) = topics {
        claims["topics"] = json!(t);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client.
pub struct Client {
    ws: Ws,
    pub welcome: Value,
    /// Frames read but not yet taken.
    pub backlog: Vec<Value>,
}

/// How a connection attempt ended before the upgrade.
pub async fn connect_status(url: &str) -> u16 {
    match connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("connect {url}: {e}"),
    }
}

impl Client {
    /// Connect with `?user=` (dev) and read the welcome.
    pub async fn dev(node: &NodeProc, user: &str) -> Client {
        Self::connect(&node.ws_url(&format!("user={user}"))).await
    }

    /// Connect with a token.
    pub async fn token(node: &NodeProc, user: &str, topics: Option<&[&str]>) -> Client {
        Self::connect(&node.ws_url(&format!("token={}", token(user, topics)))).await
    }

    pub async fn connect(url: &str) -> Client {
        let req = url.into_client_request().expect("request");
        let (ws, _) = tokio::time::timeout(Duration::from_secs(10), connect_async(req))
            .await
            .expect("connect timeout")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = Client {
            ws,
            welcome: Value::Null,
            backlog: Vec::new(),
        };
        let w = c
            .next_frame(Duration::from_secs(10))
            .await
            .expect("welcome");
        assert_eq!(w["type"], "welcome", "first frame must be welcome: {w}");
        c.welcome = w;
        c
    }

    pub fn conn_id(&self) -> String {
        self.welcome["conn"].as_str().unwrap_or_default().to_owned()
    }

    pub fn node(&self) -> String {
        self.welcome["node"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(WsMessage::Text(s.to_owned().into()))
            .await
            .expect("ws send");
    }

    /// Next JSON frame, or None on close/timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Value> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(WsMessage::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Read until a frame matches `pred` (others are kept in the backlog).
    pub async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(msg) = tokio::time::timeout(left, self.ws.next())
                .await
                .ok()
                .flatten()
            else {
                panic!("no frame matching {what} within {timeout:?}; saw {seen:?}");
            };
            match msg {
                Ok(WsMessage::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
                    if pred(&v) {
                        self.backlog.extend(seen);
                        return v;
                    }
                    seen.push(v);
                }
                Ok(WsMessage::Close(c)) => {
                    panic!("closed ({c:?}) while waiting for {what}; saw {seen:?}")
                }
                Err(e) => panic!("error {e} while waiting for {what}; saw {seen:?}"),
                Ok(_) => {}
            }
        }
    }

    /// Collect `message` frames until `n` distinct ids are seen.
    pub async fn messages(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while ids.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(v) if v["type"] == "message" => {
                    ids.insert(v["id"].as_str().unwrap_or_default().to_owned());
                    out.push(v);
                }
                Some(_) => {}
                None => panic!("got {} of {n} messages: {:?}", ids.len(), out.last()),
            }
        }
        out
    }

    /// Read until the server closes: the message ids seen and the close code.
    pub async fn until_close(&mut self, timeout: Duration) -> (Vec<String>, Option<u16>) {
        let mut ids: Vec<String> = self
            .backlog
            .drain(..)
            .filter(|v| v["type"] == "message")
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return (ids, None);
            };
            match msg {
                Ok(WsMessage::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                        && v["type"] == "message"
                    {
                        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                }
                Ok(WsMessage::Close(f)) => return (ids, f.map(|f| f.code.into())),
                Err(_) => return (ids, None),
                Ok(_) => {}
            }
        }
    }

    /// The close code the server sends next (None if none within timeout).
    pub async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        self.until_close(timeout).await.1
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Matches the `message` frame with entry id `id`.
pub fn is_msg(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["type"] == "message" && v["id"] == id
}

/// `XADD <p>:send * to <user> payload <json>`.
pub fn xadd_to(r: &mut impl redis::ConnectionLike, user: &str, payload: &str) -> String {
    try_xadd_to(r, user, payload).expect("xadd")
}

/// [`xadd_to`] that returns the error.
pub fn try_xadd_to(
    r: &mut impl redis::ConnectionLike,
    user: &str,
    payload: &str,
) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("to")
        .arg(user)
        .arg("payload")
        .arg(payload)
        .query(r)
}

/// `n` messages for `user` in `<p>:send`, payloads of about `pad` bytes
/// (`{"n": i, "pad": "ppp…"}`), pipelined 500 at a time; their ids.
pub fn send_many(
    r: &mut impl redis::ConnectionLike,
    user: &str,
    n: usize,
    pad: usize,
) -> Vec<String> {
    let pad = "p".repeat(pad);
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(500) {
        let mut pipe = redis::pipe();
        for i in start..n.min(start + 500) {
            pipe.cmd("XADD")
                .arg("wsc:send")
                .arg("*")
                .arg("to")
                .arg(user)
                .arg("payload")
                .arg(json!({"n": i, "pad": pad}).to_string());
        }
        let v: Vec<String> = pipe.query(r).expect("xadd");
        ids.extend(v);
    }
    ids
}

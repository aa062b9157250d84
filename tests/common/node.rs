//! Nodes: child processes of the built `wscluster` binary (launched by the
//! testkit, their log kept in memory and printed if the test fails), the
//! arguments tests give them, and whole clusters of them.

use std::path::Path;
use std::time::Duration;

use redis::Commands;
use serde_json::Value;
use wscluster_testkit::{NodeLog, NodeProcess};

use super::redis::Redis;
use super::{API_KEY, SECRET};

/// A node: a child process of the built binary. Its log is captured and
/// printed if the test failed.
pub struct NodeProc {
    pub addr: String,
    pub name: String,
    process: NodeProcess,
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

    /// Start it (on a port of 127.0.0.1 the launcher picks, debug logs,
    /// `env` on top) and wait until it answers `/healthz`.
    pub fn start_env(name: &str, args: &[String], env: &[(&str, &str)]) -> NodeProc {
        let mut vars = vec![("RUST_LOG", "info,wscluster=debug")];
        vars.extend_from_slice(env);
        let bin = Path::new(env!("CARGO_BIN_EXE_wscluster"));
        let process = NodeProcess::launch(
            bin,
            name,
            args,
            &vars,
            NodeLog::Memory,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let addr = process.addr().to_owned();
        NodeProc {
            addr,
            name: name.to_owned(),
            process,
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    pub fn signal(&self, sig: i32) {
        self.process.signal(sig);
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Wait for the process to exit; its status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.process.wait_exit(timeout).await
    }

    pub async fn wait_ready(&self) {
        let timeout = Duration::from_secs(10);
        if let Err(e) = wscluster_testkit::http::wait_ready(&self.addr, timeout).await {
            panic!(
                "timed out after {timeout:?} waiting for: {} ready ({e:#})",
                self.name
            );
        }
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

    /// SIGTERM it and watch `clients` (its connections): each one's close
    /// code and when it came, then the exit status and when it came, all
    /// timed from the signal.
    pub async fn drain_watched(
        &mut self,
        clients: &mut [super::Client],
        close_within: Duration,
        exit_within: Duration,
    ) -> Drained {
        let t0 = std::time::Instant::now();
        self.signal(libc::SIGTERM);
        let closes = futures::future::join_all(clients.iter_mut().map(|c| async move {
            let (_, code) = c.until_close(close_within).await;
            (code, t0.elapsed())
        }))
        .await;
        let status = self.wait_exit(exit_within).await;
        Drained {
            closes,
            status,
            exit_after: t0.elapsed(),
        }
    }
}

/// Wait until node `id` is reaped (or has left): no `<p>:nodes` member,
/// no inbox, no connection index.
pub async fn node_gone(redis: &Redis, id: &str) {
    let key = format!("wsc:inbox:{{{id}}}");
    let index = format!("wsc:conns:{{{id}}}");
    super::eventually(
        &format!("node {id} reaped"),
        Duration::from_secs(10),
        || {
            let mut r = redis.conn();
            let (id, key, index) = (id.to_owned(), key.clone(), index.clone());
            async move {
                let member: Option<f64> = r.zscore("wsc:nodes", &id).ok()?;
                let inbox: bool = r.exists(&key).ok()?;
                let idx: bool = r.exists(&index).ok()?;
                (member.is_none() && !inbox && !idx).then_some(())
            }
        },
    )
    .await;
}

/// What [`NodeProc::drain_watched`] saw.
pub struct Drained {
    /// Per client: its close code, and when it came.
    pub closes: Vec<(Option<u16>, Duration)>,
    pub status: Option<i32>,
    pub exit_after: Duration,
}

/// Start a redis-server and `n` nodes with fast timings, all ready.
pub async fn cluster(n: usize) -> (Redis, Vec<NodeProc>) {
    cluster_with(n, &[]).await
}

pub async fn cluster_with(n: usize, extra: &[&str]) -> (Redis, Vec<NodeProc>) {
    let redis = Redis::start();
    let mut args = fast_args(&redis);
    // A flag already among the fast ones takes the new value.
    let mut rest = extra.iter();
    while let Some(a) = rest.next() {
        match args.iter().position(|x| x == a) {
            Some(i)
                if a.starts_with("--") && args.get(i + 1).is_some_and(|v| !v.starts_with("--")) =>
            {
                args[i + 1] = rest.next().map(|v| v.to_string()).unwrap_or_default();
            }
            _ => args.push(a.to_string()),
        }
    }
    let nodes: Vec<NodeProc> = (0..n)
        .map(|i| NodeProc::start(&format!("n{i}"), &args))
        .collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    (redis, nodes)
}

/// A counter or gauge from the node's `/metrics` (None if absent).
pub async fn metric(node: &NodeProc, name: &str) -> Option<f64> {
    let text = reqwest::get(node.http("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

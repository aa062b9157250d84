//! The cluster under test: either an existing one (`--ws-urls`,
//! `--redis-url`, `--redis-cluster`) or a local one this program starts and
//! stops — a `redis-server` on a free port (or, with
//! `--redis-cluster-primaries N`, a Redis Cluster of N of them) and N nodes
//! of the built `wscluster` binary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use wscluster::Connector;
use wscluster_testkit::http::{get as http_get, wait_ready};
use wscluster_testkit::{ClusterSpec, NodeLog, NodeProcess, RedisCluster, RedisServer, tmpdir};

pub use wscluster_testkit::http::resolve;

/// Where the cluster comes from and how local nodes are started.
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterOpts {
    /// Drive an existing cluster: its nodes, comma-separated
    /// (`ws://host:port`, `http://host:port` or `host:port`). Needs `--redis-url`.
    #[arg(long, value_delimiter = ',')]
    pub ws_urls: Vec<String>,
    /// The Redis of an existing cluster (with `--ws-urls`): a URL, or with
    /// `--redis-cluster` a comma list of Redis Cluster seeds.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// The existing cluster's `--redis-url` is a Redis Cluster (seed list).
    #[arg(long)]
    pub redis_cluster: bool,
    /// Start the local cluster on a Redis Cluster of N primaries (no
    /// replicas, all on this machine) instead of one `redis-server`;
    /// 0: one `redis-server`.
    #[arg(long, default_value_t = 0)]
    pub redis_cluster_primaries: usize,
    /// Redis key prefix of the cluster (passed to local nodes too).
    #[arg(long, default_value = "wsc")]
    pub prefix: String,
    /// The `wscluster` binary for local nodes (default: next to this program).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// `--heartbeat-ms` for local nodes (default: the node's own, 1000).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// `--lease-ttl-ms` for local nodes (default: the node's own, 5000).
    #[arg(long)]
    pub lease_ttl_ms: Option<u64>,
    /// Send streams (`--send-shards` of the nodes): the producer adds each
    /// message to shard CRC32(user or topic) mod K, as an app must.
    #[arg(long, default_value_t = 1)]
    pub send_shards: u32,
    /// Extra argument for local nodes (repeat for several).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Keep the local cluster's logs (their directory is printed).
    #[arg(long)]
    pub keep_logs: bool,
}

impl ClusterOpts {
    pub fn external(&self) -> bool {
        !self.ws_urls.is_empty()
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.unwrap_or(1000))
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.unwrap_or(5000))
    }
}

/// The Redis of a local cluster (testkit's launchers).
pub enum LocalRedis {
    Single(RedisServer),
    /// Primaries only, all on this machine.
    Cluster(RedisCluster),
}

impl LocalRedis {
    /// `--redis-url` for the nodes: a URL, or a comma list of seed URLs.
    fn url(&self) -> String {
        match self {
            LocalRedis::Single(r) => r.url(),
            LocalRedis::Cluster(c) => c.seeds(),
        }
    }

    /// The process ids (a Redis Cluster's in the order they were started).
    fn pids(&self) -> Vec<i32> {
        match self {
            LocalRedis::Single(r) => r.pid().into_iter().collect(),
            LocalRedis::Cluster(c) => c.pids(),
        }
    }
}

/// A node of the cluster: its address, and its process if local.
pub struct Node {
    /// `host:port` of its HTTP/WebSocket listener.
    pub addr: String,
    /// The local process (killed on drop); None for an existing cluster.
    pub process: Option<NodeProcess>,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(NodeProcess::pid)
    }

    /// SIGKILL the local process and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }
}

pub struct Cluster {
    /// A URL, or on a Redis Cluster a comma list of seed URLs.
    pub redis_url: String,
    pub redis_cluster: bool,
    pub prefix: String,
    pub send_shards: u32,
    pub nodes: Vec<Node>,
    /// The local Redis: one `redis-server`, or a local Redis Cluster; None
    /// for an existing cluster.
    pub redis: Option<LocalRedis>,
    dir: Option<PathBuf>,
    keep_logs: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first, then Redis.
        self.nodes.clear();
        self.redis = None;
        if let Some(d) = &self.dir {
            if self.keep_logs {
                eprintln!("logs kept in {}", d.display());
            } else {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

fn node_bin(opts: &ClusterOpts) -> Result<PathBuf> {
    if let Some(p) = &opts.node_bin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", exe.display()))?;
    let p = dir.join("wscluster");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build -p wscluster, with this program's profile) \
                 or pass --node-bin",
            p.display()
        );
    }
    Ok(p)
}

impl Cluster {
    /// The cluster to drive: the existing one, or a new local one with `n`
    /// nodes, all ready.
    pub async fn setup(opts: &ClusterOpts, n: usize) -> Result<Cluster> {
        if opts.external() {
            let redis_url = opts
                .redis_url
                .clone()
                .ok_or_else(|| anyhow!("--ws-urls needs --redis-url"))?;
            if opts.redis_cluster_primaries > 0 {
                bail!(
                    "--redis-cluster-primaries starts a local Redis Cluster: with --ws-urls, \
                     pass the existing one's seeds as --redis-url and set --redis-cluster"
                );
            }
            if redis_url.contains(',') && !opts.redis_cluster {
                bail!(
                    "--redis-url holds several URLs: a Redis Cluster seed list needs --redis-cluster"
                );
            }
            let nodes = opts
                .ws_urls
                .iter()
                .map(|u| Node {
                    addr: host_port(u),
                    process: None,
                })
                .collect();
            return Ok(Cluster {
                redis_url,
                redis_cluster: opts.redis_cluster,
                prefix: opts.prefix.clone(),
                send_shards: opts.send_shards.max(1),
                nodes,
                redis: None,
                dir: None,
                keep_logs: false,
            });
        }
        if opts.redis_cluster {
            bail!(
                "--redis-cluster describes an existing cluster's --redis-url (with --ws-urls); \
                 for a local Redis Cluster use --redis-cluster-primaries N"
            );
        }
        let bin = node_bin(opts)?;
        let dir = tmpdir("bench").context("scratch directory")?;
        let redis_cluster = opts.redis_cluster_primaries > 0;
        let redis = if redis_cluster {
            // No replicas; a node timeout of 2 s, so a loaded machine does
            // not fail a primary in the middle of a run.
            LocalRedis::Cluster(RedisCluster::launch(&ClusterSpec {
                node_timeout_ms: 2000,
                dir: Some(dir.join("redis-cluster")),
                ..ClusterSpec::new(opts.redis_cluster_primaries, 0)
            })?)
        } else {
            LocalRedis::Single(RedisServer::start(&dir)?)
        };
        let mut c = Cluster {
            redis_url: redis.url(),
            redis_cluster,
            prefix: opts.prefix.clone(),
            send_shards: opts.send_shards.max(1),
            nodes: Vec::new(),
            redis: Some(redis),
            dir: Some(dir.clone()),
            keep_logs: opts.keep_logs,
        };
        let mut args: Vec<String> = vec![
            "--redis-url".into(),
            c.redis_url.clone(),
            "--prefix".into(),
            opts.prefix.clone(),
            "--dev".into(),
            "--max-msgs-per-sec".into(),
            "1000000".into(),
            "--max-connections".into(),
            "100000".into(),
            "--drain-ms".into(),
            "1000".into(),
        ];
        if redis_cluster {
            args.push("--redis-cluster".into());
        }
        if let Some(h) = opts.heartbeat_ms {
            args.extend(["--heartbeat-ms".into(), h.to_string()]);
        }
        if let Some(t) = opts.lease_ttl_ms {
            args.extend(["--lease-ttl-ms".into(), t.to_string()]);
        }
        if opts.send_shards > 1 {
            args.extend(["--send-shards".into(), opts.send_shards.to_string()]);
        }
        args.extend(opts.node_args.iter().cloned());
        for i in 0..n {
            let log = NodeLog::File(dir.join(format!("node{i}.log")));
            let p = NodeProcess::launch(
                &bin,
                &i.to_string(),
                &args,
                &[("RUST_LOG", "info")],
                log,
                Duration::from_secs(15),
            )?;
            c.nodes.push(Node {
                addr: p.addr().to_owned(),
                process: Some(p),
            });
        }
        for (i, node) in c.nodes.iter().enumerate() {
            wait_ready(&node.addr, Duration::from_secs(15))
                .await
                .with_context(|| format!("node {i} at {} not ready", node.addr))?;
        }
        Ok(c)
    }

    /// The send stream for a user or topic (contract §5: shard n =
    /// CRC32(name) mod K; shard 0 is `<p>:send`).
    pub fn send_key(&self, name: &str) -> String {
        self.keys()
            .send(wscluster::keys::shard_of(name, self.send_shards))
    }

    /// The cluster's key names (the server's own key module).
    pub fn keys(&self) -> wscluster::keys::Keys {
        wscluster::keys::Keys::new(&self.prefix)
    }

    /// Connections to the cluster's Redis (single or Redis Cluster): every
    /// Redis access of the benchmark goes through it.
    pub fn connector(&self) -> Result<Connector> {
        Connector::open(&self.redis_url, self.redis_cluster)
            .with_context(|| format!("Redis at {}", self.redis_url))
    }

    /// The local Redis processes (so their CPU can be read).
    pub fn redis_pids(&self) -> Vec<i32> {
        self.redis
            .as_ref()
            .map(LocalRedis::pids)
            .unwrap_or_default()
    }

    /// The primaries of a local Redis Cluster (None: a single Redis, or an
    /// existing cluster).
    pub fn redis_primaries(&self) -> Option<usize> {
        match &self.redis {
            Some(LocalRedis::Cluster(c)) => Some(c.pids().len()),
            _ => None,
        }
    }

    pub fn node_pids(&self) -> Vec<i32> {
        self.nodes.iter().filter_map(|n| n.pid()).collect()
    }

    pub fn local(&self) -> bool {
        self.redis.is_some()
    }

    /// Commands Redis has run since the last `reset` (`INFO commandstats`,
    /// summed over every seed: the primaries of a local Redis Cluster). A
    /// script's inner calls count, as Redis counts them; the benchmark's
    /// own `CONFIG`/`INFO` do not. `reset`: zero the counts first (`CONFIG
    /// RESETSTAT`) and return 0. None if a Redis did not answer.
    pub async fn redis_commands(&self, reset: bool) -> Option<u64> {
        let mut total = 0;
        for url in self.redis_url.split(',') {
            let client = redis::Client::open(url.trim()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            if reset {
                let _: () = redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                continue;
            }
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .ok()?;
            total += info
                .lines()
                .filter_map(|l| l.strip_prefix("cmdstat_"))
                .filter(|l| !l.starts_with("config|") && !l.starts_with("info:"))
                .filter_map(|l| {
                    l.split("calls=")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>();
        }
        Some(total)
    }
}

/// `ws://h:p/...`, `http://h:p` or `h:p` → `h:p`.
pub fn host_port(url: &str) -> String {
    let s = url.split("://").nth(1).unwrap_or(url);
    s.split('/').next().unwrap_or(s).to_owned()
}

/// `/cluster` of a node, as JSON.
pub async fn cluster_view(addr: &str) -> Result<serde_json::Value> {
    let (status, body) = http_get(addr, "/cluster").await?;
    if status != 200 {
        bail!("GET /cluster on {addr}: {status}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// A gauge or counter from a node's `/metrics`.
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await.ok()?;
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name || k.starts_with(&format!("{name}{{"))).then(|| v.trim().parse().ok())?
    })
}

/// Resident memory of a process, bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time used by a process so far (user + system), seconds.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// CPU seconds of Redis, the nodes and this program, at one moment.
#[derive(Clone, Debug, Default)]
pub struct CpuSnap {
    /// All local Redis processes together.
    pub redis: f64,
    /// Each local Redis process (the primaries of a local Redis Cluster).
    pub redis_each: Vec<f64>,
    pub nodes: f64,
    pub bench: f64,
    /// Busy CPU seconds of the whole machine (all cores, `/proc/stat`).
    pub machine: f64,
}

/// Busy CPU seconds of the whole machine so far (user, nice, system, irq,
/// softirq, steal over all cores).
fn machine_busy_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some(busy as f64 / tck)
}

impl CpuSnap {
    pub fn take(c: &Cluster) -> CpuSnap {
        let redis_each: Vec<f64> = c
            .redis_pids()
            .into_iter()
            .map(|p| cpu_seconds(p).unwrap_or(0.0))
            .collect();
        CpuSnap {
            redis: redis_each.iter().sum(),
            redis_each,
            nodes: c.node_pids().into_iter().filter_map(cpu_seconds).sum(),
            bench: cpu_seconds(std::process::id() as i32).unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// Each process group's CPU use between `self` and `later`, in percent
    /// of one core over `window` seconds.
    pub fn usage(&self, later: &CpuSnap, window: f64, local: bool) -> serde_json::Value {
        if !local || window <= 0.0 {
            return serde_json::json!({
                "bench_pct": round1((later.bench - self.bench) / window.max(1e-9) * 100.0),
            });
        }
        let pct = |a: f64, b: f64| round1((b - a) / window * 100.0);
        let ours =
            (later.redis - self.redis) + (later.nodes - self.nodes) + (later.bench - self.bench);
        let mut v = serde_json::json!({
            "redis_pct": pct(self.redis, later.redis),
            "nodes_pct": pct(self.nodes, later.nodes),
            "bench_pct": pct(self.bench, later.bench),
            // Everything else on the machine (other processes, kernel
            // threads): load this benchmark did not make.
            "other_pct": round1(((later.machine - self.machine) - ours).max(0.0) / window * 100.0),
            "machine_pct": pct(self.machine, later.machine),
        });
        if self.redis_each.len() > 1 {
            // Per Redis Cluster primary, in the order they were started
            // (`redis-cli --cluster create` gives them the slots low → high).
            v["redis_each_pct"] = self
                .redis_each
                .iter()
                .zip(&later.redis_each)
                .map(|(a, b)| pct(*a, *b))
                .collect();
        }
        v
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

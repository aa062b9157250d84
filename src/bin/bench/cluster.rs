//! The cluster under test: either an existing one (`--ws-urls`,
//! `--redis-url`, `--redis-cluster`) or a local one this program starts and
//! stops — a `redis-server` on a free port (or, with
//! `--redis-cluster-primaries N`, a Redis Cluster of N of them) and N nodes
//! of the built `wscluster` binary.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wscluster::redis::conn::Connector;

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

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tmpdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "wsc-bench-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}

/// A `redis-server` child on a free port, no persistence: a plain one, or
/// one cluster-enabled node of a local Redis Cluster ([`start_redis_cluster`]).
pub struct RedisProc {
    pub port: u16,
    child: Child,
}

impl RedisProc {
    /// A plain `redis-server` (its files and `redis.log` in `dir`).
    pub fn start(dir: &Path) -> Result<RedisProc> {
        RedisProc::launch(dir, false)
    }

    /// A cluster-enabled `redis-server` holding no slots yet: its own
    /// `--dir`, `nodes-<port>.conf` and `redis-<port>.log` in `dir`.
    fn start_cluster_node(dir: &Path) -> Result<RedisProc> {
        RedisProc::launch(dir, true)
    }

    fn launch(dir: &Path, cluster: bool) -> Result<RedisProc> {
        for _ in 0..8 {
            let port = if cluster {
                free_cluster_port()?
            } else {
                free_port()?
            };
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"]);
            if cluster {
                let own = dir.join(format!("redis-{port}"));
                std::fs::create_dir_all(&own)
                    .with_context(|| format!("create {}", own.display()))?;
                let conf = dir.join(format!("nodes-{port}.conf"));
                let log = dir.join(format!("redis-{port}.log"));
                cmd.args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &conf.to_string_lossy()])
                    .args(["--cluster-node-timeout", "2000"])
                    .args(["--dir", &own.to_string_lossy()])
                    .args(["--logfile", &log.to_string_lossy()]);
            } else {
                cmd.args(["--dir", &dir.to_string_lossy()])
                    .args(["--logfile", &dir.join("redis.log").to_string_lossy()]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start redis-server (is the redis-server package installed?)")?;
            let mut r = RedisProc { port, child };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = r.child.try_wait() {
                    break; // port clash: try another
                }
                if r.query(&redis::cmd("PING")).is_ok() {
                    return Ok(r);
                }
                if Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("could not start redis-server (see {})", dir.display())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A command on this very process (not routed), as text.
    fn query(&self, cmd: &redis::Cmd) -> redis::RedisResult<String> {
        let mut c = redis::Client::open(self.url())?
            .get_connection_with_timeout(Duration::from_millis(200))?;
        cmd.query(&mut c)
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port for a cluster node: its bus port (+10000) must be free too,
/// and so at most 65535.
fn free_cluster_port() -> Result<u16> {
    for _ in 0..100 {
        let p = free_port()?;
        if p <= 55_535 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port pair (p, p + 10000) for a Redis Cluster node")
}

/// A local Redis Cluster: `n` cluster-enabled `redis-server`s, no replicas,
/// the 16384 slots split evenly, every one reporting `cluster_state:ok`.
/// Joined by `redis-cli --cluster create` (which wants 3 primaries at
/// least; below that the slots are assigned and the nodes met by hand).
pub fn start_redis_cluster(dir: &Path, n: usize) -> Result<Vec<RedisProc>> {
    let procs = (0..n.max(1))
        .map(|_| RedisProc::start_cluster_node(dir))
        .collect::<Result<Vec<_>>>()?;
    if procs.len() >= 3 {
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(procs.iter().map(|r| format!("127.0.0.1:{}", r.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("run redis-cli --cluster create (redis-tools package)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    } else {
        let k = procs.len();
        for (i, r) in procs.iter().enumerate() {
            let (lo, hi) = (16_384 * i / k, 16_384 * (i + 1) / k - 1);
            r.query(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(lo).arg(hi))
                .with_context(|| format!("CLUSTER ADDSLOTSRANGE on port {}", r.port))?;
        }
        for r in &procs[1..] {
            procs[0]
                .query(
                    redis::cmd("CLUSTER")
                        .arg("MEET")
                        .arg("127.0.0.1")
                        .arg(r.port),
                )
                .with_context(|| format!("CLUSTER MEET port {}", r.port))?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in &procs {
        loop {
            let info = r.query(redis::cmd("CLUSTER").arg("INFO"));
            if info
                .as_deref()
                .is_ok_and(|i| i.contains("cluster_state:ok"))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "Redis Cluster node on port {} not ok within 30 s: {info:?} (logs in {})",
                    r.port,
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(procs)
}

/// A node of the cluster: its address, and its process if local.
pub struct Node {
    /// `host:port` of its HTTP/WebSocket listener.
    pub addr: String,
    pub child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL the local process and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    /// A URL, or on a Redis Cluster a comma list of seed URLs.
    pub redis_url: String,
    pub redis_cluster: bool,
    pub prefix: String,
    pub send_shards: u32,
    pub nodes: Vec<Node>,
    /// The local Redis processes: one `redis-server`, or the primaries of
    /// a local Redis Cluster; none for an existing cluster.
    pub redis: Vec<RedisProc>,
    dir: Option<PathBuf>,
    keep_logs: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first, then Redis.
        self.nodes.clear();
        self.redis.clear();
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
            "{} not found: build it (cargo build --release --bins) or pass --node-bin",
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
                    child: None,
                })
                .collect();
            return Ok(Cluster {
                redis_url,
                redis_cluster: opts.redis_cluster,
                prefix: opts.prefix.clone(),
                send_shards: opts.send_shards.max(1),
                nodes,
                redis: Vec::new(),
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
        let dir = tmpdir()?;
        let redis_cluster = opts.redis_cluster_primaries > 0;
        let redis = if redis_cluster {
            start_redis_cluster(&dir, opts.redis_cluster_primaries)?
        } else {
            vec![RedisProc::start(&dir)?]
        };
        let urls: Vec<String> = redis.iter().map(RedisProc::url).collect();
        let mut c = Cluster {
            redis_url: urls.join(","),
            redis_cluster,
            prefix: opts.prefix.clone(),
            send_shards: opts.send_shards.max(1),
            nodes: Vec::new(),
            redis,
            dir: Some(dir.clone()),
            keep_logs: opts.keep_logs,
        };
        let mut args: Vec<String> = vec![
            "--redis-url".into(),
            c.redis_url.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
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
        let mut pending = Vec::new();
        for i in 0..n {
            pending.push(spawn_node(&bin, &args, &dir, i)?);
        }
        for (i, (child, log_path, addr)) in pending.into_iter().enumerate() {
            let node = Node {
                addr: String::new(),
                child: Some(child),
            };
            c.nodes.push(node);
            let deadline = Instant::now() + Duration::from_secs(15);
            let a = loop {
                if let Some(a) = addr.lock().ok().and_then(|a| a.clone()) {
                    break a;
                }
                let exited = c.nodes[i]
                    .child
                    .as_mut()
                    .and_then(|ch| ch.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    bail!("node {i} did not start ({exited:?}):\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            c.nodes[i].addr = a;
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
        self.redis.iter().map(RedisProc::pid).collect()
    }

    /// The primaries of a local Redis Cluster (None: a single Redis, or an
    /// existing cluster).
    pub fn redis_primaries(&self) -> Option<usize> {
        (self.redis_cluster && !self.redis.is_empty()).then_some(self.redis.len())
    }

    pub fn node_pids(&self) -> Vec<i32> {
        self.nodes.iter().filter_map(|n| n.pid()).collect()
    }

    pub fn local(&self) -> bool {
        !self.redis.is_empty()
    }
}

type Spawned = (Child, PathBuf, Arc<Mutex<Option<String>>>);

fn spawn_node(bin: &Path, args: &[String], dir: &Path, i: usize) -> Result<Spawned> {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let log_path = dir.join(format!("node{i}.log"));
    let log = Arc::new(Mutex::new(
        std::fs::File::create(&log_path).context("node log file")?,
    ));
    let addr = Arc::new(Mutex::new(None::<String>));
    let pipes: Vec<Box<dyn Read + Send>> = [
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
    .collect();
    for pipe in pipes {
        let log = log.clone();
        let addr = addr.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if let Some(rest) = line.split("listen=").nth(1)
                    && let Ok(mut a) = addr.lock()
                    && a.is_none()
                {
                    *a = Some(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(f, "{line}");
                }
            }
        });
    }
    Ok((child, log_path, addr))
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

/// `ws://h:p/...`, `http://h:p` or `h:p` → `h:p`.
pub fn host_port(url: &str) -> String {
    let s = url.split("://").nth(1).unwrap_or(url);
    s.split('/').next().unwrap_or(s).to_owned()
}

pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {addr}"))
}

/// A minimal HTTP/1.1 GET: status and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(resolve(addr).await?).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP answer from {addr}"))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow!("GET {path} on {addr}: timeout"))?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub async fn wait_ready(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(addr, "/readyz").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/readyz not 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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

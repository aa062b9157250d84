//! A Redis Cluster of local `redis-server` processes, and the
//! administration tests do on it (kill a primary, wait for the failover,
//! migrate a slot under load, read error statistics).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::proc::{free_port, strip_ansi, tmpdir};
use crate::redis_server::{launch, ping};
use crate::wait::{poll_until, wait_until};

/// One `redis-server --cluster-enabled yes` process of a [`RedisCluster`].
struct ClusterProc {
    port: u16,
    /// Its cluster bus port (`--cluster-port`).
    bus: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// SIGKILLed by the test (kept dead).
    killed: bool,
}

impl ClusterProc {
    /// Start a cluster-enabled server in its own dir under `root`, answering
    /// PING; None if it did not come up (port clash: the caller retries).
    fn spawn(root: &Path, taken: &[u16], node_timeout_ms: u64) -> Result<Option<ClusterProc>> {
        let port = free_port()?;
        // The cluster bus gets its own free port (`--cluster-port`, Redis 7)
        // instead of port+10000, which may be taken or out of range.
        let bus = free_port()?;
        if port == bus || taken.contains(&port) || taken.contains(&bus) {
            return Ok(None);
        }
        let dir = root.join(format!("node-{port}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--cluster-port",
            &bus.to_string(),
        ])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
        .args(["--cluster-allow-replica-migration", "no"])
        // Replicas sync at once, not after the 5 s diskless-sync delay.
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{port}.conf")))
        .arg("--dir")
        .arg(&dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"));
        let url = format!("redis://127.0.0.1:{port}");
        Ok(launch(cmd, || ping(&url))?.map(|child| ClusterProc {
            port,
            bus,
            child: Some(child),
            dir,
            killed: false,
        }))
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

/// How to start a [`RedisCluster`].
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub primaries: usize,
    /// Replicas of each primary (0 below 3 primaries).
    pub replicas_per_primary: usize,
    /// `--cluster-node-timeout`: how long a process may be unreachable
    /// before it is failed (and its primary role failed over).
    pub node_timeout_ms: u64,
    /// Where the processes keep their files and logs (a directory per
    /// process); None: a temporary directory, removed on drop.
    pub dir: Option<PathBuf>,
}

impl ClusterSpec {
    /// `primaries` × (1 + `replicas_per_primary`) processes, node timeout
    /// 1 s, in a temporary directory.
    pub fn new(primaries: usize, replicas_per_primary: usize) -> ClusterSpec {
        ClusterSpec {
            primaries,
            replicas_per_primary,
            node_timeout_ms: 1000,
            dir: None,
        }
    }
}

/// A Redis Cluster of real `redis-server` processes on free ports (no
/// persistence), created with `redis-cli --cluster create` (below 3
/// primaries, by hand) and converged; SIGKILLed on drop, their logs printed
/// if the thread is panicking.
pub struct RedisCluster {
    procs: Vec<ClusterProc>,
    root: PathBuf,
    /// `root` is a temporary directory of ours (removed on drop).
    own_root: bool,
    primaries: usize,
    replicas_per_primary: usize,
    /// Slot ranges each killed primary served when it was killed.
    served: std::collections::HashMap<u16, Vec<(u16, u16)>>,
}

impl RedisCluster {
    /// `primaries` (at least 3) primaries with `replicas_per_primary`
    /// replicas each, node timeout 1 s, all slots assigned and every node
    /// agreeing; panics if it cannot.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        assert!(
            primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        Self::launch(&ClusterSpec::new(primaries, replicas_per_primary))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The cluster `spec` describes, all slots assigned and every process
    /// agreeing (state ok, every process known, replicas linked).
    pub fn launch(spec: &ClusterSpec) -> Result<RedisCluster> {
        let (primaries, replicas) = (spec.primaries, spec.replicas_per_primary);
        ensure!(primaries >= 1, "a Redis Cluster needs a primary");
        ensure!(
            primaries >= 3 || replicas == 0,
            "replicas need 3 primaries at least (redis-cli --cluster create)"
        );
        let (root, own_root) = match &spec.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                (d.clone(), false)
            }
            None => (tmpdir("redis-cluster")?, true),
        };
        let mut c = RedisCluster {
            procs: Vec::new(),
            root,
            own_root,
            primaries,
            replicas_per_primary: replicas,
            served: Default::default(),
        };
        // From here an error or a panic drops `c`: processes killed.
        for _ in 0..primaries * (1 + replicas) {
            let taken: Vec<u16> = c.procs.iter().map(|p| p.port).collect();
            let mut started = None;
            for _ in 0..5 {
                started = ClusterProc::spawn(&c.root, &taken, spec.node_timeout_ms)?;
                if started.is_some() {
                    break;
                }
            }
            let p = started.with_context(|| {
                format!(
                    "could not start a cluster-enabled redis-server (see {})",
                    c.root.display()
                )
            })?;
            c.procs.push(p);
        }
        if primaries >= 3 {
            c.create()?;
        } else {
            c.assign_by_hand()?;
        }
        let n = c.procs.len();
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            c.converged(n)
        })
        .map_err(|why| {
            anyhow!(
                "Redis Cluster not converged within 30 s: {why} (logs in {})",
                c.root.display()
            )
        })?;
        Ok(c)
    }

    /// `redis-cli --cluster create`, its output kept in `cli.log`.
    fn create(&self) -> Result<()> {
        let out = self.root.join("cli.log");
        let file = std::fs::File::create(&out).context("redis-cli log")?;
        let mut cli = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.procs.iter().map(|p| format!("127.0.0.1:{}", p.port)))
            .args(["--cluster-replicas", &self.replicas_per_primary.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("redis-cli log")?)
            .stderr(file)
            .spawn()
            .context("run redis-cli: install the redis-tools package (with redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(st)) = cli.try_wait() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = cli.kill();
                let _ = cli.wait();
                bail!("redis-cli --cluster create hung:\n{}", self.cli_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(
            status.success(),
            "redis-cli --cluster create failed ({status}):\n{}",
            self.cli_log()
        );
        Ok(())
    }

    /// What `redis-cli --cluster create` refuses to do below 3 primaries:
    /// the slots split evenly (`ADDSLOTSRANGE`), the processes met.
    fn assign_by_hand(&self) -> Result<()> {
        let k = self.procs.len();
        for (i, p) in self.procs.iter().enumerate() {
            let (lo, hi) = (16_384 * i / k, 16_384 * (i + 1) / k - 1);
            p.text(&["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()])
                .map_err(|e| anyhow!("CLUSTER ADDSLOTSRANGE: {e}"))?;
        }
        for p in &self.procs[1..] {
            self.procs[0]
                .text(&[
                    "CLUSTER",
                    "MEET",
                    "127.0.0.1",
                    &p.port.to_string(),
                    &p.bus.to_string(),
                ])
                .map_err(|e| anyhow!("CLUSTER MEET: {e}"))?;
        }
        Ok(())
    }

    /// The process ids of the live processes, in creation order (with
    /// `redis-cli --cluster create`, primaries first, slots low to high).
    pub fn pids(&self) -> Vec<i32> {
        self.live()
            .filter_map(|p| p.child.as_ref().map(|c| c.id() as i32))
            .collect()
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
        if self.own_root {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

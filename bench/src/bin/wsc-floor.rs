//! `wsc-floor`: the CPU a node cannot go below on this machine, whatever its
//! code, given the hops the contract's path needs per message (issue 16).
//!
//! The same shape as `wscluster-bench s1` (a producer pipelining `XADD`s to
//! the send stream on a 1 ms tick, users spread over N nodes), with every
//! role doing nothing but its hops, each role on one thread with a
//! current-thread runtime (no hand-offs), raw RESP on plain TCP:
//! - router: `XREAD BLOCK` the send stream; per entry a look-up (`HGET`,
//!   pipelined per batch: wscluster's `ROUTE` call); the inbox `XADD`s,
//!   pipelined per batch;
//! - node: `XREAD BLOCK` its inbox; the payload written to the user's
//!   socket (a line, not a WebSocket frame); with `--pong`, the client's
//!   answer read back on that socket (wscluster's delivery confirmation);
//! - client (not counted): reads lines, answers one line per read.
//!
//! Nothing is acknowledged, deleted, numbered or parsed beyond what the
//! hops need; the CPU of the router and node threads per delivered message
//! is a floor for any implementation of these hops here.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Redis port on 127.0.0.1 (a `redis-server` of its own: keys are flushed).
    #[arg(long)]
    redis_port: u16,
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    #[arg(long, default_value_t = 25_000)]
    messages: u64,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// The client answers each read with a line the node reads back.
    #[arg(long)]
    pong: bool,
    /// Nodes read their inboxes but write nothing to the sockets (the
    /// inbox hop alone); delivery is counted by the nodes.
    #[arg(long, conflicts_with = "pong")]
    no_write: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// CPU time of the calling thread, µs.
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[derive(Debug)]
enum Resp {
    Str(Vec<u8>),
    Nil,
    Int,
    Arr(Vec<Resp>),
}

/// One reply from `buf[at..]`: the value and where it ends, or `None` if
/// incomplete.
fn parse(buf: &[u8], at: usize) -> Result<Option<(Resp, usize)>> {
    let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[at + 1..at + nl];
    let next = at + nl + 2;
    let num = || -> Result<i64> { Ok(std::str::from_utf8(line)?.parse()?) };
    match buf.get(at) {
        Some(b'+') => Ok(Some((Resp::Str(line.to_vec()), next))),
        Some(b'-') => bail!("redis error: {}", String::from_utf8_lossy(line)),
        Some(b':') => Ok(Some((Resp::Int, next))),
        Some(b'$') => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Resp::Nil, next)));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Ok(Some((Resp::Str(buf[next..end].to_vec()), end + 2)))
        }
        Some(b'*') => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Resp::Nil, next)));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut pos = next;
            for _ in 0..n {
                match parse(buf, pos)? {
                    Some((v, p)) => {
                        items.push(v);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Resp::Arr(items), pos)))
        }
        _ => bail!("bad reply"),
    }
}

struct Redis {
    sock: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    queued: usize,
}

impl Redis {
    async fn connect(port: u16) -> Result<Self> {
        let sock = TcpStream::connect(("127.0.0.1", port)).await?;
        sock.set_nodelay(true)?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(64 * 1024),
            out: Vec::with_capacity(64 * 1024),
            queued: 0,
        })
    }

    fn cmd(&mut self, args: &[&[u8]]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.queued += 1;
    }

    /// Send what is queued; every reply, in order.
    async fn run(&mut self) -> Result<Vec<Resp>> {
        self.sock.write_all(&self.out).await?;
        self.out.clear();
        let mut replies = Vec::with_capacity(self.queued);
        let mut at = 0;
        while replies.len() < self.queued {
            match parse(&self.buf, at)? {
                Some((v, p)) => {
                    replies.push(v);
                    at = p;
                }
                None => {
                    let mut chunk = [0u8; 16384];
                    let n = self.sock.read(&mut chunk).await?;
                    if n == 0 {
                        bail!("redis closed");
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        self.buf.drain(..at);
        self.queued = 0;
        Ok(replies)
    }
}

/// Entries of a one-stream `XREAD` reply: (id, fields).
fn entries(reply: Resp) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    if let Resp::Arr(streams) = reply {
        for s in streams {
            let Resp::Arr(mut kv) = s else { continue };
            let Some(Resp::Arr(es)) = kv.pop() else {
                continue;
            };
            for e in es {
                let Resp::Arr(mut pair) = e else { continue };
                let fields = match pair.pop() {
                    Some(Resp::Arr(f)) => f
                        .into_iter()
                        .filter_map(|v| match v {
                            Resp::Str(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                if let Some(Resp::Str(id)) = pair.pop() {
                    out.push((id, fields));
                }
            }
        }
    }
    out
}

fn field<'a>(fields: &'a [Vec<u8>], name: &[u8]) -> Option<&'a [u8]> {
    fields
        .chunks(2)
        .find(|c| c.len() == 2 && c[0] == name)
        .map(|c| c[1].as_slice())
}

struct Shared {
    args: Args,
    delivered: AtomicU64,
    done: AtomicBool,
    lat: std::sync::Mutex<Vec<u64>>,
}

fn on_thread<F, Fut>(f: F) -> std::thread::JoinHandle<Result<u64>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let start = thread_cpu_us();
        rt.block_on(f())?;
        Ok(thread_cpu_us() - start)
    })
}

async fn router(sh: Arc<Shared>) -> Result<()> {
    let mut r = Redis::connect(sh.args.redis_port).await?;
    let mut last = b"0-0".to_vec();
    let mut routed = 0u64;
    while routed < sh.args.messages {
        r.cmd(&[
            b"XREAD", b"COUNT", b"4000", b"BLOCK", b"100", b"STREAMS", b"send", &last,
        ]);
        let reply = r.run().await?.pop().context("no reply")?;
        let es = entries(reply);
        if es.is_empty() {
            continue;
        }
        for (_, f) in &es {
            let u = field(f, b"u").context("no u")?;
            let key = [b"user:{".as_slice(), u, b"}"].concat();
            r.cmd(&[b"HGET", &key, b"node"]);
        }
        let nodes = r.run().await?;
        for ((_, f), n) in es.iter().zip(nodes) {
            let Resp::Str(n) = n else { bail!("no node") };
            let key = [b"inbox:".as_slice(), &n].concat();
            let u = field(f, b"u").context("no u")?;
            let p = field(f, b"p").context("no p")?;
            r.cmd(&[b"XADD", &key, b"*", b"u", u, b"p", p]);
        }
        r.run().await?;
        routed += es.len() as u64;
        if let Some((id, _)) = es.last() {
            last.clone_from(id);
        }
    }
    Ok(())
}

async fn node(sh: Arc<Shared>, i: usize, listener: std::net::TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let mine = (0..sh.args.users)
        .filter(|u| u % sh.args.nodes == i)
        .count();
    let mut socks = HashMap::new();
    for _ in 0..mine {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut id = [0u8; 8];
        s.read_exact(&mut id).await?;
        let (rd, wr) = s.into_split();
        if sh.args.pong {
            // The delivery confirmation: read on its own task, as a session.
            tokio::spawn(async move {
                let mut rd = BufReader::new(rd);
                let mut line = Vec::new();
                while rd.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
                    line.clear();
                }
            });
        }
        socks.insert(u64::from_le_bytes(id).to_string().into_bytes(), wr);
    }
    let mut r = Redis::connect(sh.args.redis_port).await?;
    let key = format!("inbox:{i}").into_bytes();
    let mut last = b"0-0".to_vec();
    while !sh.done.load(Ordering::Relaxed) {
        r.cmd(&[
            b"XREAD", b"COUNT", b"1000", b"BLOCK", b"100", b"STREAMS", &key, &last,
        ]);
        let reply = r.run().await?.pop().context("no reply")?;
        for (id, f) in entries(reply) {
            let u = field(&f, b"u").context("no u")?;
            let p = field(&f, b"p").context("no p")?;
            last = id;
            if sh.args.no_write {
                if sh.delivered.fetch_add(1, Ordering::Relaxed) + 1 == sh.args.messages {
                    sh.done.store(true, Ordering::Relaxed);
                }
                continue;
            }
            let w = socks.get_mut(u).context("unknown user")?;
            let mut line = p.to_vec();
            line.push(b'\n');
            w.write_all(&line).await?;
        }
    }
    Ok(())
}

async fn client(sh: Arc<Shared>, ports: Vec<u16>) -> Result<()> {
    let mut tasks = Vec::new();
    for u in 0..sh.args.users {
        let port = ports[u % sh.args.nodes];
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        s.write_all(&(u as u64).to_le_bytes()).await?;
        let sh = sh.clone();
        tasks.push(tokio::spawn(async move {
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut line = Vec::new();
            loop {
                line.clear();
                match rd.read_until(b'\n', &mut line).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
                let sent: u64 = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| l.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if let Ok(mut all) = sh.lat.lock() {
                    all.push(now_us().saturating_sub(sent));
                }
                if sh.args.pong && rd.buffer().is_empty() && wr.write_all(b"p\n").await.is_err() {
                    break;
                }
                if sh.delivered.fetch_add(1, Ordering::Relaxed) + 1 == sh.args.messages {
                    sh.done.store(true, Ordering::Relaxed);
                }
            }
        }));
    }
    while !sh.done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn producer(sh: Arc<Shared>) -> Result<()> {
    let mut r = Redis::connect(sh.args.redis_port).await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut done = 0u64;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let pad = "x".repeat(130);
    while done < sh.args.messages {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * sh.args.rate) as u64).min(sh.args.messages);
        for _ in done..due {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let u = (rng % sh.args.users as u64).to_string();
            let p = format!("{} {pad}", now_us());
            r.cmd(&[
                b"XADD",
                b"send",
                b"*",
                b"u",
                u.as_bytes(),
                b"p",
                p.as_bytes(),
            ]);
        }
        if due > done {
            r.run().await?;
            done = due;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sh = Arc::new(Shared {
        args: args.clone(),
        delivered: AtomicU64::new(0),
        done: AtomicBool::new(false),
        lat: std::sync::Mutex::new(Vec::new()),
    });
    // Set-up: users' nodes, empty streams.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut r = Redis::connect(args.redis_port).await?;
        r.cmd(&[b"FLUSHALL"]);
        for u in 0..args.users {
            let key = format!("user:{{{u}}}");
            let n = (u % args.nodes).to_string();
            r.cmd(&[b"HSET", key.as_bytes(), b"node", n.as_bytes()]);
        }
        r.run().await?;
        r.cmd(&[b"CONFIG", b"RESETSTAT"]);
        r.run().await.map(|_| ())
    })?;
    let mut ports = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        ports.push(l.local_addr()?.port());
        let sh = sh.clone();
        nodes.push(on_thread(move || node(sh, i, l)));
    }
    let c = {
        let sh = sh.clone();
        on_thread(move || client(sh, ports))
    };
    // Let every socket connect before traffic starts.
    std::thread::sleep(Duration::from_millis(500));
    let wall = Instant::now();
    let rt_ = {
        let sh = sh.clone();
        on_thread(move || router(sh))
    };
    let p = {
        let sh = sh.clone();
        on_thread(move || producer(sh))
    };
    p.join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let router_cpu = rt_
        .join()
        .map_err(|_| anyhow::anyhow!("router panicked"))??;
    let mut node_cpu = 0;
    for n in nodes {
        node_cpu += n.join().map_err(|_| anyhow::anyhow!("node panicked"))??;
    }
    c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    let secs = wall.elapsed().as_secs_f64();
    let msgs = args.messages as f64;
    let mut lat = sh
        .lat
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let latency = if lat.is_empty() {
        "no client latency (nothing written)".to_string()
    } else {
        format!("p50 {} µs p99 {} µs", pct(0.5), pct(0.99))
    };
    println!(
        "floor rate={} messages={} nodes={} users={} pong={} no_write={}: {:.0} msg/s, router {:.1} µs/msg, nodes {:.1} µs/msg, router+nodes {:.1} µs/msg; {latency}",
        args.rate,
        args.messages,
        args.nodes,
        args.users,
        args.pong,
        args.no_write,
        msgs / secs,
        router_cpu as f64 / msgs,
        node_cpu as f64 / msgs,
        (router_cpu + node_cpu) as f64 / msgs,
    );
    Ok(())
}

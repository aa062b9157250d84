//! WebSocket clients and what they record: distinct messages, duplicates,
//! latency from the producer's timestamp to receipt.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

pub type Ws = WebSocketStream<TcpStream>;

/// Microseconds since the Unix epoch (producer and receivers share the clock).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Connect as `?user=NAME` (dev) to node `addr` (`host:port`), optionally
/// from source address `src`; read the welcome. Returns the socket and the
/// welcome's node id.
pub async fn connect(addr: SocketAddr, user: &str, src: Option<IpAddr>) -> Result<(Ws, String)> {
    let fut = async {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = src {
            sock.bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let stream = sock.connect(addr).await.context("tcp connect")?;
        stream.set_nodelay(true)?;
        // 4 KiB read buffer: tungstenite's 128 KiB default would make the
        // load generator itself the memory hog at 19,000 sockets.
        let cfg = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let url = format!("ws://{addr}/ws?user={user}");
        let (mut ws, _) = client_async_with_config(url, stream, Some(cfg))
            .await
            .context("websocket upgrade")?;
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                    if v["type"] != "welcome" {
                        bail!("first frame is not welcome: {v}");
                    }
                    let node = v["node"].as_str().unwrap_or_default().to_owned();
                    return Ok((ws, node));
                }
                Some(Ok(WsMessage::Close(c))) => bail!("closed before welcome: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before welcome"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("connect {addr}: timeout"))?
}

/// Subscribe to `topic` and wait for `subscribed`.
pub async fn subscribe(ws: &mut Ws, topic: &str) -> Result<()> {
    let frame = serde_json::json!({"type":"subscribe","topic":topic}).to_string();
    ws.send(WsMessage::Text(frame.into())).await?;
    let fut = async {
        while let Some(m) = ws.next().await {
            if let WsMessage::Text(t) = m? {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                match v["type"].as_str() {
                    Some("subscribed") => return Ok(()),
                    Some("error") => bail!("subscribe refused: {v}"),
                    _ => {}
                }
            }
        }
        bail!("closed while subscribing")
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("subscribe: timeout"))?
}

/// The ~`size`-byte JSON payload of message `seq` to `to`, sent at `ts` µs.
pub fn payload(ts: u64, seq: u64, to: &str, size: usize) -> String {
    let mut s = String::with_capacity(size + 8);
    s.push_str("{\"ts\":");
    s.push_str(&ts.to_string());
    s.push_str(",\"seq\":");
    s.push_str(&seq.to_string());
    s.push_str(",\"to\":\"");
    s.push_str(to);
    s.push_str("\",\"pad\":\"");
    let pad = size.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// The number after `"key":` in `s`.
fn num_after(s: &str, key: &str) -> Option<u64> {
    let i = s.find(key)? + key.len();
    let rest = s[i..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What all receivers of a run record. Messages are told apart by the `seq`
/// the producer put in the payload (one per `XADD`, so one per stream id).
pub struct Sink {
    /// Receipts per seq (S1/S3: dedupe; S4: counts every delivery).
    seen: Vec<AtomicU32>,
    dedupe: bool,
    /// Latency histograms, µs: group 0, and group 1 (S3: users of the
    /// killed node).
    hist: [Mutex<Histogram<u64>>; 2],
    pub frames: AtomicU64,
    pub distinct: AtomicU64,
    pub dups: AtomicU64,
    pub misrouted: AtomicU64,
    pub unparsed: AtomicU64,
    /// Connections the server closed (or that failed) while receiving, and
    /// the last close code seen (0: none given).
    pub closed: AtomicU64,
    pub close_code: AtomicU32,
    pub first_rx_us: AtomicU64,
    pub last_rx_us: AtomicU64,
    /// With `WSC_BENCH_TRACE` set: (send time, latency) of every first
    /// receipt, µs, to find when slow messages happen (written by
    /// [`Sink::write_trace`]).
    trace: Option<Mutex<Vec<(u64, u64)>>>,
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Sink {
    pub fn new(capacity: u64, dedupe: bool) -> Sink {
        Sink {
            seen: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            dedupe,
            hist: [Mutex::new(new_hist()), Mutex::new(new_hist())],
            frames: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            dups: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            unparsed: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            close_code: AtomicU32::new(0),
            first_rx_us: AtomicU64::new(u64::MAX),
            last_rx_us: AtomicU64::new(0),
            trace: std::env::var_os("WSC_BENCH_TRACE").map(|_| Mutex::new(Vec::new())),
        }
    }

    /// Record one text frame received by `user` (None: do not check the
    /// recipient, e.g. topic messages). True if it was a message.
    pub fn on_text(&self, t: &str, user: Option<&str>, group: usize) -> bool {
        if !t.starts_with("{\"type\":\"message\"") && !t.contains("\"type\":\"message\"") {
            return false;
        }
        let now = now_us();
        self.frames.fetch_add(1, Ordering::Relaxed);
        let Some(p) = t.find("\"payload\":") else {
            self.unparsed.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let body = &t[p..];
        let (Some(ts), Some(seq)) = (num_after(body, "\"ts\":"), num_after(body, "\"seq\":"))
        else {
            self.unparsed.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        if let Some(u) = user {
            let want = format!("\"to\":\"{u}\"");
            if !body.contains(&want) {
                self.misrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(slot) = self.seen.get(seq as usize) else {
            self.unparsed.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let before = slot.fetch_add(1, Ordering::Relaxed);
        if self.dedupe && before > 0 {
            self.dups.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if before == 0 {
            self.distinct.fetch_add(1, Ordering::Relaxed);
        }
        self.first_rx_us.fetch_min(now, Ordering::Relaxed);
        self.last_rx_us.fetch_max(now, Ordering::Relaxed);
        if let Ok(mut h) = self.hist[group.min(1)].lock() {
            h.saturating_record(now.saturating_sub(ts).max(1));
        }
        if let Some(t) = &self.trace
            && let Ok(mut t) = t.lock()
        {
            t.push((ts, now.saturating_sub(ts)));
        }
        true
    }

    /// `WSC_BENCH_TRACE=<file>`: one line per message, `send_us latency_us`.
    pub fn write_trace(&self) -> std::io::Result<()> {
        let (Some(path), Some(t)) = (std::env::var_os("WSC_BENCH_TRACE"), &self.trace) else {
            return Ok(());
        };
        let mut t = t.lock().map(|t| t.clone()).unwrap_or_default();
        t.sort_unstable();
        let mut out = String::with_capacity(t.len() * 24);
        for (ts, l) in t {
            out.push_str(&format!("{ts} {l}\n"));
        }
        std::fs::write(path, out)
    }

    /// Counted deliveries: distinct messages (dedupe) or all of them.
    pub fn delivered(&self) -> u64 {
        if self.dedupe {
            self.distinct.load(Ordering::Relaxed)
        } else {
            self.frames.load(Ordering::Relaxed)
        }
    }

    pub fn hist(&self, group: usize) -> Histogram<u64> {
        self.hist[group]
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| new_hist())
    }

    /// Both groups together.
    pub fn hist_all(&self) -> Histogram<u64> {
        let mut h = self.hist(0);
        let _ = h.add(self.hist(1));
        h
    }

    /// Seqs below `sent` never received.
    pub fn missing(&self, sent: u64) -> u64 {
        self.seen
            .iter()
            .take(sent as usize)
            .filter(|c| c.load(Ordering::Relaxed) == 0)
            .count() as u64
    }
}

/// Read frames until the socket ends, recording messages. `first` gets the
/// time of the first message (fetch_min), if given.
pub async fn receive(
    ws: &mut Ws,
    sink: &Sink,
    user: Option<&str>,
    group: usize,
    first: Option<&AtomicU64>,
) {
    let mut got_first = false;
    while let Some(m) = ws.next().await {
        match m {
            Ok(WsMessage::Text(t)) => {
                if sink.on_text(t.as_str(), user, group)
                    && !got_first
                    && let Some(f) = first
                {
                    f.fetch_min(now_us(), Ordering::Relaxed);
                    got_first = true;
                }
            }
            Ok(WsMessage::Close(f)) => {
                sink.closed.fetch_add(1, Ordering::Relaxed);
                let code = f.map(|f| u16::from(f.code)).unwrap_or(0);
                sink.close_code.store(u32::from(code), Ordering::Relaxed);
                return;
            }
            Err(_) => {
                sink.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
        }
    }
    sink.closed.fetch_add(1, Ordering::Relaxed);
}

/// Latency summary, µs, and a percentile curve for plots:
/// `[nines, µs]` with nines = -log10(1 - q).
pub fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let mut curve = Vec::new();
    let mut prev = 0;
    for i in 0..=50u32 {
        let k = f64::from(i) / 10.0;
        let v = h.value_at_quantile(1.0 - 10f64.powf(-k)).max(prev);
        prev = v;
        curve.push(serde_json::json!([k, v]));
    }
    curve.push(serde_json::json!([6.0, h.max()]));
    serde_json::json!({
        "count": h.len(),
        "mean": h.mean().round() as u64,
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p99_9": h.value_at_quantile(0.999),
        "max": h.max(),
        "curve": curve,
    })
}

pub fn fmt_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "latency: none".into();
    }
    format!(
        "latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        fmt_ms(h.value_at_quantile(0.5)),
        fmt_ms(h.value_at_quantile(0.9)),
        fmt_ms(h.value_at_quantile(0.99)),
        fmt_ms(h.value_at_quantile(0.999)),
        fmt_ms(h.max())
    )
}

//! Our own connections to one Redis over plain TCP (RESP2), with a reply
//! reader of our own: [`Mux`], shared and multiplexed, and [`Solo`], one
//! owner's (a blocking reader, the router), exchanged in the owner's task.
//!
//! Why not redis-rs's `MultiplexedConnection`: its reply parser (built on
//! `combine`) took a quarter of a node's instructions per delivered message
//! (callgrind, issue 16) — about 8,000 to read one small reply. Here a
//! reply is first measured (where does it end? resumably, so a reply that
//! arrives in many reads is scanned once) and then built in one pass.
//! Commands are still encoded by redis-rs (`Cmd`, `Pipeline`) and replies
//! are the same `redis::Value`s, error replies included, so everything
//! above [`super::conn::Conn`] works unchanged. TLS, Unix sockets, RESP3 and
//! Redis Cluster stay on redis-rs.
//!
//! A `Mux` has one task per connection that owns the socket: it writes what
//! callers queued (all of it in one write) and hands each reply to the caller
//! waiting for it, in order. It also owns the response timeout: when the
//! oldest request has waited longer (Redis frozen, or the path to it
//! black-holed) it fails every request and closes the connection, and the
//! next command connects again, as after an I/O error. One coarse tick per
//! connection instead of a timer per request (a timer per request was 5 % of
//! a node's instructions per message).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::aio::ConnectionLike;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, ProtocolVersion, RedisError,
    RedisFuture, RedisResult, ServerError, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, Sleep};

/// Requests queued for a connection's task; more wait for room (bounded:
/// the task answers what it took within the response timeout, and closes
/// its queue when it ends).
const QUEUE: usize = 1024;
/// Bytes read at a time, at least.
const READ_CHUNK: usize = 16 * 1024;
/// Queued requests written together, up to about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;
/// Arrays nested deeper are not a reply this node asked for.
const MAX_DEPTH: usize = 16;
/// How often a busy connection checks its oldest request's age: response
/// timeouts fire up to this late.
const TICK: Duration = Duration::from_millis(250);

/// `ConnectionLike` for our connections: a type with `target()` and
/// `request(bytes, skip, count)`.
macro_rules! connection_like {
    ($t:ty) => {
        impl ConnectionLike for $t {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                Box::pin(async move {
                    let mut v = self.request(cmd.get_packed_command(), 0, 1).await?;
                    v.pop().ok_or_else(dropped)
                })
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                Box::pin(async move {
                    self.request(pipeline.get_packed_pipeline(), offset, count)
                        .await
                })
            }

            fn get_db(&self) -> i64 {
                self.target().db
            }
        }
    };
}

/// Where a connection goes and how it is opened.
struct Target {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    connect_timeout: Duration,
    response_timeout: Duration,
}

/// A shared, self-healing connection to one Redis. Clones share it.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

struct Shared {
    target: Arc<Target>,
    /// The live connection's task, if any. Never held across an await.
    link: Mutex<Option<Link>>,
    /// One connect at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Connects tried: those who waited on a failed one fail at once
    /// instead of queueing connect timeouts.
    attempts: AtomicU64,
}

/// The live connection's queue; closed once its task has ended.
type Link = mpsc::Sender<Req>;

/// Packed commands and how many replies they get: `skip` first (a
/// transaction's `MULTI` and `QUEUED`s), then `count` wanted.
struct Req {
    bytes: Vec<u8>,
    skip: usize,
    count: usize,
    reply: oneshot::Sender<RedisResult<Vec<Value>>>,
}

struct Waiting {
    /// When it was written.
    since: Instant,
    wanted: Wanted,
    reply: oneshot::Sender<RedisResult<Vec<Value>>>,
}

/// Whether a URL's connections can be ours ([`Mux`], [`Solo`]): plain TCP
/// and RESP2.
pub fn supports(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::Tcp(..))
        && info.redis_settings().protocol() == ProtocolVersion::RESP2
}

impl Target {
    fn new(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Target> {
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "not a plain TCP address",
            )));
        };
        let r = info.redis_settings();
        Ok(Target {
            host: host.clone(),
            port: *port,
            username: r.username().map(str::to_owned),
            password: r.password().map(str::to_owned),
            db: r.db(),
            connect_timeout,
            response_timeout,
        })
    }

    /// A connected, authenticated socket on the right database, within
    /// the connect timeout.
    async fn open(&self) -> RedisResult<TcpStream> {
        tokio::time::timeout(self.connect_timeout, self.handshake())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to Redis timed out"))?
    }

    async fn handshake(&self) -> RedisResult<TcpStream> {
        let mut sock = TcpStream::connect((self.host.as_str(), self.port)).await?;
        sock.set_nodelay(true)?;
        let mut hello = Vec::new();
        let mut replies = 0;
        if let Some(pw) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(pw).write_packed_command(&mut hello);
            replies += 1;
        }
        if self.db != 0 {
            redis::cmd("SELECT")
                .arg(self.db)
                .write_packed_command(&mut hello);
            replies += 1;
        }
        if replies == 0 {
            return Ok(sock);
        }
        sock.write_all(&hello).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut scan = Scan::default();
        while replies > 0 {
            match scan.end(&buf)? {
                Some(end) => {
                    let reply = buf.split_to(end);
                    if let Value::ServerError(e) = build(&reply)? {
                        return Err(e.into());
                    }
                    replies -= 1;
                }
                None => {
                    if sock.read_buf(&mut buf).await? == 0 {
                        return Err(eof());
                    }
                }
            }
        }
        Ok(sock)
    }
}

impl Mux {
    /// Connects at once (so a bad address or password shows at start).
    pub async fn connect(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Mux> {
        let mux = Mux {
            shared: Arc::new(Shared {
                target: Arc::new(Target::new(info, connect_timeout, response_timeout)?),
                link: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                attempts: AtomicU64::new(0),
            }),
        };
        mux.link().await?;
        Ok(mux)
    }

    /// The live connection, connecting if there is none.
    async fn link(&self) -> RedisResult<Link> {
        if let Some(l) = self.live() {
            return Ok(l);
        }
        let seen = self.shared.attempts.load(Ordering::Acquire);
        let _one = self.shared.connecting.lock().await;
        if let Some(l) = self.live() {
            return Ok(l);
        }
        if self.shared.attempts.load(Ordering::Acquire) != seen {
            // Someone tried while we waited, and failed.
            return Err(io::Error::new(io::ErrorKind::NotConnected, "Redis unreachable").into());
        }
        self.shared.attempts.fetch_add(1, Ordering::AcqRel);
        let sock = self.shared.target.open().await?;
        let (link, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drive(sock, rx, self.shared.target.response_timeout));
        if let Ok(mut l) = self.shared.link.lock() {
            *l = Some(link.clone());
        }
        Ok(link)
    }

    fn live(&self) -> Option<Link> {
        let l = self.shared.link.lock().ok()?;
        l.as_ref().filter(|l| !l.is_closed()).cloned()
    }

    fn target(&self) -> &Target {
        &self.shared.target
    }

    async fn request(&self, bytes: Vec<u8>, skip: usize, count: usize) -> RedisResult<Vec<Value>> {
        if skip + count == 0 {
            // Nothing to send, and no reply would ever come.
            return Ok(Vec::new());
        }
        let link = self.link().await?;
        let (reply, answer) = oneshot::channel();
        let req = Req {
            bytes,
            skip,
            count,
            reply,
        };
        // Bounded: the connection's task answers every request it took,
        // within the response timeout, and closes its queue when it ends.
        link.send(req).await.map_err(|_| dropped())?;
        answer.await.map_err(|_| dropped())?
    }
}

connection_like!(Mux);

/// A connection of one owner (a blocking reader, the router): the exchange happens
/// in the owner's task, with no hand-off to a connection task and back (two
/// wake-ups per read fewer). Reconnects by itself on the next command after
/// an error, a response timeout, or an exchange abandoned half-way (its
/// reply may still come). A clone is another connection to the same Redis.
pub struct Solo {
    target: Arc<Target>,
    sock: Option<TcpStream>,
    rbuf: BytesMut,
    scan: Scan,
    /// An exchange started and did not finish (its future was dropped).
    busy: bool,
    /// The response timeout, reset per exchange: moving a timer's deadline
    /// later costs next to nothing, a new timer per read does not.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Clone for Solo {
    fn clone(&self) -> Solo {
        Solo::lazy(self.target.clone())
    }
}

impl Solo {
    /// Connects at once (so a bad address or password shows at start).
    pub async fn connect(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Solo> {
        let mut solo = Solo::lazy(Arc::new(Target::new(
            info,
            connect_timeout,
            response_timeout,
        )?));
        solo.sock = Some(solo.target.open().await?);
        Ok(solo)
    }

    fn lazy(target: Arc<Target>) -> Solo {
        Solo {
            target,
            sock: None,
            rbuf: BytesMut::new(),
            scan: Scan::default(),
            busy: false,
            timer: None,
        }
    }

    fn target(&self) -> &Target {
        &self.target
    }

    async fn request(
        &mut self,
        bytes: Vec<u8>,
        skip: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        if skip + count == 0 {
            return Ok(Vec::new());
        }
        if self.busy {
            self.sock = None;
        }
        if self.sock.is_none() {
            self.rbuf.clear();
            self.scan = Scan::default();
            self.sock = Some(self.target.open().await?);
        }
        self.busy = true;
        let deadline = Instant::now() + self.target.response_timeout;
        let Solo {
            sock,
            rbuf,
            scan,
            timer,
            ..
        } = self;
        let Some(sock) = sock.as_mut() else {
            return Err(dropped());
        };
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        let exchange = async {
            sock.write_all(&bytes).await?;
            let mut w = Wanted::new(skip, count);
            loop {
                while let Some(end) = scan.end(rbuf)? {
                    let value = build(&rbuf[..end])?;
                    rbuf.advance(end);
                    if w.take(value) {
                        return w.finish();
                    }
                }
                if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                    rbuf.reserve(READ_CHUNK);
                }
                if sock.read_buf(rbuf).await? == 0 {
                    return Err(eof());
                }
            }
        };
        let r = tokio::select! {
            // A reply already here wins over a deadline that passed while
            // this process could not run.
            biased;
            r = exchange => r,
            _ = timer.as_mut() => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer in time").into())
            }
        };
        self.busy = false;
        // An error reply is an answer (`Ok` here); any error leaves the
        // connection in an unknown state.
        if r.is_err() {
            self.sock = None;
        }
        r
    }
}

connection_like!(Solo);

/// The replies one request waits for: `skip` first (a transaction's
/// `MULTI` and `QUEUED`s), then `count` it returns.
struct Wanted {
    skip: usize,
    count: usize,
    got: Vec<Value>,
    /// An error reply among the skipped ones: a transaction that aborted.
    skipped_error: Option<ServerError>,
}

impl Wanted {
    fn new(skip: usize, count: usize) -> Wanted {
        Wanted {
            skip,
            count,
            got: Vec::with_capacity(count),
            skipped_error: None,
        }
    }

    /// Take the next reply; true once all have come.
    fn take(&mut self, value: Value) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            if let Value::ServerError(e) = value {
                self.skipped_error.get_or_insert(e);
            }
        } else {
            self.got.push(value);
        }
        self.skip == 0 && self.got.len() == self.count
    }

    fn finish(self) -> RedisResult<Vec<Value>> {
        match self.skipped_error {
            Some(e) => Err(e.into()),
            None => Ok(self.got),
        }
    }
}

/// A connection's task: writes what is queued, hands replies back in
/// order; on an error or a response timeout, every waiting caller gets it
/// and the task ends.
async fn drive(mut sock: TcpStream, mut rx: mpsc::Receiver<Req>, timeout: Duration) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut clock = Clock {
        timeout,
        last_tick: Instant::now(),
    };
    let timed_out = || -> RedisError {
        io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer in time").into()
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut scan = Scan::default();
    let mut out: Vec<u8> = Vec::new();
    let mut open = true;
    let err: RedisError = loop {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = sock.read_buf(&mut rbuf) => match r {
                Ok(0) => break eof(),
                Err(e) => break e.into(),
                Ok(_) => {
                    if let Err(e) = hand_out(&mut rbuf, &mut scan, &mut waiting) {
                        break e;
                    }
                }
            },
            req = rx.recv(), if open => match req {
                None => open = false,
                Some(req) => {
                    out.clear();
                    queue(req, &mut out, &mut waiting);
                    while out.len() < WRITE_BATCH {
                        let Ok(req) = rx.try_recv() else { break };
                        queue(req, &mut out, &mut waiting);
                    }
                    // Redis not reading (frozen) must not hold this forever.
                    let mut write = std::pin::pin!(sock.write_all(&out));
                    let written = loop {
                        tokio::select! {
                            r = &mut write => break r.map_err(RedisError::from),
                            _ = tick.tick() => if clock.overdue(&mut waiting) {
                                break Err(timed_out());
                            },
                        }
                    };
                    if let Err(e) = written {
                        break e;
                    }
                }
            },
            _ = tick.tick(), if !waiting.is_empty() => {
                // Replies that came while this task could not run (the
                // process was frozen, or starved) count before any verdict.
                if let Err(e) = read_ready(&sock, &mut rbuf, &mut scan, &mut waiting) {
                    break e;
                }
                if clock.overdue(&mut waiting) {
                    break timed_out();
                }
            },
        }
        if !open && waiting.is_empty() {
            return;
        }
    };
    tracing::debug!(error = %err, waiting = waiting.len(), "Redis connection closed");
    for w in waiting {
        let _ = w.reply.send(Err(err.clone()));
    }
    rx.close();
    while let Ok(req) = rx.try_recv() {
        let _ = req.reply.send(Err(err.clone()));
    }
}

/// The response timeout's judge: a request is overdue when Redis has been
/// silent longer than the timeout while this task was there to listen.
struct Clock {
    timeout: Duration,
    last_tick: Instant,
}

impl Clock {
    /// At a tick: is the oldest request overdue? A tick far later than due
    /// means this process did not run meanwhile (frozen, or starved): what
    /// Redis did then is unknown, so the waits start again from now rather
    /// than fail requests whose replies may be on their way.
    fn overdue(&mut self, waiting: &mut VecDeque<Waiting>) -> bool {
        let now = Instant::now();
        if now.duration_since(self.last_tick) > 4 * TICK {
            for w in waiting.iter_mut() {
                w.since = now;
            }
        }
        self.last_tick = now;
        waiting
            .front()
            .is_some_and(|w| now.duration_since(w.since) > self.timeout)
    }
}

/// Read what the socket holds right now, without waiting, and hand out
/// the replies it completes.
fn read_ready(
    sock: &TcpStream,
    rbuf: &mut BytesMut,
    scan: &mut Scan,
    waiting: &mut VecDeque<Waiting>,
) -> RedisResult<()> {
    loop {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        match sock.try_read_buf(rbuf) {
            Ok(0) => return Err(eof()),
            Ok(_) => hand_out(rbuf, scan, waiting)?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn queue(req: Req, out: &mut Vec<u8>, waiting: &mut VecDeque<Waiting>) {
    out.extend_from_slice(&req.bytes);
    waiting.push_back(Waiting {
        since: Instant::now(),
        wanted: Wanted::new(req.skip, req.count),
        reply: req.reply,
    });
}

/// Every whole reply in `rbuf` to its caller.
fn hand_out(
    rbuf: &mut BytesMut,
    scan: &mut Scan,
    waiting: &mut VecDeque<Waiting>,
) -> RedisResult<()> {
    while let Some(end) = scan.end(rbuf)? {
        let value = build(&rbuf[..end])?;
        rbuf.advance(end);
        let Some(w) = waiting.front_mut() else {
            return Err(RedisError::from((
                ErrorKind::Client,
                "a reply nobody asked for",
            )));
        };
        if w.wanted.take(value)
            && let Some(w) = waiting.pop_front()
        {
            let _ = w.reply.send(w.wanted.finish());
        }
    }
    Ok(())
}

fn dropped() -> RedisError {
    io::Error::new(io::ErrorKind::BrokenPipe, "Redis connection dropped").into()
}

fn eof() -> RedisError {
    io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection").into()
}

fn bad(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Parse, what))
}

/// Finds where the first reply in a buffer ends, resumably: the buffer may
/// only grow between calls until that reply is taken off its front.
#[derive(Default)]
struct Scan {
    /// Where the next element's header starts.
    pos: usize,
    /// Elements still to come in each open array, outermost first.
    open: Vec<i64>,
}

impl Scan {
    fn end(&mut self, buf: &[u8]) -> RedisResult<Option<usize>> {
        loop {
            let Some((kind, n, next)) = header(buf, self.pos)? else {
                return Ok(None);
            };
            match kind {
                b'+' | b'-' | b':' => self.pos = next,
                b'$' if n < 0 => self.pos = next,
                b'$' => {
                    let end = usize::try_from(n)
                        .ok()
                        .and_then(|n| next.checked_add(n)?.checked_add(2))
                        .ok_or_else(|| bad("bulk length out of range"))?;
                    if end > buf.len() {
                        return Ok(None);
                    }
                    self.pos = end;
                }
                b'*' => {
                    self.pos = next;
                    if n > 0 {
                        if self.open.len() >= MAX_DEPTH {
                            return Err(bad("reply nested too deep"));
                        }
                        self.open.push(n);
                        continue;
                    }
                }
                _ => return Err(bad("unexpected reply type")),
            }
            // One element is whole: close the arrays it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let end = self.pos;
                        self.pos = 0;
                        return Ok(Some(end));
                    }
                    Some(left) if *left > 1 => {
                        *left -= 1;
                        break;
                    }
                    Some(_) => {
                        self.open.pop();
                    }
                }
            }
        }
    }
}

/// The header line at `pos`: its type byte, its number (0 for lines that
/// carry text) and where the element's body starts; None while incomplete.
fn header(buf: &[u8], pos: usize) -> RedisResult<Option<(u8, i64, usize)>> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let nl = pos + nl;
    if nl < pos + 2 || buf[nl - 1] != b'\r' {
        return Err(bad("reply line without CRLF"));
    }
    let n = match kind {
        b'$' | b'*' | b':' => int(&buf[pos + 1..nl - 1])?,
        _ => 0,
    };
    Ok(Some((kind, n, nl + 1)))
}

fn int(digits: &[u8]) -> RedisResult<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(bad("not an integer"));
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad("not an integer"));
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or_else(|| bad("integer out of range"))?;
    }
    Ok(if neg { -n } else { n })
}

/// The value of one whole reply (as measured by [`Scan`]).
fn build(reply: &[u8]) -> RedisResult<Value> {
    let mut pos = 0;
    let v = element(reply, &mut pos, 0)?;
    if pos != reply.len() {
        return Err(bad("reply longer than measured"));
    }
    Ok(v)
}

fn element(buf: &[u8], pos: &mut usize, depth: usize) -> RedisResult<Value> {
    let (kind, n, next) = header(buf, *pos)?.ok_or_else(|| bad("reply cut short"))?;
    let line = buf.get(*pos + 1..next - 2).unwrap_or_default();
    let start = *pos;
    *pos = next;
    Ok(match kind {
        b'+' if line == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(line).into_owned()),
        // Rare: redis-rs's own parser gives the error its kind (NOSCRIPT,
        // OOM, …), which callers test.
        b'-' => redis::parse_redis_value(&buf[start..next])?,
        b':' => Value::Int(n),
        b'$' if n < 0 => Value::Nil,
        b'$' => {
            let end = next + usize::try_from(n).map_err(|_| bad("bulk length out of range"))?;
            let body = buf.get(next..end).ok_or_else(|| bad("reply cut short"))?;
            if buf.get(end..end + 2) != Some(b"\r\n") {
                return Err(bad("bulk string without CRLF"));
            }
            *pos = end + 2;
            Value::BulkString(body.to_vec())
        }
        b'*' if n < 0 => Value::Nil,
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(bad("reply nested too deep"));
            }
            // Each element takes at least 3 bytes: a lying length cannot
            // make a huge allocation.
            let len = usize::try_from(n).map_err(|_| bad("array length out of range"))?;
            let mut items = Vec::with_capacity(len.min(buf.len() / 3));
            for _ in 0..len {
                items.push(element(buf, pos, depth + 1)?);
            }
            Value::Array(items)
        }
        _ => return Err(bad("unexpected reply type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(bytes: &[u8]) -> RedisResult<Option<(usize, Value)>> {
        let mut scan = Scan::default();
        Ok(match scan.end(bytes)? {
            Some(end) => Some((end, build(&bytes[..end])?)),
            None => None,
        })
    }

    #[test]
    fn reads_what_redis_sends() {
        let stream_reply =
            b"*1\r\n*2\r\n$6\r\nstream\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n";
        let (end, v) = whole(stream_reply).unwrap().unwrap();
        assert_eq!(end, stream_reply.len());
        assert_eq!(v, redis::parse_redis_value(stream_reply).unwrap());
        assert_eq!(whole(b"+OK\r\n").unwrap().unwrap().1, Value::Okay);
        assert_eq!(whole(b":-12\r\n").unwrap().unwrap().1, Value::Int(-12));
        assert_eq!(whole(b"$-1\r\n").unwrap().unwrap().1, Value::Nil);
        assert_eq!(whole(b"*-1\r\n").unwrap().unwrap().1, Value::Nil);
        assert_eq!(whole(b"*0\r\n").unwrap().unwrap().1, Value::Array(vec![]));
        // An error reply keeps the kind redis-rs gives it.
        let (_, e) = whole(b"-NOSCRIPT No matching script.\r\n")
            .unwrap()
            .unwrap();
        let Value::ServerError(e) = e else {
            panic!("not an error: {e:?}")
        };
        assert_eq!(RedisError::from(e).code(), Some("NOSCRIPT"));
    }

    #[test]
    fn waits_for_the_rest_and_refuses_garbage() {
        for cut in [1, 3, 5, 12, 18] {
            let full = b"*2\r\n$5\r\nhello\r\n:7\r\n";
            assert!(whole(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert!(whole(b"?what\r\n").is_err());
        assert!(whole(b":12x\r\n").is_err());
        assert!(whole(b"+no cr\n").is_err());
        assert!(whole(b"$99999999999999999999\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(whole(deep.as_bytes()).is_err());
    }

    async fn mux(url: &str, response_timeout: Duration) -> RedisResult<Mux> {
        let client = redis::Client::open(url)?;
        Mux::connect(
            client.get_connection_info(),
            Duration::from_secs(2),
            response_timeout,
        )
        .await
    }

    async fn client_id(m: &mut Mux) -> RedisResult<i64> {
        redis::cmd("CLIENT").arg("ID").query_async(m).await
    }

    /// Commands, pipelines and error replies on a real Redis; a frozen
    /// Redis (SIGSTOP) fails a command within the response timeout and the
    /// next command gets a new connection; a Redis restarted empty is
    /// reached again without a new `Mux`.
    #[tokio::test]
    async fn serves_times_out_and_reconnects() {
        let dir = wscluster_testkit::tmpdir("mux").unwrap();
        let mut redis = wscluster_testkit::RedisServer::start(&dir).unwrap();
        let mut m = mux(&redis.url(), Duration::from_millis(800)).await.unwrap();
        let n: i64 = redis::cmd("INCR")
            .arg("k")
            .query_async(&mut m)
            .await
            .unwrap();
        assert_eq!(n, 1);
        let (n, s): (i64, String) = redis::pipe()
            .cmd("INCR")
            .arg("k")
            .cmd("GET")
            .arg("k")
            .query_async(&mut m)
            .await
            .unwrap();
        assert_eq!((n, s.as_str()), (2, "2"));
        let e = redis::cmd("HGET")
            .arg("k")
            .arg("f")
            .query_async::<Value>(&mut m)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("WRONGTYPE"));
        // Nothing asked, nothing waited for.
        let empty = redis::pipe();
        let none =
            tokio::time::timeout(Duration::from_secs(2), m.req_packed_commands(&empty, 0, 0)).await;
        assert_eq!(none.expect("an empty pipeline must not wait"), Ok(vec![]));
        // Many callers at once on one connection, each gets its own reply.
        let calls = (0..200).map(|i| {
            let mut m = m.clone();
            async move {
                redis::cmd("ECHO")
                    .arg(i)
                    .query_async::<i64>(&mut m)
                    .await
                    .map(|v| v == i)
            }
        });
        let all = futures::future::join_all(calls).await;
        assert!(all.into_iter().all(|r| r == Ok(true)));

        let before = client_id(&mut m).await.unwrap();
        let pid = redis.pid().unwrap();
        assert!(wscluster_testkit::signal(pid, libc::SIGSTOP));
        let frozen = tokio::time::timeout(
            Duration::from_secs(10),
            redis::cmd("PING").query_async::<String>(&mut m),
        )
        .await;
        assert!(wscluster_testkit::signal(pid, libc::SIGCONT));
        let e = frozen
            .expect("a frozen Redis must fail the command, not hang it")
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let after = client_id(&mut m).await.unwrap();
        assert_ne!(before, after, "the timed-out connection was kept");

        redis.restart_empty().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match redis::cmd("PING").query_async::<String>(&mut m).await {
                Ok(p) => break assert_eq!(p, "PONG"),
                Err(e) if Instant::now() < deadline => {
                    assert!(e.is_connection_dropped() || e.is_io_error(), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("not reconnected after a restart: {e}"),
            }
        }
    }

    /// A blocking reader's connection: reads answer; a read abandoned
    /// half-way (its future dropped) does not hand its late reply to the
    /// next command; a frozen Redis fails a read within the response
    /// timeout, and the next command connects again.
    #[tokio::test]
    async fn solo_answers_forgets_abandoned_reads_and_times_out() {
        let dir = wscluster_testkit::tmpdir("solo").unwrap();
        let redis = wscluster_testkit::RedisServer::start(&dir).unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut s = Solo::connect(
            client.get_connection_info(),
            Duration::from_secs(2),
            Duration::from_millis(1500),
        )
        .await
        .unwrap();
        let _: String = redis::cmd("XADD")
            .arg("s")
            .arg("1-1")
            .arg("f")
            .arg("v")
            .query_async(&mut s)
            .await
            .unwrap();
        let mut read = redis::cmd("XREAD");
        read.arg("BLOCK").arg(300).arg("STREAMS").arg("s").arg("0");
        let v = s.req_packed_command(&read).await.unwrap();
        assert_eq!(
            v,
            redis::parse_redis_value(
                b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
            )
            .unwrap()
        );

        let mut wait = redis::cmd("XREAD");
        wait.arg("BLOCK").arg(300).arg("STREAMS").arg("s").arg("$");
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), s.req_packed_command(&wait)).await;
        assert!(abandoned.is_err(), "the read should still be blocked");
        let p: String = redis::cmd("PING").query_async(&mut s).await.unwrap();
        assert_eq!(p, "PONG");

        let before = client_id_solo(&mut s).await;
        let pid = redis.pid().unwrap();
        assert!(wscluster_testkit::signal(pid, libc::SIGSTOP));
        let frozen =
            tokio::time::timeout(Duration::from_secs(10), s.req_packed_command(&wait)).await;
        assert!(wscluster_testkit::signal(pid, libc::SIGCONT));
        let e = frozen
            .expect("a frozen Redis must fail the read, not hang it")
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_ne!(before, client_id_solo(&mut s).await);
    }

    async fn client_id_solo(s: &mut Solo) -> i64 {
        redis::cmd("CLIENT").arg("ID").query_async(s).await.unwrap()
    }

    /// Redis silent past the timeout while this task listened: overdue. A
    /// tick that comes far too late (this process was frozen) is not Redis's
    /// silence: the wait starts again (a request's reply may be on its way,
    /// and failing it would lose the reply of a command that ran).
    #[tokio::test(start_paused = true)]
    async fn a_freeze_of_this_process_is_not_redis_silence() {
        let (reply, _answer) = oneshot::channel();
        let mut waiting = VecDeque::from([Waiting {
            since: Instant::now(),
            wanted: Wanted::new(0, 1),
            reply,
        }]);
        let mut clock = Clock {
            timeout: Duration::from_secs(5),
            last_tick: Instant::now(),
        };
        for _ in 0..20 {
            tokio::time::advance(TICK).await;
            assert!(!clock.overdue(&mut waiting));
        }
        tokio::time::advance(TICK).await;
        assert!(clock.overdue(&mut waiting), "5.25 s of silence");

        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            !clock.overdue(&mut waiting),
            "a frozen process heard nothing"
        );
        tokio::time::advance(TICK).await;
        assert!(!clock.overdue(&mut waiting));
        for _ in 0..20 {
            tokio::time::advance(TICK).await;
            clock.overdue(&mut waiting);
        }
        assert!(clock.overdue(&mut waiting), "silent again past the timeout");
    }

    /// The password and database of the URL are used on every connection.
    #[tokio::test]
    async fn authenticates_and_selects_the_database() {
        let dir = wscluster_testkit::tmpdir("mux-auth").unwrap();
        fn with_password(port: u16, _: &[String]) -> (Vec<String>, String) {
            (
                vec!["--port".into(), port.to_string()],
                format!("redis://:sesame@127.0.0.1:{port}/"),
            )
        }
        let redis = wscluster_testkit::RedisServer::start_with(
            &dir,
            &["--requirepass".into(), "sesame".into()],
            with_password,
        )
        .unwrap();
        let url = |pw: &str| format!("redis://:{pw}@127.0.0.1:{}/3", redis.port);
        let e = mux(&url("wrong"), Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
        let mut m = mux(&url("sesame"), Duration::from_secs(5)).await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("here")
            .arg("3")
            .query_async(&mut m)
            .await
            .unwrap();
        let mut other = redis::Client::open(format!("redis://:sesame@127.0.0.1:{}/3", redis.port))
            .unwrap()
            .get_connection()
            .unwrap();
        let v: String = redis::cmd("GET").arg("here").query(&mut other).unwrap();
        assert_eq!(v, "3");
    }

    fn reply() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            "[a-zA-Z ]{0,8}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
            any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| {
                let mut v = format!("${}\r\n", b.len()).into_bytes();
                v.extend(b);
                v.extend(b"\r\n");
                v
            }),
            Just(b"$-1\r\n".to_vec()),
            Just(b"*-1\r\n".to_vec()),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(|items| {
                let mut v = format!("*{}\r\n", items.len()).into_bytes();
                for i in items {
                    v.extend(i);
                }
                v
            })
        })
    }

    proptest! {
        /// Same values as redis-rs's parser, however the bytes arrive.
        #[test]
        fn agrees_with_redis_rs_in_any_chunks(
            replies in proptest::collection::vec(reply(), 1..5),
            chunk in 1usize..40,
        ) {
            let all: Vec<u8> = replies.concat();
            let mut buf = BytesMut::new();
            let mut scan = Scan::default();
            let mut got = Vec::new();
            for piece in all.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(end) = scan.end(&buf).unwrap() {
                    got.push(build(&buf[..end]).unwrap());
                    buf.advance(end);
                }
            }
            prop_assert!(buf.is_empty());
            let want: Vec<Value> = replies
                .iter()
                .map(|r| redis::parse_redis_value(r).unwrap())
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}

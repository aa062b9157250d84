//! One WebSocket session: register, greet, then pump frames both ways.
//!
//! The order on the wire is `welcome`, the mailbox, then live messages: the
//! connection is in the local registry before it is registered in Redis,
//! so live messages that arrive meanwhile wait in its outbox until the
//! mailbox has been written.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::Shared;
use super::auth::Principal;
use super::frames::{self, ClientFrame};
use crate::bus::{Mailbox, Publish, Resume};
use crate::ids::ConnId;
use crate::local::{ConnHandle, OutboxRx, Outgoing, Wake};
use crate::message::{self, Target, now_ms};

/// Close codes (contract §3).
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_GOING_AWAY: u16 = 1012;
pub const CLOSE_TRY_LATER: u16 = 1013;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Live messages written and not confirmed by a pong before the client
/// counts as not reading.
const MAX_UNCONFIRMED: usize = 4 * crate::local::OUTBOX;
/// At most one confirmation ping per connection per this long while
/// messages flow; a message on a connection quiet this long takes its ping
/// with it (see `PageAcks::live`).
const PING_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// …or sooner, when this many messages wait for one.
const PING_AFTER: usize = 256;
/// Frames written per flush when the outbox has a backlog.
const WRITE_BATCH: usize = 64;
/// Longest a batch may take to write before the client counts as stuck.
const WRITE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest we wait to hand a close frame to a client (one whose socket is
/// full gets it once it reads again, if it does within this time).
const CLOSE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest we wait for the client's side of the closing handshake.
const CLOSE_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(1);

/// What a session starts from, boxed: the upgrade callback and the
/// session's future each keep their captures for the connection's life,
/// so they hold one pointer instead.
pub struct Start {
    pub shared: Arc<Shared>,
    pub who: Principal,
    pub resume: Option<Resume>,
    /// The connection's place under `--max-connections`, held to the end.
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

/// The session of one upgraded socket. Not an `async fn`: its arguments
/// would stay in the future (which every idle connection keeps) for its
/// whole life, the socket among them (368 bytes, twice with `pump`'s);
/// the socket is split first and only its two small halves are kept.
pub fn run(start: Box<Start>, socket: WebSocket) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    async move {
        let st = start;
        // The slot is released when `st` drops, as the session ends.
        let Start {
            shared,
            who,
            resume,
            slot: _held,
        } = &*st;
        let (h, rx) = ConnHandle::new(ConnId::random(), who.user.clone());
        shared.registry.insert(h.clone());
        shared.metrics.connections.inc();
        match pump(shared, sink, stream, &h, rx, who, resume.as_ref()).await {
            Ok(()) => tracing::debug!(conn = %h.conn, user = %h.user, "session ended"),
            Err(e) => tracing::debug!(conn = %h.conn, user = %h.user, error = %e, "session ended"),
        }
        shared.metrics.connections.dec();
    }
}

/// What opening a session leaves for its loop.
struct Opened {
    replayed: Option<Replayed>,
    acks: PageAcks,
    /// How writing `welcome`, the replay and the mailbox went.
    r: Result<(), axum::Error>,
}

/// Register, then write `welcome`, the replay and the mailbox. `None`:
/// registering failed. Its own (boxed) future: what it holds is not kept
/// for the connection's life.
async fn open(
    shared: &Arc<Shared>,
    sink: &mut SplitSink<WebSocket, WsMessage>,
    h: &Arc<ConnHandle>,
    resume: Option<&Resume>,
) -> Option<Opened> {
    let reg = match shared.bus.register(h, resume).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "register failed");
            return None;
        }
    };
    match reg.recovered {
        Some(true) => {
            shared.metrics.resumed.inc();
        }
        Some(false) => {
            shared.metrics.resume_failed.inc();
        }
        None => {}
    }
    // After a resume, the replay holds every message up to the position
    // registered: the same ones coming from the mailbox or live are not
    // written twice (contract §9).
    let replayed = (reg.recovered == Some(true)).then(|| Replayed {
        epoch: reg.pos.epoch.clone(),
        upto: reg.pos.seq,
    });
    // `welcome`, the replay, then the mailbox page by page, before anything
    // live (which waits in the outbox meanwhile).
    let welcome = WsMessage::Text(message::welcome(
        &shared.bus.node_id(),
        &h.conn,
        &h.user,
        &reg.pos,
        reg.recovered,
    ));
    for m in &reg.replay {
        delivered(shared, m.sent_ms);
    }
    let first: Vec<WsMessage> = std::iter::once(welcome)
        .chain(reg.replay.iter().map(|m| WsMessage::Text(m.frame())))
        .collect();
    drop(reg.replay);
    let mut acks = PageAcks::default();
    let r = write_mailbox(
        shared,
        sink,
        h,
        first,
        reg.mailbox,
        &mut acks,
        replayed.as_ref(),
    )
    .await;
    Some(Opened { replayed, acks, r })
}

async fn pump(
    shared: &Arc<Shared>,
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut stream: SplitStream<WebSocket>,
    h: &Arc<ConnHandle>,
    mut rx: OutboxRx,
    who: &Principal,
    resume: Option<&Resume>,
) -> Result<(), axum::Error> {
    // Rare or long steps are boxed: the session's future, which every idle
    // connection keeps, is as large as its largest await (issue 16).
    let Some(Opened {
        replayed,
        mut acks,
        mut r,
    }) = Box::pin(open(shared, &mut sink, h, resume)).await
    else {
        Box::pin(finish(shared, h, rx)).await;
        Box::pin(close_ws(
            &mut sink,
            &mut stream,
            CLOSE_TRY_LATER,
            "node unavailable",
        ))
        .await;
        return Ok(());
    };
    h.set_ready();
    let rate = shared.cfg.max_msgs_per_sec;
    let limiter: DefaultDirectRateLimiter = RateLimiter::direct_with_clock(
        Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(rate.saturating_mul(2)).unwrap_or(NonZeroU32::MIN)),
        super::CLOCK.clone(),
    );
    // "Exceeded repeatedly" (contract §3, 1008): more refused frames within
    // a window than the burst allows — a client sending over twice its rate
    // for the window, or one burst that far over. Counted whether or not
    // frames pass in between: a steady flood gets its rate's worth through
    // and must still end.
    let mut refusals = Refusals::new(rate.saturating_mul(2).max(10));
    // Grows on first use: an idle connection should cost as little as possible.
    let mut batch: Vec<Outgoing> = Vec::new();
    // The client started the closing handshake: our close frame answers it.
    let mut client_closed = false;
    // The token's `exp`: past it plus the leeway, the connection is closed
    // with 4001 unless a `refresh` moved it (contract §3).
    let mut exp = who.exp;

    // An idle session waits on three futures: one timer (token expiry or
    // the next confirmation ping), its outbox (frames, a close, the
    // mailbox), the socket.
    while r.is_ok() {
        if h.is_closing() {
            break;
        }
        if h.take_mailbox_wanted() {
            r = Box::pin(more_mailbox(
                shared,
                &mut sink,
                h,
                &mut acks,
                replayed.as_ref(),
            ))
            .await;
            continue;
        }
        let expires = exp.map(|_| expiry(exp, shared.cfg.jwt_leeway_s));
        let timer = match (expires, acks.ping_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(timer.unwrap_or_else(far_future)), if timer.is_some() => {
                let now = tokio::time::Instant::now();
                if expires.is_some_and(|t| t <= now) {
                    h.close(CLOSE_TOKEN_EXPIRED);
                } else if acks.ping_due().is_some_and(|t| t <= now) {
                    let ping = WsMessage::Ping(acks.ping());
                    r = Box::pin(write_bounded(&mut sink, h, std::iter::once(ping))).await;
                }
            }
            w = rx.wait(&mut batch, WRITE_BATCH) => {
                match w {
                    Wake::Signal => continue,
                    Wake::Closed => break,
                    Wake::Frames => {}
                }
                if let Some(rp) = &replayed {
                    // Dropped: their guards release their inbox entries.
                    batch.retain(|o| !o.msg.as_ref().is_some_and(|m| rp.covers(m)));
                    if batch.is_empty() { continue; }
                }
                // User messages are followed by a ping: they stay
                // unconfirmed (their inbox entries kept) until its pong.
                // Fewer than a full batch: the outbox is empty for now.
                let ping = acks.live(&batch, batch.len() < WRITE_BATCH).map(WsMessage::Ping);
                let frames = batch
                    .iter()
                    .map(|out| WsMessage::Text(out.text.clone()))
                    .chain(ping);
                r = Box::pin(write_bounded(&mut sink, h, frames)).await;
                if r.is_ok() {
                    for out in &batch {
                        if let Some(m) = &out.msg {
                            delivered(shared, m.sent_ms);
                        }
                    }
                    acks.hold(batch.drain(..).filter(|out| out.msg.is_some()));
                    if acks.unconfirmed() > MAX_UNCONFIRMED {
                        // Written but never confirmed: it does not read.
                        h.close(CLOSE_TRY_LATER);
                    }
                }
                // Else not (surely) written: they stay in `batch`, handed
                // back after the older unconfirmed ones (the session ends).
            }
            frame = stream.next() => {
                let text = match frame {
                    None => break,
                    Some(Err(e)) => {
                        if is_too_big(&e) {
                            Box::pin(close_ws(&mut sink, &mut stream, CLOSE_TOO_BIG, "frame too big")).await;
                        }
                        break;
                    }
                    Some(Ok(WsMessage::Text(t))) => Some(Some(t)),
                    Some(Ok(WsMessage::Binary(_))) => Some(None),
                    Some(Ok(WsMessage::Close(_))) => {
                        client_closed = true;
                        break;
                    }
                    Some(Ok(WsMessage::Pong(data))) => {
                        if let Some(read) = acks.acked(&data) {
                            shared.bus.mailbox_written(h, &read).await;
                        }
                        continue;
                    }
                    // Answered by the library, but counted: a ping flood
                    // costs writes too.
                    Some(Ok(WsMessage::Ping(_))) => None,
                };
                // Every frame counts against the rate, whatever it holds.
                if limiter.check().is_err() {
                    if refusals.one_more(tokio::time::Instant::now()) {
                        h.close(CLOSE_POLICY);
                        break;
                    }
                    reply(h, message::error("rate_limited", "too many messages", None));
                    continue;
                }
                match text {
                    Some(Some(text)) => reply(h, Box::pin(handle(shared, h, who, &mut exp, text.as_str())).await),
                    Some(None) => reply(h, message::error("bad_frame", "frames are JSON text", None)),
                    None => {}
                }
            }
        }
    }
    // Leave first — hand back what was not written, unregister — so
    // nothing waits on a client that may never read its close frame.
    // Messages written but not confirmed may never have been read (a
    // reset, a client that stopped reading, this node leaving): route them
    // again rather than trust the kernel's buffers.
    // In seq order: the confirmed prefix is gone, then what was written,
    // then a batch whose write failed, then the outbox (in `finish`), so
    // a mailbox they land in stays in order (§3).
    for out in acks.take_unconfirmed().chain(batch.drain(..)) {
        requeue(shared, out);
    }
    let code = h.close_code();
    if h.is_closing() && code == CLOSE_GOING_AWAY {
        // The node is leaving (§6): its lease is expired, so routers no
        // longer count this connection, and its self-reap (or a
        // survivor's) removes it. The close goes out now, not after a
        // Redis that may hang: exit comes within the drain plus a second.
        let close = close_ws(&mut sink, &mut stream, code, "node going away");
        let _ = tokio::join!(Box::pin(finish(shared, h, rx)), Box::pin(close));
        return r;
    }
    Box::pin(finish(shared, h, rx)).await;
    if h.is_closing() {
        // The app's reason wins: it may close with any code of 4000–4099,
        // 4001 included (§10).
        let reason = h.close_reason().unwrap_or_else(|| {
            match code {
                CLOSE_TRY_LATER => "too slow",
                CLOSE_POLICY => "rate limit exceeded",
                CLOSE_TOKEN_EXPIRED => "token expired",
                _ => "closing",
            }
            .to_owned()
        });
        Box::pin(close_ws(&mut sink, &mut stream, code, &reason)).await;
    } else if client_closed {
        // The library queued the echo of the client's close frame; send it
        // (bounded: a client that closed may not read any more).
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, sink.flush()).await;
    }
    r
}

/// Read the user's mailbox after what was written, and write it (a
/// message that could not reach the connection live went there).
async fn more_mailbox(
    shared: &Arc<Shared>,
    sink: &mut SplitSink<WebSocket, WsMessage>,
    h: &Arc<ConnHandle>,
    acks: &mut PageAcks,
    replayed: Option<&Replayed>,
) -> Result<(), axum::Error> {
    let after = Mailbox {
        cursor: acks.cursor.clone(),
        ..Mailbox::default()
    };
    match shared.bus.take_mailbox(h, &after).await {
        Ok(page) => write_mailbox(shared, sink, h, Vec::new(), page, acks, replayed).await,
        Err(e) => {
            tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "mailbox read failed");
            Ok(())
        }
    }
}

/// When a token with `exp` (Unix s) stops being good: `exp` plus the
/// leeway, from now on the monotonic clock.
fn expiry(exp: Option<u64>, leeway_s: u64) -> tokio::time::Instant {
    let Some(exp) = exp else {
        return far_future();
    };
    let left = (exp + leeway_s).saturating_sub(now_ms() / 1000);
    tokio::time::Instant::now() + std::time::Duration::from_secs(left)
}

/// Answer one client frame.
async fn handle(
    shared: &Arc<Shared>,
    h: &Arc<ConnHandle>,
    who: &Principal,
    exp: &mut Option<u64>,
    text: &str,
) -> axum::extract::ws::Utf8Bytes {
    let frame = match frames::parse(text, shared.cfg.max_payload_bytes) {
        Ok(f) => f,
        Err(e) => return message::error(e.code, &e.message, e.r#ref.as_ref()),
    };
    match frame {
        ClientFrame::Ping => message::pong(),
        ClientFrame::Refresh(token) => match shared.auth.authenticate(Some(&token), None) {
            Ok(p) if p.user == who.user => {
                // A token for the same user: its expiry now applies.
                let new = p.exp.unwrap_or(0);
                *exp = Some(new);
                message::refreshed(new)
            }
            Ok(_) => message::error(
                "forbidden",
                "the token is for another user; the old expiry stands",
                None,
            ),
            Err(e) => message::error("forbidden", &format!("{e}; the old expiry stands"), None),
        },
        ClientFrame::Send { to, payload, r#ref } => {
            let p = Publish {
                target: Target::User(to),
                payload,
                from: Some(who.user.clone()),
                idem: None,
            };
            match shared.bus.publish(p).await {
                Ok(id) => message::sent(r#ref.as_ref(), &id),
                Err(e) => {
                    tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "send failed");
                    message::error(
                        "unavailable",
                        "message not accepted, try again",
                        r#ref.as_ref(),
                    )
                }
            }
        }
        ClientFrame::Subscribe(t, r#ref) => {
            // Errors carry the frame's `ref`, like every other frame's.
            if !who.topics.allows(&t) {
                return message::error(
                    "forbidden_topic",
                    "your token does not allow this topic",
                    r#ref.as_ref(),
                );
            }
            if !shared
                .registry
                .subscribe(h, &t, shared.cfg.max_topics_per_conn)
            {
                return message::error(
                    "bad_frame",
                    &format!(
                        "at most {} topics per connection",
                        shared.cfg.max_topics_per_conn
                    ),
                    r#ref.as_ref(),
                );
            }
            message::topic_ack("subscribed", &t)
        }
        ClientFrame::Unsubscribe(t) => {
            shared.registry.unsubscribe(h, &t);
            message::topic_ack("unsubscribed", &t)
        }
    }
}

/// Frames written and not yet known to be read: mailbox pages and live
/// messages. Each page, and each batch of live messages, is followed by a
/// WebSocket ping; the client's pong for it (which every WebSocket client
/// sends once it has read that far, RFC 6455) is what deletes the page from
/// the mailbox, or releases the messages' inbox entries. A client that resets its connection,
/// or a node that dies, before the pong leaves the page in the mailbox for
/// the next connection (duplicates with the same id, never loss).
#[derive(Default)]
struct PageAcks {
    next: u64,
    pending: std::collections::VecDeque<(u64, Mailbox)>,
    /// The last mailbox entry read: a later read starts after it.
    cursor: Option<String>,
    /// Live messages written and not yet confirmed by a pong, with the
    /// token of the ping that followed them. They hold their guards (their
    /// inbox entries stay), and go back to be routed again if the
    /// connection ends first.
    live: std::collections::VecDeque<(u64, Outgoing)>,
    /// The token of the ping that follows the batch being written.
    live_token: Option<u64>,
    /// Written messages no ping has followed yet: a ping goes out with a
    /// later batch, or on its own, [`PING_EVERY`] after the last ping.
    unpinged: bool,
    /// When the last ping went out: at most one per [`PING_EVERY`].
    last_ping: Option<tokio::time::Instant>,
}

impl PageAcks {
    /// Remember a written page; the ping payload to follow it.
    fn written(&mut self, page: &Mailbox) -> Option<bytes::Bytes> {
        if page.cursor.is_some() {
            self.cursor = page.cursor.clone();
        }
        if page.ids.is_empty() {
            return None;
        }
        self.next += 1;
        self.pending.push_back((
            self.next,
            Mailbox {
                ids: page.ids.clone(),
                ..Mailbox::default()
            },
        ));
        Some(bytes::Bytes::copy_from_slice(&self.next.to_be_bytes()))
    }

    /// The ping to follow a batch of live frames, in the same write: a
    /// ping of its own would cost a timer, a wake-up and a write (issue
    /// 16). It follows the batch that empties the outbox (`last`: the end
    /// of a burst, or a lone message), so a client that has read
    /// everything has confirmed everything — one that then closes
    /// cleanly gets nothing twice, on any of its devices (§7: duplicates
    /// only around failures). Within a burst, one per [`PING_EVERY`] at
    /// most, or when many wait; the others are held under the next one.
    fn live(&mut self, batch: &[Outgoing], last: bool) -> Option<bytes::Bytes> {
        let has_msgs = batch.iter().any(|o| o.msg.is_some());
        self.live_token = has_msgs.then_some(self.next + 1);
        if !has_msgs {
            return None;
        }
        let quiet = self.last_ping.is_none_or(|t| t.elapsed() >= PING_EVERY);
        if quiet || last || self.live.len() >= PING_AFTER {
            return Some(self.ping());
        }
        self.unpinged = true;
        None
    }

    /// A ping now: it confirms every message held so far.
    fn ping(&mut self) -> bytes::Bytes {
        self.next += 1;
        self.unpinged = false;
        self.last_ping = Some(tokio::time::Instant::now());
        bytes::Bytes::copy_from_slice(&self.next.to_be_bytes())
    }

    /// When held messages need a ping of their own (none followed them).
    fn ping_due(&self) -> Option<tokio::time::Instant> {
        // Held messages imply a ping within the last PING_EVERY (see `live`).
        self.last_ping
            .filter(|_| self.unpinged)
            .map(|t| t + PING_EVERY)
    }

    /// The batch's messages are written: hold them until the pong.
    fn hold(&mut self, written: impl Iterator<Item = Outgoing>) {
        if let Some(t) = self.live_token.take() {
            self.live.extend(written.map(|o| (t, o)));
        }
    }

    fn unconfirmed(&self) -> usize {
        self.live.len()
    }

    fn take_unconfirmed(&mut self) -> impl Iterator<Item = Outgoing> + '_ {
        self.live.drain(..).map(|(_, o)| o)
    }

    /// A pong: the live messages it covers are read (dropping them
    /// releases their guards), and so are the mailbox pages (returned, to
    /// be deleted).
    fn acked(&mut self, data: &[u8]) -> Option<Mailbox> {
        let token = u64::from_be_bytes(data.try_into().ok()?);
        while self.live.front().is_some_and(|(t, _)| *t <= token) {
            self.live.pop_front();
        }
        let mut read = Mailbox::default();
        while self.pending.front().is_some_and(|(t, _)| *t <= token) {
            if let Some((_, p)) = self.pending.pop_front() {
                read.ids.extend(p.ids);
            }
        }
        (!read.ids.is_empty()).then_some(read)
    }
}

/// What a resume answered `recovered:true` for: every message up to
/// `upto` under `epoch` — those after `since` were replayed, and the client
/// said it has the rest (`since` is the seq up to which it has every
/// message). The mailbox or a live route bringing one again (written but
/// unconfirmed when the old connection ended) is not written twice.
struct Replayed {
    epoch: String,
    upto: u64,
}

impl Replayed {
    fn covers(&self, m: &message::Message) -> bool {
        m.seq > 0 && m.seq <= self.upto && *m.epoch == *self.epoch
    }
}

/// Write `first` (`welcome` and a resume's replay), then the mailbox from
/// `page` on, page by page, each followed by a ping (see [`PageAcks`]).
/// Mailbox messages `replayed` covers are not written again (but deleted
/// with their page).
async fn write_mailbox<S>(
    shared: &Arc<Shared>,
    sink: &mut S,
    h: &ConnHandle,
    mut first: Vec<WsMessage>,
    mut page: Mailbox,
    acks: &mut PageAcks,
    replayed: Option<&Replayed>,
) -> Result<(), axum::Error>
where
    S: futures::Sink<WsMessage, Error = axum::Error> + Unpin,
{
    loop {
        let ping = acks.written(&page).map(WsMessage::Ping);
        let fresh = |m: &&Arc<message::Message>| !replayed.is_some_and(|r| r.covers(m));
        let frames = std::mem::take(&mut first)
            .into_iter()
            .chain(
                page.msgs
                    .iter()
                    .filter(fresh)
                    .map(|m| WsMessage::Text(m.frame())),
            )
            .chain(ping);
        write_bounded(sink, h, frames).await?;
        for m in page.msgs.iter().filter(fresh) {
            delivered(shared, m.sent_ms);
        }
        if !page.more {
            if h.is_ready() {
                return Ok(());
            }
            // Messages that missed the full outbox meanwhile were routed
            // to the mailbox: take one more page once ready.
            h.set_ready();
        }
        let after = Mailbox {
            cursor: acks.cursor.clone(),
            ..Mailbox::default()
        };
        page = match shared.bus.take_mailbox(h, &after).await {
            Ok(p) => p,
            Err(e) => {
                // What was not taken stays for later (or a nudge).
                tracing::warn!(conn = %h.conn, user = %h.user, error = %e, "mailbox page failed");
                return Ok(());
            }
        };
    }
}

/// Frames refused by the rate limit within the current window.
struct Refusals {
    max: u32,
    n: u32,
    since: tokio::time::Instant,
}

impl Refusals {
    /// How long refusals count together.
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

    fn new(max: u32) -> Self {
        Refusals {
            max,
            n: 0,
            since: tokio::time::Instant::now(),
        }
    }

    /// Count a refusal at `now`; true once more than `max` fell in one
    /// window (the connection is to be closed with 1008).
    fn one_more(&mut self, now: tokio::time::Instant) -> bool {
        if now.duration_since(self.since) >= Self::WINDOW {
            self.n = 0;
            self.since = now;
        }
        self.n += 1;
        self.n > self.max
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
}

/// Queue a reply to a client frame. Replies go through the bounded outbox
/// like messages, so every write has the write deadline: a client that
/// sends but never reads fills it and is closed with 1013.
fn reply(h: &ConnHandle, text: axum::extract::ws::Utf8Bytes) {
    if !h.push(Outgoing::control(text)) {
        h.close(CLOSE_TRY_LATER);
    }
}

/// Write `frames` and flush, bounded: a client that does not read blocks
/// this write, and a close request (say its outbox overflowed) or the
/// write deadline ends it (the deadline closes it with 1013).
async fn write_bounded<S>(
    sink: &mut S,
    h: &ConnHandle,
    frames: impl Iterator<Item = WsMessage>,
) -> Result<(), axum::Error>
where
    S: futures::Sink<WsMessage, Error = axum::Error> + Unpin,
{
    let write = async {
        for f in frames {
            sink.feed(f).await?;
        }
        sink.flush().await
    };
    tokio::select! {
        r = tokio::time::timeout(WRITE_DEADLINE, write) => r.unwrap_or_else(|_| {
            h.close(CLOSE_TRY_LATER);
            Err(axum::Error::new("write deadline passed"))
        }),
        _ = h.closing() => Err(axum::Error::new("closed while writing")),
    }
}

/// Leave the registry, hand back what was queued but not written, and
/// unregister from the bus.
async fn finish(shared: &Arc<Shared>, h: &Arc<ConnHandle>, mut rx: OutboxRx) {
    shared.registry.remove(&h.conn);
    rx.close();
    while let Some(out) = rx.try_recv() {
        requeue(shared, out);
    }
    // Also forgets mailbox pages a re-registration queued: by now they are
    // written or handed back.
    shared.bus.unregister(h).await;
}

fn requeue(shared: &Arc<Shared>, out: Outgoing) {
    if let Some(m) = out.msg {
        shared.bus.hand_back(m, out.guard);
    }
}

fn delivered(shared: &Shared, sent_ms: u64) {
    shared.metrics.delivered.inc();
    if sent_ms > 0 {
        let lat = now_ms().saturating_sub(sent_ms) as f64 / 1000.0;
        shared.metrics.route_latency.observe(lat);
    }
}

/// The closing handshake: send a close frame (a client that does not read
/// may never take it, so give up after a moment), then read until the
/// client's close or a short deadline. Dropping a socket with unread input
/// makes the kernel send a reset, and the client would lose the close code.
async fn close_ws<S, R>(sink: &mut S, stream: &mut R, code: u16, reason: &str)
where
    S: futures::Sink<WsMessage> + Unpin,
    R: futures::Stream<Item = Result<WsMessage, axum::Error>> + Unpin,
{
    let frame = WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    if tokio::time::timeout(CLOSE_DEADLINE, sink.send(frame))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

fn is_too_big(e: &axum::Error) -> bool {
    let s = e.to_string();
    s.contains("too long") || s.contains("too big") || s.contains("Space limit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;
    use crate::message::{Message, Target};

    fn batch() -> Vec<Outgoing> {
        let to = UserId::parse("u").expect("user id");
        let m = Message::new("1-0".into(), Target::User(to), None, "1".into(), 0);
        vec![Outgoing {
            text: "{}".into(),
            msg: Some(Arc::new(m)),
            guard: None,
        }]
    }

    /// A steady flood at ten times the rate gets a tenth through and is
    /// still closed (refusals counted per window, not in a row); a client
    /// a little over its rate is not.
    #[test]
    fn a_steady_flood_is_closed_and_a_slight_excess_is_not() {
        let t0 = tokio::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        // Rate 10/s: at most 20 refusals per window. 100 frames/s, every
        // tenth let through: closed within the first window.
        let mut flood = Refusals::new(20);
        let closed_at = (0..200u64)
            .filter(|i| i % 10 != 0)
            .find(|i| flood.one_more(t0 + ms(10 * i)));
        assert!(matches!(closed_at, Some(i) if i < 30), "{closed_at:?}");
        // 12 frames/s against 10/s: 2 refusals a second, for a minute.
        let mut slight = Refusals::new(20);
        assert!(!(0..120u64).any(|i| slight.one_more(t0 + ms(500 * i))));
    }

    /// A message on a quiet connection takes its ping along; within a
    /// burst, at most one ping per PING_EVERY, the held ones pinged on time
    /// — or by the batch that ends the burst.
    #[tokio::test(start_paused = true)]
    async fn pings_ride_along_when_quiet_and_are_rate_limited() {
        let mut acks = PageAcks::default();
        assert!(
            acks.live(&batch(), false).is_some(),
            "quiet: ping in the same write"
        );
        assert_eq!(acks.ping_due(), None, "nothing held");
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        assert!(
            acks.live(&batch(), false).is_none(),
            "10 ms after a ping: held"
        );
        let due = acks.ping_due().expect("held messages get a ping");
        assert_eq!(
            due,
            acks.last_ping.expect("a ping went out") + PING_EVERY,
            "due PING_EVERY after the last ping"
        );
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        assert!(
            acks.live(&batch(), true).is_some(),
            "the end of a burst: ping along, however recent the last"
        );
        assert_eq!(acks.ping_due(), None, "the ping covered the held ones");
        tokio::time::advance(PING_EVERY).await;
        assert!(
            acks.live(&batch(), false).is_some(),
            "quiet again: ping along"
        );
        // A control frame alone is not followed by a ping.
        let control = vec![Outgoing::control("{}".into())];
        tokio::time::advance(PING_EVERY).await;
        assert!(acks.live(&control, true).is_none());
    }
}

//! The node's connection registry: who is connected here, by connection,
//! by user and by topic.
//!
//! Sharded maps (`DashMap`); no lock is ever held across an `.await`.
//! Each connection has a bounded outbox: delivery never waits for a slow
//! client, it closes it instead (its queued messages are routed again).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use smallvec::SmallVec;
use tokio::sync::Notify;

use crate::ack::AckGuard;
use crate::ids::{ConnId, NodeId, Topic, UserId};
use crate::message::Message;

/// Outbox capacity per connection: a session that does not take frames
/// is judged slow (closed with 1013) once this many wait.
pub const OUTBOX: usize = 1024;
/// A session that took frames within [`PROGRESS`] is reading: a burst
/// past [`OUTBOX`] waits for it, up to this many frames. (A 2,000-message
/// burst to one user came faster than a busy node woke its session, and
/// closed a client that was reading.)
const OUTBOX_HARD: usize = 4 * OUTBOX;
/// How recently a session must have taken frames to count as reading.
const PROGRESS: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection's outbox: a bounded queue that allocates nothing while it
/// is empty (a channel's first block of slots would cost every idle
/// connection ~1.6 KB), and gives a burst's memory back once drained.
#[derive(Default)]
struct Outbox {
    q: Mutex<Queue>,
    ready: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    closed: bool,
    /// The session is wanted for something else (a close, the mailbox):
    /// one wake-up for all, so an idle session waits on one future.
    signal: bool,
    /// When the session last took frames.
    taken_at: Option<tokio::time::Instant>,
}

/// Capacity an emptied outbox keeps; more is given back.
const OUTBOX_KEEP: usize = 16;

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding it cannot leave the queue half-changed.
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, out: Outgoing) -> bool {
        let mut q = self.lock();
        let n = q.items.len();
        if q.closed
            || n >= OUTBOX_HARD
            || (n >= OUTBOX && q.taken_at.is_none_or(|t| t.elapsed() >= PROGRESS))
        {
            return false;
        }
        q.items.push_back(out);
        drop(q);
        self.ready.notify_one();
        true
    }

    fn signal(&self) {
        self.lock().signal = true;
        self.ready.notify_one();
    }
}

/// What woke a session waiting on its outbox.
pub enum Wake {
    /// Frames were moved into the caller's buffer.
    Frames,
    /// Look at the connection's state: a close or the mailbox is wanted.
    Signal,
    /// Closed and empty.
    Closed,
}

/// The session's end of its connection's outbox. Dropping it closes the
/// outbox: later frames are refused (and routed again by their sender).
pub struct OutboxRx(Arc<ConnHandle>);

impl OutboxRx {
    /// Wait for frames, and move up to `limit` of them into `buf`, or for
    /// a signal (which comes first). Cancel-safe: nothing is taken unless
    /// returned.
    pub async fn wait(&mut self, buf: &mut Vec<Outgoing>, limit: usize) -> Wake {
        let ob = &self.0.outbox;
        loop {
            {
                let mut q = ob.lock();
                if q.signal {
                    q.signal = false;
                    return Wake::Signal;
                }
                if !q.items.is_empty() {
                    let n = limit.min(q.items.len());
                    buf.extend(q.items.drain(..n));
                    q.taken_at = Some(tokio::time::Instant::now());
                    if q.items.is_empty() && q.items.capacity() > OUTBOX_KEEP {
                        q.items = VecDeque::new();
                    }
                    return Wake::Frames;
                }
                if q.closed {
                    return Wake::Closed;
                }
            }
            // One consumer: a push between the check and here leaves a
            // permit, so no wake-up is lost.
            ob.ready.notified().await;
        }
    }

    /// Refuse further frames; those queued can still be taken.
    pub fn close(&mut self) {
        self.0.outbox.lock().closed = true;
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.0.outbox.lock().items.pop_front()
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        self.close();
    }
}

/// Close code for a client that does not read fast enough ("try again later").
pub const CLOSE_SLOW: u16 = 1013;

/// Something to write to one socket.
#[derive(Clone)]
pub struct Outgoing {
    pub text: Utf8Bytes,
    /// The user message this frame carries, to route again if the
    /// connection closes before writing it. `None` for control frames and
    /// topic messages (at-most-once).
    pub msg: Option<Arc<Message>>,
    /// Held until the frame is written (or handed on), so the stream entry
    /// it came from is deleted only after that.
    pub guard: Option<Arc<AckGuard>>,
}

impl Outgoing {
    pub fn control(text: Utf8Bytes) -> Self {
        Outgoing {
            text,
            msg: None,
            guard: None,
        }
    }
}

/// One live connection as the rest of the node sees it.
pub struct ConnHandle {
    pub conn: ConnId,
    pub user: UserId,
    outbox: Outbox,
    /// A close was asked for ([`ConnHandle::close`]); `closing` wakes
    /// whoever waits for it. (A flag and a `Notify` live in the handle; a
    /// cancellation token would allocate a node per connection.)
    close_asked: std::sync::atomic::AtomicBool,
    closing: Notify,
    close_code: AtomicU16,
    /// The app's reason for a close it asked for (contract §10).
    close_reason: Mutex<Option<String>>,
    /// Its subscriptions (at most `--max-topics-per-conn`, 64 by default:
    /// a vector, which costs nothing while empty).
    topics: Mutex<Vec<Topic>>,
    /// Set once the mailbox has been written. Before that a full outbox
    /// means the mailbox is still going out, not that the client is slow.
    ready: std::sync::atomic::AtomicBool,
    /// The node id this connection was last registered under in Redis, so
    /// a re-registration after a new id that is interrupted resumes where
    /// it stopped instead of registering (and taking mailboxes) twice.
    registered_as: Mutex<Option<NodeId>>,
    /// The user's mailbox got messages while this connection was live (a
    /// message that could not reach it in time): the session reads it.
    mailbox_wanted: std::sync::atomic::AtomicBool,
}

impl ConnHandle {
    pub fn new(conn: ConnId, user: UserId) -> (Arc<Self>, OutboxRx) {
        let h = Arc::new(ConnHandle {
            conn,
            user,
            outbox: Outbox::default(),
            close_asked: std::sync::atomic::AtomicBool::new(false),
            closing: Notify::new(),
            close_code: AtomicU16::new(1000),
            close_reason: Mutex::new(None),
            topics: Mutex::new(Vec::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
            registered_as: Mutex::new(None),
            mailbox_wanted: std::sync::atomic::AtomicBool::new(false),
        });
        (h.clone(), OutboxRx(h))
    }

    /// Queue a frame. False if the outbox is full or closed.
    pub fn push(&self, out: Outgoing) -> bool {
        self.outbox.push(out)
    }

    /// Ask the session to close with `code`.
    pub fn close(&self, code: u16) {
        // The first code asked for wins.
        let _ = self
            .close_code
            .compare_exchange(1000, code, Ordering::SeqCst, Ordering::SeqCst);
        self.close_asked.store(true, Ordering::SeqCst);
        self.closing.notify_waiters();
        self.outbox.signal();
    }

    /// Close with `code` and a reason of the app's (`POST /api/disconnect`).
    pub fn close_with(&self, code: u16, reason: &str) {
        if self
            .close_code
            .compare_exchange(1000, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && let Ok(mut r) = self.close_reason.lock()
        {
            *r = Some(reason.to_owned());
        }
        self.close_asked.store(true, Ordering::SeqCst);
        self.closing.notify_waiters();
        self.outbox.signal();
    }

    /// The reason given with [`ConnHandle::close_with`].
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.close_asked.load(Ordering::SeqCst)
    }

    /// Resolves once a close is asked for (at once if it was).
    pub async fn closing(&self) {
        let notified = self.closing.notified();
        tokio::pin!(notified);
        // Registered before the check: a close between the two still wakes us.
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await;
    }

    pub fn close_code(&self) -> u16 {
        self.close_code.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Ask the session to read the user's mailbox.
    pub fn want_mailbox(&self) {
        self.mailbox_wanted.store(true, Ordering::SeqCst);
        self.outbox.signal();
    }

    /// Whether the mailbox was wanted since the last call (a request made
    /// while the session was busy is kept).
    pub fn take_mailbox_wanted(&self) -> bool {
        self.mailbox_wanted.swap(false, Ordering::SeqCst)
    }

    pub fn set_registered_as(&self, node: &NodeId) {
        if let Ok(mut g) = self.registered_as.lock() {
            *g = Some(node.clone());
        }
    }

    pub fn is_registered_as(&self, node: &NodeId) -> bool {
        self.registered_as
            .lock()
            .map(|g| g.as_ref() == Some(node))
            .unwrap_or(false)
    }
}

/// A user's connections on this node: most users have one, held inline
/// (no allocation per user, none to copy them out for a delivery).
pub type UserConns = SmallVec<[Arc<ConnHandle>; 1]>;

/// All connections of this node.
#[derive(Default)]
pub struct Registry {
    conns: DashMap<ConnId, Arc<ConnHandle>>,
    users: DashMap<UserId, UserConns>,
    topics: DashMap<Topic, Vec<Arc<ConnHandle>>>,
}

/// What a delivery to a user did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Connections the frame was queued for.
    pub queued: usize,
    /// Connections closed because their outbox was full.
    pub overflowed: usize,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, h: Arc<ConnHandle>) {
        self.users
            .entry(h.user.clone())
            .or_default()
            .push(h.clone());
        self.conns.insert(h.conn.clone(), h);
    }

    /// Remove a connection and its subscriptions.
    pub fn remove(&self, conn: &ConnId) -> Option<Arc<ConnHandle>> {
        let (_, h) = self.conns.remove(conn)?;
        self.users.remove_if_mut(&h.user, |_, v| {
            v.retain(|c| c.conn != *conn);
            v.is_empty()
        });
        let topics: Vec<Topic> = h
            .topics
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in topics {
            self.topics.remove_if_mut(&t, |_, v| {
                v.retain(|c| c.conn != *conn);
                v.is_empty()
            });
        }
        Some(h)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.iter().map(|e| e.value().clone()).collect()
    }

    pub fn get(&self, conn: &ConnId) -> Option<Arc<ConnHandle>> {
        self.conns.get(conn).map(|e| e.value().clone())
    }

    pub fn user_conns(&self, user: &UserId) -> UserConns {
        self.users.get(user).map(|v| v.clone()).unwrap_or_default()
    }

    /// Queue `out` for every connection of `user` here. A ready connection
    /// whose outbox is full is closed (its queued messages get routed
    /// again); one still writing its mailbox just misses this frame, which
    /// the caller routes again (it ends in the mailbox being written).
    pub fn deliver_user(&self, user: &UserId, out: &Outgoing) -> Delivered {
        let mut d = Delivered::default();
        // Clone the handles out so no map lock is held while pushing.
        for h in self.user_conns(user) {
            if h.push(out.clone()) {
                d.queued += 1;
            } else if h.is_ready() {
                h.close(CLOSE_SLOW);
                d.overflowed += 1;
            }
        }
        d
    }

    /// Queue a topic frame for every subscriber here; at-most-once, so a
    /// full outbox just misses it. Returns (queued, dropped).
    pub fn deliver_topic(&self, topic: &Topic, out: &Outgoing) -> (usize, usize) {
        let subs = self
            .topics
            .get(topic)
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut r = (0, 0);
        for h in subs {
            if h.push(out.clone()) {
                r.0 += 1;
            } else {
                r.1 += 1;
            }
        }
        r
    }

    /// Subscribe; false if `max` subscriptions are already held.
    pub fn subscribe(&self, h: &Arc<ConnHandle>, topic: &Topic, max: usize) -> bool {
        {
            let Ok(mut t) = h.topics.lock() else {
                return false;
            };
            if t.contains(topic) {
                return true;
            }
            if t.len() >= max {
                return false;
            }
            t.push(topic.clone());
        }
        self.topics
            .entry(topic.clone())
            .or_default()
            .push(h.clone());
        true
    }

    pub fn unsubscribe(&self, h: &Arc<ConnHandle>, topic: &Topic) {
        let had = h
            .topics
            .lock()
            .map(|mut t| match t.iter().position(|x| x == topic) {
                Some(i) => {
                    t.swap_remove(i);
                    true
                }
                None => false,
            })
            .unwrap_or(false);
        if had {
            self.topics.remove_if_mut(topic, |_, v| {
                v.retain(|c| c.conn != h.conn);
                v.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_and_remove() {
        let r = Registry::new();
        let u = UserId::parse("u").unwrap();
        let (a, mut ra) = ConnHandle::new(ConnId::random(), u.clone());
        let (b, _rb) = ConnHandle::new(ConnId::random(), u.clone());
        r.insert(a.clone());
        r.insert(b.clone());
        let out = Outgoing::control(Utf8Bytes::from_static("x"));
        assert_eq!(r.deliver_user(&u, &out).queued, 2);
        assert!(ra.try_recv().is_some());
        let t = Topic::parse("t").unwrap();
        assert!(r.subscribe(&a, &t, 1));
        assert!(!r.subscribe(&a, &Topic::parse("t2").unwrap(), 1));
        assert_eq!(r.deliver_topic(&t, &out), (1, 0));
        r.remove(&a.conn);
        assert_eq!(r.deliver_topic(&t, &out), (0, 0));
        assert_eq!(r.deliver_user(&u, &out).queued, 1);
        r.remove(&b.conn);
        assert!(r.user_conns(&u).is_empty());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn full_outbox_closes() {
        let r = Registry::new();
        let u = UserId::parse("u").unwrap();
        let (a, _ra) = ConnHandle::new(ConnId::random(), u.clone());
        r.insert(a.clone());
        let out = Outgoing::control(Utf8Bytes::from_static("x"));
        a.set_ready();
        for _ in 0..OUTBOX {
            assert_eq!(r.deliver_user(&u, &out).queued, 1);
        }
        assert_eq!(r.deliver_user(&u, &out).overflowed, 1);
        assert!(a.is_closing());
        assert_eq!(a.close_code(), CLOSE_SLOW);
    }

    /// A session that is taking frames gets a burst past `OUTBOX` (up to
    /// `OUTBOX_HARD`); one that stopped taking them for `PROGRESS` is slow.
    #[tokio::test(start_paused = true)]
    async fn a_reading_session_outlives_a_burst() {
        let r = Registry::new();
        let u = UserId::parse("u").unwrap();
        let (a, mut ra) = ConnHandle::new(ConnId::random(), u.clone());
        r.insert(a.clone());
        a.set_ready();
        let out = Outgoing::control(Utf8Bytes::from_static("x"));
        assert_eq!(r.deliver_user(&u, &out).queued, 1);
        let mut buf = Vec::new();
        assert!(matches!(ra.wait(&mut buf, 1).await, Wake::Frames));
        for _ in 0..OUTBOX_HARD {
            assert_eq!(r.deliver_user(&u, &out).queued, 1);
        }
        assert!(!a.is_closing());
        assert_eq!(r.deliver_user(&u, &out).overflowed, 1);
        assert!(a.is_closing());

        // Took frames once, then nothing for `PROGRESS`: slow at `OUTBOX`.
        let w = UserId::parse("w").unwrap();
        let (c, mut rc) = ConnHandle::new(ConnId::random(), w.clone());
        r.insert(c.clone());
        c.set_ready();
        assert_eq!(r.deliver_user(&w, &out).queued, 1);
        assert!(matches!(rc.wait(&mut buf, 1).await, Wake::Frames));
        tokio::time::advance(PROGRESS).await;
        for _ in 0..OUTBOX {
            assert_eq!(r.deliver_user(&w, &out).queued, 1);
        }
        assert_eq!(r.deliver_user(&w, &out).overflowed, 1);
        assert!(c.is_closing());
    }
}

//! The in-process bus of a standalone node: no Redis, one process.
//!
//! Messages go straight to local connections, or into an in-memory mailbox
//! that follows the same rules as the Redis one (capped, expiring, taken on
//! connect in one step with registering).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Bus, BusError, ClusterView, Mailbox, NodeView, Publish, Registered, Resume};
use crate::ack::AckGuard;
use crate::ids::{NodeId, UserId};
use crate::local::{ConnHandle, Outgoing, Registry};
use crate::message::{Message, Position, Target, now_ms};

pub struct MemoryBus {
    id: NodeId,
    registry: Arc<Registry>,
    mailbox_max: usize,
    mailbox_ttl: Duration,
    mailbox_max_bytes: usize,
    history_size: usize,
    history_ttl: Duration,
    idem_ttl: Duration,
    state: Mutex<State>,
}

/// How a standalone node keeps history and idempotency keys: as the Redis
/// back-end does (contract §9, §4), in memory.
pub struct HistoryConfig {
    pub size: u64,
    pub ttl: Duration,
    pub idempotency_ttl: Duration,
}

#[derive(Default)]
struct State {
    last_ms: u64,
    seq: u64,
    mailboxes: HashMap<UserId, VecDeque<(Instant, Arc<Message>)>>,
    history: HashMap<UserId, History>,
    /// (user, key) → (first id, when it was added).
    idem: HashMap<(UserId, String), (String, Instant)>,
}

/// One user's history position and newest messages.
struct History {
    epoch: Arc<str>,
    seq: u64,
    msgs: VecDeque<Arc<Message>>,
    /// Last message or connect (the counter's expiry runs from it).
    touched: Instant,
    /// Last message (the messages' expiry runs from it).
    added: Instant,
}

impl State {
    /// Ids shaped like stream ids: `<ms>-<seq>`, increasing.
    fn next_id(&mut self) -> String {
        let ms = now_ms().max(self.last_ms);
        if ms == self.last_ms {
            self.seq += 1;
        } else {
            self.last_ms = ms;
            self.seq = 0;
        }
        format!("{}-{}", self.last_ms, self.seq)
    }
}

impl MemoryBus {
    pub fn new(
        registry: Arc<Registry>,
        mailbox_max: u64,
        mailbox_ttl: Duration,
        mailbox_max_bytes: u64,
        history: HistoryConfig,
    ) -> Self {
        MemoryBus {
            id: NodeId::random(),
            registry,
            mailbox_max: mailbox_max as usize,
            mailbox_ttl,
            mailbox_max_bytes: mailbox_max_bytes as usize,
            history_size: history.size as usize,
            history_ttl: history.ttl,
            idem_ttl: history.idempotency_ttl,
            state: Mutex::new(State::default()),
        }
    }

    /// The user's history, a new epoch when there is none or it expired
    /// (the counter lives `--mailbox-ttl-s` past the last message or
    /// connect; the messages `--history-ttl-s` past the last one).
    fn history<'a>(&self, st: &'a mut State, user: &UserId) -> &'a mut History {
        let now = Instant::now();
        let h = st.history.entry(user.clone()).or_insert_with(|| History {
            epoch: Arc::from(crate::ids::new_epoch()),
            seq: 0,
            msgs: VecDeque::new(),
            touched: now,
            added: now,
        });
        if h.touched.elapsed() >= self.mailbox_ttl {
            *h = History {
                epoch: Arc::from(crate::ids::new_epoch()),
                seq: 0,
                msgs: VecDeque::new(),
                touched: now,
                added: now,
            };
        }
        if h.added.elapsed() >= self.history_ttl {
            h.msgs.clear();
        }
        h.touched = now;
        h
    }
}

impl MemoryBus {
    /// Deliver to the user's connections here, or keep in the mailbox.
    /// Called with the state lock held.
    fn deliver_or_keep(&self, st: &mut State, msg: Arc<Message>) {
        let text = msg.frame();
        match &msg.target {
            Target::Topic(t) => {
                self.registry.deliver_topic(t, &Outgoing::control(text));
            }
            Target::User(u) => {
                let out = Outgoing {
                    text,
                    msg: Some(msg.clone()),
                    guard: None,
                };
                if self.registry.deliver_user(u, &out).queued == 0 {
                    let ttl = self.mailbox_ttl;
                    let mb = st.mailboxes.entry(u.clone()).or_default();
                    mb.retain(|(at, _)| at.elapsed() < ttl);
                    mb.push_back((Instant::now(), msg.clone()));
                    // Connected but its outbox was full: it reads the
                    // mailbox once it has caught up.
                    for h in self.registry.user_conns(u) {
                        h.want_mailbox();
                    }
                    let mut bytes: usize = mb.iter().map(|(_, m)| m.payload.len()).sum();
                    while mb.len() > self.mailbox_max || bytes > self.mailbox_max_bytes {
                        let Some((_, old)) = mb.pop_front() else {
                            break;
                        };
                        bytes -= old.payload.len();
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn node_id(&self) -> NodeId {
        self.id.clone()
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn register(
        &self,
        conn: &ConnHandle,
        resume: Option<&Resume>,
    ) -> Result<Registered, BusError> {
        let mailbox = self.take_mailbox(conn, &Mailbox::default()).await?;
        let mut st = self.state.lock().map_err(|_| BusError::Unavailable)?;
        if self.history_size == 0 {
            return Ok(Registered {
                mailbox,
                recovered: resume.map(|_| false),
                ..Registered::default()
            });
        }
        let h = self.history(&mut st, &conn.user);
        let pos = Position {
            epoch: h.epoch.to_string(),
            seq: h.seq,
        };
        let mut recovered = None;
        let mut replay = Vec::new();
        if let Some(r) = resume {
            let first_kept = h.msgs.front().map_or(h.seq + 1, |m| m.seq);
            let ok = r.epoch == *h.epoch && r.since <= h.seq && r.since + 1 >= first_kept;
            recovered = Some(ok);
            if ok {
                replay = h.msgs.iter().filter(|m| m.seq > r.since).cloned().collect();
            }
        }
        Ok(Registered {
            mailbox,
            pos,
            recovered,
            replay,
        })
    }

    async fn mailbox_written(&self, _conn: &ConnHandle, _written: &Mailbox) {}

    /// In one process there is nothing to lose between a take and a write:
    /// the whole mailbox is taken at once.
    async fn take_mailbox(
        &self,
        conn: &ConnHandle,
        _written: &Mailbox,
    ) -> Result<Mailbox, BusError> {
        let user = &conn.user;
        let mut st = self.state.lock().map_err(|_| BusError::Unavailable)?;
        let ttl = self.mailbox_ttl;
        Ok(Mailbox {
            msgs: st
                .mailboxes
                .remove(user)
                .unwrap_or_default()
                .into_iter()
                .filter(|(at, _)| at.elapsed() < ttl)
                .map(|(_, m)| m)
                .collect(),
            ..Mailbox::default()
        })
    }

    async fn unregister(&self, _conn: &ConnHandle) {}

    fn hand_back(&self, msg: Arc<Message>, _guard: Option<Arc<AckGuard>>) {
        if let Ok(mut st) = self.state.lock() {
            self.deliver_or_keep(&mut st, msg);
        }
    }

    async fn publish(&self, p: Publish) -> Result<String, BusError> {
        // One lock around "is the user here?" and "mailbox it", matching
        // `register`, so a message never lands in the mailbox of a user who
        // has just connected.
        let mut st = self.state.lock().map_err(|_| BusError::Unavailable)?;
        if let (Target::User(u), Some(k)) = (&p.target, &p.idem) {
            let ttl = self.idem_ttl;
            st.idem.retain(|_, (_, at)| at.elapsed() < ttl);
            if let Some((first, _)) = st.idem.get(&(u.clone(), k.clone())) {
                return Ok(first.clone());
            }
        }
        let id = st.next_id();
        if let (Target::User(u), Some(k)) = (&p.target, &p.idem) {
            st.idem
                .insert((u.clone(), k.clone()), (id.clone(), Instant::now()));
        }
        let mut msg = Message::new(id.clone(), p.target, p.from, p.payload, now_ms());
        if let (Target::User(u), true) = (&msg.target, self.history_size > 0) {
            let u = u.clone();
            let size = self.history_size;
            let h = self.history(&mut st, &u);
            h.seq += 1;
            h.added = Instant::now();
            msg.seq = h.seq;
            msg.epoch = h.epoch.clone();
            let msg = Arc::new(msg);
            h.msgs.push_back(msg.clone());
            while h.msgs.len() > size {
                h.msgs.pop_front();
            }
            self.deliver_or_keep(&mut st, msg);
            return Ok(id);
        }
        self.deliver_or_keep(&mut st, Arc::new(msg));
        Ok(id)
    }

    async fn user_connections(&self, user: &UserId) -> Result<usize, BusError> {
        Ok(self.registry.user_conns(user).len())
    }

    /// One node: its distinct users; no events stream without Redis.
    async fn activity(&self) -> Result<super::Activity, BusError> {
        let users: std::collections::HashSet<UserId> = self
            .registry
            .all()
            .into_iter()
            .map(|h| h.user.clone())
            .collect();
        Ok(super::Activity {
            online_users: users.len() as u64,
            events: Vec::new(),
        })
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<usize>, BusError> {
        Ok(users
            .iter()
            .map(|u| self.registry.user_conns(u).len())
            .collect())
    }

    async fn disconnect(&self, user: &UserId, code: u16, reason: &str) -> Result<usize, BusError> {
        let conns = self.registry.user_conns(user);
        for h in &conns {
            h.close_with(code, reason);
        }
        Ok(conns.len())
    }

    async fn cluster_view(&self) -> Result<ClusterView, BusError> {
        Ok(ClusterView {
            node: self.id.to_string(),
            router: true,
            shards: vec![0],
            nodes: vec![NodeView {
                id: self.id.to_string(),
                lease_expires_ms: None,
                connections: self.registry.len() as u64,
                version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            }],
        })
    }
}

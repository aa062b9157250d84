//! The in-process bus of a standalone node: no Redis, one process.
//!
//! Messages go straight to local connections, or into an in-memory mailbox
//! that follows the same rules as the Redis one (capped, expiring, taken on
//! connect in one step with registering).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Bus, BusError, ClusterView, Mailbox, NodeView, Publish};
use crate::ack::AckGuard;
use crate::ids::{NodeId, UserId};
use crate::local::{ConnHandle, Outgoing, Registry};
use crate::message::{Message, Target, now_ms};

pub struct MemoryBus {
    id: NodeId,
    registry: Arc<Registry>,
    mailbox_max: usize,
    mailbox_ttl: Duration,
    mailbox_max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_ms: u64,
    seq: u64,
    mailboxes: HashMap<UserId, VecDeque<(Instant, Arc<Message>)>>,
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
    ) -> Self {
        MemoryBus {
            id: NodeId::random(),
            registry,
            mailbox_max: mailbox_max as usize,
            mailbox_ttl,
            mailbox_max_bytes: mailbox_max_bytes as usize,
            state: Mutex::new(State::default()),
        }
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

    async fn register(&self, conn: &ConnHandle) -> Result<Mailbox, BusError> {
        self.take_mailbox(conn, &Mailbox::default()).await
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
        let id = st.next_id();
        let msg = Arc::new(Message {
            id: id.clone(),
            target: p.target,
            from: p.from,
            payload: p.payload,
            hops: 0,
            sent_ms: now_ms(),
        });
        self.deliver_or_keep(&mut st, msg);
        Ok(id)
    }

    async fn user_connections(&self, user: &UserId) -> Result<usize, BusError> {
        Ok(self.registry.user_conns(user).len())
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
            }],
        })
    }
}

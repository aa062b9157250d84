//! Batched acknowledgement: `XACK` and a trim (send streams), `XDEL`
//! (inboxes), and deleting written mailbox entries, for entries whose
//! hand-offs are all done.

use std::sync::Arc;

use crate::shutdown::Phase;
use tokio::sync::{mpsc, oneshot};

use crate::ack::AckGuard;
use crate::bus::Mailbox;
use crate::cluster::Ctx;
use crate::cluster::sessions::take_cmd;
use crate::ids::UserId;
use crate::keys::ROUTER_GROUP;
use crate::redis::conn::Batch;
use crate::redis::lua;

/// What to acknowledge.
#[derive(Debug)]
pub enum AckJob {
    /// Entries of a send stream: delete, and acknowledge in the router group.
    Send { key: String, ids: Vec<String> },
    /// Entries of an inbox: delete.
    Inbox { key: String, ids: Vec<String> },
    /// Written entries of a user's mailbox: delete (keeping its byte count).
    Mailbox { user: UserId, ids: Vec<String> },
    /// Answered once every job queued before it has run: a router that
    /// hands its shard over waits for its acknowledgements first, or its
    /// successor would claim and route them again.
    Barrier(oneshot::Sender<()>),
}

/// Queues acknowledgements for the acker ([`run`]).
#[derive(Clone)]
pub struct Acker(mpsc::UnboundedSender<AckJob>);

impl Acker {
    pub fn channel() -> (Acker, mpsc::UnboundedReceiver<AckJob>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Acker(tx), rx)
    }

    pub fn send(&self, job: AckJob) {
        let _ = self.0.send(job);
    }

    /// A guard that queues `job` when its last clone drops (every hand-off
    /// it covers is done).
    pub fn guard(&self, job: AckJob) -> Arc<AckGuard> {
        let tx = self.0.clone();
        Arc::new(AckGuard::new(move || {
            let _ = tx.send(job);
        }))
    }

    /// Wait until every acknowledgement queued so far has been sent to
    /// Redis (at most `timeout`).
    pub async fn flush(&self, timeout: std::time::Duration) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(AckJob::Barrier(tx)).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

/// Jobs coalesced per round.
const MAX_JOBS: usize = 256;
/// How long a round waits for more jobs once it has one. At everyday rates
/// an inbox read or a send batch holds a message or two: without this
/// every message costs an `XDEL` (and a round trip) of its own. Nothing
/// waits on an acknowledgement (the message is delivered), so the linger
/// costs no latency: 50 ms makes it one `XDEL`/`XACK` per stream for ~50
/// messages at 1,000 msg/s (5 ms gathered ~5; issue 16). Entries
/// acknowledged this much later are only delivered again after a crash
/// (same id and seq); a barrier, a mailbox page or a stop does not wait.
const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<AckJob>) {
    let mut jobs = Vec::new();
    loop {
        let n = tokio::select! {
            biased;
            n = rx.recv_many(&mut jobs, MAX_JOBS) => n,
            _ = ctx.life.reached(Phase::Stopped) => {
                // Drain what is queued so a clean leave deletes what it
                // delivered, then stop.
                rx.close();
                rx.recv_many(&mut jobs, usize::MAX).await
            }
        };
        if n == 0 {
            return;
        }
        linger(&ctx, &mut rx, &mut jobs).await;
        let mut batch = Batch::new();
        let mut barriers = Vec::new();
        // One `XDEL` (and `XACK`) per stream per round, whatever the jobs.
        let mut send: Vec<(String, Vec<String>)> = Vec::new();
        let mut inbox: Vec<(String, Vec<String>)> = Vec::new();
        for j in jobs.drain(..) {
            match j {
                AckJob::Send { key, ids } if !ids.is_empty() => merge(&mut send, key, ids),
                AckJob::Inbox { key, ids } if !ids.is_empty() => merge(&mut inbox, key, ids),
                AckJob::Mailbox { user, ids } if !ids.is_empty() => {
                    let written = Mailbox {
                        ids,
                        ..Mailbox::default()
                    };
                    take_cmd(&ctx, &mut batch, &user, &written, 0);
                }
                AckJob::Barrier(tx) => barriers.push(tx),
                _ => {}
            }
        }
        for (key, ids) in &send {
            batch.cmd_ignored("XACK", key).arg(ROUTER_GROUP).arg(ids);
            batch
                .eval(lua::TRIM_ROUTED, &[key], false)
                .arg(ROUTER_GROUP);
        }
        for (key, ids) in &inbox {
            batch.cmd_ignored("XDEL", key).arg(ids);
        }
        let mut redis = ctx.redis.clone();
        if let Err(e) = batch.run(&mut redis).await {
            ctx.redis_error();
            // Not retried: the entries stay and are routed again later
            // (duplicates with the same id, never loss).
            tracing::warn!(error = %e, "ack failed");
        }
        for tx in barriers {
            let _ = tx.send(());
        }
        if ctx.life.at_least(Phase::Stopped) && rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

/// Gather more jobs for up to [`LINGER`], unless one must not wait.
async fn linger(ctx: &Ctx, rx: &mut mpsc::UnboundedReceiver<AckJob>, jobs: &mut Vec<AckJob>) {
    let urgent = |jobs: &[AckJob]| {
        jobs.len() >= MAX_JOBS
            || jobs
                .iter()
                .any(|j| matches!(j, AckJob::Barrier(_) | AckJob::Mailbox { .. }))
    };
    if urgent(jobs) || rx.is_closed() {
        return;
    }
    let deadline = tokio::time::sleep(LINGER);
    tokio::pin!(deadline);
    loop {
        let room = MAX_JOBS - jobs.len();
        tokio::select! {
            biased;
            n = rx.recv_many(jobs, room) => {
                if n == 0 || urgent(jobs) {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = ctx.life.reached(Phase::Stopped) => return,
        }
    }
}

/// Add `ids` to the entry of `key` (few keys per round: a vector is enough).
fn merge(to: &mut Vec<(String, Vec<String>)>, key: String, mut ids: Vec<String>) {
    match to.iter_mut().find(|(k, _)| *k == key) {
        Some((_, v)) => v.append(&mut ids),
        None => to.push((key, ids)),
    }
}

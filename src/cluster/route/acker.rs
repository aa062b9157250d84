//! Batched acknowledgement, for entries whose hand-offs are all done:
//! `XACK` and a trim of what is routed (send streams), a trim of the done
//! prefix or `XDEL` of what is done out of order (inboxes), and deleting
//! written mailbox entries.

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
    /// Read batch number `batch` (0, 1, … per inbox) of an inbox, its ids
    /// in order: delete.
    Inbox {
        key: String,
        ids: Vec<String>,
        batch: u64,
    },
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
/// every message costs a delete (and a round trip) of its own. Nothing
/// waits on an acknowledgement (the message is delivered), so the linger
/// costs no latency: 50 ms makes it one acknowledgement per stream for ~50
/// messages at 1,000 msg/s (5 ms gathered ~5; issue 16). Entries
/// acknowledged this much later are only delivered again after a crash
/// (same id and seq); a barrier, a mailbox page or a stop does not wait.
const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<AckJob>) {
    let mut jobs = Vec::new();
    let mut trims = InboxTrims::default();
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
        // One acknowledgement per stream per round, whatever the jobs.
        let mut send: Vec<(String, Vec<String>)> = Vec::new();
        // Per inbox: ids to delete one by one, and the id to trim up to.
        let mut inbox: Vec<(String, Vec<String>, Option<String>)> = Vec::new();
        for j in jobs.drain(..) {
            match j {
                AckJob::Send { key, ids } if !ids.is_empty() => merge(&mut send, key, ids),
                AckJob::Inbox { key, ids, batch } if !ids.is_empty() => {
                    let done = trims.done(&key, batch, ids);
                    let at = match inbox.iter().position(|(k, _, _)| *k == key) {
                        Some(i) => i,
                        None => {
                            inbox.push((key, Vec::new(), None));
                            inbox.len() - 1
                        }
                    };
                    match done {
                        Done::Delete(mut ids) => inbox[at].1.append(&mut ids),
                        Done::TrimTo(id) => inbox[at].2 = Some(id),
                    }
                }
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
        for (key, ids, trim_to) in &inbox {
            if !ids.is_empty() {
                batch.cmd_ignored("XDEL", key).arg(ids);
            }
            if let Some(min) = trim_to.as_deref().and_then(after) {
                batch.cmd_ignored("XTRIM", key).arg("MINID").arg(min);
            }
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

/// What to do about an inbox batch that is done.
#[derive(Debug, PartialEq)]
enum Done {
    /// Delete these ids (done ahead of an earlier batch).
    Delete(Vec<String>),
    /// Every entry up to this id is done: trim up to it.
    TrimTo(String),
}

/// Batches ahead of the done prefix remembered per inbox; past this the
/// inbox falls back to deleting by id (an earlier batch that never
/// completes would otherwise grow this for good).
const MAX_AHEAD: usize = 4096;

/// Which read batches of this node's inbox are done (issue 16). The done
/// prefix is trimmed (`XTRIM MINID`: one step, whatever its length; an
/// `XDEL` per id seeks each and walks its stream node); a batch done ahead
/// of an earlier one is deleted by id at once, so a slow connection holding
/// one batch keeps no other in Redis. Everything up to the prefix's last id
/// was read (inboxes are read in order) and is done, so the trim takes
/// nothing else; a trim that fails is made up by the next.
#[derive(Default)]
struct InboxTrims(Vec<(String, Trim)>);

/// Inboxes remembered (a node reads one; a new node id starts another).
const INBOXES: usize = 4;

#[derive(Default)]
struct Trim {
    /// The first batch not done.
    next: u64,
    /// Batches done ahead of `next`: their last id.
    ahead: std::collections::BTreeMap<u64, String>,
    /// Trimming given up (see [`MAX_AHEAD`]).
    off: bool,
}

impl InboxTrims {
    fn done(&mut self, key: &str, batch: u64, mut ids: Vec<String>) -> Done {
        let i = match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                if self.0.len() >= INBOXES {
                    self.0.remove(0);
                }
                self.0.push((key.to_owned(), Trim::default()));
                self.0.len() - 1
            }
        };
        let t = &mut self.0[i].1;
        if t.off || batch < t.next {
            return Done::Delete(ids);
        }
        if batch > t.next {
            if t.ahead.len() >= MAX_AHEAD {
                t.off = true;
                t.ahead.clear();
            } else if let Some(last) = ids.last() {
                t.ahead.insert(batch, last.clone());
            }
            return Done::Delete(ids);
        }
        let mut last = ids.pop().unwrap_or_default();
        t.next += 1;
        while let Some(l) = t.ahead.remove(&t.next) {
            last = l;
            t.next += 1;
        }
        Done::TrimTo(last)
    }
}

/// The stream id right after `id` (`XTRIM MINID` keeps its argument).
fn after(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    Some(match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: std::ops::RangeInclusive<u32>) -> Vec<String> {
        r.map(|i| format!("7-{i}")).collect()
    }

    #[test]
    fn the_done_prefix_is_trimmed_and_the_rest_deleted() {
        let mut t = InboxTrims::default();
        assert_eq!(t.done("a", 0, ids(1..=3)), Done::TrimTo("7-3".into()));
        // Batch 2 done before 1: deleted by id; then 1 trims past both.
        assert_eq!(t.done("a", 2, ids(6..=8)), Done::Delete(ids(6..=8)));
        assert_eq!(t.done("a", 1, ids(4..=5)), Done::TrimTo("7-8".into()));
        assert_eq!(t.done("a", 3, ids(9..=9)), Done::TrimTo("7-9".into()));
        // A new inbox (new node id), its batch 1 done before 0; the old
        // one's late batches go on as before.
        assert_eq!(t.done("b", 1, ids(2..=2)), Done::Delete(ids(2..=2)));
        assert_eq!(t.done("a", 4, ids(10..=10)), Done::TrimTo("7-10".into()));
        assert_eq!(t.done("b", 0, ids(1..=1)), Done::TrimTo("7-2".into()));
        // A batch done twice (cannot happen; harmless): deleted by id.
        assert_eq!(t.done("b", 0, ids(1..=1)), Done::Delete(ids(1..=1)));
    }

    #[test]
    fn a_batch_that_never_completes_turns_trimming_off() {
        let mut t = InboxTrims::default();
        assert_eq!(t.done("a", 0, ids(1..=1)), Done::TrimTo("7-1".into()));
        // Batch 1 never completes.
        for b in 2..(2 + MAX_AHEAD as u64 + 1) {
            assert!(matches!(t.done("a", b, ids(2..=2)), Done::Delete(_)));
        }
        assert!(t.0[0].1.ahead.is_empty());
        assert_eq!(t.done("a", 1, ids(3..=3)), Done::Delete(ids(3..=3)));
    }

    #[test]
    fn after_is_the_next_stream_id() {
        assert_eq!(after("5-9").as_deref(), Some("5-10"));
        assert_eq!(after("5-18446744073709551615").as_deref(), Some("6-0"));
        assert_eq!(after("x"), None);
    }
}

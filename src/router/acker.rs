//! Batched acknowledgement: `XACK` (send streams) and `XDEL` (send streams
//! and inboxes) for entries whose hand-offs are all done.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::conn::Batch;
use crate::bus::redis::Ctx;
use crate::keys::ROUTER_GROUP;

/// Entries of one stream to acknowledge and delete.
#[derive(Debug)]
pub struct AckJob {
    pub key: String,
    /// Acknowledge in the router group first (send streams).
    pub group: bool,
    pub ids: Vec<String>,
}

/// Jobs coalesced per round.
const MAX_JOBS: usize = 256;

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<AckJob>, stop: CancellationToken) {
    let mut jobs = Vec::new();
    loop {
        let n = tokio::select! {
            biased;
            n = rx.recv_many(&mut jobs, MAX_JOBS) => n,
            _ = stop.cancelled() => {
                // Drain what is queued so a clean leave deletes what it
                // delivered, then stop.
                rx.close();
                rx.recv_many(&mut jobs, usize::MAX).await
            }
        };
        if n == 0 {
            return;
        }
        let mut batch = Batch::new();
        for j in jobs.drain(..) {
            if j.ids.is_empty() {
                continue;
            }
            // XDEL first: if only it runs (a failure between the two), the
            // entries are deleted but still pending, and the router's
            // `XAUTOCLAIM` reports them as deleted and acknowledges them. The
            // other way round, acknowledged entries would stay for good.
            batch.cmd_ignored("XDEL", &j.key).arg(&j.ids);
            if j.group {
                batch
                    .cmd_ignored("XACK", &j.key)
                    .arg(ROUTER_GROUP)
                    .arg(&j.ids);
            }
        }
        let mut conn = ctx.conn.clone();
        if let Err(e) = batch.run(&mut conn).await {
            ctx.redis_error();
            // Not retried: the entries stay and are routed again later
            // (duplicates with the same id, never loss).
            tracing::warn!(error = %e, "ack failed");
        }
        if stop.is_cancelled() && rx.is_closed() && rx.is_empty() {
            return;
        }
    }
}

//! Batched `XADD`s to the send streams, for client `send` frames and
//! `POST /api/send`: requests from every connection share pipelines, so a
//! busy node does not pay a round trip per message.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use redis::Value;

use crate::bus::conn::Batch;
use crate::bus::redis::Ctx;

pub struct PublishReq {
    pub key: String,
    pub fields: Vec<(&'static str, String)>,
    /// The entry id once the `XADD` is done (durable as Redis is).
    pub reply: oneshot::Sender<Result<String, redis::RedisError>>,
}

const MAX_BATCH: usize = 256;

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::Receiver<PublishReq>, stop: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            _ = stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        let mut adds = Batch::new();
        for r in &batch {
            adds.cmd("XADD", &r.key).arg("*").arg(&r.fields);
        }
        let mut conn = ctx.conn.clone();
        let ids = adds
            .run(&mut conn)
            .await
            .and_then(|v| Ok(redis::from_redis_value::<Vec<String>>(Value::Array(v))?));
        match ids {
            Ok(ids) => {
                for (r, id) in batch.drain(..).zip(ids) {
                    let _ = r.reply.send(Ok(id));
                }
            }
            Err(e) => {
                ctx.redis_error();
                tracing::warn!(error = %e, messages = batch.len(), "publish failed");
                for r in batch.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

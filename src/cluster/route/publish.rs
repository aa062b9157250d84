//! Batched `XADD`s to the send streams, for client `send` frames and
//! `POST /api/send`: requests from every connection share pipelines, so a
//! busy node does not pay a round trip per message.
//!
//! An `XADD` must never run twice: its stream id becomes the message id, so
//! a second copy could not be told from a new message. Each send stream's
//! adds are one pipeline, sent once ([`Batch::once`]): only a pipeline that
//! Redis Cluster wholly redirected (it did not run) is sent again, and a
//! lost reply is reported to the sender as an error.

use std::collections::HashMap;
use std::sync::Arc;

use crate::shutdown::Phase;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use crate::bus::BusError;
use crate::cluster::Ctx;
use crate::redis::conn::Batch;

pub struct PublishReq {
    pub key: String,
    pub fields: Vec<(&'static str, String)>,
    /// The entry id once the `XADD` is done (durable as Redis is).
    pub reply: oneshot::Sender<Result<String, redis::RedisError>>,
}

const MAX_BATCH: usize = 256;

/// Queues adds for the publisher ([`run`]).
#[derive(Clone)]
pub struct Publisher(mpsc::Sender<PublishReq>);

impl Publisher {
    pub fn channel() -> (Publisher, mpsc::Receiver<PublishReq>) {
        let (tx, rx) = mpsc::channel(4096);
        (Publisher(tx), rx)
    }

    /// Add an entry with `fields` to stream `key`; its entry id once the
    /// `XADD` is done. `BusError::Unavailable` if the publisher stopped.
    pub async fn add(
        &self,
        key: String,
        fields: Vec<(&'static str, String)>,
    ) -> Result<String, BusError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send(PublishReq { key, fields, reply })
            .await
            .map_err(|_| BusError::Unavailable)?;
        Ok(rx.await.map_err(|_| BusError::Unavailable)??)
    }
}

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::Receiver<PublishReq>) {
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            _ = ctx.life.reached(Phase::Stopped) => return,
        };
        if n == 0 {
            return;
        }
        let mut per_stream: HashMap<String, Vec<PublishReq>> = HashMap::new();
        for r in batch.drain(..) {
            per_stream.entry(r.key.clone()).or_default().push(r);
        }
        let adds = per_stream
            .into_iter()
            .map(|(key, reqs)| add_all(&ctx, key, reqs));
        futures::future::join_all(adds).await;
    }
}

/// Add `reqs` to stream `key` in one pipeline and answer each request.
async fn add_all(ctx: &Ctx, key: String, reqs: Vec<PublishReq>) {
    let mut adds = Batch::new().once();
    for r in &reqs {
        adds.cmd("XADD", &key).arg("*").arg(&r.fields);
    }
    let mut redis = ctx.redis.clone();
    let result = adds
        .run(&mut redis)
        .await
        .and_then(|v| Ok(redis::from_redis_value::<Vec<String>>(Value::Array(v))?));
    match result {
        Ok(ids) => {
            for (r, id) in reqs.into_iter().zip(ids) {
                let _ = r.reply.send(Ok(id));
            }
        }
        Err(e) => {
            ctx.redis_error();
            tracing::warn!(error = %e, stream = %key, messages = reqs.len(), "publish failed");
            for r in reqs {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
    }
}

//! The producer: pipelined `XADD <p>:send[:n]` on several Redis
//! connections, as fast as possible or paced to a fixed rate. The pipelines
//! are [`Batch`]es, so they also run on Redis Cluster (where the send
//! shards' keys may live on different primaries).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wscluster::{Batch, Connector};

use crate::ws::{now_us, payload};

/// Whom the messages go to.
#[derive(Clone)]
pub enum Dest {
    /// Each message to a random one of these users.
    Users(Arc<Vec<String>>),
    /// Every message to this topic.
    Topic(String),
}

#[derive(Clone)]
pub struct Plan {
    /// The send stream of each user (or topic), by name.
    pub keys: Arc<std::collections::HashMap<String, String>>,
    pub messages: u64,
    /// Messages per second over all connections; None: as fast as possible.
    pub rate: Option<f64>,
    pub connections: usize,
    /// Largest pipeline.
    pub batch: usize,
    pub payload_bytes: usize,
    pub dest: Dest,
}

#[derive(Debug, Clone, Copy)]
pub struct Produced {
    pub sent: u64,
    pub start_us: u64,
    pub end_us: u64,
}

/// Add `plan.messages` entries; `sent` counts them as they are acknowledged.
/// Message `seq`s are 0..messages.
pub async fn run(redis: Connector, plan: Plan, sent: Arc<AtomicU64>) -> Result<Produced> {
    let conns = plan.connections.max(1);
    let mut handles = Vec::new();
    let next = Arc::new(AtomicU64::new(0));
    let start_us = now_us();
    let started = Instant::now();
    for p in 0..conns {
        // Its own connection (or cluster connection) per producer.
        let mut conn = redis.shared().await?;
        let plan = plan.clone();
        let next = next.clone();
        let sent = sent.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x5eed ^ p as u64);
            let share =
                plan.messages / conns as u64 + u64::from((p as u64) < plan.messages % conns as u64);
            let mut done = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let n = match plan.rate {
                    None => (share - done).min(plan.batch as u64),
                    Some(r) => {
                        tick.tick().await;
                        let due = ((started.elapsed().as_secs_f64() * r / conns as f64) as u64)
                            .min(share);
                        due.saturating_sub(done).min(plan.batch.max(1000) as u64)
                    }
                };
                if done >= share {
                    break;
                }
                if n == 0 {
                    continue;
                }
                let first = next.fetch_add(n, Ordering::Relaxed);
                let mut batch = Batch::new();
                for seq in first..first + n {
                    match &plan.dest {
                        Dest::Users(users) => {
                            let to = &users[rng.random_range(0..users.len())];
                            batch
                                .cmd_ignored("XADD", &plan.keys[to])
                                .arg("*")
                                .arg("to")
                                .arg(to)
                                .arg("payload")
                                .arg(payload(now_us(), seq, to, plan.payload_bytes));
                        }
                        Dest::Topic(t) => {
                            batch
                                .cmd_ignored("XADD", &plan.keys[t])
                                .arg("*")
                                .arg("topic")
                                .arg(t)
                                .arg("payload")
                                .arg(payload(now_us(), seq, "", plan.payload_bytes));
                        }
                    }
                }
                batch.run(&mut conn).await?;
                done += n;
                sent.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(Produced {
        sent: sent.load(Ordering::Relaxed),
        start_us,
        end_us: now_us(),
    })
}

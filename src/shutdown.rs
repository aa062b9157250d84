//! Shutdown: the node's [`Lifecycle`] (one owner, the node, moves it
//! forward; every loop watches it), the signals that start a leave, and
//! the drain schedule.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use rand::Rng;
use rand::seq::SliceRandom;

/// Where a node is in its life. It only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// Leaving (contract §6): not ready, no new upgrades; routers, the
    /// reaper and the heartbeat stop; sockets are drained.
    Leaving,
    /// Sockets are closed: the node reaps itself, its readers stop.
    SelfReaping,
    /// Everything stops (the acker and publisher drain first).
    Stopped,
}

/// The node's phase, shared by everything that must stop in time. Cheap to
/// clone.
#[derive(Clone)]
pub struct Lifecycle {
    tx: Arc<watch::Sender<Phase>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Lifecycle {
            tx: Arc::new(watch::Sender::new(Phase::Running)),
        }
    }

    /// Move forward to `p` (never back).
    pub fn advance(&self, p: Phase) {
        self.tx.send_if_modified(|cur| {
            let later = p > *cur;
            if later {
                *cur = p;
            }
            later
        });
    }

    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// True once the node is at `p` or later.
    pub fn at_least(&self, p: Phase) -> bool {
        self.phase() >= p
    }

    /// Resolves once the node is at `p` or later.
    pub async fn reached(&self, p: Phase) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|cur| *cur >= p).await;
    }

    /// Sleep for `d` unless the node reaches `p` first: true if the sleep
    /// ran out (go on), false if it is time to stop.
    pub async fn sleep(&self, d: Duration, p: Phase) -> bool {
        tokio::select! {
            _ = self.reached(p) => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Wait for SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Split `items` into batches, each with the delay (from the start of the
/// drain) at which it is closed: spread over 90 % of `window`, jittered, so
/// the survivors do not take a reconnect storm.
pub fn drain_schedule<T>(mut items: Vec<T>, window: Duration) -> Vec<(Duration, Vec<T>)> {
    if items.is_empty() {
        return Vec::new();
    }
    let mut rng = rand::rng();
    items.shuffle(&mut rng);
    let spread = window.mul_f64(0.9);
    // About one batch per 50 ms of window, at most one per item.
    let batches = ((spread.as_millis() / 50) as usize).clamp(1, items.len());
    let step = spread / batches as u32;
    let per = items.len().div_ceil(batches);
    let mut out = Vec::with_capacity(batches);
    let mut it = items.into_iter();
    for i in 0..batches {
        let chunk: Vec<T> = it.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        let jitter = if step.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..step)
        };
        out.push((step * i as u32 + jitter, chunk));
    }
    out
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn phases_only_move_forward() {
        use super::{Lifecycle, Phase};
        let l = Lifecycle::new();
        assert!(
            l.sleep(std::time::Duration::from_millis(1), Phase::Leaving)
                .await
        );
        l.advance(Phase::SelfReaping);
        l.advance(Phase::Leaving);
        assert_eq!(l.phase(), Phase::SelfReaping);
        assert!(
            !l.sleep(std::time::Duration::from_secs(60), Phase::Leaving)
                .await
        );
        l.reached(Phase::SelfReaping).await;
        assert!(!l.at_least(Phase::Stopped));
    }

    use super::*;

    #[test]
    fn schedule_spreads_over_window() {
        let s = drain_schedule((0..1000).collect(), Duration::from_secs(5));
        assert_eq!(s.iter().map(|(_, b)| b.len()).sum::<usize>(), 1000);
        assert!(s.len() > 50);
        assert!(s.last().unwrap().0 <= Duration::from_millis(4500));
        assert!(
            s.windows(2)
                .all(|w| w[0].0 <= w[1].0 + Duration::from_millis(50))
        );
        assert!(drain_schedule(Vec::<u8>::new(), Duration::from_secs(1)).is_empty());
        assert_eq!(drain_schedule(vec![1], Duration::ZERO).len(), 1);
    }
}

//! Shutdown: the signals that start a leave, and the drain schedule.

use std::time::Duration;

use rand::Rng;
use rand::seq::SliceRandom;

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

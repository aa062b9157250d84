//! Deferred acknowledgement.
//!
//! A stream entry may only be deleted once every hand-off it led to is done:
//! Redis writes confirmed *and* frames written to local sockets. An
//! [`AckGuard`] is shared (`Arc`) by everything still in flight for a batch;
//! when the last clone drops, its action runs (usually: queue `XACK`/`XDEL`).

use std::sync::Mutex;

type Action = Box<dyn FnOnce() + Send>;

pub struct AckGuard(Mutex<Option<Action>>);

impl AckGuard {
    pub fn new(action: impl FnOnce() + Send + 'static) -> Self {
        AckGuard(Mutex::new(Some(Box::new(action))))
    }

    /// A guard that does nothing.
    pub fn noop() -> Self {
        AckGuard(Mutex::new(None))
    }

    /// Make sure the action never runs (the work failed: leave the entries
    /// for a retry). Clones still held elsewhere then drop silently.
    pub fn disarm(&self) {
        match self.0.lock() {
            Ok(mut a) => drop(a.take()),
            Err(p) => drop(p.into_inner().take()),
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        let action = match self.0.get_mut() {
            Ok(a) => a.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(f) = action {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fires_once_when_last_clone_drops() {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let g = Arc::new(AckGuard::new(move || {
            n2.fetch_add(1, Ordering::SeqCst);
        }));
        let g2 = g.clone();
        drop(g);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        drop(g2);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}

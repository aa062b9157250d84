//! Polling with a deadline.

use std::time::{Duration, Instant};

/// Call `f` every `every` until it returns `Ok`; after `timeout`, the last
/// reason it gave.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match f() {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        std::thread::sleep(every);
    }
}

/// Poll `f` (every 50 ms) until it returns `Ok`, or panic after `timeout`
/// with the last reason it gave.
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    poll_until(timeout, Duration::from_millis(50), f).unwrap_or_else(|why| {
        panic!("timed out after {timeout:?} waiting for: {what}; last: {why}")
    })
}

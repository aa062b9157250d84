//! Apps' side: messages added to the send stream directly.

use serde_json::json;

/// `XADD <p>:send * to <user> payload <json>`.
pub fn xadd_to(r: &mut impl redis::ConnectionLike, user: &str, payload: &str) -> String {
    try_xadd_to(r, user, payload).expect("xadd")
}

/// [`xadd_to`] that returns the error.
pub fn try_xadd_to(
    r: &mut impl redis::ConnectionLike,
    user: &str,
    payload: &str,
) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg("wsc:send")
        .arg("*")
        .arg("to")
        .arg(user)
        .arg("payload")
        .arg(payload)
        .query(r)
}

/// `n` messages for `user` in `<p>:send`, payloads of about `pad` bytes
/// (`{"n": i, "pad": "ppp…"}`), pipelined 500 at a time; their ids.
pub fn send_many(
    r: &mut impl redis::ConnectionLike,
    user: &str,
    n: usize,
    pad: usize,
) -> Vec<String> {
    let pad = "p".repeat(pad);
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(500) {
        let mut pipe = redis::pipe();
        for i in start..n.min(start + 500) {
            pipe.cmd("XADD")
                .arg("wsc:send")
                .arg("*")
                .arg("to")
                .arg(user)
                .arg("payload")
                .arg(json!({"n": i, "pad": pad}).to_string());
        }
        let v: Vec<String> = pipe.query(r).expect("xadd");
        ids.extend(v);
    }
    ids
}

//! Raw WebSocket clients for socket-level faults: a small receive buffer
//! (a client that stops reading) and a TCP reset that drops what the
//! kernel holds unread.

use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{WebSocketStream, client_async};

use super::NodeProc;

pub type RawWs = WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket whose TCP receive buffer is `rcvbuf` bytes: once it stops
/// reading, the server's writes to it stall after a few hundred KB.
pub async fn raw_ws(node: &NodeProc, query: &str, rcvbuf: u32) -> RawWs {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    let stream = sock.connect(node.addr.parse().unwrap()).await.unwrap();
    let (ws, _) = client_async(node.ws_url(query), stream).await.unwrap();
    ws
}

/// Next text frame as JSON (None on close, error or timeout).
pub async fn next_json(ws: &mut RawWs, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(WsMessage::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Close with a TCP reset (SO_LINGER 0): whatever the kernel holds unread
/// is dropped.
pub fn reset(ws: RawWs) {
    let s = ws.into_inner();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a valid linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

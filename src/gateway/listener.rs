//! The node's TCP listener, guarded against connections that never finish
//! their handshake (slowloris): a connection must get its first response
//! (the `101` of an upgrade, or any HTTP answer) within
//! [`HANDSHAKE_DEADLINE`] or it is closed, and at most `max_pending` such
//! connections wait at once; over that, new ones are closed at accept.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Longest a connection may take to get its first response.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

pub struct GuardedListener {
    inner: TcpListener,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, max_pending: usize) -> Self {
        GuardedListener {
            inner,
            pending: Arc::new(AtomicUsize::new(0)),
            max_pending,
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.pending.fetch_add(1, Ordering::SeqCst) >= self.max_pending {
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                        tracing::debug!(%addr, "too many pending handshakes: connection closed");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    return (Guarded::new(stream, self.pending.clone()), addr);
                }
                // Out of file descriptors and the like: wait, as axum's own
                // listener does, instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that is closed (reads fail) if nothing was written to it
/// within [`HANDSHAKE_DEADLINE`]; the first write disarms it.
pub struct Guarded {
    stream: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
    pending: Option<Arc<AtomicUsize>>,
}

impl Guarded {
    fn new(stream: TcpStream, pending: Arc<AtomicUsize>) -> Self {
        Guarded {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(HANDSHAKE_DEADLINE))),
            pending: Some(pending),
        }
    }

    fn disarm(&mut self) {
        self.deadline = None;
        if let Some(p) = self.pending.take() {
            p.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.disarm();
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake not completed in time",
            )));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.disarm();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.disarm();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

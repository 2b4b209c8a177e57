//! The dashboard's connections, bounded: at most [`MAX_CONNECTIONS`] at once (the rest wait in
//! the kernel's queue), and one that moves no byte either way for [`IDLE`] is dropped. Anyone
//! who can reach the port can open connections before logging in, so without these a client
//! that opens many and says nothing could take every file descriptor the daemon has.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections served at once: far more than the tabs of the people who look.
pub(super) const MAX_CONNECTIONS: usize = 128;

/// How long a connection may move nothing. A live stream sends a keep-alive every 15 s.
pub(super) const IDLE: Duration = Duration::from_secs(60);

/// A listener that hands out at most [`MAX_CONNECTIONS`] connections at once.
pub(super) struct Bounded {
    listener: TcpListener,
    open: Arc<Semaphore>,
}

impl Bounded {
    pub(super) fn new(listener: TcpListener) -> Bounded {
        Bounded {
            listener,
            open: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        let permit = self
            .open
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let mut pause = Duration::from_millis(10);
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Conn::new(stream, permit), addr);
                }
                // out of file descriptors, say: wait for some to close rather than spin
                Err(e) => {
                    tracing::debug!("cannot accept a dashboard connection: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that holds its place among the [`MAX_CONNECTIONS`], and times out when idle.
pub(super) struct Conn {
    stream: TcpStream,
    idle: Pin<Box<Sleep>>,
    _place: OwnedSemaphorePermit,
}

impl Conn {
    fn new(stream: TcpStream, place: OwnedSemaphorePermit) -> Conn {
        Conn {
            stream,
            idle: Box::pin(tokio::time::sleep(IDLE)),
            _place: place,
        }
    }

    /// A byte moved: the idle clock starts again.
    fn moved(&mut self) {
        self.idle.as_mut().reset(Instant::now() + IDLE);
    }

    /// Whether the connection has moved nothing for [`IDLE`]; wakes the task when it will have.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle dashboard connection")
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.stalled(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            // a client that stops reading stalls our writes: the same clock drops it
            Poll::Pending if self.stalled(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

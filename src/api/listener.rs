//! Listeners for [`super::serve::serve`] whose connections send mapped module files with `sendfile(2)`
//! (see [`crate::splice`]).

use std::io;

use prometheus_client::metrics::counter::Counter;

use crate::splice::{Socket, SpliceIo};

/// A listener whose connections are [`SpliceIo`]s.
pub struct Listener<L> {
    inner: L,
    send_buffer: Option<usize>,
    sent: Counter,
}

impl<L> Listener<L> {
    /// Wraps `inner`; see [`SpliceIo::new`] for `send_buffer` and `sent`.
    pub fn new(inner: L, send_buffer: Option<usize>, sent: Counter) -> Self {
        Listener {
            inner,
            send_buffer,
            sent,
        }
    }
}

impl<L> axum::serve::Listener for Listener<L>
where
    L: axum::serve::Listener,
    L::Io: Socket,
{
    type Io = SpliceIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, address) = self.inner.accept().await;
        (
            SpliceIo::new(io, self.send_buffer, self.sent.clone()),
            address,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

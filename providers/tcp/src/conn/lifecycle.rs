//! The life of a connection after setup: the handshake's first step, and every way it
//! ends (local shutdown, peer close, loss, protocol violation, a refused remote
//! access) with its one Shutdown event and the completions of what was outstanding.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use fabric_core::{
    CompFlags, Completion, CqError, CqErrorKind, Error, ErrorKind, Event, ShutdownReason,
};
use tracing::{debug, warn};

use super::{
    AfterRx, AfterTx, Body, Conn, ConnState, Fatal, Incoming, Phase, TxOp, LINGER, RX_ROUNDS,
};
use crate::sys::{self, Interest};
use crate::wire::{Header, Op};

impl Conn {
    /// Ends the connection: every outstanding operation completes in error (`kind` for
    /// transmit operations, `Canceled` for receives), the socket closes, and with
    /// `event` a Shutdown event with that reason is raised when the connection had been
    /// established (a connection that is [`ConnState::Closing`] raised its event when
    /// it began closing).
    pub(crate) fn teardown(
        &mut self,
        kind: CqErrorKind,
        detail: &str,
        event: Option<ShutdownReason>,
    ) {
        let was = self.state;
        if was == ConnState::Closed && self.sock.is_none() {
            return;
        }
        self.state = ConnState::Closed;
        if let Some(sock) = self.sock.take() {
            sys::shutdown_both(&sock);
            // Closing the descriptor removes it from epoll.
        }
        self.interest = Interest::empty();
        self.want_write = false;
        self.closing_deadline = None;
        self.cancel_all(kind, detail, false);
        if let (Some(reason), ConnState::Connected) = (event, was) {
            self.rep.eq.push(Event::Shutdown {
                fid: self.fid,
                reason,
            });
        }
    }

    /// Completes every outstanding operation in error (`kind` for transmit operations,
    /// `Canceled` for receives) and forgets buffered input. With `keep_answers`, the
    /// queued answers to the peer (ACKs, read responses) and the operation partly on
    /// the wire stay queued so the stream stays well framed.
    pub(super) fn cancel_all(&mut self, kind: CqErrorKind, detail: &str, keep_answers: bool) {
        let err = |what: &str| CqError::new(kind, 0, format!("{what}: {detail}"));
        let mut kept = VecDeque::new();
        for (i, mut op) in std::mem::take(&mut self.txq).into_iter().enumerate() {
            let started = i == 0 && self.tx_done > 0;
            let answer = matches!(op.then, AfterTx::Nothing);
            match std::mem::replace(&mut op.then, AfterTx::Nothing) {
                AfterTx::Nothing => {}
                AfterTx::Complete { context, flags, .. } => {
                    self.rep.tx_cq.push(Completion::error(
                        context,
                        flags,
                        err("send not completed"),
                    ));
                }
                AfterTx::Await(p) => {
                    self.rep
                        .tx_cq
                        .push(Completion::error(p.context, p.flags, err("not sent")));
                }
            }
            if keep_answers && (started || answer) {
                kept.push_back(op);
            }
        }
        if kept.is_empty() {
            self.tx_done = 0;
        }
        self.answers_queued = kept.iter().filter(|op| op.answer).count();
        self.txq = kept;
        for (_, c) in std::mem::take(&mut self.deferred) {
            // A send that was handed to the socket behind an operation whose answer
            // never came: the peer did not act on it.
            self.rep.tx_cq.push(Completion::error(
                c.context,
                c.flags,
                err("send not acknowledged"),
            ));
        }
        for p in std::mem::take(&mut self.inflight) {
            self.rep.tx_cq.push(Completion::error(
                p.context,
                p.flags,
                err("no answer from the peer"),
            ));
        }
        let cancel =
            |what: &str| CqError::new(CqErrorKind::Canceled, 0, format!("{what}: {detail}"));
        match std::mem::replace(&mut self.rx.phase, Phase::Header) {
            Phase::Payload(Incoming {
                then: AfterRx::Msg { recv, .. },
                ..
            }) => self.rep.rx_cq.push(Completion::error(
                recv.context,
                CompFlags::MSG | CompFlags::RECV,
                cancel("receive interrupted"),
            )),
            Phase::Payload(Incoming {
                then: AfterRx::ReadResp(p),
                ..
            }) => self.rep.tx_cq.push(Completion::error(
                p.context,
                p.flags,
                err("read interrupted"),
            )),
            _ => {}
        }
        for r in std::mem::take(&mut self.posted) {
            self.rep.rx_cq.push(Completion::error(
                r.context,
                CompFlags::MSG | CompFlags::RECV,
                cancel("receive canceled"),
            ));
        }
        self.unexpected.clear();
        self.unexpected_bytes = 0;
        self.rx.start = 0;
        self.rx.end = 0;
    }

    /// Refuses a remote access, as an RC responder does: queues the refusal `answer`
    /// (an error ACK or READ_RESP) behind the answers already queued, and ends the
    /// connection. Everything this side had outstanding completes `Canceled`, the
    /// endpoint gets `Shutdown { reason: AccessError }`, nothing that arrives from now
    /// on is acted upon, and the socket closes once the answer is out and the peer has
    /// closed (at the latest after [`LINGER`]), so the refusal is not lost to a reset.
    pub(super) fn refuse(&mut self, answer: &Header) {
        if self.state != ConnState::Connected {
            return;
        }
        self.state = ConnState::Closing;
        self.closing_deadline = Some(Instant::now() + LINGER);
        let detail = format!(
            "this side refused a remote access ({})",
            answer.status.describe()
        );
        self.cancel_all(CqErrorKind::Canceled, &detail, true);
        self.queue(TxOp::new(answer, Body::Empty, AfterTx::Nothing), false);
        self.rep.eq.push(Event::Shutdown {
            fid: self.fid,
            reason: ShutdownReason::AccessError,
        });
    }

    /// Closing: reads and drops whatever arrives; closes the socket on end of stream,
    /// on an error, or once the deadline has passed.
    pub(super) fn discard_input(&mut self) {
        let Some(sock) = &self.sock else { return };
        let fd = sock.as_fd();
        for _ in 0..RX_ROUNDS {
            match sys::recv(fd, &mut self.rx.buf) {
                Ok(0) => return self.close_quietly(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.close_quietly(),
            }
        }
        self.check_linger(Instant::now());
    }

    /// Closes a Closing connection whose deadline has passed.
    pub(crate) fn check_linger(&mut self, now: Instant) {
        if self.closing_deadline.is_some_and(|d| now >= d) {
            self.close_quietly();
        }
    }

    /// While Closing: when the socket closes at the latest.
    pub(crate) fn closing_deadline(&self) -> Option<Instant> {
        self.closing_deadline
    }

    /// Whether the connection is Closing (its socket is still open).
    pub(crate) fn is_closing(&self) -> bool {
        self.state == ConnState::Closing
    }

    /// Ends a Closing connection: its Shutdown event was raised when it began closing.
    pub(super) fn close_quietly(&mut self) {
        debug!(fid = %self.fid, "closing after a refused remote access");
        self.teardown(CqErrorKind::Canceled, "connection closed", None);
    }

    /// Why a post must fail at the call, if it must: the connection has ended
    /// (`NotConnected`), or this side shut it down (`Shutdown`).
    pub(crate) fn post_refusal(&self) -> Option<Error> {
        match self.state {
            ConnState::Closed | ConnState::Closing if self.local_shutdown => Some(Error::new(
                ErrorKind::Shutdown,
                "the endpoint was shut down",
            )),
            ConnState::Closed | ConnState::Closing => Some(Error::new(
                ErrorKind::NotConnected,
                "the connection has ended",
            )),
            _ => None,
        }
    }

    /// The application shuts the connection down.
    pub(crate) fn shutdown(&mut self) {
        self.local_shutdown = true;
        self.teardown(
            CqErrorKind::Canceled,
            "endpoint shut down locally",
            Some(ShutdownReason::Local),
        );
    }

    /// Tears down after a fatal error from the peer side. The events it raises carry
    /// `f` as their error's [`source`](std::error::Error::source).
    pub(crate) fn fail(&mut self, f: Fatal) {
        let detail = f.to_string();
        let (kind, reason) = (f.kind(), f.reason());
        let setup = matches!(self.state, ConnState::Connecting | ConnState::WaitConnResp);
        if f.is_protocol() {
            warn!(fid = %self.fid, "{detail}; closing the connection");
        } else {
            debug!(fid = %self.fid, "{detail}");
        }
        if setup {
            self.rep.eq.push(Event::Error {
                fid: self.fid,
                error: Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("connection setup failed: {detail}"),
                )
                .with_source(f),
                data: Vec::new(),
            });
        } else if f.is_protocol() && self.state == ConnState::Connected {
            self.rep.eq.push(Event::Error {
                fid: self.fid,
                error: Error::new(ErrorKind::Protocol, detail.clone()).with_source(f),
                data: Vec::new(),
            });
        }
        self.teardown(kind, &detail, Some(reason));
    }

    /// Queues CONN_REQ with the connect data ahead of any early operations.
    pub(crate) fn start_handshake(&mut self) -> Result<(), Fatal> {
        let data = std::mem::take(&mut self.connect_data);
        let h = Header::new(Op::ConnReq, 0, data.len() as u64);
        self.queue(TxOp::new(&h, Body::Bytes(data), AfterTx::Nothing), true);
        self.state = ConnState::WaitConnResp;
        self.flush()
    }
}

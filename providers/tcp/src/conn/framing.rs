//! The transmit side: operations queued as a header plus a body, gathered into
//! `sendmsg` iovecs straight from registered memory, and what happens once each has
//! been handed to the socket (complete, or wait for the peer's answer).

use std::io;
use std::os::fd::AsRawFd;

use fabric_core::{CompFlags, Completion, RemoteIov, Segments};

#[cfg(doc)]
use super::TX_ANSWER_LIMIT;
use super::{Conn, ConnState, Fatal, TX_BATCH_BYTES, TX_IOV_MAX};
use crate::sys;
use crate::wire::{Header, Op, Status, WireIov, MAX_HDR_SIZE, MAX_RMA_IOV};
use fabric_core::prov::RemoteRange;

/// The data a transmit operation sends after its header.
pub(crate) enum Body {
    Empty,
    Bytes(Vec<u8>),
    Segs(Segments),
    Regions(Vec<RemoteRange>),
}

impl Body {
    pub(super) fn for_each_piece(&self, mut f: impl FnMut(*const u8, usize) -> bool) {
        match self {
            Body::Empty => {}
            Body::Bytes(v) => {
                f(v.as_ptr(), v.len());
            }
            Body::Segs(s) => {
                for x in s {
                    if !f(x.ptr(), x.len()) {
                        return;
                    }
                }
            }
            Body::Regions(r) => {
                for x in r {
                    if !f(x.ptr(), x.len()) {
                        return;
                    }
                }
            }
        }
    }
}

/// What an initiator waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendKind {
    Send,
    Write,
    Read,
}

/// An operation sent and waiting for its ACK or READ_RESP.
pub(crate) struct Pending {
    pub(crate) op_id: u64,
    pub(crate) kind: PendKind,
    pub(crate) context: u64,
    pub(crate) flags: CompFlags,
    pub(crate) len: usize,
    pub(crate) completion: bool,
    /// Local memory the operation holds (the read destination for reads).
    pub(crate) hold: Body,
    pub(crate) remote: Vec<RemoteIov>,
    /// A write posted with COMMIT_COMPLETE: its successful completion carries
    /// [`CompFlags::COMMIT`].
    pub(crate) commit: bool,
}

/// What happens when a transmit operation has been fully handed to the socket.
pub(crate) enum AfterTx {
    Nothing,
    Complete {
        context: u64,
        flags: CompFlags,
        len: usize,
        completion: bool,
    },
    Await(Pending),
}

/// A queued transmit operation.
pub(crate) struct TxOp {
    /// The header's operation id (orders deferred send completions).
    pub(super) op_id: u64,
    pub(super) hdr: [u8; MAX_HDR_SIZE],
    pub(super) hdr_len: usize,
    pub(super) body: Body,
    pub(super) len: usize,
    pub(super) control: bool,
    /// An answer to the peer (ACK, READ_RESP): counted against [`TX_ANSWER_LIMIT`].
    pub(super) answer: bool,
    pub(super) then: AfterTx,
}

impl TxOp {
    pub(crate) fn new(h: &Header, body: Body, then: AfterTx) -> TxOp {
        let mut hdr = [0u8; MAX_HDR_SIZE];
        let hdr_len = h.emit(&mut hdr);
        let len = hdr_len + h.size as usize;
        TxOp {
            op_id: h.op_id,
            hdr,
            hdr_len,
            body,
            len,
            control: matches!(h.op, Op::ConnReq | Op::ConnResp),
            answer: matches!(h.op, Op::Ack | Op::ReadResp),
            then,
        }
    }

    /// iovecs for the bytes from `skip` on; returns their total.
    pub(super) fn iovecs(&self, skip: usize, out: &mut Vec<libc::iovec>, max_iov: usize) -> usize {
        let mut pos = 0usize;
        let mut total = 0usize;
        let mut add = |ptr: *const u8, len: usize| -> bool {
            if out.len() >= max_iov {
                return false;
            }
            let end = pos + len;
            if end > skip && len > 0 {
                let from = skip.saturating_sub(pos);
                out.push(libc::iovec {
                    // SAFETY: from < len; ptr is valid for len bytes (header array,
                    // inline bytes, or registered memory held by the body).
                    iov_base: unsafe { ptr.add(from) } as *mut libc::c_void,
                    iov_len: len - from,
                });
                total += len - from;
            }
            pos = end;
            true
        };
        if add(self.hdr.as_ptr(), self.hdr_len) {
            self.body.for_each_piece(&mut add);
        }
        total
    }
}

impl Conn {
    pub(super) fn tx_allowed(&self) -> bool {
        match self.txq.front() {
            None => false,
            Some(op) => {
                matches!(self.state, ConnState::Connected | ConnState::Closing) || op.control
            }
        }
    }

    /// Operations outstanding on the transmit side.
    pub(crate) fn tx_outstanding(&self) -> usize {
        self.txq.len() + self.inflight.len() + self.deferred.len()
    }

    /// Queues an operation (and tries to send at once when nothing is ahead of it).
    pub(crate) fn queue(&mut self, op: TxOp, front: bool) {
        self.answers_queued += usize::from(op.answer);
        if front {
            // Only control ops go first, and only before data flows (tx_done == 0).
            self.txq.push_front(op);
        } else {
            self.txq.push_back(op);
        }
    }

    /// Sends `op` now when nothing is queued ahead of it (the common case of a post):
    /// straight from the operation to the socket, and what it needs once sent is done
    /// at once, without a trip through the transmit queue. What the socket does not
    /// take is queued as usual (the part sent counted), and flushed later.
    pub(crate) fn send_or_queue(&mut self, op: TxOp) -> Result<(), Fatal> {
        let Some(sock) = &self.sock else {
            self.queue(op, false);
            return Ok(());
        };
        if self.want_write {
            // Waiting for the socket to take more: the queue goes first.
            self.queue(op, false);
            return Ok(());
        }
        if !self.txq.is_empty() || self.state != ConnState::Connected {
            self.queue(op, false);
            return self.flush();
        }
        let fd = sock.as_raw_fd();
        let mut iov = std::mem::take(&mut self.iov_scratch);
        iov.clear();
        let bytes = op.iovecs(0, &mut iov, TX_IOV_MAX);
        // SAFETY: the iovecs point into `op` (its header array, its owned bytes, or the
        // registered memory its Segments keep alive), which lives and is unchanged
        // for the call.
        let r = if bytes == op.len {
            unsafe { sys::sendv(fd, &iov) }
        } else {
            // More pieces than one call takes: the queue sends it in turns.
            Ok(0)
        };
        iov.clear();
        self.iov_scratch = iov;
        let sent = match r {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => {
                self.queue(op, false);
                return Err(Fatal::io("send", e));
            }
        };
        if sent == op.len {
            self.on_sent(op);
            return Ok(());
        }
        // The queue was empty, so this operation is its front: `tx_done` is its part
        // already on the wire.
        self.queue(op, false);
        self.tx_done = sent;
        self.flush()
    }

    /// Writes as much of the transmit queue as the socket takes.
    pub(crate) fn flush(&mut self) -> Result<(), Fatal> {
        let Some(sock) = &self.sock else {
            return Ok(());
        };
        let fd = sock.as_raw_fd();
        let mut iov = std::mem::take(&mut self.iov_scratch);
        let result = loop {
            if !self.tx_allowed() {
                self.want_write = false;
                break Ok(());
            }
            let bytes = self.gather(&mut iov);
            // SAFETY: the iovecs point into the queued operations' buffers (owned Vecs,
            // or registered memory that their Segments / regions keep alive), which
            // stay in the queue, unchanged, for the call.
            match unsafe { sys::sendv(fd, &iov) } {
                Ok(n) => {
                    self.advance_tx(n);
                    if n < bytes {
                        self.want_write = true;
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.want_write = true;
                    break Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Fatal::io("send", e)),
            }
        };
        iov.clear();
        self.iov_scratch = iov;
        if result.is_ok() && self.state == ConnState::Closing && self.txq.is_empty() {
            self.shut_write();
        }
        result
    }

    /// Fills `iov` (cleared first) with the next bytes to send: the queued operations
    /// that may go now, at most [`TX_IOV_MAX`] iovecs and about [`TX_BATCH_BYTES`];
    /// returns their total.
    pub(super) fn gather(&self, iov: &mut Vec<libc::iovec>) -> usize {
        iov.clear();
        let mut bytes = 0usize;
        for (k, op) in self.txq.iter().enumerate() {
            if !matches!(self.state, ConnState::Connected | ConnState::Closing) && !op.control {
                break;
            }
            let skip = if k == 0 { self.tx_done } else { 0 };
            bytes += op.iovecs(skip, iov, TX_IOV_MAX);
            if iov.len() >= TX_IOV_MAX || bytes >= TX_BATCH_BYTES {
                break;
            }
        }
        bytes
    }

    /// Closing: once the refusal is out, tell the peer we are done sending.
    pub(super) fn shut_write(&mut self) {
        if let (false, Some(sock)) = (self.wr_shut, &self.sock) {
            sys::shutdown_write(sock);
            self.wr_shut = true;
        }
    }

    pub(super) fn advance_tx(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.txq.front() else { break };
            let left = front.len - self.tx_done;
            if n < left {
                self.tx_done += n;
                return;
            }
            n -= left;
            self.tx_done = 0;
            if let Some(op) = self.txq.pop_front() {
                self.answers_queued -= usize::from(op.answer);
                self.on_sent(op);
            }
        }
    }

    pub(super) fn on_sent(&mut self, op: TxOp) {
        match op.then {
            AfterTx::Nothing => {}
            AfterTx::Complete {
                context,
                flags,
                len,
                completion,
            } => {
                if !completion {
                    return;
                }
                let c = Completion::ok(context, flags, len);
                // An earlier write or read may still be refused, and a refusal cancels
                // everything posted after it (the target discards it): the send's
                // success waits for the answers to the operations ahead of it.
                if !self.deferred.is_empty() || self.awaits_rma_before(op.op_id) {
                    self.deferred.push_back((op.op_id, c));
                } else {
                    self.rep.tx_cq.push(c);
                }
            }
            AfterTx::Await(mut p) => {
                if !matches!(op.body, Body::Empty) {
                    p.hold = op.body;
                }
                self.inflight.push_back(p);
            }
        }
    }

    /// Whether a write or read posted before `op_id` still waits for its answer.
    fn awaits_rma_before(&self, op_id: u64) -> bool {
        self.inflight
            .iter()
            .any(|p| p.kind != PendKind::Send && p.op_id < op_id)
    }

    /// Completes the deferred sends that no earlier write or read waits ahead of.
    pub(super) fn release_deferred(&mut self) {
        while let Some(&(op_id, _)) = self.deferred.front() {
            if self.awaits_rma_before(op_id) {
                break;
            }
            if let Some((_, c)) = self.deferred.pop_front() {
                self.rep.tx_cq.push(c);
            }
        }
    }

    pub(super) fn ack(&mut self, op_id: u64, status: Status, index: u64) {
        let mut h = Header::new(Op::Ack, op_id, 0);
        h.status = status;
        h.data = index;
        self.queue(TxOp::new(&h, Body::Empty, AfterTx::Nothing), false);
    }
}

/// Converts remote iovecs to their wire form.
pub(crate) fn wire_iovs(h: &mut Header, remote: &[RemoteIov]) {
    h.iov_count = remote.len().min(MAX_RMA_IOV) as u8;
    for (slot, r) in h.iovs.iter_mut().zip(remote) {
        *slot = WireIov {
            addr: r.addr,
            len: r.len as u64,
            key: r.key,
        };
    }
}

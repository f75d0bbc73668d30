//! The receive side: reads the socket (payloads straight into their destination with
//! `readv` when nothing is buffered), parses and validates headers, and dispatches
//! each operation and answer.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use fabric_core::{
    CompFlags, Completion, CqError, CqErrorKind, Error, ErrorKind, Event, RecvRequest,
};
use tracing::debug;

use super::{
    Body, Conn, ConnState, Fatal, PendKind, Pending, Sink, Unexpected, Violation, RX_ROUNDS,
};
use crate::sys;
use crate::wire::{Header, Op, Status, BASE_HDR_SIZE, MAX_HDR_SIZE};
use fabric_core::prov::ScatterList;

/// What to do once a payload has been received.
pub(super) enum AfterRx {
    Msg {
        recv: RecvRequest,
        size: usize,
        data: Option<u64>,
        ack: Option<u64>,
    },
    Unexpected {
        data: Option<u64>,
        ack: Option<u64>,
    },
    Write {
        op_id: u64,
        size: usize,
        data: Option<u64>,
        /// A COMMIT write: persist `ranges` before the ACK.
        commit: bool,
        /// The initiator asked for no ACK on success (`FLAG_NO_ACK`).
        no_ack: bool,
        // The checked target ranges are the sink's (a remote scatter list), which
        // keeps their memory alive while the payload streams in.
    },
    ReadResp(Pending),
    ConnResp {
        status: Status,
    },
}

pub(super) struct Incoming {
    pub(super) sink: Sink,
    pub(super) remaining: usize,
    pub(super) then: AfterRx,
}

pub(super) enum Phase {
    Header,
    Payload(Incoming),
    /// A message arrived with no receive posted and no room to buffer it.
    Stalled(Header),
}

pub(super) struct RxState {
    pub(super) buf: Box<[u8]>,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) phase: Phase,
}

impl Conn {
    /// Reads and processes what the socket has, then sends any answers it produced.
    pub(crate) fn read(&mut self) -> Result<(), Fatal> {
        if self.state == ConnState::Closing {
            self.discard_input();
            return Ok(());
        }
        let mut rounds = 0;
        loop {
            self.process_buffered()?;
            if self.state == ConnState::Closing {
                // This side just refused an access: drop the rest of the stream.
                self.discard_input();
                break;
            }
            if !self.readable() || rounds >= RX_ROUNDS {
                break;
            }
            rounds += 1;
            let Some(sock) = &self.sock else { break };
            let fd = sock.as_raw_fd();
            let rx = &mut self.rx;
            if rx.start == rx.end {
                rx.start = 0;
                rx.end = 0;
            } else if rx.buf.len() - rx.end < MAX_HDR_SIZE {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            let free = rx.buf.len() - rx.end;
            let (r, asked, direct) = match &mut rx.phase {
                Phase::Payload(inc) if rx.start == rx.end && inc.remaining > 0 => {
                    let mut iov = std::mem::take(&mut self.iov_scratch);
                    iov.clear();
                    let direct = inc.sink.iovecs(inc.remaining, &mut iov);
                    iov.push(libc::iovec {
                        iov_base: rx.buf[rx.end..].as_mut_ptr().cast(),
                        iov_len: free,
                    });
                    // SAFETY: the sink's iovecs point into registered memory that the
                    // incoming operation keeps alive and that is accessed only through
                    // raw pointers; the last one is rx.buf's free tail, which nothing
                    // else borrows during the call.
                    let r = unsafe { sys::readv(fd, &iov) };
                    iov.clear();
                    self.iov_scratch = iov;
                    (r, direct + free, direct)
                }
                _ => (sys::recv(sock.as_fd(), &mut rx.buf[rx.end..]), free, 0),
            };
            match r {
                Ok(0) => return Err(Fatal::PeerClosed),
                Ok(n) => {
                    let d = n.min(direct);
                    if d > 0 {
                        if let Phase::Payload(inc) = &mut self.rx.phase {
                            inc.sink.advance(d);
                            inc.remaining -= d;
                        }
                    }
                    self.rx.end += n - d;
                    if n < asked {
                        // The socket is drained for now: process and stop.
                        self.process_buffered()?;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fatal::io("receive", e)),
            }
        }
        if !self.txq.is_empty() && !self.want_write {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn process_buffered(&mut self) -> Result<(), Fatal> {
        loop {
            match &mut self.rx.phase {
                Phase::Stalled(_) => return Ok(()),
                Phase::Header => {
                    let avail = self.rx.end - self.rx.start;
                    if avail < BASE_HDR_SIZE {
                        return Ok(());
                    }
                    let b = &self.rx.buf[self.rx.start..self.rx.end];
                    let size = Header::peek_size(b).map_err(Fatal::header)?;
                    if avail < size {
                        return Ok(());
                    }
                    let h = Header::parse(&b[..size]).map_err(Fatal::header)?;
                    self.rx.start += size;
                    self.on_header(h)?;
                    if !self.deferred.is_empty() {
                        self.release_deferred();
                    }
                    if self.state == ConnState::Closing {
                        // This side refused an access: nothing more is acted upon.
                        return Ok(());
                    }
                }
                Phase::Payload(inc) => {
                    if inc.remaining > 0 {
                        let avail = self.rx.end - self.rx.start;
                        if avail == 0 {
                            return Ok(());
                        }
                        let k = avail.min(inc.remaining);
                        inc.sink
                            .write(&self.rx.buf[self.rx.start..self.rx.start + k]);
                        self.rx.start += k;
                        inc.remaining -= k;
                        if inc.remaining > 0 {
                            return Ok(());
                        }
                    }
                    if let Phase::Payload(inc) =
                        std::mem::replace(&mut self.rx.phase, Phase::Header)
                    {
                        self.finish(inc)?;
                        if !self.deferred.is_empty() {
                            self.release_deferred();
                        }
                    }
                }
            }
        }
    }

    pub(super) fn expect(&mut self, sink: Sink, size: usize, then: AfterRx) {
        self.rx.phase = Phase::Payload(Incoming {
            sink,
            remaining: size,
            then,
        });
    }

    pub(super) fn on_header(&mut self, h: Header) -> Result<(), Fatal> {
        let size = h.size as usize;
        match (self.state, h.op) {
            (ConnState::WaitConnResp, Op::ConnResp) => {
                self.expect(
                    Sink::Buffer {
                        data: vec![0; size],
                        filled: 0,
                    },
                    size,
                    AfterRx::ConnResp { status: h.status },
                );
            }
            (ConnState::Connected, Op::Msg) => self.start_msg(h),
            (ConnState::Connected, Op::Write) => self.on_write(&h),
            (ConnState::Connected, Op::ReadReq) => self.on_read_req(&h),
            (ConnState::Connected, Op::ReadResp) => {
                let p = self.take_pending(h.op_id, PendKind::Read)?;
                if h.status != Status::Ok {
                    let err = remote_error(h.status, h.data, &p, "read");
                    self.rep
                        .tx_cq
                        .push(Completion::error(p.context, p.flags, err.clone()));
                    if h.status.is_access_refusal() {
                        return Err(Fatal::AccessRefused(err));
                    }
                    return Ok(());
                }
                if size != p.len {
                    return Err(Fatal::protocol(Violation::ReadRespSize {
                        size: h.size,
                        expected: p.len,
                    }));
                }
                let sink = match &p.hold {
                    Body::Segs(s) => Sink::list(ScatterList::local(s.clone())),
                    _ => Sink::Discard,
                };
                self.expect(sink, size, AfterRx::ReadResp(p));
            }
            (ConnState::Connected, Op::Ack) => {
                if h.status.is_access_refusal() && self.completed_at_transmit(h.op_id) {
                    // The peer refused a write that completed when it was sent
                    // (transmit level, no ACK asked): nothing is left to complete
                    // in error, but the refusal ends the connection all the same.
                    let err = CqError::new(
                        CqErrorKind::RemoteAccess,
                        h.status as i32,
                        format!(
                            "target refused write {} (posted at transmit level, already \
                             completed): {}",
                            h.op_id,
                            h.status.describe()
                        ),
                    );
                    return Err(Fatal::AccessRefused(err));
                }
                let p = self.take_ack_target(h.op_id)?;
                let c = if h.status == Status::Ok {
                    if !p.completion {
                        return Ok(());
                    }
                    let mut flags = p.flags;
                    if p.commit {
                        // The target persisted every range before this ACK.
                        flags |= CompFlags::COMMIT;
                    }
                    Completion::ok(p.context, flags, p.len)
                } else {
                    let what = if p.kind == PendKind::Write {
                        "write"
                    } else {
                        "send"
                    };
                    let err = remote_error(h.status, h.data, &p, what);
                    self.rep
                        .tx_cq
                        .push(Completion::error(p.context, p.flags, err.clone()));
                    if h.status.is_access_refusal() {
                        return Err(Fatal::AccessRefused(err));
                    }
                    return Ok(());
                };
                self.rep.tx_cq.push(c);
            }
            (state, op) => {
                return Err(Fatal::protocol(Violation::UnexpectedOp { op, state }));
            }
        }
        Ok(())
    }

    pub(super) fn take_pending(&mut self, op_id: u64, kind: PendKind) -> Result<Pending, Fatal> {
        let pos = self
            .inflight
            .iter()
            .position(|p| p.op_id == op_id && p.kind == kind);
        pos.and_then(|i| self.inflight.remove(i))
            .ok_or(Fatal::protocol(Violation::UnknownAnswer {
                op: Op::ReadResp,
                op_id,
            }))
    }

    /// Whether `op_id` was sent and is waiting for no answer: a write posted at
    /// transmit level (ids are issued in order; every other operation up to the last
    /// one issued that is not in flight has had its answer).
    fn completed_at_transmit(&self, op_id: u64) -> bool {
        op_id != 0
            && op_id < self.next_op_id
            && !self.inflight.iter().any(|p| p.op_id == op_id)
            && !self.txq.iter().any(|t| t.op_id == op_id)
    }

    pub(super) fn take_ack_target(&mut self, op_id: u64) -> Result<Pending, Fatal> {
        let pos = self
            .inflight
            .iter()
            .position(|p| p.op_id == op_id && p.kind != PendKind::Read);
        pos.and_then(|i| self.inflight.remove(i))
            .ok_or(Fatal::protocol(Violation::UnknownAnswer {
                op: Op::Ack,
                op_id,
            }))
    }

    pub(super) fn finish(&mut self, inc: Incoming) -> Result<(), Fatal> {
        match inc.then {
            AfterRx::Msg {
                recv,
                size,
                data,
                ack,
            } => {
                let placed = match &inc.sink {
                    Sink::Iov { placed, .. } => *placed,
                    _ => 0,
                };
                self.complete_recv(recv, size, placed, data, false);
                if let Some(id) = ack {
                    self.ack(id, Status::Ok, 0);
                }
            }
            AfterRx::Unexpected { data, ack } => {
                let bytes = match inc.sink {
                    Sink::Buffer { data, .. } => data,
                    _ => Vec::new(),
                };
                self.unexpected.push_back(Unexpected {
                    size: bytes.len(),
                    bytes,
                    data,
                    ack,
                    write_data: false,
                });
                // A receive may have been posted while the message streamed in.
                self.match_unexpected()?;
            }
            AfterRx::Write {
                op_id,
                size,
                data,
                commit,
                no_ack,
            } => {
                if no_ack {
                    // Placed; the initiator completed it at transmit and wants no ACK
                    // (the header check rules out CQ data and COMMIT with it).
                } else {
                    let ranges = match &inc.sink {
                        Sink::Iov { list, .. } => list.remote_ranges().unwrap_or(&[]),
                        _ => &[],
                    };
                    self.finish_write(op_id, size, data, commit, ranges)
                }
            }
            AfterRx::ReadResp(p) => {
                if p.completion {
                    self.rep
                        .tx_cq
                        .push(Completion::ok(p.context, p.flags, p.len));
                }
            }
            AfterRx::ConnResp { status } => {
                let data = match inc.sink {
                    Sink::Buffer { data, .. } => data,
                    _ => Vec::new(),
                };
                if status == Status::Ok {
                    self.state = ConnState::Connected;
                    debug!(fid = %self.fid, "connected");
                    self.rep.eq.push(Event::Connected {
                        fid: self.fid,
                        data,
                    });
                    self.flush()?;
                } else {
                    self.rep.eq.push(Event::Error {
                        fid: self.fid,
                        error: Error::new(
                            ErrorKind::ConnectionRefused,
                            "the peer rejected the connection",
                        ),
                        data,
                    });
                    self.teardown(CqErrorKind::Canceled, "connection rejected", None);
                }
            }
        }
        Ok(())
    }
}

pub(super) fn remote_error(status: Status, index: u64, p: &Pending, what: &str) -> CqError {
    let kind = match status {
        Status::Invalid | Status::NotPmem => CqErrorKind::RemoteInvalid,
        Status::OperationFailed => CqErrorKind::RemoteOperation,
        _ => CqErrorKind::RemoteAccess,
    };
    let iov = usize::try_from(index)
        .ok()
        .and_then(|i| p.remote.get(i))
        .map(|r| {
            format!(
                " (remote iov {index}: addr {:#x}, len {}, key {:#x})",
                r.addr, r.len, r.key
            )
        })
        .unwrap_or_default();
    let detail = match status {
        Status::OperationFailed if p.commit => format!(
            "the target could not persist the COMMIT {what}: the data may be placed but \
             is not known to be durable{iov}"
        ),
        _ => format!("target refused the {what}: {}{iov}", status.describe()),
    };
    CqError::new(kind, status as i32, detail)
}

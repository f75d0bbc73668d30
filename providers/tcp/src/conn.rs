//! One connection: its transmit queue, the operations waiting for an answer, posted
//! and unexpected receives, and the receive state machine that parses headers and
//! streams payloads straight between sockets and registered memory.
//!
//! All of it runs under the engine lock; nothing here blocks. Errors that end the
//! connection come back as [`Fatal`], and the caller calls [`Conn::teardown`].

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::{
    Access, CompFlags, Completion, CqError, CqErrorKind, Error, ErrorKind, Event, Fid, RecvRequest,
    RemoteIov, Segment, ShutdownReason,
};
use tracing::{debug, warn};

use crate::mr::{KeyTable, Need, RegionRange};
use crate::sys::{self, Epoll};
use crate::wire::{
    Header, Op, Status, WireIov, BASE_HDR_SIZE, FLAG_COMMIT, FLAG_CQ_DATA, FLAG_DELIVERY,
    MAX_HDR_SIZE, MAX_RMA_IOV,
};
use fabric_core::wait::WaitQueue;

/// Completions as the engine delivers them.
pub(crate) type CompQueue = WaitQueue<Completion>;
/// Events as the engine delivers them.
pub(crate) type EventQueueShared = WaitQueue<Event>;

/// Unexpected (unmatched) message bytes buffered per connection before the socket is
/// no longer read, so TCP flow control pushes back on the sender.
pub(crate) const UNEXPECTED_LIMIT: usize = 64 << 20;
/// Unexpected entries buffered per connection (bounds zero-length floods).
const UNEXPECTED_MAX_ENTRIES: usize = 65_536;
/// Per-connection receive buffer: headers and small payloads land here.
const RX_BUF_SIZE: usize = 64 << 10;
/// At most this many iovecs per sendmsg.
const TX_IOV_MAX: usize = 64;
/// At most this many bytes per sendmsg (keeps one call bounded).
const TX_BATCH_BYTES: usize = 16 << 20;
/// At most this many receive system calls per connection per progress call.
const RX_ROUNDS: usize = 32;
/// How long a connection that refused a remote access waits for the peer to close
/// after its refusal was sent, before it closes the socket itself.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Why a connection ends.
#[derive(Debug)]
pub(crate) struct Fatal {
    pub(crate) detail: String,
    pub(crate) protocol: bool,
    /// What the Shutdown event says.
    pub(crate) reason: ShutdownReason,
    /// How the operations still outstanding complete.
    pub(crate) kind: CqErrorKind,
}

impl Fatal {
    fn io(what: &str, e: io::Error) -> Fatal {
        Fatal {
            detail: format!("{what}: {e}"),
            protocol: false,
            reason: ShutdownReason::Lost,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    fn eof() -> Fatal {
        Fatal {
            detail: "peer closed the connection".into(),
            protocol: false,
            reason: ShutdownReason::Peer,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    fn protocol(msg: impl std::fmt::Display) -> Fatal {
        Fatal {
            detail: format!("{msg}"),
            protocol: true,
            reason: ShutdownReason::Protocol,
            kind: CqErrorKind::ConnectionLost,
        }
    }
    /// The peer refused one of our remote accesses: the connection ends and what was
    /// posted after it completes `Canceled`.
    fn access_refused(detail: String) -> Fatal {
        Fatal {
            detail,
            protocol: false,
            reason: ShutdownReason::AccessError,
            kind: CqErrorKind::Canceled,
        }
    }
}

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Opened from a getinfo answer; not connected yet.
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// CONN_REQ sent; waiting for CONN_RESP.
    WaitConnResp,
    /// Opened from a connection request; `accept` not called yet.
    Accepting,
    /// Data may flow.
    Connected,
    /// This side refused a remote access: the refusal (NAK) and the answers queued
    /// ahead of it are still being sent, everything arriving is discarded, and the
    /// socket closes once the peer closes or [`LINGER`] passes. Posts fail.
    Closing,
    /// Shut down, refused or lost.
    Closed,
}

/// A pointer + length into memory that the owning operation keeps alive.
#[derive(Clone, Copy)]
struct RawIov {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawIov points into registered memory held alive (through Segment or
// Arc<dyn MemoryBacking>) by the operation that owns it; MemoryBacking is Send + Sync
// and all access happens under the engine lock.
unsafe impl Send for RawIov {}

/// Scatter list of a payload's destination; data beyond its capacity is discarded.
struct IovList {
    v: [RawIov; MAX_RMA_IOV],
    n: usize,
    idx: usize,
    off: usize,
    placed: usize,
    /// For regions registered UNCACHED: the backing and offset of each piece, so the
    /// payload is copied in with `write_uncached` (and never received into it directly).
    nt: Vec<(Arc<dyn fabric_core::MemoryBacking>, usize)>,
}

impl IovList {
    fn new() -> IovList {
        IovList {
            v: [RawIov {
                ptr: std::ptr::null_mut(),
                len: 0,
            }; MAX_RMA_IOV],
            n: 0,
            idx: 0,
            off: 0,
            placed: 0,
            nt: Vec::new(),
        }
    }
    fn push(&mut self, ptr: *mut u8, len: usize) {
        if len > 0 && self.n < MAX_RMA_IOV {
            self.v[self.n] = RawIov { ptr, len };
            self.n += 1;
        }
    }
    fn from_segments(segs: &[Segment]) -> IovList {
        let mut l = IovList::new();
        for s in segs {
            l.push(s.ptr(), s.len());
        }
        l
    }
    fn from_ranges(r: &[RegionRange]) -> IovList {
        let mut l = IovList::new();
        let uncached = r.iter().any(|x| x.uncached);
        for x in r {
            if uncached && x.len > 0 {
                l.nt.push((x.memory.clone(), x.offset));
            }
            l.push(x.ptr(), x.len);
        }
        l
    }
    /// Copies as much of `src` as fits; returns the bytes taken.
    fn write(&mut self, mut src: &[u8]) -> usize {
        let mut taken = 0;
        while !src.is_empty() && self.idx < self.n {
            let cur = self.v[self.idx];
            let k = (cur.len - self.off).min(src.len());
            if let Some((mem, base)) = self.nt.get(self.idx) {
                // SAFETY: base + off + k <= the region's length (checked with the
                // range); the memory is held alive by `mem`.
                unsafe { mem.write_uncached(base + self.off, &src[..k]) };
            } else {
                // SAFETY: cur.ptr..cur.ptr+cur.len lies in memory the owning operation
                // keeps alive and that was bounds-checked when the list was built;
                // off + k <= len.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), cur.ptr.add(self.off), k) };
            }
            self.advance(k);
            src = &src[k..];
            taken += k;
        }
        taken
    }
    fn advance(&mut self, mut k: usize) {
        self.placed += k;
        while k > 0 && self.idx < self.n {
            let left = self.v[self.idx].len - self.off;
            if k >= left {
                k -= left;
                self.idx += 1;
                self.off = 0;
            } else {
                self.off += k;
                k = 0;
            }
        }
    }
    /// iovecs for the next `limit` bytes of free space.
    fn iovecs(&self, mut limit: usize, out: &mut Vec<libc::iovec>) -> usize {
        if !self.nt.is_empty() {
            // Uncached targets are filled through the receive buffer.
            return 0;
        }
        let mut total = 0;
        let mut off = self.off;
        for i in self.idx..self.n {
            if limit == 0 {
                break;
            }
            let k = (self.v[i].len - off).min(limit);
            out.push(libc::iovec {
                // SAFETY: within the bounds-checked range (see `write`).
                iov_base: unsafe { self.v[i].ptr.add(off) }.cast(),
                iov_len: k,
            });
            limit -= k;
            total += k;
            off = 0;
        }
        total
    }
}

/// Where an incoming payload goes.
enum Sink {
    Discard,
    Iov(IovList),
    Buffer { data: Vec<u8>, filled: usize },
}

impl Sink {
    fn write(&mut self, src: &[u8]) {
        match self {
            Sink::Discard => {}
            Sink::Iov(l) => {
                l.write(src);
            }
            Sink::Buffer { data, filled } => {
                let k = (data.len() - *filled).min(src.len());
                data[*filled..*filled + k].copy_from_slice(&src[..k]);
                *filled += k;
            }
        }
    }
    fn iovecs(&mut self, limit: usize, out: &mut Vec<libc::iovec>) -> usize {
        match self {
            Sink::Discard => 0,
            Sink::Iov(l) => l.iovecs(limit, out),
            Sink::Buffer { data, filled } => {
                let k = (data.len() - *filled).min(limit);
                if k > 0 {
                    out.push(libc::iovec {
                        iov_base: data[*filled..].as_mut_ptr().cast(),
                        iov_len: k,
                    });
                }
                k
            }
        }
    }
    fn advance(&mut self, k: usize) {
        match self {
            Sink::Discard => {}
            Sink::Iov(l) => l.advance(k),
            Sink::Buffer { filled, .. } => *filled += k,
        }
    }
}

/// What to do once a payload has been received.
enum AfterRx {
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
        /// The checked target ranges; they also keep the memory alive while the
        /// payload streams in.
        ranges: Vec<RegionRange>,
    },
    ReadResp(Pending),
    ConnResp {
        status: Status,
    },
}

struct Incoming {
    sink: Sink,
    remaining: usize,
    then: AfterRx,
}

enum Phase {
    Header,
    Payload(Incoming),
    /// A message arrived with no receive posted and no room to buffer it.
    Stalled(Header),
}

struct RxState {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    phase: Phase,
}

/// A message (or write-with-data notification) that arrived before a receive.
struct Unexpected {
    bytes: Vec<u8>,
    size: usize,
    data: Option<u64>,
    ack: Option<u64>,
    write_data: bool,
}

/// The data a transmit operation sends after its header.
pub(crate) enum Body {
    Empty,
    Bytes(Vec<u8>),
    Segs(Vec<Segment>),
    Regions(Vec<RegionRange>),
}

impl Body {
    fn for_each_piece(&self, mut f: impl FnMut(*const u8, usize) -> bool) {
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
                    if !f(x.ptr(), x.len) {
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
    hdr: [u8; MAX_HDR_SIZE],
    hdr_len: usize,
    body: Body,
    len: usize,
    control: bool,
    then: AfterTx,
}

impl TxOp {
    pub(crate) fn new(h: &Header, body: Body, then: AfterTx) -> TxOp {
        let mut hdr = [0u8; MAX_HDR_SIZE];
        let hdr_len = h.emit(&mut hdr);
        let len = hdr_len + h.size as usize;
        TxOp {
            hdr,
            hdr_len,
            body,
            len,
            control: matches!(h.op, Op::ConnReq | Op::ConnResp),
            then,
        }
    }

    /// iovecs for the bytes from `skip` on; returns their total.
    fn iovecs(&self, skip: usize, out: &mut Vec<libc::iovec>, max_iov: usize) -> usize {
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

/// Everything the engine needs to report to.
pub(crate) struct Reporting {
    pub(crate) tx_cq: Arc<CompQueue>,
    pub(crate) rx_cq: Arc<CompQueue>,
    pub(crate) eq: Arc<EventQueueShared>,
    pub(crate) keys: Arc<KeyTable>,
}

/// One endpoint's connection.
pub(crate) struct Conn {
    pub(crate) fid: Fid,
    pub(crate) state: ConnState,
    pub(crate) sock: Option<TcpStream>,
    interest: u32,
    pub(crate) rep: Reporting,
    next_op_id: u64,
    txq: VecDeque<TxOp>,
    tx_done: usize,
    pub(crate) want_write: bool,
    inflight: VecDeque<Pending>,
    posted: VecDeque<RecvRequest>,
    unexpected: VecDeque<Unexpected>,
    unexpected_bytes: usize,
    rx: RxState,
    pub(crate) tx_size: usize,
    pub(crate) rx_size: usize,
    pub(crate) connect_data: Vec<u8>,
    iov_scratch: Vec<libc::iovec>,
    /// The application called shutdown(): later posts fail with `Shutdown`.
    local_shutdown: bool,
    /// While [`ConnState::Closing`]: when the socket closes at the latest.
    closing_deadline: Option<Instant>,
    /// The sending direction has been shut down (Closing, everything sent).
    wr_shut: bool,
    /// The endpoint was closed while the connection was still Closing: the engine
    /// drops the connection once its socket has closed.
    pub(crate) detached: bool,
}

// SAFETY: libc::iovec in iov_scratch is only a reusable buffer (emptied after each use,
// pointers never dereferenced outside the call that filled it); every other field is
// Send.
unsafe impl Send for Conn {}

impl Conn {
    pub(crate) fn new(fid: Fid, rep: Reporting, tx_size: usize, rx_size: usize) -> Conn {
        Conn {
            fid,
            state: ConnState::Idle,
            sock: None,
            interest: 0,
            rep,
            next_op_id: 1,
            txq: VecDeque::new(),
            tx_done: 0,
            want_write: false,
            inflight: VecDeque::new(),
            posted: VecDeque::new(),
            unexpected: VecDeque::new(),
            unexpected_bytes: 0,
            rx: RxState {
                buf: vec![0u8; RX_BUF_SIZE].into_boxed_slice(),
                start: 0,
                end: 0,
                phase: Phase::Header,
            },
            tx_size,
            rx_size,
            connect_data: Vec::new(),
            iov_scratch: Vec::with_capacity(TX_IOV_MAX + 1),
            local_shutdown: false,
            closing_deadline: None,
            wr_shut: false,
            detached: false,
        }
    }

    pub(crate) fn token(&self) -> u64 {
        self.fid.0
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        let id = self.next_op_id;
        self.next_op_id = self.next_op_id.wrapping_add(1);
        id
    }

    /// Whether the receive side should be read now.
    pub(crate) fn readable(&self) -> bool {
        self.sock.is_some()
            && matches!(
                self.state,
                ConnState::Connected | ConnState::WaitConnResp | ConnState::Closing
            )
            && !matches!(self.rx.phase, Phase::Stalled(_))
    }

    /// Updates the epoll registration to what the connection needs now. A connection
    /// that needs nothing is removed from the set, so a hung-up socket that is not
    /// being read (stalled receive) cannot make sleepers spin.
    pub(crate) fn update_interest(&mut self, ep: &Epoll) {
        let Some(sock) = &self.sock else { return };
        let mut want = 0u32;
        if self.readable() {
            want |= libc::EPOLLIN as u32;
        }
        if self.state == ConnState::Connecting || (self.want_write && self.tx_allowed()) {
            want |= libc::EPOLLOUT as u32;
        }
        if want == self.interest {
            return;
        }
        let fd = sock.as_raw_fd();
        let r = match (self.interest, want) {
            (0, w) => ep.add(fd, self.token(), w),
            (_, 0) => ep.delete(fd),
            (_, w) => ep.modify(fd, self.token(), w),
        };
        if let Err(e) = r {
            warn!(fid = %self.fid, "epoll update failed: {e}");
        }
        self.interest = want;
    }

    fn tx_allowed(&self) -> bool {
        match self.txq.front() {
            None => false,
            Some(op) => {
                matches!(self.state, ConnState::Connected | ConnState::Closing) || op.control
            }
        }
    }

    /// Operations outstanding on the transmit side.
    pub(crate) fn tx_outstanding(&self) -> usize {
        self.txq.len() + self.inflight.len()
    }

    pub(crate) fn posted_len(&self) -> usize {
        self.posted.len()
    }

    /// Queues an operation (and tries to send at once when nothing is ahead of it).
    pub(crate) fn queue(&mut self, op: TxOp, front: bool) {
        if front {
            // Only control ops go first, and only before data flows (tx_done == 0).
            self.txq.push_front(op);
        } else {
            self.txq.push_back(op);
        }
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
            iov.clear();
            let mut bytes = 0usize;
            for (k, op) in self.txq.iter().enumerate() {
                if !matches!(self.state, ConnState::Connected | ConnState::Closing) && !op.control {
                    break;
                }
                let skip = if k == 0 { self.tx_done } else { 0 };
                bytes += op.iovecs(skip, &mut iov, TX_IOV_MAX);
                if iov.len() >= TX_IOV_MAX || bytes >= TX_BATCH_BYTES {
                    break;
                }
            }
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

    /// Closing: once the refusal is out, tell the peer we are done sending.
    fn shut_write(&mut self) {
        if let (false, Some(sock)) = (self.wr_shut, &self.sock) {
            sys::shutdown_write(sock.as_raw_fd());
            self.wr_shut = true;
        }
    }

    fn advance_tx(&mut self, mut n: usize) {
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
                self.on_sent(op);
            }
        }
    }

    fn on_sent(&mut self, op: TxOp) {
        match op.then {
            AfterTx::Nothing => {}
            AfterTx::Complete {
                context,
                flags,
                len,
                completion,
            } => {
                if completion {
                    self.rep.tx_cq.push(Completion::ok(context, flags, len));
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
                _ => (sys::recv(fd, &mut rx.buf[rx.end..]), free, 0),
            };
            match r {
                Ok(0) => return Err(Fatal::eof()),
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

    fn process_buffered(&mut self) -> Result<(), Fatal> {
        loop {
            match &mut self.rx.phase {
                Phase::Stalled(_) => return Ok(()),
                Phase::Header => {
                    let avail = self.rx.end - self.rx.start;
                    if avail < BASE_HDR_SIZE {
                        return Ok(());
                    }
                    let b = &self.rx.buf[self.rx.start..self.rx.end];
                    let size = Header::peek_size(b).map_err(Fatal::protocol)?;
                    if avail < size {
                        return Ok(());
                    }
                    let h = Header::parse(&b[..size]).map_err(Fatal::protocol)?;
                    self.rx.start += size;
                    self.on_header(h)?;
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
                    }
                }
            }
        }
    }

    fn expect(&mut self, sink: Sink, size: usize, then: AfterRx) {
        self.rx.phase = Phase::Payload(Incoming {
            sink,
            remaining: size,
            then,
        });
    }

    fn on_header(&mut self, h: Header) -> Result<(), Fatal> {
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
            (ConnState::Connected, Op::Write) => {
                let data = (h.flags & FLAG_CQ_DATA != 0).then_some(h.data);
                let commit = h.flags & FLAG_COMMIT != 0;
                let need = Need {
                    access: Access::REMOTE_WRITE,
                    // A COMMIT write must target PMEM regions only: checked here, with
                    // key, rights and bounds, before a byte is placed.
                    pmem: commit,
                };
                match self.rep.keys.check(h.iovs(), need) {
                    Ok(ranges) => {
                        let sink = Sink::Iov(IovList::from_ranges(&ranges));
                        self.expect(
                            sink,
                            size,
                            AfterRx::Write {
                                op_id: h.op_id,
                                size,
                                data,
                                commit,
                                ranges,
                            },
                        );
                    }
                    Err((status, index)) => {
                        debug!(fid = %self.fid, ?status, index, "refusing remote write");
                        let mut nak = Header::new(Op::Ack, h.op_id, 0);
                        nak.status = status;
                        nak.data = index as u64;
                        self.refuse(&nak);
                    }
                }
            }
            (ConnState::Connected, Op::ReadReq) => {
                let mut resp = Header::new(Op::ReadResp, h.op_id, 0);
                let body = match self
                    .rep
                    .keys
                    .check(h.iovs(), Need::access(Access::REMOTE_READ))
                {
                    Ok(ranges) => {
                        resp.size = h.iov_total();
                        Body::Regions(ranges)
                    }
                    Err((status, index)) => {
                        debug!(fid = %self.fid, ?status, index, "refusing remote read");
                        resp.status = status;
                        resp.data = index as u64;
                        self.refuse(&resp);
                        return Ok(());
                    }
                };
                self.queue(TxOp::new(&resp, body, AfterTx::Nothing), false);
            }
            (ConnState::Connected, Op::ReadResp) => {
                let p = self.take_pending(h.op_id, PendKind::Read)?;
                if h.status != Status::Ok {
                    let err = remote_error(h.status, h.data, &p, "read");
                    let detail = err.detail.clone();
                    self.rep
                        .tx_cq
                        .push(Completion::error(p.context, p.flags, err));
                    if h.status.is_access_refusal() {
                        return Err(Fatal::access_refused(detail));
                    }
                    return Ok(());
                }
                if size != p.len {
                    return Err(Fatal::protocol(format!(
                        "read response of {size} bytes for a read of {}",
                        p.len
                    )));
                }
                let sink = match &p.hold {
                    Body::Segs(s) => Sink::Iov(IovList::from_segments(s)),
                    _ => Sink::Discard,
                };
                self.expect(sink, size, AfterRx::ReadResp(p));
            }
            (ConnState::Connected, Op::Ack) => {
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
                    let detail = err.detail.clone();
                    self.rep
                        .tx_cq
                        .push(Completion::error(p.context, p.flags, err));
                    if h.status.is_access_refusal() {
                        return Err(Fatal::access_refused(detail));
                    }
                    return Ok(());
                };
                self.rep.tx_cq.push(c);
            }
            (state, op) => {
                return Err(Fatal::protocol(format!(
                    "unexpected {op:?} in state {state:?}"
                )));
            }
        }
        Ok(())
    }

    fn take_pending(&mut self, op_id: u64, kind: PendKind) -> Result<Pending, Fatal> {
        let pos = self
            .inflight
            .iter()
            .position(|p| p.op_id == op_id && p.kind == kind);
        pos.and_then(|i| self.inflight.remove(i))
            .ok_or_else(|| Fatal::protocol(format!("answer for unknown {kind:?} op {op_id}")))
    }

    fn take_ack_target(&mut self, op_id: u64) -> Result<Pending, Fatal> {
        let pos = self
            .inflight
            .iter()
            .position(|p| p.op_id == op_id && p.kind != PendKind::Read);
        pos.and_then(|i| self.inflight.remove(i))
            .ok_or_else(|| Fatal::protocol(format!("ACK for unknown op {op_id}")))
    }

    fn start_msg(&mut self, h: Header) {
        let size = h.size as usize;
        let data = (h.flags & FLAG_CQ_DATA != 0).then_some(h.data);
        let ack = (h.flags & FLAG_DELIVERY != 0).then_some(h.op_id);
        if let Some(recv) = self.posted.pop_front() {
            let sink = Sink::Iov(IovList::from_segments(&recv.segments));
            self.expect(
                sink,
                size,
                AfterRx::Msg {
                    recv,
                    size,
                    data,
                    ack,
                },
            );
        } else if self.unexpected_bytes + size <= UNEXPECTED_LIMIT
            && self.unexpected.len() < UNEXPECTED_MAX_ENTRIES
        {
            self.unexpected_bytes += size;
            self.expect(
                Sink::Buffer {
                    data: vec![0; size],
                    filled: 0,
                },
                size,
                AfterRx::Unexpected { data, ack },
            );
        } else {
            debug!(fid = %self.fid, size, "no receive posted and buffer full: pausing reads");
            self.rx.phase = Phase::Stalled(h);
        }
    }

    fn ack(&mut self, op_id: u64, status: Status, index: u64) {
        let mut h = Header::new(Op::Ack, op_id, 0);
        h.status = status;
        h.data = index;
        self.queue(TxOp::new(&h, Body::Empty, AfterTx::Nothing), false);
    }

    fn finish(&mut self, inc: Incoming) -> Result<(), Fatal> {
        match inc.then {
            AfterRx::Msg {
                recv,
                size,
                data,
                ack,
            } => {
                let placed = match &inc.sink {
                    Sink::Iov(l) => l.placed,
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
                ranges,
            } => {
                if commit {
                    // Durable before acknowledged: persist every written range (CPU
                    // cache flush on true pmem, msync on a page-cache mapping) and
                    // answer only once all of them succeeded. A failure is reported,
                    // never acked as durable; the data stays placed (visible) but the
                    // initiator learns it may not be durable.
                    if let Some((i, e)) = persist_all(&ranges) {
                        warn!(fid = %self.fid, op_id, index = i, "persisting a COMMIT write failed: {e}");
                        self.ack(op_id, Status::OperationFailed, i as u64);
                        return Ok(());
                    }
                }
                // With CQ data the initiator's completion waits until the data has
                // consumed a receive here (as RNR holds an RC write-with-immediate):
                // the ACK goes out when the entry is matched.
                match data {
                    Some(d) if self.posted.is_empty() => {
                        self.unexpected.push_back(Unexpected {
                            bytes: Vec::new(),
                            size,
                            data: Some(d),
                            ack: Some(op_id),
                            write_data: true,
                        });
                    }
                    Some(d) => {
                        if let Some(recv) = self.posted.pop_front() {
                            self.complete_recv(recv, size, 0, Some(d), true);
                        }
                        self.ack(op_id, Status::Ok, 0);
                    }
                    None => self.ack(op_id, Status::Ok, 0),
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

    /// Reports a receive. `placed` is what the buffer took (`size` when a write with
    /// data consumed it), `size` what arrived.
    fn complete_recv(
        &mut self,
        recv: RecvRequest,
        size: usize,
        placed: usize,
        data: Option<u64>,
        write_data: bool,
    ) {
        let mut flags = if write_data {
            CompFlags::RMA | CompFlags::REMOTE_WRITE
        } else {
            CompFlags::MSG | CompFlags::RECV
        };
        if data.is_some() {
            flags |= CompFlags::REMOTE_CQ_DATA;
        }
        let truncated = !write_data && size > placed;
        let mut c = if truncated {
            Completion::error(
                recv.context,
                flags,
                CqError::new(
                    CqErrorKind::Truncated,
                    0,
                    format!(
                        "message of {size} bytes, receive buffer of {} bytes",
                        recv.len()
                    ),
                ),
            )
        } else {
            Completion::ok(recv.context, flags, size)
        };
        if truncated {
            c.len = placed;
        }
        c.data = data.unwrap_or(0);
        self.rep.rx_cq.push(c);
    }

    /// Posts a receive: matches the oldest unexpected message first, else queues it
    /// (and resumes a stalled connection).
    pub(crate) fn post_recv(&mut self, recv: RecvRequest) -> Result<(), Fatal> {
        self.posted.push_back(recv);
        self.match_unexpected()?;
        if let Phase::Stalled(h) = self.rx.phase {
            if !self.posted.is_empty()
                || self.unexpected_bytes + h.size as usize <= UNEXPECTED_LIMIT
            {
                self.rx.phase = Phase::Header;
                self.start_msg(h);
                // Data for it may already be buffered.
                self.read()?;
            }
        }
        Ok(())
    }

    /// Pairs posted receives with buffered messages, oldest first.
    fn match_unexpected(&mut self) -> Result<(), Fatal> {
        let mut acked = false;
        while !self.posted.is_empty() && !self.unexpected.is_empty() {
            let (Some(recv), Some(u)) = (self.posted.pop_front(), self.unexpected.pop_front())
            else {
                break;
            };
            self.unexpected_bytes -= u.bytes.len();
            let placed = if u.write_data {
                0
            } else {
                let mut l = IovList::from_segments(&recv.segments);
                l.write(&u.bytes);
                l.placed
            };
            self.complete_recv(recv, u.size, placed, u.data, u.write_data);
            if let Some(id) = u.ack {
                self.ack(id, Status::Ok, 0);
                acked = true;
            }
        }
        if acked && !self.want_write {
            self.flush()?;
        }
        Ok(())
    }

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
            sys::shutdown_both(sock.as_raw_fd());
            // Closing the descriptor removes it from epoll.
        }
        self.interest = 0;
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
    fn cancel_all(&mut self, kind: CqErrorKind, detail: &str, keep_answers: bool) {
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
        self.txq = kept;
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
    fn refuse(&mut self, answer: &Header) {
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
    fn discard_input(&mut self) {
        let Some(sock) = &self.sock else { return };
        let fd = sock.as_raw_fd();
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
    fn close_quietly(&mut self) {
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

    /// Tears down after a fatal error from the peer side.
    pub(crate) fn fail(&mut self, f: Fatal) {
        if f.protocol {
            warn!(fid = %self.fid, "{}; closing the connection", f.detail);
            if self.state == ConnState::Connected {
                self.rep.eq.push(Event::Error {
                    fid: self.fid,
                    error: Error::new(ErrorKind::Protocol, f.detail.clone()),
                    data: Vec::new(),
                });
            }
        } else {
            debug!(fid = %self.fid, "{}", f.detail);
        }
        if matches!(self.state, ConnState::Connecting | ConnState::WaitConnResp) {
            self.rep.eq.push(Event::Error {
                fid: self.fid,
                error: Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("connection setup failed: {}", f.detail),
                ),
                data: Vec::new(),
            });
        }
        self.teardown(f.kind, &f.detail, Some(f.reason));
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

/// Persists every range in order; the first failure and the index of its range.
fn persist_all(ranges: &[RegionRange]) -> Option<(usize, io::Error)> {
    ranges
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.persist().err().map(|e| (i, e)))
}

fn remote_error(status: Status, index: u64, p: &Pending, what: &str) -> CqError {
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

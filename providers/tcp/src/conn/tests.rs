//! The connection logic without a socket: byte streams go in through the parser (as
//! if read), and what the connection would send comes out of its transmit queue, so
//! matching, RMA placement, refusals and the end of a connection are checked byte for
//! byte, deterministically.

use std::sync::Arc;

use fabric_core::{
    Access, CompFlags, Completion, CompletionQueue, CqAttr, CqErrorKind, Domain, Endpoint,
    EndpointConfig, EqAttr, ErrorKind, Event, EventQueue, Fabric, HeapMemory, Hints, MemoryBacking,
    MemoryRegion, MrFlags, Registry, ShutdownReason,
};

use super::{AfterTx, Body, Conn, ConnState, Fatal, PendKind, Pending, TxOp};
use crate::engine::Engine;
use crate::objects::{TcpDomain, TcpFabric};
use crate::wire::{
    Header, Op, Status, WireIov, FLAG_CQ_DATA, FLAG_DELIVERY, FLAG_NO_ACK, MAX_HDR_SIZE,
};
use fabric_core::prov::KeyMap;

impl Conn {
    /// Hands `bytes` to the parser as if the socket had delivered them, in pieces of
    /// at most `chunk` bytes.
    fn feed(&mut self, bytes: &[u8], chunk: usize) -> Result<(), Fatal> {
        for piece in bytes.chunks(chunk.max(1)) {
            if self.state == ConnState::Closing {
                // Closing discards what arrives.
                continue;
            }
            let rx = &mut self.rx;
            if rx.start == rx.end {
                rx.start = 0;
                rx.end = 0;
            } else if rx.buf.len() - rx.end < piece.len() {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            rx.buf[rx.end..rx.end + piece.len()].copy_from_slice(piece);
            rx.end += piece.len();
            self.process_buffered()?;
        }
        Ok(())
    }

    /// Everything the connection would hand to the socket now, as `flush` would.
    fn take_output(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut iov = Vec::new();
        while self.tx_allowed() {
            let n = self.gather(&mut iov);
            for v in &iov {
                // SAFETY: the iovecs point into the queued operations' buffers, alive
                // and unchanged until advance_tx below; nothing writes them meanwhile.
                let s = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                out.extend_from_slice(s);
            }
            self.advance_tx(n);
        }
        out
    }
}

/// An endpoint opened through the public API whose connection has no socket: the
/// tests mark it connected and drive it by hand (feed, take_output) inside the
/// engine, while receives are posted through the endpoint.
struct Rig {
    ep: Endpoint,
    cq: CompletionQueue,
    eq: EventQueue,
    engine: Arc<Engine>,
    keys: Arc<KeyMap>,
    domain: Domain,
    _fabric: Fabric,
}

fn rig() -> Rig {
    let reg = Registry::new().with(crate::provider());
    let info = reg
        .getinfo(&Hints::new().provider("tcp"))
        .expect("getinfo")
        .remove(0);
    let fabric = Fabric::open(&info).unwrap();
    let domain = fabric.domain(&info).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    let engine = fabric
        .ops()
        .as_any()
        .downcast_ref::<TcpFabric>()
        .unwrap()
        .engine()
        .clone();
    let keys = domain
        .ops()
        .as_any()
        .downcast_ref::<TcpDomain>()
        .unwrap()
        .keys()
        .clone();
    let r = Rig {
        ep,
        cq,
        eq,
        engine,
        keys,
        domain,
        _fabric: fabric,
    };
    r.with(|c| c.state = ConnState::Connected);
    r
}

impl Rig {
    /// Runs `f` on the endpoint's connection.
    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> R) -> R {
        let fid = self.ep.fid().0;
        self.engine
            .with(|st, _| f(st.conns.get_mut(&fid).expect("the connection")))
    }

    fn recv_buf(&self, len: usize) -> MemoryRegion {
        self.domain.alloc(len, Access::LOCAL).unwrap()
    }

    fn post_recv(&self, mr: &MemoryRegion, context: u64) {
        self.ep.recv(mr.full(), context).unwrap();
    }

    /// A region in the connection's key table, filled with `fill`.
    fn region(&self, len: usize, fill: u8) -> (u64, Arc<HeapMemory>) {
        let mem = Arc::new(HeapMemory::from_slice(&vec![fill; len]).unwrap());
        let (key, _) = self
            .keys
            .insert(mem.clone(), Access::REMOTE, MrFlags::empty());
        (key, mem)
    }

    fn completions(&self) -> Vec<Completion> {
        let mut v = Vec::new();
        self.cq.read(&mut v, 1024).unwrap();
        v
    }

    fn event(&self) -> Option<Event> {
        self.eq.read().unwrap()
    }
}

fn bytes_of(mem: &HeapMemory) -> Vec<u8> {
    // SAFETY: the test owns the memory; no operation is writing it now.
    unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len()) }.to_vec()
}

fn frame(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; MAX_HDR_SIZE];
    let n = h.emit(&mut b);
    b.truncate(n);
    b.extend_from_slice(payload);
    b
}

fn write_hdr(op_id: u64, key: u64, addr: u64, len: usize) -> Header {
    let mut h = Header::new(Op::Write, op_id, len as u64);
    h.iov_count = 1;
    h.iovs[0] = WireIov {
        addr,
        len: len as u64,
        key,
    };
    h
}

/// Splits a byte stream back into headers (payloads skipped).
fn headers(mut b: &[u8]) -> Vec<Header> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let n = Header::peek_size(b).unwrap();
        let h = Header::parse(&b[..n]).unwrap();
        b = &b[n + h.size as usize..];
        v.push(h);
    }
    v
}

#[test]
fn message_fills_posted_receive_and_delivery_acks() {
    let r = rig();
    let buf = r.recv_buf(64);
    r.post_recv(&buf, 7);
    let mut h = Header::new(Op::Msg, 5, 5);
    h.flags = FLAG_DELIVERY | FLAG_CQ_DATA;
    h.data = 0xCAFE;
    // One byte at a time: the parser must not care how the stream is cut.
    r.with(|c| c.feed(&frame(&h, b"hello"), 1)).unwrap();
    let c = r.completions();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0].is_ok() && c[0].context == 7 && c[0].len == 5 && c[0].data == 0xCAFE);
    assert!(c[0]
        .flags
        .contains(CompFlags::RECV | CompFlags::REMOTE_CQ_DATA));
    assert_eq!(buf.to_vec(0, 5).unwrap(), b"hello");
    let out = headers(&r.with(|c| c.take_output()));
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].op, out[0].op_id, out[0].status),
        (Op::Ack, 5, Status::Ok)
    );
}

#[test]
fn unexpected_message_waits_for_a_receive_then_truncates() {
    let r = rig();
    r.with(|c| c.feed(&frame(&Header::new(Op::Msg, 1, 10), b"0123456789"), 4096))
        .unwrap();
    assert!(r.completions().is_empty());
    let small = r.recv_buf(4);
    r.post_recv(&small, 3);
    let c = r.completions();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].context, 3);
    match &c[0].status {
        Err(e) => assert_eq!(e.kind, CqErrorKind::Truncated),
        Ok(()) => panic!("a 10-byte message in a 4-byte buffer must truncate"),
    }
    assert_eq!(small.to_vec(0, 4).unwrap(), b"0123");
    assert!(
        r.with(|c| c.take_output()).is_empty(),
        "no ACK without DELIVERY"
    );
}

#[test]
fn writedata_is_acked_only_once_it_consumed_a_receive() {
    let r = rig();
    let (key, mem) = r.region(256, 0);
    let mut h = write_hdr(9, key, 16, 4);
    h.flags = FLAG_CQ_DATA;
    h.data = 0xD00D;
    r.with(|c| c.feed(&frame(&h, &[1, 2, 3, 4]), 3)).unwrap();
    assert_eq!(&bytes_of(&mem)[16..20], &[1, 2, 3, 4], "placed at once");
    assert!(
        r.with(|c| c.take_output()).is_empty(),
        "acked before a receive"
    );
    let buf = r.recv_buf(8);
    r.post_recv(&buf, 4);
    let c = r.completions();
    assert_eq!(c.len(), 1);
    assert!(c[0].is_ok() && c[0].data == 0xD00D);
    assert!(c[0].flags.contains(CompFlags::REMOTE_WRITE));
    let out = headers(&r.with(|c| c.take_output()));
    assert_eq!(
        (out[0].op, out[0].op_id, out[0].status),
        (Op::Ack, 9, Status::Ok)
    );
}

#[test]
fn refused_write_ends_the_connection_and_touches_nothing() {
    let r = rig();
    let (key, mem) = r.region(128, 0xA5);
    let buf = r.recv_buf(8);
    r.post_recv(&buf, 1);
    // A good write (acked), a write with a wrong key, then a good one that must be
    // ignored: the refusal is the last thing the target sends.
    let mut stream = frame(&write_hdr(1, key, 0, 4), &[9; 4]);
    stream.extend(frame(&write_hdr(2, key ^ 1, 0, 8), &[7; 8]));
    stream.extend(frame(&write_hdr(3, key, 64, 8), &[6; 8]));
    r.with(|c| c.feed(&stream, 7)).unwrap();
    let out = headers(&r.with(|c| c.take_output()));
    let got: Vec<_> = out.iter().map(|h| (h.op, h.op_id, h.status)).collect();
    assert_eq!(
        got,
        vec![(Op::Ack, 1, Status::Ok), (Op::Ack, 2, Status::BadKey)]
    );
    let mem = bytes_of(&mem);
    assert_eq!(&mem[..4], &[9; 4], "the write before the refusal landed");
    assert!(mem[4..].iter().all(|&b| b == 0xA5), "nothing after it did");
    assert_eq!(r.with(|c| c.state), ConnState::Closing);
    let c = r.completions();
    assert_eq!(c.len(), 1);
    assert!(matches!(&c[0].status, Err(e) if e.kind == CqErrorKind::Canceled));
    assert!(matches!(
        r.event(),
        Some(Event::Shutdown {
            reason: ShutdownReason::AccessError,
            ..
        })
    ));
    assert!(r.event().is_none(), "one Shutdown");
    let e = r
        .with(|c| c.post_refusal())
        .expect("posts fail at the call");
    assert_eq!(e.kind(), ErrorKind::NotConnected);
}

fn queue_write(conn: &mut Conn, op_id: u64, context: u64) {
    let mut h = write_hdr(op_id, 0x1234, 0, 4);
    h.size = 4;
    let then = AfterTx::Await(Pending {
        op_id,
        kind: PendKind::Write,
        context,
        flags: CompFlags::RMA | CompFlags::WRITE,
        len: 4,
        completion: true,
        hold: Body::Empty,
        remote: Vec::new(),
        commit: false,
    });
    conn.queue(TxOp::new(&h, Body::Bytes(vec![0; 4]), then), false);
}

#[test]
fn refusal_at_the_initiator_cancels_what_followed() {
    let r = rig();
    r.with(|c| queue_write(c, 1, 100));
    r.with(|c| queue_write(c, 2, 200));
    let sent = headers(&r.with(|c| c.take_output()));
    assert_eq!(sent.len(), 2);
    let mut nak = Header::new(Op::Ack, 1, 0);
    nak.status = Status::OutOfBounds;
    let f = r.with(|c| c.feed(&frame(&nak, &[]), 64)).unwrap_err();
    assert_eq!(f.reason(), ShutdownReason::AccessError);
    assert!(matches!(f, Fatal::AccessRefused(_)), "{f:?}");
    r.with(|c| c.fail(f));
    let c = r.completions();
    let kinds: Vec<_> = c
        .iter()
        .map(|c| (c.context, c.status.as_ref().unwrap_err().kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (100, CqErrorKind::RemoteAccess),
            (200, CqErrorKind::Canceled)
        ]
    );
    assert!(matches!(
        r.event(),
        Some(Event::Shutdown {
            reason: ShutdownReason::AccessError,
            ..
        })
    ));
    assert!(r.event().is_none(), "one Shutdown");
    assert_eq!(
        r.with(|c| c.post_refusal()).map(|e| e.kind()),
        Some(ErrorKind::NotConnected)
    );
}

#[test]
fn malformed_or_unexpected_input_is_a_protocol_error() {
    let r = rig();
    let f = r.with(|c| c.feed(&[0xFF; 40], 40)).unwrap_err();
    assert!(f.is_protocol());
    // A header that does not parse is the typed error's source.
    let src = std::error::Error::source(&f).expect("the wire error as source");
    assert!(src.to_string().contains("protocol error"), "{src}");
    let r = rig();
    // An ACK for an operation never sent.
    let f = r
        .with(|c| c.feed(&frame(&Header::new(Op::Ack, 77, 0), &[]), 64))
        .unwrap_err();
    assert!(f.is_protocol());
    assert!(
        matches!(
            f,
            Fatal::Protocol(super::Violation::UnknownAnswer { op_id: 77, .. })
        ),
        "{f:?}"
    );
    r.with(|c| c.fail(f));
    assert!(matches!(r.event(), Some(Event::Error { .. })));
    assert!(matches!(
        r.event(),
        Some(Event::Shutdown {
            reason: ShutdownReason::Protocol,
            ..
        })
    ));
}

#[test]
fn local_shutdown_then_posts_fail_with_shutdown() {
    let r = rig();
    let buf = r.recv_buf(8);
    r.post_recv(&buf, 1);
    r.with(|c| c.shutdown());
    assert!(matches!(
        r.event(),
        Some(Event::Shutdown {
            reason: ShutdownReason::Local,
            ..
        })
    ));
    let c = r.completions();
    assert!(matches!(&c[0].status, Err(e) if e.kind == CqErrorKind::Canceled));
    assert_eq!(
        r.with(|c| c.post_refusal()).map(|e| e.kind()),
        Some(ErrorKind::Shutdown)
    );
    r.with(|c| c.shutdown());
    assert!(r.event().is_none(), "one Shutdown");
}

#[test]
fn transmit_level_write_asks_for_no_ack_and_completes_when_sent() {
    use fabric_core::{OpFlags, RmaMsg};
    let r = rig();
    let src = r.recv_buf(16);
    src.write_at(0, b"0123456789abcdef").unwrap();
    let remote = fabric_core::RemoteIov {
        addr: 0,
        len: 8,
        key: 0x77,
    };
    let post = |flags: OpFlags, context: u64, data: u64| {
        r.ep.writemsg(
            &RmaMsg {
                iov: &[src.iov(0, 8)],
                rma_iov: &[remote],
                context,
                data,
            },
            flags,
        )
        .unwrap()
    };
    post(OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE, 1, 0);
    post(OpFlags::COMPLETION | OpFlags::INJECT_COMPLETE, 2, 0);
    // Stronger levels, no level, and CQ data keep the ACK.
    post(
        OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE | OpFlags::DELIVERY_COMPLETE,
        3,
        0,
    );
    post(OpFlags::COMPLETION, 4, 0);
    post(
        OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE | OpFlags::REMOTE_CQ_DATA,
        5,
        9,
    );
    // No socket: nothing has been handed to the wire, so nothing has completed.
    assert!(r.completions().is_empty());
    let out = headers(&r.with(|c| c.take_output()));
    let no_ack: Vec<bool> = out.iter().map(|h| h.flags & FLAG_NO_ACK != 0).collect();
    assert_eq!(no_ack, [true, true, false, false, false]);
    // Handed to the socket: the transmit-level writes complete, the others wait.
    let c = r.completions();
    let got: Vec<_> = c.iter().map(|c| (c.context, c.is_ok(), c.flags)).collect();
    let w = CompFlags::RMA | CompFlags::WRITE;
    assert_eq!(got, [(1, true, w), (2, true, w)]);
    // The ACKs of the others complete them.
    let mut acks = Vec::new();
    for id in [out[2].op_id, out[3].op_id, out[4].op_id] {
        acks.extend(frame(&Header::new(Op::Ack, id, 0), &[]));
    }
    r.with(|c| c.feed(&acks, 64)).unwrap();
    let ctx: Vec<u64> = r.completions().iter().map(|c| c.context).collect();
    assert_eq!(ctx, [3, 4, 5]);
}

#[test]
fn no_ack_write_is_placed_silently_and_refused_loudly() {
    let r = rig();
    let (key, mem) = r.region(64, 0);
    let mut h = write_hdr(1, key, 8, 4);
    h.flags = FLAG_NO_ACK;
    r.with(|c| c.feed(&frame(&h, &[1, 2, 3, 4]), 3)).unwrap();
    assert_eq!(&bytes_of(&mem)[8..12], &[1, 2, 3, 4], "placed");
    assert!(
        r.with(|c| c.take_output()).is_empty(),
        "no ACK asked, none sent"
    );
    // A refused one is answered all the same, and ends the connection.
    let mut bad = write_hdr(2, key ^ 1, 0, 4);
    bad.flags = FLAG_NO_ACK;
    r.with(|c| c.feed(&frame(&bad, &[5; 4]), 64)).unwrap();
    let out = headers(&r.with(|c| c.take_output()));
    let got: Vec<_> = out.iter().map(|h| (h.op, h.op_id, h.status)).collect();
    assert_eq!(got, [(Op::Ack, 2, Status::BadKey)]);
    assert_eq!(r.with(|c| c.state), ConnState::Closing);
    assert_eq!(
        &bytes_of(&mem)[..4],
        &[0; 4],
        "the refused write touched nothing"
    );
}

#[test]
fn no_ack_flag_only_on_plain_writes() {
    // With CQ data or COMMIT (whose ACKs mean something), or on another op: a
    // protocol error, before anything is placed.
    for (op, flags) in [
        (Op::Write, FLAG_NO_ACK | FLAG_CQ_DATA),
        (Op::Write, FLAG_NO_ACK | crate::wire::FLAG_COMMIT),
        (Op::Msg, FLAG_NO_ACK),
    ] {
        let r = rig();
        let (key, mem) = r.region(16, 0);
        let mut h = if op == Op::Write {
            write_hdr(1, key, 0, 4)
        } else {
            Header::new(Op::Msg, 1, 4)
        };
        h.flags = flags;
        let mut b = vec![0u8; MAX_HDR_SIZE];
        let n = h.emit(&mut b);
        b.truncate(n);
        b.extend_from_slice(&[3; 4]);
        let f = r.with(|c| c.feed(&b, 64)).unwrap_err();
        assert!(f.is_protocol(), "{op:?} {flags:#x}: {f:?}");
        assert_eq!(bytes_of(&mem), vec![0; 16]);
    }
}

#[test]
fn refusal_of_a_write_completed_at_transmit_ends_the_connection() {
    use fabric_core::{OpFlags, RmaMsg};
    let r = rig();
    let src = r.recv_buf(8);
    let remote = fabric_core::RemoteIov {
        addr: 0,
        len: 8,
        key: 0x77,
    };
    r.ep.writemsg(
        &RmaMsg {
            iov: &[src.iov(0, 8)],
            rma_iov: &[remote],
            context: 1,
            data: 0,
        },
        OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE,
    )
    .unwrap();
    r.with(|c| queue_write(c, 2, 200));
    let sent = headers(&r.with(|c| c.take_output()));
    assert_eq!(sent.len(), 2);
    let c = r.completions();
    assert_eq!((c.len(), c[0].context, c[0].is_ok()), (1, 1, true));
    let mut nak = Header::new(Op::Ack, sent[0].op_id, 0);
    nak.status = Status::BadKey;
    let f = r.with(|c| c.feed(&frame(&nak, &[]), 64)).unwrap_err();
    assert!(matches!(f, Fatal::AccessRefused(_)), "{f:?}");
    r.with(|c| c.fail(f));
    let c = r.completions();
    let kinds: Vec<_> = c
        .iter()
        .map(|c| (c.context, c.status.as_ref().unwrap_err().kind))
        .collect();
    assert_eq!(kinds, [(200, CqErrorKind::Canceled)]);
    assert!(matches!(
        r.event(),
        Some(Event::Shutdown {
            reason: ShutdownReason::AccessError,
            ..
        })
    ));
    // A refusal naming an operation never sent is still a protocol error.
    let r = rig();
    let mut nak = Header::new(Op::Ack, 50, 0);
    nak.status = Status::BadKey;
    let f = r.with(|c| c.feed(&frame(&nak, &[]), 64)).unwrap_err();
    assert!(f.is_protocol(), "{f:?}");
}

//! The RDM layer over real providers (tcp on 127.0.0.1, softroce on free 127.x.y.z
//! addresses, one device each): address vectors, send/recv with the source reported,
//! directed receive, tagged matching, unexpected messages and peek/claim/discard,
//! rendezvous, simultaneous connects, credits under an unexpected flood, atomics with
//! access checks and several initiators, counters.
//!
//! Each test runs once per provider; the softroce ones share a lock so that their
//! devices' progress threads do not compete on small machines.

use std::time::Duration;

use fabric_core::*;
use fabric_rdm::*;

const T: Duration = Duration::from_secs(20);

static SOFTROCE_ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Node {
    _fabric: Fabric,
    domain: Domain,
    av: AddressVector,
    ep: RdmEndpoint,
    /// Handles of every node (this one included), by index.
    to: Vec<FiAddr>,
}

fn registry() -> Registry {
    Registry::new()
        .with(fabric_tcp::provider())
        .with(fabric_softroce::provider())
}

fn node(provider: &str, attr: RdmAttr) -> Node {
    let ip = match provider {
        "softroce" => {
            let ip = fabric_softroce::free_loopback_ip().expect("a free loopback address");
            fabric_softroce::configure_device(ip, fabric_softroce::DeviceConfig::default())
                .unwrap();
            ip.to_string()
        }
        _ => "127.0.0.1".to_string(),
    };
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::TAGGED | Caps::ATOMIC)
        .provider(&format!("{provider};rxm"))
        .node(&ip)
        .service(0)
        .source(true);
    let info = fabric_rdm::getinfo(&registry(), &hints)
        .expect("rdm getinfo")
        .remove(0);
    assert_eq!(info.info().ep_type, EpType::Rdm);
    assert_eq!(info.info().provider_name, format!("{provider};rxm"));
    assert!(info.info().caps.contains(Caps::TAGGED | Caps::ATOMIC));
    let fabric = Fabric::open(info.msg()).unwrap();
    let domain = fabric.domain(info.msg()).unwrap();
    let av = AddressVector::open(&domain, AvAttr::default()).unwrap();
    let ep = RdmEndpoint::open(&domain, &info, &av, attr).unwrap();
    Node {
        _fabric: fabric,
        domain,
        av,
        ep,
        to: Vec::new(),
    }
}

/// `n` nodes, each with every name in its address vector.
fn world(provider: &str, n: usize, attr: RdmAttr) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n).map(|_| node(provider, attr)).collect();
    let names: Vec<Vec<u8>> = nodes.iter().map(|x| x.ep.name()).collect();
    for x in &mut nodes {
        x.to = names.iter().map(|nm| x.av.insert(nm).unwrap()).collect();
    }
    nodes
}

fn wait_ok(ep: &RdmEndpoint) -> RdmCompletion {
    let c = ep.wait(T).expect("a completion");
    assert!(c.status.is_ok(), "{c:?}");
    c
}

/// Peeks (in `mode`) until a message with `tag` is there (FI_PEEK finds only what has
/// arrived), for at most `T`.
fn peek_until(ep: &RdmEndpoint, tag: u64, mode: PeekMode) -> fabric_rdm::Peeked {
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(p) = ep.tpeek(None, tag, 0, mode).unwrap() {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tag {tag:#x} never arrived"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn for_each_provider(f: impl Fn(&str)) {
    f("tcp");
    let _g = SOFTROCE_ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    f("softroce");
}

#[test]
fn av_insert_lookup_remove_and_bad_names() {
    let n = node("tcp", RdmAttr::default());
    let name = n.ep.name();
    let a = n.av.insert(&name).unwrap();
    assert_eq!(
        n.av.insert(&name).unwrap(),
        a,
        "the same name, the same handle"
    );
    assert_eq!(n.av.lookup(a).unwrap(), name);
    assert_eq!(n.av.reverse_lookup(&name), Some(a));
    assert!(n.av.insert(b"garbage").is_err());
    n.av.remove(a).unwrap();
    assert!(n.av.lookup(a).is_none());
    assert!(n.av.remove(a).is_err());
    let mr = n.domain.alloc(8, Access::LOCAL).unwrap();
    let e = n.ep.send_to(mr.iov(0, 8), a, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn send_recv_source_directed_and_data() {
    for_each_provider(|p| {
        let w = world(p, 3, RdmAttr::default());
        let (a, b, c) = (&w[0], &w[1], &w[2]);
        let rb = b.domain.alloc(4096, Access::LOCAL).unwrap();
        // A directed receive for C's message, posted first, and an open one.
        b.ep.recv_from(rb.iov(0, 64), b.to[2], 10).unwrap();
        b.ep.recv(rb.iov(64, 64), 11).unwrap();
        let ma = a.domain.alloc(64, Access::LOCAL).unwrap();
        ma.write_at(0, b"from a").unwrap();
        a.ep.senddata_to(ma.iov(0, 6), 0xabcd, a.to[1], 1).unwrap();
        let sent = wait_ok(&a.ep);
        assert_eq!((sent.context, sent.kind), (1, OpKind::Send));
        // A's message skips the receive directed at C.
        let got = wait_ok(&b.ep);
        assert_eq!(got.context, 11, "{p}");
        assert_eq!(got.src, Some(b.to[0]), "{p}: FI_SOURCE names A");
        assert_eq!(got.data, Some(0xabcd));
        assert_eq!(rb.to_vec(64, 6).unwrap(), b"from a");
        let mc = c.domain.alloc(64, Access::LOCAL).unwrap();
        mc.write_at(0, b"from c!").unwrap();
        c.ep.send_to(mc.iov(0, 7), c.to[1], 2).unwrap();
        wait_ok(&c.ep);
        let got = wait_ok(&b.ep);
        assert_eq!(
            (got.context, got.len, got.src),
            (10, 7, Some(b.to[2])),
            "{p}"
        );
        assert_eq!(got.data, None);
        assert_eq!(rb.to_vec(0, 7).unwrap(), b"from c!");
        // A sender missing from the receiver's AV is reported as unknown.
        b.av.remove(b.to[0]).unwrap();
        b.ep.recv(rb.iov(0, 64), 12).unwrap();
        a.ep.inject_to(ma.iov(0, 6), a.to[1]).unwrap();
        let got = wait_ok(&b.ep);
        assert_eq!((got.context, got.src), (12, None), "{p}");
        // A message to oneself.
        let ms = a.domain.alloc(64, Access::LOCAL).unwrap();
        a.ep.recv(ms.iov(32, 32), 20).unwrap();
        ms.write_at(0, b"self").unwrap();
        a.ep.send_to(ms.iov(0, 4), a.to[0], 21).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let c = wait_ok(&a.ep);
            seen.push((c.context, c.src));
        }
        seen.sort();
        assert_eq!(seen, [(20, Some(a.to[0])), (21, None)], "{p}");
        assert_eq!(ms.to_vec(32, 4).unwrap(), b"self");
        // Truncation is an error completion with the bytes that fit.
        b.ep.recv(rb.iov(0, 4), 30).unwrap();
        c.ep.send_to(mc.iov(0, 7), c.to[1], 31).unwrap();
        let got = b.ep.wait(T).unwrap();
        assert_eq!(got.len, 4);
        assert_eq!(got.status.unwrap_err().kind, CqErrorKind::Truncated, "{p}");
    });
}

/// `read_one` and `poll_wait` (the busy poller's calls): nothing to read is None and a
/// timeout, not a block; expected and unexpected eager messages (the receive path that
/// matches with the connection's name borrowed, and the queued one) complete with the
/// right context, tag, source, data, length and bytes; a truncated eager message is an
/// error completion through the same path.
#[test]
fn read_one_and_poll_wait_deliver_expected_and_unexpected() {
    for_each_provider(|p| {
        let w = world(p, 2, RdmAttr::default());
        let (a, b) = (&w[0], &w[1]);
        assert!(
            b.ep.read_one().is_none(),
            "{p}: nothing posted, nothing read"
        );
        let e = b.ep.poll_wait(Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{p}");
        let rb = b.domain.alloc(256, Access::LOCAL).unwrap();
        let ma = a.domain.alloc(256, Access::LOCAL).unwrap();
        ma.write_at(0, &pattern(200, 3)).unwrap();
        // Expected: the receive is posted before the message leaves.
        b.ep.trecv(rb.iov(0, 100), Some(b.to[0]), 0x77, 0, 1)
            .unwrap();
        a.ep.tsenddata(ma.iov(0, 40), 0xfeed, a.to[1], 0x77, 2)
            .unwrap();
        let sent = a.ep.poll_wait(T).unwrap();
        assert_eq!(
            (sent.context, sent.kind, sent.len),
            (2, OpKind::TaggedSend, 40)
        );
        let got = b.ep.poll_wait(T).unwrap();
        assert!(got.status.is_ok(), "{p}: {got:?}");
        assert_eq!(
            (got.context, got.kind, got.len, got.tag, got.src, got.data),
            (1, OpKind::TaggedRecv, 40, 0x77, Some(b.to[0]), Some(0xfeed)),
            "{p}"
        );
        assert_eq!(rb.to_vec(0, 40).unwrap(), pattern(200, 3)[..40], "{p}");
        // Unexpected: the message arrives (peeked) before its receive is posted.
        a.ep.tsend(ma.iov(40, 60), a.to[1], 0x78, 3).unwrap();
        a.ep.poll_wait(T).unwrap();
        peek_until(&b.ep, 0x78, PeekMode::Peek);
        b.ep.trecv(rb.iov(100, 100), None, 0x78, 0, 4).unwrap();
        let got = b.ep.poll_wait(T).unwrap();
        assert_eq!(
            (got.context, got.len, got.tag, got.src, got.data),
            (4, 60, 0x78, Some(b.to[0]), None),
            "{p}"
        );
        assert_eq!(rb.to_vec(100, 60).unwrap(), pattern(200, 3)[40..100], "{p}");
        // Truncated on the expected path: the bytes that fit, an error completion.
        b.ep.trecv(rb.iov(0, 8), None, 0x79, 0, 5).unwrap();
        a.ep.tsend(ma.iov(100, 20), a.to[1], 0x79, 6).unwrap();
        a.ep.poll_wait(T).unwrap();
        let got = b.ep.poll_wait(T).unwrap();
        assert_eq!((got.context, got.len), (5, 8), "{p}");
        assert_eq!(got.status.unwrap_err().kind, CqErrorKind::Truncated, "{p}");
        assert_eq!(rb.to_vec(0, 8).unwrap(), pattern(200, 3)[100..108], "{p}");
        assert!(b.ep.read_one().is_none(), "{p}: nothing more");
    });
}

/// The progress thread takes over once the application stops calling: B busy-polls
/// (so its thread stays away), then goes quiet with a receive posted; A's rendezvous
/// send to B needs B's side to read A's buffer and answer, which only B's thread can
/// do now. A's send must complete, and B finds the data when it comes back.
#[test]
fn background_progress_resumes_after_a_busy_poller_stops() {
    for_each_provider(|p| {
        let attr = RdmAttr::default().eager_limit(1024);
        let w = world(p, 2, attr);
        let (a, b) = (&w[0], &w[1]);
        let len = 256 << 10;
        let mb = b.domain.alloc(len, Access::LOCAL).unwrap();
        let ma = a
            .domain
            .alloc(len, Access::LOCAL | Access::REMOTE_READ)
            .unwrap();
        ma.write_at(0, &pattern(len, 9)).unwrap();
        // Open the connection and keep B "present" for a while.
        let m8 = a.domain.alloc(8, Access::LOCAL).unwrap();
        b.ep.trecv(mb.iov(0, 8), None, 1, 0, 1).unwrap();
        a.ep.tsend(m8.iov(0, 8), a.to[1], 1, 2).unwrap();
        a.ep.poll_wait(T).unwrap();
        assert_eq!(b.ep.poll_wait(T).unwrap().context, 1, "{p}");
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_millis(50) {
            assert!(b.ep.read_one().is_none());
        }
        // B goes quiet with a receive posted; A sends by rendezvous.
        b.ep.trecv(mb.iov(0, len), None, 2, 0, 3).unwrap();
        a.ep.tsend(ma.iov(0, len), a.to[1], 2, 4).unwrap();
        let sent =
            a.ep.wait(T)
                .expect("A's rendezvous send completes without B polling");
        assert!(sent.status.is_ok(), "{p}: {sent:?}");
        assert_eq!(sent.context, 4);
        let got = b.ep.poll_wait(T).unwrap();
        assert_eq!((got.context, got.len), (3, len), "{p}");
        assert!(got.status.is_ok(), "{p}: {got:?}");
        assert_eq!(mb.to_vec(0, len).unwrap(), pattern(len, 9), "{p}");
    });
}

#[test]
fn tagged_matching_unexpected_peek_claim_discard() {
    for_each_provider(|p| {
        let w = world(p, 2, RdmAttr::default());
        let (a, b) = (&w[0], &w[1]);
        let ma = a.domain.alloc(4096, Access::LOCAL).unwrap();
        let mb = b.domain.alloc(4096, Access::LOCAL).unwrap();
        let send = |tag: u64, byte: u8, ctx: u64| {
            ma.fill(ctx as usize * 8, 8, byte).unwrap();
            a.ep.tsend(ma.iov(ctx as usize * 8, 8), a.to[1], tag, ctx)
                .unwrap();
            wait_ok(&a.ep);
        };
        // Posted first: matching in posting order, with ignore masks.
        b.ep.trecv(mb.iov(0, 8), None, 0x100, 0xff, 1).unwrap(); // 0x1XX
        b.ep.trecv(mb.iov(8, 8), None, 0x105, 0, 2).unwrap(); // exactly 0x105
        b.ep.trecv(mb.iov(16, 8), Some(b.to[0]), 0x105, 0, 3)
            .unwrap();
        send(0x105, 0xa1, 1); // the first receive (posted first) takes it
        send(0x105, 0xa2, 2);
        send(0x1ff, 0xa3, 3); // matches none of the remaining (both want 0x105)
        send(0x105, 0xa4, 4);
        let got: Vec<(u64, u64)> = (0..3)
            .map(|_| {
                let c = wait_ok(&b.ep);
                (c.context, c.tag)
            })
            .collect();
        assert_eq!(got, [(1, 0x105), (2, 0x105), (3, 0x105)], "{p}");
        assert_eq!(mb.to_vec(0, 1).unwrap(), [0xa1]);
        assert_eq!(mb.to_vec(8, 1).unwrap(), [0xa2]);
        assert_eq!(mb.to_vec(16, 1).unwrap(), [0xa4]);
        // 0x1ff waits unexpected; peek sees it, claim reserves it.
        let pk =
            b.ep.tpeek(None, 0x1ff, 0, PeekMode::Peek)
                .unwrap()
                .expect("queued");
        assert_eq!((pk.len, pk.tag, pk.src), (8, 0x1ff, Some(b.to[0])), "{p}");
        assert!(b
            .ep
            .tpeek(None, 0x2ff, 0, PeekMode::Peek)
            .unwrap()
            .is_none());
        let cl =
            b.ep.tpeek(None, 0x100, 0xff, PeekMode::Claim)
                .unwrap()
                .unwrap();
        // Claimed: a matching receive no longer gets it.
        assert!(b
            .ep
            .tpeek(None, 0x1ff, 0, PeekMode::Peek)
            .unwrap()
            .is_none());
        b.ep.trecv_claimed(mb.iov(24, 8), cl.claim.unwrap(), 4)
            .unwrap();
        let c = wait_ok(&b.ep);
        assert_eq!((c.context, c.tag, c.src), (4, 0x1ff, Some(b.to[0])));
        assert_eq!(mb.to_vec(24, 1).unwrap(), [0xa3]);
        // Unexpected messages are matched in arrival order by later receives.
        send(0x7, 0xb1, 5);
        send(0x7, 0xb2, 6);
        send(0x8, 0xb3, 7);
        // Discard drops the first 0x7.
        // The sends may still be on their way: peek until the first 0x7 is there.
        let d = peek_until(&b.ep, 0x7, PeekMode::Discard);
        assert_eq!(d.tag, 0x7);
        b.ep.trecv(mb.iov(32, 8), None, 0x0, 0xf, 8).unwrap(); // any tag < 16
        b.ep.trecv(mb.iov(40, 8), None, 0x0, 0xf, 9).unwrap();
        let c1 = wait_ok(&b.ep);
        let c2 = wait_ok(&b.ep);
        assert_eq!(
            (c1.context, c1.tag, c2.context, c2.tag),
            (8, 0x7, 9, 0x8),
            "{p}"
        );
        assert_eq!(mb.to_vec(32, 1).unwrap(), [0xb2]);
        assert_eq!(mb.to_vec(40, 1).unwrap(), [0xb3]);
        // Untagged and tagged messages do not match each other.
        b.ep.recv(mb.iov(48, 8), 10).unwrap();
        a.ep.tsend(ma.iov(0, 8), a.to[1], 0, 11).unwrap();
        wait_ok(&a.ep);
        assert!(b.ep.wait(Duration::from_millis(300)).is_err(), "{p}");
        b.ep.trecv(mb.iov(56, 8), None, 0, 0, 12).unwrap();
        assert_eq!(wait_ok(&b.ep).context, 12);
    });
}

#[test]
fn rendezvous_large_tagged_and_eager_boundary() {
    for_each_provider(|p| {
        let attr = RdmAttr::default().eager_limit(4096);
        let w = world(p, 2, attr);
        let (a, b) = (&w[0], &w[1]);
        let big = 4 << 20;
        let ma = a
            .domain
            .alloc(big, Access::LOCAL | Access::REMOTE_READ)
            .unwrap();
        let mb = b.domain.alloc(big, Access::LOCAL).unwrap();
        for (i, len) in [4095usize, 4096, 4097, 100_000, big]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, i as u8);
            ma.write_at(0, &data).unwrap();
            mb.fill(0, len, 0).unwrap();
            // Alternate: receive posted first, or the request waits unexpected.
            if i % 2 == 0 {
                b.ep.trecv(mb.iov(0, big), None, 40 + i as u64, 0, 1)
                    .unwrap();
            }
            a.ep.tsenddata(ma.iov(0, len), 77, a.to[1], 40 + i as u64, 2)
                .unwrap();
            if i % 2 == 1 {
                std::thread::sleep(Duration::from_millis(20));
                b.ep.trecv(mb.iov(0, big), None, 40 + i as u64, 0, 1)
                    .unwrap();
            }
            let r = wait_ok(&b.ep);
            assert_eq!(
                (r.len, r.data, r.src),
                (len, Some(77), Some(b.to[0])),
                "{p} {len}"
            );
            assert!(
                mb.to_vec(0, len).unwrap() == data,
                "{p}: {len} bytes differ"
            );
            let s = wait_ok(&a.ep);
            assert_eq!((s.context, s.kind, s.len), (2, OpKind::TaggedSend, len));
        }
        // A large message into a small buffer: truncated at both ends.
        b.ep.trecv(mb.iov(0, 10_000), None, 99, 0, 3).unwrap();
        a.ep.tsend(ma.iov(0, 20_000), a.to[1], 99, 4).unwrap();
        let r = b.ep.wait(T).unwrap();
        assert_eq!(r.status.unwrap_err().kind, CqErrorKind::Truncated, "{p}");
        assert_eq!(r.len, 10_000);
        let s = a.ep.wait(T).unwrap();
        assert_eq!(s.status.unwrap_err().kind, CqErrorKind::Truncated, "{p}");
        // Without REMOTE_READ a large send is refused at the call.
        let plain = a.domain.alloc(8192, Access::LOCAL).unwrap();
        let e = a.ep.send_to(plain.iov(0, 8192), a.to[1], 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
    });
}

#[test]
fn simultaneous_connects_make_one_connection_per_pair() {
    for_each_provider(|p| {
        let n = 4;
        let w = world(p, n, RdmAttr::default());
        // Every node sends to every other at once, before any connection exists.
        let bufs: Vec<MemoryRegion> = w
            .iter()
            .map(|x| x.domain.alloc(64 * n, Access::LOCAL).unwrap())
            .collect();
        for (i, x) in w.iter().enumerate() {
            for j in 0..n {
                if j != i {
                    x.ep.trecv(
                        bufs[i].iov(j * 64, 64),
                        Some(x.to[j]),
                        j as u64,
                        0,
                        j as u64,
                    )
                    .unwrap();
                }
            }
        }
        std::thread::scope(|s| {
            for (i, x) in w.iter().enumerate() {
                let b = &bufs[i];
                s.spawn(move || {
                    for j in 0..n {
                        if j != i {
                            b.fill(i * 64, 64, i as u8).unwrap();
                            x.ep.tsend(b.iov(i * 64, 64), x.to[j], i as u64, 100 + j as u64)
                                .unwrap();
                        }
                    }
                });
            }
        });
        for (i, x) in w.iter().enumerate() {
            let mut got = 0;
            for _ in 0..2 * (n - 1) {
                let c = wait_ok(&x.ep);
                if c.kind == OpKind::TaggedRecv {
                    assert_eq!(c.src, Some(x.to[c.tag as usize]));
                    got += 1;
                }
            }
            assert_eq!(got, n - 1, "{p}: node {i}");
            for j in (0..n).filter(|&j| j != i) {
                assert_eq!(bufs[i].to_vec(j * 64, 64).unwrap(), vec![j as u8; 64]);
            }
        }
        // One connection per pair survives (n - 1 per node), after the losers close.
        let deadline = std::time::Instant::now() + T;
        while w.iter().any(|x| x.ep.connections() != n - 1) {
            assert!(
                std::time::Instant::now() < deadline,
                "{p}: {:?}",
                w.iter().map(|x| x.ep.connections()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

#[test]
fn unexpected_flood_is_bounded_by_credits_and_loses_nothing() {
    for_each_provider(|p| {
        let attr = RdmAttr::default();
        let w = world(p, 2, attr);
        let (a, b) = (&w[0], &w[1]);
        let count = 300usize;
        let ma = a.domain.alloc(8 * count, Access::LOCAL).unwrap();
        for i in 0..count {
            ma.write_at(i * 8, &(i as u64).to_le_bytes()).unwrap();
            a.ep.tsend(ma.iov(i * 8, 8), a.to[1], i as u64, i as u64)
                .unwrap();
        }
        // B posts nothing for a while: A cannot have more than rx_buffers delivered.
        std::thread::sleep(Duration::from_millis(300));
        let mut done = Vec::new();
        a.ep.read(&mut done, usize::MAX);
        assert!(
            done.len() <= attr.rx_buffers,
            "{p}: {} sends completed with no receive posted",
            done.len()
        );
        let mb = b.domain.alloc(8 * count, Access::LOCAL).unwrap();
        for i in 0..count {
            b.ep.trecv(mb.iov(i * 8, 8), None, 0, u64::MAX, i as u64)
                .unwrap();
        }
        for _ in 0..count {
            wait_ok(&b.ep);
        }
        for i in 0..count {
            let v = u64::from_le_bytes(mb.to_vec(i * 8, 8).unwrap().try_into().unwrap());
            assert_eq!(v, i as u64, "{p}: messages in order");
        }
        for _ in done.len()..count {
            wait_ok(&a.ep);
        }
    });
}

fn le(vals: &[u64], size: usize) -> Vec<u8> {
    vals.iter()
        .flat_map(|v| v.to_le_bytes()[..size].to_vec())
        .collect()
}

#[test]
fn atomics_every_op_and_type_with_access_checks() {
    for_each_provider(|p| {
        let w = world(p, 2, RdmAttr::default());
        let (a, b) = (&w[0], &w[1]);
        let target = b.domain.alloc(64, Access::LOCAL | Access::REMOTE).unwrap();
        b.ep.bind_mr(&target).unwrap();
        let remote = target.remote();
        let res = a.domain.alloc(64, Access::LOCAL).unwrap();
        // Every op but compare-swap (the compare form, checked elsewhere).
        let ops: Vec<AtomicOp> = AtomicOp::ALL
            .into_iter()
            .filter(|&op| op != AtomicOp::Cswap)
            .collect();
        let mut checked = 0;
        for dt in Datatype::ALL {
            let s = dt.size();
            let enc = |x: f64| -> Vec<u8> {
                match dt {
                    Datatype::U32 => (x as u32).to_le_bytes().to_vec(),
                    Datatype::I32 => (x as i32).to_le_bytes().to_vec(),
                    Datatype::U64 => (x as u64).to_le_bytes().to_vec(),
                    Datatype::I64 => (x as i64).to_le_bytes().to_vec(),
                    Datatype::F32 => (x as f32).to_le_bytes().to_vec(),
                    Datatype::F64 => x.to_le_bytes().to_vec(),
                    _ => unreachable!(),
                }
            };
            for &op in &ops {
                if atomic_valid(op, dt, AtomicForm::Fetch).is_none() {
                    continue;
                }
                let (t0, o) = (12.0, 10.0);
                let want = match op {
                    AtomicOp::Min => 10.0,
                    AtomicOp::Max => 12.0,
                    AtomicOp::Sum => 22.0,
                    AtomicOp::Bor => 14.0,
                    AtomicOp::Band => 8.0,
                    AtomicOp::Bxor => 6.0,
                    AtomicOp::Read => 12.0,
                    AtomicOp::Write => 10.0,
                    _ => unreachable!(),
                };
                target.write_at(0, &enc(t0)).unwrap();
                a.ep.fetch_atomic(op, dt, &enc(o), res.iov(0, s), a.to[1], remote.iov(0, s), 1)
                    .unwrap();
                let c = wait_ok(&a.ep);
                assert_eq!((c.kind, c.len), (OpKind::Atomic, s));
                assert_eq!(
                    res.to_vec(0, s).unwrap(),
                    enc(t0),
                    "{p} {op:?} {dt:?} fetched"
                );
                assert_eq!(target.to_vec(0, s).unwrap(), enc(want), "{p} {op:?} {dt:?}");
                checked += 1;
                if op != AtomicOp::Read {
                    target.write_at(0, &enc(t0)).unwrap();
                    a.ep.atomic(op, dt, &enc(o), a.to[1], remote.iov(0, s), 2)
                        .unwrap();
                    wait_ok(&a.ep);
                    assert_eq!(target.to_vec(0, s).unwrap(), enc(want), "{p} {op:?} {dt:?}");
                }
            }
            if atomic_valid(AtomicOp::Cswap, dt, AtomicForm::Compare).is_some() {
                target.write_at(0, &enc(5.0)).unwrap();
                a.ep.compare_atomic(
                    dt,
                    &enc(9.0),
                    &enc(4.0),
                    res.iov(0, s),
                    a.to[1],
                    remote.iov(0, s),
                    3,
                )
                .unwrap();
                wait_ok(&a.ep);
                assert_eq!(
                    target.to_vec(0, s).unwrap(),
                    enc(5.0),
                    "{p} cswap miss {dt:?}"
                );
                a.ep.compare_atomic(
                    dt,
                    &enc(9.0),
                    &enc(5.0),
                    res.iov(0, s),
                    a.to[1],
                    remote.iov(0, s),
                    3,
                )
                .unwrap();
                wait_ok(&a.ep);
                assert_eq!(
                    target.to_vec(0, s).unwrap(),
                    enc(9.0),
                    "{p} cswap hit {dt:?}"
                );
                assert_eq!(res.to_vec(0, s).unwrap(), enc(5.0));
                checked += 1;
            }
        }
        assert!(checked >= 40, "{checked}");
        // Several elements in one call.
        target.write_at(0, &le(&[1, 2, 3, 4], 8)).unwrap();
        a.ep.atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &le(&[10, 20, 30, 40], 8),
            a.to[1],
            remote.iov(0, 32),
            4,
        )
        .unwrap();
        wait_ok(&a.ep);
        assert_eq!(target.to_vec(0, 32).unwrap(), le(&[11, 22, 33, 44], 8));
        // Refusals: bounds, key, rights; memory untouched.
        let before = target.to_vec(0, 64).unwrap();
        let one = le(&[1], 8);
        for (r, what) in [
            (remote.iov(60, 8), "bounds"),
            (
                RemoteIov {
                    key: remote.key ^ 0x5a5a,
                    ..remote.iov(0, 8)
                },
                "key",
            ),
        ] {
            a.ep.atomic(AtomicOp::Sum, Datatype::U64, &one, a.to[1], r, 5)
                .unwrap();
            let c = a.ep.wait(T).unwrap();
            assert_eq!(
                c.status.unwrap_err().kind,
                CqErrorKind::RemoteAccess,
                "{p} {what}"
            );
        }
        let ro = b
            .domain
            .alloc(8, Access::LOCAL | Access::REMOTE_READ)
            .unwrap();
        b.ep.bind_mr(&ro).unwrap();
        a.ep.atomic(
            AtomicOp::Sum,
            Datatype::U64,
            &one,
            a.to[1],
            ro.remote().iov(0, 8),
            6,
        )
        .unwrap();
        let c = a.ep.wait(T).unwrap();
        assert_eq!(
            c.status.unwrap_err().kind,
            CqErrorKind::RemoteAccess,
            "{p} rights"
        );
        assert_eq!(target.to_vec(0, 64).unwrap(), before);
        assert_eq!(ro.to_vec(0, 8).unwrap(), [0; 8]);
        // Invalid combinations are refused at the call.
        assert!(a
            .ep
            .atomic(
                AtomicOp::Bxor,
                Datatype::F64,
                &one,
                a.to[1],
                remote.iov(0, 8),
                7
            )
            .is_err());
        assert!(a
            .ep
            .atomic(
                AtomicOp::Sum,
                Datatype::U64,
                &one[..4],
                a.to[1],
                remote.iov(0, 4),
                7
            )
            .is_err());
    });
}

#[test]
fn fetch_add_from_four_initiators_is_exact_and_counters_count() {
    for_each_provider(|p| {
        let n = 5;
        let w = world(p, n, RdmAttr::default());
        let target = w[0]
            .domain
            .alloc(8, Access::LOCAL | Access::REMOTE)
            .unwrap();
        w[0].ep.bind_mr(&target).unwrap();
        let remote = target.remote();
        let per = 1000u64;
        std::thread::scope(|s| {
            for x in &w[1..] {
                s.spawn(move || {
                    let cntr = Counter::new();
                    x.ep.bind_cntr(&cntr, CntrEvents::READ);
                    let res = x.domain.alloc(8, Access::LOCAL).unwrap();
                    let mut seen = std::collections::HashSet::new();
                    for i in 0..per {
                        x.ep.fetch_atomic(
                            AtomicOp::Sum,
                            Datatype::U64,
                            &1u64.to_le_bytes(),
                            res.iov(0, 8),
                            x.to[0],
                            remote.iov(0, 8),
                            i,
                        )
                        .unwrap();
                        wait_ok(&x.ep);
                        let old = u64::from_le_bytes(res.to_vec(0, 8).unwrap().try_into().unwrap());
                        assert!(seen.insert(old), "value {old} fetched twice");
                    }
                    assert_eq!(cntr.wait(per, T).unwrap(), per);
                    assert_eq!(cntr.read_err(), 0);
                });
            }
        });
        let v = u64::from_le_bytes(target.to_vec(0, 8).unwrap().try_into().unwrap());
        assert_eq!(v, per * (n as u64 - 1), "{p}");
        // Counters per class: sends, receives; errors counted apart.
        let (a, b) = (&w[1], &w[2]);
        let (cs, cr) = (Counter::new(), Counter::new());
        a.ep.bind_cntr(&cs, CntrEvents::SEND);
        b.ep.bind_cntr(&cr, CntrEvents::RECV);
        let m = a.domain.alloc(64, Access::LOCAL).unwrap();
        let mb = b.domain.alloc(64, Access::LOCAL).unwrap();
        for i in 0..10 {
            b.ep.recv(mb.iov(0, 64), i).unwrap();
            a.ep.send_to(m.iov(0, 8), a.to[2], i).unwrap();
        }
        assert_eq!(cs.wait(10, T).unwrap(), 10, "{p}");
        assert_eq!(cr.wait(10, T).unwrap(), 10, "{p}");
        b.ep.recv(mb.iov(0, 4), 99).unwrap();
        a.ep.send_to(m.iov(0, 8), a.to[2], 99).unwrap();
        let deadline = std::time::Instant::now() + T;
        while cr.read_err() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{p}: no truncation counted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!((cr.read(), cr.read_err()), (10, 1), "{p}");
    });
}

#[test]
fn idle_connections_close_and_reopen() {
    for_each_provider(|p| {
        let attr = RdmAttr::default().idle_timeout(Duration::from_millis(300));
        let w = world(p, 2, attr);
        let (a, b) = (&w[0], &w[1]);
        let m = a.domain.alloc(8, Access::LOCAL).unwrap();
        let mb = b.domain.alloc(8, Access::LOCAL).unwrap();
        for round in 0..2 {
            b.ep.recv(mb.iov(0, 8), round).unwrap();
            m.write_at(0, &[round as u8; 8]).unwrap();
            a.ep.send_to(m.iov(0, 8), a.to[1], round).unwrap();
            wait_ok(&a.ep);
            assert_eq!(wait_ok(&b.ep).context, round);
            assert_eq!(mb.to_vec(0, 8).unwrap(), [round as u8; 8]);
            assert_eq!(a.ep.connections(), 1);
            let deadline = std::time::Instant::now() + T;
            while a.ep.connections() + b.ep.connections() != 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{p}: idle connection stays"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
}

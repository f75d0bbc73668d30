//! The softroce provider through the public fabric API over loopback UDP, with real
//! devices: delivery under seeded faults, a vanishing peer, COMMIT into a pmem file
//! and its refusal.
//!
//! Every test uses its own pair of free loopback addresses
//! ([`fabric_softroce::free_loopback_ip`]: random 127.x.y.z whose UDP 4791 nothing
//! holds, so no test depends on owning 127.0.0.1:4791), one device each, configured
//! with [`fabric_softroce::configure_device`], so tests running in parallel threads do
//! not share faults or race on the environment.
//!
//! The fault test moves 10,000 messages, 1 GiB of RMA writes and 1 GiB of RMA reads
//! (1 MiB transfers) in release builds (`cargo test --release`, as CI runs it); debug
//! builds (`cfg!(debug_assertions)`) scale that down to 1,000 messages and 32 MiB each
//! way, since unoptimized ICRC and copies are about 20 times slower.
//!
//! The lossy link gives its QPs a transport retry count of 20 instead of the usual 7
//! ([`DeviceConfig::retry_cnt`]; a local setting that changes no packet). At 10% drop,
//! 1% corruption and 5% reordering per frame, a retransmission of a 1 MiB READ makes
//! no progress about a quarter of the time (the request, or the first response, is lost
//! or overtaken), and the run recovers some 40,000 times: with 7 retries, eight
//! fruitless attempts in a row happen about twice per run and end the READ with
//! `RetryExceeded`, correctly reported but failing the test. With 20 the chance per
//! run is below one in a million. The vanishing-peer test keeps the default, 7.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::fault::FaultConfig;
use fabric_softroce::{configure_device, device_stats, free_loopback_ip, DeviceConfig};

/// Two free loopback addresses, server and client, whose devices get the default
/// configuration (not the environment's) unless the test configures them otherwise.
fn addrs() -> (Ipv4Addr, Ipv4Addr) {
    let s = free_loopback_ip().expect("a free loopback address");
    let c = loop {
        let c = free_loopback_ip().expect("a free loopback address");
        if c != s {
            break c;
        }
    };
    for ip in [s, c] {
        configure_device(ip, DeviceConfig::default()).unwrap();
    }
    (s, c)
}

struct Side {
    _fabric: Fabric,
    domain: Domain,
    eq: EventQueue,
    cq: CompletionQueue,
    ep: Endpoint,
}

struct Pair {
    server: Side,
    client: Side,
    _pep: PassiveEndpoint,
}

fn registry() -> Registry {
    Registry::new().with(fabric_softroce::provider())
}

fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA)
        .ep_type(EpType::Msg)
        .provider("softroce")
}

fn wait_event(mine: &EventQueue, other: &CompletionQueue, t: Duration) -> Event {
    let deadline = Instant::now() + t;
    loop {
        if let Some(ev) = mine.read().expect("eq read") {
            return ev;
        }
        let _ = other.try_next();
        assert!(Instant::now() < deadline, "no event within {t:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Connects a client on `client_ip` to a server on `server_ip`; the server sends
/// `accept_data`.
fn pair(
    server_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
    accept_data: &[u8],
    server_mrs: impl FnOnce(&Domain) -> Vec<MemoryRegion>,
) -> (Pair, Vec<MemoryRegion>) {
    let reg = registry();
    let t = Duration::from_secs(10);
    let sinfo = reg
        .getinfo(&hints().source(true).node(&server_ip.to_string()).service(0))
        .expect("server getinfo")
        .remove(0);
    let sfab = Fabric::open(&sinfo).unwrap();
    let sdom = sfab.domain(&sinfo).unwrap();
    let seq = sfab.eq(EqAttr::default()).unwrap();
    let scq = sdom.cq(CqAttr::default()).unwrap();
    let pep = sfab.passive_endpoint(&sinfo, &seq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    let mrs = server_mrs(&sdom);
    let mut cinfo = reg
        .getinfo(&hints().node(&server_ip.to_string()).service(port))
        .expect("client getinfo")
        .remove(0);
    cinfo.src_addr = Some(Address::Inet(SocketAddr::new(client_ip.into(), 0)));
    let cfab = Fabric::open(&cinfo).unwrap();
    let cdom = cfab.domain(&cinfo).unwrap();
    let ceq = cfab.eq(EqAttr::default()).unwrap();
    let ccq = cdom.cq(CqAttr::default()).unwrap();
    let cep = cdom
        .endpoint(&cinfo, EndpointConfig::new(&ccq, &ceq))
        .unwrap();
    cep.connect(b"hello").unwrap();
    let req = match wait_event(&seq, &ccq, t) {
        Event::ConnRequest(r) => r,
        other => panic!("server: {other:?}"),
    };
    let sep = sdom
        .endpoint(&req.info, EndpointConfig::new(&scq, &seq))
        .unwrap();
    sep.accept(accept_data).unwrap();
    match wait_event(&ceq, &scq, t) {
        Event::Connected { .. } => {}
        other => panic!("client: {other:?}"),
    }
    match wait_event(&seq, &ccq, t) {
        Event::Connected { .. } => {}
        other => panic!("server: {other:?}"),
    }
    (
        Pair {
            server: Side {
                _fabric: sfab,
                domain: sdom,
                eq: seq,
                cq: scq,
                ep: sep,
            },
            client: Side {
                _fabric: cfab,
                domain: cdom,
                eq: ceq,
                cq: ccq,
                ep: cep,
            },
            _pep: pep,
        },
        mrs,
    )
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads completions from both queues until `n` arrived on `cq`, or the deadline.
fn collect(
    p: &Pair,
    mine: &CompletionQueue,
    n: usize,
    deadline: Instant,
    what: &str,
) -> Vec<Completion> {
    let mut got = Vec::new();
    let mut v = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} completions before the deadline",
            got.len()
        );
        v.clear();
        mine.read(&mut v, 64).unwrap();
        got.append(&mut v);
        let other = if std::ptr::eq(mine, &p.client.cq) {
            &p.server.cq
        } else {
            &p.client.cq
        };
        other.read(&mut v, 64).unwrap();
        assert!(
            v.is_empty(),
            "{what}: unexpected completion on the other side: {v:?}"
        );
    }
    got
}

/// Transport retry count of the lossy link's QPs (see the module docs).
const LOSSY_RETRY_CNT: u8 = 20;

fn lossy() -> FaultConfig {
    FaultConfig {
        drop: 0.10,
        duplicate: 0.05,
        reorder: 0.05,
        corrupt: 0.01,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        reorder_delay: Duration::from_micros(200),
    }
}

#[test]
fn lossy_link_delivers_messages_writes_and_reads_verified() {
    let (sip, cip) = addrs();
    configure_device(
        sip,
        DeviceConfig {
            faults: Some((lossy(), 42)),
            pcap: None,
            retry_cnt: Some(LOSSY_RETRY_CNT),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    configure_device(
        cip,
        DeviceConfig {
            faults: Some((lossy(), 43)),
            pcap: None,
            retry_cnt: Some(LOSSY_RETRY_CNT),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    let full = !cfg!(debug_assertions);
    let (messages, rma_bytes) = if full {
        (10_000usize, 1usize << 30)
    } else {
        (1_000, 32 << 20)
    };
    let chunk = 1usize << 20;
    let window = 16 << 20;
    let (p, mrs) = pair(sip, cip, b"", |d| {
        vec![d.alloc(window, Access::REMOTE | Access::LOCAL).unwrap()]
    });
    let target = &mrs[0];
    let remote = target.remote();
    let start = Instant::now();
    let limit = Duration::from_secs(if full { 600 } else { 300 });
    let deadline = start + limit;

    // Messages: sizes 0..=8191, 128 receives and up to 64 sends outstanding.
    let size = |i: usize| (i * 7919) % 8192;
    let rx = p.server.domain.alloc(128 * 8192, Access::RECV).unwrap();
    let tx = p.client.domain.alloc(64 * 8192, Access::SEND).unwrap();
    let (mut posted_rx, mut sent, mut received, mut send_done) = (0usize, 0usize, 0usize, 0usize);
    let mut v = Vec::new();
    while received < messages {
        assert!(
            Instant::now() < deadline,
            "messages: {received} of {messages} received"
        );
        while posted_rx < messages && posted_rx < received + 128 {
            let slot = posted_rx % 128;
            p.server
                .ep
                .recv(rx.iov(slot * 8192, 8192), posted_rx as u64)
                .unwrap();
            posted_rx += 1;
        }
        while sent < messages && sent < send_done + 64 {
            let slot = sent % 64;
            tx.write_at(slot * 8192, &pattern(sent as u64, size(sent)))
                .unwrap();
            p.client
                .ep
                .send(tx.iov(slot * 8192, size(sent)), sent as u64)
                .unwrap();
            sent += 1;
        }
        v.clear();
        p.client.cq.read(&mut v, 64).unwrap();
        for c in v.drain(..) {
            assert!(c.is_ok(), "send: {c:?}");
            send_done += 1;
        }
        p.server.cq.read(&mut v, 64).unwrap();
        for c in v.drain(..) {
            assert!(c.is_ok(), "receive: {c:?}");
            assert_eq!(c.context as usize, received, "messages in order");
            let i = received;
            assert_eq!(c.len, size(i), "length of message {i}");
            assert!(
                rx.to_vec((i % 128) * 8192, c.len).unwrap() == pattern(i as u64, c.len),
                "content of message {i}"
            );
            received += 1;
        }
    }
    collect(&p, &p.client.cq, sent - send_done, deadline, "last sends");
    let t_msg = start.elapsed();

    // RMA writes: 1 MiB each into a 16 MiB window, 8 outstanding; each slot is
    // verified when its write completes, before it is reused.
    let src = p
        .client
        .domain
        .alloc(8 * chunk, Access::WRITE | Access::READ)
        .unwrap();
    let n = rma_bytes / chunk;
    let slots = window / chunk;
    let (mut issued, mut done) = (0usize, 0usize);
    let mut outstanding = std::collections::VecDeque::new();
    while done < n {
        assert!(Instant::now() < deadline, "writes: {done} of {n}");
        while issued < n && issued < done + 8 {
            let s = issued % 8;
            src.write_at(s * chunk, &pattern(1_000_000 + issued as u64, chunk))
                .unwrap();
            p.client
                .ep
                .write(
                    src.iov(s * chunk, chunk),
                    remote.iov(((issued % slots) * chunk) as u64, chunk),
                    issued as u64,
                )
                .unwrap();
            outstanding.push_back(issued);
            issued += 1;
        }
        for c in collect(&p, &p.client.cq, 1, deadline, "write") {
            assert!(c.is_ok(), "write: {c:?}");
            let i = c.context as usize;
            assert_eq!(outstanding.pop_front(), Some(i), "writes complete in order");
            assert!(
                target.to_vec((i % slots) * chunk, chunk).unwrap()
                    == pattern(1_000_000 + i as u64, chunk),
                "target bytes of write {i}"
            );
            done += 1;
        }
    }
    let t_write = start.elapsed() - t_msg;

    // RMA reads: the window holds a known pattern; 1 MiB reads, 8 outstanding.
    for s in 0..slots {
        target
            .write_at(s * chunk, &pattern(2_000_000 + s as u64, chunk))
            .unwrap();
    }
    let (mut issued, mut done) = (0usize, 0usize);
    while done < n {
        assert!(Instant::now() < deadline, "reads: {done} of {n}");
        while issued < n && issued < done + 8 {
            let s = issued % 8;
            src.fill(s * chunk, chunk, 0).unwrap();
            p.client
                .ep
                .read(
                    src.iov(s * chunk, chunk),
                    remote.iov(((issued % slots) * chunk) as u64, chunk),
                    issued as u64,
                )
                .unwrap();
            issued += 1;
        }
        for c in collect(&p, &p.client.cq, 1, deadline, "read") {
            assert!(c.is_ok(), "read: {c:?}");
            let i = c.context as usize;
            assert!(
                src.to_vec((i % 8) * chunk, chunk).unwrap()
                    == pattern(2_000_000 + (i % slots) as u64, chunk),
                "data of read {i}"
            );
            done += 1;
        }
    }
    let t_read = start.elapsed() - t_msg - t_write;
    let (s, c) = (device_stats(sip).unwrap(), device_stats(cip).unwrap());
    println!(
        "lossy link: {messages} messages in {t_msg:?}, {} MiB written in {t_write:?}, {} MiB read in {t_read:?}",
        rma_bytes >> 20,
        rma_bytes >> 20
    );
    println!("server device: {s:?}\nclient device: {c:?}");
    assert!(s.faults.dropped > 0 && c.faults.corrupted > 0 && s.bad_packets + c.bad_packets > 0);
}

#[test]
fn vanished_peer_gives_retry_exceeded_not_a_hang() {
    let (sip, cip) = addrs();
    let (p, mrs) = pair(sip, cip, b"", |d| {
        vec![d.alloc(1 << 20, Access::REMOTE).unwrap()]
    });
    let rx = p.server.domain.alloc(4096, Access::RECV).unwrap();
    p.server.ep.recv(rx.full(), 1).unwrap();
    let tx = p
        .client
        .domain
        .alloc(1 << 20, Access::SEND | Access::WRITE | Access::READ)
        .unwrap();
    // Prove the connection works, then the peer stops answering (its device drops
    // everything it would send) while its TCP connection stays open.
    p.client.ep.send(tx.iov(0, 100), 10).unwrap();
    let r = p.server.cq.wait(Duration::from_secs(10)).expect("receive");
    assert!(r.is_ok() && r.len == 100, "{r:?}");
    let c = p.client.cq.wait(Duration::from_secs(10)).expect("send");
    assert!(c.is_ok(), "{c:?}");
    let mut dead = FaultConfig::perfect(Duration::ZERO);
    dead.drop = 1.0;
    configure_device(
        sip,
        DeviceConfig {
            faults: Some((dead, 1)),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    p.client
        .ep
        .write(tx.iov(0, 1 << 20), mrs[0].remote().full(), 20)
        .unwrap();
    p.client
        .ep
        .read(tx.iov(0, 4096), mrs[0].remote().iov(0, 4096), 21)
        .unwrap();
    p.client.ep.send(tx.iov(0, 64), 22).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(10), "hang: {got:?}");
        if let Ok(c) = p.client.cq.wait(Duration::from_secs(10)) {
            got.push(c);
        }
        let _ = p.server.cq.try_next();
    }
    let elapsed = start.elapsed();
    println!("RetryExceeded after {elapsed:?}: {got:?}");
    let kinds: Vec<_> = got
        .iter()
        .map(|c| (c.context, c.status.as_ref().err().map(|e| e.kind)))
        .collect();
    assert_eq!(
        kinds[0],
        (20, Some(CqErrorKind::RetryExceeded)),
        "{kinds:?}"
    );
    for k in &kinds[1..] {
        assert!(
            matches!(
                k.1,
                Some(CqErrorKind::Canceled | CqErrorKind::RetryExceeded)
            ),
            "{kinds:?}"
        );
    }
    // The connection is lost: one Shutdown event says so, and posts fail at the call.
    match p
        .client
        .eq
        .wait(Duration::from_secs(5))
        .expect("shutdown event")
    {
        Event::Shutdown { fid, reason } => {
            assert_eq!(fid, p.client.ep.fid());
            assert_eq!(reason, ShutdownReason::Lost);
        }
        other => panic!("client: {other:?}"),
    }
    let e = p
        .client
        .ep
        .send(tx.iov(0, 8), 23)
        .expect_err("post after loss");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
    assert!(
        p.client.eq.read().unwrap().is_none(),
        "one Shutdown event only"
    );
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("softroce-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn commit_lands_in_the_pmem_file_and_non_pmem_is_refused() {
    let (sip, cip) = addrs();
    let path = temp_path("commit.pmem");
    let len = 1 << 20;
    let path2 = path.clone();
    let (p, mrs) = pair(sip, cip, b"", move |d| {
        let m = pmem::Mapping::create(&path2, len).unwrap();
        vec![
            d.register(m, Access::REMOTE, MrFlags::PMEM).unwrap(),
            d.alloc(4096, Access::REMOTE).unwrap(),
        ]
    });
    assert!(p.client.ep.info().caps.contains(Caps::RMA_PMEM));
    let (pm, heap) = (mrs[0].remote(), mrs[1].remote());
    let src = p.client.domain.alloc(len, Access::WRITE).unwrap();
    let data = pattern(77, 300_000);
    src.write_at(0, &data).unwrap();
    let iov = [src.iov(0, 300_000)];
    let rma = [pm.iov(4096, 100_000), pm.iov(500_000, 200_000)];
    let msg = RmaMsg {
        iov: &iov,
        rma_iov: &rma,
        context: 5,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    let c = collect(
        &p,
        &p.client.cq,
        1,
        Instant::now() + Duration::from_secs(10),
        "commit",
    );
    assert!(c[0].is_ok(), "{c:?}");
    assert!(c[0].flags.contains(CompFlags::COMMIT));
    // The file (read through the file system, not the mapping) holds the data.
    let file = std::fs::read(&path).unwrap();
    assert!(file[4096..104_096] == data[..100_000]);
    assert!(file[500_000..700_000] == data[100_000..]);

    // COMMIT naming a heap region: refused with RemoteInvalid, nothing written.
    mrs[1].fill(0, 4096, 0xA5).unwrap();
    let iov = [src.iov(0, 200)];
    let rma = [pm.iov(0, 100), heap.iov(0, 100)];
    let msg = RmaMsg {
        iov: &iov,
        rma_iov: &rma,
        context: 6,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .unwrap();
    let c = collect(
        &p,
        &p.client.cq,
        1,
        Instant::now() + Duration::from_secs(10),
        "refused commit",
    );
    let e = c[0].status.as_ref().expect_err("refused");
    assert_eq!(e.kind, CqErrorKind::RemoteInvalid, "{e}");
    assert!(!c[0].flags.contains(CompFlags::COMMIT));
    assert!(
        mrs[1].to_vec(0, 4096).unwrap().iter().all(|&b| b == 0xA5),
        "heap target untouched"
    );
    assert!(
        mrs[0].to_vec(0, 100).unwrap().iter().all(|&b| b == 0),
        "pmem target untouched"
    );
    drop(p);
    let _ = std::fs::remove_file(&path);
}

/// Reads both sides' completion and event queues until `done` says enough arrived or
/// `t` passed; returns what arrived (client completions, server completions, client
/// events, server events).
#[allow(clippy::type_complexity)]
fn gather(
    p: &Pair,
    t: Duration,
    done: impl Fn(&[Completion], &[Completion], &[Event], &[Event]) -> bool,
) -> (Vec<Completion>, Vec<Completion>, Vec<Event>, Vec<Event>) {
    let deadline = Instant::now() + t;
    let (mut cc, mut sc, mut ce, mut se) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    while !done(&cc, &sc, &ce, &se) && Instant::now() < deadline {
        p.client.cq.read(&mut cc, 64).unwrap();
        p.server.cq.read(&mut sc, 64).unwrap();
        ce.extend(p.client.eq.read().unwrap());
        se.extend(p.server.eq.read().unwrap());
    }
    (cc, sc, ce, se)
}

/// The progress backstop: a server whose application reads none of its queues for
/// 5 s (manual progress, nothing else runs its transport) still answers its client at
/// once: sends into posted receives, an RMA write, a write with CQ data, an RMA read
/// all complete at the client within that time, and the server finds its receives
/// when it looks again. Without the backstop the client's operations end with
/// `RetryExceeded` after about 0.5 s.
#[test]
fn a_server_reading_no_queue_for_5s_still_serves_its_client() {
    let (sip, cip) = addrs();
    let (p, mrs) = pair(sip, cip, b"", |d| {
        vec![d.alloc(1 << 20, Access::REMOTE).unwrap()]
    });
    const MSGS: usize = 16;
    let rx = p
        .server
        .domain
        .alloc((MSGS + 1) * 4096, Access::RECV)
        .unwrap();
    for i in 0..=MSGS {
        p.server.ep.recv(rx.iov(i * 4096, 4096), i as u64).unwrap();
    }
    let readable = pattern(9, 256 << 10);
    mrs[0].write_at(512 << 10, &readable).unwrap();
    let remote = mrs[0].remote();
    let tx = p
        .client
        .domain
        .alloc(1 << 20, Access::SEND | Access::WRITE | Access::READ)
        .unwrap();
    let data = pattern(8, 512 << 10);
    tx.write_at(0, &data).unwrap();

    // From here on the server's application is busy elsewhere: no queue of the
    // server is read until `idle` has passed.
    let idle = Duration::from_secs(5);
    let start = Instant::now();
    for i in 0..MSGS {
        p.client
            .ep
            .send(tx.iov(i * 1000, 1000 + i), 100 + i as u64)
            .unwrap();
    }
    p.client
        .ep
        .write(tx.iov(0, 256 << 10), remote.iov(0, 256 << 10), 200)
        .unwrap();
    p.client
        .ep
        .writedata(
            tx.iov(256 << 10, 4096),
            remote.iov(256 << 10, 4096),
            0xC0DA,
            201,
        )
        .unwrap();
    p.client
        .ep
        .read(
            tx.iov(768 << 10, 256 << 10),
            remote.iov(512 << 10, 256 << 10),
            202,
        )
        .unwrap();
    let mut got = Vec::new();
    let mut v = Vec::new();
    while got.len() < MSGS + 3 && start.elapsed() < idle {
        v.clear();
        p.client.cq.read(&mut v, 64).unwrap();
        got.append(&mut v);
    }
    let served = start.elapsed();
    println!("client done after {served:?} while the server application was away");
    assert_eq!(got.len(), MSGS + 3, "completions at the client: {got:?}");
    assert!(got.iter().all(|c| c.is_ok()), "{got:?}");
    assert_eq!(
        tx.to_vec(768 << 10, 256 << 10).unwrap(),
        readable,
        "read data"
    );
    assert!(
        p.client.eq.read().unwrap().is_none(),
        "no event at the client"
    );
    std::thread::sleep(idle.saturating_sub(start.elapsed()));

    // The server's application comes back: everything is there.
    let mut rcv = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rcv.len() < MSGS + 1 && Instant::now() < deadline {
        p.server.cq.read(&mut rcv, 64).unwrap();
    }
    assert_eq!(rcv.len(), MSGS + 1, "{rcv:?}");
    assert!(rcv.iter().all(|c| c.is_ok()), "{rcv:?}");
    for c in &rcv {
        if c.flags.contains(CompFlags::REMOTE_CQ_DATA) {
            assert_eq!((c.data, c.len), (0xC0DA, 4096), "{c:?}");
        } else {
            let i = c.context as usize;
            assert_eq!(c.len, 1000 + i, "{c:?}");
            assert_eq!(
                rx.to_vec(i * 4096, c.len).unwrap(),
                data[i * 1000..i * 1000 + c.len],
                "message {i}"
            );
        }
    }
    assert_eq!(mrs[0].to_vec(0, 256 << 10).unwrap(), data[..256 << 10]);
    assert!(
        p.server.eq.read().unwrap().is_none(),
        "no event at the server"
    );
}

/// A refused remote access ends the connection at both ends, as on RC hardware: the
/// initiator's operation fails `RemoteAccess`, what it posted after completes
/// `Canceled`, the target's posted receives complete `Canceled`, both sides get one
/// `Shutdown { reason: AccessError }`, and posts on either fail at the call.
#[test]
fn a_refused_access_ends_the_connection_at_both_ends() {
    let (sip, cip) = addrs();
    let (p, mrs) = pair(sip, cip, b"", |d| {
        vec![d.alloc(4096, Access::REMOTE).unwrap()]
    });
    mrs[0].fill(0, 4096, 0x5A).unwrap();
    let rx = p
        .server
        .domain
        .alloc(2 * 4096, Access::RECV | Access::SEND)
        .unwrap();
    p.server.ep.recv(rx.iov(0, 4096), 1).unwrap();
    p.server.ep.recv(rx.iov(4096, 4096), 2).unwrap();
    let tx = p
        .client
        .domain
        .alloc(8192, Access::SEND | Access::WRITE | Access::READ)
        .unwrap();
    let mut bad = mrs[0].remote();
    bad.key ^= 0x8000_0001;
    p.client
        .ep
        .write(tx.iov(0, 100), bad.iov(0, 100), 10)
        .unwrap();
    p.client.ep.send(tx.iov(0, 10), 11).unwrap();
    p.client
        .ep
        .read(tx.iov(4096, 64), mrs[0].remote().iov(0, 64), 12)
        .unwrap();
    let (cc, sc, ce, se) = gather(&p, Duration::from_secs(10), |cc, sc, ce, se| {
        cc.len() == 3 && sc.len() == 2 && !ce.is_empty() && !se.is_empty()
    });
    let kind = |c: &Completion| (c.context, c.status.as_ref().err().map(|e| e.kind));
    let ck: Vec<_> = cc.iter().map(kind).collect();
    assert_eq!(
        ck,
        vec![
            (10, Some(CqErrorKind::RemoteAccess)),
            (11, Some(CqErrorKind::Canceled)),
            (12, Some(CqErrorKind::Canceled)),
        ]
    );
    let sk: Vec<_> = sc.iter().map(kind).collect();
    assert_eq!(
        sk,
        vec![
            (1, Some(CqErrorKind::Canceled)),
            (2, Some(CqErrorKind::Canceled))
        ]
    );
    for (who, evs, ep) in [("client", &ce, &p.client.ep), ("server", &se, &p.server.ep)] {
        match evs.as_slice() {
            [Event::Shutdown { fid, reason }] => {
                assert_eq!(*fid, ep.fid(), "{who}");
                assert_eq!(*reason, ShutdownReason::AccessError, "{who}");
            }
            other => panic!("{who}: {other:?}"),
        }
    }
    let e = p.client.ep.send(tx.iov(0, 8), 13).expect_err("client post");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
    let e = p
        .client
        .ep
        .write(tx.iov(0, 8), mrs[0].remote().iov(0, 8), 14)
        .expect_err("client write");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
    let e = p.server.ep.recv(rx.iov(0, 8), 3).expect_err("server recv");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
    let e = p.server.ep.send(rx.iov(0, 8), 4).expect_err("server send");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
    // Nothing more: no second event, no completion for the refused posts.
    let (cc, sc, ce, se) = gather(&p, Duration::from_millis(300), |_, _, _, _| false);
    assert!(
        cc.is_empty() && sc.is_empty() && ce.is_empty() && se.is_empty(),
        "{cc:?} {sc:?} {ce:?} {se:?}"
    );
    assert!(mrs[0].to_vec(0, 4096).unwrap().iter().all(|&b| b == 0x5A));
    // A local shutdown after the end changes nothing; posts then still say so.
    p.client.ep.shutdown().unwrap();
    assert!(p.client.eq.read().unwrap().is_none());
}

/// Nothing here depends on owning 127.0.0.1:4791: with that address held (by this
/// test, or by someone else already), a pair on other addresses works.
#[test]
fn works_while_127_0_0_1_4791_is_held() {
    let held = std::net::UdpSocket::bind("127.0.0.1:4791");
    println!(
        "127.0.0.1:4791 {}",
        if held.is_ok() {
            "held by this test"
        } else {
            "already held by another process"
        }
    );
    let (sip, cip) = addrs();
    let (p, _) = pair(sip, cip, b"", |_| Vec::new());
    let rx = p.server.domain.alloc(64, Access::RECV).unwrap();
    let tx = p.client.domain.alloc(64, Access::SEND).unwrap();
    tx.write_at(0, b"not on 127.0.0.1").unwrap();
    p.server.ep.recv(rx.full(), 1).unwrap();
    p.client.ep.send(tx.iov(0, 16), 2).unwrap();
    let (cc, sc, _, _) = gather(&p, Duration::from_secs(10), |cc, sc, _, _| {
        cc.len() == 1 && sc.len() == 1
    });
    assert!(
        cc[0].is_ok() && sc[0].is_ok() && sc[0].len == 16,
        "{cc:?} {sc:?}"
    );
    assert_eq!(rx.to_vec(0, 16).unwrap(), b"not on 127.0.0.1");
    drop(held);
}

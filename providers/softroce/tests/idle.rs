//! Idle connections are free (issue 11, item 8): with hundreds of connected but idle
//! endpoints, a queue read does not look at each of them.
//!
//! Before, every 256th completion-queue read (and every event-queue read) made the
//! connection manager read(2) every endpoint's CM socket, and every sleep polled all of
//! them: with 2,000 idle connections a live connection's round trip went from 250 to
//! 568 µs. Now the CM sockets sit in one epoll set and only ready ones are read.
//!
//! The test counts read(2) calls (`syscr` in /proc/self/io: the CM's socket reads are
//! read(2); the device's datagram I/O is recvmsg and not counted), and compares the
//! thread CPU time of a run of empty queue reads with N idle connections against the
//! same run before they existed (medians of 7, a wide margin: before the change the
//! ratio was tens, now about 1), so it holds on a loaded machine. One test in this
//! file: the read counter is the whole process's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::{configure_device, free_loopback_ip, DeviceConfig};

/// Idle connections, as in the measurement: 2 sockets each in this process
/// (both ends), so the descriptor limit is raised toward its hard limit first.
const WANT: usize = 2_000;

/// Raises RLIMIT_NOFILE's soft limit for 2 descriptors per connection (plus slack);
/// returns how many connections fit.
fn room_for_connections() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a live rlimit the calls read and write.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max.min(2 * WANT as u64 + 256);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
    }
    (((r.rlim_cur as usize).saturating_sub(256) / 2).min(WANT) / 50) * 50
}

fn syscr() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("syscr in /proc/self/io")
}

/// CPU time of this thread (CLOCK_THREAD_CPUTIME_ID): what the reads cost, whatever
/// else runs on the machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live timespec the call writes.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Median thread CPU time of 2,560 empty reads of `cq` (10 connection-manager rounds)
/// and 10 of `eq`, over 7 runs.
fn read_cost(cq: &CompletionQueue, eq: &EventQueue) -> Duration {
    let mut runs: Vec<Duration> = (0..7)
        .map(|_| {
            let t0 = thread_cpu();
            for _ in 0..2_560 {
                assert!(cq.try_next().unwrap().is_none());
            }
            for _ in 0..10 {
                assert!(eq.read().unwrap().is_none());
            }
            thread_cpu() - t0
        })
        .collect();
    runs.sort();
    runs[3]
}

fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG)
        .ep_type(EpType::Msg)
        .provider("softroce")
}

/// Reads events from `eq` (driving `other`'s progress too) until `n` match `want`.
fn expect_events(
    eq: &EventQueue,
    other: &EventQueue,
    n: usize,
    mut want: impl FnMut(Event) -> bool,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = 0;
    while got < n {
        match eq.read().expect("eq read") {
            Some(ev) => {
                if want(ev) {
                    got += 1;
                }
            }
            None => {
                let _ = other.read();
                assert!(Instant::now() < deadline, "{got} of {n} events in 60 s");
            }
        }
    }
    got
}

#[test]
fn idle_connections_cost_no_reads_per_queue_read() {
    let s_ip = free_loopback_ip().unwrap();
    let c_ip = loop {
        let c = free_loopback_ip().unwrap();
        if c != s_ip {
            break c;
        }
    };
    for ip in [s_ip, c_ip] {
        configure_device(ip, DeviceConfig::default()).unwrap();
    }
    let reg = Registry::new().with(fabric_softroce::provider());
    let sinfo = reg
        .getinfo(&hints().source(true).node(&s_ip.to_string()).service(0))
        .unwrap()
        .remove(0);
    let sfab = Fabric::open(&sinfo).unwrap();
    let sdom = sfab.domain(&sinfo).unwrap();
    let seq = sfab.eq(EqAttr::default()).unwrap();
    let scq = sdom.cq(CqAttr::default()).unwrap();
    let pep = sfab.passive_endpoint(&sinfo, &seq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    let mut cinfo = reg
        .getinfo(&hints().node(&s_ip.to_string()).service(port))
        .unwrap()
        .remove(0);
    cinfo.src_addr = Some(Address::Inet(SocketAddr::new(c_ip.into(), 0)));
    let cfab = Fabric::open(&cinfo).unwrap();
    let cdom = cfab.domain(&cinfo).unwrap();
    let ceq = cfab.eq(EqAttr::default()).unwrap();
    let ccq = cdom.cq(CqAttr::default()).unwrap();

    let idle_none = read_cost(&scq, &seq);

    let n = room_for_connections();
    assert!(
        n >= 400,
        "descriptor limit too low for the test: {n} connections"
    );
    // n connections, in batches of 50 (the listener's backlog), timing each batch.
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    let mut batch_ms = Vec::new();
    for _ in 0..n / 50 {
        let t0 = Instant::now();
        for _ in 0..50 {
            let ep = cdom
                .endpoint(&cinfo, EndpointConfig::new(&ccq, &ceq))
                .unwrap();
            ep.connect(b"idle").unwrap();
            clients.push(ep);
        }
        let mut reqs = Vec::new();
        expect_events(&seq, &ceq, 50, |ev| match ev {
            Event::ConnRequest(r) => {
                reqs.push(r);
                true
            }
            other => panic!("server: {other:?}"),
        });
        for r in reqs {
            let ep = sdom
                .endpoint(&r.info, EndpointConfig::new(&scq, &seq))
                .unwrap();
            ep.accept(b"").unwrap();
            servers.push(ep);
        }
        expect_events(&ceq, &seq, 50, |ev| matches!(ev, Event::Connected { .. }));
        expect_events(&seq, &ceq, 50, |ev| matches!(ev, Event::Connected { .. }));
        batch_ms.push(t0.elapsed().as_secs_f64() * 1e3 / 50.0);
    }
    eprintln!(
        "setup per connection: first batch {:.2} ms, last batch {:.2} ms ({n} connections)",
        batch_ms[0],
        batch_ms[batch_ms.len() - 1]
    );

    // Queue reads with every connection idle: manual progress runs the connection
    // manager every 256 CQ reads and on every EQ read.
    let before = syscr();
    const CQ_READS: u64 = 25_600;
    const EQ_READS: u64 = 200;
    for _ in 0..CQ_READS {
        assert!(scq.try_next().unwrap().is_none());
    }
    for _ in 0..EQ_READS {
        assert!(seq.read().unwrap().is_none());
    }
    let reads = syscr() - before;
    // Reads grow with the rounds (eventfd drains), never with the connections: an
    // idle endpoint's CM socket is not read.
    eprintln!(
        "{reads} read(2) calls for {CQ_READS} CQ reads and {EQ_READS} EQ reads with {n} idle connections"
    );
    let rounds = CQ_READS / 256 + EQ_READS;
    assert!(
        reads < rounds,
        "{reads} read(2) calls in {rounds} CM rounds with {n} idle connections: idle endpoints are being read"
    );

    let idle_n = read_cost(&scq, &seq);
    let ratio = idle_n.as_secs_f64() / idle_none.as_secs_f64().max(1e-9);
    eprintln!(
        "empty queue reads: {idle_none:?} with no connection, {idle_n:?} with {n} idle ones ({ratio:.1}x)"
    );
    assert!(
        ratio < 3.0,
        "queue reads cost {ratio:.1}x more with {n} idle connections ({idle_none:?} -> {idle_n:?})"
    );

    // The connections still work: a message on the last one, and the closure of the
    // first is still noticed (the CM socket is watched, not forgotten).
    let mr_s = sdom.alloc(64, Access::LOCAL).unwrap();
    let mr_c = cdom.alloc(64, Access::LOCAL).unwrap();
    mr_c.write_at(0, b"still alive").unwrap();
    let last = n - 1;
    servers[last].recv(mr_s.iov(0, 64), 7).unwrap();
    clients[last].send(mr_c.iov(0, 11), 8).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        if let Some(c) = scq.try_next().unwrap() {
            break c;
        }
        let _ = ccq.try_next();
        assert!(Instant::now() < deadline, "no receive completion in 10 s");
    };
    assert!(c.status.is_ok(), "{c:?}");
    assert_eq!(c.len, 11);
    assert_eq!(mr_s.to_vec(0, 11).unwrap(), b"still alive");
    clients[0].shutdown().unwrap();
    let fid0 = servers[0].fid();
    expect_events(&seq, &ceq, 1, |ev| match ev {
        Event::Shutdown { fid, .. } => {
            assert_eq!(fid, fid0, "Shutdown on another endpoint");
            true
        }
        _ => false,
    });
}

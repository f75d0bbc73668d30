//! A READ flood against a running device (issue 11, item 1), end to end: a peer that
//! connected like any client (the CM exchange spoken by hand over TCP) sends 10,000
//! RDMA READ requests of 1 MiB each for a region it was given and reads none of the
//! answers, while another client of the same server device runs 8-byte ping-pongs.
//!
//! What the target must hold:
//! - every ping-pong of the other connection completes, each within 5 s (before the
//!   responder bounded its READ resources, the flood queued ~10 GB of responses and
//!   the device's other connections failed with "retry count exceeded" for ~10 s);
//! - the server's resident memory grows by less than 64 MiB (the responder keeps at most
//!   max_dest_rd_atomic = 16 READ responses, 16 MiB, at once);
//! - what the device sends in answer is bounded too: fewer than 64 MiB of packets for
//!   about 440 KB of requests.
//!
//! The flood is bounded in count (10,000 requests) and the test in time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::wire::ext::RethRepr;
use fabric_softroce::wire::frame::ROCE_UDP_PORT;
use fabric_softroce::wire::{BthRepr, IcrcContext, Opcode, RoceRepr};
use fabric_softroce::{configure_device, device_stats, DeviceConfig};

mod support;
use support::*;

const FLOOD: usize = 10_000;
const PINGS: usize = 200;
/// Generous for a loaded CI machine (measured worst: 75-375 ms at load 8-15).
const MAX_PING: Duration = Duration::from_secs(5);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// softroce's CM message (provider/cm.rs): ibv_rc_pingpong's 52-byte text
/// `LLLL:QQQQQQ:PPPPPP:GID` then `u32` length, kind, `u16` MTU, `u16` data length, data.
fn cm_msg(kind: u8, qpn: u32, psn: u32, ip: Ipv4Addr, mtu: u16) -> Vec<u8> {
    let mut gid = [0u8; 16];
    gid[10] = 0xFF;
    gid[11] = 0xFF;
    gid[12..].copy_from_slice(&ip.octets());
    let gid: String = gid.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = format!("0000:{qpn:06x}:{psn:06x}:{gid}").into_bytes();
    out.resize(52, 0);
    out.extend_from_slice(&5u32.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// Reads one CM message; returns (kind, QPN, PSN, MTU).
fn read_cm(s: &mut TcpStream) -> (u8, u32, u32, u16) {
    let mut head = [0u8; 56];
    s.read_exact(&mut head).expect("CM reply");
    let len = u32::from_be_bytes(head[52..56].try_into().unwrap()) as usize;
    assert!((5..=261).contains(&len), "CM body length {len}");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let text = std::str::from_utf8(&head[..52])
        .unwrap()
        .trim_end_matches('\0');
    let f: Vec<&str> = text.split(':').collect();
    let qpn = u32::from_str_radix(f[1], 16).unwrap();
    let psn = u32::from_str_radix(f[2], 16).unwrap();
    (body[0], qpn, psn, u16::from_be_bytes([body[1], body[2]]))
}

fn read_request(
    dest_qpn: u32,
    psn: u32,
    va: u64,
    rkey: u32,
    len: u32,
    icrc: &IcrcContext,
) -> Vec<u8> {
    let mut r = RoceRepr::new(BthRepr {
        opcode: Opcode::RC_RDMA_READ_REQUEST,
        solicited: false,
        migreq: false,
        pad_count: 0,
        pkey: 0xFFFF,
        fecn: false,
        becn: false,
        dest_qpn,
        ack_req: true,
        psn,
    });
    r.reth = Some(RethRepr {
        va,
        rkey,
        dma_len: len,
    });
    let mut buf = Vec::new();
    r.emit_into(&mut buf).expect("emit");
    icrc.fill(&mut buf).expect("icrc");
    buf
}

/// Both ends' completion queues, polled from this one thread: reading one side's
/// queue also drives the other side's progress, and what that read returns is kept
/// for its side, never dropped.
struct Cqs<'a> {
    cqs: [&'a CompletionQueue; 2],
    kept: [VecDeque<Completion>; 2],
}

impl<'a> Cqs<'a> {
    fn new(a: &'a CompletionQueue, b: &'a CompletionQueue) -> Self {
        Cqs {
            cqs: [a, b],
            kept: [VecDeque::new(), VecDeque::new()],
        }
    }

    /// Side `i`'s next completion within `t`.
    fn next(&mut self, i: usize, t: Duration) -> Option<Completion> {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if let Some(c) = self.kept[i].pop_front() {
                return Some(c);
            }
            if let Some(c) = self.cqs[i].try_next().unwrap() {
                return Some(c);
            }
            if let Some(c) = self.cqs[1 - i].try_next().unwrap() {
                self.kept[1 - i].push_back(c);
            }
        }
        None
    }
}

fn event(eq: &EventQueue, cq: &CompletionQueue) -> Event {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ev) = eq.read().unwrap() {
            return ev;
        }
        let _ = cq.try_next();
        assert!(Instant::now() < end, "no event in 10 s");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn a_read_flood_leaves_the_devices_other_connections_working() {
    let ips = addrs(3, false);
    let (s_ip, c_ip, x_ip) = (ips[0], ips[1], ips[2]);
    for ip in [s_ip, c_ip] {
        configure_device(ip, DeviceConfig::default()).unwrap();
    }
    let caps = Caps::MSG | Caps::RMA;
    let (server, _pep, port) = server(s_ip, caps);
    let (sdom, seq, scq) = (&server.domain, &server.eq, &server.cq);
    let region = sdom
        .alloc(1 << 20, Access::LOCAL | Access::REMOTE_READ)
        .unwrap();
    let remote = region.remote();

    // The legitimate client.
    let client = client(c_ip, &s_ip.to_string(), port, caps);
    let (ceq, ccq) = (&client.eq, &client.cq);
    let cdom = &client.domain;
    let cep = client.endpoint(&client.info);
    cep.connect(b"").unwrap();
    let Event::ConnRequest(req) = event(seq, ccq) else {
        panic!("expected the client's request")
    };
    let sep = sdom
        .endpoint(&req.info, EndpointConfig::new(scq, seq))
        .unwrap();
    sep.accept(b"").unwrap();
    assert!(matches!(event(ceq, scq), Event::Connected { .. }));
    assert!(matches!(event(seq, ccq), Event::Connected { .. }));

    // The attacker connects like a client: REQ, the server accepts it, RTU.
    let attacker_qpn = 0x00AB_CDEF;
    let mut cm = TcpStream::connect(SocketAddrV4::new(s_ip, port)).unwrap();
    cm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    cm.write_all(&cm_msg(1, attacker_qpn, 0, x_ip, 4096))
        .unwrap();
    let Event::ConnRequest(req) = event(seq, scq) else {
        panic!("expected the attacker's request")
    };
    let xep = sdom
        .endpoint(&req.info, EndpointConfig::new(scq, seq))
        .unwrap();
    xep.accept(b"").unwrap();
    let (kind, server_qpn, _, mtu) = read_cm(&mut cm);
    assert_eq!(kind, 2, "the server accepts");
    cm.write_all(&cm_msg(4, attacker_qpn, 0, x_ip, mtu))
        .unwrap();
    assert!(matches!(event(seq, scq), Event::Connected { .. }));

    // The flood, from the attacker's address, in its own thread, bounded in count.
    let rss0 = rss_kib();
    let tx0 = device_stats(s_ip).unwrap().tx_packets;
    let udp = UdpSocket::bind(SocketAddrV4::new(x_ip, ROCE_UDP_PORT)).unwrap();
    let flood = std::thread::spawn(move || {
        let icrc = IcrcContext::rxe(x_ip, s_ip, ROCE_UDP_PORT, ROCE_UDP_PORT);
        let per_read = (1u32 << 20) / u32::from(mtu.max(256));
        let mut psn = 0u32;
        for _ in 0..FLOOD {
            let pkt = read_request(
                server_qpn,
                psn,
                remote.addr,
                remote.key as u32,
                1 << 20,
                &icrc,
            );
            let _ = udp.send_to(&pkt, SocketAddrV4::new(s_ip, ROCE_UDP_PORT));
            psn = (psn + per_read) & 0xFF_FFFF;
        }
        udp // kept open, never read, until the ping-pongs are over
    });

    // Meanwhile: ping-pongs on the other connection, each bounded.
    let sbuf = sdom.alloc(64, Access::LOCAL).unwrap();
    let cbuf = cdom.alloc(64, Access::LOCAL).unwrap();
    let mut worst = Duration::ZERO;
    // Side 0 is the server, side 1 the client.
    let mut cqs = Cqs::new(scq, ccq);
    for i in 0..PINGS {
        let t0 = Instant::now();
        sep.recv(sbuf.iov(0, 64), 1).unwrap();
        cep.recv(cbuf.iov(8, 8), 2).unwrap();
        cbuf.write_at(0, &(i as u64).to_le_bytes()).unwrap();
        cep.send(cbuf.iov(0, 8), 3).unwrap();
        let got = loop {
            let c = cqs.next(0, MAX_PING).unwrap_or_else(|| {
                panic!("ping {i}: no receive at the server within {MAX_PING:?} during the flood")
            });
            assert!(c.status.is_ok(), "ping {i}: {c:?}");
            if c.flags.contains(CompFlags::RECV) {
                break c;
            }
        };
        assert_eq!(got.len, 8);
        sbuf.write_at(8, &sbuf.to_vec(0, 8).unwrap()).unwrap();
        sep.send(sbuf.iov(8, 8), 4).unwrap();
        let mut done = 0;
        let mut seen = Vec::new();
        while done < 2 {
            let c = cqs.next(1, MAX_PING).unwrap_or_else(|| {
                panic!(
                    "ping {i}: completion {done} of 2 missing at the client after {MAX_PING:?} \
                     during the flood (had {seen:?}); server {:?}; client {:?}",
                    device_stats(s_ip),
                    device_stats(c_ip)
                )
            });
            assert!(c.status.is_ok(), "ping {i}: {c:?}");
            seen.push(c.context);
            done += 1;
        }
        assert_eq!(cbuf.to_vec(8, 8).unwrap(), (i as u64).to_le_bytes());
        worst = worst.max(t0.elapsed());
    }
    let udp = flood.join().unwrap();
    // Let the device drain what it will send for the flood.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let _ = scq.try_next();
    }
    drop(udp);
    let grew_mib = rss_kib().saturating_sub(rss0) / 1024;
    let sent = device_stats(s_ip).unwrap().tx_packets - tx0;
    eprintln!(
        "{FLOOD} x 1 MiB READs flooded: {PINGS} ping-pongs on another connection, worst {worst:?}; \
         server RSS +{grew_mib} MiB; device sent {sent} packets (MTU {mtu})"
    );
    assert!(grew_mib < 64, "the server grew by {grew_mib} MiB");
    let sent_bytes = sent * u64::from(mtu);
    assert!(
        sent_bytes < 64 << 20,
        "the device sent {sent} packets (~{} MiB) for the flood",
        sent_bytes >> 20
    );
}

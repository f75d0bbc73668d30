//! `RawQp` (out-of-band connected QPs, as `ibv_rc_pingpong` peers use) and the receive
//! path's checks: every packet's source against the QP's peer (an off-path packet
//! with the right QPN and PSN is dropped and counted), ICRCs with the sender's IP ID
//! solved (non-zero IDs accepted, corrupted frames and implausible IDs refused).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use fabric_softroce::wire::frame::{build_frame, FrameInfo, ROCE_UDP_PORT};
use fabric_softroce::wire::{BthRepr, IcrcContext, Opcode, RoceRepr};
use fabric_softroce::{device_stats, free_loopback_ip, RawQp};

const T: Duration = Duration::from_secs(5);

fn send_only(dest_qpn: u32, psn: u32, payload: &[u8], icrc: &IcrcContext) -> Vec<u8> {
    RoceRepr::new(BthRepr {
        opcode: Opcode::RC_SEND_ONLY,
        solicited: false,
        migreq: false,
        pad_count: 0, // derived from the payload length
        pkey: 0xFFFF,
        fecn: false,
        becn: false,
        dest_qpn,
        ack_req: true,
        psn,
    })
    .build(payload, icrc)
    .expect("build")
}

fn recv_one(qp: &RawQp, t: Duration) -> Option<fabric_softroce::RawCompletion> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        match qp.poll(Duration::from_millis(20)).expect("completion") {
            Some(c) if c.recv => return Some(c),
            Some(_) => {}
            None => {}
        }
    }
    None
}

/// Two RawQps over loopback exchange messages both ways (one learns its peer's port,
/// the other is told it), data verified.
#[test]
fn raw_qps_exchange_messages() {
    let (ia, ib) = (free_loopback_ip().unwrap(), free_loopback_ip().unwrap());
    let a = RawQp::open(ia).unwrap();
    let b = RawQp::open(ib).unwrap();
    a.connect(ib, b.qpn(), b.psn(), 1024, None).unwrap();
    b.connect(ia, a.qpn(), a.psn(), 1024, Some(ROCE_UDP_PORT))
        .unwrap();
    for (i, size) in [1usize, 64, 1024, 1025, 4096, 65536]
        .into_iter()
        .enumerate()
    {
        let i = i as u64;
        a.post_recv(100 + i, size).unwrap();
        b.post_recv(200 + i, size).unwrap();
        let msg: Vec<u8> = (0..size).map(|k| (k as u64 * 31 + i) as u8).collect();
        a.post_send(i, msg.clone()).unwrap();
        let got = recv_one(&b, T).expect("b receives");
        assert_eq!((got.context, got.data.as_slice()), (200 + i, &msg[..]));
        let back: Vec<u8> = msg.iter().map(|x| !x).collect();
        b.post_send(i, back.clone()).unwrap();
        let got = recv_one(&a, T).expect("a receives");
        assert_eq!((got.context, got.data.as_slice()), (100 + i, &back[..]));
    }
    let s = device_stats(ia).unwrap();
    assert_eq!((s.bad_packets, s.wrong_source), (0, 0), "{s:?}");
}

/// A packet with the right QPN, PSN and a valid ICRC from an address (or port) that is
/// not the QP's peer is dropped and counted; the peer's own packet still arrives.
#[test]
fn off_path_packets_are_dropped_and_counted() {
    let (ia, ib, ic) = (
        free_loopback_ip().unwrap(),
        free_loopback_ip().unwrap(),
        free_loopback_ip().unwrap(),
    );
    let a = RawQp::open(ia).unwrap();
    let b = RawQp::open(ib).unwrap();
    a.connect(ib, b.qpn(), b.psn(), 1024, Some(ROCE_UDP_PORT))
        .unwrap();
    b.connect(ia, a.qpn(), a.psn(), 1024, Some(ROCE_UDP_PORT))
        .unwrap();
    a.post_recv(1, 64).unwrap();
    a.post_recv(2, 64).unwrap();

    // From another loopback address, and from the peer's address but another port:
    // both carry A's QPN, B's next PSN and a valid ICRC.
    let other_addr = UdpSocket::bind(SocketAddrV4::new(ic, ROCE_UDP_PORT)).unwrap();
    let other_port = UdpSocket::bind(SocketAddrV4::new(ib, 0)).unwrap();
    for s in [&other_addr, &other_port] {
        let local = match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(v) => v,
            _ => unreachable!(),
        };
        let icrc = IcrcContext::rxe(*local.ip(), ia, local.port(), ROCE_UDP_PORT);
        let evil = send_only(a.qpn(), b.psn(), b"forged!!", &icrc);
        icrc.verify(&evil).unwrap();
        s.send_to(&evil, SocketAddrV4::new(ia, ROCE_UDP_PORT))
            .unwrap();
    }
    // A corrupted packet is a bad packet (the ICRC is checked first).
    let icrc = IcrcContext::rxe(ic, ia, ROCE_UDP_PORT, ROCE_UDP_PORT);
    let mut bad = send_only(a.qpn(), b.psn(), b"corrupt!", &icrc);
    bad[13] ^= 0x10;
    other_addr
        .send_to(&bad, SocketAddrV4::new(ia, ROCE_UDP_PORT))
        .unwrap();

    let end = Instant::now() + T;
    while device_stats(ia).unwrap().wrong_source < 2 && Instant::now() < end {
        assert!(
            a.poll(Duration::from_millis(10)).unwrap().is_none(),
            "forged packet delivered"
        );
    }
    let s = device_stats(ia).unwrap();
    assert_eq!(s.wrong_source, 2, "{s:?}");
    assert_eq!(s.bad_packets, 1, "{s:?}");
    // The peer's real message takes the PSN the forgeries tried to use.
    b.post_send(9, b"genuine".to_vec()).unwrap();
    let got = recv_one(&a, T).expect("the peer's message arrives");
    assert_eq!(got.data, b"genuine");
    assert_eq!(got.context, 1);
}

/// A raw IP socket (root only; skipped otherwise), for frames with chosen IP IDs.
fn raw_socket() -> Option<i32> {
    // SAFETY: plain socket(2)/setsockopt(2) calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return None;
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_HDRINCL,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        Some(fd)
    }
}

fn raw_send(fd: i32, frame: &[u8], dst: Ipv4Addr) {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffer and address outlive the call; lengths are theirs.
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "raw send: {}",
        std::io::Error::last_os_error()
    );
}

/// Frames from the peer with non-zero, incrementing IP IDs (what kernel rxe sends)
/// are accepted; a corrupted one and one whose only fitting ID is far from the
/// peer's last are refused.
#[test]
fn frames_with_nonzero_ip_ids_are_accepted_corrupted_ones_refused() {
    let Some(fd) = raw_socket() else {
        eprintln!("SKIP: no raw socket (needs CAP_NET_RAW); the sans-IO tests cover the ICRC");
        return;
    };
    let (ia, peer) = (free_loopback_ip().unwrap(), free_loopback_ip().unwrap());
    let a = RawQp::open(ia).unwrap();
    // The peer is this test, sending from rxe's kind of port.
    let sport = 0xC123;
    let peer_qpn = 0x4242;
    a.connect(peer, peer_qpn, 0, 1024, None).unwrap();
    for c in 0..4 {
        a.post_recv(c, 256).unwrap();
    }
    let frame = |psn: u32, id: u16, payload: &[u8], corrupt: bool| {
        let info = FrameInfo {
            ip_id: id,
            ..FrameInfo::rxe(peer, ia, sport)
        };
        let mut roce = send_only(a.qpn(), psn, payload, &info.icrc_context());
        if corrupt {
            roce[14] ^= 0x01;
        }
        build_frame(&info, &roce).unwrap()
    };
    let stats = || device_stats(ia).unwrap();
    let base = stats();
    raw_send(fd, &frame(0, 0x1234, b"id 0x1234", false), ia);
    let got = recv_one(&a, T).expect("frame with IP ID 0x1234 accepted");
    assert_eq!(got.data, b"id 0x1234");
    raw_send(fd, &frame(1, 0x1235, b"corrupted", true), ia);
    raw_send(fd, &frame(1, 0x9999, b"far ahead", false), ia);
    let end = Instant::now() + T;
    while stats().bad_packets < base.bad_packets + 2 && Instant::now() < end {
        assert!(
            recv_one(&a, Duration::from_millis(10)).is_none(),
            "refused frame delivered"
        );
    }
    assert_eq!(stats().bad_packets, base.bad_packets + 2, "{:?}", stats());
    raw_send(fd, &frame(1, 0x1236, b"id 0x1236", false), ia);
    let got = recv_one(&a, T).expect("frame with IP ID 0x1236 accepted");
    assert_eq!(got.data, b"id 0x1236");
    assert_eq!(stats().wrong_source, 0);
    // SAFETY: closing the descriptor raw_socket opened.
    unsafe { libc::close(fd) };
}

/// Pacing: with `burst=8,gap=2ms`, a 64-packet message leaves in turns of at most 8
/// packets at least 2 ms apart (checked on the sender's capture), and arrives intact.
#[test]
fn output_is_paced_in_bursts() {
    use fabric_softroce::{configure_device, DeviceConfig, Pace};
    let (ia, ib) = (free_loopback_ip().unwrap(), free_loopback_ip().unwrap());
    let pcap = std::env::temp_dir().join(format!("softroce-pace-{}.pcap", std::process::id()));
    let gap = Duration::from_millis(2);
    configure_device(
        ia,
        DeviceConfig {
            pace: Some(Pace { burst: 8, gap }),
            pcap: Some(pcap.clone()),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    let a = RawQp::open(ia).unwrap();
    let b = RawQp::open(ib).unwrap();
    a.connect(ib, b.qpn(), b.psn(), 1024, None).unwrap();
    b.connect(ia, a.qpn(), a.psn(), 1024, None).unwrap();
    b.post_recv(1, 65536).unwrap();
    let msg: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    a.post_send(1, msg.clone()).unwrap();
    let got = recv_one(&b, T).expect("paced message arrives");
    assert_eq!(got.data, msg);
    // The send completes once the last packet is ACKed.
    let end = Instant::now() + T;
    let mut sent = false;
    while !sent && Instant::now() < end {
        sent = matches!(a.poll(Duration::from_millis(10)).unwrap(), Some(c) if !c.recv);
    }
    assert!(sent, "send completion");
    drop(a);
    // Frames of 1 KiB payload (the SENDs): timestamps from the capture.
    let cap = std::fs::read(&pcap).unwrap();
    let _ = std::fs::remove_file(&pcap);
    let mut at = 24;
    let mut times = Vec::new();
    while at + 16 <= cap.len() {
        let u = |o: usize| u32::from_le_bytes(cap[at + o..at + o + 4].try_into().unwrap());
        let (sec, usec, len) = (u(0), u(4), u(8) as usize);
        if len > 1000 {
            times.push(u64::from(sec) * 1_000_000 + u64::from(usec));
        }
        at += 16 + len;
    }
    assert_eq!(
        times.len(),
        64,
        "64 data packets captured (no loss on loopback): {:?}",
        times.iter().map(|t| t - times[0]).collect::<Vec<_>>()
    );
    for i in 0..times.len() - 8 {
        let dt = times[i + 8] - times[i];
        assert!(
            dt + 100 >= gap.as_micros() as u64,
            "packets {i} and {}: {dt} µs apart: more than a burst within the gap ({:?})",
            i + 8,
            times.iter().map(|t| t - times[0]).collect::<Vec<_>>()
        );
    }
}

/// The sans-IO core's `handle_datagram` (for a plain UDP socket): solves the ICRC for
/// the sender's IP ID, judges it per QP, and refuses other sources.
#[test]
fn handle_datagram_solves_ids_and_checks_the_source() {
    use fabric_softroce::rc::*;
    use fabric_softroce::wire::Error as WireError;
    use std::sync::Arc;
    let local = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 4791);
    let peer = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 0xC042);
    let mut qp = QueuePair::new(0x11, Arc::new(KeyTable::new()));
    qp.modify_to_init().unwrap();
    qp.modify_to_rtr(RtrAttr {
        mtu: Mtu::Mtu1024,
        dest_qpn: 0x22,
        rq_psn: 0,
        max_dest_rd_atomic: 16,
        min_rnr_timer: 12,
        local,
        remote: SocketAddrV4::new(*peer.ip(), 4791),
    })
    .unwrap();
    let mem: Arc<dyn LocalMemory> = Arc::new(VecMemory::new(64, 0, RemoteAccess::NONE));
    for i in 0..2 {
        qp.post_recv(RecvWr {
            wr_id: i,
            local: Some(LocalSegment::new(mem.clone(), 0, 64)),
        })
        .unwrap();
    }
    let ctx = |id: u16| IcrcContext {
        ip_id: id,
        ..IcrcContext::rxe(*peer.ip(), *local.ip(), peer.port(), 4791)
    };
    let now = Time(1_000_000);
    // Another address: refused before anything else.
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), peer.port());
    let p = send_only(0x11, 0, b"hello", &ctx(0x4000));
    assert_eq!(
        qp.handle_datagram(now, other, local, &p),
        Err(WireError::WrongSource)
    );
    // Corrupted: no ID fits.
    let mut bad = p.clone();
    bad[13] ^= 0x20;
    assert!(matches!(
        qp.handle_datagram(now, peer, local, &bad),
        Err(WireError::BadIcrc { .. })
    ));
    // rxe's non-zero ID: accepted, the message delivered.
    qp.handle_datagram(now, peer, local, &p).unwrap();
    // An ID far from the peer's last one: refused as implausible.
    let far = send_only(0x11, 1, b"world", &ctx(0xC000));
    assert_eq!(
        qp.handle_datagram(now, peer, local, &far),
        Err(WireError::ImplausibleIpId(0xC000))
    );
    let next = send_only(0x11, 1, b"world", &ctx(0x4001));
    qp.handle_datagram(now, peer, local, &next).unwrap();
    let mut done = Vec::new();
    while let Some(c) = qp.poll_completion() {
        done.push((c.wr_id, c.status, c.byte_len));
    }
    assert_eq!(
        done,
        vec![(0, WcStatus::Success, 5), (1, WcStatus::Success, 5)]
    );
}

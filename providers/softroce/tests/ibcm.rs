//! Connection management over IB CM (QP1 MADs with rdma_cm's header) through the
//! public fabric API, softroce to softroce on loopback, and against a hand-driven
//! rdma_cm peer on a UDP socket (to lose a REP on purpose and to send malformed
//! MADs). Each test uses its own free loopback addresses; the client's device is
//! configured with `cm: Some(CmProtocol::Ib)` (as `SOFTROCE_CM=ib` would).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::ibcm::engine::LOCAL_RESPONSE_TIMEOUT;
use fabric_softroce::ibcm::wire::{self as ibw, CmMad, CmMessage, CmaHdr, Req};
use fabric_softroce::ibcm::{ibcm_stats, AgentStats};
use fabric_softroce::wire::IcrcContext;
use fabric_softroce::{configure_device, device_stats, free_loopback_ip, CmProtocol, DeviceConfig};

mod support;

const T: Duration = Duration::from_secs(10);

fn addrs() -> (Ipv4Addr, Ipv4Addr) {
    let s = free_loopback_ip().expect("a free loopback address");
    let c = loop {
        let c = free_loopback_ip().expect("a free loopback address");
        if c != s {
            break c;
        }
    };
    configure_device(s, DeviceConfig::default()).unwrap();
    configure_device(
        c,
        DeviceConfig {
            cm: Some(CmProtocol::Ib),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    (s, c)
}

const CAPS: Caps = Caps::MSG.union(Caps::RMA);

struct Server {
    fabric: Fabric,
    domain: Domain,
    eq: EventQueue,
    cq: CompletionQueue,
    pep: PassiveEndpoint,
    port: u16,
}

fn server(ip: Ipv4Addr) -> Server {
    let (side, pep, port) = support::server(ip, CAPS);
    Server {
        fabric: side.fabric,
        domain: side.domain,
        eq: side.eq,
        cq: side.cq,
        pep,
        port,
    }
}

struct Client {
    _fabric: Fabric,
    domain: Domain,
    eq: EventQueue,
    cq: CompletionQueue,
    ep: Endpoint,
}

fn client(ip: Ipv4Addr, server_ip: Ipv4Addr, port: u16) -> Client {
    let side = support::client(ip, &server_ip.to_string(), port, CAPS);
    let ep = side.endpoint(&side.info);
    Client {
        _fabric: side.fabric,
        domain: side.domain,
        eq: side.eq,
        cq: side.cq,
        ep,
    }
}

/// The next event of `mine` (reading it drives that fabric's devices and CM; the
/// other side's CM answers when its test reads its queue).
fn wait_event(mine: &EventQueue, t: Duration) -> Event {
    let deadline = Instant::now() + t;
    loop {
        if let Some(ev) = mine.read().expect("eq read") {
            return ev;
        }
        assert!(Instant::now() < deadline, "no event within {t:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn stats(ip: Ipv4Addr) -> AgentStats {
    ibcm_stats(ip).expect("the device has an IB CM")
}

#[test]
fn connect_accept_data_messages_and_disconnect_over_ib_cm() {
    let (sip, cip) = addrs();
    let s = server(sip);
    let c = client(cip, sip, s.port);
    c.ep.connect(b"hello over QP1").unwrap();
    let req = match wait_event(&s.eq, T) {
        Event::ConnRequest(r) => r,
        other => panic!("server: {other:?}"),
    };
    // rdma_cm's REQ carries 56 bytes of the application's after the 36-byte header;
    // between softroce peers the data keeps its length (a trailer in the padding).
    assert_eq!(req.data, b"hello over QP1");
    assert_eq!(
        req.info
            .dest_addr
            .as_ref()
            .and_then(Address::as_inet)
            .map(|a| a.ip()),
        Some(cip.into())
    );
    let sep = s
        .domain
        .endpoint(&req.info, EndpointConfig::new(&s.cq, &s.eq))
        .unwrap();
    sep.accept(b"welcome").unwrap();
    match wait_event(&c.eq, T) {
        Event::Connected { data, .. } => assert_eq!(data, b"welcome"),
        other => panic!("client: {other:?}"),
    }
    match wait_event(&s.eq, T) {
        Event::Connected { .. } => {}
        other => panic!("server: {other:?}"),
    }
    // Both CMs saw MADs: the connection was made over QP1, not TCP.
    assert!(stats(sip).engine.received >= 2, "{:?}", stats(sip)); // REQ, RTU
    assert!(stats(cip).engine.received >= 1, "{:?}", stats(cip)); // REP
    assert_eq!(stats(sip).connections, 1);

    // Data both ways over the connection.
    let srx = s.domain.alloc(4096, Access::RECV | Access::SEND).unwrap();
    let ctx = c.domain.alloc(4096, Access::SEND | Access::RECV).unwrap();
    sep.recv(srx.iov(0, 4096), 1).unwrap();
    c.ep.recv(ctx.iov(2048, 2048), 2).unwrap();
    ctx.write_at(0, b"ping from the client").unwrap();
    c.ep.send(ctx.iov(0, 20), 3).unwrap();
    let r = s.cq.wait(T).expect("server receive");
    assert!(r.is_ok() && r.len == 20, "{r:?}");
    assert_eq!(srx.to_vec(0, 20).unwrap(), b"ping from the client");
    srx.write_at(100, b"pong").unwrap();
    sep.send(srx.iov(100, 4), 4).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "client completions: {got:?}");
        c.cq.read(&mut got, 8).unwrap();
        let _ = s.cq.try_next();
    }
    assert!(got.iter().all(|c| c.is_ok()), "{got:?}");
    assert_eq!(ctx.to_vec(2048, 4).unwrap(), b"pong");

    // The client ends it: DREQ/DREP; both sides hear Shutdown, the server's as Peer.
    c.ep.shutdown().unwrap();
    match wait_event(&c.eq, T) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::Local),
        other => panic!("client: {other:?}"),
    }
    match wait_event(&s.eq, T) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::Peer),
        other => panic!("server: {other:?}"),
    }
    // The DREP comes back: the client's connection moves to timewait.
    let deadline = Instant::now() + T;
    loop {
        let _ = c.eq.read();
        let st = stats(cip);
        if st.connections == 0 && st.timewait >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "client CM: {st:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(stats(sip).connections, 0, "{:?}", stats(sip));
    assert!(stats(sip).timewait >= 1);
    for ip in [sip, cip] {
        let d = device_stats(ip).unwrap();
        assert_eq!(d.bad_packets, 0, "{ip}: {d:?}");
        let st = stats(ip).engine;
        assert_eq!((st.malformed, st.unmatched), (0, 0), "{ip}: {st:?}");
    }
    drop(sep);
    drop(s.pep);
    drop(s.fabric);
}

#[test]
fn server_side_shutdown_reaches_the_client() {
    let (sip, cip) = addrs();
    let s = server(sip);
    let c = client(cip, sip, s.port);
    c.ep.connect(b"").unwrap();
    let Event::ConnRequest(req) = wait_event(&s.eq, T) else {
        panic!("no request")
    };
    let sep = s
        .domain
        .endpoint(&req.info, EndpointConfig::new(&s.cq, &s.eq))
        .unwrap();
    sep.accept(b"").unwrap();
    assert!(matches!(wait_event(&c.eq, T), Event::Connected { .. }));
    assert!(matches!(wait_event(&s.eq, T), Event::Connected { .. }));
    sep.shutdown().unwrap();
    match wait_event(&s.eq, T) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::Local),
        other => panic!("server: {other:?}"),
    }
    match wait_event(&c.eq, T) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::Peer),
        other => panic!("client: {other:?}"),
    }
    // Posts fail at the call from now on.
    let m = c.domain.alloc(64, Access::SEND).unwrap();
    assert!(c.ep.send(m.iov(0, 8), 1).is_err());
}

#[test]
fn reject_carries_data_and_unknown_port_is_refused() {
    let (sip, cip) = addrs();
    let s = server(sip);
    let c = client(cip, sip, s.port);
    c.ep.connect(b"may I").unwrap();
    let Event::ConnRequest(req) = wait_event(&s.eq, T) else {
        panic!("no request")
    };
    s.pep.reject(&req, b"go away").unwrap();
    match wait_event(&c.eq, T) {
        Event::Error { error, data, .. } => {
            assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
            assert_eq!(data, b"go away");
        }
        other => panic!("client: {other:?}"),
    }
    // Reject data beyond what a REJ carries is refused at the call.
    let c2 = client(cip, sip, s.port);
    c2.ep.connect(b"").unwrap();
    let Event::ConnRequest(req) = wait_event(&s.eq, T) else {
        panic!("no request")
    };
    let e = s.pep.reject(&req, &[1u8; 149]).expect_err("149 bytes");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    drop(c2);

    // Nobody listens on port+1 (the device has a CM: this listener's): REJ with
    // "invalid service ID", seen as a refused connection. The server's CM runs when
    // its event queue is read (nothing is expected there).
    let c3 = client(cip, sip, s.port.wrapping_add(1).max(1));
    c3.ep.connect(b"").unwrap();
    let deadline = Instant::now() + T;
    let ev = loop {
        assert!(s.eq.read().unwrap().is_none());
        if let Some(ev) = c3.eq.read().unwrap() {
            break ev;
        }
        assert!(Instant::now() < deadline, "no answer to a REQ for port+1");
        std::thread::sleep(Duration::from_micros(200));
    };
    match ev {
        Event::Error { error, .. } => {
            assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
            assert!(error.to_string().contains("nobody listens"), "{error}");
        }
        other => panic!("client: {other:?}"),
    }
}

#[test]
fn connect_data_beyond_56_bytes_is_an_error_at_the_call() {
    let (sip, cip) = addrs();
    let s = server(sip);
    let c = client(cip, sip, s.port);
    let e = c.ep.connect(&[7u8; 57]).expect_err("57 bytes");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("56"), "{e}");
}

/// A hand-driven rdma_cm client on a UDP socket at `ip`:4791.
struct RawPeer {
    ip: Ipv4Addr,
    server: Ipv4Addr,
    sock: UdpSocket,
    psn: u32,
}

impl RawPeer {
    fn new(ip: Ipv4Addr, server: Ipv4Addr) -> RawPeer {
        let sock = UdpSocket::bind(SocketAddrV4::new(ip, 4791)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        RawPeer {
            ip,
            server,
            sock,
            psn: 0,
        }
    }

    fn send_mad(&mut self, mad: &[u8; ibw::MAD_LEN]) {
        self.psn += 1;
        let pkt = ibw::build_gsi_packet(mad, self.psn, self.ip, self.server);
        self.sock
            .send_to(&pkt, SocketAddrV4::new(self.server, 4791))
            .unwrap();
    }

    fn send_raw(&mut self, payload: &[u8]) {
        // A UD packet with a correct ICRC around an arbitrary payload.
        let mut mad = [0u8; ibw::MAD_LEN];
        let n = payload.len().min(ibw::MAD_LEN);
        mad[..n].copy_from_slice(&payload[..n]);
        let mut pkt = ibw::build_gsi_packet(&mad, self.psn, self.ip, self.server);
        if payload.len() < ibw::MAD_LEN {
            // Truncated: cut the MAD, then fix the ICRC.
            pkt.truncate(12 + 8 + payload.len());
            pkt.extend_from_slice(&[0; 4]);
            IcrcContext::rxe(self.ip, self.server, 4791, 4791)
                .fill(&mut pkt)
                .unwrap();
        }
        self.sock
            .send_to(&pkt, SocketAddrV4::new(self.server, 4791))
            .unwrap();
    }

    /// The next CM MAD from the server, calling `drive` (which reads the server's
    /// event queue, so its CM runs) meanwhile.
    fn recv(&self, drive: &mut dyn FnMut(), t: Duration) -> Option<(CmMad, Instant)> {
        let deadline = Instant::now() + t;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            drive();
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let at = Instant::now();
                let (mad, _) = ibw::gsi_payload(&buf[..n]).expect("a QP1 packet");
                return Some((CmMad::decode(mad).expect("a CM MAD"), at));
            }
        }
        None
    }
}

fn raw_req(peer: Ipv4Addr, server: Ipv4Addr, port: u16, comm_id: u32) -> [u8; ibw::MAD_LEN] {
    let mut pd = [0u8; ibw::REQ_PDATA];
    pd[..ibw::CMA_HDR_LEN].copy_from_slice(
        &CmaHdr {
            src_port: 40000,
            src: peer,
            dst: server,
        }
        .encode(),
    );
    pd[ibw::CMA_HDR_LEN..ibw::CMA_HDR_LEN + 3].copy_from_slice(b"raw");
    CmMad {
        tid: 0x42,
        msg: CmMessage::Req(Box::new(Req {
            local_comm_id: comm_id,
            service_id: ibw::service_id(port),
            local_ca_guid: 0x1234,
            local_qkey: 0,
            local_qpn: 0x77,
            responder_resources: 1,
            initiator_depth: 1,
            remote_cm_response_timeout: 20,
            transport_service_type: 0,
            end_to_end_flow_control: false,
            starting_psn: 0x100,
            local_cm_response_timeout: LOCAL_RESPONSE_TIMEOUT,
            retry_count: 7,
            pkey: 0xFFFF,
            path_mtu: 3,
            rnr_retry_count: 7,
            max_cm_retries: 15,
            srq: false,
            primary_local_lid: 0xFFFF,
            primary_remote_lid: 0xFFFF,
            primary_local_gid: ibw::gid_of(peer),
            primary_remote_gid: ibw::gid_of(server),
            primary_flow_label: 0,
            primary_packet_rate: 3,
            primary_traffic_class: 0,
            primary_hop_limit: 64,
            primary_sl: 0,
            primary_subnet_local: false,
            primary_local_ack_timeout: 14,
            private_data: pd,
        })),
    }
    .encode()
}

#[test]
fn a_lost_rep_is_retransmitted_and_malformed_mads_are_dropped_and_counted() {
    let (sip, pip) = addrs();
    let s = server(sip);
    let mut peer = RawPeer::new(pip, sip);

    // Malformed MADs first (the server's CM exists: its listener's): truncated,
    // another class, an attribute the CM does not handle, a message for no
    // connection. None gets an answer, each is counted, nothing panics.
    let before = stats(sip).engine;
    peer.send_raw(&[1, 0x07, 2, 3, 0, 0]); // truncated MAD
    let mut other_class = [0u8; ibw::MAD_LEN];
    other_class[..4].copy_from_slice(&[1, 0x81, 1, 1]); // an SMP
    peer.send_raw(&other_class);
    let mut lap = [0u8; ibw::MAD_LEN];
    lap[..4].copy_from_slice(&[1, 0x07, 2, 3]);
    lap[16..18].copy_from_slice(&[0, 0x19]); // LAP
    lap[24] = 1;
    peer.send_raw(&lap);
    let rtu = CmMad {
        tid: 9,
        msg: CmMessage::Rtu {
            local_comm_id: 0xDEAD,
            remote_comm_id: 0xBEEF, // no such connection
            private_data: Vec::new(),
        },
    };
    peer.send_mad(&rtu.encode());
    let deadline = Instant::now() + T;
    loop {
        let _ = s.eq.read();
        let st = stats(sip).engine;
        if st.malformed >= before.malformed + 3 && st.unmatched > before.unmatched {
            break;
        }
        assert!(Instant::now() < deadline, "server CM: {st:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut quiet = || assert!(s.eq.read().unwrap().is_none(), "no server event expected");
    assert!(peer.recv(&mut quiet, Duration::from_millis(100)).is_none());

    // A REQ; the server accepts; the REP is "lost" (not answered); the server sends
    // it again after the REQ's local_cm_response_timeout (268 ms); the RTU then
    // completes the connection.
    peer.send_mad(&raw_req(pip, sip, s.port, 0xC0FFEE));
    let Event::ConnRequest(req) = wait_event(&s.eq, T) else {
        panic!("no request")
    };
    // An rdma_cm peer's data (no length trailer): the REQ's 56 bytes, zero-padded.
    assert_eq!(req.data.len(), ibw::REQ_USER_DATA);
    assert_eq!(&req.data[..3], b"raw");
    let sep = s
        .domain
        .endpoint(&req.info, EndpointConfig::new(&s.cq, &s.eq))
        .unwrap();
    sep.accept(b"yes").unwrap();
    let mut quiet = || assert!(s.eq.read().unwrap().is_none(), "no server event expected");
    let (rep1, t1) = peer.recv(&mut quiet, T).expect("a REP");
    let CmMessage::Rep(r1) = &rep1.msg else {
        panic!("{rep1:?}")
    };
    assert_eq!(r1.remote_comm_id, 0xC0FFEE);
    assert_eq!(rep1.tid, 0x42, "a REP carries the REQ's transaction ID");
    assert_eq!(&r1.private_data[..3], b"yes");
    // A repeated REQ meanwhile is answered with the REP again (not a new connection).
    peer.send_mad(&raw_req(pip, sip, s.port, 0xC0FFEE));
    let (dup, _) = peer
        .recv(&mut quiet, T)
        .expect("the REP for the repeated REQ");
    assert_eq!(dup, rep1);
    // Unanswered, the REP comes again on its timer.
    let (rep2, t2) = peer
        .recv(&mut quiet, Duration::from_secs(5))
        .expect("the REP again");
    assert_eq!(rep2, rep1);
    assert_eq!(stats(sip).connections, 1);
    let gap = t2 - t1;
    assert!(
        gap >= Duration::from_millis(200) && gap < Duration::from_secs(3),
        "REP retransmitted after {gap:?}"
    );
    assert!(stats(sip).engine.retransmits >= 1);
    let rtu = CmMad {
        tid: 0x42,
        msg: CmMessage::Rtu {
            local_comm_id: 0xC0FFEE,
            remote_comm_id: r1.local_comm_id,
            private_data: Vec::new(),
        },
    };
    peer.send_mad(&rtu.encode());
    match wait_event(&s.eq, T) {
        Event::Connected { .. } => {}
        other => panic!("server: {other:?}"),
    }
    // IB CM's starting PSNs are receive PSNs (as Linux's cm.c and kernel rxe use
    // them): the server's first SEND carries the REQ's starting PSN (0x100), to the
    // REQ's QPN.
    let m = s.domain.alloc(64, Access::SEND).unwrap();
    sep.send(m.iov(0, 8), 1).unwrap();
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 2048];
    let first = loop {
        assert!(Instant::now() < deadline, "no SEND from the server");
        let _ = s.cq.try_next();
        if let Ok((n, _)) = peer.sock.recv_from(&mut buf) {
            if buf[0] == 0x04 {
                break buf[..n].to_vec();
            }
        }
    };
    assert_eq!(u32::from_be_bytes([0, first[5], first[6], first[7]]), 0x77);
    assert_eq!(
        u32::from_be_bytes([0, first[9], first[10], first[11]]),
        0x100
    );
    // The peer disconnects: DREQ, answered with a DREP carrying the IDs; the server
    // hears Shutdown(Peer). A repeated DREQ (the DREP lost) is answered again.
    let dreq = CmMad {
        tid: 0x43,
        msg: CmMessage::Dreq {
            local_comm_id: 0xC0FFEE,
            remote_comm_id: r1.local_comm_id,
            remote_qpn: r1.local_qpn,
            private_data: Vec::new(),
        },
    };
    peer.send_mad(&dreq.encode());
    match wait_event(&s.eq, T) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::Peer),
        other => panic!("server: {other:?}"),
    }
    for _ in 0..2 {
        let (m, _) = peer.recv(&mut quiet, T).expect("a DREP");
        match m.msg {
            CmMessage::Drep {
                local_comm_id,
                remote_comm_id,
                ..
            } => assert_eq!(
                (local_comm_id, remote_comm_id),
                (r1.local_comm_id, 0xC0FFEE)
            ),
            other => panic!("{other:?}"),
        }
        peer.send_mad(&dreq.encode());
    }
    assert_eq!(device_stats(sip).unwrap().bad_packets, 0);
}

#[test]
fn pending_requests_per_listener_are_bounded() {
    let (sip, pip) = addrs();
    let s = server(sip);
    let mut peer = RawPeer::new(pip, sip);
    let max = fabric_softroce::ibcm::engine::MAX_PENDING;
    // Nobody decides: the listener holds MAX_PENDING requests, the next is refused
    // with NO_RESOURCES.
    let mut n = 0;
    let mut count = || {
        while let Ok(Some(ev)) = s.eq.read() {
            assert!(matches!(ev, Event::ConnRequest(_)), "{ev:?}");
            n += 1;
        }
    };
    for i in 0..max as u32 + 1 {
        peer.send_mad(&raw_req(pip, sip, s.port, 0x1000 + i));
        if i % 32 == 31 {
            count();
        }
    }
    let mut refused = None;
    let deadline = Instant::now() + T;
    while refused.is_none() && Instant::now() < deadline {
        if let Some((m, _)) = peer.recv(&mut count, Duration::from_millis(100)) {
            if let CmMessage::Rej {
                reason,
                remote_comm_id,
                ..
            } = m.msg
            {
                refused = Some((reason, remote_comm_id));
            }
        }
    }
    assert_eq!(
        refused,
        Some((ibw::rej::NO_RESOURCES, 0x1000 + max as u32)),
        "{:?}",
        stats(sip)
    );
    assert_eq!(stats(sip).connections, max);
    assert_eq!(stats(sip).engine.overflow, 1);
    count();
    assert_eq!(n, max);
}

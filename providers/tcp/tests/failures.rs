//! Peer death, local shutdown, protocol errors: error completions and Shutdown
//! events, bounded in time.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use fabric_core::*;

fn expect_shutdown(eq: &EventQueue, fid: Fid) {
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "no Shutdown event");
        match eq.sread(Some(Duration::from_millis(50))).unwrap() {
            Some(Event::Shutdown { fid: f, .. }) => {
                assert_eq!(f, fid);
                return;
            }
            Some(Event::Error { .. }) => {}
            Some(other) => panic!("unexpected event {other:?}"),
            None => {}
        }
    }
}

fn drain(cq: &CompletionQueue, n: usize) -> Vec<Completion> {
    let mut v = Vec::new();
    while v.len() < n {
        v.push(next(cq));
    }
    v
}

#[test]
fn peer_close_fails_outstanding_operations() {
    let p = pair_with(b"", b"", true, Progress::Manual);
    let client = &p.client;
    let buf = client.domain.alloc(4096, Access::LOCAL).unwrap();
    client.ep.recv(buf.iov(0, 100), 1).unwrap();
    client.ep.recv(buf.iov(100, 100), 2).unwrap();
    // A read and a write the server will never answer (its engine is not driven).
    let target = p.server.domain.alloc(4096, Access::REMOTE).unwrap();
    client
        .ep
        .write(buf.iov(0, 64), target.remote().iov(0, 64), 3)
        .unwrap();
    client
        .ep
        .read(buf.iov(0, 64), target.remote().iov(0, 64), 4)
        .unwrap();
    drop(p.server.ep);
    let v = drain(&client.cq, 4);
    let mut by_ctx: Vec<(u64, CqErrorKind)> = v
        .iter()
        .map(|c| (c.context, c.status.as_ref().unwrap_err().kind))
        .collect();
    by_ctx.sort_by_key(|x| x.0);
    assert_eq!(
        by_ctx,
        vec![
            (1, CqErrorKind::Canceled),
            (2, CqErrorKind::Canceled),
            (3, CqErrorKind::ConnectionLost),
            (4, CqErrorKind::ConnectionLost)
        ]
    );
    expect_shutdown(&client.eq, client.ep.fid());
    // Further posts fail fast.
    assert!(client.ep.send(buf.iov(0, 1), 5).is_err());
}

#[test]
fn peer_death_mid_transfer() {
    // The server receives a 64 MiB message slowly and dies in the middle.
    let p = pair_with(b"", b"", true, Progress::Manual);
    let size = 64 << 20;
    let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
    let dst = p.server.domain.alloc(size, Access::LOCAL).unwrap();
    p.server.ep.recv(dst.full(), 1).unwrap();
    p.client.ep.send(src.full(), 2).unwrap();
    // Move a little data, then kill the server side.
    let mut sv = Vec::new();
    for _ in 0..3 {
        p.server.cq.read(&mut sv, 1).unwrap();
        p.client.cq.read(&mut sv, 1).unwrap();
    }
    let server_cq = p.server.cq.clone();
    let server_eq = p.server.eq.clone();
    let server_fid = p.server.ep.fid();
    drop(p.server.ep);
    // The server's own receive is reported canceled (endpoint closed).
    let c = next(&server_cq);
    assert_eq!(c.context, 1);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
    let c = next(&p.client.cq);
    assert_eq!(c.context, 2);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::ConnectionLost);
    expect_shutdown(&p.client.eq, p.client.ep.fid());
    // A closed endpoint raises no Shutdown of its own.
    assert!(server_eq
        .read()
        .unwrap()
        .is_none_or(|e| e.fid() != server_fid));
}

#[test]
fn local_shutdown_cancels_and_peer_sees_shutdown() {
    let p = pair();
    let buf = p.client.domain.alloc(64, Access::LOCAL).unwrap();
    p.client.ep.recv(buf.full(), 1).unwrap();
    p.client.ep.shutdown().unwrap();
    let c = next(&p.client.cq);
    assert_eq!(c.context, 1);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
    expect_shutdown(&p.client.eq, p.client.ep.fid());
    expect_shutdown(&p.server.eq, p.server.ep.fid());
    // Posts fail at the call: Shutdown on the side that shut down, NotConnected at
    // its peer.
    assert_eq!(
        p.client.ep.send(buf.full(), 2).unwrap_err().kind(),
        ErrorKind::Shutdown
    );
    let sbuf = p.server.domain.alloc(64, Access::LOCAL).unwrap();
    assert_eq!(
        p.server.ep.send(sbuf.full(), 3).unwrap_err().kind(),
        ErrorKind::NotConnected
    );
}

/// A raw TCP peer that speaks just enough of the protocol to get accepted.
fn raw_client(port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let h = fabric_tcp::wire::Header::new(fabric_tcp::wire::Op::ConnReq, 0, 3);
    let mut b = [0u8; fabric_tcp::wire::MAX_HDR_SIZE];
    let n = h.emit(&mut b);
    s.write_all(&b[..n]).unwrap();
    s.write_all(b"raw").unwrap();
    s
}

#[test]
fn malformed_header_tears_down_without_panic() {
    let sinfo = listen_info(Progress::Manual);
    let fabric = Fabric::open(&sinfo).unwrap();
    let domain = fabric.domain(&sinfo).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let pep = fabric.passive_endpoint(&sinfo, &eq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();

    let cases: Vec<Vec<u8>> = vec![
        vec![0xff; 64], // bad version
        {
            // a write with 9 iovecs
            let mut b = vec![0u8; 32];
            b[0] = 1;
            b[1] = 4;
            b[4..6].copy_from_slice(&(32u16 + 9 * 24).to_le_bytes());
            b[6] = 9;
            b
        },
        {
            // an ACK for an operation that was never sent
            let h = fabric_tcp::wire::Header::new(fabric_tcp::wire::Op::Ack, 99, 0);
            let mut b = [0u8; 224];
            let n = h.emit(&mut b);
            b[..n].to_vec()
        },
        {
            // a message claiming 2 GiB
            let h = fabric_tcp::wire::Header::new(fabric_tcp::wire::Op::Msg, 1, 0);
            let mut b = [0u8; 224];
            let n = h.emit(&mut b);
            b[16..24].copy_from_slice(&(2u64 << 30).to_le_bytes());
            b[..n].to_vec()
        },
    ];
    for (i, garbage) in cases.into_iter().enumerate() {
        let mut raw = raw_client(port);
        let req = match wait_event(&eq) {
            Event::ConnRequest(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(req.data, b"raw");
        let ep = domain
            .endpoint(&req.info, EndpointConfig::new(&cq, &eq))
            .unwrap();
        let buf = domain.alloc(64, Access::LOCAL).unwrap();
        ep.recv(buf.full(), 1000 + i as u64).unwrap();
        ep.accept(b"").unwrap();
        // Read CONN_RESP (32-byte header, no data).
        let mut resp = [0u8; 32];
        raw.read_exact(&mut resp).unwrap();
        assert_eq!(resp[1], 2, "CONN_RESP");
        assert_eq!(resp[7], 0, "accepted");
        raw.write_all(&garbage).unwrap();
        let c = next(&cq);
        assert_eq!(c.context, 1000 + i as u64);
        assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
        // Connected, then an Error (protocol) and Shutdown.
        let mut saw_protocol = false;
        let deadline = Instant::now() + T;
        loop {
            assert!(Instant::now() < deadline);
            match eq.sread(Some(Duration::from_millis(50))).unwrap() {
                Some(Event::Error { error, .. }) => {
                    assert_eq!(error.kind(), ErrorKind::Protocol);
                    saw_protocol = true;
                }
                Some(Event::Shutdown { fid, .. }) => {
                    assert_eq!(fid, ep.fid());
                    break;
                }
                Some(Event::Connected { .. }) | None => {}
                Some(other) => panic!("{other:?}"),
            }
        }
        assert!(saw_protocol, "case {i}");
        // The server closed the socket.
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest);
    }
}

#[test]
fn garbage_instead_of_conn_req_is_dropped() {
    let sinfo = listen_info(Progress::Manual);
    let fabric = Fabric::open(&sinfo).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let pep = fabric.passive_endpoint(&sinfo, &eq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[7u8; 100]).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let t0 = Instant::now();
    assert!(eq
        .sread(Some(Duration::from_millis(100)))
        .unwrap()
        .is_none());
    let mut rest = Vec::new();
    // The server closes the connection; read ends (EOF or reset).
    let _ = s.read_to_end(&mut rest);
    assert!(t0.elapsed() < T);
}

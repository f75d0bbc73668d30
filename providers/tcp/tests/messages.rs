//! Send / receive: sizes, unexpected messages, truncation, CQ data, inject, delivery.

mod common;

use std::time::Duration;

use common::*;
use fabric_core::*;

fn send_recv(p: &Pair, size: usize) {
    let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
    let dst = p.server.domain.alloc(size, Access::LOCAL).unwrap();
    let data = pattern(size, size as u8);
    src.write_at(0, &data).unwrap();
    p.server.ep.recv(dst.full(), 10).unwrap();
    p.client.ep.send(src.full(), 20).unwrap();
    let c = next(&p.server.cq);
    ok(&c);
    assert_eq!((c.context, c.len), (10, size));
    assert_eq!(c.flags, CompFlags::MSG | CompFlags::RECV);
    let c = next(&p.client.cq);
    ok(&c);
    assert_eq!((c.context, c.len), (20, size));
    assert_eq!(c.flags, CompFlags::MSG | CompFlags::SEND);
    assert!(
        dst.to_vec(0, size).unwrap() == data,
        "payload of {size} bytes differs"
    );
}

#[test]
fn sizes_0_1_4k_1m_64m() {
    let p = pair();
    for size in [0, 1, 4096, 1 << 20, 64 << 20] {
        send_recv(&p, size);
    }
}

#[test]
fn both_directions_and_scatter_gather() {
    let p = pair();
    let a = p.client.domain.alloc(300, Access::LOCAL).unwrap();
    let b = p.server.domain.alloc(300, Access::LOCAL).unwrap();
    a.write_at(0, &pattern(300, 3)).unwrap();
    // Server receives into 3 pieces; client sends from 2.
    p.server
        .ep
        .recvv(&[b.iov(200, 100), b.iov(0, 100), b.iov(100, 100)], 1)
        .unwrap();
    p.client
        .ep
        .sendv(&[a.iov(0, 150), a.iov(150, 150)], 2)
        .unwrap();
    assert_eq!(next(&p.server.cq).len, 300);
    ok(&next(&p.client.cq));
    let want = pattern(300, 3);
    let got = b.to_vec(0, 300).unwrap();
    assert_eq!(&got[200..300], &want[0..100]);
    assert_eq!(&got[0..100], &want[100..200]);
    assert_eq!(&got[100..200], &want[200..300]);
    // And back.
    p.client.ep.recv(a.full(), 3).unwrap();
    p.server.ep.send(b.iov(0, 7), 4).unwrap();
    assert_eq!(next(&p.client.cq).len, 7);
    ok(&next(&p.server.cq));
}

#[test]
fn unexpected_messages_are_buffered_in_order() {
    let p = pair();
    let src = p.client.domain.alloc(64 << 10, Access::LOCAL).unwrap();
    for i in 0..5u8 {
        src.write_at(i as usize * 1000, &[i; 1000]).unwrap();
    }
    // No receive is posted yet.
    for i in 0..5 {
        let msg = Msg {
            iov: &[src.iov(i * 1000, 1000)],
            context: 100 + i as u64,
            data: 0xd0 + i as u64,
        };
        p.client
            .ep
            .sendmsg(&msg, OpFlags::COMPLETION | OpFlags::REMOTE_CQ_DATA)
            .unwrap();
    }
    p.client.ep.inject(b"").unwrap(); // zero-length, unexpected too
    for i in 0..5 {
        assert_eq!(next(&p.client.cq).context, 100 + i);
    }
    // Let the messages arrive at the server before any receive exists.
    let mut none = Vec::new();
    assert_eq!(
        p.server
            .cq
            .sread(&mut none, 1, Some(Duration::from_millis(100)))
            .unwrap(),
        0
    );
    let dst = p.server.domain.alloc(8192, Access::LOCAL).unwrap();
    for i in 0..6usize {
        p.server.ep.recv(dst.iov(i * 1000, 1000), i as u64).unwrap();
    }
    for i in 0..5u8 {
        let c = next(&p.server.cq);
        ok(&c);
        assert_eq!(c.context, i as u64);
        assert_eq!(c.len, 1000);
        assert_eq!(c.data, 0xd0 + i as u64);
        assert!(c.flags.contains(CompFlags::REMOTE_CQ_DATA));
        assert_eq!(dst.to_vec(i as usize * 1000, 1000).unwrap(), vec![i; 1000]);
    }
    let c = next(&p.server.cq);
    assert_eq!((c.context, c.len), (5, 0));
}

#[test]
fn unexpected_beyond_the_buffer_limit_waits_for_receives() {
    // 3 x 40 MiB without receives: the third does not fit the 64 MiB unexpected
    // buffer, so the server stops reading; posting receives drains everything.
    let p = pair();
    let size = 40 << 20;
    let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(size, 9)).unwrap();
    for i in 0..3 {
        p.client.ep.send(src.full(), i).unwrap();
    }
    let mut v = Vec::new();
    p.client
        .cq
        .sread(&mut v, 8, Some(Duration::from_millis(300)))
        .unwrap();
    let dst = p.server.domain.alloc(size, Access::LOCAL).unwrap();
    for i in 0..3 {
        p.server.ep.recv(dst.full(), 10 + i).unwrap();
        let c = next(&p.server.cq);
        ok(&c);
        assert_eq!((c.context, c.len), (10 + i, size));
        assert!(dst.to_vec(0, size).unwrap() == pattern(size, 9));
        dst.fill(0, size, 0).unwrap();
    }
    while v.len() < 3 {
        v.push(next(&p.client.cq));
    }
    assert!(v.iter().all(|c| c.is_ok()));
}

#[test]
fn truncation_reports_what_fit() {
    let p = pair();
    let src = p.client.domain.alloc(100, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(100, 1)).unwrap();
    let dst = p.server.domain.alloc(100, Access::LOCAL).unwrap();
    p.server.ep.recv(dst.iov(0, 10), 1).unwrap();
    p.client.ep.send(src.full(), 2).unwrap();
    let c = next(&p.server.cq);
    assert_eq!(c.context, 1);
    assert_eq!(c.len, 10);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Truncated);
    assert_eq!(dst.to_vec(0, 10).unwrap(), pattern(100, 1)[..10]);
    assert_eq!(dst.to_vec(10, 90).unwrap(), vec![0; 90]);
    // The stream is intact: the next message arrives whole.
    p.server.ep.recv(dst.full(), 3).unwrap();
    p.client.ep.send(src.iov(0, 50), 4).unwrap();
    let c = next(&p.server.cq);
    ok(&c);
    assert_eq!(c.len, 50);
    // Truncation of an unexpected (buffered) message too.
    p.client.ep.send(src.full(), 5).unwrap();
    let mut v = Vec::new();
    p.server
        .cq
        .sread(&mut v, 1, Some(Duration::from_millis(50)))
        .unwrap();
    p.server.ep.recv(dst.iov(0, 20), 6).unwrap();
    let c = next(&p.server.cq);
    assert_eq!((c.context, c.len), (6, 20));
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Truncated);
}

#[test]
fn inject_has_no_completion() {
    let p = pair();
    let dst = p.server.domain.alloc(16, Access::LOCAL).unwrap();
    p.server.ep.recv(dst.full(), 1).unwrap();
    p.client.ep.injectdata(b"inject!", 77).unwrap();
    let c = next(&p.server.cq);
    ok(&c);
    assert_eq!((c.len, c.data), (7, 77));
    assert_eq!(
        c.flags,
        CompFlags::MSG | CompFlags::RECV | CompFlags::REMOTE_CQ_DATA
    );
    assert_eq!(dst.to_vec(0, 7).unwrap(), b"inject!");
    let mut v = Vec::new();
    p.client
        .cq
        .sread(&mut v, 1, Some(Duration::from_millis(50)))
        .unwrap();
    assert!(v.is_empty(), "inject produced {v:?}");
    assert!(p.client.ep.inject(&[0; 4097]).is_err());
}

#[test]
fn delivery_complete_waits_for_placement() {
    let p = pair();
    let src = p.client.domain.alloc(32, Access::LOCAL).unwrap();
    let msg = Msg {
        iov: &[src.full()],
        context: 9,
        data: 0,
    };
    p.client
        .ep
        .sendmsg(&msg, OpFlags::COMPLETION | OpFlags::DELIVERY_COMPLETE)
        .unwrap();
    // No receive posted: the message is buffered, not delivered, so no completion.
    let mut v = Vec::new();
    p.client
        .cq
        .sread(&mut v, 1, Some(Duration::from_millis(150)))
        .unwrap();
    assert!(v.is_empty(), "{v:?}");
    let dst = p.server.domain.alloc(32, Access::LOCAL).unwrap();
    p.server.ep.recv(dst.full(), 1).unwrap();
    ok(&next(&p.server.cq));
    let c = next(&p.client.cq);
    ok(&c);
    assert_eq!(c.context, 9);
}

#[test]
fn many_small_messages_stay_in_order() {
    let p = pair();
    let n = 2000usize;
    let src = p.client.domain.alloc(n * 8, Access::LOCAL).unwrap();
    let dst = p.server.domain.alloc(n * 8, Access::LOCAL).unwrap();
    for i in 0..n {
        src.write_at(i * 8, &(i as u64).to_le_bytes()).unwrap();
    }
    let mut sent = 0;
    let mut posted = 0;
    let mut got = 0;
    let mut done = 0;
    let deadline = std::time::Instant::now() + T;
    let mut v = Vec::new();
    while got < n || done < n {
        assert!(std::time::Instant::now() < deadline);
        while posted < n && posted < got + 512 {
            p.server
                .ep
                .recv(dst.iov(posted * 8, 8), posted as u64)
                .unwrap();
            posted += 1;
        }
        while sent < n && sent < done + 512 {
            p.client.ep.send(src.iov(sent * 8, 8), sent as u64).unwrap();
            sent += 1;
        }
        v.clear();
        p.server.cq.read(&mut v, 64).unwrap();
        for c in &v {
            ok(c);
            assert_eq!(c.context, got as u64);
            got += 1;
        }
        v.clear();
        p.client.cq.read(&mut v, 64).unwrap();
        done += v.len();
    }
    for i in 0..n {
        let mut b = [0u8; 8];
        dst.read_at(i * 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), i as u64);
    }
}

//! RMA write / read / write with CQ data, and remote access checks.

mod common;

use std::time::Duration;

use common::*;
use fabric_core::*;

#[test]
fn write_read_round_trip_large_and_small() {
    let p = pair();
    for size in [1usize, 4096, 3 << 20] {
        let target = p.server.domain.alloc(size + 64, Access::REMOTE).unwrap();
        let remote = target.remote();
        assert_eq!(remote.addr, 0);
        let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
        src.write_at(0, &pattern(size, 5)).unwrap();
        p.client
            .ep
            .write(src.full(), remote.iov(64, size), 1)
            .unwrap();
        let c = next(&p.client.cq);
        ok(&c);
        assert_eq!((c.context, c.len), (1, size));
        assert_eq!(c.flags, CompFlags::RMA | CompFlags::WRITE);
        // Written data is visible at the target when the write completes.
        assert!(target.to_vec(64, size).unwrap() == pattern(size, 5));
        assert_eq!(target.to_vec(0, 64).unwrap(), vec![0; 64]);
        // Read it back.
        let back = p.client.domain.alloc(size, Access::LOCAL).unwrap();
        p.client
            .ep
            .read(back.full(), remote.iov(64, size), 2)
            .unwrap();
        let c = next(&p.client.cq);
        ok(&c);
        assert_eq!((c.context, c.len), (2, size));
        assert_eq!(c.flags, CompFlags::RMA | CompFlags::READ);
        assert!(back.to_vec(0, size).unwrap() == pattern(size, 5));
    }
    // No completion reached the server's queue: plain writes are silent there.
    let mut v = Vec::new();
    p.server.cq.read(&mut v, 8).unwrap();
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn multi_iov_write_and_read() {
    let p = pair();
    let target = p.server.domain.alloc(1000, Access::REMOTE).unwrap();
    let r = target.remote();
    let src = p.client.domain.alloc(300, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(300, 7)).unwrap();
    let msg = RmaMsg {
        iov: &[src.iov(0, 100), src.iov(100, 200)],
        rma_iov: &[r.iov(900, 50), r.iov(0, 250)],
        context: 3,
        data: 0,
    };
    p.client.ep.writemsg(&msg, OpFlags::COMPLETION).unwrap();
    ok(&next(&p.client.cq));
    let want = pattern(300, 7);
    assert_eq!(target.to_vec(900, 50).unwrap(), want[..50]);
    assert_eq!(target.to_vec(0, 250).unwrap(), want[50..]);
    let back = p.client.domain.alloc(300, Access::LOCAL).unwrap();
    let msg = RmaMsg {
        iov: &[back.iov(0, 300)],
        rma_iov: &[r.iov(900, 50), r.iov(0, 250)],
        context: 4,
        data: 0,
    };
    p.client.ep.readmsg(&msg, OpFlags::COMPLETION).unwrap();
    ok(&next(&p.client.cq));
    assert_eq!(back.to_vec(0, 300).unwrap(), want);
}

#[test]
fn writedata_consumes_a_receive() {
    let p = pair();
    let target = p.server.domain.alloc(128, Access::REMOTE).unwrap();
    let rbuf = p.server.domain.alloc(16, Access::LOCAL).unwrap();
    let src = p.client.domain.alloc(128, Access::LOCAL).unwrap();
    src.write_at(0, &[0xab; 128]).unwrap();
    p.server.ep.recv(rbuf.full(), 55).unwrap();
    p.client
        .ep
        .writedata(src.full(), target.remote().full(), 0x1234_5678_9abc, 1)
        .unwrap();
    let c = next(&p.server.cq);
    ok(&c);
    assert_eq!(c.context, 55);
    assert_eq!(c.len, 128);
    assert_eq!(c.data, 0x1234_5678_9abc);
    assert_eq!(
        c.flags,
        CompFlags::RMA | CompFlags::REMOTE_WRITE | CompFlags::REMOTE_CQ_DATA
    );
    assert_eq!(target.to_vec(0, 128).unwrap(), vec![0xab; 128]);
    ok(&next(&p.client.cq));
    // Without a posted receive the notification waits for one.
    p.client
        .ep
        .writedata(src.iov(0, 8), target.remote().iov(0, 8), 7, 2)
        .unwrap();
    ok(&next(&p.client.cq)); // the write itself completes (data placed)
    p.server.ep.recv(rbuf.full(), 56).unwrap();
    let c = next(&p.server.cq);
    assert_eq!((c.context, c.data, c.len), (56, 7, 8));
}

fn expect_remote_access(cq: &CompletionQueue, context: u64, needle: &str) {
    let c = next(cq);
    assert_eq!(c.context, context);
    let e = c.status.expect_err("expected a remote access error");
    assert_eq!(e.kind, CqErrorKind::RemoteAccess, "{e}");
    assert!(
        e.detail.contains(needle),
        "detail '{}' lacks '{needle}'",
        e.detail
    );
}

#[test]
fn remote_access_violations_leave_memory_untouched() {
    let p = pair();
    let rw = p.server.domain.alloc(4096, Access::REMOTE).unwrap();
    let ro = p.server.domain.alloc(4096, Access::REMOTE_READ).unwrap();
    let wo = p.server.domain.alloc(4096, Access::REMOTE_WRITE).unwrap();
    for m in [&rw, &ro, &wo] {
        m.fill(0, 4096, 0x5a).unwrap();
    }
    let src = p.client.domain.alloc(8192, Access::LOCAL).unwrap();
    src.fill(0, 8192, 0xff).unwrap();

    // Unknown key.
    let mut bad = rw.remote();
    bad.key ^= 0x8000_0000_0000_0001;
    p.client
        .ep
        .write(src.iov(0, 16), bad.iov(0, 16), 1)
        .unwrap();
    expect_remote_access(&p.client.cq, 1, "key");
    p.client.ep.read(src.iov(0, 16), bad.iov(0, 16), 2).unwrap();
    expect_remote_access(&p.client.cq, 2, "key");
    // Out of bounds (end past the region, and an offset that overflows).
    p.client
        .ep
        .write(src.iov(0, 4096), rw.remote().iov(1, 4096), 3)
        .unwrap();
    expect_remote_access(&p.client.cq, 3, "outside");
    p.client
        .ep
        .write(src.iov(0, 16), rw.remote().iov(u64::MAX - 7, 16), 4)
        .unwrap();
    expect_remote_access(&p.client.cq, 4, "outside");
    p.client
        .ep
        .read(src.iov(0, 8192), rw.remote().iov(0, 8192), 5)
        .unwrap();
    expect_remote_access(&p.client.cq, 5, "outside");
    // Missing rights.
    p.client
        .ep
        .write(src.iov(0, 16), ro.remote().iov(0, 16), 6)
        .unwrap();
    expect_remote_access(&p.client.cq, 6, "right");
    p.client
        .ep
        .read(src.iov(0, 16), wo.remote().iov(0, 16), 7)
        .unwrap();
    expect_remote_access(&p.client.cq, 7, "right");
    // One bad iovec of several: nothing is written, the error names iov 1.
    let msg = RmaMsg {
        iov: &[src.iov(0, 32)],
        rma_iov: &[rw.remote().iov(0, 16), ro.remote().iov(0, 16)],
        context: 8,
        data: 0,
    };
    p.client.ep.writemsg(&msg, OpFlags::COMPLETION).unwrap();
    expect_remote_access(&p.client.cq, 8, "iov 1");
    // Writedata refused: no receive consumed at the target.
    let rbuf = p.server.domain.alloc(8, Access::LOCAL).unwrap();
    p.server.ep.recv(rbuf.full(), 77).unwrap();
    p.client
        .ep
        .writedata(src.iov(0, 8), ro.remote().iov(0, 8), 1, 9)
        .unwrap();
    expect_remote_access(&p.client.cq, 9, "right");

    for m in [&rw, &ro, &wo] {
        assert_eq!(m.to_vec(0, 4096).unwrap(), vec![0x5a; 4096]);
    }
    // The connection still works, and the receive is still there.
    p.client.ep.send(src.iov(0, 4), 10).unwrap();
    let c = next(&p.server.cq);
    ok(&c);
    assert_eq!((c.context, c.len), (77, 4));
    ok(&next(&p.client.cq));
}

#[test]
fn deregistered_key_is_refused() {
    let p = pair();
    let mr = p.server.domain.alloc(64, Access::REMOTE).unwrap();
    let remote = mr.remote();
    assert_ne!(remote.key, 0);
    drop(mr);
    let src = p.client.domain.alloc(64, Access::LOCAL).unwrap();
    p.client.ep.write(src.full(), remote.full(), 1).unwrap();
    expect_remote_access(&p.client.cq, 1, "key");
}

#[test]
fn inject_write_error_has_context_zero() {
    let p = pair();
    p.client
        .ep
        .inject_write(
            b"abc",
            RemoteIov {
                addr: 0,
                len: 3,
                key: 42,
            },
        )
        .unwrap();
    expect_remote_access(&p.client.cq, 0, "key");
    let target = p.server.domain.alloc(8, Access::REMOTE).unwrap();
    p.client
        .ep
        .inject_write(b"abc", target.remote().iov(2, 3))
        .unwrap();
    // No completion on success; the data lands (check after a following op completes).
    let src = p.client.domain.alloc(1, Access::LOCAL).unwrap();
    p.client
        .ep
        .read(src.full(), target.remote().iov(2, 1), 5)
        .unwrap();
    let c = next(&p.client.cq);
    assert_eq!(c.context, 5);
    assert_eq!(target.to_vec(2, 3).unwrap(), b"abc");
}

#[test]
fn write_then_send_is_ordered() {
    let p = pair();
    let target = p
        .server
        .domain
        .alloc(1 << 20, Access::REMOTE | Access::LOCAL)
        .unwrap();
    let src = p.client.domain.alloc(1 << 20, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(1 << 20, 11)).unwrap();
    p.server.ep.recv(target.iov(0, 0), 1).unwrap();
    p.client
        .ep
        .write(src.full(), target.remote().full(), 2)
        .unwrap();
    p.client.ep.send(src.iov(0, 0), 3).unwrap();
    // When the message arrives, the earlier write is complete at the target.
    ok(&next(&p.server.cq));
    assert!(target.to_vec(0, 1 << 20).unwrap() == pattern(1 << 20, 11));
    let mut v = Vec::new();
    while v.len() < 2 {
        v.push(next(&p.client.cq));
    }
    let _ = Duration::ZERO;
}

#[test]
fn uncached_region_receives_writes() {
    let p = pair();
    let size = 1 << 20;
    let target = p
        .server
        .domain
        .register(
            HeapMemory::new(size).unwrap(),
            Access::REMOTE,
            MrFlags::UNCACHED,
        )
        .unwrap();
    let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(size, 13)).unwrap();
    let msg = RmaMsg {
        iov: &[src.iov(0, 1000), src.iov(1000, size - 1000)],
        rma_iov: &[
            target.remote().iov(size as u64 - 1000, 1000),
            target.remote().iov(0, size - 1000),
        ],
        context: 1,
        data: 0,
    };
    p.client.ep.writemsg(&msg, OpFlags::COMPLETION).unwrap();
    ok(&next(&p.client.cq));
    let want = pattern(size, 13);
    assert!(target.to_vec(size - 1000, 1000).unwrap() == want[..1000]);
    assert!(target.to_vec(0, size - 1000).unwrap() == want[1000..]);
}

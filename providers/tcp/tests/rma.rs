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
    // Without a posted receive the notification waits for one, and so does the
    // initiator's completion (as RNR holds an RC write with immediate).
    p.client
        .ep
        .writedata(src.iov(0, 8), target.remote().iov(0, 8), 7, 2)
        .unwrap();
    assert!(
        p.client.cq.wait(Duration::from_millis(100)).is_err(),
        "the write completed before the target had a receive for its CQ data"
    );
    p.server.ep.recv(rbuf.full(), 56).unwrap();
    let c = next(&p.server.cq);
    assert_eq!((c.context, c.data, c.len), (56, 7, 8));
    let c = next(&p.client.cq);
    ok(&c);
    assert_eq!(c.context, 2);
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

/// The server's regions of one violation: read-write, read-only, write-only, all
/// filled with 0x5a, and a client source of 0xff.
struct Regions {
    rw: MemoryRegion,
    ro: MemoryRegion,
    wo: MemoryRegion,
    src: MemoryRegion,
}

/// Runs one refused access on a fresh pair: the initiator gets RemoteAccess naming
/// `needle`, no region is touched, the target's posted receive is flushed (never
/// consumed), both ends get Shutdown AccessError and later posts fail at the call.
fn violation(needle: &str, post: impl FnOnce(&Pair, &Regions)) {
    let p = pair();
    let r = Regions {
        rw: p.server.domain.alloc(4096, Access::REMOTE).unwrap(),
        ro: p.server.domain.alloc(4096, Access::REMOTE_READ).unwrap(),
        wo: p.server.domain.alloc(4096, Access::REMOTE_WRITE).unwrap(),
        src: p.client.domain.alloc(8192, Access::LOCAL).unwrap(),
    };
    for m in [&r.rw, &r.ro, &r.wo] {
        m.fill(0, 4096, 0x5a).unwrap();
    }
    r.src.fill(0, 8192, 0xff).unwrap();
    let rbuf = p.server.domain.alloc(8, Access::LOCAL).unwrap();
    p.server.ep.recv(rbuf.full(), 77).unwrap();
    post(&p, &r);
    expect_remote_access(&p.client.cq, 9, needle);
    let c = next(&p.server.cq);
    assert_eq!(c.context, 77);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
    for m in [&r.rw, &r.ro, &r.wo] {
        assert_eq!(m.to_vec(0, 4096).unwrap(), vec![0x5a; 4096], "{needle}");
    }
    for side in [&p.client, &p.server] {
        match side.eq.wait(T).unwrap() {
            Event::Shutdown { fid, reason } => {
                assert_eq!(fid, side.ep.fid());
                assert_eq!(reason, ShutdownReason::AccessError);
            }
            other => panic!("expected Shutdown, got {other:?}"),
        }
    }
    let e = p.client.ep.send(r.src.iov(0, 4), 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
    let e = p.server.ep.recv(rbuf.full(), 11).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
}

#[test]
fn remote_access_violations_leave_memory_untouched_and_end_the_connection() {
    let bad = |r: &Regions| {
        let mut b = r.rw.remote();
        b.key ^= 0x8000_0000_0000_0001;
        b
    };
    violation("key", |p, r| {
        p.client
            .ep
            .write(r.src.iov(0, 16), bad(r).iov(0, 16), 9)
            .unwrap()
    });
    violation("key", |p, r| {
        p.client
            .ep
            .read(r.src.iov(0, 16), bad(r).iov(0, 16), 9)
            .unwrap()
    });
    // Out of bounds (end past the region, and an offset that overflows).
    violation("outside", |p, r| {
        p.client
            .ep
            .write(r.src.iov(0, 4096), r.rw.remote().iov(1, 4096), 9)
            .unwrap()
    });
    violation("outside", |p, r| {
        p.client
            .ep
            .write(r.src.iov(0, 16), r.rw.remote().iov(u64::MAX - 7, 16), 9)
            .unwrap()
    });
    violation("outside", |p, r| {
        p.client
            .ep
            .read(r.src.iov(0, 8192), r.rw.remote().iov(0, 8192), 9)
            .unwrap()
    });
    // Missing rights.
    violation("right", |p, r| {
        p.client
            .ep
            .write(r.src.iov(0, 16), r.ro.remote().iov(0, 16), 9)
            .unwrap()
    });
    violation("right", |p, r| {
        p.client
            .ep
            .read(r.src.iov(0, 16), r.wo.remote().iov(0, 16), 9)
            .unwrap()
    });
    // One bad iovec of several: nothing is written, the error names iov 1.
    violation("iov 1", |p, r| {
        let msg = RmaMsg {
            iov: &[r.src.iov(0, 32)],
            rma_iov: &[r.rw.remote().iov(0, 16), r.ro.remote().iov(0, 16)],
            context: 9,
            data: 0,
        };
        p.client.ep.writemsg(&msg, OpFlags::COMPLETION).unwrap();
    });
    // Writedata refused: the target's receive is flushed, never consumed.
    violation("right", |p, r| {
        p.client
            .ep
            .writedata(r.src.iov(0, 8), r.ro.remote().iov(0, 8), 1, 9)
            .unwrap()
    });
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
    // The refusal ended that connection; a successful inject_write on a new one.
    let p = pair();
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

/// A write posted at transmit level: it completes once handed to the socket (the
/// target sends no ACK for it), lands before a message posted after it, and a refused
/// one still ends the connection at both ends with AccessError, leaving the target's
/// memory untouched.
#[test]
fn transmit_level_write_lands_in_order_and_refusal_still_ends_the_connection() {
    let p = pair();
    let size = 256 << 10;
    let target = p.server.domain.alloc(size, Access::REMOTE).unwrap();
    let rbuf = p.server.domain.alloc(8, Access::LOCAL).unwrap();
    let src = p.client.domain.alloc(size, Access::LOCAL).unwrap();
    for round in 0..20u8 {
        src.write_at(0, &pattern(size, round)).unwrap();
        p.server.ep.recv(rbuf.full(), 50).unwrap();
        let msg = RmaMsg {
            iov: &[src.full()],
            rma_iov: &[target.remote().full()],
            context: 1,
            data: 0,
        };
        p.client
            .ep
            .writemsg(&msg, OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE)
            .unwrap();
        p.client.ep.send(src.iov(0, 8), 2).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let c = next(&p.client.cq);
            ok(&c);
            got.push((c.context, c.flags));
        }
        assert_eq!(
            got,
            [
                (1, CompFlags::RMA | CompFlags::WRITE),
                (2, CompFlags::MSG | CompFlags::SEND)
            ]
        );
        // When the message arrives, the write before it has landed.
        let c = next(&p.server.cq);
        ok(&c);
        assert_eq!(c.context, 50);
        assert!(target.to_vec(0, size).unwrap() == pattern(size, round));
    }
    // Refused (wrong key): the write completed when sent; the refusal ends the
    // connection at both ends, and a later receive is flushed.
    target.fill(0, size, 0x5a).unwrap();
    p.server.ep.recv(rbuf.full(), 77).unwrap();
    let mut bad = target.remote();
    bad.key ^= 1;
    let msg = RmaMsg {
        iov: &[src.iov(0, 64)],
        rma_iov: &[bad.iov(0, 64)],
        context: 9,
        data: 0,
    };
    p.client
        .ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::TRANSMIT_COMPLETE)
        .unwrap();
    let c = next(&p.client.cq);
    assert_eq!(c.context, 9);
    ok(&c);
    for side in [&p.client, &p.server] {
        match side.eq.wait(T).unwrap() {
            Event::Shutdown { reason, .. } => assert_eq!(reason, ShutdownReason::AccessError),
            other => panic!("expected Shutdown, got {other:?}"),
        }
    }
    let c = next(&p.server.cq);
    assert_eq!(c.context, 77);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
    assert_eq!(target.to_vec(0, size).unwrap(), vec![0x5a; size]);
    let e = p.client.ep.send(src.iov(0, 4), 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotConnected);
}

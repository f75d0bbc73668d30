//! The conformance suite against the verbs provider, one test per group, when built
//! with `--features verbs` (`cargo test -p fabric-conformance --features verbs --test
//! verbs`), and checks of the verbs provider that only a device can show. It needs an
//! RDMA device (kernel `rdma_rxe` will do): where getinfo finds none, every test fails
//! with the provider's reason ("no RDMA device: ..."), so run it only where one exists,
//! e.g. inside the VM tier (tests/vm/steps/50-verbs.sh runs the `fabric-conformance`
//! binary for the suite and this file's own tests by name). Without the feature this
//! file is empty.
#![cfg(feature = "verbs")]

use std::time::{Duration, Instant};

use fabric::{Access, Caps, CqErrorKind, ErrorKind, Event, ShutdownReason};
use fabric_conformance::{ctx_for, CaseError, Pair, Who};

/// The tests of this file share the host's RDMA device: one at a time.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fabric_conformance::group_tests!(
    "verbs",
    guard = DEVICE.lock().unwrap_or_else(|e| e.into_inner())
);

fn ok<T>(r: Result<T, CaseError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn pair() -> Pair {
    ok(ctx_for("verbs").pair(Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA))
}

fn expect_shutdown(p: &Pair, who: Who, want: ShutdownReason) {
    match ok(p.wait_event(who)) {
        Event::Shutdown { reason, .. } => assert_eq!(reason, want, "{who:?}: shutdown reason"),
        other => panic!("{who:?}: expected Shutdown {want:?}, got {other:?}"),
    }
}

/// A write with CQ data and a wrong key: the initiator's operation fails
/// `RemoteAccess`; the target (whose rxe responder took the posted receive for the
/// write, then refused it) sees that receive flushed, `Canceled`, never consumed; both
/// ends report `Shutdown { AccessError }` (the target from its own QP's error, not by
/// inference from the peer's disconnect), and posts on either end fail at the call.
#[test]
fn access_error_ends_both_ends() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let p = pair();
    let t = ok(p.server.alloc(64, Access::REMOTE));
    t.fill(0, 64, 0x5A).expect("fill");
    let rx = ok(p.server.alloc(64, Access::RECV));
    p.server.ep.recv(rx.full(), 1).expect("post recv");
    let l = ok(p.client.alloc(64, Access::WRITE | Access::SEND));
    let mut bad = t.remote().iov(0, 64);
    bad.key ^= 0x5A5A_5A5A;
    p.client
        .ep
        .writedata(l.full(), bad, 7, 2)
        .expect("writedata"); // data 7, context 2
    let c = ok(p.wait(Who::Client));
    assert_eq!(c.context, 2);
    assert!(
        matches!(&c.status, Err(e) if e.kind == CqErrorKind::RemoteAccess),
        "initiator: {c:?}"
    );
    let r = ok(p.wait(Who::Server));
    assert_eq!(r.context, 1, "the target's receive");
    assert!(
        matches!(&r.status, Err(e) if e.kind == CqErrorKind::Canceled),
        "target's receive: {r:?}"
    );
    expect_shutdown(&p, Who::Client, ShutdownReason::AccessError);
    expect_shutdown(&p, Who::Server, ShutdownReason::AccessError);
    let e = p
        .client
        .ep
        .send(l.iov(0, 8), 9)
        .expect_err("client send after the end");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "client: {e}");
    let e = p
        .server
        .ep
        .recv(rx.full(), 9)
        .expect_err("server recv after the end");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "server: {e}");
    assert_eq!(
        t.to_vec(0, 64).expect("read target"),
        vec![0x5A; 64],
        "target untouched"
    );
}

/// The RNR NAK timer is lowered on the connected QP (the CM leaves 655 ms): a write
/// with CQ data posted before the target's receive completes soon after the receive is
/// posted, not at the next 655 ms retry.
#[test]
fn rnr_timer_is_lowered() {
    let _g = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    let p = pair();
    let t = ok(p.server.alloc(64, Access::REMOTE));
    let rx = ok(p.server.alloc(64, Access::RECV));
    let l = ok(p.client.alloc(64, Access::WRITE));
    p.client
        .ep
        .writedata(l.full(), t.remote().iov(0, 64), 7, 1) // data 7, context 1
        .expect("writedata");
    // The first attempt meets no receive: RNR NAK, the initiator waits.
    ok(p.expect_no_completion(
        Who::Client,
        Duration::from_millis(100),
        "before the receive",
    ));
    let t0 = Instant::now();
    p.server.ep.recv(rx.full(), 2).expect("post recv");
    let r = ok(p.wait_ok(Who::Server));
    assert_eq!((r.context, r.data), (2, 7));
    ok(p.wait_ok(Who::Client));
    let took = t0.elapsed();
    println!("writedata completed {took:?} after the receive was posted");
    assert!(
        took < Duration::from_millis(400),
        "{took:?}: the RNR NAK timer was not lowered (the CM's 655 ms)"
    );
}

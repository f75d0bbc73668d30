//! Progress models: background thread, blocking waits, async under tokio.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fabric_core::*;

#[test]
fn auto_progress_serves_rma_without_the_target_polling() {
    // Server in its own fabric with Progress::Auto; nobody reads its queues.
    let p = pair_with(b"", b"", true, Progress::Auto);
    let target = p.server.domain.alloc(1 << 20, Access::REMOTE).unwrap();
    let src = p.client.domain.alloc(1 << 20, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(1 << 20, 2)).unwrap();
    for i in 0..10 {
        p.client
            .ep
            .write(src.full(), target.remote().full(), i)
            .unwrap();
        let c = next(&p.client.cq);
        ok(&c);
        assert_eq!(c.context, i);
    }
    let back = p.client.domain.alloc(1 << 20, Access::LOCAL).unwrap();
    p.client
        .ep
        .read(back.full(), target.remote().full(), 99)
        .unwrap();
    ok(&next(&p.client.cq));
    assert!(back.to_vec(0, 1 << 20).unwrap() == pattern(1 << 20, 2));
}

#[test]
fn sread_wakes_when_another_thread_progresses() {
    let p = pair_with(b"", b"", true, Progress::Manual);
    let dst = p.server.domain.alloc(8, Access::LOCAL).unwrap();
    p.server.ep.recv(dst.full(), 1).unwrap();
    let cq = p.server.cq.clone();
    let waiter = std::thread::spawn(move || {
        let t0 = Instant::now();
        let c = cq.wait(T).unwrap();
        (c, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let src = p.client.domain.alloc(8, Access::LOCAL).unwrap();
    p.client.ep.send(src.full(), 2).unwrap();
    let (c, el) = waiter.join().unwrap();
    ok(&c);
    assert_eq!(c.context, 1);
    assert!(el < Duration::from_secs(5));
    ok(&next(&p.client.cq));
}

#[test]
fn cq_sread_times_out_and_sleeps() {
    let p = pair();
    let mut v = Vec::new();
    let t0 = Instant::now();
    let n = p
        .client
        .cq
        .sread(&mut v, 4, Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(n, 0);
    let el = t0.elapsed();
    assert!(
        el >= Duration::from_millis(190) && el < Duration::from_secs(5),
        "{el:?}"
    );
}

#[test]
fn async_send_recv_under_tokio() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = pair();
        let src = p.client.domain.alloc(1 << 16, Access::LOCAL).unwrap();
        let dst = p.server.domain.alloc(1 << 16, Access::LOCAL).unwrap();
        src.write_at(0, &pattern(1 << 16, 4)).unwrap();
        for round in 0..20u64 {
            p.server.ep.recv(dst.full(), round).unwrap();
            p.client.ep.send(src.full(), 100 + round).unwrap();
            let rc = tokio::time::timeout(T, p.server.cq.next_completion())
                .await
                .expect("recv completion in time")
                .unwrap();
            ok(&rc);
            assert_eq!(rc.context, round);
            let sc = tokio::time::timeout(T, p.client.cq.next_completion())
                .await
                .expect("send completion in time")
                .unwrap();
            ok(&sc);
        }
        assert!(dst.to_vec(0, 1 << 16).unwrap() == pattern(1 << 16, 4));
        // Events too: shut the client down; the server's event arrives asynchronously.
        p.client.ep.shutdown().unwrap();
        let ev = tokio::time::timeout(T, p.server.eq.next_event())
            .await
            .expect("event in time")
            .unwrap();
        assert!(matches!(ev, Event::Shutdown { .. }), "{ev:?}");
    });
}

#[tokio::test]
async fn async_connect_with_tokio_macro() {
    // The whole connection set-up awaited on a current-thread runtime.
    let sinfo = listen_info(Progress::Manual);
    let fabric = Fabric::open(&sinfo).unwrap();
    let domain = fabric.domain(&sinfo).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let ceq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let pep = fabric.passive_endpoint(&sinfo, &eq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    let cinfo = connect_info(port, Progress::Manual);
    let client = domain
        .endpoint(&cinfo, EndpointConfig::new(&cq, &ceq))
        .unwrap();
    client.connect(b"async").unwrap();
    let req = match tokio::time::timeout(T, eq.next_event())
        .await
        .unwrap()
        .unwrap()
    {
        Event::ConnRequest(r) => r,
        other => panic!("{other:?}"),
    };
    let server = domain
        .endpoint(&req.info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    server.accept(b"ok").unwrap();
    match tokio::time::timeout(T, ceq.next_event())
        .await
        .unwrap()
        .unwrap()
    {
        Event::Connected { data, .. } => assert_eq!(data, b"ok"),
        other => panic!("{other:?}"),
    }
}

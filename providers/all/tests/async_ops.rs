//! Per-operation futures: several tokio tasks sharing one completion queue each get
//! the completions of their own operations (the queue-level stream hands them to
//! whichever task polls next), and completions of operations posted with the
//! application's own contexts stay with the queue's readers.

use std::time::Duration;

use fabric::*;

const TASKS: usize = 4;
const OPS_PER_TASK: usize = 500;
const T: Duration = Duration::from_secs(10);

struct Pair {
    stop: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    _server_fabric: Fabric,
    _client_fabric: Fabric,
    server_ep: Endpoint,
    client_ep: Endpoint,
    client_cq: CompletionQueue,
    target: MemoryRegion,
    remote: RemoteMr,
}

fn hints(provider: &str, node: &str, port: u16, source: bool, progress: Progress) -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA)
        .ep_type(EpType::Msg)
        .provider(provider)
        .node(node)
        .service(port)
        .source(source)
        .progress(progress)
}

fn pair(provider: &str, node: &str, progress: Progress) -> Pair {
    let info = fabric::getinfo(&hints(provider, node, 0, true, progress))
        .unwrap()
        .remove(0);
    let server_fabric = Fabric::open(&info).unwrap();
    let server_eq = server_fabric.eq(EqAttr::default()).unwrap();
    let listener = server_fabric.passive_endpoint(&info, &server_eq).unwrap();
    listener.listen().unwrap();
    let port = listener.local_addr().unwrap().as_inet().unwrap().port();

    let info = fabric::getinfo(&hints(provider, node, port, false, progress))
        .unwrap()
        .remove(0);
    let client_fabric = Fabric::open(&info).unwrap();
    let domain = client_fabric.domain(&info).unwrap();
    let eq = client_fabric.eq(EqAttr::default()).unwrap();
    let client_cq = domain.cq(CqAttr::default()).unwrap();
    let client_ep = domain
        .endpoint(&info, EndpointConfig::new(&client_cq, &eq))
        .unwrap();
    client_ep.connect(b"").unwrap();

    // The server side runs in its own thread: with manual progress each side moves
    // only while it reads its own queues.
    let server = std::thread::spawn(move || {
        let req = match server_eq.wait(T).unwrap() {
            Event::ConnRequest(r) => r,
            other => panic!("expected a connection request, got {other:?}"),
        };
        let sdomain = server_fabric.domain(&req.info).unwrap();
        let scq = sdomain.cq(CqAttr::default()).unwrap();
        let target = sdomain.alloc(1 << 20, Access::REMOTE).unwrap();
        let pattern: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        target.write_at(0, &pattern).unwrap();
        let server_ep = sdomain
            .endpoint(&req.info, EndpointConfig::new(&scq, &server_eq))
            .unwrap();
        server_ep.accept(b"").unwrap();
        // Keep the server's side moving (manual progress) until the client is done.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let driver = std::thread::spawn(move || {
            let mut v = Vec::new();
            while rx.try_recv().is_err() {
                v.clear();
                let _ = scq.sread(&mut v, 16, Some(Duration::from_millis(1)));
                let _ = server_eq.read();
            }
        });
        (server_fabric, server_ep, target, tx, driver)
    });
    match eq.wait(T).unwrap() {
        Event::Connected { .. } => {}
        other => panic!("expected Connected, got {other:?}"),
    }
    let (server_fabric, server_ep, target, stop, driver) = server.join().unwrap();
    let remote = target.remote();
    Pair {
        stop: Some((stop, driver)),
        _server_fabric: server_fabric,
        _client_fabric: client_fabric,
        server_ep,
        client_ep,
        client_cq,
        target,
        remote,
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some((tx, driver)) = self.stop.take() {
            let _ = tx.send(());
            let _ = driver.join();
        }
    }
}

fn four_tasks_share_a_queue(provider: &str, node: &str, progress: Progress) {
    let p = std::sync::Arc::new(pair(provider, node, progress));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let p = p.clone();
            handles.push(tokio::spawn(async move {
                let domain = p.client_ep.domain().clone();
                let local = domain.alloc(64 << 10, Access::LOCAL).unwrap();
                let mut got = 0usize;
                for i in 0..OPS_PER_TASK {
                    // Each read has its own length and source offset.
                    let len = 1 + (t * 997 + i * 131) % 4096;
                    let off = ((t * OPS_PER_TASK + i) * 509) % ((1 << 20) - 4096);
                    let dst = (i % 8) * 8192;
                    let fut = p
                        .client_ep
                        .read_async(local.iov(dst, len), p.remote.iov(off as u64, len))
                        .unwrap();
                    let ctx = fut.context();
                    let c = tokio::time::timeout(T, fut)
                        .await
                        .expect("a read's completion within 10 s")
                        .unwrap();
                    assert_eq!(
                        c.context, ctx,
                        "task {t} got another operation's completion"
                    );
                    assert!(c.flags.contains(CompFlags::READ), "{c:?}");
                    // The data of this very read is in place when its future resolves.
                    assert_eq!(
                        local.to_vec(dst, len).unwrap(),
                        p.target.to_vec(off, len).unwrap(),
                        "task {t} op {i}: the future resolved before its read landed"
                    );
                    got += 1;
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                got
            }));
        }
        // Meanwhile, the queue's ordinary reader posts writes with its own contexts and
        // sees exactly those completions.
        let user = {
            let p = p.clone();
            tokio::task::spawn_blocking(move || {
                let mr = p.client_ep.domain().alloc(4096, Access::LOCAL).unwrap();
                let mut seen = Vec::new();
                for k in 0..50u64 {
                    p.client_ep
                        .write(mr.iov(0, 64), p.remote.iov((1 << 20) - 4096, 64), 1000 + k)
                        .unwrap();
                    let c = p.client_cq.wait(T).unwrap();
                    assert!(c.is_ok(), "{c:?}");
                    seen.push(c.context);
                }
                seen
            })
        };
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        let seen = user.await.unwrap();
        assert_eq!(total, TASKS * OPS_PER_TASK);
        assert_eq!(seen, (1000..1050).collect::<Vec<u64>>());
    });
    // Nothing is left behind on the queue.
    assert!(p.client_cq.try_next().unwrap().is_none());
    let _ = &p.server_ep;
}

#[test]
fn tcp_four_tasks_share_a_queue() {
    four_tasks_share_a_queue("tcp", "127.0.0.1", Progress::Auto);
}

/// Manual progress: data moves only while the futures drain the queue (and through
/// the provider's waker-driven background progress).
#[test]
fn tcp_four_tasks_share_a_queue_manual_progress() {
    four_tasks_share_a_queue("tcp", "127.0.0.1", Progress::Manual);
}

#[test]
fn an_error_completion_resolves_to_err_with_its_cause() {
    let p = pair("tcp", "127.0.0.1", Progress::Auto);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = p.client_ep.domain().alloc(4096, Access::LOCAL).unwrap();
    // Past the end of the target region: refused by the target.
    let bad = p.remote.iov(p.remote.len - 8, 64);
    let err = rt
        .block_on(async {
            tokio::time::timeout(T, p.client_ep.write_async(local.iov(0, 64), bad).unwrap()).await
        })
        .expect("the refused write completes")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AccessDenied, "{err}");
    let cause = std::error::Error::source(&err).expect("the completion's error is the source");
    let cq_err = cause.downcast_ref::<CqError>().expect("a CqError");
    assert_eq!(cq_err.kind, CqErrorKind::RemoteAccess);
    // A refused post is an error at the call, and leaves no slot behind.
    assert!(p
        .client_ep
        .write_async(local.iov(0, 8192), p.remote.iov(0, 8192))
        .is_err());
    // An inject has no completion to await.
    let m = Msg {
        iov: &[local.iov(0, 8)],
        context: 0,
        data: 0,
    };
    assert_eq!(
        p.client_ep
            .sendmsg_async(&m, OpFlags::INJECT)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
}

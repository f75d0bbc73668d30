//! The software cost of one tcp message on the critical path, against a raw TCP
//! write + read, measured in one thread so that no scheduling or polling period enters
//! the figure (a busy-polled ping-pong between two threads on a loaded 2-core machine
//! mostly measures the scheduler).
//!
//! Each iteration posts a receive at the server end, sends 8 bytes from the client end
//! and reads the server's completion queue until the receive completes (loopback
//! delivers inside the sending call, so the first read finds it); then, interleaved,
//! the same over a raw socket pair (write, then non-blocking reads until the 8 bytes
//! are in). Interleaving puts both under the same load; the medians and the median of
//! the per-iteration differences are printed.
//!
//! ```text
//! cargo run --release -p fabric-examples --example tcp_path -- [iterations]
//! ```

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use fabric::{Access, CqAttr, EndpointConfig, EqAttr, Event, Fabric, Progress};
use fabric_examples::{conn, median};

fn main() -> Result<(), String> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let e = |what: &'static str| move |err: fabric::Error| format!("{what}: {err}");
    let io = |what: &'static str| move |err: std::io::Error| format!("{what}: {err}");

    // Both ends in this thread: the client connects without waiting, the server
    // accepts, and the client's progress is driven until it is connected.
    let l = conn::listen("tcp", "127.0.0.1", 0, Progress::Manual)?;
    let info = fabric::getinfo(&conn::hints(
        "tcp",
        "127.0.0.1",
        l.port,
        false,
        Progress::Manual,
    ))
    .map_err(|x| x.to_string())?
    .remove(0);
    let fab = Fabric::open(&info).map_err(e("fabric"))?;
    let dom = fab.domain(&info).map_err(e("domain"))?;
    let eq = fab.eq(EqAttr::default()).map_err(e("eq"))?;
    let cq = dom.cq(CqAttr::default()).map_err(e("cq"))?;
    let ep = dom
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .map_err(e("endpoint"))?;
    ep.connect(b"").map_err(e("connect"))?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(50) {
        let _ = cq.try_next();
        let _ = eq.read();
    }
    let srv = l.accept(b"", Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = cq.try_next();
        if let Ok(Some(Event::Connected { .. })) = eq.read() {
            break;
        }
        if Instant::now() > deadline {
            return Err("the client did not connect".into());
        }
    }
    let mr = dom.alloc(4096, Access::LOCAL).map_err(e("alloc"))?;
    let smr = srv.domain.alloc(4096, Access::LOCAL).map_err(e("alloc"))?;

    let ls = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind"))?;
    let mut a = std::net::TcpStream::connect(ls.local_addr().map_err(io("addr"))?)
        .map_err(io("connect"))?;
    let (mut b, _) = ls.accept().map_err(io("accept"))?;
    a.set_nodelay(true).map_err(io("nodelay"))?;
    b.set_nonblocking(true).map_err(io("nonblocking"))?;
    // TCP_PATH_RAW_EPOLL=1 gives the raw pair what the provider's sockets have: the
    // receiving socket in an epoll set (as every connection of the provider is, for
    // sleeping waits), both ends TCP_NODELAY, and the provider's send buffer size. It
    // separates the kernel's cost of that set-up from the provider's own work.
    let _epoll = if std::env::var("TCP_PATH_RAW_EPOLL").is_ok_and(|v| v == "1") {
        use std::os::fd::AsRawFd;
        b.set_nodelay(true).map_err(io("nodelay"))?;
        let sndbuf: libc::c_int = 4 << 20;
        // SAFETY: plain system calls on descriptors this function owns; ev and
        // sndbuf are live locals the kernel only reads.
        unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&sndbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if ep < 0 {
                return Err("epoll_create1 failed".into());
            }
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                u64: 1,
            };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, b.as_raw_fd(), &mut ev);
            Some(std::os::fd::FromRawFd::from_raw_fd(ep)).map(|fd: std::os::fd::OwnedFd| fd)
        }
    } else {
        None
    };

    let warm = 1000;
    let (mut fab_ns, mut raw_ns) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut snd, mut rcv, mut wr, mut rd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut buf = [0u8; 8];
    for i in 0..n + warm {
        srv.ep.recv(smr.iov(0, 8), 2).map_err(e("recv"))?;
        let t1 = Instant::now();
        ep.send(mr.iov(0, 8), 1).map_err(e("send"))?;
        let t2 = Instant::now();
        while srv.cq.try_next().map_err(e("cq"))?.is_none() {}
        let t3 = Instant::now();
        while cq.try_next().map_err(e("cq"))?.is_none() {}

        let r0 = Instant::now();
        a.write_all(&buf).map_err(io("write"))?;
        let r1 = Instant::now();
        let mut got = 0;
        while got < 8 {
            match b.read(&mut buf[got..]) {
                Ok(0) => return Err("raw peer closed".into()),
                Ok(k) => got += k,
                Err(x) if x.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(x) => return Err(format!("read: {x}")),
            }
        }
        let r2 = Instant::now();
        if i >= warm {
            let ns = |a: Instant, b: Instant| b.duration_since(a).as_nanos() as f64;
            fab_ns.push(ns(t1, t3));
            snd.push(ns(t1, t2));
            rcv.push(ns(t2, t3));
            raw_ns.push(ns(r0, r2));
            wr.push(ns(r0, r1));
            rd.push(ns(r1, r2));
        }
    }
    let diff: Vec<f64> = fab_ns.iter().zip(&raw_ns).map(|(x, y)| x - y).collect();
    println!(
        "tcp 8 B send + receive completion: {:.0} ns (send call {:.0}, receive {:.0})",
        median(&fab_ns),
        median(&snd),
        median(&rcv)
    );
    println!(
        "raw TCP 8 B write + read:          {:.0} ns (write {:.0}, read {:.0})",
        median(&raw_ns),
        median(&wr),
        median(&rd)
    );
    println!(
        "median paired difference {:.0} ns; ratio of medians {:.3} ({n} iterations)",
        median(&diff),
        median(&fab_ns) / median(&raw_ns)
    );
    Ok(())
}

//! Ping-pong latency / bandwidth of the tcp provider over loopback, in the manner of
//! `fi_pingpong` (two processes, polled completion queues, manual progress).
//!
//! ```text
//! cargo run --release -p fabric-tcp --example pp            # spawns its own server
//! cargo run --release -p fabric-tcp --example pp -- server  # prints the port
//! cargo run --release -p fabric-tcp --example pp -- client PORT
//! ```
//! Output per size: one-way latency (µs per transfer) and MB/s counted as
//! fi_pingpong does (2 x size x iterations / time).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabric_core::*;

const SIZES: &[(usize, usize)] = &[(8, 20_000), (4096, 10_000), (65536, 4_000), (1 << 20, 500)];

struct Conn {
    _fabric: Fabric,
    domain: Domain,
    cq: CompletionQueue,
    ep: Endpoint,
    _pep: Option<PassiveEndpoint>,
}

fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG)
        .ep_type(EpType::Msg)
        .provider("tcp")
}

fn registry() -> Registry {
    Registry::new().with(fabric_tcp::provider())
}

fn server() -> Result<Conn> {
    let info = registry()
        .getinfo(&hints().source(true).node("127.0.0.1").service(0))?
        .remove(0);
    let fabric = Fabric::open(&info)?;
    let domain = fabric.domain(&info)?;
    let eq = fabric.eq(EqAttr::default())?;
    let cq = domain.cq(CqAttr::default())?;
    let pep = fabric.passive_endpoint(&info, &eq)?;
    pep.listen()?;
    println!("{}", pep.local_addr()?);
    let req = match eq.wait(Duration::from_secs(30))? {
        Event::ConnRequest(r) => r,
        other => return Err(Error::new(ErrorKind::Protocol, format!("{other:?}"))),
    };
    let ep = domain.endpoint(&req.info, EndpointConfig::new(&cq, &eq))?;
    ep.accept(b"")?;
    eq.wait(Duration::from_secs(30))?;
    Ok(Conn {
        _fabric: fabric,
        domain,
        cq,
        ep,
        _pep: Some(pep),
    })
}

fn client(port: u16) -> Result<Conn> {
    let info = registry()
        .getinfo(&hints().node("127.0.0.1").service(port))?
        .remove(0);
    let fabric = Fabric::open(&info)?;
    let domain = fabric.domain(&info)?;
    let eq = fabric.eq(EqAttr::default())?;
    let cq = domain.cq(CqAttr::default())?;
    let ep = domain.endpoint(&info, EndpointConfig::new(&cq, &eq))?;
    ep.connect(b"")?;
    match eq.wait(Duration::from_secs(30))? {
        Event::Connected { .. } => {}
        other => return Err(Error::new(ErrorKind::Protocol, format!("{other:?}"))),
    }
    Ok(Conn {
        _fabric: fabric,
        domain,
        cq,
        ep,
        _pep: None,
    })
}

/// Polls until a receive completes (send completions are counted and dropped).
fn wait_recv(c: &Conn, v: &mut Vec<Completion>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut spins = 0u32;
    loop {
        v.clear();
        c.cq.read(v, 8)?;
        for x in v.iter() {
            if let Err(e) = &x.status {
                return Err(Error::new(ErrorKind::Io, e.to_string()));
            }
            if x.flags.contains(CompFlags::RECV) {
                return Ok(());
            }
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && Instant::now() > deadline {
            return Err(Error::new(ErrorKind::TimedOut, "no message"));
        }
    }
}

fn run(c: &Conn, initiator: bool) -> Result<()> {
    let mut v = Vec::with_capacity(8);
    for &(size, iters) in SIZES {
        let sbuf = c.domain.alloc(size, Access::LOCAL)?;
        let rbuf = c.domain.alloc(size, Access::LOCAL)?;
        let warm = iters / 10;
        let total = iters + warm;
        if !initiator {
            c.ep.recv(rbuf.full(), 1)?;
        }
        let mut start = Instant::now();
        for i in 0..total {
            if i == warm {
                start = Instant::now();
            }
            if initiator {
                c.ep.recv(rbuf.full(), 1)?;
                c.ep.send(sbuf.full(), 2)?;
                wait_recv(c, &mut v)?;
            } else {
                wait_recv(c, &mut v)?;
                if i + 1 < total {
                    c.ep.recv(rbuf.full(), 1)?;
                }
                c.ep.send(sbuf.full(), 2)?;
            }
        }
        let el = start.elapsed();
        if initiator {
            let us = el.as_secs_f64() * 1e6 / (2.0 * iters as f64);
            let mbs = 2.0 * size as f64 * iters as f64 / el.as_secs_f64() / 1e6;
            println!("{size:>9} B {iters:>7} iters {us:>9.2} us/xfer {mbs:>9.0} MB/s");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("server") => {
            let c = server()?;
            run(&c, false)
        }
        Some("client") => {
            let port = args
                .get(2)
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| Error::invalid("usage: pp client PORT"))?;
            let c = client(port)?;
            run(&c, true)
        }
        _ => {
            let exe = std::env::current_exe()?;
            let mut child = Command::new(exe)
                .arg("server")
                .stdout(Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            let out = child
                .stdout
                .take()
                .ok_or_else(|| Error::invalid("no stdout"))?;
            BufReader::new(out).read_line(&mut line)?;
            let port: u16 = line
                .trim()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| Error::invalid(format!("bad server line '{line}'")))?;
            println!("tcp provider ping-pong over 127.0.0.1 (manual progress, polled)");
            let c = client(port)?;
            run(&c, true)?;
            let _ = child.wait();
            Ok(())
        }
    }
}

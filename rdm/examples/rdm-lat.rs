//! rdm-lat: 8-byte ping-pong latency of RDM tagged messages ("PROV;rxm") against the
//! MSG endpoint's send/recv on the same provider, interleaved in one run: each round
//! measures MSG then RDM on fresh endpoints, both ends in this process (one thread
//! each), completions busy-polled on both (`CompletionQueue::read` /
//! `RdmEndpoint::read` in a loop). Prints each round's median one-way latency, then
//! per provider the median over rounds of each and the median of the per-round ratios.
//!
//! `cargo run --release -p fabric-rdm --example rdm-lat -- [ROUNDS] [ITERS] [PROVIDERS]`
//! (defaults: 7 rounds, 20000 round trips, `tcp,softroce`).

use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_rdm::*;

const T: Duration = Duration::from_secs(10);
const WARMUP: usize = 200;

fn registry() -> Registry {
    Registry::new()
        .with(fabric_tcp::provider())
        .with(fabric_softroce::provider())
}

fn ip_for(provider: &str) -> String {
    if provider == "softroce" {
        let ip = fabric_softroce::free_loopback_ip().expect("a free loopback address");
        fabric_softroce::configure_device(ip, fabric_softroce::DeviceConfig::default())
            .expect("configure the device");
        ip.to_string()
    } else {
        "127.0.0.1".into()
    }
}

/// Median one-way latency in µs (half the round trip).
fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6 / 2.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed_out(what: &str) -> Error {
    Error::new(
        ErrorKind::TimedOut,
        format!("{what}: no completion in time"),
    )
}

/// Busy-polls an RDM endpoint for one completion.
fn rdm_poll(ep: &RdmEndpoint, buf: &mut Vec<RdmCompletion>) -> Result<RdmCompletion> {
    let t0 = Instant::now();
    let mut spins = 0u32;
    loop {
        if ep.read(buf, 1) == 1 {
            let c = buf.pop().expect("one read");
            if let Err(e) = &c.status {
                return Err(Error::new(ErrorKind::Io, format!("rdm completion: {e:?}")));
            }
            return Ok(c);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && t0.elapsed() > T {
            return Err(timed_out("rdm"));
        }
        std::hint::spin_loop();
    }
}

/// Busy-polls a completion queue for one completion.
fn cq_poll(cq: &CompletionQueue, buf: &mut Vec<Completion>) -> Result<Completion> {
    let t0 = Instant::now();
    let mut spins = 0u32;
    loop {
        if cq.read(buf, 1)? == 1 {
            let c = buf.pop().expect("one read");
            if let Err(e) = &c.status {
                return Err(Error::new(ErrorKind::Io, format!("msg completion: {e:?}")));
            }
            return Ok(c);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && t0.elapsed() > T {
            return Err(timed_out("msg"));
        }
        std::hint::spin_loop();
    }
}

fn rdm_run(provider: &str, iters: usize) -> Result<f64> {
    let ip = ip_for(provider);
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::TAGGED)
        .provider(&format!("{provider};rxm"))
        .node(&ip)
        .service(0)
        .source(true);
    let info = fabric_rdm::getinfo(&registry(), &hints)?.remove(0);
    let open = || -> Result<(Fabric, Domain, AddressVector, RdmEndpoint)> {
        let f = Fabric::open(info.msg())?;
        let d = f.domain(info.msg())?;
        let av = AddressVector::open(&d, AvAttr::default())?;
        let ep = RdmEndpoint::open(&d, &info, &av, RdmAttr::default())?;
        Ok((f, d, av, ep))
    };
    let (_fa, da, ava, a) = open()?;
    let stats0 = ip.parse().ok().and_then(fabric_softroce::device_stats);
    let (_fb, db, avb, b) = open()?;
    let to_b = ava.insert(&b.name())?;
    let to_a = avb.insert(&a.name())?;
    let ma = da.alloc(16, Access::LOCAL)?;
    let mb = db.alloc(16, Access::LOCAL)?;
    let total = iters + WARMUP;
    std::thread::scope(|s| {
        let echo = s.spawn(|| -> Result<()> {
            let mut buf = Vec::with_capacity(4);
            for i in 0..total {
                b.trecv(mb.iov(8, 8), None, 1, 0, i as u64)?;
                rdm_poll(&b, &mut buf)?;
                b.tsend(mb.iov(0, 8), to_a, 2, i as u64)?;
                rdm_poll(&b, &mut buf)?;
            }
            Ok(())
        });
        let mut buf = Vec::with_capacity(4);
        let mut lat = Vec::with_capacity(iters);
        for i in 0..total {
            let t0 = Instant::now();
            a.trecv(ma.iov(8, 8), None, 2, 0, i as u64)?;
            a.tsend(ma.iov(0, 8), to_b, 1, i as u64)?;
            rdm_poll(&a, &mut buf)?;
            rdm_poll(&a, &mut buf)?;
            if i >= WARMUP {
                lat.push(t0.elapsed());
            }
        }
        echo.join().expect("echo thread")?;
        if let (Some(s0), Some(s1)) = (
            stats0,
            ip.parse().ok().and_then(fabric_softroce::device_stats),
        ) {
            if std::env::var("RDM_LAT_STATS").is_ok() {
                println!(
                    "rdm packets per round trip: {:.2}",
                    (s1.tx_packets - s0.tx_packets) as f64 / total as f64
                );
            }
        }
        Ok(median_us(lat))
    })
}

fn msg_run(provider: &str, iters: usize) -> Result<f64> {
    let ip = ip_for(provider);
    let reg = registry();
    let base = Hints::new()
        .ep_type(EpType::Msg)
        .caps(Caps::MSG)
        .provider(provider);
    let sinfo = reg
        .getinfo(&base.clone().node(&ip).service(0).source(true))?
        .remove(0);
    let sf = Fabric::open(&sinfo)?;
    let sd = sf.domain(&sinfo)?;
    let stats0 = ip.parse().ok().and_then(fabric_softroce::device_stats);
    let seq = sf.eq(EqAttr::default())?;
    let scq = sd.cq(CqAttr::default())?;
    let pep = sf.passive_endpoint(&sinfo, &seq)?;
    pep.listen()?;
    let port = pep.local_addr()?.as_inet().expect("inet").port();
    let cinfo = reg.getinfo(&base.node(&ip).service(port))?.remove(0);
    let cf = Fabric::open(&cinfo)?;
    let cd = cf.domain(&cinfo)?;
    let ceq = cf.eq(EqAttr::default())?;
    let ccq = cd.cq(CqAttr::default())?;
    let total = iters + WARMUP;
    std::thread::scope(|s| {
        let server = s.spawn(|| -> Result<()> {
            let req = match seq.wait(T)? {
                Event::ConnRequest(r) => r,
                other => return Err(Error::new(ErrorKind::Protocol, format!("{other:?}"))),
            };
            let ep = sd.endpoint(&req.info, EndpointConfig::new(&scq, &seq))?;
            let m = sd.alloc(16, Access::LOCAL)?;
            ep.recv(m.iov(8, 8), 0)?;
            ep.accept(&[])?;
            seq.wait(T)?;
            let mut buf = Vec::with_capacity(4);
            for i in 0..total {
                cq_poll(&scq, &mut buf)?;
                if i + 1 < total {
                    ep.recv(m.iov(8, 8), 0)?;
                }
                ep.send(m.iov(0, 8), 1)?;
                cq_poll(&scq, &mut buf)?;
            }
            Ok(())
        });
        let ep = cd.endpoint(&cinfo, EndpointConfig::new(&ccq, &ceq))?;
        ep.connect(&[])?;
        ceq.wait(T)?;
        let m = cd.alloc(16, Access::LOCAL)?;
        let mut buf = Vec::with_capacity(4);
        let mut lat = Vec::with_capacity(iters);
        for i in 0..total {
            let t0 = Instant::now();
            ep.recv(m.iov(8, 8), 0)?;
            ep.send(m.iov(0, 8), 1)?;
            cq_poll(&ccq, &mut buf)?;
            cq_poll(&ccq, &mut buf)?;
            if i >= WARMUP {
                lat.push(t0.elapsed());
            }
        }
        server.join().expect("server thread")?;
        if let (Some(s0), Some(s1)) = (
            stats0,
            ip.parse().ok().and_then(fabric_softroce::device_stats),
        ) {
            if std::env::var("RDM_LAT_STATS").is_ok() {
                println!(
                    "msg packets per round trip: {:.2}",
                    (s1.tx_packets - s0.tx_packets) as f64 / total as f64
                );
            }
        }
        Ok(median_us(lat))
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(7);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let providers: Vec<String> = args
        .next()
        .unwrap_or_else(|| "tcp,softroce".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let mut rows: Vec<Vec<(f64, f64)>> = vec![Vec::new(); providers.len()];
    for round in 0..rounds.max(1) {
        for (p, provider) in providers.iter().enumerate() {
            // RDM_LAT_ONLY=msg|rdm measures one side only (for profiling); the other
            // reads as 1.
            let only = std::env::var("RDM_LAT_ONLY").unwrap_or_default();
            let msg = if only == "rdm" {
                1.0
            } else {
                msg_run(provider, iters).unwrap_or_else(|e| panic!("{provider} msg: {e}"))
            };
            let rdm = if only == "msg" {
                1.0
            } else {
                rdm_run(provider, iters).unwrap_or_else(|e| panic!("{provider} rdm: {e}"))
            };
            println!(
                "round {round} {provider}: msg {msg:.2} us, rdm tagged {rdm:.2} us, ratio {:.3}",
                rdm / msg
            );
            rows[p].push((msg, rdm));
        }
    }
    for (p, provider) in providers.iter().enumerate() {
        let r = &rows[p];
        println!(
            "{provider}: 8 B one-way, medians of {} rounds x {iters}: msg {:.2} us, \
             rdm tagged ({provider};rxm) {:.2} us, ratio (median of per-round ratios) {:.3}",
            r.len(),
            median(r.iter().map(|x| x.0).collect()),
            median(r.iter().map(|x| x.1).collect()),
            median(r.iter().map(|x| x.1 / x.0).collect()),
        );
    }
}

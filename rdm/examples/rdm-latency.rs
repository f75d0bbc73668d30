//! rdm-latency: 8-byte ping-pong latency of RDM tagged messages against the MSG
//! endpoint's send/recv on the same provider, in the same run (both ends in this
//! process, one thread each, completions by blocking waits). Prints the median
//! one-way latency of each and their ratio.
//!
//! `cargo run --release -p fabric-rdm --example rdm-latency -- tcp 20000`

use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_rdm::*;

const T: Duration = Duration::from_secs(10);

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

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6 / 2.0
}

fn rdm_run(provider: &str, iters: usize) -> Result<f64> {
    let ip = ip_for(provider);
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::TAGGED)
        .provider(provider)
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
    let (_fb, db, avb, b) = open()?;
    let to_b = ava.insert(&b.name())?;
    let to_a = avb.insert(&a.name())?;
    let ma = da.alloc(16, Access::LOCAL)?;
    let mb = db.alloc(16, Access::LOCAL)?;
    let total = iters + 100;
    let echo = std::thread::scope(|s| {
        let echo = s.spawn(|| -> Result<()> {
            for i in 0..total {
                b.trecv(mb.iov(8, 8), None, 1, 0, i as u64)?;
                b.wait(T)?;
                b.tsend(mb.iov(0, 8), to_a, 2, i as u64)?;
                b.wait(T)?;
            }
            Ok(())
        });
        let mut lat = Vec::with_capacity(iters);
        for i in 0..total {
            let t0 = Instant::now();
            a.trecv(ma.iov(8, 8), None, 2, 0, i as u64)?;
            a.tsend(ma.iov(0, 8), to_b, 1, i as u64)?;
            a.wait(T)?;
            a.wait(T)?;
            if i >= 100 {
                lat.push(t0.elapsed());
            }
        }
        echo.join().expect("echo thread")?;
        Ok::<_, Error>(lat)
    })?;
    Ok(median_us(echo))
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
    let total = iters + 100;
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
            for i in 0..total {
                scq.wait(T)?;
                if i + 1 < total {
                    ep.recv(m.iov(8, 8), 0)?;
                }
                ep.send(m.iov(0, 8), 1)?;
                scq.wait(T)?;
            }
            Ok(())
        });
        let ep = cd.endpoint(&cinfo, EndpointConfig::new(&ccq, &ceq))?;
        ep.connect(&[])?;
        ceq.wait(T)?;
        let m = cd.alloc(16, Access::LOCAL)?;
        let mut lat = Vec::with_capacity(iters);
        for i in 0..total {
            let t0 = Instant::now();
            ep.recv(m.iov(8, 8), 0)?;
            ep.send(m.iov(0, 8), 1)?;
            ccq.wait(T)?;
            ccq.wait(T)?;
            if i >= 100 {
                lat.push(t0.elapsed());
            }
        }
        server.join().expect("server thread")?;
        Ok(median_us(lat))
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let provider = args.next().unwrap_or_else(|| "tcp".into());
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let mut rows = Vec::new();
    for round in 0..3 {
        let msg = msg_run(&provider, iters).unwrap_or_else(|e| panic!("msg: {e}"));
        let rdm = rdm_run(&provider, iters).unwrap_or_else(|e| panic!("rdm: {e}"));
        println!("round {round}: msg {msg:.2} us, rdm tagged {rdm:.2} us");
        rows.push((msg, rdm));
    }
    rows.sort_by(|x, y| (x.1 / x.0).total_cmp(&(y.1 / y.0)));
    let (msg, rdm) = rows[rows.len() / 2];
    println!(
        "{provider}: 8 B one-way median, median round: msg {msg:.2} us, rdm tagged {rdm:.2} us, ratio {:.2}",
        rdm / msg
    );
}

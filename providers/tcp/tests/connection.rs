//! Connection management: cm data, reject, refused, getinfo answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fabric_core::*;

#[test]
fn getinfo_offer() {
    let info = registry().getinfo(&hints()).unwrap().remove(0);
    assert_eq!(info.provider_name, "tcp");
    assert_eq!(info.fabric_name, "IP");
    assert_eq!(info.ep_type, EpType::Msg);
    assert_eq!(info.mr_mode, MrMode::PROV_KEY);
    assert!(info
        .caps
        .contains(Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA | Caps::RMA_PMEM));
    assert!(info.limits.max_msg_size >= 64 << 20);
    assert_eq!(info.limits.cm_data_size, 256);
    assert_eq!(info.limits.mr_key_size, 8);
    let pm = registry().getinfo(&hints().caps(Caps::RMA_PMEM)).unwrap();
    assert!(pm[0].caps.contains(Caps::RMA_PMEM));
    let e = registry().getinfo(&hints().caps(Caps::TAGGED)).unwrap_err();
    assert!(e.to_string().contains("TAGGED"), "{e}");
}

#[test]
fn connect_accept_with_cm_data_both_ways() {
    let cdata: Vec<u8> = (0..=255u8).collect();
    let adata = b"server says hi".to_vec();
    let p = pair_with(&cdata, &adata, false, Progress::Manual);
    assert_eq!(p.connect_data, cdata);
    assert_eq!(p.accept_data, adata);
    let caddr = p.client.ep.local_addr().unwrap().as_inet().unwrap();
    let saddr = p.server.ep.peer_addr().unwrap().as_inet().unwrap();
    assert_eq!(caddr, saddr);
    assert_eq!(
        p.client.ep.peer_addr().unwrap(),
        p.pep.local_addr().unwrap()
    );
    // Too much connection data is refused locally.
    let info = connect_info(1, Progress::Manual);
    let ep = p
        .client
        .domain
        .endpoint(&info, EndpointConfig::new(&p.client.cq, &p.client.eq))
        .unwrap();
    assert!(ep.connect(&[0u8; 257]).is_err());
}

#[test]
fn two_engines_connect() {
    let p = pair_with(b"", b"", true, Progress::Manual);
    assert!(p.accept_data.is_empty());
    assert!(p.connect_data.is_empty());
}

#[test]
fn reject_reaches_client_with_data() {
    let sinfo = listen_info(Progress::Manual);
    let fabric = Fabric::open(&sinfo).unwrap();
    let domain = fabric.domain(&sinfo).unwrap();
    let seq = fabric.eq(EqAttr::default()).unwrap();
    let ceq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let pep = fabric.passive_endpoint(&sinfo, &seq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    let cinfo = connect_info(port, Progress::Manual);
    let ep = domain
        .endpoint(&cinfo, EndpointConfig::new(&cq, &ceq))
        .unwrap();
    ep.connect(b"please").unwrap();
    let req = match wait_event(&seq) {
        Event::ConnRequest(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(req.data, b"please");
    assert_eq!(req.listener, Event::ConnRequest(req.clone()).fid());
    pep.reject(&req, b"go away").unwrap();
    // A second reject (or accept) of the same request fails.
    assert!(pep.reject(&req, b"").is_err());
    assert!(domain
        .endpoint(&req.info, EndpointConfig::new(&cq, &seq))
        .is_err());
    match wait_event(&ceq) {
        Event::Error { fid, error, data } => {
            assert_eq!(fid, ep.fid());
            assert_eq!(error.kind(), ErrorKind::ConnectionRefused);
            assert_eq!(data, b"go away");
        }
        other => panic!("{other:?}"),
    }
    // Posting on the rejected endpoint fails.
    let mr = domain.alloc(8, Access::LOCAL).unwrap();
    assert!(ep.send(mr.full(), 1).is_err());
}

#[test]
fn connection_refused_without_listener() {
    // Find a port nobody listens on: bind, note it, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let info = connect_info(port, Progress::Manual);
    let fabric = Fabric::open(&info).unwrap();
    let domain = fabric.domain(&info).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    let mr = domain.alloc(8, Access::LOCAL).unwrap();
    ep.recv(mr.full(), 5).unwrap();
    ep.connect(b"x").unwrap();
    match wait_event(&eq) {
        Event::Error { fid, error, .. } => {
            assert_eq!(fid, ep.fid());
            assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
        }
        other => panic!("{other:?}"),
    }
    // The receive posted before connecting is flushed.
    let c = next(&cq);
    assert_eq!(c.context, 5);
    assert_eq!(c.status.unwrap_err().kind, CqErrorKind::Canceled);
}

#[test]
fn raw_address_is_rejected_by_check() {
    let info = registry().getinfo(&hints()).unwrap().remove(0);
    let fabric = Fabric::open(&info).unwrap();
    let domain = fabric.domain(&info).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    let e = ep
        .connect_to(&Address::Raw(vec![1, 2, 3]), b"")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddressNotAvailable);
}

#[test]
fn eq_sread_sleeps_until_timeout() {
    let info = listen_info(Progress::Manual);
    let fabric = Fabric::open(&info).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let t0 = Instant::now();
    assert!(eq
        .sread(Some(Duration::from_millis(150)))
        .unwrap()
        .is_none());
    let el = t0.elapsed();
    assert!(
        el >= Duration::from_millis(140) && el < Duration::from_secs(5),
        "{el:?}"
    );
}

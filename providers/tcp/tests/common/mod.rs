//! Shared set-up for the tcp provider's integration tests: a connected pair of
//! endpoints over loopback, and bounded waits.
#![allow(dead_code)]

pub mod volatile_cache;

use std::time::{Duration, Instant};

use fabric_core::*;

/// Upper bound of every wait in the tests.
pub const T: Duration = Duration::from_secs(20);

pub fn registry() -> Registry {
    Registry::new().with(fabric_tcp::provider())
}

pub fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA)
        .ep_type(EpType::Msg)
        .provider("tcp")
}

pub fn listen_info(progress: Progress) -> Info {
    registry()
        .getinfo(
            &hints()
                .source(true)
                .node("127.0.0.1")
                .service(0)
                .progress(progress),
        )
        .expect("getinfo")
        .remove(0)
}

pub fn connect_info(port: u16, progress: Progress) -> Info {
    registry()
        .getinfo(&hints().node("127.0.0.1").service(port).progress(progress))
        .expect("getinfo")
        .remove(0)
}

/// One side of a connection.
pub struct Side {
    pub fabric: Fabric,
    pub domain: Domain,
    pub cq: CompletionQueue,
    pub eq: EventQueue,
    pub ep: Endpoint,
}

pub struct Pair {
    pub server: Side,
    pub client: Side,
    pub pep: PassiveEndpoint,
    /// Data the client got with Connected.
    pub accept_data: Vec<u8>,
    /// Data the server got with the request.
    pub connect_data: Vec<u8>,
}

/// Waits for an event on `eq`, driving `other` too (when both sides share nothing).
pub fn wait_event(eq: &EventQueue) -> Event {
    eq.wait(T).expect("event")
}

/// A connected pair in one fabric (one engine drives both sides).
pub fn pair() -> Pair {
    pair_with(b"connect", b"accept", false, Progress::Manual)
}

/// A connected pair. `separate`: server and client in different fabrics (two
/// engines, as in two processes); then `progress` applies to the server.
pub fn pair_with(cdata: &[u8], adata: &[u8], separate: bool, progress: Progress) -> Pair {
    let sinfo = listen_info(progress);
    let sfabric = Fabric::open(&sinfo).unwrap();
    let sdomain = sfabric.domain(&sinfo).unwrap();
    let seq = sfabric.eq(EqAttr::default()).unwrap();
    let scq = sdomain.cq(CqAttr::default()).unwrap();
    let pep = sfabric.passive_endpoint(&sinfo, &seq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    assert_ne!(port, 0);

    let cinfo = connect_info(port, Progress::Manual);
    let cfabric = if separate {
        Fabric::open(&cinfo).unwrap()
    } else {
        sfabric.clone()
    };
    let cdomain = cfabric.domain(&cinfo).unwrap();
    let ceq = cfabric.eq(EqAttr::default()).unwrap();
    let ccq = cdomain.cq(CqAttr::default()).unwrap();
    let cep = cdomain
        .endpoint(&cinfo, EndpointConfig::new(&ccq, &ceq))
        .unwrap();
    cep.connect(cdata).unwrap();

    let deadline = Instant::now() + T;
    let req = loop {
        assert!(Instant::now() < deadline, "no connection request");
        // Drive the client's engine too when it is separate.
        let _ = ceq.read();
        if let Some(Event::ConnRequest(r)) = seq.sread(Some(Duration::from_millis(10))).unwrap() {
            break r;
        }
    };
    let sep = sdomain
        .endpoint(&req.info, EndpointConfig::new(&scq, &seq))
        .unwrap();
    sep.accept(adata).unwrap();
    let mut accept_data = None;
    let mut server_up = false;
    while accept_data.is_none() || !server_up {
        assert!(Instant::now() < deadline, "not connected");
        if let Some(ev) = ceq.sread(Some(Duration::from_millis(10))).unwrap() {
            match ev {
                Event::Connected { fid, data } => {
                    assert_eq!(fid, cep.fid());
                    accept_data = Some(data);
                }
                other => panic!("client event {other:?}"),
            }
        }
        if let Some(ev) = seq.read().unwrap() {
            match ev {
                Event::Connected { fid, .. } => {
                    assert_eq!(fid, sep.fid());
                    server_up = true;
                }
                other => panic!("server event {other:?}"),
            }
        }
    }
    Pair {
        server: Side {
            fabric: sfabric,
            domain: sdomain,
            cq: scq,
            eq: seq,
            ep: sep,
        },
        client: Side {
            fabric: cfabric,
            domain: cdomain,
            cq: ccq,
            eq: ceq,
            ep: cep,
        },
        pep,
        accept_data: accept_data.unwrap_or_default(),
        connect_data: req.data.clone(),
    }
}

/// Waits for the next completion on `cq` (sleeping), failing the test after `T`.
pub fn next(cq: &CompletionQueue) -> Completion {
    cq.wait(T).expect("completion")
}

/// Polls `a` and `b` alternately until `a` has a completion (for two-engine pairs
/// whose other side needs manual progress).
pub fn next_driving(
    a: &CompletionQueue,
    b: &CompletionQueue,
    b_out: &mut Vec<Completion>,
) -> Completion {
    let deadline = Instant::now() + T;
    let mut v = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no completion");
        if a.read(&mut v, 1).unwrap() > 0 {
            return v.remove(0);
        }
        b.read(b_out, 16).unwrap();
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 32) as u8
                ^ seed
        })
        .collect()
}

pub fn ok(c: &Completion) {
    assert!(c.is_ok(), "unexpected error completion {c:?}");
}

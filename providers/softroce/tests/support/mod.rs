//! Set-up shared by the softroce tests that run real devices through the fabric API
//! (idle.rs, read_flood.rs, shared_device.rs): distinct free loopback addresses, a
//! listening server side, a client side bound to its own address.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};

use fabric_core::*;
use fabric_softroce::{configure_device, free_loopback_ip, DeviceConfig};

/// `n` distinct free loopback addresses (each one's devices with the default
/// configuration, not the environment's, when `configure`).
pub fn addrs(n: usize, configure: bool) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = Vec::new();
    while v.len() < n {
        let ip = free_loopback_ip().expect("a free loopback address");
        if !v.contains(&ip) {
            v.push(ip);
        }
    }
    if configure {
        for &ip in &v {
            configure_device(ip, DeviceConfig::default()).unwrap();
        }
    }
    v
}

/// softroce MSG hints with `caps`.
pub fn hints(caps: Caps) -> Hints {
    Hints::new()
        .caps(caps)
        .ep_type(EpType::Msg)
        .provider("softroce")
}

pub fn registry() -> Registry {
    Registry::new().with(fabric_softroce::provider())
}

/// One side's objects: fabric, domain, event and completion queue.
pub struct Side {
    pub info: Info,
    pub fabric: Fabric,
    pub domain: Domain,
    pub eq: EventQueue,
    pub cq: CompletionQueue,
}

impl Side {
    fn open(info: Info) -> Side {
        let fabric = Fabric::open(&info).unwrap();
        let domain = fabric.domain(&info).unwrap();
        let eq = fabric.eq(EqAttr::default()).unwrap();
        let cq = domain.cq(CqAttr::default()).unwrap();
        Side {
            info,
            fabric,
            domain,
            eq,
            cq,
        }
    }

    /// An endpoint on this side's queues for `info` (a client's, or a request's).
    pub fn endpoint(&self, info: &Info) -> Endpoint {
        self.domain
            .endpoint(info, EndpointConfig::new(&self.cq, &self.eq))
            .unwrap()
    }
}

/// A server side listening on `ip` (any port): the side, its listener and the port.
pub fn server(ip: Ipv4Addr, caps: Caps) -> (Side, PassiveEndpoint, u16) {
    let info = registry()
        .getinfo(&hints(caps).source(true).node(&ip.to_string()).service(0))
        .expect("server getinfo")
        .remove(0);
    let side = Side::open(info);
    let pep = side.fabric.passive_endpoint(&side.info, &side.eq).unwrap();
    pep.listen().unwrap();
    let port = pep.local_addr().unwrap().as_inet().unwrap().port();
    (side, pep, port)
}

/// A client side on `ip` for the server at `server:port` (`side.info` connects there).
pub fn client(ip: Ipv4Addr, server: &str, port: u16, caps: Caps) -> Side {
    let mut info = registry()
        .getinfo(&hints(caps).node(server).service(port))
        .expect("client getinfo")
        .remove(0);
    info.src_addr = Some(Address::Inet(SocketAddr::new(ip.into(), 0)));
    Side::open(info)
}

//! Shared set-up of the integration tests: a target with a memory namespace on a
//! fresh random loopback address, and a host connecting from another one.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nvmeof::host::{Controller, HostConfig, TransportAddr};
use nvmeof::target::{NamespaceConfig, Port, PortConfig, SubsystemConfig, Target};

/// The providers every test of the group runs over (softroce's keys are 32-bit; tcp
/// narrows its keys to 32 bits when the hints ask): see [`over_providers!`].
pub const PROVIDERS: [&str; 2] = ["softroce", "tcp"];

/// Turns each named `fn name(provider: &str)` into one `#[test]` per provider:
/// `softroce::name` and `tcp::name`.
#[macro_export]
macro_rules! over_providers {
    ($($name:ident),* $(,)?) => {
        mod softroce {
            $( #[test] fn $name() { super::$name("softroce") } )*
        }
        mod tcp {
            $( #[test] fn $name() { super::$name("tcp") } )*
        }
    };
}
pub const SUBNQN: &str = "nqn.2024-01.io.fabric:test-subsystem";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555";
/// Blocks of the default memory namespace (512-byte blocks: 4 MiB).
pub const NS_BLOCKS: u64 = 8192;

/// A random 127.x.y.z address (softroce devices are per address and process, so
/// tests running at once, here or in other processes, do not collide).
pub fn random_loopback() -> Ipv4Addr {
    nvmeof::tools::random_loopback(None)
}

pub struct Setup {
    pub target: Target,
    pub port: Port,
    pub addr: TransportAddr,
    pub host_ip: Ipv4Addr,
}

impl Setup {
    pub fn host_config(&self) -> HostConfig {
        HostConfig {
            hostnqn: HOSTNQN.into(),
            src_ip: Some(IpAddr::V4(self.host_ip)),
            timeout: Duration::from_secs(10),
            io_queues: 2,
            ..HostConfig::default()
        }
    }

    pub fn connect(&self) -> Controller {
        Controller::connect(&self.addr, SUBNQN, &self.host_config()).expect("connect")
    }
}

/// A target with `subsys` (namespaces included) listening on a random address of
/// `provider`.
pub fn setup_with(provider: &str, subsys: SubsystemConfig) -> Setup {
    setup_over(provider, subsys)
}

/// [`setup_with`].
pub fn setup_over(provider: &str, subsys: SubsystemConfig) -> Setup {
    let target = Target::new();
    target.add_subsystem(&subsys).expect("subsystem");
    let ip = random_loopback();
    let port = target
        .add_port(&PortConfig::new(provider, &ip.to_string()))
        .expect("port");
    let local = port.local_addr();
    let mut host_ip = random_loopback();
    while host_ip == ip {
        host_ip = random_loopback();
    }
    Setup {
        addr: TransportAddr::new(provider, &local.ip().to_string(), local.port()),
        target,
        port,
        host_ip,
    }
}

/// The default: one 4 MiB memory namespace (NSID 1), any host allowed.
pub fn setup(provider: &str) -> Setup {
    let mut s = SubsystemConfig::new(SUBNQN);
    s.namespaces
        .push(NamespaceConfig::memory(1, NS_BLOCKS * 512));
    setup_with(provider, s)
}

/// Bytes with a pattern depending on `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

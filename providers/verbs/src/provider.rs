//! The `Provider` implementation: getinfo answers from the devices present.

use std::sync::Arc;

use fabric_core::provider::FabricOps;
use fabric_core::{Caps, HintField, Info, Mismatch, Provider, Result};

/// Capabilities offered on every device.
pub const CAPS: Caps = Caps::MSG
    .union(Caps::RMA)
    .union(Caps::READ)
    .union(Caps::WRITE)
    .union(Caps::SEND)
    .union(Caps::RECV)
    .union(Caps::REMOTE_READ)
    .union(Caps::REMOTE_WRITE)
    .union(Caps::REMOTE_CQ_DATA)
    .union(Caps::ATOMIC);

/// The rejection when the host has no RDMA device.
pub const NO_DEVICE: &str = "no RDMA device: load rdma_rxe (`modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0`) or plug in a NIC";

/// The environment variable by which an operator states that the target platforms
/// put NIC-placed writes into their persistence domain (librpma's "direct write to
/// PMem": Intel DDIO off, or eADR): `1` offers `RMA_PMEM` with COMMIT by
/// read-after-write.
pub const DIRECT_PMEM_ENV: &str = "VERBS_DIRECT_PMEM";

/// Whether the operator declared direct write to PMem ([`DIRECT_PMEM_ENV`]).
pub fn raw_commit_declared() -> bool {
    std::env::var(DIRECT_PMEM_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The capabilities offered, given the operator's declaration.
pub fn caps(direct_pmem: bool) -> Caps {
    if direct_pmem {
        CAPS | Caps::RMA_PMEM
    } else {
        CAPS
    }
}

struct VerbsProvider;

#[cfg(not(feature = "verbs"))]
impl Provider for VerbsProvider {
    fn name(&self) -> &'static str {
        "verbs"
    }
    fn available(&self) -> std::result::Result<(), Mismatch> {
        Err(Mismatch::new(
            HintField::Availability,
            "fabric-verbs was built without its `verbs` cargo feature (libibverbs and librdmacm); \
             build with `--features verbs`",
        ))
    }
    fn offers(&self) -> Vec<Info> {
        Vec::new()
    }
    fn open_fabric(&self, _info: &Info) -> Result<Arc<dyn FabricOps>> {
        Err(fabric_core::Error::unsupported(
            "fabric-verbs was built without the `verbs` feature",
        ))
    }
}

#[cfg(feature = "verbs")]
mod with_verbs {
    use super::*;
    use crate::sys;
    use fabric_core::{Address, EpType, Hints, MrMode};
    use std::net::SocketAddr;

    /// One answer: a device, an active port, a GID.
    pub(crate) fn answers() -> Vec<Info> {
        let mut out = Vec::new();
        for ctx in sys::cm_devices() {
            let dev = match sys::query(ctx) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!("verbs: cannot query {}: {e}", ctx.name());
                    continue;
                }
            };
            if dev.flush_persistent {
                tracing::debug!(
                    "verbs: {} reports IB FLUSH (persistent); this build's rdma-core headers \
                     have no ibv_wr_flush, so COMMIT uses read-after-write",
                    dev.name
                );
            }
            for port in dev.ports.iter().filter(|p| p.active) {
                for gid in &port.gids {
                    // RoCE v1 GIDs duplicate the v2 ones (same IP); rdma_cm uses v2.
                    let ip = gid.ip();
                    let ib = port.gids.iter().all(|g| g.kind != sys::GidKind::RoceV2);
                    if ip.is_none() && !ib {
                        continue;
                    }
                    // RMA_PMEM is in every offer so that hints asking for it reach
                    // `check`, which states why it is not offered (check_pmem).
                    let mut i = Info::new(
                        "verbs",
                        caps(true),
                        EpType::Msg,
                        crate::mapping::limits(&port.limits),
                    );
                    i.mr_mode = MrMode::LOCAL | MrMode::VIRT_ADDR | MrMode::PROV_KEY;
                    i.domain_name = dev.name.clone();
                    i.fabric_name = format!(
                        "{} port {} gid {}{}",
                        if ip.is_some() { "RoCEv2" } else { "IB" },
                        port.num,
                        gid.index,
                        ip.map(|a| format!(" ({a})")).unwrap_or_default()
                    );
                    i.src_addr = ip.map(|a| Address::Inet(SocketAddr::new(a, 0)));
                    out.push(i);
                }
            }
        }
        out
    }

    impl Provider for VerbsProvider {
        fn name(&self) -> &'static str {
            "verbs"
        }
        fn available(&self) -> std::result::Result<(), Mismatch> {
            if sys::cm_devices().is_empty() {
                return Err(Mismatch::new(HintField::Availability, NO_DEVICE));
            }
            Ok(())
        }
        fn offers(&self) -> Vec<Info> {
            answers()
        }
        fn check(&self, hints: &Hints, info: &mut Info) -> std::result::Result<(), Mismatch> {
            check_pmem(hints.caps, info, raw_commit_declared())
                .map_err(|why| Mismatch::new(HintField::Caps, why))?;
            check_source(info, crate::mapping::gid_ip(&info.fabric_name))
                .map_err(|why| Mismatch::new(HintField::SrcAddr, why))
        }
        fn open_fabric(&self, info: &Info) -> Result<Arc<dyn FabricOps>> {
            Ok(Arc::new(crate::objects::VFabric::open(info)?))
        }
    }
}

/// An answer made for the GID address `gid` keeps a hint's source address only if it
/// is that address, the unspecified address or loopback. A loopback source or
/// destination is served by the GID's own address (see
/// [`mapping::loopback_to_gid`](crate::mapping::loopback_to_gid)), so for one the
/// answer's GID must be of the same family and not link-local; a destination of the
/// other family than the GID's is not reached from it either.
pub fn check_source(
    info: &mut Info,
    gid: Option<std::net::IpAddr>,
) -> std::result::Result<(), String> {
    let inet =
        |a: &Option<fabric_core::Address>| a.as_ref().and_then(fabric_core::Address::as_inet);
    let on = || format!("{} ({})", info.domain_name, info.fabric_name);
    if let Some(src) = inet(&info.src_addr) {
        let ip = src.ip();
        match gid {
            Some(g) if g != ip && !ip.is_unspecified() && !ip.is_loopback() => {
                return Err(format!("source address {ip} is not on {}", on()))
            }
            _ => {}
        }
    }
    let Some(g) = gid else { return Ok(()) };
    for a in [inet(&info.src_addr), inet(&info.dest_addr)]
        .into_iter()
        .flatten()
    {
        let ip = a.ip();
        if ip.is_loopback() && !crate::mapping::gid_serves_loopback(ip, g) {
            return Err(format!(
                "loopback {ip} is served by the device's own address of its family; {} is not one",
                on()
            ));
        }
        if !ip.is_unspecified() && ip.is_ipv4() != g.is_ipv4() {
            return Err(format!("address {ip} is of another family than {}", on()));
        }
    }
    Ok(())
}

/// Why verbs does not offer `RMA_PMEM` unless the operator states
/// [`DIRECT_PMEM_ENV`].
pub const NO_PMEM: &str = "RMA_PMEM is not offered: COMMIT on verbs is the writes and \
    then a read-after-write, which is durable only where the target platform puts NIC \
    writes into its persistence domain (DDIO off with ADR, or eADR); state that with \
    VERBS_DIRECT_PMEM=1. Even then verbs cannot refuse a COMMIT into a region not \
    registered PMEM (the target NIC does not know), and this build has no IB FLUSH";

/// Without the operator's statement ([`raw_commit_declared`]) an answer loses
/// `RMA_PMEM`, and hints that ask for it are rejected with [`NO_PMEM`].
pub fn check_pmem(
    want: Caps,
    info: &mut Info,
    direct_pmem: bool,
) -> std::result::Result<(), String> {
    if direct_pmem {
        return Ok(());
    }
    if want.contains(Caps::RMA_PMEM) {
        return Err(NO_PMEM.into());
    }
    info.caps.remove(Caps::RMA_PMEM);
    Ok(())
}

/// The verbs provider, for [`Registry::register`](fabric_core::Registry::register).
pub fn provider() -> Arc<dyn Provider> {
    Arc::new(VerbsProvider)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_core::{Address, EpType, Limits, Registry};

    #[test]
    fn pmem_only_when_stated() {
        assert!(!caps(false).contains(Caps::RMA_PMEM));
        assert!(caps(true).contains(Caps::RMA_PMEM | Caps::REMOTE_CQ_DATA));
    }

    #[test]
    fn pmem_rejected_with_the_reason_unless_stated() {
        let mut i = Info::new("verbs", caps(true), EpType::Msg, Limits::DEFAULT);
        let e = check_pmem(Caps::MSG | Caps::RMA_PMEM, &mut i, false).unwrap_err();
        assert!(e.contains("VERBS_DIRECT_PMEM=1"), "{e}");
        check_pmem(Caps::MSG, &mut i, false).unwrap();
        assert!(!i.caps.contains(Caps::RMA_PMEM));
        let mut i = Info::new("verbs", caps(true), EpType::Msg, Limits::DEFAULT);
        check_pmem(Caps::RMA_PMEM, &mut i, true).unwrap();
        assert!(i.caps.contains(Caps::RMA_PMEM));
    }

    #[test]
    fn source_addresses_must_be_the_gid_s() {
        let mut i = Info::new("verbs", CAPS, EpType::Msg, Limits::DEFAULT);
        i.domain_name = "rxe0".into();
        i.fabric_name = "RoCEv2 port 1 gid 1 (10.0.2.15)".into();
        let gid = Some("10.0.2.15".parse().unwrap());
        for ok in ["10.0.2.15:0", "0.0.0.0:0", "127.0.0.1:7000"] {
            i.src_addr = Some(Address::Inet(ok.parse().unwrap()));
            assert!(check_source(&mut i, gid).is_ok(), "{ok}");
        }
        i.src_addr = Some(Address::Inet("10.9.9.9:0".parse().unwrap()));
        let e = check_source(&mut i, gid).unwrap_err();
        assert!(e.contains("not on rxe0"), "{e}");
        // Loopback and IPv4 destinations need an IPv4 GID; link-local cannot serve.
        i.src_addr = None;
        i.dest_addr = Some(Address::Inet("127.0.0.1:9".parse().unwrap()));
        assert!(check_source(&mut i, gid).is_ok());
        i.fabric_name = "RoCEv2 port 1 gid 0 (fe80::1)".into();
        let ll = Some("fe80::1".parse().unwrap());
        let e = check_source(&mut i, ll).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        i.dest_addr = Some(Address::Inet("10.0.2.16:9".parse().unwrap()));
        let e = check_source(&mut i, ll).unwrap_err();
        assert!(e.contains("another family"), "{e}");
    }

    /// On a host without RDMA devices (this one: no /sys/class/infiniband), getinfo
    /// says so and what to do; without the `verbs` feature it says that instead.
    #[test]
    fn getinfo_without_a_device_says_why() {
        if std::path::Path::new("/sys/class/infiniband").exists() {
            return;
        }
        let r = Registry::new().with(provider());
        let e = r
            .getinfo(&fabric_core::Hints::new().provider("verbs").caps(Caps::MSG))
            .unwrap_err();
        let msg = e.to_string();
        if cfg!(feature = "verbs") {
            assert!(
                msg.contains("verbs: not available: no RDMA device: load rdma_rxe"),
                "{msg}"
            );
        } else {
            assert!(msg.contains("without its `verbs` cargo feature"), "{msg}");
        }
    }
}

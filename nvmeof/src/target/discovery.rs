//! The discovery subsystem's log page (nvmet's discovery.c): one entry per port and
//! subsystem the asking host may connect to.

use super::Shared;
use crate::wire::log::{
    treq, AddressFamily, DiscoveryLog, DiscoveryLogEntry, RdmaCms, RdmaProviderType, RdmaQpType,
    RdmaTsas, SubsystemType, TransportType,
};
use crate::wire::text::{Nqn, NulPadded};

/// A listening port, as discovery reports it.
#[derive(Debug, Clone)]
pub(crate) struct PortRecord {
    pub(crate) portid: u16,
    pub(crate) provider: String,
    pub(crate) traddr: String,
    pub(crate) trsvcid: String,
    pub(crate) alive: bool,
    /// Subsystems exported; empty: all.
    pub(crate) subsystems: Vec<String>,
}

impl PortRecord {
    /// Whether the port exports subsystem `nqn`.
    pub(crate) fn exports(&self, nqn: &str) -> bool {
        self.subsystems.is_empty() || self.subsystems.iter().any(|s| s == nqn)
    }
}

impl Shared {
    pub(crate) fn discovery_log(&self, hostnqn: &str) -> DiscoveryLog {
        let ports = self.ports();
        let mut entries = Vec::new();
        for port in ports.iter().filter(|p| p.alive) {
            for subsys in self.subsystems() {
                if !subsys.host_allowed(hostnqn) || !port.exports(&subsys.nqn) {
                    continue;
                }
                let adrfam = if port.traddr.contains(':') {
                    AddressFamily::Ipv6
                } else {
                    AddressFamily::Ipv4
                };
                let prtype = if port.provider == "softroce" {
                    RdmaProviderType::RoceV2
                } else {
                    RdmaProviderType::NotSpecified
                };
                entries.push(DiscoveryLogEntry {
                    trtype: TransportType::Rdma,
                    adrfam,
                    subtype: SubsystemType::Nvme,
                    treq: treq::SECURE_CHANNEL_NOT_REQUIRED,
                    portid: port.portid,
                    cntlid: 0xFFFF,
                    asqsz: 32,
                    eflags: 0,
                    trsvcid: NulPadded::new(&port.trsvcid).unwrap_or_default(),
                    subnqn: Nqn::new(&subsys.nqn).unwrap_or_default(),
                    traddr: NulPadded::new(&port.traddr).unwrap_or_default(),
                    tsas: RdmaTsas {
                        qptype: RdmaQpType::Connected,
                        prtype,
                        cms: RdmaCms::RdmaCm,
                        pkey: 0,
                    },
                });
            }
        }
        DiscoveryLog {
            genctr: self.genctr(),
            entries,
        }
    }
}

//! The softroce provider of the fabric API: reliable connected endpoints over the RC
//! transport of [`crate::rc`], driven by a user-space device per IPv4 address
//! ([`device`]), connected through an `ibv_rc_pingpong`-style exchange over TCP
//! ([`cm`](self)) or through IB CM over QP1 ([`crate::ibcm`], the connection
//! manager's `IbListen`/`IbLink` in `objects/connmgr.rs`).
//!
//! Mapping of the API onto RC: send is SEND (with immediate for remote CQ data);
//! write is RDMA WRITE (WRITE with immediate for CQ data: the target consumes a posted
//! receive); read is RDMA READ; several remote iovecs become several work requests
//! with one completion at the end; a COMMIT_COMPLETE write is preceded by a
//! zero-length persistent FLUSH per remote range (the target refuses it for a region
//! not registered PMEM before any byte is written) and followed by a persistent FLUSH
//! per written range, and completes when the last FLUSH is answered.
//!
//! What is not the data path comes from fabric-core's shared layer
//! (`fabric_core::prov`): the completion and event queues are `ProviderCq`/`ProviderEq`
//! over the fabric's `Shared` (its `prov::Progress`), the background thread is
//! `start_progress_thread`, the R_Keys a `KeyMap` ([`memory`]), operation buffers
//! `ScatterList`s, and the connection manager's listening socket, half-open list and
//! request token `prov::listen`.

mod cm;
pub(crate) mod device;
mod memory;
mod objects;
pub(crate) mod rawqp;
mod sys;

use std::sync::Arc;
use std::time::Duration;

use fabric_core::provider::FabricOps;
use fabric_core::{
    Address, Caps, EpType, HintField, Hints, Info, Limits, Mismatch, MrMode, Provider, Result,
};

use crate::rc::{ib_timeout, Mtu};

/// Capabilities the provider offers.
pub const CAPS: Caps = Caps::MSG
    .union(Caps::RMA)
    .union(Caps::READ)
    .union(Caps::WRITE)
    .union(Caps::SEND)
    .union(Caps::RECV)
    .union(Caps::REMOTE_READ)
    .union(Caps::REMOTE_WRITE)
    .union(Caps::REMOTE_CQ_DATA)
    .union(Caps::RMA_PMEM)
    .union(Caps::ATOMIC);

/// Largest message: the RC limit of 2^31 bytes per work request.
pub const MAX_MSG_SIZE: usize = 1 << 31;

/// Provider settings read from the environment when a fabric opens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    /// Path MTU offered (the smaller of both sides' is used).
    pub(crate) mtu: Mtu,
    /// Base retransmission timeout.
    pub(crate) timeout: Duration,
    /// Connecting endpoints use IB CM (`SOFTROCE_CM=ib`): the connection data limit
    /// is a REQ's.
    pub(crate) ib_cm: bool,
}

impl Config {
    fn from_env() -> std::result::Result<Config, String> {
        let mtu = match std::env::var("SOFTROCE_MTU") {
            Ok(s) if !s.trim().is_empty() => {
                let n: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("SOFTROCE_MTU={s} is not a number"))?;
                Mtu::from_bytes(n).ok_or_else(|| {
                    format!("SOFTROCE_MTU={n}: the path MTU is one of 256, 512, 1024, 2048, 4096")
                })?
            }
            _ => Mtu::Mtu4096,
        };
        let timeout = match std::env::var("SOFTROCE_TIMEOUT_US") {
            Ok(s) if !s.trim().is_empty() => Duration::from_micros(
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("SOFTROCE_TIMEOUT_US={s} is not a number"))?
                    .max(100),
            ),
            // IB timeout code 9: 4.096 µs * 2^9 = 2.1 ms.
            _ => ib_timeout(9),
        };
        // SOFTROCE_CM itself is checked where devices read it (DeviceConfig).
        let ib_cm = std::env::var("SOFTROCE_CM").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "ib" | "rdmacm" | "rdma_cm"
            )
        });
        Ok(Config {
            mtu,
            timeout,
            ib_cm,
        })
    }
}

/// The provider's limits for a path MTU.
pub fn limits(mtu: Mtu) -> Limits {
    let mut l = Limits::DEFAULT;
    l.max_msg_size = MAX_MSG_SIZE;
    l.inject_size = 4096;
    l.mr_key_size = 4;
    l.cq_data_size = 4;
    l.tx_size = 1024;
    l.rx_size = 1024;
    l.iov_limit = 16;
    l.rma_iov_limit = 8;
    l.cm_data_size = cm::MAX_CM_DATA;
    l.mtu = mtu.bytes() as usize;
    l
}

struct SoftRoceProvider;

impl Provider for SoftRoceProvider {
    fn name(&self) -> &'static str {
        "softroce"
    }

    fn available(&self) -> std::result::Result<(), Mismatch> {
        Config::from_env()
            .map(|_| ())
            .map_err(|why| Mismatch::new(HintField::Config, why))
    }

    fn offers(&self) -> Vec<Info> {
        let c = Config::from_env().ok();
        let mtu = c.map_or(Mtu::Mtu4096, |c| c.mtu);
        let mut l = limits(mtu);
        if c.is_some_and(|c| c.ib_cm) {
            // A REQ's 56 bytes after rdma_cm's header, less the length trailer that
            // keeps the data's exact length between softroce peers.
            l.cm_data_size = crate::ibcm::wire::REQ_USER_DATA - objects::LEN_TRAILER;
        }
        let mut i = Info::new("softroce", CAPS, EpType::Msg, l);
        i.mr_mode = MrMode::PROV_KEY | MrMode::VIRT_ADDR;
        i.fabric_name = "RoCEv2".into();
        i.domain_name = "softroce".into();
        vec![i]
    }

    fn check(&self, _hints: &Hints, info: &mut Info) -> std::result::Result<(), Mismatch> {
        for (field, what, a) in [
            (HintField::SrcAddr, "source", &info.src_addr),
            (HintField::DestAddr, "destination", &info.dest_addr),
        ] {
            match a {
                None => {}
                Some(Address::Inet(sa)) if sa.is_ipv4() => {}
                Some(other) => {
                    return Err(Mismatch::new(
                        field,
                        format!(
                            "{what} address {other} is not an IPv4 address (RoCEv2 over IPv4 \
                             needs Address::Inet with an IPv4 address)"
                        ),
                    ))
                }
            }
        }
        if let Some(ip) = [&info.src_addr, &info.dest_addr]
            .iter()
            .find_map(|a| a.as_ref().and_then(|a| a.as_inet()))
        {
            info.domain_name = format!("softroce-{}", ip.ip());
        }
        Ok(())
    }

    fn open_fabric(&self, info: &Info) -> Result<Arc<dyn FabricOps>> {
        let config = Config::from_env().map_err(fabric_core::Error::invalid)?;
        Ok(Arc::new(objects::SrFabric::open(info, config)?))
    }
}

/// The softroce provider, for [`Registry::register`](fabric_core::Registry::register).
pub fn provider() -> Arc<dyn Provider> {
    Arc::new(SoftRoceProvider)
}

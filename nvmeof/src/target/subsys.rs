//! Subsystems and namespaces (nvmet's core.c configuration objects).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::backend::{Backing, Store};
use crate::error::{Error, Result};
use crate::wire::identify::{IdentifyNamespace, LbaFormat, NamespaceIdDescriptor};
use crate::wire::text::Nqn;

/// A namespace to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Namespace ID (1 ..= [`MAX_NSID`]).
    pub nsid: u32,
    /// Where its blocks live.
    pub backing: Backing,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
}

impl NamespaceConfig {
    /// A memory namespace of `size` bytes with 512-byte blocks.
    pub fn memory(nsid: u32, size: u64) -> NamespaceConfig {
        NamespaceConfig {
            nsid,
            backing: Backing::Memory { size },
            block_size: 512,
        }
    }
}

/// The highest namespace ID a subsystem accepts (Identify Controller NN).
pub const MAX_NSID: u32 = 1024;

/// A subsystem to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number (20 ASCII characters at most).
    pub serial: String,
    /// Model number (40 ASCII characters at most).
    pub model: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect when `allow_any_host` is false.
    pub allowed_hosts: Vec<String>,
    /// Namespaces.
    pub namespaces: Vec<NamespaceConfig>,
}

impl SubsystemConfig {
    /// A subsystem open to any host, with no namespaces yet.
    pub fn new(nqn: &str) -> SubsystemConfig {
        SubsystemConfig {
            nqn: nqn.into(),
            serial: "0123456789abcdef".into(),
            model: "fabric nvmeof target".into(),
            allow_any_host: true,
            allowed_hosts: Vec::new(),
            namespaces: Vec::new(),
        }
    }
}

/// An opened namespace.
#[derive(Debug)]
pub(crate) struct Namespace {
    pub(crate) nsid: u32,
    pub(crate) store: Store,
    pub(crate) lbads: u8,
    pub(crate) nguid: [u8; 16],
}

/// Copy limits reported in Identify Namespace (MSSRL, MCL, MSRC 0's based).
pub(crate) const COPY_MSSRL: u16 = 4096;
pub(crate) const COPY_MCL: u32 = 16384;
pub(crate) const COPY_MSRC: u8 = 127;

impl Namespace {
    pub(crate) fn open(cfg: &NamespaceConfig, subnqn: &str) -> Result<Namespace> {
        if cfg.nsid == 0 || cfg.nsid > MAX_NSID {
            return Err(Error::Config(format!(
                "namespace ID {} outside 1..={MAX_NSID}",
                cfg.nsid
            )));
        }
        let lbads = match cfg.block_size {
            512 => 9,
            4096 => 12,
            other => return Err(Error::Config(format!("block size {other}"))),
        };
        let store = Store::open(&cfg.backing)?;
        if store.len() % u64::from(cfg.block_size) != 0 || store.len() == 0 {
            return Err(Error::Config(format!(
                "namespace {}: size {} is not a non-zero multiple of {}",
                cfg.nsid,
                store.len(),
                cfg.block_size
            )));
        }
        // A stable NGUID from the subsystem NQN and the NSID (FNV-1a, two halves).
        let mut nguid = [0u8; 16];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in subnqn.bytes().chain(cfg.nsid.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        nguid[..8].copy_from_slice(&h.to_be_bytes());
        nguid[8..].copy_from_slice(&(h.rotate_left(29) ^ 0x6e76_6d65_6f66).to_be_bytes());
        Ok(Namespace {
            nsid: cfg.nsid,
            store,
            lbads,
            nguid,
        })
    }

    pub(crate) fn block_size(&self) -> u64 {
        1 << self.lbads
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.store.len() >> self.lbads
    }

    pub(crate) fn identify(&self) -> IdentifyNamespace {
        let mut id = IdentifyNamespace {
            nsze: self.blocks(),
            ncap: self.blocks(),
            nuse: self.blocks(),
            // Thin provisioning for files (holes); deallocated blocks read as zeros.
            nsfeat: u8::from(self.store.is_file()),
            nlbaf: 0,
            flbas: 0,
            dlfeat: 0b001,
            nvmcap: u128::from(self.store.len()),
            mssrl: COPY_MSSRL,
            mcl: COPY_MCL,
            msrc: COPY_MSRC,
            nguid: self.nguid,
            ..Default::default()
        };
        id.lbaf.0[0] = LbaFormat {
            ms: 0,
            lbads: self.lbads,
            rp: 0,
        };
        id
    }

    pub(crate) fn descriptors(&self) -> Vec<NamespaceIdDescriptor> {
        vec![
            NamespaceIdDescriptor::Nguid(self.nguid),
            NamespaceIdDescriptor::Csi(0),
        ]
    }
}

/// An NVM subsystem (or the discovery subsystem).
#[derive(Debug)]
pub(crate) struct Subsystem {
    pub(crate) nqn: String,
    pub(crate) serial: String,
    pub(crate) model: String,
    pub(crate) allow_any_host: bool,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    pub(crate) discovery: bool,
}

impl Subsystem {
    pub(crate) fn new(cfg: &SubsystemConfig) -> Result<Subsystem> {
        Nqn::new(&cfg.nqn).map_err(|e| Error::Config(format!("NQN {:?}: {e}", cfg.nqn)))?;
        let mut namespaces = BTreeMap::new();
        for n in &cfg.namespaces {
            let ns = Namespace::open(n, &cfg.nqn)?;
            if namespaces.insert(n.nsid, Arc::new(ns)).is_some() {
                return Err(Error::Config(format!("namespace {} twice", n.nsid)));
            }
        }
        Ok(Subsystem {
            nqn: cfg.nqn.clone(),
            serial: cfg.serial.clone(),
            model: cfg.model.clone(),
            allow_any_host: cfg.allow_any_host,
            allowed_hosts: cfg.allowed_hosts.clone(),
            namespaces: RwLock::new(namespaces),
            discovery: false,
        })
    }

    pub(crate) fn discovery() -> Subsystem {
        Subsystem {
            nqn: Nqn::DISCOVERY.into(),
            serial: String::new(),
            model: String::new(),
            allow_any_host: true,
            allowed_hosts: Vec::new(),
            namespaces: RwLock::new(BTreeMap::new()),
            discovery: true,
        }
    }

    pub(crate) fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    pub(crate) fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().ok()?.get(&nsid).cloned()
    }

    pub(crate) fn all_namespaces(&self) -> Vec<Arc<Namespace>> {
        self.namespaces
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

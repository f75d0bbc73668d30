//! Fabric and domain: the objects everything else is opened from.
//!
//! Lifetimes are held by reference counts: a domain keeps its fabric alive, and every
//! endpoint, queue and memory region keeps its domain alive, so dropping a parent
//! handle early is harmless; the parent goes when its last child does.

use std::sync::Arc;

use crate::cq::{CompletionQueue, CqAttr};
use crate::endpoint::{Endpoint, EndpointConfig, PassiveEndpoint};
use crate::eq::{EqAttr, EventQueue};
use crate::error::{Error, Result};
use crate::flags::{Access, MrFlags};
use crate::info::Info;
use crate::memory::{HeapMemory, MemoryBacking, MemoryRegion};
use crate::provider::{DomainOps, EndpointBinding, FabricOps};

/// A fabric: a provider instance over one network.
#[derive(Clone)]
pub struct Fabric {
    ops: Arc<dyn FabricOps>,
    info: Arc<Info>,
}

impl Fabric {
    /// Opens the fabric of a getinfo answer.
    pub fn open(info: &Info) -> Result<Fabric> {
        let provider = info.provider().ok_or_else(|| {
            Error::invalid("this Info did not come from getinfo (it names no provider)")
        })?;
        let ops = provider.open_fabric(info)?;
        Ok(Fabric {
            ops,
            info: Arc::new(info.clone()),
        })
    }

    /// The answer the fabric was opened from.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The provider's object (for providers to downcast).
    pub fn ops(&self) -> &Arc<dyn FabricOps> {
        &self.ops
    }

    /// Opens a domain.
    pub fn domain(&self, info: &Info) -> Result<Domain> {
        let ops = self.ops.open_domain(info)?;
        Ok(Domain {
            inner: Arc::new(DomainInner {
                ops,
                fabric: self.clone(),
                info: info.clone(),
            }),
        })
    }

    /// Opens an event queue for connection events.
    pub fn eq(&self, attr: EqAttr) -> Result<EventQueue> {
        let ops = self.ops.open_eq(&attr)?;
        Ok(EventQueue::new(ops, self.clone()))
    }

    /// Opens a passive endpoint that listens at `info.src_addr`, reporting connection
    /// requests to `eq`. Call [`PassiveEndpoint::listen`] next.
    pub fn passive_endpoint(&self, info: &Info, eq: &EventQueue) -> Result<PassiveEndpoint> {
        let ops = self.ops.open_passive_ep(info, eq.ops())?;
        Ok(PassiveEndpoint::new(ops, eq.clone()))
    }
}

struct DomainInner {
    ops: Arc<dyn DomainOps>,
    fabric: Fabric,
    info: Info,
}

/// A domain: the scope of memory registrations, queues and endpoints (an RDMA device
/// context, or a protection domain).
#[derive(Clone)]
pub struct Domain {
    inner: Arc<DomainInner>,
}

impl Domain {
    /// The fabric this domain belongs to.
    pub fn fabric(&self) -> &Fabric {
        &self.inner.fabric
    }
    /// The answer the domain was opened from.
    pub fn info(&self) -> &Info {
        &self.inner.info
    }
    /// The provider's object (for providers to downcast).
    pub fn ops(&self) -> &Arc<dyn DomainOps> {
        &self.inner.ops
    }
    /// Whether `other` is a handle to the same domain.
    pub fn same_as(&self, other: &Domain) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Opens a completion queue.
    pub fn cq(&self, attr: CqAttr) -> Result<CompletionQueue> {
        let ops = self.inner.ops.open_cq(&attr)?;
        Ok(CompletionQueue::new(ops, self.clone()))
    }

    /// Registers `memory` with `access` rights and `flags`. The region owns the memory.
    ///
    /// [`MrFlags::PMEM`] needs memory whose [`MemoryBacking::supports_persist`] is true
    /// and a provider that offers [`Caps::RMA_PMEM`](crate::Caps::RMA_PMEM).
    pub fn register(
        &self,
        memory: impl MemoryBacking,
        access: Access,
        flags: MrFlags,
    ) -> Result<MemoryRegion> {
        self.register_shared(Arc::new(memory), access, flags)
    }

    /// Registers memory that is shared with other owners.
    pub fn register_shared(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> Result<MemoryRegion> {
        if flags.contains(MrFlags::PMEM) && !memory.supports_persist() {
            return Err(Error::invalid(
                "PMEM registration needs memory that can persist (e.g. a pmem mapping)",
            ));
        }
        let ops = self.inner.ops.register(memory.clone(), access, flags)?;
        Ok(MemoryRegion::new(memory, access, flags, ops, self.clone()))
    }

    /// Allocates `len` zeroed bytes and registers them.
    pub fn alloc(&self, len: usize, access: Access) -> Result<MemoryRegion> {
        self.register(HeapMemory::new(len)?, access, MrFlags::empty())
    }

    /// Opens an active endpoint: from a getinfo answer (then [`Endpoint::connect`]) or
    /// from a connection request's info (then [`Endpoint::accept`]).
    pub fn endpoint(&self, info: &Info, config: EndpointConfig<'_>) -> Result<Endpoint> {
        let bind = EndpointBinding {
            tx_cq: config.tx_cq.ops().clone(),
            rx_cq: config.rx_cq.ops().clone(),
            eq: config.eq.ops().clone(),
        };
        let ops = self.inner.ops.open_endpoint(info, bind)?;
        Ok(Endpoint::new(ops, info.clone(), self.clone(), &config))
    }
}

//! Capability, access, registration and operation flags.

use bitflags::bitflags;

bitflags! {
    /// Capabilities asked for in [`Hints`](crate::Hints) and offered in
    /// [`Info`](crate::Info) (libfabric's `FI_MSG`, `FI_RMA`, ...).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Caps: u64 {
        /// Send and receive messages.
        const MSG = 1 << 0;
        /// Remote memory access (write and read).
        const RMA = 1 << 1;
        /// Tagged messages (reserved for a later provider feature).
        const TAGGED = 1 << 2;
        /// Remote atomics: the RDM layer's, or a provider's native ones on MSG
        /// endpoints ([`atomic`](crate::atomic)).
        const ATOMIC = 1 << 3;
        /// Initiate RMA reads.
        const READ = 1 << 8;
        /// Initiate RMA writes.
        const WRITE = 1 << 9;
        /// Initiate sends.
        const SEND = 1 << 10;
        /// Receive messages.
        const RECV = 1 << 11;
        /// Be the target of RMA reads.
        const REMOTE_READ = 1 << 12;
        /// Be the target of RMA writes.
        const REMOTE_WRITE = 1 << 13;
        /// 64-bit remote CQ data with sends and writes.
        const REMOTE_CQ_DATA = 1 << 16;
        /// Register and target persistent memory with commit semantics.
        const RMA_PMEM = 1 << 17;
    }
}

bitflags! {
    /// Access rights of a memory region (libfabric `fi_mr_reg` access).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Access: u32 {
        /// Local buffer may be the source of sends.
        const SEND = 1 << 0;
        /// Local buffer may receive messages.
        const RECV = 1 << 1;
        /// Local buffer may be the destination of RMA reads this side initiates.
        const READ = 1 << 2;
        /// Local buffer may be the source of RMA writes this side initiates.
        const WRITE = 1 << 3;
        /// Peers may read the region.
        const REMOTE_READ = 1 << 4;
        /// Peers may write the region.
        const REMOTE_WRITE = 1 << 5;
        /// Every local use.
        const LOCAL = Self::SEND.bits() | Self::RECV.bits() | Self::READ.bits() | Self::WRITE.bits();
        /// Both remote rights.
        const REMOTE = Self::REMOTE_READ.bits() | Self::REMOTE_WRITE.bits();
    }
}

bitflags! {
    /// Registration flags with semantics beyond access rights.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MrFlags: u32 {
        /// The region is persistent memory: COMMIT completions apply to writes into it.
        const PMEM = 1 << 0;
        /// Writes arriving from peers are placed with non-temporal stores (bypass the cache).
        const UNCACHED = 1 << 1;
    }
}

bitflags! {
    /// Memory-registration modes (libfabric `FI_MR_*`). In hints: the modes the
    /// application can work with; in an answer: the modes the provider requires.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MrMode: u32 {
        /// Local buffers must be registered.
        const LOCAL = 1 << 0;
        /// Remote addresses are virtual addresses (else offsets from 0).
        const VIRT_ADDR = 1 << 1;
        /// The provider chooses keys.
        const PROV_KEY = 1 << 2;
        /// Registered memory must be backed by allocated pages.
        const ALLOCATED = 1 << 3;
    }
}

bitflags! {
    /// Flags of the `*msg` operations (libfabric `fi_sendmsg`/`fi_writemsg` flags).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct OpFlags: u64 {
        /// Generate a completion (needed when the endpoint uses selective completion).
        const COMPLETION = 1 << 0;
        /// Deliver `data` as remote CQ data at the target.
        const REMOTE_CQ_DATA = 1 << 1;
        /// Copy the source now; no completion is generated.
        const INJECT = 1 << 2;
        /// Complete once the source buffer may be reused.
        const INJECT_COMPLETE = 1 << 3;
        /// Complete once the operation no longer depends on local or fabric resources.
        const TRANSMIT_COMPLETE = 1 << 4;
        /// Complete once the target has processed the operation and its result is visible.
        const DELIVERY_COMPLETE = 1 << 5;
        /// Complete once the written data is durable in the target's persistence domain
        /// (`FI_COMMIT_COMPLETE`). Needs [`Caps::RMA_PMEM`] on the endpoint, and applies
        /// to RMA writes only; the target refuses it (error completion
        /// [`CqErrorKind::RemoteInvalid`](crate::CqErrorKind::RemoteInvalid), memory
        /// untouched) unless every remote range lies in a region registered
        /// [`MrFlags::PMEM`], and reports a failed persist as
        /// [`CqErrorKind::RemoteOperation`](crate::CqErrorKind::RemoteOperation). A
        /// successful completion carries [`CompFlags::COMMIT`].
        ///
        /// "Durable" is what the target memory's
        /// [`MemoryBacking::persist`](crate::MemoryBacking::persist) achieves:
        /// - true persistent memory (`MAP_SYNC` on a DAX file system, or device DAX):
        ///   durable when the cache-line flush and fence return; survives power loss;
        /// - a page-cache file mapping: durable after `msync`; survives a crash of the
        ///   target process and, on a file system with a real block device that honours
        ///   cache flushes, a power loss;
        /// - tmpfs: survives only the target process, not a reboot;
        /// - heap memory cannot be registered `PMEM` at all.
        ///
        /// [`DELIVERY_COMPLETE`](Self::DELIVERY_COMPLETE) is weaker: placed and visible
        /// at the target, not necessarily durable.
        const COMMIT_COMPLETE = 1 << 6;
        /// Wait for earlier operations to the same peer before starting this one.
        const FENCE = 1 << 7;
        /// More operations on this endpoint follow at once (`FI_MORE`): the provider
        /// may hold this one back and hand it to the wire with the next one posted
        /// without `MORE` (tcp: one `sendmsg` for both), which the caller must post.
        /// A hint; a provider may ignore it.
        const MORE = 1 << 8;
    }
}

impl OpFlags {
    /// The strongest completion level named in these flags, or `None`.
    pub fn completion_level(self) -> Option<CompletionLevel> {
        if self.contains(OpFlags::COMMIT_COMPLETE) {
            Some(CompletionLevel::Commit)
        } else if self.contains(OpFlags::DELIVERY_COMPLETE) {
            Some(CompletionLevel::Delivery)
        } else if self.contains(OpFlags::TRANSMIT_COMPLETE) {
            Some(CompletionLevel::Transmit)
        } else if self.contains(OpFlags::INJECT_COMPLETE) {
            Some(CompletionLevel::Inject)
        } else {
            None
        }
    }
}

/// When an initiator's completion is generated, weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CompletionLevel {
    /// The source buffer may be reused.
    Inject,
    /// The operation no longer depends on local or fabric resources.
    Transmit,
    /// The target processed it; the result is visible there.
    Delivery,
    /// The data is durable at the target.
    Commit,
}

bitflags! {
    /// What a [`Completion`](crate::Completion) reports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CompFlags: u64 {
        /// A message operation.
        const MSG = 1 << 0;
        /// An RMA operation.
        const RMA = 1 << 1;
        /// A send completed.
        const SEND = 1 << 2;
        /// A receive completed.
        const RECV = 1 << 3;
        /// An RMA read this side initiated completed.
        const READ = 1 << 4;
        /// An RMA write this side initiated completed.
        const WRITE = 1 << 5;
        /// A peer's RMA write landed here (reported when it carried CQ data).
        const REMOTE_WRITE = 1 << 6;
        /// `data` holds remote CQ data.
        const REMOTE_CQ_DATA = 1 << 7;
        /// The completion was generated at COMMIT level.
        const COMMIT = 1 << 8;
        /// An atomic operation (with `READ` for the fetching forms, else `WRITE`).
        const ATOMIC = 1 << 9;
    }
}

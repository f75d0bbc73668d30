//! Registered memory as the RC core sees it: the domain's R_Keys are a
//! [`prov::KeyMap`](fabric_core::prov::KeyMap) whose one `verify` is the core's
//! [`RemoteMemoryTable::verify`] ([`nak_of`] maps a refusal to its NAK code), verified
//! ranges are [`RemoteRange`]s, and the local buffers of posted operations
//! ([`LocalMemory`]) are [`ScatterList`]s over fabric-core segments.
//!
//! Remote addresses are virtual addresses (`MrMode::VIRT_ADDR`, as in rxe): a region's
//! base VA is its pointer.

use std::sync::Arc;

use fabric_core::prov::{AccessError, AddrMode, KeyMap, Need, RemoteRange, ScatterList};
use fabric_core::{Access, Segments};

use crate::rc::{
    AtomicOp, LocalMemory, MemoryError, RemoteMemoryTable, RemoteNeed, RemoteRegion, RemoteRight,
    RemoteSpan,
};
use crate::wire::ext::NakCode;

/// The domain's R_Keys: random non-zero 32-bit keys, virtual addresses.
pub(crate) fn key_map() -> KeyMap {
    KeyMap::new(4, AddrMode::Virtual)
}

/// The NAK code a refused remote access is answered with (the one mapping).
pub(crate) fn nak_of(e: AccessError) -> NakCode {
    match e {
        // rxe: a persistent FLUSH into a region without IB_ACCESS_FLUSH_PERSISTENT.
        AccessError::NotPmem => NakCode::InvalidRequest,
        AccessError::PersistFailed => NakCode::RemoteOperationalError,
        _ => NakCode::RemoteAccessError,
    }
}

impl RemoteMemoryTable for KeyMap {
    fn verify(
        &self,
        rkey: u32,
        span: RemoteSpan,
        need: RemoteNeed,
    ) -> Result<Arc<dyn RemoteRegion>, NakCode> {
        let one = |access: Access| {
            let need = Need {
                access,
                pmem: need.persistent,
            };
            match span {
                RemoteSpan::Range { va, len } => {
                    KeyMap::verify(self, u64::from(rkey), va, len, need)
                }
                RemoteSpan::Region => self.verify_region(u64::from(rkey), need),
            }
        };
        let r = match need.right {
            RemoteRight::Read => one(Access::REMOTE_READ),
            RemoteRight::Write => one(Access::REMOTE_WRITE),
            RemoteRight::Atomic => one(Access::REMOTE_READ | Access::REMOTE_WRITE),
            // A FLUSH needs either right.
            RemoteRight::Flush => match one(Access::REMOTE_WRITE) {
                Err(AccessError::NoAccess) => one(Access::REMOTE_READ),
                r => r,
            },
        };
        match r {
            Ok(range) => Ok(Arc::new(range)),
            Err(e) => Err(nak_of(e)),
        }
    }
}

/// A verified range as the RC core reads, writes and persists it.
impl RemoteRegion for RemoteRange {
    fn len(&self) -> u64 {
        RemoteRange::len(self) as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let at = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        RemoteRange::read(self, at, buf).map_err(memory_error)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let at = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        RemoteRange::write(self, at, data).map_err(memory_error)
    }
    fn atomic(&self, offset: u64, op: AtomicOp) -> Result<u64, MemoryError> {
        let at = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        self.atomic_u64(at, |v| op.apply(v)).map_err(memory_error)
    }
    fn persist(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        // The core persists what it verified: the whole range.
        if offset != 0 || len != RemoteRegion::len(self) {
            return Err(MemoryError::OutOfBounds);
        }
        RemoteRange::persist(self).map_err(memory_error)
    }
}

fn memory_error(e: AccessError) -> MemoryError {
    match e {
        AccessError::Misaligned => MemoryError::Misaligned,
        AccessError::PersistFailed => MemoryError::PersistFailed,
        AccessError::NotPmem => MemoryError::NotPersistent,
        _ => MemoryError::OutOfBounds,
    }
}

/// The local data of one operation: its segments as one
/// [`ScatterList`] (a gather list for sends and writes, a scatter list for receives
/// and reads), or bytes copied at the call (inject). Holding it holds the regions.
pub(crate) enum OpMemory {
    Inline(Vec<u8>),
    Segments(ScatterList),
}

impl OpMemory {
    pub(crate) fn segments(segs: impl Into<Segments>) -> Self {
        OpMemory::Segments(ScatterList::local(segs))
    }
}

impl LocalMemory for OpMemory {
    fn len(&self) -> u64 {
        match self {
            OpMemory::Inline(v) => v.len() as u64,
            OpMemory::Segments(l) => l.len() as u64,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let at = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        let ok = match self {
            OpMemory::Inline(v) => match at.checked_add(buf.len()).and_then(|e| v.get(at..e)) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            },
            OpMemory::Segments(l) => l.copy_out(at, buf),
        };
        ok.then_some(()).ok_or(MemoryError::OutOfBounds)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let OpMemory::Segments(l) = self else {
            return Err(MemoryError::Unavailable);
        };
        let at = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        l.copy_in(at, data)
            .then_some(())
            .ok_or(MemoryError::OutOfBounds)
    }
}

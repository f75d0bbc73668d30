//! Memory seen by the RC core, independent of any registration API.
//!
//! * [`LocalMemory`] backs the buffers of posted work requests (the data a SEND or
//!   WRITE transmits, the buffer a receive or an RDMA READ fills, the 8 bytes an atomic
//!   returns).
//! * [`RemoteMemoryTable`] maps an R_Key to a [`RemoteRegion`] a peer may access,
//!   with its base address, length, rights and an optional persistence hook for
//!   IB FLUSH.
//!
//! The core checks keys, bounds and rights before it calls `read`/`write`/`atomic`, so
//! implementations only see in-range offsets; they still return errors instead of
//! panicking. Both traits take `&self`: a region is shared between the local user and
//! remote peers, so implementations need interior mutability (the later fabric-core
//! binding wraps registered memory whose soundness contract lives there).
//! [`VecMemory`] and [`KeyTable`] are simple implementations for tests and examples.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// A memory access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryError {
    /// Offset or length outside the memory.
    OutOfBounds,
    /// Misaligned atomic access.
    Misaligned,
    /// The persistence hook failed.
    PersistFailed,
    /// The region may not be the target of a persistent FLUSH (it is not registered as
    /// persistent memory; rxe: no `IB_ACCESS_FLUSH_PERSISTENT`). The responder answers
    /// NAK invalid request and touches nothing.
    NotPersistent,
    /// The backing store is unusable (e.g. a poisoned lock).
    Unavailable,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemoryError::OutOfBounds => "access outside the memory",
            MemoryError::Misaligned => "misaligned atomic access",
            MemoryError::PersistFailed => "persisting the range failed",
            MemoryError::NotPersistent => "the region is not persistent memory",
            MemoryError::Unavailable => "memory unavailable",
        })
    }
}

impl std::error::Error for MemoryError {}

/// Buffer memory of a posted work request.
pub trait LocalMemory: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Copies `data` to `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError>;
}

/// A byte range of local memory used by one work request.
#[derive(Clone)]
pub struct LocalSegment {
    /// The memory.
    pub memory: Arc<dyn LocalMemory>,
    /// Start offset in the memory.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl LocalSegment {
    /// A segment covering `len` bytes at `offset`.
    pub fn new(memory: Arc<dyn LocalMemory>, offset: u64, len: u32) -> Self {
        Self {
            memory,
            offset,
            len,
        }
    }

    /// Whether the segment lies inside its memory.
    pub fn in_bounds(&self) -> bool {
        self.offset
            .checked_add(u64::from(self.len))
            .is_some_and(|end| end <= self.memory.len())
    }
}

impl fmt::Debug for LocalSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSegment")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Rights a remote peer has on a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteAccess {
    /// RDMA READ (and FLUSH).
    pub read: bool,
    /// RDMA WRITE.
    pub write: bool,
    /// Atomic CMP_SWAP / FETCH_ADD.
    pub atomic: bool,
}

impl RemoteAccess {
    /// No remote access.
    pub const NONE: Self = Self {
        read: false,
        write: false,
        atomic: false,
    };
    /// Every right.
    pub const ALL: Self = Self {
        read: true,
        write: true,
        atomic: true,
    };
    /// Read only.
    pub const READ: Self = Self {
        read: true,
        write: false,
        atomic: false,
    };
    /// Write only.
    pub const WRITE: Self = Self {
        read: false,
        write: true,
        atomic: false,
    };
}

/// An atomic operation on a naturally aligned u64 (host byte order, as verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicOp {
    /// Store `swap` if the current value equals `compare`.
    CompareSwap {
        /// Expected value.
        compare: u64,
        /// New value.
        swap: u64,
    },
    /// Add `add` (wrapping).
    FetchAdd {
        /// Addend.
        add: u64,
    },
}

impl AtomicOp {
    /// New value given the current one.
    pub fn apply(self, current: u64) -> u64 {
        match self {
            AtomicOp::CompareSwap { compare, swap } => {
                if current == compare {
                    swap
                } else {
                    current
                }
            }
            AtomicOp::FetchAdd { add } => current.wrapping_add(add),
        }
    }
}

/// A memory region remote peers may access through its R_Key.
pub trait RemoteRegion: Send + Sync {
    /// Virtual address of the first byte (the VA peers use in RETH/AtomicETH).
    fn base_va(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Remote rights.
    fn access(&self) -> RemoteAccess;
    /// Reads at `offset` (relative to the base).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Writes at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// Atomically applies `op` to the u64 at `offset`, returning the previous value.
    fn atomic(&self, offset: u64, op: AtomicOp) -> Result<u64, MemoryError>;
    /// Makes `len` bytes at `offset` durable (IB FLUSH with placement "persistent").
    /// Called before the FLUSH response is sent. The default does nothing.
    fn persist(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        let _ = (offset, len);
        Ok(())
    }
}

/// R_Key -> region lookup (a domain's registrations).
pub trait RemoteMemoryTable: Send + Sync {
    /// The region registered under `rkey`, if any.
    fn lookup(&self, rkey: u32) -> Option<Arc<dyn RemoteRegion>>;
}

/// Memory backed by a `Vec<u8>` behind a mutex: usable as local memory and as a
/// remote region. For tests and examples.
pub struct VecMemory {
    data: Mutex<Vec<u8>>,
    base_va: u64,
    access: RemoteAccess,
    persists: Mutex<Vec<(u64, u64)>>,
}

impl VecMemory {
    /// `len` zero bytes at virtual address `base_va` with remote rights `access`.
    pub fn new(len: usize, base_va: u64, access: RemoteAccess) -> Self {
        Self::from_vec(vec![0; len], base_va, access)
    }

    /// Wraps existing bytes.
    pub fn from_vec(data: Vec<u8>, base_va: u64, access: RemoteAccess) -> Self {
        Self {
            data: Mutex::new(data),
            base_va,
            access,
            persists: Mutex::new(Vec::new()),
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The (offset, len) ranges passed to [`RemoteRegion::persist`] so far.
    pub fn persisted(&self) -> Vec<(u64, u64)> {
        self.persists.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn range(
        &self,
        len: usize,
        offset: u64,
        n: usize,
    ) -> Result<std::ops::Range<usize>, MemoryError> {
        let start = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        let end = start.checked_add(n).ok_or(MemoryError::OutOfBounds)?;
        if end > len {
            return Err(MemoryError::OutOfBounds);
        }
        Ok(start..end)
    }
}

impl LocalMemory for VecMemory {
    fn len(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let d = self.data.lock().map_err(|_| MemoryError::Unavailable)?;
        let r = self.range(d.len(), offset, buf.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut d = self.data.lock().map_err(|_| MemoryError::Unavailable)?;
        let r = self.range(d.len(), offset, data.len())?;
        d[r].copy_from_slice(data);
        Ok(())
    }
}

impl RemoteRegion for VecMemory {
    fn base_va(&self) -> u64 {
        self.base_va
    }
    fn len(&self) -> u64 {
        LocalMemory::len(self)
    }
    fn access(&self) -> RemoteAccess {
        self.access
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        LocalMemory::read(self, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        LocalMemory::write(self, offset, data)
    }
    fn atomic(&self, offset: u64, op: AtomicOp) -> Result<u64, MemoryError> {
        if offset & 7 != 0 {
            return Err(MemoryError::Misaligned);
        }
        let mut d = self.data.lock().map_err(|_| MemoryError::Unavailable)?;
        let r = self.range(d.len(), offset, 8)?;
        let mut cur = [0u8; 8];
        cur.copy_from_slice(&d[r.clone()]);
        let old = u64::from_ne_bytes(cur);
        d[r].copy_from_slice(&op.apply(old).to_ne_bytes());
        Ok(old)
    }
    fn persist(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.persists
            .lock()
            .map_err(|_| MemoryError::Unavailable)?
            .push((offset, len));
        Ok(())
    }
}

/// A simple R_Key table. For tests and examples.
#[derive(Default)]
pub struct KeyTable {
    regions: Mutex<HashMap<u32, Arc<dyn RemoteRegion>>>,
}

impl KeyTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Registers `region` under `rkey` (replacing any previous one).
    pub fn insert(&self, rkey: u32, region: Arc<dyn RemoteRegion>) {
        if let Ok(mut m) = self.regions.lock() {
            m.insert(rkey, region);
        }
    }
    /// Removes the registration of `rkey`.
    pub fn remove(&self, rkey: u32) {
        if let Ok(mut m) = self.regions.lock() {
            m.remove(&rkey);
        }
    }
}

impl RemoteMemoryTable for KeyTable {
    fn lookup(&self, rkey: u32) -> Option<Arc<dyn RemoteRegion>> {
        self.regions.lock().ok()?.get(&rkey).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_memory_bounds_and_atomics() {
        let m = VecMemory::new(16, 0x1000, RemoteAccess::ALL);
        LocalMemory::write(&m, 8, &5u64.to_ne_bytes()).unwrap();
        assert_eq!(
            RemoteRegion::atomic(&m, 8, AtomicOp::FetchAdd { add: 2 }),
            Ok(5)
        );
        assert_eq!(
            RemoteRegion::atomic(
                &m,
                8,
                AtomicOp::CompareSwap {
                    compare: 7,
                    swap: 1
                }
            ),
            Ok(7)
        );
        assert_eq!(
            RemoteRegion::atomic(
                &m,
                8,
                AtomicOp::CompareSwap {
                    compare: 7,
                    swap: 1
                }
            ),
            Ok(1)
        );
        assert_eq!(
            RemoteRegion::atomic(&m, 4, AtomicOp::FetchAdd { add: 1 }),
            Err(MemoryError::Misaligned)
        );
        assert_eq!(
            LocalMemory::write(&m, 15, &[0, 0]),
            Err(MemoryError::OutOfBounds)
        );
        assert_eq!(
            LocalMemory::read(&m, u64::MAX, &mut [0]),
            Err(MemoryError::OutOfBounds)
        );
        let t = KeyTable::new();
        t.insert(7, Arc::new(m));
        assert!(t.lookup(7).is_some());
        assert!(t.lookup(8).is_none());
    }
}

//! Memory seen by the RC core, independent of any registration API.
//!
//! * [`LocalMemory`] backs the buffers of posted work requests (the data a SEND or
//!   WRITE transmits, the buffer a receive or an RDMA READ fills, the 8 bytes an atomic
//!   returns).
//! * [`RemoteMemoryTable`] is a domain's R_Keys and its one remote-access check:
//!   [`verify`](RemoteMemoryTable::verify) takes the R_Key, the bytes asked for
//!   ([`RemoteSpan`]) and what the access needs ([`RemoteNeed`]: a right, and
//!   persistence for a persistent FLUSH), and answers with the verified range as a
//!   [`RemoteRegion`] (offsets relative to its first byte) or the NAK code of the
//!   refusal. The core touches nothing before it passes.
//!
//! Implementations of [`RemoteRegion`] only see in-range offsets; they still return
//! errors instead of panicking. Both traits take `&self`: a region is shared between the local user and
//! remote peers, so implementations need interior mutability (the later fabric-core
//! binding wraps registered memory whose soundness contract lives there).
//! [`VecMemory`] and [`KeyTable`] are simple implementations for tests and examples;
//! the provider's table is fabric-core's `prov::KeyMap`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::wire::ext::NakCode;

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

/// The right a remote access needs on the region its R_Key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteRight {
    /// RDMA READ.
    Read,
    /// RDMA WRITE.
    Write,
    /// Atomic CMP_SWAP / FETCH_ADD.
    Atomic,
    /// IB FLUSH: read or write.
    Flush,
}

/// What a remote access needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteNeed {
    /// The right.
    pub right: RemoteRight,
    /// A FLUSH with placement "persistent": the region must be persistent memory
    /// (refused with NAK invalid request otherwise, rxe: no
    /// `IB_ACCESS_FLUSH_PERSISTENT`).
    pub persistent: bool,
}

impl From<RemoteRight> for RemoteNeed {
    fn from(right: RemoteRight) -> Self {
        RemoteNeed {
            right,
            persistent: false,
        }
    }
}

/// The bytes a remote access asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteSpan {
    /// `len` bytes at virtual address `va`.
    Range {
        /// First byte (the VA peers use in RETH/AtomicETH).
        va: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The whole region (an IB FLUSH with selectivity "memory region").
    Region,
}

/// A verified range of a region remote peers may access: what
/// [`RemoteMemoryTable::verify`] answers. Offsets are relative to its first byte.
pub trait RemoteRegion: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the range is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads at `offset` (relative to the range's first byte).
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

/// A domain's registrations and the one remote-access check.
pub trait RemoteMemoryTable: Send + Sync {
    /// Checks R_Key, right, bounds (with overflow) and, for `need.persistent`,
    /// persistence; returns the verified range, or the NAK code the responder refuses
    /// the request with (remote access error; invalid request for a persistent FLUSH
    /// into memory that is not persistent). Zero-length reads and writes need no key
    /// (IBTA 9.4.1.1): the core does not call it for them.
    fn verify(
        &self,
        rkey: u32,
        span: RemoteSpan,
        need: RemoteNeed,
    ) -> Result<Arc<dyn RemoteRegion>, NakCode>;
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
    fn len(&self) -> u64 {
        LocalMemory::len(self)
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

/// A verified range of a [`VecMemory`].
struct VecRange {
    memory: Arc<VecMemory>,
    offset: u64,
    len: u64,
}

impl VecRange {
    fn at(&self, offset: u64, n: usize) -> Result<u64, MemoryError> {
        match offset.checked_add(n as u64) {
            Some(end) if end <= self.len => Ok(self.offset + offset),
            _ => Err(MemoryError::OutOfBounds),
        }
    }
}

impl RemoteRegion for VecRange {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        LocalMemory::read(&*self.memory, self.at(offset, buf.len())?, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        LocalMemory::write(&*self.memory, self.at(offset, data.len())?, data)
    }
    fn atomic(&self, offset: u64, op: AtomicOp) -> Result<u64, MemoryError> {
        RemoteRegion::atomic(&*self.memory, self.at(offset, 8)?, op)
    }
    fn persist(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        let n = usize::try_from(len).map_err(|_| MemoryError::OutOfBounds)?;
        RemoteRegion::persist(&*self.memory, self.at(offset, n)?, len)
    }
}

/// A simple R_Key table over [`VecMemory`]. For tests and examples.
#[derive(Default)]
pub struct KeyTable {
    regions: Mutex<HashMap<u32, Arc<VecMemory>>>,
}

impl KeyTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Registers `region` under `rkey` (replacing any previous one); its base address
    /// and rights are those of the [`VecMemory`].
    pub fn insert(&self, rkey: u32, region: Arc<VecMemory>) {
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
    fn verify(
        &self,
        rkey: u32,
        span: RemoteSpan,
        need: RemoteNeed,
    ) -> Result<Arc<dyn RemoteRegion>, NakCode> {
        let refused = NakCode::RemoteAccessError;
        let memory = self
            .regions
            .lock()
            .map_err(|_| refused)?
            .get(&rkey)
            .cloned()
            .ok_or(refused)?;
        let a = memory.access;
        let allowed = match need.right {
            RemoteRight::Read => a.read,
            RemoteRight::Write => a.write,
            RemoteRight::Atomic => a.atomic,
            RemoteRight::Flush => a.read || a.write,
        };
        if !allowed {
            return Err(refused);
        }
        let size = LocalMemory::len(&*memory);
        let (offset, len) = match span {
            RemoteSpan::Region => (0, size),
            RemoteSpan::Range { va, len } => {
                let offset = va.checked_sub(memory.base_va).ok_or(refused)?;
                match offset.checked_add(len) {
                    Some(end) if end <= size => (offset, len),
                    _ => return Err(refused),
                }
            }
        };
        Ok(Arc::new(VecRange {
            memory,
            offset,
            len,
        }))
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
        let w = |va, len| RemoteSpan::Range { va, len };
        let r = t
            .verify(7, w(0x1008, 8), RemoteRight::Atomic.into())
            .unwrap();
        assert_eq!(r.len(), 8);
        assert_eq!(r.atomic(0, AtomicOp::FetchAdd { add: 0 }), Ok(1));
        assert_eq!(r.read(1, &mut [0; 8]), Err(MemoryError::OutOfBounds));
        assert_eq!(
            t.verify(7, RemoteSpan::Region, RemoteRight::Flush.into())
                .unwrap()
                .len(),
            16
        );
        let refused = Some(NakCode::RemoteAccessError);
        assert_eq!(
            t.verify(8, w(0x1000, 1), RemoteRight::Read.into()).err(),
            refused
        );
        assert_eq!(
            t.verify(7, w(0xfff, 1), RemoteRight::Read.into()).err(),
            refused
        );
        assert_eq!(
            t.verify(7, w(0x1008, 9), RemoteRight::Read.into()).err(),
            refused
        );
        assert_eq!(
            t.verify(7, w(u64::MAX, 2), RemoteRight::Read.into()).err(),
            refused
        );
        t.insert(9, Arc::new(VecMemory::new(8, 0, RemoteAccess::READ)));
        assert_eq!(
            t.verify(9, w(0, 8), RemoteRight::Write.into()).err(),
            refused
        );
        assert!(t.verify(9, w(0, 8), RemoteRight::Flush.into()).is_ok());
    }
}

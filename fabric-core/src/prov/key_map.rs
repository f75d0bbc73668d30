//! The memory keys of a domain and the one remote-access check every provider makes.
//!
//! A provider registers memory with [`KeyMap::insert`] (a fresh random non-zero key of
//! the width it advertises in `mr_key_size`) and, for every remote access a peer asks
//! for, calls [`KeyMap::verify`] before it touches a byte: key, rights, bounds (with
//! overflow checks) and, for a COMMIT, a `PMEM` registration. The answer is a
//! [`RemoteRange`], a range whose bounds are a type invariant, through which the
//! provider reads, writes (non-temporal for `UNCACHED` registrations), persists or
//! applies an atomic.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::flags::{Access, MrFlags};
use crate::memory::MemoryBacking;

/// How a registration's remote addresses are formed (`MrMode::VIRT_ADDR` or offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrMode {
    /// Remote address 0 is the region's first byte (offsets).
    Offset,
    /// Remote addresses are the region's virtual addresses (its pointer is the base),
    /// as verbs and rxe use them.
    Virtual,
}

/// Why a remote access was refused. The target's memory was not touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccessError {
    /// No registration has the key (never registered, or deregistered).
    BadKey,
    /// The registration lacks the right asked for.
    NoAccess,
    /// The range is not inside the registration (or its arithmetic overflows).
    OutOfBounds,
    /// A COMMIT into a registration that is not `PMEM`.
    NotPmem,
    /// An atomic on an address that is not 8-byte aligned.
    Misaligned,
    /// Persisting the range failed.
    PersistFailed,
}

impl AccessError {
    /// A short lowercase description.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessError::BadKey => "unknown memory key",
            AccessError::NoAccess => "the region lacks the access right",
            AccessError::OutOfBounds => "the range is outside the region",
            AccessError::NotPmem => "COMMIT into a region not registered PMEM",
            AccessError::Misaligned => "misaligned atomic access",
            AccessError::PersistFailed => "persisting the range failed",
        }
    }
    /// The completion error kind an initiator reports for this refusal.
    pub fn cq_kind(self) -> crate::CqErrorKind {
        match self {
            AccessError::BadKey | AccessError::NoAccess | AccessError::OutOfBounds => {
                crate::CqErrorKind::RemoteAccess
            }
            AccessError::NotPmem | AccessError::Misaligned => crate::CqErrorKind::RemoteInvalid,
            AccessError::PersistFailed => crate::CqErrorKind::RemoteOperation,
        }
    }
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for AccessError {}

/// What a remote access needs from the registration it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The remote right: `REMOTE_WRITE`, `REMOTE_READ` (or both for atomics).
    pub access: Access,
    /// A COMMIT: the registration must be `PMEM`.
    pub pmem: bool,
}

impl From<Access> for Need {
    fn from(access: Access) -> Need {
        Need {
            access,
            pmem: false,
        }
    }
}

impl Need {
    /// A COMMIT write: `REMOTE_WRITE` into `PMEM` memory.
    pub const COMMIT: Need = Need {
        access: Access::REMOTE_WRITE,
        pmem: true,
    };
}

/// One registration as the key map holds it.
pub struct Registration {
    memory: Arc<dyn MemoryBacking>,
    access: Access,
    flags: MrFlags,
    base: u64,
}

impl Registration {
    /// The remote address of the first byte.
    pub fn base_addr(&self) -> u64 {
        self.base
    }
    /// Access rights.
    pub fn access(&self) -> Access {
        self.access
    }
    /// Registration flags.
    pub fn flags(&self) -> MrFlags {
        self.flags
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.memory.len()
    }
    /// Whether the registration is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A verified range of a registration: `offset + len <= registration length` is a type
/// invariant (only [`KeyMap::verify`] makes one). Holding it keeps the memory alive
/// even if the registration is dropped meanwhile (as a NIC finishes a DMA that started
/// before a deregistration).
#[derive(Clone)]
pub struct RemoteRange {
    reg: Arc<Registration>,
    offset: usize,
    len: usize,
}

impl fmt::Debug for RemoteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteRange")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl RemoteRange {
    /// Offset of the range in its registration.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The registration.
    pub fn registration(&self) -> &Registration {
        &self.reg
    }
    /// The memory behind the registration.
    pub fn memory(&self) -> &Arc<dyn MemoryBacking> {
        &self.reg.memory
    }
    /// Whether incoming data must be placed with non-temporal stores (`UNCACHED`).
    pub fn uncached(&self) -> bool {
        self.reg.flags.contains(MrFlags::UNCACHED)
    }
    /// The first byte: valid for reads and writes of [`len`](Self::len) bytes while
    /// the range lives (the type's invariant), under the rules of
    /// [`crate::memory`] for memory that peers write.
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: offset <= offset + len <= memory.len() (the invariant).
        unsafe { self.reg.memory.as_ptr().add(self.offset) }
    }
    fn within(&self, at: usize, n: usize) -> Result<*mut u8, AccessError> {
        match at.checked_add(n) {
            // SAFETY: at + n <= len, so the result stays inside the range.
            Some(end) if end <= self.len => Ok(unsafe { self.ptr().add(at) }),
            _ => Err(AccessError::OutOfBounds),
        }
    }
    /// Copies `buf.len()` bytes at `at` (within the range) into `buf`.
    pub fn read(&self, at: usize, buf: &mut [u8]) -> Result<(), AccessError> {
        let p = self.within(at, buf.len())?;
        // SAFETY: p is valid for buf.len() bytes (checked); buf is a distinct
        // allocation. Concurrent writers may make the copy torn, as on a NIC.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    /// Copies `data` to `at` (within the range); non-temporal for `UNCACHED`.
    pub fn write(&self, at: usize, data: &[u8]) -> Result<(), AccessError> {
        let p = self.within(at, data.len())?;
        if self.uncached() {
            // SAFETY: offset + at + data.len() <= memory.len() (checked above).
            unsafe { self.reg.memory.write_uncached(self.offset + at, data) };
        } else {
            // SAFETY: p is valid for data.len() bytes (checked).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        }
        Ok(())
    }
    /// Makes the range durable (see [`MemoryBacking::persist`]); a no-op when empty.
    pub fn persist(&self) -> Result<(), AccessError> {
        if self.len == 0 {
            return Ok(());
        }
        self.reg
            .memory
            .persist(self.offset, self.len)
            .map_err(|_| AccessError::PersistFailed)
    }
    /// Applies `f` to the aligned 8-byte word at `at` atomically (sequentially
    /// consistent against every other atomic of this process on it) and returns the
    /// old value.
    pub fn atomic_u64(&self, at: usize, f: impl Fn(u64) -> u64) -> Result<u64, AccessError> {
        let p = self.within(at, 8)?;
        if !(p as usize).is_multiple_of(8) {
            return Err(AccessError::Misaligned);
        }
        // SAFETY: p is 8-byte aligned and valid for 8 bytes while the range lives;
        // AtomicU64 has the layout of u64.
        let a = unsafe { &*(p as *const AtomicU64) };
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            match a.compare_exchange(cur, f(cur), Ordering::SeqCst, Ordering::SeqCst) {
                Ok(old) => return Ok(old),
                Err(now) => cur = now,
            }
        }
    }
}

/// The memory keys of one domain.
pub struct KeyMap {
    map: RwLock<HashMap<u64, Arc<Registration>>>,
    key_bits: u32,
    mode: AddrMode,
}

impl fmt::Debug for KeyMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMap")
            .field("keys", &self.map.read().len())
            .field("key_bits", &self.key_bits)
            .field("mode", &self.mode)
            .finish()
    }
}

impl KeyMap {
    /// A key map handing out keys of `key_bytes` bytes (4 or 8: the provider's
    /// `mr_key_size`) with remote addresses in `mode`.
    pub fn new(key_bytes: usize, mode: AddrMode) -> Self {
        KeyMap {
            map: RwLock::new(HashMap::new()),
            key_bits: (key_bytes.clamp(1, 8) * 8) as u32,
            mode,
        }
    }

    /// Registers memory under a fresh random non-zero key; returns the key and the
    /// remote address of the first byte.
    pub fn insert(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> (u64, u64) {
        let base = match self.mode {
            AddrMode::Offset => 0,
            AddrMode::Virtual => memory.as_ptr() as u64,
        };
        let reg = Arc::new(Registration {
            memory,
            access,
            flags,
            base,
        });
        let mask = if self.key_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.key_bits) - 1
        };
        let mut map = self.map.write();
        loop {
            let key = rand::random::<u64>() & mask;
            if key != 0 && !map.contains_key(&key) {
                map.insert(key, reg);
                return (key, base);
            }
        }
    }

    /// Ends a registration: later accesses with its key are refused (ranges already
    /// verified keep their memory alive until dropped).
    pub fn remove(&self, key: u64) {
        self.map.write().remove(&key);
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The one remote-access check: `len` bytes at remote address `addr` of the
    /// registration `key`, with the rights (and PMEM) `need` asks for.
    pub fn verify(
        &self,
        key: u64,
        addr: u64,
        len: u64,
        need: impl Into<Need>,
    ) -> Result<RemoteRange, AccessError> {
        let need = need.into();
        let reg = self
            .map
            .read()
            .get(&key)
            .cloned()
            .ok_or(AccessError::BadKey)?;
        if !reg.access.contains(need.access) {
            return Err(AccessError::NoAccess);
        }
        let offset = addr.checked_sub(reg.base).ok_or(AccessError::OutOfBounds)?;
        match offset.checked_add(len) {
            Some(end) if end <= reg.memory.len() as u64 => {}
            _ => return Err(AccessError::OutOfBounds),
        }
        if need.pmem && !reg.flags.contains(MrFlags::PMEM) {
            return Err(AccessError::NotPmem);
        }
        // Both fit in usize: end <= memory.len().
        Ok(RemoteRange {
            reg,
            offset: offset as usize,
            len: len as usize,
        })
    }

    /// [`verify`](Self::verify) of the whole registration `key` (e.g. an IB FLUSH of a
    /// memory region).
    pub fn verify_region(
        &self,
        key: u64,
        need: impl Into<Need>,
    ) -> Result<RemoteRange, AccessError> {
        let (base, len) = {
            let map = self.map.read();
            let reg = map.get(&key).ok_or(AccessError::BadKey)?;
            (reg.base, reg.memory.len() as u64)
        };
        self.verify(key, base, len, need)
    }

    /// [`verify`](Self::verify) for each of several (key, addr, len) ranges, all or
    /// nothing: the first refusal and its index.
    pub fn verify_all(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64, u64)>,
        need: impl Into<Need>,
    ) -> Result<Vec<RemoteRange>, (AccessError, usize)> {
        let need = need.into();
        ranges
            .into_iter()
            .enumerate()
            .map(|(i, (k, a, l))| self.verify(k, a, l, need).map_err(|e| (e, i)))
            .collect()
    }
}

/// A registration as a provider hands it to fabric-core: its key and remote address
/// in a domain's [`KeyMap`]; dropping it removes the key.
pub struct KeyedMr {
    key: u64,
    base: u64,
    map: Arc<KeyMap>,
}

impl KeyedMr {
    /// Registers `memory` in `map` ([`KeyMap::insert`]).
    pub fn register(
        map: &Arc<KeyMap>,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> KeyedMr {
        let (key, base) = map.insert(memory, access, flags);
        KeyedMr {
            key,
            base,
            map: map.clone(),
        }
    }
}

impl crate::provider::MrOps for KeyedMr {
    fn key(&self) -> u64 {
        self.key
    }
    fn base_addr(&self) -> u64 {
        self.base
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for KeyedMr {
    fn drop(&mut self) {
        self.map.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HeapMemory;

    fn heap(n: usize) -> Arc<dyn MemoryBacking> {
        Arc::new(HeapMemory::new(n).unwrap())
    }

    #[test]
    fn key_right_bounds_overflow_and_removal() {
        let m = KeyMap::new(8, AddrMode::Offset);
        let (k, base) = m.insert(heap(100), Access::REMOTE_WRITE, MrFlags::empty());
        assert_ne!(k, 0);
        assert_eq!(base, 0);
        let w = Access::REMOTE_WRITE;
        assert_eq!(m.verify(k, 0, 100, w).unwrap().len(), 100);
        assert!(m.verify(k, 100, 0, w).is_ok());
        assert_eq!(
            m.verify(k, 1, 100, w).unwrap_err(),
            AccessError::OutOfBounds
        );
        assert_eq!(
            m.verify(k, 101, 0, w).unwrap_err(),
            AccessError::OutOfBounds
        );
        assert_eq!(
            m.verify(k, u64::MAX, 2, w).unwrap_err(),
            AccessError::OutOfBounds
        );
        assert_eq!(
            m.verify(k, 2, u64::MAX, w).unwrap_err(),
            AccessError::OutOfBounds
        );
        assert_eq!(
            m.verify(k, 0, 1, Access::REMOTE_READ).unwrap_err(),
            AccessError::NoAccess
        );
        assert_eq!(m.verify(k ^ 1, 0, 1, w).unwrap_err(), AccessError::BadKey);
        assert_eq!(
            m.verify_all([(k, 0, 1), (k, 50, 51)], w).unwrap_err(),
            (AccessError::OutOfBounds, 1)
        );
        let r = m.verify(k, 10, 20, w).unwrap();
        m.remove(k);
        assert_eq!(m.verify(k, 0, 1, w).unwrap_err(), AccessError::BadKey);
        // A range verified before the removal still reaches live memory.
        r.write(0, b"still here").unwrap();
        let mut b = [0u8; 10];
        r.read(0, &mut b).unwrap();
        assert_eq!(&b, b"still here");
        assert_eq!(
            r.write(15, b"123456").unwrap_err(),
            AccessError::OutOfBounds
        );
    }

    #[test]
    fn a_keyed_mr_removes_its_key_when_dropped() {
        use crate::provider::MrOps;
        let m = Arc::new(KeyMap::new(4, AddrMode::Virtual));
        let mem = heap(16);
        let ptr = mem.as_ptr() as u64;
        let mr = KeyedMr::register(&m, mem, Access::REMOTE, MrFlags::empty());
        assert_eq!(mr.base_addr(), ptr);
        assert!(mr.key() <= u64::from(u32::MAX));
        assert!(m.verify(mr.key(), ptr, 16, Access::REMOTE_READ).is_ok());
        let k = mr.key();
        drop(mr);
        assert!(m.is_empty());
        assert_eq!(
            m.verify(k, ptr, 1, Access::REMOTE_READ).unwrap_err(),
            AccessError::BadKey
        );
    }

    #[test]
    fn virtual_addresses_and_32_bit_keys() {
        let m = KeyMap::new(4, AddrMode::Virtual);
        let mem = heap(64);
        let ptr = mem.as_ptr() as u64;
        for _ in 0..1000 {
            let (k, base) = m.insert(mem.clone(), Access::REMOTE, MrFlags::empty());
            assert!(k != 0 && k <= u64::from(u32::MAX), "{k:#x}");
            assert_eq!(base, ptr);
        }
        assert_eq!(m.len(), 1000);
        let (k, _) = m.insert(mem, Access::REMOTE, MrFlags::empty());
        assert!(m.verify(k, ptr + 8, 56, Access::REMOTE_READ).is_ok());
        let whole = m.verify_region(k, Access::REMOTE_READ).unwrap();
        assert_eq!((whole.offset(), whole.len()), (0, 64));
        assert_eq!(
            m.verify_region(k ^ 1, Access::REMOTE_READ).unwrap_err(),
            AccessError::BadKey
        );
        assert_eq!(
            m.verify_region(k, Need::COMMIT).unwrap_err(),
            AccessError::NotPmem
        );
        assert_eq!(
            m.verify(k, ptr - 1, 1, Access::REMOTE_READ).unwrap_err(),
            AccessError::OutOfBounds
        );
        assert_eq!(
            m.verify(k, 0, 1, Access::REMOTE_READ).unwrap_err(),
            AccessError::OutOfBounds
        );
    }

    #[test]
    fn commit_needs_pmem_and_atomics_need_alignment() {
        let m = KeyMap::new(8, AddrMode::Offset);
        let (k, _) = m.insert(heap(64), Access::REMOTE, MrFlags::empty());
        assert_eq!(
            m.verify(k, 0, 8, Need::COMMIT).unwrap_err(),
            AccessError::NotPmem
        );
        assert_eq!(
            AccessError::NotPmem.cq_kind(),
            crate::CqErrorKind::RemoteInvalid
        );
        assert_eq!(
            AccessError::BadKey.cq_kind(),
            crate::CqErrorKind::RemoteAccess
        );
        let r = m.verify(k, 0, 64, Access::REMOTE).unwrap();
        r.write(8, &41u64.to_ne_bytes()).unwrap();
        assert_eq!(r.atomic_u64(8, |v| v + 1).unwrap(), 41);
        assert_eq!(r.atomic_u64(8, |v| v * 2).unwrap(), 42);
        let mut b = [0u8; 8];
        r.read(8, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 84);
        assert_eq!(r.atomic_u64(4, |v| v).unwrap_err(), AccessError::Misaligned);
        assert_eq!(
            r.atomic_u64(60, |v| v).unwrap_err(),
            AccessError::OutOfBounds
        );
        // Persisting heap memory is refused (no persistence domain).
        assert_eq!(r.persist().unwrap_err(), AccessError::PersistFailed);
    }
}

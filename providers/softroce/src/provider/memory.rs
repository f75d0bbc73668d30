//! Registered memory as the RC core sees it: the domain's R_Key table
//! ([`RemoteMemoryTable`]) over fabric-core registrations, and the local buffers of
//! posted operations ([`LocalMemory`]) over fabric-core segments.
//!
//! Remote addresses are virtual addresses (`MrMode::VIRT_ADDR`, as in rxe): a region's
//! base VA is its pointer. The core checks key, rights and bounds before it calls
//! `read`/`write`; the accessors here check bounds again and never panic.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fabric_core::provider::MrOps;
use fabric_core::{Access, MemoryBacking, MrFlags, Segment};
use parking_lot::RwLock;

use crate::rc::{
    AtomicOp, LocalMemory, MemoryError, RemoteAccess, RemoteMemoryTable, RemoteRegion,
};

/// A registered region, reachable by peers through its key.
pub(crate) struct Region {
    memory: Arc<dyn MemoryBacking>,
    access: Access,
    flags: MrFlags,
}

impl Region {
    fn range(&self, offset: u64, n: usize) -> Result<usize, MemoryError> {
        let start = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
        match start.checked_add(n) {
            Some(end) if end <= self.memory.len() => Ok(start),
            _ => Err(MemoryError::OutOfBounds),
        }
    }
}

impl RemoteRegion for Region {
    fn base_va(&self) -> u64 {
        self.memory.as_ptr() as u64
    }
    fn len(&self) -> u64 {
        self.memory.len() as u64
    }
    fn access(&self) -> RemoteAccess {
        RemoteAccess {
            read: self.access.contains(Access::REMOTE_READ),
            write: self.access.contains(Access::REMOTE_WRITE),
            atomic: false,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let start = self.range(offset, buf.len())?;
        // SAFETY: start + buf.len() <= memory.len() (checked); the backing keeps the
        // memory valid while this Arc lives. Concurrent local writes may make the copy
        // torn, as on a NIC (fabric-core's memory module documents this).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.memory.as_ptr().add(start),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let start = self.range(offset, data.len())?;
        if self.flags.contains(MrFlags::UNCACHED) {
            // SAFETY: start + data.len() <= memory.len() (checked above).
            unsafe { self.memory.write_uncached(start, data) };
        } else {
            // SAFETY: as in `read`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    self.memory.as_ptr().add(start),
                    data.len(),
                )
            };
        }
        Ok(())
    }
    fn atomic(&self, offset: u64, op: AtomicOp) -> Result<u64, MemoryError> {
        let start = self.range(offset, 8)?;
        // SAFETY: in bounds (checked).
        let ptr = unsafe { self.memory.as_ptr().add(start) };
        if !(ptr as usize).is_multiple_of(8) {
            return Err(MemoryError::Misaligned);
        }
        // SAFETY: ptr is 8-byte aligned, in bounds and valid for the region's life;
        // AtomicU64 has the layout of u64.
        let a = unsafe { &*(ptr as *const AtomicU64) };
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            match a.compare_exchange(cur, op.apply(cur), Ordering::SeqCst, Ordering::SeqCst) {
                Ok(old) => return Ok(old),
                Err(now) => cur = now,
            }
        }
    }
    fn persist(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        if !self.flags.contains(MrFlags::PMEM) {
            return Err(MemoryError::NotPersistent);
        }
        let start = self.range(
            offset,
            usize::try_from(len).map_err(|_| MemoryError::OutOfBounds)?,
        )?;
        if len == 0 {
            return Ok(());
        }
        self.memory
            .persist(start, len as usize)
            .map_err(|_| MemoryError::PersistFailed)
    }
}

/// The R_Keys of one domain.
#[derive(Default)]
pub(crate) struct KeyTable {
    map: RwLock<HashMap<u32, Arc<Region>>>,
}

impl KeyTable {
    /// Registers memory under a fresh random non-zero 32-bit key.
    pub(crate) fn insert(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> u32 {
        let region = Arc::new(Region {
            memory,
            access,
            flags,
        });
        let mut map = self.map.write();
        loop {
            let key: u32 = rand::random();
            if key != 0 && !map.contains_key(&key) {
                map.insert(key, region);
                return key;
            }
        }
    }

    fn remove(&self, key: u32) {
        self.map.write().remove(&key);
    }
}

impl RemoteMemoryTable for KeyTable {
    fn lookup(&self, rkey: u32) -> Option<Arc<dyn RemoteRegion>> {
        self.map
            .read()
            .get(&rkey)
            .map(|r| r.clone() as Arc<dyn RemoteRegion>)
    }
}

/// A registration: dropping it removes the key, so later requests with it are refused.
pub(crate) struct SoftRoceMr {
    pub(crate) key: u32,
    pub(crate) base: u64,
    pub(crate) table: Arc<KeyTable>,
}

impl MrOps for SoftRoceMr {
    fn key(&self) -> u64 {
        u64::from(self.key)
    }
    fn base_addr(&self) -> u64 {
        self.base
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for SoftRoceMr {
    fn drop(&mut self) {
        self.table.remove(self.key);
    }
}

/// The local data of one operation: the concatenation of its segments (a gather list
/// for sends and writes, a scatter list for receives and reads), or bytes copied at
/// the call (inject). Holding it holds the regions.
pub(crate) enum OpMemory {
    Inline(Vec<u8>),
    Segments {
        segs: Vec<Segment>,
        /// Offset of each segment in the concatenation.
        starts: Vec<u64>,
        total: u64,
    },
}

impl OpMemory {
    pub(crate) fn segments(segs: Vec<Segment>) -> Self {
        let mut starts = Vec::with_capacity(segs.len());
        let mut total = 0u64;
        for s in &segs {
            starts.push(total);
            total += s.len() as u64;
        }
        OpMemory::Segments {
            segs,
            starts,
            total,
        }
    }

    /// Calls `f(segment pointer, offset in the segment, offset in the buffer, n)` for
    /// each piece of `[offset, offset + len)`.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        let OpMemory::Segments {
            segs,
            starts,
            total,
        } = self
        else {
            return Err(MemoryError::Unavailable);
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= *total)
            .ok_or(MemoryError::OutOfBounds)?;
        let mut i = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let mut pos = offset;
        while pos < end && i < segs.len() {
            let seg_start = starts[i];
            let seg = &segs[i];
            let within = (pos - seg_start) as usize;
            let n = (seg.len() - within).min((end - pos) as usize);
            if n > 0 {
                // SAFETY: within + n <= seg.len(), and a Segment lies inside its region
                // (its type invariant); the region is alive while the segment is.
                let p = unsafe { seg.ptr().add(within) };
                f(p, (pos - offset) as usize, n);
            }
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }
}

impl LocalMemory for OpMemory {
    fn len(&self) -> u64 {
        match self {
            OpMemory::Inline(v) => v.len() as u64,
            OpMemory::Segments { total, .. } => *total,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if let OpMemory::Inline(v) = self {
            let s = usize::try_from(offset).map_err(|_| MemoryError::OutOfBounds)?;
            let src = s
                .checked_add(buf.len())
                .and_then(|e| v.get(s..e))
                .ok_or(MemoryError::OutOfBounds)?;
            buf.copy_from_slice(src);
            return Ok(());
        }
        let dst = buf.as_mut_ptr();
        self.pieces(offset, buf.len(), |p, at, n| {
            // SAFETY: p is valid for n bytes (see `pieces`); at + n <= buf.len().
            unsafe { std::ptr::copy_nonoverlapping(p, dst.add(at), n) }
        })
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        if let OpMemory::Inline(_) = self {
            return Err(MemoryError::Unavailable);
        }
        let src = data.as_ptr();
        self.pieces(offset, data.len(), |p, at, n| {
            // SAFETY: p is valid for n bytes; at + n <= data.len().
            unsafe { std::ptr::copy_nonoverlapping(src.add(at), p, n) }
        })
    }
}

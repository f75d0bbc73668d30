//! Memory registration: the domain's key table and the remote-access check every
//! incoming RMA passes before any byte of a region is touched.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use fabric_core::provider::MrOps;
use fabric_core::{Access, MemoryBacking, MrFlags};
use parking_lot::RwLock;

use crate::wire::{Status, WireIov};

/// A registered region as the key table holds it. The `Arc` keeps the memory valid for
/// accesses that are in flight when the registration is dropped.
#[derive(Clone)]
pub(crate) struct MrEntry {
    pub(crate) memory: Arc<dyn MemoryBacking>,
    pub(crate) access: Access,
    pub(crate) flags: MrFlags,
}

/// A checked range of a registered region: the target of a remote write or the source
/// of a read response.
pub(crate) struct RegionRange {
    pub(crate) memory: Arc<dyn MemoryBacking>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// Registered `UNCACHED`: incoming writes are placed with non-temporal stores.
    pub(crate) uncached: bool,
}

/// What a remote access needs from every region it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Need {
    /// The remote right (`REMOTE_WRITE` or `REMOTE_READ`).
    pub(crate) access: Access,
    /// A COMMIT write: every region must be registered `PMEM`.
    pub(crate) pmem: bool,
}

impl Need {
    /// A plain access with `access` rights.
    pub(crate) fn access(access: Access) -> Need {
        Need {
            access,
            pmem: false,
        }
    }
}

impl RegionRange {
    /// Start of the range.
    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + len <= memory.len() was checked when the range was made.
        unsafe { self.memory.as_ptr().add(self.offset) }
    }

    /// Makes the range durable ([`MemoryBacking::persist`]); a no-op when empty.
    pub(crate) fn persist(&self) -> std::io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        self.memory.persist(self.offset, self.len)
    }
}

/// The keys of one domain.
#[derive(Default)]
pub(crate) struct KeyTable {
    map: RwLock<HashMap<u64, MrEntry>>,
}

/// Why a remote access was refused: the wire status and the index of the iovec.
pub(crate) type AccessRefusal = (Status, usize);

impl KeyTable {
    /// Registers `entry` under a fresh random non-zero key.
    pub(crate) fn insert(&self, entry: MrEntry) -> u64 {
        let mut map = self.map.write();
        loop {
            let key: u64 = rand::random();
            if key != 0 && !map.contains_key(&key) {
                map.insert(key, entry);
                return key;
            }
        }
    }

    pub(crate) fn remove(&self, key: u64) {
        self.map.write().remove(&key);
    }

    /// Checks every remote iovec (key, right, bounds with overflow checks, and for a
    /// COMMIT write a `PMEM` registration) before returning the ranges; on the first
    /// violation returns its status and index. Nothing is touched before this passes.
    pub(crate) fn check(
        &self,
        iovs: &[WireIov],
        need: Need,
    ) -> Result<Vec<RegionRange>, AccessRefusal> {
        let map = self.map.read();
        let mut out = Vec::with_capacity(iovs.len());
        for (i, v) in iovs.iter().enumerate() {
            let e = map.get(&v.key).ok_or((Status::BadKey, i))?;
            if !e.access.contains(need.access) {
                return Err((Status::NoAccess, i));
            }
            let len = e.memory.len() as u64;
            match v.addr.checked_add(v.len) {
                Some(end) if end <= len => {}
                _ => return Err((Status::OutOfBounds, i)),
            }
            if need.pmem && !e.flags.contains(MrFlags::PMEM) {
                return Err((Status::NotPmem, i));
            }
            out.push(RegionRange {
                memory: e.memory.clone(),
                offset: v.addr as usize,
                len: v.len as usize,
                uncached: e.flags.contains(MrFlags::UNCACHED),
            });
        }
        Ok(out)
    }
}

/// A registration: dropping it removes the key.
pub(crate) struct TcpMr {
    pub(crate) key: u64,
    pub(crate) table: Arc<KeyTable>,
}

impl MrOps for TcpMr {
    fn key(&self) -> u64 {
        self.key
    }
    fn base_addr(&self) -> u64 {
        0
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for TcpMr {
    fn drop(&mut self) {
        self.table.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_core::HeapMemory;

    #[test]
    fn checks_key_right_and_bounds() {
        let t = KeyTable::default();
        let mem: Arc<dyn MemoryBacking> = Arc::new(HeapMemory::new(100).unwrap());
        let k = t.insert(MrEntry {
            memory: mem,
            access: Access::REMOTE_WRITE,
            flags: MrFlags::empty(),
        });
        assert_ne!(k, 0);
        let iov = |addr, len, key| WireIov { addr, len, key };
        let w = Need::access(Access::REMOTE_WRITE);
        assert!(t.check(&[iov(0, 100, k)], w).is_ok());
        assert!(t.check(&[iov(100, 0, k)], w).is_ok());
        assert_eq!(
            t.check(&[iov(0, 1, k), iov(1, 100, k)], w).err(),
            Some((Status::OutOfBounds, 1))
        );
        assert_eq!(
            t.check(&[iov(u64::MAX, 2, k)], w).err(),
            Some((Status::OutOfBounds, 0))
        );
        assert_eq!(
            t.check(&[iov(0, 1, k)], Need::access(Access::REMOTE_READ))
                .err(),
            Some((Status::NoAccess, 0))
        );
        assert_eq!(
            t.check(&[iov(0, 1, k ^ 1)], w).err(),
            Some((Status::BadKey, 0))
        );
        t.remove(k);
        assert!(t.check(&[iov(0, 1, k)], w).is_err());
    }

    #[test]
    fn commit_needs_every_region_pmem() {
        let dir = std::env::temp_dir().join(format!("fabric-tcp-mr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = KeyTable::default();
        let heap = t.insert(MrEntry {
            memory: Arc::new(HeapMemory::new(100).unwrap()),
            access: Access::REMOTE_WRITE,
            flags: MrFlags::empty(),
        });
        let map = pmem::Mapping::create(dir.join("r"), 4096).unwrap();
        let pm = t.insert(MrEntry {
            memory: Arc::new(map),
            access: Access::REMOTE_WRITE,
            flags: MrFlags::PMEM | MrFlags::UNCACHED,
        });
        let iov = |addr, len, key| WireIov { addr, len, key };
        let commit = Need {
            access: Access::REMOTE_WRITE,
            pmem: true,
        };
        let r = t
            .check(&[iov(0, 10, pm), iov(4000, 96, pm)], commit)
            .unwrap();
        assert!(r.len() == 2 && r.iter().all(|x| x.uncached));
        assert_eq!(
            t.check(&[iov(0, 10, pm), iov(0, 10, heap)], commit).err(),
            Some((Status::NotPmem, 1))
        );
        // Key and bounds are reported before the PMEM check.
        assert_eq!(
            t.check(&[iov(0, 200, heap)], commit).err(),
            Some((Status::OutOfBounds, 0))
        );
        // Without COMMIT a heap region is fine.
        assert!(t
            .check(&[iov(0, 10, heap)], Need::access(Access::REMOTE_WRITE))
            .is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

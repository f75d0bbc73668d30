//! Memory registration: the domain's keys are a [`prov::KeyMap`] (offsets as remote
//! addresses, keys of `mr_key_size` bytes), and every incoming RMA passes
//! [`check`] (the map's one `verify` per remote iovec) before any byte of a region is
//! touched. [`status_of`] is the one mapping of a refusal to the wire status.
//! Registrations are [`prov::KeyedMr`]s.

use fabric_core::prov::{self, AccessError, KeyMap, Need, RemoteRange};

use crate::wire::{Status, WireIov};

/// Why a remote access was refused: the wire status and the index of the iovec.
pub(crate) type AccessRefusal = (Status, usize);

/// The domain's key map: `key_size` bytes per key (the info's `mr_key_size`), remote
/// addresses are offsets into the region.
pub(crate) fn key_map(key_size: usize) -> KeyMap {
    KeyMap::new(key_size, prov::AddrMode::Offset)
}

/// The wire status a refusal is answered with.
pub(crate) fn status_of(e: AccessError) -> Status {
    match e {
        AccessError::BadKey => Status::BadKey,
        AccessError::NoAccess => Status::NoAccess,
        AccessError::OutOfBounds => Status::OutOfBounds,
        AccessError::NotPmem => Status::NotPmem,
        AccessError::PersistFailed => Status::OperationFailed,
        _ => Status::Invalid,
    }
}

/// Verifies every remote iovec (key, right, bounds with overflow checks, and for a
/// COMMIT write a `PMEM` registration) before returning the ranges; on the first
/// refusal returns its status and index. Nothing is touched before this passes.
pub(crate) fn check(
    keys: &KeyMap,
    iovs: &[WireIov],
    need: Need,
) -> Result<Vec<RemoteRange>, AccessRefusal> {
    keys.verify_all(iovs.iter().map(|v| (v.key, v.addr, v.len)), need)
        .map_err(|(e, i)| (status_of(e), i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_core::{Access, HeapMemory, MemoryBacking, MrFlags};
    use std::sync::Arc;

    fn iov(addr: u64, len: u64, key: u64) -> WireIov {
        WireIov { addr, len, key }
    }

    #[test]
    fn refusals_carry_the_wire_status_and_the_iovec_index() {
        let t = key_map(8);
        let mem: Arc<dyn MemoryBacking> = Arc::new(HeapMemory::new(100).unwrap());
        let (k, base) = t.insert(mem, Access::REMOTE_WRITE, MrFlags::empty());
        assert_eq!(base, 0);
        let w = Need::from(Access::REMOTE_WRITE);
        assert!(check(&t, &[iov(0, 100, k)], w).is_ok());
        assert!(check(&t, &[iov(100, 0, k)], w).is_ok());
        assert_eq!(
            check(&t, &[iov(0, 1, k), iov(1, 100, k)], w).err(),
            Some((Status::OutOfBounds, 1))
        );
        assert_eq!(
            check(&t, &[iov(u64::MAX, 2, k)], w).err(),
            Some((Status::OutOfBounds, 0))
        );
        assert_eq!(
            check(&t, &[iov(0, 1, k)], Need::from(Access::REMOTE_READ)).err(),
            Some((Status::NoAccess, 0))
        );
        assert_eq!(
            check(&t, &[iov(0, 1, k ^ 1)], w).err(),
            Some((Status::BadKey, 0))
        );
        t.remove(k);
        assert!(check(&t, &[iov(0, 1, k)], w).is_err());
        assert_eq!(
            status_of(AccessError::PersistFailed),
            Status::OperationFailed
        );
        assert_eq!(status_of(AccessError::Misaligned), Status::Invalid);
    }

    #[test]
    fn commit_needs_every_region_pmem() {
        let dir = std::env::temp_dir().join(format!("fabric-tcp-mr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = key_map(8);
        let (heap, _) = t.insert(
            Arc::new(HeapMemory::new(100).unwrap()),
            Access::REMOTE_WRITE,
            MrFlags::empty(),
        );
        let map = pmem::Mapping::create(dir.join("r"), 4096).unwrap();
        let (pm, _) = t.insert(
            Arc::new(map),
            Access::REMOTE_WRITE,
            MrFlags::PMEM | MrFlags::UNCACHED,
        );
        let r = check(&t, &[iov(0, 10, pm), iov(4000, 96, pm)], Need::COMMIT).unwrap();
        assert!(r.len() == 2 && r.iter().all(|x| x.uncached()));
        assert_eq!(
            check(&t, &[iov(0, 10, pm), iov(0, 10, heap)], Need::COMMIT).err(),
            Some((Status::NotPmem, 1))
        );
        // Key and bounds are reported before the PMEM check.
        assert_eq!(
            check(&t, &[iov(0, 200, heap)], Need::COMMIT).err(),
            Some((Status::OutOfBounds, 0))
        );
        // Without COMMIT a heap region is fine.
        assert!(check(&t, &[iov(0, 10, heap)], Need::from(Access::REMOTE_WRITE)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn four_byte_keys_fit_32_bits() {
        let t = key_map(4);
        for _ in 0..100 {
            let (k, _) = t.insert(
                Arc::new(HeapMemory::new(8).unwrap()),
                Access::REMOTE,
                MrFlags::empty(),
            );
            assert!(k != 0 && k <= u64::from(u32::MAX));
        }
    }
}

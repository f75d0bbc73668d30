//! Memory that can be registered, memory regions, and the local / remote iovec types
//! data operations take.
//!
//! # Who owns registered memory
//! A [`MemoryRegion`] owns its memory (through an `Arc<dyn MemoryBacking>`), and every
//! posted operation holds a clone of the region until it completes. So memory can never
//! be freed, or its registration dropped, while a local operation or the provider still
//! uses it: the type system holds the region alive, no `unsafe` contract is needed to
//! post an operation.
//!
//! # Reading memory that peers may write
//! A region with [`Access::REMOTE_WRITE`] (and any region that is the destination of a
//! receive or a read) can be written by the provider on a peer's behalf at any moment
//! the application does not control. The region therefore never hands out `&[u8]`
//! safely: [`MemoryRegion::read_at`] and [`MemoryRegion::write_at`] copy through raw
//! pointers, and the slice views are `unsafe` with the contract written on them. The
//! usual discipline makes copies meaningful: read a range after the completion that
//! says it was written (a receive, a read, or a message from the peer that says so).

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::domain::Domain;
use crate::error::{Error, Result};
use crate::flags::{Access, MrFlags};
use crate::provider::MrOps;

/// Memory that can back a registration.
///
/// # Safety
/// Implementors promise that `as_ptr()` and `len()` return the same pointer and
/// length for the life of the object, that `len()` bytes from it stay valid for reads and writes (from any thread)
/// until the object is dropped, and that nothing else frees or moves that memory
/// meanwhile. The memory is accessed through raw pointers only.
pub unsafe trait MemoryBacking: Send + Sync + 'static {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the length is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether [`persist`](Self::persist) makes data durable (so the memory may be
    /// registered [`MrFlags::PMEM`]).
    fn supports_persist(&self) -> bool {
        false
    }
    /// Whether the memory is true persistent memory (durable after a CPU cache flush),
    /// as opposed to a file mapping made durable by `msync`.
    fn is_pmem(&self) -> bool {
        false
    }
    /// Makes `len` bytes at `offset` durable (flush + drain on persistent memory, msync
    /// on a file mapping).
    fn persist(&self, _offset: usize, _len: usize) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this memory has no persistence domain",
        ))
    }
    /// Copies `src` to `offset` bypassing the CPU cache (non-temporal stores) where the
    /// platform has them, then fences; used for regions registered
    /// [`MrFlags::UNCACHED`].
    ///
    /// # Safety
    /// `offset + src.len() <= self.len()`.
    unsafe fn write_uncached(&self, offset: usize, src: &[u8]) {
        pmem::memcpy_nt(self.as_ptr().add(offset), src.as_ptr(), src.len());
    }
}

/// A file mapping from the [`pmem`] crate can back a registration, including a
/// [`MrFlags::PMEM`] one.
///
/// What `persist` promises depends on the mapping: on true persistent memory
/// (`MAP_SYNC` on a DAX file system, or device DAX) the range is flushed from the CPU
/// caches (CLWB/CLFLUSHOPT/CLFLUSH + SFENCE) and is durable when the call returns. On
/// an ordinary file (page cache) it is `msync(MS_SYNC)`: durable once the file system
/// has written it to its device, which survives a process crash and, on a file system
/// with a real device, a power failure; on tmpfs it survives only the process.
// SAFETY: a Mapping's pointer and length are fixed from mmap to munmap (on drop).
unsafe impl MemoryBacking for pmem::Mapping {
    fn as_ptr(&self) -> *mut u8 {
        pmem::Mapping::as_ptr(self)
    }
    fn len(&self) -> usize {
        pmem::Mapping::len(self)
    }
    fn supports_persist(&self) -> bool {
        true
    }
    fn is_pmem(&self) -> bool {
        pmem::Mapping::is_pmem(self)
    }
    fn persist(&self, offset: usize, len: usize) -> io::Result<()> {
        pmem::Mapping::persist(self, offset, len)
    }
}

/// Zeroed, page-aligned heap memory: the usual thing to register.
pub struct HeapMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: HeapMemory is a plain allocation accessed through raw pointers only; callers
// of MemoryBacking coordinate concurrent access (see the module docs).
unsafe impl Send for HeapMemory {}
// SAFETY: as above.
unsafe impl Sync for HeapMemory {}

const PAGE: usize = 4096;

impl HeapMemory {
    /// Allocates `len` zeroed bytes aligned to 4096.
    pub fn new(len: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), PAGE)
            .map_err(|_| Error::invalid(format!("cannot allocate {len} bytes")))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::new(
                crate::ErrorKind::Io,
                format!("out of memory allocating {len} bytes"),
            ));
        }
        Ok(HeapMemory { ptr, len })
    }
    /// Allocates and fills from `data`.
    pub fn from_slice(data: &[u8]) -> Result<Self> {
        let m = Self::new(data.len())?;
        // SAFETY: fresh allocation of data.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.ptr, data.len()) };
        Ok(m)
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            alloc::dealloc(
                self.ptr,
                Layout::from_size_align_unchecked(self.len.max(1), PAGE),
            )
        }
    }
}

// SAFETY: the allocation is stable and owned until drop.
unsafe impl MemoryBacking for HeapMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

struct MrInner {
    memory: Arc<dyn MemoryBacking>,
    access: Access,
    flags: MrFlags,
    ops: Arc<dyn MrOps>,
    domain: Domain,
}

/// A registered memory region. Cloning is cheap (a reference count); the registration
/// ends when the last clone, including those held by in-flight operations, is dropped.
#[derive(Clone)]
pub struct MemoryRegion {
    inner: Arc<MrInner>,
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("len", &self.len())
            .field("key", &format_args!("{:#x}", self.key()))
            .field("access", &self.inner.access)
            .field("flags", &self.inner.flags)
            .finish()
    }
}

impl MemoryRegion {
    pub(crate) fn new(
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
        ops: Arc<dyn MrOps>,
        domain: Domain,
    ) -> Self {
        MemoryRegion {
            inner: Arc::new(MrInner {
                memory,
                access,
                flags,
                ops,
                domain,
            }),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.memory.len()
    }
    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The provider-chosen key peers use to access the region.
    pub fn key(&self) -> u64 {
        self.inner.ops.key()
    }
    /// Access rights.
    pub fn access(&self) -> Access {
        self.inner.access
    }
    /// Registration flags.
    pub fn flags(&self) -> MrFlags {
        self.inner.flags
    }
    /// The domain the region belongs to.
    pub fn domain(&self) -> &Domain {
        &self.inner.domain
    }
    /// The memory behind the region.
    pub fn backing(&self) -> &Arc<dyn MemoryBacking> {
        &self.inner.memory
    }
    /// The provider's registration object (for providers to downcast).
    pub fn provider_mr(&self) -> &Arc<dyn MrOps> {
        &self.inner.ops
    }
    /// Start of the memory. Dereferencing it is subject to the module-level rules.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.memory.as_ptr()
    }

    /// What a peer needs to access the region: address, length and key. Send it to the
    /// peer (see [`RemoteMr::to_bytes`]).
    pub fn remote(&self) -> RemoteMr {
        RemoteMr {
            addr: self.inner.ops.base_addr(),
            len: self.len() as u64,
            key: self.key(),
        }
    }

    /// A local iovec over `len` bytes at `offset`, for data operations (checked when the
    /// operation is posted).
    pub fn iov(&self, offset: usize, len: usize) -> LocalIov<'_> {
        LocalIov {
            mr: self,
            offset,
            len,
        }
    }
    /// A local iovec over the whole region.
    pub fn full(&self) -> LocalIov<'_> {
        self.iov(0, self.len())
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}+{len} is outside the region of {} bytes",
                self.len()
            ))),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        // SAFETY: range checked; memory valid while self lives; see module docs on
        // concurrent peer writes (bytes being written concurrently may read torn).
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `len` bytes at `offset` into a new vector.
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        // SAFETY: range checked; memory valid while self lives.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies `len` bytes at `src_off` of `src` to `offset` of this region (the two
    /// may be the same region; overlapping ranges copy as `memmove` does).
    pub fn copy_from(
        &self,
        offset: usize,
        src: &MemoryRegion,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        src.check_range(src_off, len)?;
        // SAFETY: both ranges checked; both memories valid while the regions live;
        // `copy` allows overlap.
        unsafe { std::ptr::copy(src.as_ptr().add(src_off), self.as_ptr().add(offset), len) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: range checked.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// Makes `len` bytes at `offset` durable, where the memory supports it.
    pub fn persist(&self, offset: usize, len: usize) -> Result<()> {
        self.check_range(offset, len)?;
        self.inner.memory.persist(offset, len).map_err(Error::from)
    }

    /// The region as a byte slice.
    ///
    /// # Safety
    /// For as long as the slice lives, nothing may write the region: no peer (no
    /// `REMOTE_WRITE` access in use), no posted receive or read into it, no
    /// [`write_at`](Self::write_at).
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.as_ptr(), self.len())
    }

    /// The region as a mutable byte slice.
    ///
    /// # Safety
    /// For as long as the slice lives, nothing else may read or write the region: no
    /// peer access, no posted operation on it, no other slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.as_ptr(), self.len())
    }
}

/// A range of a local region used by a data operation.
#[derive(Debug, Clone, Copy)]
pub struct LocalIov<'a> {
    /// The region.
    pub mr: &'a MemoryRegion,
    /// Offset into the region.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// A range of a local region held by a posted operation until it completes (what
/// providers receive).
///
/// # Invariant
/// `offset + len <= mr.len()`, checked by the only constructor, [`Segment::new`]. The
/// fields are private so that safe code cannot build a segment that points outside its
/// region: a provider may therefore read and write `len` bytes from [`ptr`](Self::ptr)
/// (through raw pointers, under the rules of the [module docs](self)) for as long as the
/// segment lives.
///
/// Safe code cannot build one by hand (this used to be possible and let a 4,160-byte
/// receive land in a 64-byte region):
/// ```compile_fail,E0451
/// fn forge(mr: fabric_core::MemoryRegion) -> fabric_core::Segment {
///     fabric_core::Segment { mr, offset: 0, len: 4160 }
/// }
/// ```
/// and the endpoint's provider object, which would take such requests unchecked, is
/// not reachable from outside (there is no accessor):
/// ```compile_fail,E0599
/// fn reach(ep: &fabric_core::Endpoint) {
///     let _ = ep.ops();
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Segment {
    mr: MemoryRegion,
    offset: usize,
    len: usize,
}

impl Segment {
    /// A segment over `len` bytes at `offset` of `mr`; an error when the range is not
    /// inside the region.
    pub fn new(mr: &MemoryRegion, offset: usize, len: usize) -> Result<Segment> {
        mr.check_range(offset, len)?;
        Ok(Segment {
            mr: mr.clone(),
            offset,
            len,
        })
    }
    /// The region (kept alive by this segment).
    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }
    /// Offset into the region.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Pointer to the first byte: valid for reads and writes of [`len`](Self::len)
    /// bytes while the segment lives (the type's invariant).
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: offset <= offset + len <= mr.len() (the invariant), so the result is
        // inside the region's allocation or one past its end.
        unsafe { self.mr.as_ptr().add(self.offset) }
    }
    /// Appends the segment's bytes to `out`.
    pub fn extend_vec(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        let at = out.len();
        // SAFETY: the invariant (the source is valid for len bytes; see the module
        // docs on concurrent peer writes); the destination has len spare bytes after
        // `at`, all written before the length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr(), out.as_mut_ptr().add(at), self.len);
            out.set_len(at + self.len);
        }
    }
    /// Copies the segment's bytes into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: the invariant; see the module docs on concurrent peer writes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), v.as_mut_ptr(), self.len) };
        v
    }
}

/// The local buffers of one operation, in order: inline up to two (no allocation for
/// the common one- or two-buffer operation).
pub type Segments = smallvec::SmallVec<[Segment; 2]>;

/// What a peer needs to access a region: base address, length and key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteMr {
    /// Remote address of offset 0.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Key.
    pub key: u64,
}

impl RemoteMr {
    /// Size of the wire form.
    pub const WIRE_SIZE: usize = 24;

    /// A remote iovec `len` bytes at `offset` into the region (not checked here: the
    /// target checks every access).
    pub fn iov(&self, offset: u64, len: usize) -> RemoteIov {
        RemoteIov {
            addr: self.addr.wrapping_add(offset),
            len,
            key: self.key,
        }
    }
    /// The whole region as a remote iovec.
    pub fn full(&self) -> RemoteIov {
        self.iov(0, self.len as usize)
    }
    /// 24 bytes, little-endian: addr, len, key.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.key.to_le_bytes());
        b
    }
    /// Parses [`to_bytes`](Self::to_bytes) output.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < Self::WIRE_SIZE {
            return Err(Error::invalid(format!(
                "remote region descriptor needs 24 bytes, got {}",
                b.len()
            )));
        }
        let u = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        Ok(RemoteMr {
            addr: u(0),
            len: u(8),
            key: u(16),
        })
    }
}

/// A range of a peer's region: the target of an RMA operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteIov {
    /// Remote address (virtual address or offset, per the provider's mr_mode).
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// Key of the remote region.
    pub key: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_mr_round_trip() {
        let r = RemoteMr {
            addr: 0x1122_3344_5566_7788,
            len: 4096,
            key: 0xdead_beef_cafe,
        };
        assert_eq!(RemoteMr::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(RemoteMr::from_bytes(&[0u8; 23]).is_err());
        assert_eq!(r.iov(16, 8).addr, r.addr + 16);
    }

    #[test]
    fn pmem_mapping_registers_and_persists() {
        let dir = std::env::temp_dir().join(format!("fabric-core-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("region");
        let m = pmem::Mapping::create(&path, 8192).unwrap();
        let b: &dyn MemoryBacking = &m;
        assert!(b.supports_persist());
        assert_eq!(b.len(), 8192);
        // SAFETY: offset 100 + 5 <= 8192.
        unsafe { b.write_uncached(100, b"hello") };
        b.persist(0, 8192).unwrap();
        drop(m);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[100..105], b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn heap_uncached_write_lands() {
        let m = HeapMemory::new(4096).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        // SAFETY: 13 + 1000 <= 4096.
        unsafe { m.write_uncached(13, &data) };
        // SAFETY: within the allocation.
        let s = unsafe { std::slice::from_raw_parts(m.as_ptr().add(13), 1000) };
        assert_eq!(s, &data[..]);
    }

    #[test]
    fn heap_memory_is_zeroed_and_aligned() {
        let m = HeapMemory::new(10_000).unwrap();
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        // SAFETY: fresh allocation of 10_000 bytes.
        let s = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
        let z = HeapMemory::new(0).unwrap();
        assert_eq!(z.len(), 0);
        assert!(z.persist(0, 0).is_err());
    }
}

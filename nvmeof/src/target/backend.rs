//! Namespace back ends: memory, a file (buffered, or direct I/O), and a pmem mapping,
//! as nvmet's io-cmd-bdev.c and io-cmd-file.c are its back ends.
//!
//! Durability: a buffered file keeps written data in the page cache (a volatile write
//! cache: Flush and FUA call `fdatasync`); a direct-I/O file bypasses the page cache
//! but the device below may still cache (Flush and FUA call `fdatasync` too); a pmem
//! mapping makes a FUA write durable by persisting its range through the `pmem` crate
//! (cache-line flushes on true pmem, `msync` otherwise), and Flush persists the whole
//! mapping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::RwLock;

use crate::error::{Error, Result};

/// What stores a namespace's blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Zero-filled memory of `size` bytes (lost when the target stops).
    Memory {
        /// Bytes; a multiple of the block size.
        size: u64,
    },
    /// A regular file, read and written through the page cache. Created if missing;
    /// `size` (bytes) sets its length, else the file's length is used. Deallocation
    /// punches holes; Flush and FUA writes call `fdatasync`.
    File {
        /// Path of the file.
        path: PathBuf,
        /// Length to give the file, if any.
        size: Option<u64>,
    },
    /// A regular file opened with `O_DIRECT`: reads and writes bypass the page cache.
    /// Transfers go through 4 KiB-aligned buffers, and a write that does not cover
    /// whole 4 KiB units reads the units around it first (read-modify-write, serialized).
    /// The file system must support `O_DIRECT` (tmpfs before Linux 6.6 does not).
    DirectFile {
        /// Path of the file.
        path: PathBuf,
        /// Length to give the file, if any (a multiple of 4 KiB).
        size: Option<u64>,
    },
    /// A file mapped with the `pmem` crate (MAP_SYNC on a DAX file system, else a
    /// shared mapping of the page cache). A FUA write is persisted range by range,
    /// Flush persists the mapping.
    Pmem {
        /// Path of the file.
        path: PathBuf,
        /// Length of the mapping (the file is created or extended to it).
        size: u64,
    },
}

/// The unit of `O_DIRECT` transfers.
const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|e| Error::Config(format!("direct I/O buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size (at least DIRECT_ALIGN).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(p)
            .ok_or_else(|| Error::Config("out of memory for a direct I/O buffer".into()))?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes, owned by self and
        // initialised (alloc_zeroed); &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this very layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// An opened back end.
#[derive(Debug)]
pub(crate) enum Store {
    Memory(RwLock<Vec<u8>>),
    File {
        file: File,
        len: u64,
    },
    Direct {
        file: File,
        len: u64,
        /// Serializes writes (their read-modify-write of partial units).
        writes: std::sync::Mutex<()>,
    },
    Pmem(RwLock<pmem::Mapping>),
}

fn open_rw(path: &PathBuf, direct: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Touches every page of a fresh memory namespace, so that its reads and writes do
/// not take a page fault each the first time they reach a page (a zeroed allocation
/// is mapped lazily): a memory namespace is memory, allocated when it is created.
fn prefault(mem: &mut [u8]) {
    for page in mem.chunks_mut(4096) {
        // Volatile: a store of the zero the allocation already holds must not be
        // optimised away.
        // SAFETY: `page` is a valid, non-empty, exclusively borrowed slice.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
    }
}

fn out_of_range() -> Error {
    Error::Config("access beyond the end of the back end".into())
}

impl Store {
    pub(crate) fn open(backing: &Backing) -> Result<Store> {
        match backing {
            Backing::Memory { size } => {
                let len = usize::try_from(*size)
                    .map_err(|_| Error::Config(format!("memory namespace of {size} bytes")))?;
                let mut mem = vec![0u8; len];
                prefault(&mut mem);
                Ok(Store::Memory(RwLock::new(mem)))
            }
            Backing::File { path, size } => {
                let file = open_rw(path, false)?;
                if let Some(size) = size {
                    file.set_len(*size)?;
                }
                let len = file.metadata()?.len();
                Ok(Store::File { file, len })
            }
            Backing::DirectFile { path, size } => {
                let file = open_rw(path, true)?;
                if let Some(size) = size {
                    file.set_len(*size)?;
                }
                let len = file.metadata()?.len();
                if !len.is_multiple_of(DIRECT_ALIGN as u64) {
                    return Err(Error::Config(format!(
                        "{}: {len} bytes, not a multiple of {DIRECT_ALIGN} for direct I/O",
                        path.display()
                    )));
                }
                Ok(Store::Direct {
                    file,
                    len,
                    writes: std::sync::Mutex::new(()),
                })
            }
            Backing::Pmem { path, size } => {
                let len = usize::try_from(*size)
                    .map_err(|_| Error::Config(format!("pmem namespace of {size} bytes")))?;
                let m = pmem::Mapping::create(path, len)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                Ok(Store::Pmem(RwLock::new(m)))
            }
        }
    }

    /// The 4 KiB units around `offset..offset + len`, read into an aligned buffer.
    fn direct_read_units(file: &File, offset: u64, len: usize) -> Result<(u64, AlignedBuf)> {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        let mut buf = AlignedBuf::new((end - start) as usize)?;
        file.read_exact_at(&mut buf.as_mut_slice()[..(end - start) as usize], start)?;
        Ok((start, buf))
    }

    /// Bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Store::Memory(m) => m.read().map(|v| v.len() as u64).unwrap_or(0),
            Store::File { len, .. } | Store::Direct { len, .. } => *len,
            Store::Pmem(m) => m.read().map(|m| m.len() as u64).unwrap_or(0),
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(out_of_range()),
        }
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        match self {
            Store::Memory(m) => {
                let m = m.read().map_err(|_| Error::Config("poisoned".into()))?;
                let at = offset as usize;
                buf.copy_from_slice(&m[at..at + buf.len()]);
                Ok(())
            }
            Store::File { file, .. } => Ok(file.read_exact_at(buf, offset)?),
            Store::Direct { file, .. } => {
                let (start, mut units) = Self::direct_read_units(file, offset, buf.len())?;
                let at = (offset - start) as usize;
                buf.copy_from_slice(&units.as_mut_slice()[at..at + buf.len()]);
                Ok(())
            }
            Store::Pmem(m) => {
                let m = m.read().map_err(|_| Error::Config("poisoned".into()))?;
                Ok(m.read_at(offset as usize, buf)?)
            }
        }
    }

    /// Writes `data` and makes it durable before returning (FUA).
    pub(crate) fn write_durable(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Store::Pmem(m) => {
                self.check(offset, data.len())?;
                let mut m = m.write().map_err(|_| Error::Config("poisoned".into()))?;
                Ok(m.write_persist(offset as usize, data)?)
            }
            _ => {
                self.write(offset, data)?;
                self.flush()
            }
        }
    }

    pub(crate) fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        match self {
            Store::Memory(m) => {
                let mut m = m.write().map_err(|_| Error::Config("poisoned".into()))?;
                let at = offset as usize;
                m[at..at + data.len()].copy_from_slice(data);
                Ok(())
            }
            Store::File { file, .. } => Ok(file.write_all_at(data, offset)?),
            Store::Direct { file, writes, .. } => {
                let _one = writes
                    .lock()
                    .map_err(|_| Error::Config("poisoned".into()))?;
                let a = DIRECT_ALIGN as u64;
                let aligned = offset.is_multiple_of(a) && (data.len() as u64).is_multiple_of(a);
                let (start, mut units) = if aligned {
                    (offset, AlignedBuf::new(data.len())?)
                } else {
                    Self::direct_read_units(file, offset, data.len())?
                };
                let at = (offset - start) as usize;
                let span = (at + data.len()).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                let b = units.as_mut_slice();
                b[at..at + data.len()].copy_from_slice(data);
                Ok(file.write_all_at(&b[..span], start)?)
            }
            Store::Pmem(m) => {
                let mut m = m.write().map_err(|_| Error::Config("poisoned".into()))?;
                Ok(m.write_at(offset as usize, data)?)
            }
        }
    }

    /// Makes written data durable (a no-op for memory).
    pub(crate) fn flush(&self) -> Result<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::File { file, .. } | Store::Direct { file, .. } => Ok(file.sync_data()?),
            Store::Pmem(m) => {
                let m = m.read().map_err(|_| Error::Config("poisoned".into()))?;
                Ok(m.sync()?)
            }
        }
    }

    /// Writes zeros over `len` bytes.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; 1 << 16];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Deallocates `len` bytes: they read as zeros afterwards. Files get a hole
    /// punched (zeros written where the file system cannot punch).
    pub(crate) fn deallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len as usize)?;
        match self {
            Store::Memory(_) | Store::Direct { .. } | Store::Pmem(_) => self.zero(offset, len),
            Store::File { file, .. } => {
                let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
                else {
                    return Err(out_of_range());
                };
                // SAFETY: fallocate on a file descriptor we own, with plain integers.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        n,
                    )
                };
                if rc == 0 {
                    Ok(())
                } else {
                    self.zero(offset, len)
                }
            }
        }
    }

    /// Whether the back end is a file (thin provisioned: holes).
    pub(crate) fn is_file(&self) -> bool {
        matches!(self, Store::File { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bounds_and_zeroing() {
        let s = Store::open(&Backing::Memory { size: 4096 }).unwrap();
        s.write(100, b"abc").unwrap();
        let mut b = [0u8; 3];
        s.read(100, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(s.write(4095, b"xy").is_err());
        assert!(s.read(u64::MAX, &mut b).is_err());
        s.deallocate(0, 4096).unwrap();
        s.read(100, &mut b).unwrap();
        assert_eq!(b, [0; 3]);
    }

    #[test]
    fn file_punch_hole_reads_zero() {
        let dir = std::env::temp_dir().join(format!("nvmeof-be-{}", std::process::id()));
        let s = Store::open(&Backing::File {
            path: dir.clone(),
            size: Some(1 << 20),
        })
        .unwrap();
        s.write(8192, &[0xAB; 8192]).unwrap();
        s.flush().unwrap();
        s.deallocate(8192, 4096).unwrap();
        let mut b = vec![0u8; 8192];
        s.read(8192, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xAB));
        drop(s);
        let _ = std::fs::remove_file(dir);
    }
}

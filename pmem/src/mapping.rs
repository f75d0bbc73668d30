//! A file (or device DAX) mapped into memory, with persistence on top.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::device_dax;
use crate::msync::msync;
use crate::strategy::PersistStrategy;

/// Linux's mmap flags for "fail unless the kernel understands every flag" and
/// "synchronous page faults" (DAX only), from asm-generic/mman-common.h. Only
/// for architectures using the generic values (MIPS, for one, gives 0x80000
/// another meaning).
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "powerpc64",
        target_arch = "loongarch64",
        target_arch = "s390x"
    )
))]
mod map_sync {
    pub const MAP_SHARED_VALIDATE: libc::c_int = 0x03;
    pub const MAP_SYNC: libc::c_int = 0x80000;
}

/// What kind of mapping the kernel gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingKind {
    /// `MAP_SHARED_VALIDATE | MAP_SYNC` succeeded: a file on a DAX file system,
    /// whose metadata is kept durable by the kernel at each write fault, so
    /// flushing CPU caches is enough to persist data. Counts as pmem.
    Sync,
    /// Device DAX: persistent memory mapped straight from `/dev/daxX.Y`.
    /// Counts as pmem.
    DeviceDax,
    /// Plain `MAP_SHARED` over the page cache (the file system does not
    /// support MAP_SYNC): persistence needs msync. Not pmem.
    PageCache,
}

/// A shared, writable memory mapping of a whole file or device DAX.
///
/// Unmapped when dropped. Accessors hand out the raw address
/// ([`as_ptr`](Self::as_ptr)); [`read_at`](Self::read_at) and
/// [`write_at`](Self::write_at) copy through bounds-checked offsets.
///
/// `Mapping` is `Send + Sync`: it is raw memory. Safe methods cannot race
/// (writes need `&mut self`; reads, flushes and persists leave the bytes as
/// they are), and every access through [`as_ptr`](Self::as_ptr) is the
/// caller's `unsafe` code, which must coordinate with other threads (and with
/// remote peers writing a registered region) itself, as with any raw memory.
///
/// Like any shared file mapping, its contents can change under the process if
/// another process maps the same file, and accesses fault (SIGBUS) if the file
/// is truncated behind it; this type cannot prevent either.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// What was mmapped: `len`, or on device DAX `len` rounded up to the
    /// device alignment (the kernel refuses other lengths there).
    map_len: usize,
    path: PathBuf,
    kind: MappingKind,
    is_pmem: bool,
    strategy: PersistStrategy,
}

// SAFETY: a Mapping is an address range owned by the process, valid from every
// thread until Drop unmaps it (once, from whichever thread drops it). It holds
// no thread-affine state. Sharing it (`Sync`) gives other threads `as_ptr` (a
// raw pointer: any access through it is the caller's `unsafe` and the caller
// coordinates it, as with any raw memory), `read_at` (needs `&self`) and the
// flush/persist methods, which do not change the contents; `write_at` needs
// `&mut self`, so safe code cannot race a write against anything.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates the file at `path` if it does not exist, sets its length to
    /// `len` (extending an existing shorter file; an existing longer file is an
    /// error, so data is never cut off by accident: use
    /// [`create_truncating`](Self::create_truncating) to shrink one), allocates its blocks
    /// (`fallocate`, where the file system supports it, so later stores do not
    /// fault for lack of space), makes the size and the directory entry
    /// durable (fsync of the file and, for a new file, its directory), and
    /// maps it, using [`PersistStrategy::global`].
    ///
    /// For device DAX, `len` must not exceed the device size; the device is not
    /// resized. The kernel maps device DAX only in multiples of the device's
    /// alignment (`/sys/dev/char/M:m/align`, 2 MiB by default), so the mapping
    /// is made that much longer; [`len`](Self::len) stays `len`.
    ///
    /// Errors: `InvalidInput` for a zero `len`, one too large for a file
    /// offset, or an existing regular file longer than `len`; any error of the
    /// underlying calls, naming the path. A file this call created is removed
    /// again if a later step fails.
    pub fn create(path: impl AsRef<Path>, len: usize) -> io::Result<Mapping> {
        Mapping::create_with(path, len, PersistStrategy::global())
    }

    /// [`create`](Self::create), but an existing longer file is truncated to
    /// `len` (its data past `len` is lost).
    pub fn create_truncating(path: impl AsRef<Path>, len: usize) -> io::Result<Mapping> {
        Mapping::create_inner(path.as_ref(), len, PersistStrategy::global(), true)
    }

    /// [`create`](Self::create) with an explicit strategy.
    pub fn create_with(
        path: impl AsRef<Path>,
        len: usize,
        strategy: &PersistStrategy,
    ) -> io::Result<Mapping> {
        Mapping::create_inner(path.as_ref(), len, strategy, false)
    }

    fn create_inner(
        path: &Path,
        len: usize,
        strategy: &PersistStrategy,
        shrink: bool,
    ) -> io::Result<Mapping> {
        if len == 0 {
            return Err(invalid(path, "cannot create a mapping of length 0"));
        }
        let len64 = u64::try_from(len)
            .ok()
            .filter(|&l| l <= i64::MAX as u64)
            .ok_or_else(|| invalid(path, &format!("length {len} is too large for a file")))?;

        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| context(e, "open", path))?;
                (f, false)
            }
            Err(e) => return Err(context(e, "create", path)),
        };
        let result = Mapping::size_and_map(file, path, len, len64, created, shrink, strategy);
        if result.is_err() && created {
            // Best effort: the error being reported matters more.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn size_and_map(
        file: File,
        path: &Path,
        len: usize,
        len64: u64,
        created: bool,
        shrink: bool,
        strategy: &PersistStrategy,
    ) -> io::Result<Mapping> {
        if let Some(dax) = device_dax::probe(&file).map_err(|e| context(e, "probe", path))? {
            if len64 > dax.size {
                return Err(invalid(
                    path,
                    &format!("length {len} exceeds the device DAX size {}", dax.size),
                ));
            }
            return Mapping::map(&file, path, len, Some(dax), strategy);
        }
        if !file
            .metadata()
            .map_err(|e| context(e, "stat", path))?
            .is_file()
        {
            return Err(invalid(path, "not a regular file or device DAX"));
        }
        let existing = file.metadata().map_err(|e| context(e, "stat", path))?.len();
        if existing > len64 && !shrink {
            return Err(invalid(
                path,
                &format!(
                    "the existing file is {existing} bytes, longer than the {len} asked; \
                     refusing to cut it (Mapping::open maps it whole, \
                     Mapping::create_truncating shrinks it)"
                ),
            ));
        }
        file.set_len(len64)
            .map_err(|e| context(e, "set length of", path))?;
        allocate(&file, len64).map_err(|e| context(e, "allocate", path))?;
        file.sync_all().map_err(|e| context(e, "fsync", path))?;
        if created {
            sync_parent_dir(path).map_err(|e| context(e, "fsync directory of", path))?;
        }
        Mapping::map(&file, path, len, None, strategy)
    }

    /// Maps the whole of an existing file or device DAX at `path`, using
    /// [`PersistStrategy::global`].
    ///
    /// Errors: `InvalidInput` for an empty file or one that is neither a
    /// regular file nor device DAX; any error of the underlying calls
    /// (`NotFound`, `PermissionDenied`, ...), naming the path.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Mapping> {
        Mapping::open_with(path, PersistStrategy::global())
    }

    /// [`open`](Self::open) with an explicit strategy.
    pub fn open_with(path: impl AsRef<Path>, strategy: &PersistStrategy) -> io::Result<Mapping> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| context(e, "open", path))?;
        let dax = device_dax::probe(&file).map_err(|e| context(e, "probe", path))?;
        let size = match dax {
            Some(dax) => dax.size,
            None => {
                let meta = file.metadata().map_err(|e| context(e, "stat", path))?;
                if !meta.is_file() {
                    return Err(invalid(path, "not a regular file or device DAX"));
                }
                meta.len()
            }
        };
        if size == 0 {
            return Err(invalid(path, "cannot map an empty file"));
        }
        let len = usize::try_from(size)
            .map_err(|_| invalid(path, &format!("size {size} does not fit in memory")))?;
        Mapping::map(&file, path, len, dax, strategy)
    }

    /// mmaps `file`: device DAX when `dax` says so, else a regular file
    /// (`PageCache`, upgraded to `Sync` when MAP_SYNC is accepted).
    fn map(
        file: &File,
        path: &Path,
        len: usize,
        dax: Option<device_dax::DeviceDax>,
        strategy: &PersistStrategy,
    ) -> io::Result<Mapping> {
        let (kind, map_len) = match dax {
            Some(d) => (MappingKind::DeviceDax, d.map_len(len)),
            None => (MappingKind::PageCache, len),
        };
        let (ptr, kind) = map_shared(file, map_len, kind).map_err(|e| match dax {
            // Device DAX refuses (EINVAL) lengths that are not a multiple of its
            // alignment; say which alignment, or that the kernel did not tell.
            Some(d) if e.raw_os_error() == Some(libc::EINVAL) => {
                let align = match d.align {
                    Some(a) => format!("the device alignment is {a} bytes"),
                    None => "the kernel does not publish the device alignment \
                             (sysfs has no align attribute); use a multiple of it \
                             (2 MiB by default)"
                        .to_string(),
                };
                context(
                    io::Error::new(
                        e.kind(),
                        format!("{e}: device DAX mapping of {map_len} bytes refused; {align}"),
                    ),
                    "mmap",
                    path,
                )
            }
            _ => context(e, "mmap", path),
        })?;
        let is_pmem = strategy
            .is_pmem_force()
            .unwrap_or(kind != MappingKind::PageCache);
        Ok(Mapping {
            ptr,
            len,
            map_len,
            path: path.to_path_buf(),
            kind,
            is_pmem,
            strategy: *strategy,
        })
    }

    /// Address of the first byte. Valid for reads and writes of
    /// [`len`](Self::len) bytes while the mapping lives; the caller coordinates
    /// all access through it (see the type's `Send`/`Sync` note).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty. (Here for API convention.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether stores become durable by flushing CPU caches (true pmem:
    /// MAP_SYNC or device DAX) rather than by msync; `PMEM_IS_PMEM_FORCE`
    /// (or the strategy's forced value) overrides the detection.
    pub fn is_pmem(&self) -> bool {
        self.is_pmem
    }

    /// What the kernel gave, whatever `is_pmem` was forced to.
    pub fn kind(&self) -> MappingKind {
        self.kind
    }

    /// The path the mapping was made from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The strategy this mapping persists with.
    pub fn strategy(&self) -> &PersistStrategy {
        &self.strategy
    }

    /// Address of `offset`, after checking `offset + len <= self.len()`.
    pub fn range_ptr(&self, offset: usize, len: usize) -> io::Result<*mut u8> {
        match offset.checked_add(len) {
            // SAFETY: offset <= end <= self.len, so the result is inside the
            // mapping or one past its end.
            Some(end) if end <= self.len => Ok(unsafe { self.ptr.as_ptr().add(offset) }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} outside the {} bytes of {}",
                    self.len,
                    self.path.display()
                ),
            )),
        }
    }

    /// Starts writing back `[offset, offset + len)` without waiting: cache-line
    /// flushes for pmem (follow with [`crate::drain`]); for other mappings an
    /// msync, which is already complete on return.
    pub fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        let p = self.range_ptr(offset, len)?;
        if self.is_pmem {
            // SAFETY: range_ptr checked that the range is inside the mapping.
            unsafe { self.strategy.flush(p, len) }
        } else {
            msync(p, len)
        }
        .map_err(|e| context(e, "flush", &self.path))
    }

    /// Makes `[offset, offset + len)` durable: flush + drain when
    /// [`is_pmem`](Self::is_pmem), else `msync(MS_SYNC)` on the page-aligned
    /// range covering it. See the crate docs, "What persist guarantees".
    ///
    /// Errors: `InvalidInput` if the range is not inside the mapping; msync's
    /// errors (e.g. `EIO` when the device failed the write-back).
    pub fn persist(&self, offset: usize, len: usize) -> io::Result<()> {
        let p = self.range_ptr(offset, len)?;
        if self.is_pmem {
            // SAFETY: range_ptr checked that the range is inside the mapping.
            unsafe { self.strategy.persist(p, len) }
        } else {
            msync(p, len)
        }
        .map_err(|e| context(e, "persist", &self.path))
    }

    /// [`persist`](Self::persist) of the whole mapping.
    pub fn sync(&self) -> io::Result<()> {
        self.persist(0, self.len)
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        let p = self.range_ptr(offset, buf.len())?;
        // SAFETY: the source range is inside the mapping (checked); `buf` is a
        // distinct Rust allocation, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` to `offset` with ordinary stores (not yet durable: follow
    /// with [`persist`](Self::persist), or use
    /// [`write_persist`](Self::write_persist)).
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        let p = self.range_ptr(offset, data.len())?;
        // SAFETY: the destination is inside the mapping (checked) and `&mut
        // self` excludes other safe accesses; `data` cannot overlap it unless
        // the caller built it from `as_ptr` in unsafe code, whose contract
        // that breaks.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies `data` to `offset` and makes it durable: for pmem,
    /// [`PersistStrategy::memcpy_persist`] (non-temporal stores from the
    /// threshold on); otherwise an ordinary copy and msync.
    pub fn write_persist(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        let p = self.range_ptr(offset, data.len())?;
        if self.is_pmem {
            // SAFETY: as in write_at.
            unsafe { self.strategy.memcpy_persist(p, data.as_ptr(), data.len()) }
        } else {
            // SAFETY: as in write_at.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            msync(p, data.len())
        }
        .map_err(|e| context(e, "persist", &self.path))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned and nothing is unmapped
        // twice; the mapping is ours. munmap only fails for invalid arguments.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("is_pmem", &self.is_pmem)
            .finish()
    }
}

/// mmap(MAP_SHARED) with MAP_SYNC first for files that may be on DAX.
fn map_shared(
    file: &File,
    len: usize,
    kind: MappingKind,
) -> io::Result<(NonNull<u8>, MappingKind)> {
    let fd = file.as_raw_fd();
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "x86",
            target_arch = "aarch64",
            target_arch = "arm",
            target_arch = "riscv64",
            target_arch = "powerpc64",
            target_arch = "loongarch64",
            target_arch = "s390x"
        )
    ))]
    if kind == MappingKind::PageCache {
        use map_sync::{MAP_SHARED_VALIDATE, MAP_SYNC};
        // SAFETY: a fresh mapping at an address of the kernel's choice; it
        // aliases no Rust object. The fd is open for reading and writing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MAP_SHARED_VALIDATE | MAP_SYNC,
                fd,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            if let Some(p) = NonNull::new(p.cast::<u8>()) {
                return Ok((p, MappingKind::Sync));
            }
        }
        let err = io::Error::last_os_error();
        // EOPNOTSUPP: no DAX here; EINVAL: a kernel without MAP_SHARED_VALIDATE.
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {}
            _ => return Err(err),
        }
    }
    // SAFETY: as above.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>())
        .map(|p| (p, kind))
        .ok_or_else(|| io::Error::other("mmap returned address 0"))
}

/// Reserves the file's blocks so page faults cannot hit ENOSPC later.
#[cfg(target_os = "linux")]
fn allocate(file: &File, len: u64) -> io::Result<()> {
    // len <= i64::MAX was checked by the caller, so the cast is exact.
    let len = len as libc::off_t;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // The file system cannot preallocate: the file stays sparse.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(()),
        _ => Err(err),
    }
}

/// No portable preallocation outside Linux; the file stays sparse.
#[cfg(not(target_os = "linux"))]
fn allocate(_file: &File, _len: u64) -> io::Result<()> {
    Ok(())
}

/// fsync of the directory holding `path`, so a new directory entry is durable.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match File::open(parent)?.sync_all() {
        // Some file systems do not fsync directories; nothing more to do there.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        r => r,
    }
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn invalid(path: &Path, msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {msg}", path.display()),
    )
}

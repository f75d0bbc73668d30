//! A test-only [`MemoryBacking`] that models a volatile CPU cache in front of a
//! persistence domain: loads and stores go to private heap memory (the "cache", lost
//! when the process dies), and [`persist`](MemoryBacking::persist) copies a range to a
//! file with `pwrite` (the "persistence domain"). Data is in the file only if persist
//! ran for it, so a test that kills the target process can tell a missing or late
//! persist from a correct one, which a plain `MAP_SHARED` file mapping cannot: every
//! store into such a mapping survives SIGKILL, persisted or not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fabric_core::{HeapMemory, MemoryBacking};
use parking_lot::Mutex;

/// Heap "cache" + file "persistence domain".
pub struct VolatileCache {
    cache: HeapMemory,
    file: File,
    /// Ranges persisted so far, in order.
    persisted: Mutex<Vec<(usize, usize)>>,
    persists: AtomicU64,
    /// When set, persist fails with EIO (a failing device).
    fail: AtomicBool,
}

impl VolatileCache {
    /// Opens (creating and sizing) the file at `path` and loads its contents into the
    /// cache, as memory would read the media after a restart.
    pub fn open(path: &Path, len: usize) -> io::Result<VolatileCache> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(len as u64)?;
        let cache = HeapMemory::new(len).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: a fresh allocation of `len` bytes that nothing else uses yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(cache.as_ptr(), len) };
        file.read_exact_at(buf, 0)?;
        Ok(VolatileCache {
            cache,
            file,
            persisted: Mutex::new(Vec::new()),
            persists: AtomicU64::new(0),
            fail: AtomicBool::new(false),
        })
    }

    /// Ranges persisted so far.
    pub fn persisted(&self) -> Vec<(usize, usize)> {
        self.persisted.lock().clone()
    }

    /// Number of persist calls.
    pub fn persists(&self) -> u64 {
        self.persists.load(Ordering::SeqCst)
    }

    /// Makes every later persist fail (or succeed again).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
}

// SAFETY: the cache is a HeapMemory allocation owned by this object: fixed pointer and
// length until drop.
unsafe impl MemoryBacking for VolatileCache {
    fn as_ptr(&self) -> *mut u8 {
        self.cache.as_ptr()
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn supports_persist(&self) -> bool {
        true
    }
    fn persist(&self, offset: usize, len: usize) -> io::Result<()> {
        self.persists.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.cache.len() => {}
            _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
        // SAFETY: range checked above. The provider calls persist for a range after it
        // placed the data and before it handles anything else on that engine, so no
        // write into the range runs concurrently.
        let src = unsafe { std::slice::from_raw_parts(self.cache.as_ptr().add(offset), len) };
        self.file.write_all_at(src, offset as u64)?;
        self.persisted.lock().push((offset, len));
        Ok(())
    }
}

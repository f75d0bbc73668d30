//! Persistent memory for the fabric library: map a file, make stores durable,
//! copy with non-temporal stores. It behaves like PMDK's libpmem, in Rust and
//! without a C library.
//!
//! - [`Mapping`] maps a file (creating and sizing it) or device DAX, trying
//!   `MAP_SHARED_VALIDATE | MAP_SYNC` first, and tells whether the result is
//!   true persistent memory ([`Mapping::is_pmem`]).
//! - [`flush`], [`drain`] and [`persist`] (= flush + drain) write back CPU
//!   cache lines with the best instruction this CPU has: CLWB, else
//!   CLFLUSHOPT, else CLFLUSH ([`FlushMethod`], chosen once with CPUID), and
//!   SFENCE. [`msync`] is the path for ordinary files.
//! - [`memcpy_nt`] and [`memcpy_persist`] copy with non-temporal stores
//!   (MOVNTDQ/MOVNTI) that bypass the caches, for large copies and for regions
//!   registered `UNCACHED`.
//! - [`has_eadr`] tells whether the caches themselves are persistent.
//!
//! The choices come from the CPU, eADR and the libpmem environment variables
//! (`PMEM_NO_CLWB`, `PMEM_NO_CLFLUSHOPT`, `PMEM_NO_FLUSH`, `PMEM_NO_MOVNT`,
//! `PMEM_MOVNT_THRESHOLD`, `PMEM_IS_PMEM_FORCE`; see [`Overrides`]), read once
//! into [`PersistStrategy::global`]. A [`PersistStrategy`] can also be built
//! from explicit [`Overrides`] to use one specific path.
//!
//! ```
//! use pmem::Mapping;
//!
//! # fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("log");
//! let mut log = Mapping::create(&path, 64 * 1024)?;
//! log.write_at(0, b"record 1")?;
//! log.persist(0, 8)?; // durable once this returns (see below)
//! println!(
//!     "pmem: {}, flush: {}, eADR: {}",
//!     log.is_pmem(),
//!     pmem::flush_method(),
//!     pmem::has_eadr()
//! );
//! drop(log);
//!
//! let again = Mapping::open(&path)?;
//! let mut buf = [0u8; 8];
//! again.read_at(0, &mut buf)?;
//! assert_eq!(&buf, b"record 1");
//! # Ok(())
//! # }
//! ```
//!
//! # What persist guarantees
//!
//! - **True pmem** ([`MappingKind::Sync`], a file on a DAX file system mapped
//!   with MAP_SYNC, or [`MappingKind::DeviceDax`]): stores reach the media
//!   without the page cache, and the kernel keeps the file's metadata durable
//!   at each write fault. After [`Mapping::persist`] (cache-line flush + SFENCE)
//!   returns, the bytes are in the platform's persistence domain (the memory
//!   controller's ADR-protected queues) and survive power loss.
//! - **eADR**: when every NVDIMM region reports `cpu_cache` as its persistence
//!   domain, the caches are flushed by the platform on power loss, so the
//!   flush is skipped ([`FlushMethod::NoFlush`]) and persist is only the drain
//!   that orders non-temporal stores. `PMEM_NO_FLUSH=0` flushes anyway.
//! - **msync fallback** ([`MappingKind::PageCache`]: ext4, xfs without DAX,
//!   tmpfs...): persist is `msync(MS_SYNC)` on the page-aligned range covering
//!   the bytes; on an ordinary file system the data is durable once it
//!   returns `Ok` (to the extent the device honours cache flushes). On
//!   **tmpfs** there is nothing behind the memory: msync succeeds and
//!   guarantees nothing across a reboot.
//! - `PMEM_IS_PMEM_FORCE=1` makes a page-cache mapping use the flush path: fast
//!   and **not durable**; for testing code paths only, as in libpmem.
//! - On targets other than x86_64 there are no flush instructions here: the
//!   method is [`FlushMethod::Msync`], so persist is msync for every mapping
//!   (on DAX msync also writes back the caches), [`flush`] on memory outside a
//!   file mapping is only a best-effort msync, and [`memcpy_nt`] is an ordinary
//!   copy and a fence.
//!
//! Durability of a *created* file: [`Mapping::create`] fsyncs the new size and
//! directory entry before mapping, so a persisted store is not lost with the
//! file that held it.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod cpu_features;
mod device_dax;
mod eadr;
mod flush;
mod mapping;
mod msync;
mod nt_copy;
mod overrides;
mod strategy;

use std::io;

pub use cpu_features::CpuFeatures;
pub use eadr::has_eadr;
pub use flush::{drain, FlushMethod, CACHE_LINE};
pub use mapping::{Mapping, MappingKind};
pub use msync::{msync, page_size};
pub use overrides::{Overrides, DEFAULT_MOVNT_THRESHOLD};
pub use strategy::PersistStrategy;

/// The flush method in use for this process ([`PersistStrategy::global`]).
pub fn flush_method() -> FlushMethod {
    PersistStrategy::global().flush_method()
}

/// Flushes the cache lines overlapping `[addr, addr + len)` with the global
/// method, without draining (libpmem's `pmem_flush`). Always `Ok` for the
/// instruction methods; with [`FlushMethod::Msync`], msync's result.
///
/// # Safety
/// The range must be memory mapped in this process.
#[inline]
pub unsafe fn flush(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: forwarded contract.
    unsafe { PersistStrategy::global().flush(addr, len) }
}

/// Flush + drain of `[addr, addr + len)` with the global method (libpmem's
/// `pmem_persist`). Meant for memory that [`Mapping::is_pmem`] says is pmem;
/// for other file mappings use [`msync`] or [`Mapping::persist`].
///
/// # Safety
/// The range must be memory mapped in this process.
#[inline]
pub unsafe fn persist(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: forwarded contract.
    unsafe { PersistStrategy::global().persist(addr, len) }
}

/// Non-temporal copy with the global strategy: see
/// [`PersistStrategy::memcpy_nt`].
///
/// # Safety
/// `src` must be valid for reads and `dst` valid for writes of `len` bytes;
/// the ranges must not overlap; nothing else may access `dst` meanwhile.
#[inline]
pub unsafe fn memcpy_nt(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: forwarded contract.
    unsafe { PersistStrategy::global().memcpy_nt(dst, src, len) }
}

/// Copy and persist with the global strategy (libpmem's `pmem_memcpy_persist`):
/// non-temporal stores from [`PersistStrategy::movnt_threshold`] bytes on, else
/// copy + flush; then drain. See [`PersistStrategy::memcpy_persist`].
///
/// # Safety
/// As [`memcpy_nt`].
#[inline]
pub unsafe fn memcpy_persist(dst: *mut u8, src: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: forwarded contract.
    unsafe { PersistStrategy::global().memcpy_persist(dst, src, len) }
}

//! The persistence choices in force: flush method, non-temporal copies, is_pmem
//! forcing, computed from CPU features, eADR and [`Overrides`].

use std::io;
use std::sync::OnceLock;

use crate::cpu_features::CpuFeatures;
use crate::eadr::has_eadr;
use crate::flush::{drain, flush_cpu_lines, FlushMethod};
use crate::nt_copy;
use crate::overrides::{Overrides, DEFAULT_MOVNT_THRESHOLD};

/// How this process makes stores durable: which [`FlushMethod`], whether copies
/// use non-temporal stores and from which length, and whether `is_pmem` is
/// forced.
///
/// The free functions ([`crate::persist`], [`crate::memcpy_persist`], ...) and
/// [`Mapping::create`](crate::Mapping::create) use [`PersistStrategy::global`],
/// built from the environment once. Build others with [`PersistStrategy::new`]
/// or the `with_*` methods to exercise a specific path; a strategy never
/// selects an instruction this CPU lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistStrategy {
    flush: FlushMethod,
    movnt: bool,
    movnt_threshold: usize,
    is_pmem_force: Option<bool>,
}

impl PersistStrategy {
    /// The strategy for a CPU with `cpu` features (intersected with what this
    /// CPU really has, so the result is always executable here), eADR present
    /// or not, and `overrides`.
    pub fn new(cpu: CpuFeatures, eadr: bool, overrides: &Overrides) -> PersistStrategy {
        let host = CpuFeatures::host();
        let cpu = CpuFeatures {
            clflush: cpu.clflush && host.clflush,
            clflushopt: cpu.clflushopt && host.clflushopt,
            clwb: cpu.clwb && host.clwb,
        };
        PersistStrategy {
            flush: FlushMethod::select(cpu, eadr, overrides),
            movnt: nt_copy::AVAILABLE && !overrides.no_movnt,
            movnt_threshold: overrides.movnt_threshold.unwrap_or(DEFAULT_MOVNT_THRESHOLD),
            is_pmem_force: overrides.is_pmem_force,
        }
    }

    /// The strategy for this machine (CPU and eADR detected) with `overrides`.
    pub fn with_overrides(overrides: &Overrides) -> PersistStrategy {
        PersistStrategy::new(CpuFeatures::host(), has_eadr(), overrides)
    }

    /// This machine's strategy under the environment's overrides, computed on
    /// first use.
    pub fn global() -> &'static PersistStrategy {
        static GLOBAL: OnceLock<PersistStrategy> = OnceLock::new();
        GLOBAL.get_or_init(|| PersistStrategy::with_overrides(Overrides::global()))
    }

    /// The flush method in use.
    pub fn flush_method(&self) -> FlushMethod {
        self.flush
    }

    /// Whether copies of at least [`movnt_threshold`](Self::movnt_threshold)
    /// bytes use non-temporal stores.
    pub fn uses_movnt(&self) -> bool {
        self.movnt
    }

    /// Length from which [`memcpy_persist`](Self::memcpy_persist) uses
    /// non-temporal stores.
    pub fn movnt_threshold(&self) -> usize {
        self.movnt_threshold
    }

    /// The forced `is_pmem` answer, if any.
    pub fn is_pmem_force(&self) -> Option<bool> {
        self.is_pmem_force
    }

    /// This strategy with another flush method; an error
    /// ([`io::ErrorKind::Unsupported`]) if this CPU cannot execute it.
    pub fn with_flush_method(self, method: FlushMethod) -> io::Result<PersistStrategy> {
        if !method.is_supported() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("flush method {method} is not supported by this CPU"),
            ));
        }
        Ok(PersistStrategy {
            flush: method,
            ..self
        })
    }

    /// This strategy with non-temporal copies on or off. Asking for them on a
    /// target without them leaves them off.
    pub fn with_movnt(self, on: bool) -> PersistStrategy {
        PersistStrategy {
            movnt: on && nt_copy::AVAILABLE,
            ..self
        }
    }

    /// This strategy with another non-temporal copy threshold.
    pub fn with_movnt_threshold(self, threshold: usize) -> PersistStrategy {
        PersistStrategy {
            movnt_threshold: threshold,
            ..self
        }
    }

    /// This strategy with `is_pmem` forced to `force` (`None`: detect).
    pub fn with_is_pmem_force(self, force: Option<bool>) -> PersistStrategy {
        PersistStrategy {
            is_pmem_force: force,
            ..self
        }
    }

    /// Flushes the cache lines overlapping `[addr, addr + len)` without
    /// draining. With [`FlushMethod::Msync`] this is an msync of the covering
    /// pages (and already waits); with [`FlushMethod::NoFlush`] nothing.
    ///
    /// # Safety
    /// The range must be memory mapped in this process.
    #[inline]
    pub unsafe fn flush(&self, addr: *const u8, len: usize) -> io::Result<()> {
        match self.flush {
            FlushMethod::Msync => crate::msync::msync(addr, len),
            // SAFETY: the range is mapped (caller); an instruction method in a
            // strategy is supported by this CPU (`new` intersects with the host
            // features, `with_flush_method` checks).
            m => unsafe {
                flush_cpu_lines(m, addr, len);
                Ok(())
            },
        }
    }

    /// Waits for earlier flushes and non-temporal stores (SFENCE).
    #[inline]
    pub fn drain(&self) {
        drain();
    }

    /// [`flush`](Self::flush) then [`drain`](Self::drain).
    ///
    /// # Safety
    /// The range must be memory mapped in this process.
    #[inline]
    pub unsafe fn persist(&self, addr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.flush(addr, len)? };
        drain();
        Ok(())
    }

    /// Copies `len` bytes from `src` to `dst` with non-temporal stores for the
    /// 64-byte-aligned middle of `dst` and ordinary stores plus flushes for
    /// the unaligned head and tail, then drains. Without non-temporal stores
    /// (`PMEM_NO_MOVNT=1`, or not x86_64): an ordinary copy, a flush of the
    /// range, and a drain.
    ///
    /// When the flush method is [`FlushMethod::Msync`], the parts copied with
    /// ordinary stores are not written back: call [`crate::msync`] (or
    /// [`Mapping::persist`](crate::Mapping::persist)) afterwards, or use
    /// [`memcpy_persist`](Self::memcpy_persist), which does.
    ///
    /// # Safety
    /// `src` must be valid for reads and `dst` valid for writes of `len` bytes
    /// (the destination is normally inside a [`Mapping`](crate::Mapping)); the
    /// two ranges must not overlap; nothing else may access `dst` meanwhile.
    /// No alignment is required.
    pub unsafe fn memcpy_nt(&self, dst: *mut u8, src: *const u8, len: usize) {
        if self.movnt {
            // SAFETY: forwarded contract; the flush method is supported.
            unsafe { nt_copy::copy_nt(dst, src, len, self.flush) };
        } else {
            // SAFETY: forwarded contract; the flush method is supported.
            unsafe {
                std::ptr::copy_nonoverlapping(src, dst, len);
                flush_cpu_lines(self.flush, dst, len);
            }
            drain();
        }
    }

    /// Copies `len` bytes and makes them durable: non-temporal stores when
    /// enabled and `len >= movnt_threshold`, else an ordinary copy and a
    /// flush; then a drain (and an msync with [`FlushMethod::Msync`]).
    ///
    /// # Safety
    /// As [`memcpy_nt`](Self::memcpy_nt).
    pub unsafe fn memcpy_persist(
        &self,
        dst: *mut u8,
        src: *const u8,
        len: usize,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.movnt && len >= self.movnt_threshold {
            // SAFETY: forwarded contract; the flush method is supported.
            unsafe { nt_copy::copy_nt(dst, src, len, self.flush) };
            if self.flush == FlushMethod::Msync {
                crate::msync::msync(dst, len)?;
            }
            Ok(())
        } else {
            // SAFETY: forwarded contract.
            unsafe {
                std::ptr::copy_nonoverlapping(src, dst, len);
                self.persist(dst, len)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_selects_an_instruction_the_host_lacks() {
        let all = CpuFeatures {
            clflush: true,
            clflushopt: true,
            clwb: true,
        };
        let s = PersistStrategy::new(all, false, &Overrides::default());
        assert!(s.flush_method().is_supported());
        assert_eq!(s.flush_method(), FlushMethod::detect());
    }

    #[test]
    fn overrides_reach_the_strategy() {
        let o = Overrides {
            no_movnt: true,
            movnt_threshold: Some(1000),
            is_pmem_force: Some(true),
            no_flush: Some(true),
            ..Overrides::default()
        };
        let s = PersistStrategy::new(CpuFeatures::host(), false, &o);
        assert!(!s.uses_movnt());
        assert_eq!(s.movnt_threshold(), 1000);
        assert_eq!(s.is_pmem_force(), Some(true));
        assert_eq!(s.flush_method(), FlushMethod::NoFlush);
    }

    #[test]
    fn default_overrides_keep_movnt_on_x86_64() {
        let s = PersistStrategy::with_overrides(&Overrides::default());
        assert_eq!(s.uses_movnt(), cfg!(target_arch = "x86_64"));
        assert_eq!(s.movnt_threshold(), DEFAULT_MOVNT_THRESHOLD);
        assert_eq!(s.is_pmem_force(), None);
    }

    #[test]
    fn with_flush_method_rejects_unsupported() {
        let s = *PersistStrategy::global();
        for m in FlushMethod::ALL {
            match s.with_flush_method(m) {
                Ok(t) => assert_eq!(t.flush_method(), m),
                Err(e) => {
                    assert!(!m.is_supported());
                    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
                }
            }
        }
    }

    #[test]
    fn memcpy_persist_both_paths_on_heap() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let base = PersistStrategy::with_overrides(&Overrides::default())
            .with_flush_method(FlushMethod::detect())
            .unwrap();
        for s in [base.with_movnt(true), base.with_movnt(false)] {
            for len in [0usize, 1, 255, 256, 257, 4099] {
                let mut dst = vec![0u8; 5000];
                // SAFETY: both buffers hold at least 5 + len bytes.
                unsafe { s.memcpy_persist(dst.as_mut_ptr().add(5), src.as_ptr(), len) }.unwrap();
                assert_eq!(&dst[5..5 + len], &src[..len]);
                assert!(dst[..5].iter().chain(&dst[5 + len..]).all(|&b| b == 0));
            }
        }
    }
}

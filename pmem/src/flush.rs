//! Cache-line write-back (flush) and store ordering (drain).

use std::fmt;
use std::io;

use crate::cpu_features::CpuFeatures;
use crate::overrides::Overrides;

/// Size of the unit the flush instructions act on. libpmem assumes 64 bytes on
/// x86_64, as do we.
pub const CACHE_LINE: usize = 64;

/// How written data is pushed from the CPU caches towards the persistence domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushMethod {
    /// `CLWB`: write the line back and (usually) keep it cached. Weakly ordered:
    /// needs a [`drain`](crate::drain).
    Clwb,
    /// `CLFLUSHOPT`: write back and invalidate the line. Weakly ordered: needs a
    /// drain.
    ClflushOpt,
    /// `CLFLUSH`: write back and invalidate; ordered with other stores, so no
    /// drain is needed (one does no harm).
    Clflush,
    /// No cache-line flush, only the drain: the CPU caches are inside the
    /// persistence domain (eADR), or `PMEM_NO_FLUSH=1` asked for this.
    NoFlush,
    /// No cache-line flush instruction exists here (a CPU without CLFLUSH, or a
    /// target other than x86_64): data is written back with `msync(MS_SYNC)` on
    /// the page-aligned range covering it, which only works inside file
    /// mappings (on a DAX file system msync also writes back the CPU caches).
    Msync,
}

impl FlushMethod {
    /// Every method, strongest preference first.
    pub const ALL: [FlushMethod; 5] = [
        FlushMethod::Clwb,
        FlushMethod::ClflushOpt,
        FlushMethod::Clflush,
        FlushMethod::NoFlush,
        FlushMethod::Msync,
    ];

    /// Short lowercase name (`"clwb"`, `"clflushopt"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FlushMethod::Clwb => "clwb",
            FlushMethod::ClflushOpt => "clflushopt",
            FlushMethod::Clflush => "clflush",
            FlushMethod::NoFlush => "none",
            FlushMethod::Msync => "msync",
        }
    }

    /// Whether this method flushes with a CPU instruction.
    pub fn is_instruction(self) -> bool {
        matches!(
            self,
            FlushMethod::Clwb | FlushMethod::ClflushOpt | FlushMethod::Clflush
        )
    }

    /// Whether a CPU with `cpu` features can execute this method.
    /// [`NoFlush`](FlushMethod::NoFlush) and [`Msync`](FlushMethod::Msync)
    /// need no instruction and are always possible.
    pub fn is_supported_by(self, cpu: CpuFeatures) -> bool {
        match self {
            FlushMethod::Clwb => cpu.clwb,
            FlushMethod::ClflushOpt => cpu.clflushopt,
            FlushMethod::Clflush => cpu.clflush,
            FlushMethod::NoFlush | FlushMethod::Msync => true,
        }
    }

    /// Whether the CPU this process runs on can execute this method.
    pub fn is_supported(self) -> bool {
        self.is_supported_by(CpuFeatures::host())
    }

    /// The best method this CPU has, ignoring overrides and eADR:
    /// CLWB, else CLFLUSHOPT, else CLFLUSH, else msync.
    pub fn detect() -> FlushMethod {
        FlushMethod::select(CpuFeatures::host(), false, &Overrides::default())
    }

    /// The method libpmem would choose for a CPU with `cpu` features, eADR
    /// present or not, and the given overrides. Pure: use it to reason about
    /// machines other than this one.
    pub fn select(cpu: CpuFeatures, eadr: bool, overrides: &Overrides) -> FlushMethod {
        match overrides.no_flush {
            Some(true) => return FlushMethod::NoFlush,
            None if eadr => return FlushMethod::NoFlush,
            _ => {}
        }
        if cpu.clwb && !overrides.no_clwb {
            FlushMethod::Clwb
        } else if cpu.clflushopt && !overrides.no_clflushopt {
            FlushMethod::ClflushOpt
        } else if cpu.clflush {
            FlushMethod::Clflush
        } else {
            FlushMethod::Msync
        }
    }

    /// Flushes every cache line that overlaps `[addr, addr + len)` with this
    /// method, without draining.
    ///
    /// Errors: [`io::ErrorKind::Unsupported`] if this CPU lacks the
    /// instruction; for [`Msync`](FlushMethod::Msync), whatever `msync` reports
    /// (e.g. `ENOMEM` outside a mapping).
    ///
    /// # Safety
    /// For the instruction methods the whole range must be memory mapped in
    /// this process (a flush of an unmapped address faults). The contents are
    /// not changed. [`NoFlush`](FlushMethod::NoFlush) and
    /// [`Msync`](FlushMethod::Msync) have no requirement.
    pub unsafe fn flush(self, addr: *const u8, len: usize) -> io::Result<()> {
        match self {
            FlushMethod::NoFlush => Ok(()),
            FlushMethod::Msync => crate::msync::msync(addr, len),
            _ if !self.is_supported() => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not supported by this CPU", self.name()),
            )),
            // SAFETY: the instruction exists on this CPU (checked above) and
            // the caller guarantees the range is mapped.
            _ => unsafe {
                flush_cpu_lines(self, addr, len);
                Ok(())
            },
        }
    }
}

impl fmt::Display for FlushMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Flushes the cache lines overlapping `[addr, addr + len)` with `method` if it
/// is an instruction method; does nothing for `NoFlush` and `Msync`.
///
/// # Safety
/// The range must be mapped, and an instruction `method` must be supported by
/// this CPU (else the process dies of SIGILL).
#[inline]
pub(crate) unsafe fn flush_cpu_lines(method: FlushMethod, addr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if len == 0 {
            return;
        }
        let start = addr as usize & !(CACHE_LINE - 1);
        let end = (addr as usize).saturating_add(len);
        match method {
            // SAFETY: `start` is line-aligned; the range is mapped and the
            // instruction supported (this function's contract).
            FlushMethod::Clwb => unsafe { x86::clwb_lines(start, end) },
            // SAFETY: as above.
            FlushMethod::ClflushOpt => unsafe { x86::clflushopt_lines(start, end) },
            // SAFETY: as above.
            FlushMethod::Clflush => unsafe { x86::clflush_lines(start, end) },
            FlushMethod::NoFlush | FlushMethod::Msync => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // No instruction method is ever supported here, so `select` and
        // `FlushMethod::flush` never reach this with one.
        let _ = (method, addr, len);
    }
}

/// Waits until earlier flushes and non-temporal stores are complete (SFENCE on
/// x86_64; a full memory fence elsewhere).
#[inline]
pub fn drain() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE only orders stores; it exists on every x86_64 CPU (SSE).
    unsafe {
        core::arch::asm!("sfence", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One loop per instruction, so the per-line loop has no dispatch. `asm!`
    //! is used because `_mm_clwb`/`_mm_clflushopt` are not stable intrinsics;
    //! the assembler accepts them without a target feature, and the default
    //! memory clobber keeps earlier stores before the flush.

    use super::CACHE_LINE;

    macro_rules! line_loop {
        ($name:ident, $insn:literal) => {
            /// Runs the instruction on each line start in `[start, end)`.
            ///
            /// # Safety
            /// `start` is line-aligned; every line up to `end` is mapped; the CPU
            /// has the instruction.
            #[inline]
            pub(super) unsafe fn $name(mut start: usize, end: usize) {
                while start < end {
                    // SAFETY: from the function contract: the line is mapped
                    // and the CPU implements the instruction.
                    unsafe {
                        core::arch::asm!(
                            concat!($insn, " byte ptr [{0}]"),
                            in(reg) start,
                            options(nostack, preserves_flags)
                        );
                    }
                    start += CACHE_LINE;
                }
            }
        };
    }

    line_loop!(clwb_lines, "clwb");
    line_loop!(clflushopt_lines, "clflushopt");
    line_loop!(clflush_lines, "clflush");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CPU: CpuFeatures = CpuFeatures {
        clflush: true,
        clflushopt: true,
        clwb: true,
    };

    #[test]
    fn select_prefers_clwb_then_clflushopt_then_clflush() {
        let o = Overrides::default();
        assert_eq!(FlushMethod::select(ALL_CPU, false, &o), FlushMethod::Clwb);
        let no_clwb = CpuFeatures {
            clwb: false,
            ..ALL_CPU
        };
        assert_eq!(
            FlushMethod::select(no_clwb, false, &o),
            FlushMethod::ClflushOpt
        );
        let only_clflush = CpuFeatures {
            clflush: true,
            ..CpuFeatures::default()
        };
        assert_eq!(
            FlushMethod::select(only_clflush, false, &o),
            FlushMethod::Clflush
        );
        assert_eq!(
            FlushMethod::select(CpuFeatures::default(), false, &o),
            FlushMethod::Msync
        );
    }

    #[test]
    fn select_honours_overrides() {
        let o = Overrides {
            no_clwb: true,
            ..Overrides::default()
        };
        assert_eq!(
            FlushMethod::select(ALL_CPU, false, &o),
            FlushMethod::ClflushOpt
        );
        let o = Overrides {
            no_clwb: true,
            no_clflushopt: true,
            ..Overrides::default()
        };
        assert_eq!(
            FlushMethod::select(ALL_CPU, false, &o),
            FlushMethod::Clflush
        );
        // PMEM_NO_CLFLUSHOPT alone leaves CLWB in place.
        let o = Overrides {
            no_clflushopt: true,
            ..Overrides::default()
        };
        assert_eq!(FlushMethod::select(ALL_CPU, false, &o), FlushMethod::Clwb);
        let o = Overrides {
            no_flush: Some(true),
            ..Overrides::default()
        };
        assert_eq!(
            FlushMethod::select(ALL_CPU, false, &o),
            FlushMethod::NoFlush
        );
    }

    #[test]
    fn eadr_skips_flush_unless_no_flush_is_zero() {
        let o = Overrides::default();
        assert_eq!(FlushMethod::select(ALL_CPU, true, &o), FlushMethod::NoFlush);
        let o = Overrides {
            no_flush: Some(false),
            ..Overrides::default()
        };
        assert_eq!(FlushMethod::select(ALL_CPU, true, &o), FlushMethod::Clwb);
    }

    #[test]
    fn detect_is_supported_and_best() {
        let best = FlushMethod::detect();
        assert!(best.is_supported());
        // No supported instruction ranks above the detected method.
        for m in FlushMethod::ALL.into_iter().filter(|m| m.is_instruction()) {
            if m == best {
                break;
            }
            assert!(!m.is_supported(), "{m} is supported but {best} was chosen");
        }
        assert_ne!(best, FlushMethod::NoFlush, "detect ignores eADR");
    }

    #[test]
    fn unsupported_method_is_an_error_not_a_crash() {
        let mut line = [0u8; CACHE_LINE];
        for m in FlushMethod::ALL {
            // SAFETY: the range is a local array.
            let r = unsafe { m.flush(line.as_mut_ptr(), line.len()) };
            if m.is_supported() {
                if m != FlushMethod::Msync {
                    r.unwrap();
                }
            } else {
                assert_eq!(r.unwrap_err().kind(), io::ErrorKind::Unsupported);
            }
        }
    }

    #[test]
    fn every_supported_instruction_keeps_data() {
        // Heap memory, odd start and length, spanning many lines.
        let mut buf: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let expect = buf.clone();
        for m in FlushMethod::ALL
            .into_iter()
            .filter(|m| m.is_instruction() && m.is_supported())
        {
            buf[17] ^= 0xff;
            // SAFETY: in bounds of `buf`.
            unsafe { m.flush(buf.as_ptr().add(13), 9_000).unwrap() };
            drain();
            buf[17] ^= 0xff;
            // SAFETY: as above.
            unsafe { m.flush(buf.as_ptr().add(13), 9_000).unwrap() };
            drain();
            assert_eq!(buf, expect, "{m}");
        }
    }

    #[test]
    fn zero_length_flush_is_a_no_op() {
        for m in FlushMethod::ALL.into_iter().filter(|m| m.is_supported()) {
            // SAFETY: zero length touches nothing, even at a dangling address.
            unsafe { m.flush(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0) }.unwrap();
        }
    }

    #[test]
    fn names_are_distinct() {
        let names: std::collections::HashSet<_> =
            FlushMethod::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), FlushMethod::ALL.len());
        assert_eq!(FlushMethod::Clwb.to_string(), "clwb");
    }
}

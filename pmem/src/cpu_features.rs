//! What the CPU offers for cache-line write-back, read with CPUID.

use std::sync::OnceLock;

/// Cache-line flush instructions the CPU supports, as reported by CPUID.
///
/// On targets other than x86_64 every field is `false`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `CLFLUSH`: CPUID leaf 1, EDX bit 19.
    pub clflush: bool,
    /// `CLFLUSHOPT`: CPUID leaf 7 (subleaf 0), EBX bit 23.
    pub clflushopt: bool,
    /// `CLWB`: CPUID leaf 7 (subleaf 0), EBX bit 24.
    pub clwb: bool,
}

impl CpuFeatures {
    /// Reads CPUID now. Prefer [`CpuFeatures::host`], which caches the answer
    /// (CPUID traps to the hypervisor in a VM and costs microseconds there).
    pub fn detect() -> CpuFeatures {
        detect_impl()
    }

    /// The features of the CPU this process runs on, read once.
    pub fn host() -> CpuFeatures {
        static HOST: OnceLock<CpuFeatures> = OnceLock::new();
        *HOST.get_or_init(CpuFeatures::detect)
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_impl() -> CpuFeatures {
    use core::arch::x86_64::{__cpuid_count, __get_cpuid_max};

    const LEAF1_EDX_CLFLUSH: u32 = 1 << 19;
    const LEAF7_EBX_CLFLUSHOPT: u32 = 1 << 23;
    const LEAF7_EBX_CLWB: u32 = 1 << 24;

    // SAFETY: CPUID exists on every x86_64 CPU and only reads identification
    // registers. (These functions became safe in newer Rust; `unused_unsafe` is
    // allowed so the crate builds warning-free on both old and new compilers.)
    #[allow(unused_unsafe)]
    let (max_leaf, leaf1_edx) = unsafe { (__get_cpuid_max(0).0, __cpuid_count(1, 0).edx) };
    let leaf7_ebx = if max_leaf >= 7 {
        // SAFETY: as above; leaf 7 is below the maximum leaf the CPU reports.
        #[allow(unused_unsafe)]
        unsafe {
            __cpuid_count(7, 0).ebx
        }
    } else {
        0
    };
    CpuFeatures {
        clflush: leaf1_edx & LEAF1_EDX_CLFLUSH != 0,
        clflushopt: leaf7_ebx & LEAF7_EBX_CLFLUSHOPT != 0,
        clwb: leaf7_ebx & LEAF7_EBX_CLWB != 0,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_impl() -> CpuFeatures {
    CpuFeatures::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_stable() {
        assert_eq!(CpuFeatures::host(), CpuFeatures::detect());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_always_has_clflush() {
        // CLFLUSH is part of SSE2, which every x86_64 CPU implements.
        assert!(CpuFeatures::host().clflush);
    }

    #[cfg(target_os = "linux")]
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn agrees_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
            return;
        };
        let has = |name: &str| flags.split_whitespace().any(|f| f == name);
        let f = CpuFeatures::host();
        assert_eq!(f.clflush, has("clflush"));
        assert_eq!(f.clflushopt, has("clflushopt"));
        assert_eq!(f.clwb, has("clwb"));
    }
}

//! The `PMEM_*` environment overrides, as PMDK's libpmem reads them.

use std::sync::OnceLock;

/// Default length from which [`memcpy_persist`](crate::memcpy_persist) uses
/// non-temporal stores (libpmem's `PMEM_MOVNT_THRESHOLD` default).
pub const DEFAULT_MOVNT_THRESHOLD: usize = 256;

/// Choices that override detection, normally taken from the environment.
///
/// The environment is read once per process ([`Overrides::global`]); everything
/// that depends on it is also computable from an explicit value, so tests and
/// tools can try every combination without touching the environment.
///
/// | variable | field | effect |
/// |---|---|---|
/// | `PMEM_NO_CLWB=1` | `no_clwb` | never use CLWB |
/// | `PMEM_NO_CLFLUSHOPT=1` | `no_clflushopt` | never use CLFLUSHOPT |
/// | `PMEM_NO_FLUSH=1` / `=0` | `no_flush` | skip cache flushes (drain only) / flush even with eADR |
/// | `PMEM_NO_MOVNT=1` | `no_movnt` | no non-temporal stores |
/// | `PMEM_MOVNT_THRESHOLD=N` | `movnt_threshold` | non-temporal copy from N bytes on |
/// | `PMEM_IS_PMEM_FORCE=1` / `=0` | `is_pmem_force` | every mapping is / is not pmem |
///
/// Boolean variables count only when set to exactly `1` or `0`; other values
/// are ignored, as libpmem does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Do not use CLWB even if the CPU has it.
    pub no_clwb: bool,
    /// Do not use CLFLUSHOPT even if the CPU has it.
    pub no_clflushopt: bool,
    /// `Some(true)`: never flush cache lines, only drain (for platforms whose
    /// caches are in the persistence domain). `Some(false)`: flush even when
    /// eADR is detected. `None`: flush unless eADR is detected.
    pub no_flush: Option<bool>,
    /// Never use non-temporal stores.
    pub no_movnt: bool,
    /// Length from which copies use non-temporal stores
    /// (`None`: [`DEFAULT_MOVNT_THRESHOLD`]).
    pub movnt_threshold: Option<usize>,
    /// Force [`Mapping::is_pmem`](crate::Mapping::is_pmem) to this answer.
    pub is_pmem_force: Option<bool>,
}

impl Overrides {
    /// Reads the `PMEM_*` variables of this process's environment now.
    pub fn from_env() -> Overrides {
        Overrides::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds overrides from any name-to-value lookup (the environment, a
    /// config file, a test table).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Overrides {
        let flag = |name: &str| match lookup(name).as_deref().map(str::trim) {
            Some("1") => Some(true),
            Some("0") => Some(false),
            _ => None,
        };
        Overrides {
            no_clwb: flag("PMEM_NO_CLWB") == Some(true),
            no_clflushopt: flag("PMEM_NO_CLFLUSHOPT") == Some(true),
            no_flush: flag("PMEM_NO_FLUSH"),
            no_movnt: flag("PMEM_NO_MOVNT") == Some(true),
            movnt_threshold: lookup("PMEM_MOVNT_THRESHOLD").and_then(|v| v.trim().parse().ok()),
            is_pmem_force: flag("PMEM_IS_PMEM_FORCE"),
        }
    }

    /// The overrides from the environment, read the first time this is called.
    pub fn global() -> &'static Overrides {
        static GLOBAL: OnceLock<Overrides> = OnceLock::new();
        GLOBAL.get_or_init(Overrides::from_env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Overrides {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Overrides::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn empty_lookup_is_default() {
        assert_eq!(from(&[]), Overrides::default());
    }

    #[test]
    fn every_variable_is_read() {
        let o = from(&[
            ("PMEM_NO_CLWB", "1"),
            ("PMEM_NO_CLFLUSHOPT", "1"),
            ("PMEM_NO_FLUSH", "0"),
            ("PMEM_NO_MOVNT", "1"),
            ("PMEM_MOVNT_THRESHOLD", "4096"),
            ("PMEM_IS_PMEM_FORCE", "1"),
        ]);
        assert_eq!(
            o,
            Overrides {
                no_clwb: true,
                no_clflushopt: true,
                no_flush: Some(false),
                no_movnt: true,
                movnt_threshold: Some(4096),
                is_pmem_force: Some(true),
            }
        );
    }

    #[test]
    fn only_exact_zero_or_one_count() {
        let o = from(&[
            ("PMEM_NO_CLWB", "yes"),
            ("PMEM_NO_FLUSH", "2"),
            ("PMEM_IS_PMEM_FORCE", ""),
            ("PMEM_MOVNT_THRESHOLD", "-5"),
        ]);
        assert_eq!(o, Overrides::default());
        assert_eq!(
            from(&[("PMEM_IS_PMEM_FORCE", "0")]).is_pmem_force,
            Some(false)
        );
        assert_eq!(from(&[("PMEM_NO_FLUSH", " 1\n")]).no_flush, Some(true));
    }
}

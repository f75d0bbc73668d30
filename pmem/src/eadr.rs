//! eADR detection: are the CPU caches inside the persistence domain?

use std::path::Path;
use std::sync::OnceLock;

/// Where Linux lists NVDIMM (libnvdimm) regions and namespaces.
const ND_DEVICES: &str = "/sys/bus/nd/devices";

/// Whether this platform has eADR: the CPU caches are flushed to persistent
/// memory on power failure, so cache-line flushes before a drain are
/// unnecessary.
///
/// True when at least one NVDIMM region reports `cpu_cache` in
/// `/sys/bus/nd/devices/*/persistence_domain` and none reports anything else
/// (a region whose domain is `memory_controller` needs flushes, so one such
/// region makes the answer false, as in PMDK). Read once per process. When true,
/// the default [`FlushMethod`](crate::FlushMethod) is
/// [`NoFlush`](crate::FlushMethod::NoFlush); `PMEM_NO_FLUSH=0` flushes anyway.
pub fn has_eadr() -> bool {
    static EADR: OnceLock<bool> = OnceLock::new();
    *EADR.get_or_init(|| eadr_in(Path::new(ND_DEVICES)))
}

/// The eADR rule applied to a directory laid out like `/sys/bus/nd/devices`.
fn eadr_in(devices: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return false;
    };
    let mut seen = false;
    for entry in entries.flatten() {
        // Only regions have the attribute; namespaces, btt, dax... do not.
        let Ok(domain) = std::fs::read_to_string(entry.path().join("persistence_domain")) else {
            continue;
        };
        if domain.trim() != "cpu_cache" {
            return false;
        }
        seen = true;
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn region(root: &Path, name: &str, domain: Option<&str>) {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        if let Some(d) = domain {
            fs::write(dir.join("persistence_domain"), format!("{d}\n")).unwrap();
        }
    }

    #[test]
    fn missing_directory_is_no_eadr() {
        assert!(!eadr_in(Path::new("/nonexistent/sys/bus/nd/devices")));
    }

    #[test]
    fn cpu_cache_regions_mean_eadr() {
        let tmp = tempfile::tempdir().unwrap();
        region(tmp.path(), "region0", Some("cpu_cache"));
        region(tmp.path(), "namespace0.0", None);
        assert!(eadr_in(tmp.path()));
        region(tmp.path(), "region1", Some("cpu_cache"));
        assert!(eadr_in(tmp.path()));
    }

    #[test]
    fn one_memory_controller_region_means_no_eadr() {
        let tmp = tempfile::tempdir().unwrap();
        region(tmp.path(), "region0", Some("cpu_cache"));
        region(tmp.path(), "region1", Some("memory_controller"));
        assert!(!eadr_in(tmp.path()));
    }

    #[test]
    fn no_regions_means_no_eadr() {
        let tmp = tempfile::tempdir().unwrap();
        region(tmp.path(), "ndbus0", None);
        assert!(!eadr_in(tmp.path()));
    }

    #[test]
    fn host_answer_matches_sysfs() {
        assert_eq!(has_eadr(), eadr_in(Path::new(ND_DEVICES)));
    }
}

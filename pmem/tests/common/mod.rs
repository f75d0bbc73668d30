//! Where the integration tests put their files, and what they may expect there.
//!
//! - `PMEM_TEST_DIR`: the directory test files go in (each test makes a fresh
//!   temporary directory inside it). Default: the system temp dir (`TMPDIR`).
//! - `PMEM_TEST_DAX=1`: that directory is on a DAX file system (ext4 or xfs
//!   mounted `-o dax` on persistent memory). The tests then assert that files
//!   there map with MAP_SYNC (`MappingKind::Sync`) and that `is_pmem()` is true;
//!   without it they assert nothing about DAX.
//! - `PMEM_TEST_DEVDAX=/dev/daxX.Y`: a device DAX the tests may overwrite.
//!
//! The VM tier (`tests/vm/run`, step `pmem-dax`) sets all three; on an
//! ordinary machine none is set.
#![allow(dead_code)] // each test crate uses part of this

use std::path::PathBuf;

/// A fresh temporary directory in `PMEM_TEST_DIR` (or the system temp dir).
pub fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("PMEM_TEST_DIR") {
        Some(d) => tempfile::tempdir_in(&d)
            .unwrap_or_else(|e| panic!("PMEM_TEST_DIR={}: {e}", PathBuf::from(d).display())),
        None => tempfile::tempdir().unwrap(),
    }
}

/// `PMEM_TEST_DAX=1`: the test directory is on a DAX file system.
pub fn on_dax() -> bool {
    std::env::var("PMEM_TEST_DAX").is_ok_and(|v| v == "1")
}

/// The device DAX named by `PMEM_TEST_DEVDAX`, if any.
pub fn devdax() -> Option<PathBuf> {
    std::env::var_os("PMEM_TEST_DEVDAX").map(PathBuf::from)
}

//! Every flush path this CPU has, executed on real mapped memory.

mod common;

use pmem::{FlushMethod, Mapping, PersistStrategy};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
        .collect()
}

/// Every method this CPU can run, instruction or not.
fn supported() -> Vec<FlushMethod> {
    FlushMethod::ALL
        .into_iter()
        .filter(|m| m.is_supported())
        .collect()
}

#[test]
fn the_best_instruction_is_among_the_tested_ones() {
    let best = FlushMethod::detect();
    assert!(supported().contains(&best));
    #[cfg(target_arch = "x86_64")]
    assert!(best.is_instruction(), "x86_64 always has at least CLFLUSH");
}

#[test]
fn each_method_persists_through_a_pmem_forced_mapping() {
    let dir = common::tempdir();
    let len = 256 * 1024 + 100;
    for method in supported() {
        let s = PersistStrategy::global()
            .with_flush_method(method)
            .unwrap()
            .with_is_pmem_force(Some(true));
        let path = dir.path().join(method.name());
        let mut m = Mapping::create_with(&path, len, &s).unwrap();
        assert!(m.is_pmem());
        assert_eq!(m.strategy().flush_method(), method);
        let data = pattern(len, method as u8);
        m.write_at(0, &data).unwrap();
        // Unaligned starts and lengths, a single byte, whole lines, everything.
        for (off, n) in [(0, 1), (1, 63), (63, 2), (64, 64), (100, 5000), (0, len)] {
            m.flush(off, n).unwrap();
            pmem::drain();
            m.persist(off, n).unwrap();
        }
        m.sync().unwrap();
        let mut back = vec![0u8; len];
        m.read_at(0, &mut back).unwrap();
        assert_eq!(back, data, "{method}: data changed by flushing");
        drop(m);
        // A fresh mapping of the file (the page cache) sees the same bytes.
        let again = Mapping::open(&path).unwrap();
        let mut back = vec![0u8; len];
        again.read_at(0, &mut back).unwrap();
        assert_eq!(back, data, "{method}: reopened");
    }
}

#[test]
fn method_flush_on_raw_mapped_memory() {
    let dir = common::tempdir();
    let mut m = Mapping::create(dir.path().join("raw"), 64 * 1024).unwrap();
    let data = pattern(64 * 1024, 5);
    m.write_at(0, &data).unwrap();
    for method in supported() {
        for (off, n) in [(0usize, 64 * 1024), (3, 1), (4095, 2), (5000, 12345)] {
            let p = m.range_ptr(off, n).unwrap();
            // SAFETY: the range is inside the mapping.
            unsafe { method.flush(p, n) }.unwrap_or_else(|e| panic!("{method}: {e}"));
            pmem::drain();
        }
    }
    let mut back = vec![0u8; data.len()];
    m.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn global_free_functions_on_mapped_memory() {
    let dir = common::tempdir();
    let mut m = Mapping::create(dir.path().join("global"), 8192).unwrap();
    m.write_at(123, b"persist me").unwrap();
    let p = m.range_ptr(123, 10).unwrap();
    // SAFETY: inside the mapping.
    unsafe {
        pmem::flush(p, 10).unwrap();
        pmem::drain();
        pmem::persist(p, 10).unwrap();
    }
    pmem::msync(p, 10).unwrap();
    let mut b = [0u8; 10];
    m.read_at(123, &mut b).unwrap();
    assert_eq!(&b, b"persist me");
    assert_eq!(
        pmem::flush_method(),
        PersistStrategy::global().flush_method()
    );
}

#[test]
fn msync_reaches_the_file() {
    let dir = common::tempdir();
    let path = dir.path().join("ms");
    let s = PersistStrategy::global()
        .with_flush_method(FlushMethod::Msync)
        .unwrap()
        .with_is_pmem_force(Some(true));
    let mut m = Mapping::create_with(&path, 3 * 4096, &s).unwrap();
    m.write_at(4096 + 7, b"through msync").unwrap();
    // The pmem path with the Msync method: msync of the covering page.
    m.persist(4096 + 7, 13).unwrap();
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[4096 + 7..4096 + 20], b"through msync");
}

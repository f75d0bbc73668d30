//! Non-temporal copy and copy+persist: sizes, misalignments, large copies.

mod common;

use pmem::{FlushMethod, Mapping, PersistStrategy};

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Strategies covering both copy paths and every supported flush method.
fn strategies() -> Vec<PersistStrategy> {
    let base = *PersistStrategy::global();
    let mut v = Vec::new();
    for m in FlushMethod::ALL.into_iter().filter(|m| m.is_supported()) {
        let s = base.with_flush_method(m).unwrap();
        v.push(s.with_movnt(true));
        v.push(s.with_movnt(false));
    }
    v
}

const GUARD: u8 = 0xA5;

#[test]
fn memcpy_nt_every_size_to_300_at_every_offset_to_64() {
    let dir = common::tempdir();
    let m = Mapping::create(dir.path().join("small"), 4096).unwrap();
    let src = pattern(600, 1);
    let area = 512;
    let s = PersistStrategy::global().with_movnt(true);
    let mut back = vec![0u8; area];
    for len in 0..=300usize {
        for dst_off in 0..64usize {
            let src_off = (len + dst_off) % 13;
            // SAFETY: the first `area` bytes of the mapping, which only this
            // test touches.
            unsafe { std::ptr::write_bytes(m.as_ptr(), GUARD, area) };
            // SAFETY: dst_off + len < area; src has 600 bytes.
            unsafe { s.memcpy_nt(m.as_ptr().add(dst_off), src.as_ptr().add(src_off), len) };
            m.read_at(0, &mut back).unwrap();
            let ctx = format!("len {len} dst_off {dst_off} src_off {src_off}");
            assert!(
                back[..dst_off].iter().all(|&b| b == GUARD),
                "head guard: {ctx}"
            );
            assert_eq!(
                &back[dst_off..dst_off + len],
                &src[src_off..src_off + len],
                "{ctx}"
            );
            assert!(
                back[dst_off + len..].iter().all(|&b| b == GUARD),
                "tail guard: {ctx}"
            );
        }
    }
}

#[test]
fn memcpy_persist_every_strategy_sizes_and_offsets() {
    let dir = common::tempdir();
    let m = Mapping::create(dir.path().join("persist"), 8192).unwrap();
    let src = pattern(4096, 2);
    let mut back = vec![0u8; 4096];
    for s in strategies() {
        // Small threshold so both sides of it are exercised on every size band.
        for s in [s, s.with_movnt_threshold(64)] {
            for len in [
                0usize, 1, 7, 8, 9, 15, 16, 63, 64, 65, 255, 256, 257, 1000, 3000,
            ] {
                for dst_off in [0usize, 1, 8, 31, 63] {
                    // SAFETY: first 4096 bytes of the mapping, only used here.
                    unsafe { std::ptr::write_bytes(m.as_ptr(), GUARD, 4096) };
                    // SAFETY: dst_off + len < 4096; src has 4096 bytes.
                    unsafe { s.memcpy_persist(m.as_ptr().add(dst_off), src.as_ptr().add(3), len) }
                        .unwrap();
                    m.read_at(0, &mut back).unwrap();
                    let ctx = format!("{s:?} len {len} off {dst_off}");
                    assert_eq!(&back[dst_off..dst_off + len], &src[3..3 + len], "{ctx}");
                    assert!(back[..dst_off].iter().all(|&b| b == GUARD), "{ctx}");
                    assert!(back[dst_off + len..].iter().all(|&b| b == GUARD), "{ctx}");
                }
            }
        }
    }
}

#[test]
fn a_few_mib_misaligned() {
    let dir = common::tempdir();
    let len = 3 * 1024 * 1024 + 17;
    let path = dir.path().join("large");
    let mut m = Mapping::create(&path, len + 128).unwrap();
    let src = pattern(len + 64, 3);
    let mut back = vec![0u8; len];
    for (i, s) in strategies().into_iter().enumerate() {
        let dst_off = [0usize, 5, 64, 33][i % 4];
        let src_off = [0usize, 1, 7, 60][(i / 4) % 4];
        // SAFETY: dst_off + len <= mapping length; src has len + 64 bytes.
        unsafe { s.memcpy_nt(m.as_ptr().add(dst_off), src.as_ptr().add(src_off), len) };
        m.read_at(dst_off, &mut back).unwrap();
        assert!(back == src[src_off..src_off + len], "memcpy_nt {s:?}");
        // Again with memcpy_persist, over different bytes.
        let src2 = pattern(len, 1000 + i as u32);
        // SAFETY: as above.
        unsafe { s.memcpy_persist(m.as_ptr().add(dst_off), src2.as_ptr(), len) }.unwrap();
        m.read_at(dst_off, &mut back).unwrap();
        assert!(back == src2, "memcpy_persist {s:?}");
    }
    // Through the Mapping API with the global strategy, checked by a reopen.
    let src3 = pattern(len, 77);
    m.write_persist(100, &src3).unwrap();
    drop(m);
    let file = std::fs::read(&path).unwrap();
    assert!(file[100..100 + len] == src3[..]);
}

#[test]
fn global_memcpy_functions() {
    let dir = common::tempdir();
    let m = Mapping::create(dir.path().join("g"), 4096).unwrap();
    let src = pattern(1000, 4);
    let mut back = vec![0u8; 1000];
    // SAFETY: inside the mapping, distinct from src.
    unsafe { pmem::memcpy_nt(m.as_ptr().add(3), src.as_ptr(), 1000) };
    m.read_at(3, &mut back).unwrap();
    assert_eq!(back, src);
    let src = pattern(1000, 5);
    // SAFETY: as above.
    unsafe { pmem::memcpy_persist(m.as_ptr().add(2000), src.as_ptr(), 1000) }.unwrap();
    m.read_at(2000, &mut back).unwrap();
    assert_eq!(back, src);
}

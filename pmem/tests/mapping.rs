//! Mapping files: create/open/size, msync fallback durability, errors.

mod common;

use std::io::ErrorKind;
use std::path::Path;

use pmem::{Mapping, MappingKind, PersistStrategy};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn read_all(m: &Mapping) -> Vec<u8> {
    let mut v = vec![0u8; m.len()];
    m.read_at(0, &mut v).unwrap();
    v
}

/// Writes, persists (msync on a page-cache file), unmaps, reads back through
/// a fresh mapping and through plain file I/O.
fn roundtrip_in(dir: &Path) {
    let path = dir.join("data");
    let len = 3 * pmem::page_size() + 123;
    let data = pattern(len, 9);
    {
        let mut m = Mapping::create(&path, len).unwrap();
        assert_eq!(m.len(), len);
        assert_eq!(m.path(), path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
        assert!(
            read_all(&m).iter().all(|&b| b == 0),
            "new file reads as zeros"
        );
        m.write_at(0, &data).unwrap();
        // Persist in unaligned pieces: msync has to widen each to pages.
        m.persist(0, 1).unwrap();
        m.persist(1, 4096).unwrap();
        m.persist(4097, len - 4097).unwrap();
        m.sync().unwrap();
    }
    let m = Mapping::open(&path).unwrap();
    assert_eq!(m.len(), len);
    assert_eq!(read_all(&m), data);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn msync_fallback_on_temp_dir_file_system() {
    let dir = common::tempdir();
    roundtrip_in(dir.path());
    let m = Mapping::open(dir.path().join("data")).unwrap();
    // Whatever the file system, is_pmem follows the kind unless forced.
    if PersistStrategy::global().is_pmem_force().is_none() {
        assert_eq!(m.is_pmem(), m.kind() != MappingKind::PageCache);
    }
    if common::on_dax() {
        assert_eq!(
            m.kind(),
            MappingKind::Sync,
            "PMEM_TEST_DAX=1: MAP_SYNC must succeed"
        );
    }
}

/// On a DAX file system (`PMEM_TEST_DAX=1`, set by the VM tier) MAP_SYNC must
/// succeed and the mapping must be pmem: stores are persisted by flushing CPU
/// caches, not by msync.
#[test]
fn dax_file_system_gives_map_sync_and_is_pmem() {
    if !common::on_dax() {
        eprintln!("PMEM_TEST_DAX is not 1: no DAX file system to test; skipped");
        return;
    }
    let dir = common::tempdir();
    let path = dir.path().join("dax");
    let detect = PersistStrategy::global().with_is_pmem_force(None);
    let len = 2 * pmem::page_size() + 17;
    let data = pattern(len, 42);
    {
        let mut m = Mapping::create_with(&path, len, &detect).unwrap();
        assert_eq!(m.kind(), MappingKind::Sync, "{m:?}");
        assert!(m.is_pmem(), "{m:?}");
        m.write_persist(0, &data).unwrap();
    }
    let m = Mapping::open_with(&path, &detect).unwrap();
    assert_eq!(m.kind(), MappingKind::Sync);
    assert!(m.is_pmem());
    assert_eq!(read_all(&m), data);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // Forcing it off keeps MAP_SYNC but persists with msync, which DAX accepts.
    let forced_off = detect.with_is_pmem_force(Some(false));
    let mut m = Mapping::open_with(&path, &forced_off).unwrap();
    assert_eq!(m.kind(), MappingKind::Sync);
    assert!(!m.is_pmem());
    m.write_persist(5, b"msync").unwrap();
}

/// Device DAX (`PMEM_TEST_DEVDAX=/dev/daxX.Y`, set by the VM tier): a length
/// that is not a multiple of the device alignment is mapped rounded up, and
/// `len()` stays what was asked.
#[cfg(target_os = "linux")]
#[test]
fn device_dax_length_need_not_be_a_multiple_of_the_alignment() {
    let Some(dev) = common::devdax() else {
        eprintln!("PMEM_TEST_DEVDAX not set: no device DAX to test; skipped");
        return;
    };
    let detect = PersistStrategy::global().with_is_pmem_force(None);
    let data = pattern(5000, 7);
    for len in [5000, (2 << 20) + 1] {
        let mut m = Mapping::create_with(&dev, len, &detect).unwrap();
        assert_eq!(m.len(), len);
        assert_eq!(m.kind(), MappingKind::DeviceDax);
        assert!(m.is_pmem());
        m.write_persist(len - data.len(), &data).unwrap();
        drop(m);
        let m = Mapping::open_with(&dev, &detect).unwrap();
        assert!(m.len() >= len, "open maps the whole device");
        let mut back = vec![0u8; data.len()];
        m.read_at(len - data.len(), &mut back).unwrap();
        assert_eq!(back, data, "len {len}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn msync_fallback_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipped");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    roundtrip_in(dir.path());
    // tmpfs never supports MAP_SYNC.
    let m = Mapping::open(dir.path().join("data")).unwrap();
    assert_eq!(m.kind(), MappingKind::PageCache);
    if PersistStrategy::global().is_pmem_force().is_none() {
        assert!(!m.is_pmem());
    }
}

#[test]
fn write_persist_survives_remap() {
    let dir = common::tempdir();
    let path = dir.path().join("wp");
    let data = pattern(10_000, 3);
    let base = *PersistStrategy::global();
    for force in [Some(true), Some(false)] {
        let s = base.with_is_pmem_force(force);
        let mut m = Mapping::create_with(&path, 16 * 1024, &s).unwrap();
        assert_eq!(m.is_pmem(), force.unwrap());
        m.write_persist(77, &data).unwrap();
        m.write_persist(16 * 1024 - 5, &data[..5]).unwrap();
        drop(m);
        let m = Mapping::open(&path).unwrap();
        let all = read_all(&m);
        assert_eq!(&all[77..77 + data.len()], &data[..]);
        assert_eq!(&all[16 * 1024 - 5..], &data[..5]);
    }
}

#[test]
fn create_resizes_an_existing_file() {
    let dir = common::tempdir();
    let path = dir.path().join("resize");
    let data = pattern(8192, 1);
    let mut m = Mapping::create(&path, 8192).unwrap();
    m.write_at(0, &data).unwrap();
    m.sync().unwrap();
    drop(m);

    // Shrinking is refused by `create`: the file and its data stay whole.
    let err = Mapping::create(&path, 4096).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("8192"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    assert_eq!(read_all(&Mapping::open(&path).unwrap()), data);

    // Shrink when asked: the first part keeps its contents.
    let m = Mapping::create_truncating(&path, 4096).unwrap();
    assert_eq!(m.len(), 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    assert_eq!(read_all(&m), &data[..4096]);
    drop(m);

    // Grow: the new part is zeros.
    let m = Mapping::create(&path, 3 * 4096 + 1).unwrap();
    let all = read_all(&m);
    assert_eq!(&all[..4096], &data[..4096]);
    assert!(all[4096..].iter().all(|&b| b == 0));
    assert_eq!(Mapping::open(&path).unwrap().len(), 3 * 4096 + 1);
}

#[test]
fn create_errors() {
    let dir = common::tempdir();
    let path = dir.path().join("zero");
    let err = Mapping::create(&path, 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("zero"),
        "error names the path: {err}"
    );
    assert!(!path.exists(), "a failed create leaves no file behind");

    let err = Mapping::create(&path, usize::MAX).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!path.exists());

    let err = Mapping::create(dir.path().join("no/such/dir/f"), 4096).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("no/such/dir"), "{err}");

    // A directory is not a file.
    assert!(Mapping::create(dir.path(), 4096).is_err());
}

#[test]
fn create_too_large_for_the_file_system_fails_cleanly() {
    // 2^62 bytes: beyond any ext4/tmpfs maximum file size, yet a valid off_t.
    let dir = common::tempdir();
    let path = dir.path().join("huge");
    let err = Mapping::create(&path, 1usize << 62).unwrap_err();
    assert!(err.to_string().contains("huge"), "{err}");
    assert!(!path.exists());
}

#[test]
fn open_errors() {
    let dir = common::tempdir();
    let missing = dir.path().join("missing");
    let err = Mapping::open(&missing).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("missing"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let err = Mapping::open(&empty).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("empty"), "{err}");

    assert!(
        Mapping::open(dir.path()).is_err(),
        "a directory cannot be mapped"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn char_device_that_is_not_dax_is_rejected() {
    let err = Mapping::open("/dev/null").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not device DAX"), "{err}");
    let err = Mapping::create("/dev/zero", 4096).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn out_of_range_is_invalid_input_never_a_panic() {
    let dir = common::tempdir();
    let mut m = Mapping::create(dir.path().join("r"), 4096).unwrap();
    let cases = [
        (4096, 1),
        (4095, 2),
        (0, 4097),
        (usize::MAX, 1),
        (1, usize::MAX),
        (usize::MAX, usize::MAX),
    ];
    for (off, len) in cases {
        let what = format!("offset {off} len {len}");
        assert_eq!(
            m.persist(off, len).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{what}"
        );
        assert_eq!(
            m.flush(off, len).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{what}"
        );
        assert_eq!(
            m.range_ptr(off, len).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{what}"
        );
    }
    let mut buf = [0u8; 2];
    assert_eq!(
        m.read_at(4095, &mut buf).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        m.write_at(4095, &buf).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        m.write_persist(4095, &buf).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let err = m.persist(4000, 200).unwrap_err();
    assert!(err.to_string().contains("4000+200"), "{err}");

    // Edges that are inside.
    m.persist(4096, 0).unwrap();
    m.persist(0, 4096).unwrap();
    m.write_at(4094, &buf).unwrap();
    assert_eq!(m.range_ptr(4096, 0).unwrap(), m.as_ptr().wrapping_add(4096));
}

#[test]
fn is_pmem_false_on_a_normal_file_and_forced_by_the_strategy() {
    let dir = common::tempdir();
    let path = dir.path().join("f");
    let detect = PersistStrategy::global().with_is_pmem_force(None);
    let m = Mapping::create_with(&path, 8192, &detect).unwrap();
    // The test dir is DAX only where PMEM_TEST_DAX says so (the VM tier).
    if common::on_dax() {
        assert_eq!(m.kind(), MappingKind::Sync);
        assert!(m.is_pmem());
    } else if m.kind() == MappingKind::PageCache {
        assert!(!m.is_pmem());
    }
    drop(m);
    let forced_on = detect.with_is_pmem_force(Some(true));
    let m = Mapping::open_with(&path, &forced_on).unwrap();
    assert!(m.is_pmem());
    assert_eq!(m.strategy(), &forced_on);
    drop(m);
    let forced_off = detect.with_is_pmem_force(Some(false));
    assert!(!Mapping::open_with(&path, &forced_off).unwrap().is_pmem());
}

#[test]
fn mapping_is_send_and_sync_and_threads_can_persist_disjoint_ranges() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Mapping>();

    let dir = common::tempdir();
    let path = dir.path().join("threads");
    let chunk = 64 * 1024;
    let m = Mapping::create(&path, 2 * chunk).unwrap();
    let data = [pattern(chunk, 11), pattern(chunk, 99)];
    std::thread::scope(|s| {
        for (i, d) in data.iter().enumerate() {
            let m = &m;
            s.spawn(move || {
                let p = m.range_ptr(i * chunk, chunk).unwrap();
                // SAFETY: each thread writes only its own chunk of the mapping.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), p, chunk) };
                m.persist(i * chunk, chunk).unwrap();
            });
        }
    });
    drop(m);
    let all = std::fs::read(&path).unwrap();
    assert_eq!(&all[..chunk], &data[0][..]);
    assert_eq!(&all[chunk..], &data[1][..]);
}

#[test]
fn mapping_can_move_to_another_thread() {
    let dir = common::tempdir();
    let mut m = Mapping::create(dir.path().join("moved"), 4096).unwrap();
    m.write_at(10, b"abc").unwrap();
    let m = std::thread::spawn(move || {
        m.persist(10, 3).unwrap();
        m
    })
    .join()
    .unwrap();
    let mut b = [0u8; 3];
    m.read_at(10, &mut b).unwrap();
    assert_eq!(&b, b"abc");
    assert!(format!("{m:?}").contains("Mapping"));
}

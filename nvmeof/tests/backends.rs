//! Namespace back ends over softroce and tcp: memory, buffered file, direct-I/O
//! file and pmem mapping, each written (plain, FUA, unaligned), flushed, read back
//! through the host and checked against the back end's file read independently;
//! the volatile write cache is reported.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use nvmeof::target::{Backing, NamespaceConfig, SubsystemConfig};
use nvmeof::wire::identify::vwc;
use nvmeof::wire::opcodes::FeatureId;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nvmeof-be-{tag}-{}-{}",
        std::process::id(),
        random_loopback()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The open flags of this process's descriptor for `path` (from /proc/self/fdinfo).
fn open_flags(path: &Path) -> Option<u32> {
    let want = std::fs::canonicalize(path).ok()?;
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if std::fs::read_link(e.path()).ok()? == want {
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            return u32::from_str_radix(flags.trim(), 8).ok();
        }
    }
    None
}

fn backends(provider: &str) {
    let d = dir(provider);
    let (buffered, direct, pm) = (d.join("b.img"), d.join("d.img"), d.join("p.img"));
    let mut sub = SubsystemConfig::new(SUBNQN);
    sub.namespaces.push(NamespaceConfig::memory(1, 4 << 20));
    for (nsid, backing, bs) in [
        (
            2,
            Backing::File {
                path: buffered.clone(),
                size: Some(4 << 20),
            },
            512,
        ),
        (
            3,
            Backing::DirectFile {
                path: direct.clone(),
                size: Some(4 << 20),
            },
            512,
        ),
        (
            4,
            Backing::Pmem {
                path: pm.clone(),
                size: 4 << 20,
            },
            4096,
        ),
    ] {
        sub.namespaces.push(NamespaceConfig {
            nsid,
            backing,
            block_size: bs,
        });
    }
    let s = setup_with(provider, sub);
    // The direct file really is open with O_DIRECT, the buffered one is not.
    let flags = open_flags(&direct).expect("the target holds the direct file open");
    assert_ne!(flags & libc::O_DIRECT as u32, 0, "flags {flags:o}");
    let flags = open_flags(&buffered).expect("the target holds the file open");
    assert_eq!(flags & libc::O_DIRECT as u32, 0, "flags {flags:o}");

    let ctrl = s.connect();
    // A buffered file namespace sits behind a volatile write cache.
    assert_ne!(ctrl.identify().vwc & vwc::PRESENT, 0);
    assert_eq!(
        ctrl.get_features(FeatureId::VolatileWriteCache).unwrap() & 1,
        1
    );

    for (nsid, file) in [
        (1, None),
        (2, Some(&buffered)),
        (3, Some(&direct)),
        (4, Some(&pm)),
    ] {
        let ns = ctrl.namespace(nsid).unwrap();
        let bs = ns.block_size as usize;
        let a = pattern(u64::from(nsid), 3 * bs);
        let b = pattern(u64::from(nsid) + 100, bs);
        let c = pattern(u64::from(nsid) + 200, 16 * bs);
        // Odd block numbers: 512-byte blocks of the direct file are not 4 KiB units.
        ctrl.write(&ns, 7, &a, false).unwrap();
        ctrl.write(&ns, 13, &b, true).unwrap();
        ctrl.write(&ns, 64, &c, false).unwrap();
        ctrl.flush(nsid).unwrap();
        let check = |slba: u64, data: &[u8]| {
            let mut back = vec![0u8; data.len()];
            ctrl.read(&ns, slba, &mut back).unwrap();
            assert_eq!(back, data, "ns {nsid} read at {slba}");
            let at = slba * bs as u64;
            let direct_read = s
                .target
                .read_namespace(SUBNQN, nsid, at, data.len())
                .unwrap();
            assert_eq!(direct_read, data, "ns {nsid} back end at {slba}");
            if let Some(f) = file {
                let bytes = std::fs::read(f).unwrap();
                assert_eq!(&bytes[at as usize..][..data.len()], data, "ns {nsid} file");
            }
        };
        check(7, &a);
        check(13, &b);
        check(64, &c);
        // Neighbours of the unaligned writes are untouched (zeros).
        let mut around = vec![0u8; bs];
        ctrl.read(&ns, 6, &mut around).unwrap();
        assert!(around.iter().all(|&x| x == 0), "ns {nsid} block 6");
        ctrl.read(&ns, 10, &mut around).unwrap();
        assert!(around.iter().all(|&x| x == 0), "ns {nsid} block 10");
        // Write Zeroes and deallocate work on every back end.
        ctrl.write_zeroes(&ns, 64, 4, false).unwrap();
        ctrl.deallocate(&ns, &[(68, 4)]).unwrap();
        let mut z = vec![0u8; 8 * bs];
        ctrl.read(&ns, 64, &mut z).unwrap();
        assert!(z.iter().all(|&x| x == 0), "ns {nsid} zeroed");
        check(72, &c[8 * bs..]);
    }
    ctrl.flush(0xFFFF_FFFF).unwrap();
    ctrl.disconnect().unwrap();
    drop(s);
    let _ = std::fs::remove_dir_all(d);
}

over_providers!(backends);

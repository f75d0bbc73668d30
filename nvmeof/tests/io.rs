//! Every I/O command over softroce and tcp, with data checked against the back end.
mod common;
use common::*;

use nvmeof::host::IoRequest;
use nvmeof::target::{Backing, NamespaceConfig, SubsystemConfig};
use nvmeof::wire::StatusCode;

fn io_commands_against_memory_backend(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let t = &s.target;

    // Write (small: in-capsule; large: keyed SGL + RMA read), FUA, read back.
    let small = pattern(2, 1024);
    ctrl.write(&ns, 0, &small, false).unwrap();
    let large = pattern(3, 64 << 10);
    ctrl.write(&ns, 100, &large, true).unwrap();
    assert_eq!(t.read_namespace(SUBNQN, 1, 0, 1024).unwrap(), small);
    assert_eq!(
        t.read_namespace(SUBNQN, 1, 100 * 512, 64 << 10).unwrap(),
        large
    );
    let mut back = vec![0u8; 64 << 10];
    ctrl.read(&ns, 100, &mut back).unwrap();
    assert_eq!(back, large);

    // Read of data written straight into the back end.
    let direct = pattern(4, 2048);
    t.write_namespace(SUBNQN, 1, 4000 * 512, &direct).unwrap();
    let mut back = vec![0u8; 2048];
    ctrl.read(&ns, 4000, &mut back).unwrap();
    assert_eq!(back, direct);

    // Compare: equal, then a mismatch.
    ctrl.compare(&ns, 4000, &direct).unwrap();
    let mut other = direct.clone();
    other[7] ^= 1;
    let e = ctrl.compare(&ns, 4000, &other).unwrap_err();
    assert_eq!(e.status_code(), Some(StatusCode::CompareFailure));

    // Write Zeroes, and with DEAC.
    ctrl.write_zeroes(&ns, 100, 8, false).unwrap();
    assert!(t
        .read_namespace(SUBNQN, 1, 100 * 512, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        t.read_namespace(SUBNQN, 1, 108 * 512, 512).unwrap(),
        large[4096..4608]
    );
    ctrl.write_zeroes(&ns, 108, 8, true).unwrap();
    assert!(t
        .read_namespace(SUBNQN, 1, 108 * 512, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // Dataset Management deallocate, two ranges.
    ctrl.deallocate(&ns, &[(116, 4), (200, 8)]).unwrap();
    assert!(t
        .read_namespace(SUBNQN, 1, 116 * 512, 2048)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(t
        .read_namespace(SUBNQN, 1, 200 * 512, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        t.read_namespace(SUBNQN, 1, 120 * 512, 512).unwrap(),
        large[10240..10752]
    );

    // Verify, Flush.
    ctrl.verify(&ns, 0, 1000).unwrap();
    ctrl.flush(1).unwrap();

    // Copy two source ranges to 6000.
    ctrl.copy(&ns, &[(0, 2), (4000, 4)], 6000).unwrap();
    let copied = t.read_namespace(SUBNQN, 1, 6000 * 512, 3072).unwrap();
    assert_eq!(&copied[..1024], &small[..]);
    assert_eq!(&copied[1024..], &direct[..]);

    // Out-of-range LBAs.
    let last = ns.blocks;
    let e = ctrl
        .write(&ns, last - 1, &pattern(5, 1024), false)
        .unwrap_err();
    assert_eq!(e.status_code(), Some(StatusCode::LbaOutOfRange));
    let mut b = vec![0u8; 512];
    assert_eq!(
        ctrl.read(&ns, last, &mut b).unwrap_err().status_code(),
        Some(StatusCode::LbaOutOfRange)
    );
    assert_eq!(
        ctrl.verify(&ns, u64::MAX, 1).unwrap_err().status_code(),
        Some(StatusCode::LbaOutOfRange)
    );
    assert_eq!(
        ctrl.copy(&ns, &[(last - 1, 2)], 0)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::LbaOutOfRange)
    );
    assert_eq!(
        ctrl.copy(&ns, &[(0, 2)], last - 1)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::LbaOutOfRange)
    );
    assert_eq!(
        ctrl.deallocate(&ns, &[(last, 1)])
            .unwrap_err()
            .status_code(),
        Some(StatusCode::LbaOutOfRange)
    );
    // A namespace that does not exist.
    let mut bad = ns;
    bad.nsid = 7;
    assert_eq!(
        ctrl.read(&bad, 0, &mut b).unwrap_err().status_code(),
        Some(StatusCode::InvalidNamespaceOrFormat)
    );

    // SMART counts what moved.
    let smart = ctrl.smart_log().unwrap();
    assert!(smart.host_writes >= 2 && smart.host_reads >= 2, "{smart:?}");
    assert!(smart.data_units_written >= 1);
    ctrl.disconnect().unwrap();
}

fn several_commands_in_flight(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let writes: Vec<IoRequest> = (0..64)
        .map(|i| IoRequest::Write {
            slba: i * 16,
            data: pattern(100 + i, 8192),
            fua: false,
        })
        .collect();
    for r in ctrl.batch(&ns, &writes) {
        r.unwrap();
    }
    let reads: Vec<IoRequest> = (0..64)
        .map(|i| IoRequest::Read {
            slba: i * 16,
            blocks: 16,
        })
        .collect();
    for (i, r) in ctrl.batch(&ns, &reads).into_iter().enumerate() {
        assert_eq!(r.unwrap(), pattern(100 + i as u64, 8192), "read {i}");
    }
    for i in 0..64u64 {
        assert_eq!(
            s.target
                .read_namespace(SUBNQN, 1, i * 16 * 512, 8192)
                .unwrap(),
            pattern(100 + i, 8192)
        );
    }
}

fn file_namespace_and_flush_all(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "nvmeof-io-{}-{}",
        std::process::id(),
        random_loopback()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ns2.img");
    let mut sub = SubsystemConfig::new(SUBNQN);
    sub.namespaces.push(NamespaceConfig::memory(1, 1 << 20));
    sub.namespaces.push(NamespaceConfig {
        nsid: 2,
        backing: Backing::File {
            path: file.clone(),
            size: Some(8 << 20),
        },
        block_size: 4096,
    });
    let s = setup_with(provider, sub);
    let ctrl = s.connect();
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2]);
    let ns = ctrl.namespace(2).unwrap();
    assert_eq!((ns.block_size, ns.blocks), (4096, 2048));
    let data = pattern(9, 32 << 10);
    ctrl.write(&ns, 10, &data, true).unwrap();
    ctrl.flush(0xFFFF_FFFF).unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(&on_disk[10 * 4096..10 * 4096 + data.len()], &data[..]);
    ctrl.deallocate(&ns, &[(11, 2)]).unwrap();
    let mut back = vec![0u8; 4 * 4096];
    ctrl.read(&ns, 10, &mut back).unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..3 * 4096].iter().all(|&b| b == 0));
    assert_eq!(&back[3 * 4096..], &data[3 * 4096..4 * 4096]);
    ctrl.disconnect().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

over_providers!(
    io_commands_against_memory_backend,
    several_commands_in_flight,
    file_namespace_and_flush_all
);

//! Capsules byte for byte as the Linux kernel's nvme-rdma host builds them, where they
//! differ from what this crate's host sends (found by the VM tier's step
//! nvme-kernel-host: nvme-cli and the kernel host against `nvmeof-target`).
mod common;
use common::*;

use nvmeof::host::Controller;
use nvmeof::wire::{CqeRepr, StatusCode, StatusContext};

fn io_raw(ctrl: &Controller, capsule: &[u8]) -> CqeRepr {
    ctrl.io_queue(0)
        .unwrap()
        .execute_raw(capsule)
        .expect("a response")
}

/// Dataset Management (deallocate) as Linux's `nvme_setup_discard` sends it: NR 0
/// (one range), AD set, and the range list in a buffer sized for 256 ranges (4 KiB,
/// `NVME_DSM_MAX_RANGES`), carried in-capsule (SGL 0x01, offset 0, length 4096).
/// Linux nvmet accepts an SGL longer than NR's ranges (`nvmet_check_data_len_lte`);
/// so must we (it was "Data SGL Length Invalid", and blkdiscard failed).
fn linux_dsm_capsule(slba: u64, nlb: u32, nr_0based: u8) -> Vec<u8> {
    let mut c = vec![0u8; 64 + 4096];
    c[0] = 0x09; // opcode: Dataset Management
    c[1] = 0x40; // PSDT 01b: SGL for data (NVME_CMD_SGL_METABUF)
    c[4..8].copy_from_slice(&1u32.to_le_bytes()); // NSID 1
                                                  // DPTR (bytes 24..40): data block, offset subtype; address = offset 0, length 4096
    c[32..36].copy_from_slice(&4096u32.to_le_bytes());
    c[39] = 0x01;
    c[40] = nr_0based; // CDW10: NR (0's based)
    c[44] = 0x04; // CDW11: AD (deallocate)
                  // Range 0: context attributes 0, NLB, SLBA
    c[64 + 4..64 + 8].copy_from_slice(&nlb.to_le_bytes());
    c[64 + 8..64 + 16].copy_from_slice(&slba.to_le_bytes());
    c
}

fn linux_dsm_with_a_4k_range_buffer(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let data = pattern(60, 16 * 512);
    ctrl.write(&ns, 0, &data, false).unwrap();

    let cqe = io_raw(&ctrl, &linux_dsm_capsule(4, 8, 0));
    assert!(cqe.status.is_success(), "{cqe:?}");
    let back = s.target.read_namespace(SUBNQN, 1, 0, 16 * 512).unwrap();
    assert_eq!(
        back[..4 * 512],
        data[..4 * 512],
        "blocks before the range kept"
    );
    assert!(
        back[4 * 512..12 * 512].iter().all(|&b| b == 0),
        "deallocated blocks read as zeroes (DLFEAT 001b)"
    );
    assert_eq!(
        back[12 * 512..],
        data[12 * 512..],
        "blocks after the range kept"
    );

    // 256 ranges (NR 255) fill the 4 KiB exactly: the zeroed ranges 1..255 (NLB 0)
    // deallocate nothing.
    ctrl.write(&ns, 0, &data, false).unwrap();
    let cqe = io_raw(&ctrl, &linux_dsm_capsule(0, 2, 255));
    assert!(cqe.status.is_success(), "{cqe:?}");
    let back = s.target.read_namespace(SUBNQN, 1, 0, 16 * 512).unwrap();
    assert!(back[..1024].iter().all(|&b| b == 0));
    assert_eq!(back[1024..], data[1024..]);

    // An SGL shorter than NR's ranges is still refused: 2 ranges (32 bytes) in 16.
    let mut short = linux_dsm_capsule(0, 1, 1);
    short[32..36].copy_from_slice(&16u32.to_le_bytes());
    short.truncate(64 + 16);
    let cqe = io_raw(&ctrl, &short);
    assert_eq!(
        cqe.status.code(StatusContext::Io),
        StatusCode::DataSglLengthInvalid
    );
    // As is one whose in-capsule data did not all arrive (4 KiB described, 16 sent).
    let mut cut = linux_dsm_capsule(0, 1, 0);
    cut.truncate(64 + 16);
    let cqe = io_raw(&ctrl, &cut);
    assert_eq!(
        cqe.status.code(StatusContext::Io),
        StatusCode::DataSglLengthInvalid
    );
}

over_providers!(linux_dsm_with_a_4k_range_buffer);

//! Malformed capsules sent raw over softroce and tcp, each answered with the status the
//! NVMe and NVMe-oF specifications (and Linux nvmet) give; the target never panics
//! and keeps serving afterwards.
mod common;
use common::*;

use nvmeof::host::Controller;
use nvmeof::wire::opcodes::{IoCommand, IoOpcode};
use nvmeof::wire::sqe::Dptr;
use nvmeof::wire::{CqeRepr, KeyedSgl, SglRepr, SqeRepr, StatusCode, StatusContext};

fn io_sqe(opcode: IoOpcode, slba: u64, nlb: u16, sgl: SglRepr) -> [u8; 64] {
    let mut sqe = SqeRepr {
        opcode: opcode.into(),
        nsid: 1,
        dptr: Dptr::Sgl(sgl),
        ..Default::default()
    };
    IoCommand {
        slba,
        nlb,
        ..Default::default()
    }
    .apply(&mut sqe);
    sqe.to_bytes()
}

fn null_sgl() -> SglRepr {
    SglRepr::Keyed(KeyedSgl::new(0, 0, 0, false).unwrap())
}

fn io_raw(ctrl: &Controller, capsule: &[u8]) -> CqeRepr {
    ctrl.io_queue(0)
        .unwrap()
        .execute_raw(capsule)
        .expect("a response")
}

fn admin_raw(ctrl: &Controller, capsule: &[u8]) -> CqeRepr {
    ctrl.admin_queue().execute_raw(capsule).expect("a response")
}

fn code(cqe: &CqeRepr, ctx: StatusContext) -> StatusCode {
    assert!(
        cqe.status.dnr || cqe.status.is_success(),
        "failures carry DNR: {cqe:?}"
    );
    cqe.status.code(ctx)
}

fn malformed_capsules_get_the_right_status(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let io = StatusContext::Io;

    // Unknown I/O and admin opcodes.
    let mut b = io_sqe(IoOpcode::Read, 0, 0, null_sgl());
    b[0] = 0x7E;
    assert_eq!(code(&io_raw(&ctrl, &b), io), StatusCode::InvalidOpcode);
    b[0] = 0x06; // Identify is not an I/O command
    assert_eq!(code(&io_raw(&ctrl, &b), io), StatusCode::InvalidOpcode);
    let mut a = SqeRepr {
        opcode: 0xC5,
        dptr: Dptr::Sgl(null_sgl()),
        ..Default::default()
    }
    .to_bytes();
    assert_eq!(
        code(&admin_raw(&ctrl, &a), StatusContext::Admin),
        StatusCode::InvalidOpcode
    );
    // Reserved flag bits, PRP instead of SGL, fused.
    a = io_sqe(IoOpcode::Flush, 0, 0, null_sgl());
    a[1] |= 0x10;
    assert_eq!(code(&io_raw(&ctrl, &a), io), StatusCode::InvalidField);
    a[1] = 0x00; // PSDT 0: PRPs
    assert_eq!(code(&io_raw(&ctrl, &a), io), StatusCode::InvalidField);
    a[1] = 0x41; // fused, first
    assert_eq!(code(&io_raw(&ctrl, &a), io), StatusCode::InvalidField);

    // Bad SGLs: reserved type, segment, non-keyed address data block, length not
    // matching the blocks, in-capsule data for a read, in-capsule past the data sent.
    let mut r = io_sqe(
        IoOpcode::Read,
        0,
        0,
        SglRepr::Keyed(KeyedSgl::new(0, 512, 1, false).unwrap()),
    );
    r[39] = 0x60;
    assert_eq!(
        code(&io_raw(&ctrl, &r), io),
        StatusCode::SglDescriptorTypeInvalid
    );
    let seg = io_sqe(
        IoOpcode::Read,
        0,
        0,
        SglRepr::Segment {
            address: 0,
            length: 16,
        },
    );
    assert_eq!(
        code(&io_raw(&ctrl, &seg), io),
        StatusCode::SglDescriptorTypeInvalid
    );
    let blk = io_sqe(
        IoOpcode::Read,
        0,
        0,
        SglRepr::DataBlock {
            address: 0,
            length: 512,
        },
    );
    assert_eq!(code(&io_raw(&ctrl, &blk), io), StatusCode::InvalidField);
    let short = io_sqe(
        IoOpcode::Read,
        0,
        1,
        SglRepr::Keyed(KeyedSgl::new(0, 512, 1, false).unwrap()),
    );
    assert_eq!(
        code(&io_raw(&ctrl, &short), io),
        StatusCode::DataSglLengthInvalid
    );
    let inl = io_sqe(
        IoOpcode::Read,
        0,
        0,
        SglRepr::InCapsule {
            offset: 0,
            length: 512,
        },
    );
    assert_eq!(code(&io_raw(&ctrl, &inl), io), StatusCode::InvalidField);
    let mut w = io_sqe(
        IoOpcode::Write,
        0,
        0,
        SglRepr::InCapsule {
            offset: 0,
            length: 512,
        },
    )
    .to_vec();
    w.extend_from_slice(&[0xAA; 100]);
    assert_eq!(
        code(&io_raw(&ctrl, &w), io),
        StatusCode::DataSglLengthInvalid
    );
    let off = io_sqe(
        IoOpcode::Write,
        0,
        0,
        SglRepr::InCapsule {
            offset: 8192,
            length: 512,
        },
    );
    assert_eq!(code(&io_raw(&ctrl, &off), io), StatusCode::SglOffsetInvalid);
    // A flush that claims data.
    let fl = io_sqe(
        IoOpcode::Flush,
        0,
        0,
        SglRepr::Keyed(KeyedSgl::new(0, 512, 1, false).unwrap()),
    );
    assert_eq!(
        code(&io_raw(&ctrl, &fl), io),
        StatusCode::DataSglLengthInvalid
    );
    // More than MDTS in one command.
    let big = io_sqe(
        IoOpcode::Read,
        0,
        511,
        SglRepr::Keyed(KeyedSgl::new(0, 512 * 512, 1, false).unwrap()),
    );
    assert_eq!(code(&io_raw(&ctrl, &big), io), StatusCode::InvalidField);
    // Out-of-range LBA, raw.
    let oor = io_sqe(
        IoOpcode::Read,
        NS_BLOCKS,
        0,
        SglRepr::Keyed(KeyedSgl::new(0, 512, 1, false).unwrap()),
    );
    assert_eq!(code(&io_raw(&ctrl, &oor), io), StatusCode::LbaOutOfRange);
    // Copy with a format other than 0.
    let mut cp = SqeRepr {
        opcode: IoOpcode::Copy.into(),
        nsid: 1,
        dptr: Dptr::Sgl(SglRepr::InCapsule {
            offset: 0,
            length: 32,
        }),
        ..Default::default()
    };
    cp.cdw10_15[2] = 1 << 8;
    let mut cpb = cp.to_bytes().to_vec();
    cpb.extend_from_slice(&[0u8; 32]);
    assert_eq!(code(&io_raw(&ctrl, &cpb), io), StatusCode::InvalidField);

    // Fabrics commands on an I/O queue; Connect again on the admin queue.
    let pg = nvmeof::wire::fabrics::FabricsCommand::PropertyGet(Default::default()).to_bytes();
    assert_eq!(
        code(&io_raw(&ctrl, &pg), StatusContext::Fabrics),
        StatusCode::InvalidOpcode
    );
    let mut cmd = nvmeof::wire::fabrics::FabricsCommand::Connect(Default::default())
        .to_bytes()
        .to_vec();
    cmd.extend_from_slice(&[0u8; 1024]);
    assert_eq!(
        code(&admin_raw(&ctrl, &cmd), StatusContext::Fabrics),
        StatusCode::CommandSequenceError
    );

    // Admin: Identify with a reserved CNS, Get Log Page offset past the page.
    let mut id = SqeRepr {
        opcode: 0x06,
        dptr: Dptr::Sgl(SglRepr::Keyed(KeyedSgl::new(0, 4096, 1, false).unwrap())),
        ..Default::default()
    };
    id.cdw10_15[0] = 0x1F;
    assert_eq!(
        code(&admin_raw(&ctrl, &id.to_bytes()), StatusContext::Admin),
        StatusCode::InvalidField
    );
    let mut glp = SqeRepr {
        opcode: 0x02,
        dptr: Dptr::Sgl(SglRepr::Keyed(KeyedSgl::new(0, 512, 1, false).unwrap())),
        ..Default::default()
    };
    nvmeof::wire::log::GetLogPage::for_bytes(nvmeof::wire::log::LogPageId::SmartHealth, 4096, 512)
        .apply(&mut glp);
    assert_eq!(
        code(&admin_raw(&ctrl, &glp.to_bytes()), StatusContext::Admin),
        StatusCode::InvalidField
    );

    // After all that, the controller still works.
    let data = pattern(11, 4096);
    ctrl.write(&ns, 1, &data, false).unwrap();
    let mut back = vec![0u8; 4096];
    ctrl.read(&ns, 1, &mut back).unwrap();
    assert_eq!(back, data);
}

fn bad_key_fails_the_targets_rma_and_touches_nothing(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let before = s.target.read_namespace(SUBNQN, 1, 0, 8192).unwrap();
    // A write whose keyed SGL names a key the host never registered: the target's
    // RMA read is refused. The fabric ends the connection on a refused access; if
    // the queue still stands the command fails with Data Transfer Error.
    let w = io_sqe(
        IoOpcode::Write,
        0,
        15,
        SglRepr::Keyed(KeyedSgl::new(0x1000, 8192, 0xDEAD_BEEF, false).unwrap()),
    );
    match ctrl.io_queue(0).unwrap().execute_raw(&w) {
        Ok(cqe) => assert_eq!(
            cqe.status.code(StatusContext::Io),
            StatusCode::DataTransferError
        ),
        Err(e) => assert!(
            matches!(
                e,
                nvmeof::Error::Disconnected(_)
                    | nvmeof::Error::Timeout(_)
                    | nvmeof::Error::Fabric(_)
            ),
            "{e}"
        ),
    }
    assert_eq!(s.target.read_namespace(SUBNQN, 1, 0, 8192).unwrap(), before);
    // The target lives on: a new controller works.
    let again = s.connect();
    let ns = again.namespace(1).unwrap();
    again.write(&ns, 0, &pattern(12, 512), false).unwrap();
}

over_providers!(
    malformed_capsules_get_the_right_status,
    bad_key_fails_the_targets_rma_and_touches_nothing
);

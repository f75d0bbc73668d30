//! A host and a target exchanging Connect capsules through the wire formats only:
//! the host builds the SQE and in-capsule Connect data, the target parses and
//! validates them and answers with a CQE, the host reads the answer.

use nvmeof::wire::fabrics::{
    ConnectCommand, ConnectData, ConnectResponse, FabricsCommand, InvalidParameterLocation,
};
use nvmeof::wire::text::Nqn;
use nvmeof::wire::{Cqe, CqeRepr, SglRepr, Sqe, Status, StatusCode, StatusContext, WireError};

const SUBNQN: &str = "nqn.2024-01.io.example:disk1";

/// The host side: a 64-byte SQE followed by 1024 bytes of in-capsule data.
fn host_connect_capsule(qid: u16, cntlid: u16, hostnqn: &str) -> Vec<u8> {
    let cmd = FabricsCommand::Connect(ConnectCommand {
        cid: 1,
        sgl: SglRepr::InCapsule {
            offset: 0,
            length: 1024,
        },
        qid,
        sqsize: 31,
        cattr: 0,
        kato: if qid == 0 { 120_000 } else { 0 },
    });
    let mut capsule = vec![0u8; 64 + 1024];
    cmd.emit(&mut Sqe::new_checked(&mut capsule[..]).unwrap());
    // Text that does not fit an NQN is written raw, to exercise the target's checks.
    let data = ConnectData {
        hostid: [7; 16],
        cntlid,
        subnqn: Nqn::new(SUBNQN).unwrap(),
        hostnqn: Nqn::new(hostnqn).unwrap_or_default(),
    };
    data.emit(&mut capsule[64..]).unwrap();
    if Nqn::new(hostnqn).is_err() {
        capsule[64 + 512..64 + 768].copy_from_slice(&hostnqn.as_bytes()[..256]);
    }
    capsule
}

/// The target side: parse, validate, answer with a CQE (controller 0x11).
fn target_answer(capsule: &[u8]) -> [u8; 16] {
    let sqe = Sqe::new_checked(capsule).unwrap();
    let mut cqe = CqeRepr {
        cid: sqe.cid(),
        ..Default::default()
    };
    let fail = |e: WireError, in_data: bool, cqe: &mut CqeRepr| {
        cqe.status = Status::new(e.status().unwrap_or(StatusCode::DataSglLengthInvalid)).with_dnr();
        if let Some(loc) = InvalidParameterLocation::from_error(&e, in_data) {
            cqe.dw0 = loc.to_dw0();
        }
    };
    match FabricsCommand::parse(&sqe) {
        Ok(FabricsCommand::Connect(c)) => {
            let SglRepr::InCapsule { offset, length } = c.sgl else {
                unreachable!("this test sends in-capsule data")
            };
            let data = sqe
                .in_capsule_data()
                .get(offset as usize..offset as usize + length as usize)
                .unwrap_or_default();
            match ConnectData::parse(data).and_then(|d| d.validate().map(|()| d)) {
                Ok(d) if c.qid == 0 && d.cntlid != ConnectData::DYNAMIC_CNTLID => {
                    cqe.status = Status::new(StatusCode::ConnectInvalidParameters).with_dnr();
                    cqe.dw0 = InvalidParameterLocation {
                        in_data: true,
                        offset: 16,
                    }
                    .to_dw0();
                }
                Ok(_) => {
                    cqe.dw0 = ConnectResponse {
                        cntlid: 0x11,
                        authreq: 0,
                    }
                    .to_dw0()
                }
                Err(e) => fail(e, true, &mut cqe),
            }
        }
        Ok(_) => cqe.status = Status::new(StatusCode::InvalidOpcode).with_dnr(),
        Err(e) => fail(e, false, &mut cqe),
    }
    cqe.to_bytes()
}

fn host_reads(cqe: &[u8; 16]) -> CqeRepr {
    CqeRepr::parse(&Cqe::new_checked(&cqe[..]).unwrap()).unwrap()
}

#[test]
fn admin_connect_succeeds_with_controller_id() {
    let capsule = host_connect_capsule(0, 0xFFFF, "nqn.2014-08.org.nvmexpress:uuid:07070707");
    let cqe = host_reads(&target_answer(&capsule));
    assert!(cqe.status.is_success());
    assert_eq!(cqe.cid, 1);
    assert_eq!(ConnectResponse::from_dw0(cqe.dw0).cntlid, 0x11);
}

#[test]
fn admin_connect_with_static_cntlid_points_at_the_field() {
    let capsule = host_connect_capsule(0, 3, "nqn.2014-08.org.nvmexpress:uuid:07070707");
    let cqe = host_reads(&target_answer(&capsule));
    assert_eq!(
        cqe.status.code(StatusContext::Fabrics),
        StatusCode::ConnectInvalidParameters
    );
    assert_eq!(
        InvalidParameterLocation::from_dw0(cqe.dw0),
        InvalidParameterLocation {
            in_data: true,
            offset: 16
        }
    );
}

#[test]
fn unterminated_hostnqn_is_reported_at_offset_512_of_the_data() {
    let capsule = host_connect_capsule(0, 0xFFFF, &"n".repeat(300));
    let cqe = host_reads(&target_answer(&capsule));
    assert!(cqe.status.dnr);
    assert_eq!(
        cqe.status.code(StatusContext::Fabrics),
        StatusCode::ConnectInvalidParameters
    );
    assert_eq!(cqe.dw0, (1 << 16) | 512);
}

#[test]
fn bad_recfmt_and_short_capsule() {
    let mut capsule = host_connect_capsule(1, 0x11, "nqn.2014-08.org.nvmexpress:uuid:07070707");
    capsule[40] = 1;
    let cqe = host_reads(&target_answer(&capsule));
    assert_eq!(
        cqe.status.code(StatusContext::Fabrics),
        StatusCode::ConnectIncompatibleFormat
    );
    assert_eq!(InvalidParameterLocation::from_dw0(cqe.dw0).offset, 40);

    // Data shorter than the SGL says: the target cannot read Connect data.
    let capsule = host_connect_capsule(1, 0x11, "nqn.2014-08.org.nvmexpress:uuid:07070707");
    let cqe = host_reads(&target_answer(&capsule[..64 + 1000]));
    assert_eq!(
        cqe.status.code(StatusContext::Fabrics),
        StatusCode::DataSglLengthInvalid
    );
}

//! Packets built by scapy's `contrib.roce` (an independent ICRC implementation) and a
//! CNP captured on a ConnectX-4 Lx: we must parse every field, compute the same ICRC
//! and re-emit the same bytes. Regenerate with `tests/vectors/gen_vectors.py`.

use std::collections::HashMap;

use fabric_softroce::wire::ext::Syndrome;
use fabric_softroce::wire::frame::{build_frame, Ipv4UdpFrame};
use fabric_softroce::wire::{IcrcContext, Opcode, RocePacket, RoceRepr};

const VECTORS: &str = include_str!("vectors/scapy_vectors.txt");

struct Vector {
    name: String,
    frame: Vec<u8>,
    fields: HashMap<String, String>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn vectors() -> Vec<Vector> {
    VECTORS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split('|');
            let name = parts.next().expect("name").to_string();
            let frame = unhex(parts.next().expect("frame"));
            let fields = parts
                .next()
                .expect("fields")
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    (k.to_string(), v.to_string())
                })
                .collect();
            Vector {
                name,
                frame,
                fields,
            }
        })
        .collect()
}

impl Vector {
    fn num(&self, key: &str) -> Option<u64> {
        self.fields
            .get(key)
            .map(|v| u64::from_str_radix(v, 16).expect("hex field"))
    }
    fn expect(&self, key: &str, got: u64) {
        if let Some(want) = self.num(key) {
            assert_eq!(got, want, "{}: field {key}", self.name);
        }
    }
}

#[test]
fn vector_file_is_complete() {
    let names: Vec<String> = vectors().into_iter().map(|v| v.name).collect();
    for want in [
        "send_only",
        "send_only_imm",
        "write_first",
        "read_request",
        "read_response_only",
        "ack",
        "cmp_swap",
        "ud_send_only",
        "rxe_send_only_id",
        "rxe_write_middle_id",
        "rxe_ack_id",
        "cnp_connectx4lx",
    ] {
        assert!(names.iter().any(|n| n == want), "missing vector {want}");
    }
}

#[test]
fn icrc_matches_scapy_and_hardware() {
    for v in vectors() {
        let f = Ipv4UdpFrame::new_checked(&v.frame[..])
            .unwrap_or_else(|e| panic!("{}: frame: {e}", v.name));
        let info = f.info();
        v.expect("ip_id", u64::from(info.ip_id));
        v.expect("df", u64::from(info.dont_fragment));
        v.expect("ttl", u64::from(info.ttl));
        v.expect("tos", u64::from(info.tos));
        v.expect("sport", u64::from(info.src_port));
        assert_eq!(info.dst_port, 4791);
        // scapy reports the ICRC as the big-endian reading of the trailing bytes;
        // the value is stored little-endian.
        let scapy = u32::try_from(v.num("icrc").expect("icrc")).expect("u32");
        let ours = f.compute_icrc().expect("icrc");
        assert_eq!(ours.to_le_bytes(), scapy.to_be_bytes(), "{}: ICRC", v.name);
        f.verify_icrc()
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        // The context form (what a UDP-socket receiver uses) agrees.
        let ctx = info.icrc_context();
        assert_eq!(ctx.compute(f.udp_payload()), Ok(ours), "{}", v.name);
        // What a UDP-socket receiver does: solve for the ID it cannot see. Every DF
        // frame gives back its own ID (rxe's non-zero ones, the ConnectX-4's CNP);
        // a frame without DF fits no ID under the DF assumption.
        let rxe = IcrcContext::rxe(info.src_ip, info.dst_ip, info.src_port, info.dst_port);
        if info.dont_fragment {
            assert_eq!(
                rxe.solve_ip_id(f.udp_payload()),
                Ok(info.ip_id),
                "{}",
                v.name
            );
            let mut corrupt = f.udp_payload().to_vec();
            let at = corrupt.len() - 5;
            corrupt[at] ^= 0x04;
            assert!(
                rxe.solve_ip_id(&corrupt) != Ok(info.ip_id),
                "{}: a corrupted copy must not verify with the same ID",
                v.name
            );
        } else {
            assert!(rxe.solve_ip_id(f.udp_payload()).is_err(), "{}", v.name);
        }
        if info.ip_id == 0 && info.dont_fragment {
            let rxe = IcrcContext::rxe(info.src_ip, info.dst_ip, info.src_port, info.dst_port);
            assert_eq!(rxe.compute(f.udp_payload()), Ok(ours), "{}", v.name);
        } else {
            let rxe = IcrcContext::rxe(info.src_ip, info.dst_ip, info.src_port, info.dst_port);
            assert!(
                rxe.verify(f.udp_payload()).is_err(),
                "{}: ID/DF are covered",
                v.name
            );
        }
    }
}

#[test]
fn fields_parse_and_emit_reproduces_bytes() {
    for v in vectors() {
        let f = Ipv4UdpFrame::new_checked(&v.frame[..]).expect("frame");
        let roce = f.udp_payload();
        let p = RocePacket::new_checked(roce).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let r = RoceRepr::parse(&p).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        v.expect("opcode", u64::from(r.bth.opcode.0));
        v.expect("dqpn", u64::from(r.bth.dest_qpn));
        v.expect("psn", u64::from(r.bth.psn));
        v.expect("ackreq", u64::from(r.bth.ack_req));
        v.expect("solicited", u64::from(r.bth.solicited));
        v.expect("padcount", u64::from(r.bth.pad_count));
        v.expect("becn", u64::from(r.bth.becn));
        assert_eq!(r.bth.pkey, 0xFFFF, "{}", v.name);
        if let Some(reth) = r.reth {
            v.expect("va", reth.va);
            v.expect("rkey", u64::from(reth.rkey));
            v.expect("dma_len", u64::from(reth.dma_len));
        }
        if let Some(a) = r.atomic_eth {
            v.expect("va", a.va);
            v.expect("rkey", u64::from(a.rkey));
            v.expect("swap_add", a.swap_add);
            v.expect("compare", a.compare);
        }
        if let Some(a) = r.aeth {
            v.expect("syndrome", u64::from(a.syndrome.to_byte()));
            v.expect("msn", u64::from(a.msn));
        }
        if let Some(d) = r.deth {
            v.expect("qkey", u64::from(d.qkey));
            v.expect("src_qpn", u64::from(d.src_qpn));
        }
        if let Some(o) = r.atomic_ack {
            v.expect("orig", o);
        }
        if let Some(i) = r.imm {
            v.expect("imm", u64::from(i));
        }
        for key in ["imm", "va", "syndrome", "qkey", "orig", "swap_add"] {
            if v.fields.contains_key(key) {
                let present = match key {
                    "imm" => r.imm.is_some(),
                    "va" => r.reth.is_some() || r.atomic_eth.is_some(),
                    "syndrome" => r.aeth.is_some(),
                    "qkey" => r.deth.is_some(),
                    "orig" => r.atomic_ack.is_some(),
                    _ => r.atomic_eth.is_some(),
                };
                assert!(present, "{}: header for {key} not parsed", v.name);
            }
        }
        let payload = unhex(v.fields.get("payload").map(String::as_str).unwrap_or(""));
        assert_eq!(p.payload(), &payload[..], "{}: payload", v.name);
        // Emit: same headers + payload + ICRC gives the same UDP payload, and the
        // same IPv4/UDP frame.
        let info = f.info();
        let rebuilt = r.build(&payload, &info.icrc_context()).expect("build");
        assert_eq!(rebuilt, roce, "{}: emit", v.name);
        assert_eq!(
            build_frame(&info, &rebuilt).expect("frame"),
            v.frame,
            "{}",
            v.name
        );
    }
}

#[test]
fn specific_semantics() {
    let all = vectors();
    let get = |n: &str| all.iter().find(|v| v.name == n).expect("vector");
    let cnp = get("cnp_connectx4lx");
    let f = Ipv4UdpFrame::new_checked(&cnp.frame[..]).expect("frame");
    let p = RocePacket::new_checked(f.udp_payload()).expect("cnp");
    assert_eq!(p.opcode(), Opcode::CNP);
    assert!(p.bth().becn());
    assert_eq!(p.icrc(), 0x2A00_FD82);
    let nak = get("rnr_nak");
    let f = Ipv4UdpFrame::new_checked(&nak.frame[..]).expect("frame");
    let r = RoceRepr::parse(&RocePacket::new_checked(f.udp_payload()).expect("p")).expect("r");
    assert_eq!(
        r.aeth.expect("aeth").syndrome,
        Syndrome::RnrNak { timer: 14 }
    );
}

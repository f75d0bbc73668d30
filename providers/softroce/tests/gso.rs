//! UDP segmentation offload (GSO) on send and UDP receive offload (GRO) on receive,
//! through the public fabric API over loopback: RMA writes, RMA reads (whose
//! responses are the server's GSO sends) and a multi-packet SEND arrive intact with
//! GSO on and with it off; the devices' counters show that GSO sends left and GRO
//! super-datagrams arrived (and nothing was dropped as bad); the capture of a GSO run
//! holds segments with IP IDs 1, 2, ... whose ICRCs verify against those IDs, with our
//! parser and with scapy's contrib.roce (`tests/check_pcap.py`) when installed.
//!
//! What the kernel does with a GSO send on a real link (it numbers the datagrams' IP
//! IDs 0, 1, 2, ...) is checked where the kernel splits it: on a veth pair forced to
//! segment in software (BENCHMARKS.md, "softroce profile and tuning") and on the VM
//! tier's TAP against kernel rxe (step softroce-rcpp, every frame checked by scapy).
//! On loopback the kernel hands the super-datagram to the receiving socket whole.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::wire::frame::Ipv4UdpFrame;
use fabric_softroce::{configure_device, device_stats, free_loopback_ip, DeviceConfig};

mod support;

struct Side {
    _fabric: Fabric,
    domain: Domain,
    eq: EventQueue,
    cq: CompletionQueue,
    ep: Endpoint,
}

fn wait_event(mine: &EventQueue, other: &CompletionQueue) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ev) = mine.read().expect("eq read") {
            return ev;
        }
        let _ = other.try_next();
        assert!(Instant::now() < deadline, "no event within 10 s");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A connected pair: server on `sip`, client on `cip`.
fn pair(sip: Ipv4Addr, cip: Ipv4Addr) -> (Side, Side, PassiveEndpoint) {
    let caps = Caps::MSG | Caps::RMA;
    let (s, pep, port) = support::server(sip, caps);
    let c = support::client(cip, &sip.to_string(), port, caps);
    let cep = c.endpoint(&c.info);
    cep.connect(b"").unwrap();
    let req = match wait_event(&s.eq, &c.cq) {
        Event::ConnRequest(r) => r,
        other => panic!("server: {other:?}"),
    };
    let sep = s.endpoint(&req.info);
    sep.accept(b"").unwrap();
    assert!(matches!(wait_event(&c.eq, &s.cq), Event::Connected { .. }));
    assert!(matches!(wait_event(&s.eq, &c.cq), Event::Connected { .. }));
    let server = Side {
        _fabric: s.fabric,
        domain: s.domain,
        eq: s.eq,
        cq: s.cq,
        ep: sep,
    };
    let client = Side {
        _fabric: c.fabric,
        domain: c.domain,
        eq: c.eq,
        cq: c.cq,
        ep: cep,
    };
    (server, client, pep)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The next completion on `mine` (the other side's queue is read too, so both
/// devices make progress), successful.
fn next(mine: &CompletionQueue, other: &CompletionQueue) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = mine.try_next().expect("cq read") {
            assert!(c.is_ok(), "{c:?}");
            return c;
        }
        if let Some(c) = other.try_next().expect("cq read") {
            assert!(c.is_ok(), "other side: {c:?}");
        }
        assert!(Instant::now() < deadline, "no completion within 30 s");
    }
}

/// Moves 4 MiB of writes, 2 MiB of reads and a 256 KiB SEND between two fresh
/// devices with GSO `on` or off (capturing the client's frames to `pcap`), checks
/// every byte, and returns both devices' counters.
fn exchange(
    on: bool,
    pcap: Option<PathBuf>,
) -> (fabric_softroce::DeviceStats, fabric_softroce::DeviceStats) {
    let sip = free_loopback_ip().unwrap();
    let cip = loop {
        let c = free_loopback_ip().unwrap();
        if c != sip {
            break c;
        }
    };
    configure_device(
        sip,
        DeviceConfig {
            gso: Some(on),
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    configure_device(
        cip,
        DeviceConfig {
            gso: Some(on),
            pcap,
            ..DeviceConfig::default()
        },
    )
    .unwrap();
    let (server, client, _pep) = pair(sip, cip);
    let start = Instant::now();
    const MIB: usize = 1 << 20;
    let target = server
        .domain
        .alloc(4 * MIB, Access::REMOTE | Access::LOCAL)
        .unwrap();
    let src = client
        .domain
        .alloc(4 * MIB, Access::SEND | Access::WRITE | Access::READ)
        .unwrap();
    // Writes: 1 MiB each (256 packets at MTU 4096), then one of an odd length whose
    // last packet is shorter than the rest of its GSO group.
    for i in 0..4 {
        src.write_at(i * MIB, &pattern(i as u64 + 1, MIB)).unwrap();
    }
    for i in 0..4 {
        let len = if i == 3 { MIB - 1000 } else { MIB };
        client
            .ep
            .write(
                src.iov(i * MIB, len),
                target.remote().iov((i * MIB) as u64, len),
                i as u64,
            )
            .unwrap();
    }
    for i in 0..4 {
        assert_eq!(next(&client.cq, &server.cq).context, i);
    }
    for i in 0..4 {
        let len = if i == 3 { MIB - 1000 } else { MIB };
        assert!(
            target.to_vec(i * MIB, len).unwrap() == pattern(i as u64 + 1, MIB)[..len],
            "written bytes of write {i} (gso {on})"
        );
    }
    // Reads: the server's READ responses are its GSO sends.
    target.write_at(0, &pattern(77, 2 * MIB)).unwrap();
    client
        .ep
        .read(src.iov(0, 2 * MIB), target.remote().iov(0, 2 * MIB), 10)
        .unwrap();
    assert_eq!(next(&client.cq, &server.cq).context, 10);
    assert!(
        src.to_vec(0, 2 * MIB).unwrap() == pattern(77, 2 * MIB),
        "read bytes (gso {on})"
    );
    // A multi-packet SEND (SEND FIRST/MIDDLE/LAST in GSO groups).
    let rx = server.domain.alloc(256 << 10, Access::RECV).unwrap();
    server.ep.recv(rx.full(), 20).unwrap();
    src.write_at(0, &pattern(99, 256 << 10)).unwrap();
    client.ep.send(src.iov(0, 256 << 10), 21).unwrap();
    let mut got = [false; 2];
    while !(got[0] && got[1]) {
        if let Some(c) = server.cq.try_next().unwrap() {
            assert!(c.is_ok() && c.context == 20 && c.len == 256 << 10, "{c:?}");
            got[0] = true;
        }
        if let Some(c) = client.cq.try_next().unwrap() {
            assert!(c.is_ok() && c.context == 21, "{c:?}");
            got[1] = true;
        }
    }
    assert!(rx.to_vec(0, 256 << 10).unwrap() == pattern(99, 256 << 10));
    let _ = (&server.eq, &client.eq);
    println!("gso {on}: exchange took {:?}", start.elapsed());
    (device_stats(sip).unwrap(), device_stats(cip).unwrap())
}

fn pcap_frames(pcap: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push(&pcap[at + 16..at + 16 + len]);
        at += 16 + len;
    }
    out
}

#[test]
fn gso_and_gro_carry_writes_reads_and_sends() {
    let path = std::env::temp_dir().join(format!("softroce-gso-{}.pcap", std::process::id()));
    let (srv, cli) = exchange(true, Some(path.clone()));
    println!("GSO on: server {srv:?}\nclient {cli:?}");
    // This kernel has UDP_SEGMENT and UDP_GRO (Linux 4.18 / 5.0): both were used.
    assert!(cli.gso_sends > 0, "the client's writes left as GSO sends");
    assert!(
        srv.gso_sends > 0,
        "the server's READ responses left as GSO sends"
    );
    assert!(
        srv.gro_packets > 0,
        "the server received GRO super-datagrams"
    );
    assert!(
        cli.gro_packets > 0,
        "the client received GRO super-datagrams"
    );
    assert_eq!((srv.bad_packets, cli.bad_packets), (0, 0));
    assert_eq!((srv.wrong_source, cli.wrong_source), (0, 0));

    // The capture: every frame's ICRC verifies against the IP ID it was sent with,
    // and GSO segments carry IDs 1, 2, ... (their position in the GSO send).
    let pcap = std::fs::read(&path).expect("capture written");
    let frames = pcap_frames(&pcap);
    let mut max_id = 0u16;
    for f in &frames {
        let f = Ipv4UdpFrame::new_checked(*f).expect("IPv4/UDP");
        f.verify_icrc().expect("ICRC against the frame's own IP ID");
        max_id = max_id.max(f.info().ip_id);
    }
    assert!(frames.len() > 1000, "{} frames", frames.len());
    assert!(max_id >= 8, "GSO segments numbered up to {max_id}");
    let has_scapy = Command::new("python3")
        .args(["-c", "import scapy.contrib.roce"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_scapy {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/check_pcap.py");
        let out = Command::new("python3")
            .arg(script)
            .arg(&path)
            .arg(frames.len().to_string())
            .output()
            .expect("run check_pcap.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "scapy rejected the capture: {stdout}");
        assert!(stdout.contains(&format!("checked {} frames, 0 bad", frames.len())));
    } else {
        println!("SKIP scapy check: python3 with scapy not available (pip install scapy)");
    }
    let _ = std::fs::remove_file(&path);

    let (srv, cli) = exchange(false, None);
    println!("GSO off: server {srv:?}\nclient {cli:?}");
    assert_eq!((srv.gso_sends, cli.gso_sends), (0, 0));
    assert_eq!((srv.gro_packets, cli.gro_packets), (0, 0));
    assert_eq!((srv.bad_packets, cli.bad_packets), (0, 0));
}

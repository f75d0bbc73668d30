//! One device shared by several processes (issue 10, item 4): four client processes
//! all open softroce on the *same* address and each runs its own connection to a
//! server (this process, on another address): messages both ways, RMA writes and
//! reads, data verified. The server's device sends every packet for the clients' address
//! to `<ip>:4791`, one UDP flow, which the kernel hands to one of the four processes'
//! sockets; that process passes the packets for the other processes' QPs on (their
//! QPNs say whose they are), so at least one client must report forwarded packets.
//!
//! Children are this test binary run again with `SHARED_DEVICE_CHILD` set (as
//! `rdm/tests/mesh.rs` does); bounded in time.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_softroce::{configure_device, device_stats, DeviceConfig};

mod support;
use support::*;

const CHILDREN: usize = 4;
const ROUNDS: usize = 50;
const T: Duration = Duration::from_secs(20);

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (seed as u8).wrapping_mul(7) ^ (i >> 8) as u8)
        .collect()
}

/// The next completion, sleeping until it comes (five busy-polling processes would
/// fight over the cores; a sleeper is woken by its device's sockets).
fn next(cq: &CompletionQueue) -> Completion {
    let c = cq.wait(T).expect("a completion in time");
    assert!(c.status.is_ok(), "{c:?}");
    c
}

fn event(eq: &EventQueue) -> Event {
    let end = Instant::now() + T;
    loop {
        if let Some(ev) = eq.read().unwrap() {
            return ev;
        }
        assert!(Instant::now() < end, "no event in {T:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One client process: connects from `SHARED_CLIENT_IP` (shared with the others) to
/// the server, then for each round receives the server's message, echoes it, and
/// answers its RMA: the server writes into and reads from this side's region.
#[test]
#[ignore]
fn shared_device_child() {
    let Ok(id) = std::env::var("SHARED_DEVICE_CHILD") else {
        return;
    };
    let id: usize = id.parse().unwrap();
    let c_ip: Ipv4Addr = std::env::var("SHARED_CLIENT_IP").unwrap().parse().unwrap();
    let server: String = std::env::var("SHARED_SERVER").unwrap();
    let (s_ip, port) = server.split_once(':').unwrap();
    let side = client(c_ip, s_ip, port.parse().unwrap(), Caps::MSG | Caps::RMA);
    let (dom, eq, cq) = (&side.domain, &side.eq, &side.cq);
    let ep = side.endpoint(&side.info);
    let region = dom
        .alloc(
            64 << 10,
            Access::LOCAL | Access::REMOTE_READ | Access::REMOTE_WRITE,
        )
        .unwrap();
    region.write_at(0, &pattern(id + 100, 64 << 10)).unwrap();
    let buf = dom.alloc(4096, Access::LOCAL).unwrap();
    ep.recv(buf.iov(0, 4096), 1).unwrap();
    // The connection data carries this side's region, for the server's RMA.
    let mut data = (id as u64).to_le_bytes().to_vec();
    data.extend_from_slice(&region.remote().to_bytes());
    ep.connect(&data).unwrap();
    assert!(matches!(event(eq), Event::Connected { .. }));
    let mut round = 0;
    while round < ROUNDS {
        let c = next(cq);
        if !c.flags.contains(CompFlags::RECV) {
            continue; // an echo's send completion
        }
        let len = c.len;
        assert_eq!(
            buf.to_vec(0, len).unwrap(),
            pattern(id * 1000 + round, len),
            "child {id} round {round}: message differs"
        );
        // The server sends the next message only once this echo has arrived, so the
        // buffer can take the next receive while the echo leaves from it.
        ep.recv(buf.iov(0, 4096), 1).unwrap();
        ep.send(buf.iov(0, len), 2).unwrap();
        round += 1;
    }
    // The server's last write is in this side's region.
    let end = Instant::now() + T;
    let want = pattern(id + 500, 32 << 10);
    while region.to_vec(32 << 10, 32 << 10).unwrap() != want {
        let _ = cq.try_next();
        assert!(
            Instant::now() < end,
            "child {id}: the server's write never landed"
        );
    }
    let st = device_stats(c_ip).unwrap();
    println!(
        "SHARED-CHILD {id} forwarded {} forwarded_in {} unknown_qp {} bad {} wrong_source {}",
        st.forwarded, st.forwarded_in, st.unknown_qp, st.bad_packets, st.wrong_source
    );
    assert_eq!(st.bad_packets, 0, "{st:?}");
    // Stay until the server says it is done (its last ACKs come through this device).
    let end = Instant::now() + T;
    while !matches!(eq.read().unwrap(), Some(Event::Shutdown { .. })) {
        let _ = cq.try_next();
        assert!(
            Instant::now() < end,
            "child {id}: no Shutdown from the server"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    println!("SHARED-OK {id}");
}

#[test]
fn four_processes_share_one_device_address() {
    let ips = addrs(2, false);
    let (s_ip, c_ip) = (ips[0], ips[1]);
    configure_device(s_ip, DeviceConfig::default()).unwrap();
    let (server, _pep, port) = server(s_ip, Caps::MSG | Caps::RMA);
    let (dom, eq, cq) = (&server.domain, &server.eq, &server.cq);

    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..CHILDREN)
        .map(|id| {
            Command::new(&exe)
                .args(["--ignored", "--exact", "shared_device_child", "--nocapture"])
                .env("SHARED_DEVICE_CHILD", id.to_string())
                .env("SHARED_CLIENT_IP", c_ip.to_string())
                .env("SHARED_SERVER", format!("{s_ip}:{port}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a child")
        })
        .collect();

    // Accept the four; each names itself and its region in the connection data.
    let mut eps: Vec<Option<(Endpoint, RemoteMr)>> = (0..CHILDREN).map(|_| None).collect();
    let (mut accepted, mut connected) = (0, 0);
    while accepted < CHILDREN || connected < CHILDREN {
        match event(eq) {
            Event::ConnRequest(req) => {
                let id = u64::from_le_bytes(req.data[..8].try_into().unwrap()) as usize;
                let remote = RemoteMr::from_bytes(&req.data[8..]).unwrap();
                let ep = dom
                    .endpoint(&req.info, EndpointConfig::new(cq, eq))
                    .unwrap();
                ep.accept(b"").unwrap();
                eps[id] = Some((ep, remote));
                accepted += 1;
            }
            Event::Connected { .. } => connected += 1,
            other => panic!("server: {other:?}"),
        }
    }
    let t0 = Instant::now();
    eprintln!("server: {CHILDREN} connected");
    let eps: Vec<(Endpoint, RemoteMr)> = eps.into_iter().map(Option::unwrap).collect();
    let tx = dom.alloc(CHILDREN * 4096, Access::LOCAL).unwrap();
    let rx = dom.alloc(CHILDREN * 4096, Access::LOCAL).unwrap();
    let rma = dom.alloc(CHILDREN * (64 << 10), Access::LOCAL).unwrap();
    for round in 0..ROUNDS {
        let len = 1 + (round * 97) % 4096;
        for (id, (ep, _)) in eps.iter().enumerate() {
            ep.recv(rx.iov(id * 4096, 4096), 100 + id as u64).unwrap();
            tx.write_at(id * 4096, &pattern(id * 1000 + round, len))
                .unwrap();
            ep.send(tx.iov(id * 4096, len), id as u64).unwrap();
        }
        let mut echoes = 0;
        while echoes < CHILDREN {
            let c = next(cq);
            if c.flags.contains(CompFlags::RECV) {
                let id = (c.context - 100) as usize;
                assert_eq!(c.len, len);
                assert_eq!(
                    rx.to_vec(id * 4096, len).unwrap(),
                    pattern(id * 1000 + round, len),
                    "echo from child {id}, round {round}"
                );
                echoes += 1;
            }
        }
    }
    eprintln!("server: {ROUNDS} rounds in {:?}", t0.elapsed());
    // RMA: read each child's first 32 KiB, write its second 32 KiB.
    for (id, (ep, remote)) in eps.iter().enumerate() {
        ep.read(
            rma.iov(id * (64 << 10), 32 << 10),
            remote.iov(0, 32 << 10),
            300 + id as u64,
        )
        .unwrap();
        rma.write_at(id * (64 << 10) + (32 << 10), &pattern(id + 500, 32 << 10))
            .unwrap();
        ep.write(
            rma.iov(id * (64 << 10) + (32 << 10), 32 << 10),
            remote.iov(32 << 10, 32 << 10),
            400 + id as u64,
        )
        .unwrap();
    }
    // The RMA completions (300.. reads, 400.. writes); the last round's send
    // completions may come in between.
    let mut done = 0;
    while done < 2 * CHILDREN {
        if (300..500).contains(&next(cq).context) {
            done += 1;
        }
    }
    for id in 0..CHILDREN {
        assert_eq!(
            rma.to_vec(id * (64 << 10), 32 << 10).unwrap(),
            pattern(id + 100, 64 << 10)[..32 << 10],
            "RMA read from child {id}"
        );
    }
    eprintln!("server: RMA done at {:?}", t0.elapsed());
    for (ep, _) in &eps {
        ep.shutdown().unwrap();
    }

    let mut forwarded = 0u64;
    let end = Instant::now() + T;
    for (id, mut c) in children.drain(..).enumerate() {
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = c.kill();
                break c.wait().unwrap();
            }
            let _ = cq.try_next();
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            status.success() && stdout.contains(&format!("SHARED-OK {id}")),
            "child {id}: {status:?}\n{stdout}\n{stderr}"
        );
        for line in stdout.lines().filter(|l| l.starts_with("SHARED-CHILD")) {
            eprintln!("{line}");
            let f: Vec<&str> = line.split_whitespace().collect();
            forwarded += f[3].parse::<u64>().unwrap();
        }
    }
    eprintln!("server: children ended at {:?}", t0.elapsed());
    assert!(
        forwarded > 0,
        "no child passed packets on: were the four really on one address?"
    );
}

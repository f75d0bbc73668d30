//! Eight processes on loopback form an all-to-all RDM mesh, each through one address
//! vector: every process sends every other tagged messages of 1 B to 4 MiB (eager
//! and rendezvous) whose data the receiver verifies, and increments one counter in
//! process 0 with fetch-add 10,000 times; the final value must be exact.
//!
//! The test re-runs its own binary as the children (the ignored test `mesh_child`,
//! selected by `--ignored --exact`), which exchange their endpoint names through
//! files in a fresh directory. Every wait is bounded; children that outlive the
//! deadline are killed by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric_core::*;
use fabric_rdm::*;

const N: usize = 8;
const ADDS: u64 = 10_000;
const SIZES: [usize; 8] = [1, 64, 4096, 8192, 8193, 65_536, 1 << 20, 4 << 20];
const DEADLINE: Duration = Duration::from_secs(240);
const T: Duration = Duration::from_secs(60);

fn run_mesh(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "fabric-rdm-mesh-{}-{provider}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = (0..N)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "mesh_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RDM_MESH_RANK", rank.to_string())
                .env("RDM_MESH_DIR", &dir)
                .env("RDM_MESH_PROVIDER", provider)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a child")
        })
        .collect();
    let start = Instant::now();
    let mut status = [None; N];
    while status.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().unwrap();
            }
        }
        if start.elapsed() > DEADLINE {
            for (i, c) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    let _ = c.kill();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut report = String::new();
    let mut ok = true;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ok &= out.status.success() && stdout.contains("MESH-OK");
        let tail = |t: &str| {
            let lines: Vec<&str> = t
                .lines()
                .filter(|l| l.contains("MESH") || l.contains("panicked") || !l.starts_with(' '))
                .collect();
            lines[lines.len().saturating_sub(6)..].join("\n")
        };
        report.push_str(&format!(
            "--- rank {i}: {:?}\n{}\n{}",
            out.status,
            tail(&stdout),
            if out.status.success() {
                String::new()
            } else {
                tail(&stderr)
            }
        ));
        report.push('\n');
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{report}");
    assert!(
        ok,
        "{provider}: the mesh failed after {:?}\n{report}",
        start.elapsed()
    );
    assert!(
        report.contains(&format!("MESH-COUNTER {}", ADDS * N as u64)),
        "{report}"
    );
    println!("{provider}: mesh of {N} processes in {:?}", start.elapsed());
}

/// One mesh at a time: two at once put 16 processes (and their progress threads) on
/// the small machines this runs on, where softroce's transport then gave up on a
/// starved connection once ("connection lost" during a 4 MiB rendezvous).
static ONE_MESH_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn eight_process_mesh_tcp() {
    let _g = ONE_MESH_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run_mesh("tcp");
}

#[test]
fn eight_process_mesh_softroce() {
    let _g = ONE_MESH_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run_mesh("softroce");
}

fn wait_file(p: &Path) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
        assert!(start.elapsed() < T, "no {}", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn publish(dir: &Path, name: &str, data: &[u8]) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn fill(rank: usize, to: usize, k: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ (rank as u8 * 16 + to as u8) ^ (k as u8).wrapping_mul(37))
        .collect()
}

fn ok(ep: &RdmEndpoint) -> RdmCompletion {
    let c = ep.wait(T).expect("completion");
    assert!(c.status.is_ok(), "{c:?}");
    c
}

/// One process of the mesh (run by `run_mesh`; does nothing on its own).
#[test]
#[ignore]
fn mesh_child() {
    let Ok(rank) = std::env::var("RDM_MESH_RANK") else {
        return;
    };
    let rank: usize = rank.parse().unwrap();
    let dir = PathBuf::from(std::env::var("RDM_MESH_DIR").unwrap());
    let provider = std::env::var("RDM_MESH_PROVIDER").unwrap();
    let ip = if provider == "softroce" {
        let ip = fabric_softroce::free_loopback_ip().unwrap();
        fabric_softroce::configure_device(ip, fabric_softroce::DeviceConfig::default()).unwrap();
        ip.to_string()
    } else {
        "127.0.0.1".into()
    };
    let reg = Registry::new()
        .with(fabric_tcp::provider())
        .with(fabric_softroce::provider());
    let hints = Hints::new()
        .ep_type(EpType::Rdm)
        .caps(Caps::TAGGED | Caps::ATOMIC)
        .provider(&provider)
        .node(&ip)
        .service(0)
        .source(true);
    let info = fabric_rdm::getinfo(&reg, &hints).unwrap().remove(0);
    let fabric = Fabric::open(info.msg()).unwrap();
    let domain = fabric.domain(info.msg()).unwrap();
    let av = AddressVector::open(&domain, AvAttr::default()).unwrap();
    let ep = RdmEndpoint::open(&domain, &info, &av, RdmAttr::default()).unwrap();
    let counter = domain.alloc(8, Access::LOCAL | Access::REMOTE).unwrap();
    if rank == 0 {
        ep.bind_mr(&counter).unwrap();
        publish(&dir, "counter", &counter.remote().to_bytes());
    }
    publish(&dir, &format!("name{rank}"), &ep.name());
    let to: Vec<FiAddr> = (0..N)
        .map(|j| {
            av.insert(&wait_file(&dir.join(format!("name{j}"))))
                .unwrap()
        })
        .collect();
    let remote = RemoteMr::from_bytes(&wait_file(&dir.join("counter"))).unwrap();
    let max = *SIZES.last().unwrap();
    let send = domain
        .alloc(max, Access::LOCAL | Access::REMOTE_READ)
        .unwrap();
    let recv = domain.alloc(max * N, Access::LOCAL).unwrap();
    // Tagged all-to-all, size by size.
    for (k, &len) in SIZES.iter().enumerate() {
        for j in (0..N).filter(|&j| j != rank) {
            ep.trecv(
                recv.iov(j * max, len),
                Some(to[j]),
                (k << 8 | j) as u64,
                0,
                j as u64,
            )
            .unwrap();
        }
        let mut got = std::collections::HashSet::new();
        for j in (0..N).filter(|&j| j != rank) {
            // One send buffer: refill it per destination once the previous send is done.
            send.write_at(0, &fill(rank, j, k, len)).unwrap();
            ep.tsend(
                send.iov(0, len),
                to[j],
                (k << 8 | rank) as u64,
                1000 + j as u64,
            )
            .unwrap();
            loop {
                let c = ok(&ep);
                if c.kind == OpKind::TaggedSend {
                    break;
                }
                check_recv(&recv, &c, rank, k, len, max);
                got.insert(c.context);
            }
        }
        while got.len() < N - 1 {
            let c = ok(&ep);
            check_recv(&recv, &c, rank, k, len, max);
            got.insert(c.context);
        }
    }
    println!("MESH rank {rank}: all-to-all verified");
    // Fetch-add from every process, a window of 32 in flight.
    let window = 32usize;
    let res = domain.alloc(8 * window, Access::LOCAL).unwrap();
    let (mut posted, mut completed) = (0u64, 0u64);
    while completed < ADDS {
        while posted < ADDS && posted - completed < window as u64 {
            let slot = (posted % window as u64) as usize;
            ep.fetch_atomic(
                AtomicOp::Sum,
                Datatype::U64,
                &1u64.to_le_bytes(),
                res.iov(slot * 8, 8),
                to[0],
                remote.iov(0, 8),
                posted,
            )
            .unwrap();
            posted += 1;
        }
        let c = ok(&ep);
        assert_eq!(c.kind, OpKind::Atomic);
        completed += 1;
    }
    println!("MESH rank {rank}: {ADDS} fetch-adds done");
    // Barrier at rank 0, then its verdict.
    let flag = domain.alloc(8 * N, Access::LOCAL).unwrap();
    if rank == 0 {
        for (j, &peer) in to.iter().enumerate().skip(1) {
            ep.trecv(flag.iov(j * 8, 8), Some(peer), u64::MAX, 0, 5000 + j as u64)
                .unwrap();
        }
        let mut n = 0;
        while n < N - 1 {
            let c = ok(&ep);
            if c.kind == OpKind::TaggedRecv {
                n += 1;
            }
        }
        let v = u64::from_le_bytes(counter.to_vec(0, 8).unwrap().try_into().unwrap());
        // Which path the fetch-adds took: softroce executes u64 fetch-add natively
        // (RC FETCH_ADD, coherent with CPU atomics; the layer at rank 0 executes
        // none), tcp through the layer.
        let emulated = ep.atomics_executed();
        println!("MESH-COUNTER {v} (executed by rank 0's layer: {emulated})");
        assert_eq!(v, ADDS * N as u64);
        let want = if provider == "softroce" {
            0
        } else {
            ADDS * N as u64
        };
        assert_eq!(
            emulated, want,
            "{provider}: atomics executed by rank 0's layer"
        );
        for (j, &peer) in to.iter().enumerate().skip(1) {
            ep.tsend(flag.iov(0, 8), peer, u64::MAX - 1, 6000 + j as u64)
                .unwrap();
        }
        let mut n = 0;
        while n < N - 1 {
            if ok(&ep).kind == OpKind::TaggedSend {
                n += 1;
            }
        }
        publish(&dir, "done", b"1");
    } else {
        ep.trecv(flag.iov(8, 8), Some(to[0]), u64::MAX - 1, 0, 7000)
            .unwrap();
        ep.tsend(flag.iov(0, 8), to[0], u64::MAX, 7001).unwrap();
        let mut n = 0;
        while n < 2 {
            ok(&ep);
            n += 1;
        }
        // Stay connected until rank 0 has its send completions: an RC send completes
        // at the sender when the receiver's ACK arrives, and a receiver that exits
        // right after its receive completed can close the connection before a lost
        // or late ACK was repeated (rank 0 then saw "connection ended", once, in CI).
        wait_file(&dir.join("done"));
    }
    println!("MESH-OK rank {rank}");
}

fn check_recv(
    recv: &MemoryRegion,
    c: &RdmCompletion,
    rank: usize,
    k: usize,
    len: usize,
    max: usize,
) {
    assert_eq!(c.kind, OpKind::TaggedRecv, "{c:?}");
    let j = c.context as usize;
    assert_eq!(c.tag, (k << 8 | j) as u64);
    assert_eq!(c.len, len);
    let got = recv.to_vec(j * max, len).unwrap();
    assert!(
        got == fill(j, rank, k, len),
        "rank {rank}: {len} bytes from {j} differ"
    );
}

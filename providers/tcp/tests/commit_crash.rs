//! Crash test of COMMIT_COMPLETE: a target in a separate OS process is killed with
//! SIGKILL at random moments while an initiator streams COMMIT writes into it; after
//! every kill, every write whose COMMIT completed must be in the target's files.
//!
//! # How it runs
//! The target is this test binary itself, re-executed with `--exact crash_target` and
//! the environment variable [`TARGET_ENV`] naming the working directory; without that
//! variable `crash_target` does nothing. The target exposes two regions, both
//! registered `PMEM`, and prints `FABRIC_CRASH_TARGET_PORT <port>` on stdout:
//! - a [`VolatileCache`]: private heap memory (a volatile "cache", lost at SIGKILL) whose
//!   `persist` pwrite()s the range to `cache.bin` (the "persistence domain"). A byte is
//!   in that file only if persist ran for it, so a missing or early ACK (before persist)
//!   loses acknowledged data and fails the test. (A plain `MAP_SHARED` file mapping
//!   alone could not show that: every store into it survives SIGKILL, persisted or not.)
//! - a real `pmem::Mapping` of `mapping.bin`, registered `PMEM | UNCACHED`, so the
//!   production path (non-temporal placement, msync) is driven under crashes too.
//!
//! The initiator, in the test process, keeps up to [`WINDOW`] COMMIT writes in flight,
//! of sizes from 1 B to 256 KiB (log-uniform), each to a slot no other in-flight write
//! uses, with random contents. A write whose completion is successful becomes the
//! expected contents of its slot; one that fails (the connection died) makes the slot
//! unknown until the next successful write. The target is killed by PID
//! (`libc::kill(pid, SIGKILL)`) 0 to 15 ms after the connection is up, reaped, and the
//! files are read back and compared with every expected slot.
//!
//! # Scale
//! Release builds (CI runs `cargo test --workspace --release`) do [`KILLS_RELEASE`]
//! kills, about 17 s on a loaded 2-core machine (about 80,000 COMMIT writes acked);
//! debug builds are scaled down to [`KILLS_DEBUG`] kills (a few seconds).
//!
//! # It can fail
//! Breaking the provider on purpose was caught at once, both ways, in the first rounds:
//! skipping the persist (an acked 11 B write missing from `cache.bin`), and sending the
//! ACK before persisting (an acked 95,910 B write whose tail was missing). `FABRIC_CRASH_KILLS` overrides the count and `FABRIC_CRASH_SEED` the
//! random seed (printed at the start, so a failure can be replayed). The whole run is
//! bounded by [`RUN_LIMIT`]; a run that cannot finish its kills in that time fails.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::volatile_cache::VolatileCache;
use fabric_core::*;
use rand::{Rng, SeedableRng};

/// Names the target's working directory; set only in the re-executed target.
const TARGET_ENV: &str = "FABRIC_TCP_CRASH_TARGET_DIR";
/// Kills in a release build.
const KILLS_RELEASE: usize = 1000;
/// Kills in a debug build.
const KILLS_DEBUG: usize = 200;
/// Upper bound of the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(170);
/// Bytes per slot: the largest write.
const SLOT: usize = 256 << 10;
/// Slots per region.
const SLOTS: usize = 32;
/// Region (and file) length.
const LEN: usize = SLOT * SLOTS;
/// COMMIT writes in flight at once.
const WINDOW: usize = 8;
/// Longest time from connection to kill.
const MAX_KILL_DELAY_US: u64 = 15_000;
/// How long the target lives at most (it is normally killed within milliseconds).
const TARGET_LIFETIME: Duration = Duration::from_secs(60);
/// Bound of every single wait.
const STEP: Duration = Duration::from_secs(10);
const PORT_LINE: &str = "FABRIC_CRASH_TARGET_PORT ";
const FILES: [&str; 2] = ["cache.bin", "mapping.bin"];

fn registry() -> Registry {
    Registry::new().with(fabric_tcp::provider())
}

fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA | Caps::RMA_PMEM)
        .ep_type(EpType::Msg)
        .provider("tcp")
}

/// The target half: only acts when re-executed by [`acked_commits_survive_sigkill`].
#[test]
fn crash_target() {
    let Some(dir) = std::env::var_os(TARGET_ENV) else {
        return;
    };
    if let Err(e) = run_target(Path::new(&dir)) {
        eprintln!("crash target: {e}");
        std::process::exit(2);
    }
    std::process::exit(0);
}

fn run_target(dir: &Path) -> Result<()> {
    let started = Instant::now();
    let info = registry()
        .getinfo(
            &hints()
                .source(true)
                .node("127.0.0.1")
                .service(0)
                .progress(Progress::Auto),
        )
        .map_err(|e| Error::new(ErrorKind::NoData, e.to_string()))?
        .remove(0);
    let fabric = Fabric::open(&info)?;
    let domain = fabric.domain(&info)?;
    let eq = fabric.eq(EqAttr::default())?;
    let cq = domain.cq(CqAttr::default())?;
    let cache = VolatileCache::open(&dir.join(FILES[0]), LEN)?;
    let a = domain.register(cache, Access::REMOTE_WRITE, MrFlags::PMEM)?;
    let map = pmem::Mapping::open(dir.join(FILES[1]))?;
    let b = domain.register(map, Access::REMOTE_WRITE, MrFlags::PMEM | MrFlags::UNCACHED)?;
    let pep = fabric.passive_endpoint(&info, &eq)?;
    pep.listen()?;
    let port = pep
        .local_addr()?
        .as_inet()
        .map(|a| a.port())
        .ok_or_else(|| Error::invalid("listener has no inet address"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{PORT_LINE}{port}")?;
        out.flush()?;
    }
    let req = match eq.wait(STEP)? {
        Event::ConnRequest(r) => r,
        other => return Err(Error::invalid(format!("unexpected event {other:?}"))),
    };
    let ep = domain.endpoint(&req.info, EndpointConfig::new(&cq, &eq))?;
    let mut descr = a.remote().to_bytes().to_vec();
    descr.extend_from_slice(&b.remote().to_bytes());
    ep.accept(&descr)?;
    // Serve (progress is automatic) until the initiator goes away or the lifetime ends;
    // normally SIGKILL ends it first.
    while started.elapsed() < TARGET_LIFETIME {
        match eq.sread(Some(Duration::from_millis(100)))? {
            Some(Event::Shutdown { .. }) | Some(Event::Error { .. }) => break,
            _ => {}
        }
    }
    Ok(())
}

/// Kills the child on drop (a failing test leaves no target behind).
struct Target {
    child: Child,
    port: u16,
    waited: bool,
}

impl Target {
    fn spawn(dir: &Path) -> Target {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "crash_target", "--nocapture", "--test-threads=1"])
            .env(TARGET_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the target");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Ends at EOF, i.e. when the target dies.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test crash_target ... " on the same line first.
                if let Some(i) = line.find(PORT_LINE) {
                    let _ = tx.send(line[i + PORT_LINE.len()..].trim().parse::<u16>().ok());
                }
            }
        });
        let mut t = Target {
            child,
            port: 0,
            waited: false,
        };
        match rx.recv_timeout(STEP) {
            Ok(Some(port)) => t.port = port,
            other => panic!("the target printed no port: {other:?}"),
        }
        t
    }

    fn sigkill(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain system call on the PID of our own child, which has not been
        // reaped yet (so the PID cannot have been reused).
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill({pid}): {}", std::io::Error::last_os_error());
        let status = self.child.wait().expect("reaping the target");
        self.waited = true;
        // Killed by the signal, not exited early with an error of its own.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "target ended with {status} before the kill"
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The initiator's connected objects for one round.
struct Client {
    domain: Domain,
    cq: CompletionQueue,
    ep: Endpoint,
    remote: [RemoteMr; 2],
    _eq: EventQueue,
    _fabric: Fabric,
}

fn connect(port: u16) -> Client {
    let info = registry()
        .getinfo(&hints().node("127.0.0.1").service(port))
        .expect("getinfo")
        .remove(0);
    assert!(info.caps.contains(Caps::RMA_PMEM));
    let fabric = Fabric::open(&info).unwrap();
    let domain = fabric.domain(&info).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    ep.connect(b"").unwrap();
    let data = match eq.wait(STEP).expect("connection event") {
        Event::Connected { data, .. } => data,
        other => panic!("expected Connected, got {other:?}"),
    };
    let remote = [
        RemoteMr::from_bytes(&data[..24]).unwrap(),
        RemoteMr::from_bytes(&data[24..]).unwrap(),
    ];
    Client {
        domain,
        cq,
        ep,
        remote,
        _eq: eq,
        _fabric: fabric,
    }
}

/// Log-uniform size in 1 ..= SLOT.
fn random_size(rng: &mut impl Rng) -> usize {
    let bits = rng.gen_range(0..=18u32);
    let lo = 1usize << bits;
    rng.gen_range(lo..=(lo * 2).min(SLOT))
}

#[derive(Default)]
struct Totals {
    acked: usize,
    failed: usize,
    verified_slots: usize,
    verified_bytes: usize,
}

/// One in-flight write.
struct Flight {
    region: usize,
    slot: usize,
    data: Vec<u8>,
}

/// One round: spawn, connect, stream COMMIT writes, SIGKILL at a random moment, then
/// check the files against every expected slot.
fn round(
    dir: &Path,
    rng: &mut impl Rng,
    expected: &mut [HashMap<usize, Vec<u8>>; 2],
    totals: &mut Totals,
) {
    let mut target = Target::spawn(dir);
    let c = connect(target.port);
    let bufs: Vec<MemoryRegion> = (0..WINDOW)
        .map(|_| c.domain.alloc(SLOT, Access::WRITE).unwrap())
        .collect();
    let mut free_bufs: Vec<usize> = (0..WINDOW).collect();
    let mut flights: HashMap<u64, (usize, Flight)> = HashMap::new();
    let mut next_id = 0u64;
    let kill_at = Instant::now() + Duration::from_micros(rng.gen_range(0..=MAX_KILL_DELAY_US));
    let mut killed = false;
    let deadline = Instant::now() + STEP;
    let mut out = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "round did not finish in {STEP:?}"
        );
        if !killed && Instant::now() >= kill_at {
            target.sigkill();
            killed = true;
        }
        if killed && flights.is_empty() {
            break;
        }
        // Keep the window full (until the kill).
        if !killed {
            while let Some(b) = free_bufs.pop() {
                let region = rng.gen_range(0..2usize);
                let busy = |s: usize| {
                    flights
                        .values()
                        .any(|(_, f)| f.region == region && f.slot == s)
                };
                let slot = (0..SLOTS)
                    .map(|_| rng.gen_range(0..SLOTS))
                    .find(|&s| !busy(s))
                    .expect("a free slot: WINDOW is far below SLOTS");
                let len = random_size(rng);
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                bufs[b].write_at(0, &data).unwrap();
                let id = next_id;
                next_id += 1;
                let msg = RmaMsg {
                    iov: &[bufs[b].iov(0, len)],
                    rma_iov: &[c.remote[region].iov((slot * SLOT) as u64, len)],
                    context: id,
                    data: 0,
                };
                match c
                    .ep
                    .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
                {
                    Ok(()) => {
                        flights.insert(id, (b, Flight { region, slot, data }));
                    }
                    // The connection died under us (only after a kill) or the queue is
                    // full: try again later.
                    Err(_) => {
                        free_bufs.push(b);
                        break;
                    }
                }
            }
        }
        out.clear();
        c.cq.sread(&mut out, 64, Some(Duration::from_micros(200)))
            .expect("reading completions");
        for comp in out.drain(..) {
            let Some((b, f)) = flights.remove(&comp.context) else {
                panic!("completion for an unknown write: {comp:?}");
            };
            free_bufs.push(b);
            match &comp.status {
                Ok(()) => {
                    assert!(comp.flags.contains(CompFlags::COMMIT), "{comp:?}");
                    totals.acked += 1;
                    expected[f.region].insert(f.slot, f.data);
                }
                Err(e) => {
                    assert!(killed, "a COMMIT write failed before the kill: {e}");
                    // The write may be partly placed: the slot is unknown until the next
                    // successful write to it.
                    totals.failed += 1;
                    expected[f.region].remove(&f.slot);
                }
            }
        }
    }
    drop(c);
    verify(dir, expected, totals);
}

fn verify(dir: &Path, expected: &[HashMap<usize, Vec<u8>>; 2], totals: &mut Totals) {
    for (region, name) in FILES.iter().enumerate() {
        let f = std::fs::File::open(dir.join(name)).unwrap();
        for (&slot, data) in &expected[region] {
            let mut got = vec![0u8; data.len()];
            f.read_exact_at(&mut got, (slot * SLOT) as u64).unwrap();
            if got != *data {
                let i = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
                panic!(
                    "LOST: {name} slot {slot}: a {} B write whose COMMIT completed differs \
                     at byte {i} after the target was killed",
                    data.len()
                );
            }
            totals.verified_slots += 1;
            totals.verified_bytes += data.len();
        }
    }
}

#[test]
fn acked_commits_survive_sigkill() {
    if std::env::var_os(TARGET_ENV).is_some() {
        return;
    }
    let kills = std::env::var("FABRIC_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            KILLS_DEBUG
        } else {
            KILLS_RELEASE
        });
    let seed = std::env::var("FABRIC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("commit crash test: {kills} kills, seed {seed} (FABRIC_CRASH_SEED to replay)");
    let dir = TempDir(
        std::env::temp_dir().join(format!("fabric-tcp-commit-crash-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::File::create(dir.0.join(FILES[0]))
        .unwrap()
        .set_len(LEN as u64)
        .unwrap();
    drop(pmem::Mapping::create(dir.0.join(FILES[1]), LEN).unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut expected: [HashMap<usize, Vec<u8>>; 2] = Default::default();
    let mut totals = Totals::default();
    let start = Instant::now();
    for k in 0..kills {
        assert!(
            start.elapsed() < RUN_LIMIT,
            "only {k} of {kills} kills within {RUN_LIMIT:?}"
        );
        round(&dir.0, &mut rng, &mut expected, &mut totals);
    }
    let t = start.elapsed();
    println!(
        "{kills} kills in {:.1} s: {} COMMIT writes acked, {} cut off by the kill; \
         {} slot checks ({} MiB) after the kills, 0 lost",
        t.as_secs_f64(),
        totals.acked,
        totals.failed,
        totals.verified_slots,
        totals.verified_bytes >> 20
    );
    assert!(
        totals.acked >= kills,
        "too few writes completed ({}) for the test to mean anything",
        totals.acked
    );
}

//! COMMIT over verbs into a DAX mapping, with the target process SIGKILLed at random
//! moments: every write whose COMMIT completion the initiator saw must be in the file
//! afterwards, intact. The verbs counterpart of `providers/tcp/tests/commit_crash.rs`
//! (the model: the target is this test binary re-executed).
//!
//! # What it runs on, and what it shows
//! It needs an RDMA device (the VM tier's `rdma_rxe`), the operator's statement
//! `VERBS_DIRECT_PMEM=1` (without it the provider offers no `RMA_PMEM`; see the crate
//! docs, "Completion levels and COMMIT") and `VERBS_CRASH_FILE`, the target's memory:
//! in the VM tier, `/dev/dax1.0`, device DAX on the emulated NVDIMM 1, where the
//! target's [`pmem::Mapping`] must be DAX (`is_pmem`), which the test asserts when
//! `VERBS_CRASH_DAX=1`. Without the feature or the two variables it prints why and does
//! nothing (it runs in the VM tier's verbs step).
//!
//! Why device DAX and not a file on ext4 `-o dax`: the kernel refuses to pin file-system
//! DAX pages for RDMA (`ibv_reg_mr` fails `EOPNOTSUPP`: a long-term pin would stop the
//! file system from moving or truncating the blocks under the NIC) unless the device
//! supports on-demand paging, which 6.1's rxe does not (librpma likewise needs ODP for
//! FS-DAX). Device DAX has no file system and pins. The VM step shows the refusal too.
//!
//! A COMMIT write on verbs is the RDMA WRITE(s) followed by an RDMA READ of the last
//! written range on the same queue pair (read-after-write): the responder executes
//! requests in order, so the read's response means the writes were executed. On rxe
//! the responder is the kernel copying into the target's DAX pages, so a COMMIT
//! completion means "in the NVDIMM's pages", which a SIGKILL of the target cannot
//! undo: what this test can catch is a completion reported before the writes were
//! executed (a missing or misordered read, a completion taken from the wrong work
//! request). It cannot show the CPU-cache side of durability (TCG emulates no caches)
//! nor a power loss; on RDMA hardware the promise further depends on the target
//! platform (see the crate docs).
//!
//! The initiator keeps up to [`WINDOW`] COMMIT writes in flight, 1 B to 64 KiB, each
//! to a slot no other in-flight write uses, with random contents; the target is killed
//! by PID 0 to [`MAX_KILL_DELAY_MS`] ms after the connection is up, and the initiator
//! goes on posting for [`POST_AFTER_KILL`] (or until a post is refused), so that writes
//! are in flight while the target's process and queue pair are torn down (those fail,
//! or complete if the responder executed them first); then the memory is
//! read back with `pread` and every slot whose last COMMIT completed successfully must
//! hold that write's bytes. `VERBS_CRASH_KILLS` (default [`KILLS`]) sets the rounds and
//! `VERBS_CRASH_SEED` the seed (printed).
#![cfg(feature = "verbs")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric_core::*;

const TARGET_ENV: &str = "VERBS_CRASH_TARGET_FILE";
const FILE_ENV: &str = "VERBS_CRASH_FILE";
/// Rounds (kills) by default.
const KILLS: usize = 30;
/// Bytes per slot: the largest write.
const SLOT: usize = 64 << 10;
/// Slots in the region (2 MiB in all: one device DAX alignment unit).
const SLOTS: usize = 32;
const LEN: usize = SLOT * SLOTS;
/// COMMIT writes in flight.
const WINDOW: usize = 8;
/// Longest time from connection to kill (TCG: the device is slow).
const MAX_KILL_DELAY_MS: u64 = 300;
/// Bound of every single wait, and of a round's wait for its last completions.
const STEP: Duration = Duration::from_secs(30);
/// How long the initiator keeps posting after the SIGKILL (writes in flight while the
/// target dies).
const POST_AFTER_KILL: Duration = Duration::from_millis(200);
/// Bound of the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(240);
const PORT_LINE: &str = "VERBS_CRASH_TARGET_PORT ";

fn registry() -> Registry {
    Registry::new().with(fabric_verbs::provider())
}

fn hints() -> Hints {
    Hints::new()
        .caps(Caps::MSG | Caps::RMA | Caps::RMA_PMEM)
        .ep_type(EpType::Msg)
        .provider("verbs")
        .node("127.0.0.1")
}

/// xorshift64*: the test's only randomness (seeded, printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// In lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The target half: acts only when re-executed by [`acked_commits_survive_sigkill`].
#[test]
fn crash_target() {
    let Some(file) = std::env::var_os(TARGET_ENV) else {
        return;
    };
    if let Err(e) = run_target(Path::new(&file)) {
        eprintln!("crash target: {e}");
        std::process::exit(2);
    }
    std::process::exit(0);
}

fn run_target(file: &Path) -> Result<()> {
    let started = Instant::now();
    let info = registry()
        .getinfo(&hints().source(true).service(0).progress(Progress::Auto))
        .map_err(|e| Error::new(ErrorKind::NoData, e.to_string()))?
        .remove(0);
    let fabric = Fabric::open(&info)?;
    let domain = fabric.domain(&info)?;
    let eq = fabric.eq(EqAttr::default())?;
    let cq = domain.cq(CqAttr::default())?;
    let map = pmem::Mapping::create(file, LEN)?;
    if std::env::var_os("VERBS_CRASH_DAX").is_some_and(|v| v == "1") && !map.is_pmem() {
        return Err(Error::invalid(format!(
            "{} is not MAP_SYNC DAX ({:?})",
            file.display(),
            map.kind()
        )));
    }
    let kind = format!("{:?}, is_pmem {}", map.kind(), map.is_pmem());
    let region = domain.register(map, Access::REMOTE_WRITE, MrFlags::PMEM)?;
    let pep = fabric.passive_endpoint(&info, &eq)?;
    pep.listen()?;
    let port = pep
        .local_addr()?
        .as_inet()
        .map(|a| a.port())
        .ok_or_else(|| Error::invalid("listener has no inet address"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{PORT_LINE}{port} {kind}")?;
        out.flush()?;
    }
    let req = match eq.wait(STEP)? {
        Event::ConnRequest(r) => r,
        other => return Err(Error::invalid(format!("unexpected event {other:?}"))),
    };
    let ep = domain.endpoint(&req.info, EndpointConfig::new(&cq, &eq))?;
    ep.accept(&region.remote().to_bytes())?;
    while started.elapsed() < Duration::from_secs(120) {
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
    kind: String,
    waited: bool,
}

impl Target {
    fn spawn(file: &Path) -> Target {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "crash_target", "--nocapture", "--test-threads=1"])
            .env(TARGET_ENV, file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning the target");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test crash_target ... " on the same line first.
                if let Some(i) = line.find(PORT_LINE) {
                    let rest = line[i + PORT_LINE.len()..].trim().to_string();
                    let (port, kind) = rest.split_once(' ').unwrap_or((&rest, ""));
                    let _ = tx.send(port.parse::<u16>().ok().map(|p| (p, kind.to_string())));
                }
            }
        });
        let mut t = Target {
            child,
            port: 0,
            kind: String::new(),
            waited: false,
        };
        match rx.recv_timeout(STEP) {
            Ok(Some((port, kind))) => {
                t.port = port;
                t.kind = kind;
            }
            other => panic!("the target printed no port: {other:?}"),
        }
        t
    }

    /// Sends SIGKILL and returns at once: the initiator keeps posting while the
    /// target's process (and with it its queue pair) is torn down.
    fn signal(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: a plain system call on our own child's PID, not yet reaped (so not
        // reused).
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill({pid}): {}", std::io::Error::last_os_error());
    }

    /// Reaps the target, which must have died of the SIGKILL.
    fn reap(&mut self) {
        let status = self.child.wait().expect("reaping the target");
        self.waited = true;
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

#[derive(Default)]
struct Totals {
    acked: usize,
    failed: usize,
    verified: usize,
    bytes: usize,
}

/// One in-flight write: its source buffer, its slot, its bytes.
type Flight = (usize, usize, Vec<u8>);

fn round(
    file: &Path,
    rng: &mut Rng,
    expected: &mut HashMap<usize, Vec<u8>>,
    t: &mut Totals,
    kind: &mut String,
) {
    let mut target = Target::spawn(file);
    kind.clone_from(&target.kind);
    let info = registry()
        .getinfo(&hints().service(target.port))
        .expect("getinfo")
        .remove(0);
    let fabric = Fabric::open(&info).unwrap();
    let domain = fabric.domain(&info).unwrap();
    let eq = fabric.eq(EqAttr::default()).unwrap();
    let cq = domain.cq(CqAttr::default()).unwrap();
    let ep = domain
        .endpoint(&info, EndpointConfig::new(&cq, &eq))
        .unwrap();
    ep.connect(b"").unwrap();
    let remote = match eq.wait(STEP).expect("connection event") {
        Event::Connected { data, .. } => RemoteMr::from_bytes(&data).expect("descriptor"),
        other => panic!("expected Connected, got {other:?}"),
    };
    let bufs: Vec<MemoryRegion> = (0..WINDOW)
        .map(|_| domain.alloc(SLOT, Access::WRITE).unwrap())
        .collect();
    let mut free: Vec<usize> = (0..WINDOW).collect();
    let mut flights: HashMap<u64, Flight> = HashMap::new();
    let mut next = 0u64;
    let kill_at = Instant::now() + Duration::from_millis(rng.range(0, MAX_KILL_DELAY_MS));
    let mut killed_at: Option<Instant> = None;
    let mut post_failed = false;
    let mut out = Vec::new();
    loop {
        if killed_at.is_none() && Instant::now() >= kill_at {
            target.signal();
            killed_at = Some(Instant::now());
        }
        let posting = killed_at.is_none_or(|k| k.elapsed() < POST_AFTER_KILL && !post_failed);
        if let Some(k) = killed_at.filter(|_| !posting) {
            if flights.is_empty() {
                break;
            }
            if k.elapsed() > STEP {
                // Never completed: their slots are unknown from now on.
                for (_, (_, slot, _)) in flights.drain() {
                    expected.remove(&slot);
                }
                break;
            }
        } else {
            while let Some(b) = free.pop() {
                let busy = |s: usize| flights.values().any(|f| f.1 == s);
                let Some(slot) = (0..SLOTS)
                    .map(|_| rng.range(0, SLOTS as u64 - 1) as usize)
                    .find(|&s| !busy(s))
                else {
                    free.push(b);
                    break;
                };
                let len = 1usize << rng.range(0, 16);
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                bufs[b].write_at(0, &data).unwrap();
                let msg = RmaMsg {
                    iov: &[bufs[b].iov(0, len)],
                    rma_iov: &[remote.iov((slot * SLOT) as u64, len)],
                    context: next,
                    data: 0,
                };
                match ep.writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE) {
                    Ok(()) => {
                        flights.insert(next, (b, slot, data));
                        next += 1;
                    }
                    Err(_) => {
                        // Refused at the call: after the kill, the connection is gone
                        // (stop posting); before it, a full queue (try again later).
                        post_failed = killed_at.is_some();
                        free.push(b);
                        break;
                    }
                }
            }
        }
        out.clear();
        cq.sread(&mut out, 64, Some(Duration::from_millis(1)))
            .expect("reading completions");
        for c in out.drain(..) {
            let (b, slot, data) = flights
                .remove(&c.context)
                .unwrap_or_else(|| panic!("completion for an unknown write: {c:?}"));
            free.push(b);
            match &c.status {
                Ok(()) => {
                    assert!(c.flags.contains(CompFlags::COMMIT), "{c:?}");
                    t.acked += 1;
                    expected.insert(slot, data);
                }
                Err(e) => {
                    assert!(
                        killed_at.is_some(),
                        "a COMMIT write failed before the kill: {e}"
                    );
                    t.failed += 1;
                    expected.remove(&slot);
                }
            }
        }
    }
    drop(ep);
    target.reap();
    // Every slot whose last COMMIT completed must hold it, read through a fresh mapping
    // (device DAX has no read(2)).
    let m = pmem::Mapping::open(file).expect("mapping the target's memory again");
    for (&slot, data) in expected.iter() {
        let mut got = vec![0u8; data.len()];
        m.read_at(slot * SLOT, &mut got).unwrap();
        if got != *data {
            let i = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "LOST: slot {slot}: a {} B write whose COMMIT completed differs at byte {i} \
                 after the target was killed",
                data.len()
            );
        }
        t.verified += 1;
        t.bytes += data.len();
    }
}

#[test]
fn acked_commits_survive_sigkill() {
    if std::env::var_os(TARGET_ENV).is_some() {
        return;
    }
    let Some(file) = std::env::var_os(FILE_ENV).map(PathBuf::from) else {
        eprintln!("commit_crash: not run: set {FILE_ENV} (the VM tier's verbs step does)");
        return;
    };
    if !fabric_verbs::raw_commit_declared() {
        eprintln!("commit_crash: not run: needs VERBS_DIRECT_PMEM=1 (no RMA_PMEM without it)");
        return;
    }
    let kills = std::env::var("VERBS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS);
    let seed = std::env::var("VERBS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    let regular = !file.exists() || file.is_file();
    drop(pmem::Mapping::create_truncating(&file, LEN).expect("the target's memory"));
    let mut rng = Rng(seed);
    let mut expected = HashMap::new();
    let mut totals = Totals::default();
    let start = Instant::now();
    println!(
        "commit_crash: seed {seed}, {kills} kills, file {}",
        file.display()
    );
    let mut kind = String::new();
    for k in 0..kills {
        assert!(
            start.elapsed() < RUN_LIMIT,
            "only {k} of {kills} kills in {RUN_LIMIT:?}"
        );
        round(&file, &mut rng, &mut expected, &mut totals, &mut kind);
    }
    println!(
        "commit_crash: {kills} kills in {:.1} s, target mapping {kind}: {} COMMIT writes acked, \
         {} failed at the kill; {} slots ({} bytes) re-read intact",
        start.elapsed().as_secs_f64(),
        totals.acked,
        totals.failed,
        totals.verified,
        totals.bytes
    );
    assert!(
        totals.acked > 0,
        "no COMMIT write completed before any kill"
    );
    if regular {
        let _ = std::fs::remove_file(&file);
    }
}

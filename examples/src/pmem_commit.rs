//! A durable remote write and how to check it (`pmem-commit`), and the latency of an
//! RMA write with DELIVERY_COMPLETE against COMMIT_COMPLETE (`pmem-commit --bench`).
//!
//! The target (server half) maps a file with [`pmem::Mapping`], registers it
//! [`MrFlags::PMEM`] and sends the region's descriptor. The initiator (client half)
//! writes with [`OpFlags::COMMIT_COMPLETE`]: its completion means the target has
//! persisted the bytes (cache flush on true pmem, msync on a page-cache file). It then
//! asks the target to check: the target reads the file again, with a plain `pread` and
//! through a fresh mapping, never through the mapping the write went into.
//!
//! Control messages (send/recv, 4 KiB at most): `CONFIG` (region length) from the
//! client; `DESC` (descriptor, mapping kind, file system, path) from the server;
//! `VERIFY` (offset, length, seed) answered by `RESULT`; `DONE`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fabric::{
    Access, Caps, CompFlags, Completion, ErrorKind, MemoryRegion, MrFlags, OpFlags, RemoteMr,
    RmaMsg,
};
use serde::Serialize;

use crate::conn::Side;
use crate::pingpong::next_completion;
use crate::{ctx, median, Mode, ToolResult};

const CTRL: usize = 4096;
const RECV_CTX: u64 = 1 << 62;
const SEND_CTX: u64 = (1 << 62) + 1;
const CONFIG: &[u8; 4] = b"FPC1";
const VERIFY: &[u8; 4] = b"FPCV";
const DONE: &[u8; 4] = b"FPCD";
/// How long the server waits for the client's next control message: the whole bench
/// runs in between.
const SERVER_PATIENCE: Duration = Duration::from_secs(3600);
/// How long the client waits for the server's answer.
const CLIENT_PATIENCE: Duration = Duration::from_secs(60);

/// What the target reports about its region.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// The file behind the region.
    pub file: String,
    /// Its file system type (from /proc/self/mounts), or "unknown".
    pub fs: String,
    /// `pmem::MappingKind` as text: Sync, DeviceDax or PageCache.
    pub kind: String,
    /// True persistent memory (persist = cache flush + fence).
    pub is_pmem: bool,
    /// Descriptor of the registered region.
    #[serde(skip)]
    pub remote: Option<RemoteMr>,
}

impl TargetInfo {
    /// What a COMMIT completion promises for this target, in one sentence.
    pub fn meaning(&self) -> String {
        if self.is_pmem {
            "true persistent memory: the COMMIT completed after the target flushed the CPU \
             caches (CLWB/CLFLUSHOPT/CLFLUSH + SFENCE): durable, survives power loss"
                .into()
        } else if self.fs == "tmpfs" || self.fs == "ramfs" {
            format!(
                "page-cache mapping on {}: the target ran msync before the COMMIT completed, \
                 but there is no device behind this file system: the data survives a crash \
                 of the target process, not a reboot or power loss",
                self.fs
            )
        } else {
            format!(
                "page-cache mapping on {} (not true pmem): the COMMIT completed after \
                 msync(MS_SYNC) wrote the range to the file system: it survives a crash of \
                 the target process and, on a real block device that honours cache \
                 flushes, a power loss",
                self.fs
            )
        }
    }
}

/// Control messages over one registered buffer: `[0, CTRL)` receives, `[CTRL, 2*CTRL)`
/// sends.
struct Ctrl {
    mr: MemoryRegion,
    mode: Mode,
    patience: Duration,
}

impl Ctrl {
    fn new(side: &Side, mode: Mode, patience: Duration) -> ToolResult<Ctrl> {
        let mr = side
            .domain
            .alloc(2 * CTRL, Access::LOCAL)
            .map_err(ctx("register control buffer"))?;
        side.ep
            .recv(mr.iov(0, CTRL), RECV_CTX)
            .map_err(ctx("post receive"))?;
        Ok(Ctrl { mr, mode, patience })
    }

    /// The next successful completion, waiting up to `patience` (in 1 s steps).
    fn next(&self, side: &Side) -> ToolResult<Completion> {
        let deadline = Instant::now() + self.patience;
        loop {
            let step = Duration::from_secs(1);
            let r = match self.mode {
                Mode::Poll => side.cq.poll_wait(step),
                Mode::Sleep => side.cq.wait(step),
            };
            match r {
                Ok(c) => {
                    if let Err(e) = &c.status {
                        return Err(format!("operation {:#x} failed: {e}", c.context));
                    }
                    return Ok(c);
                }
                Err(e) if e.kind() == ErrorKind::TimedOut && Instant::now() < deadline => {}
                Err(e) => return Err(format!("waiting for a control message: {e}")),
            }
        }
    }

    fn send(&self, side: &Side, msg: &[u8]) -> ToolResult<()> {
        if msg.len() > CTRL {
            return Err(format!("control message of {} bytes", msg.len()));
        }
        self.mr
            .write_at(CTRL, msg)
            .map_err(ctx("control message"))?;
        side.ep
            .send(self.mr.iov(CTRL, msg.len()), SEND_CTX)
            .map_err(ctx("send control message"))
    }

    /// The next control message (send completions on the way are consumed). With
    /// `again`, the receive is posted again for the next one (not after the last: the
    /// peer may have closed by then).
    fn recv(&self, side: &Side, again: bool) -> ToolResult<Vec<u8>> {
        loop {
            let c = self.next(side)?;
            match c.context {
                SEND_CTX => continue,
                RECV_CTX => {
                    let v = self.mr.to_vec(0, c.len).map_err(ctx("control message"))?;
                    if again {
                        side.ep
                            .recv(self.mr.iov(0, CTRL), RECV_CTX)
                            .map_err(ctx("post receive"))?;
                    }
                    return Ok(v);
                }
                other => return Err(format!("unexpected completion {other:#x}")),
            }
        }
    }
}

fn u64_at(b: &[u8], i: usize) -> ToolResult<u64> {
    b.get(i..i + 8)
        .and_then(|x| x.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| "short control message".to_string())
}

/// `len` reproducible bytes for `seed` (xorshift64), so the check needs only the seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The file system type of the mount holding `path` (longest matching mount point in
/// /proc/self/mounts), or "unknown".
pub fn fs_type(path: &Path) -> String {
    let dir = path.parent().unwrap_or(path);
    let Ok(canon) = dir.canonicalize() else {
        return "unknown".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            canon.starts_with(mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, t)| t)
        .unwrap_or_else(|| "unknown".into())
}

/// The target half: maps `file` (created or resized to what the client asks for),
/// registers it PMEM, answers VERIFY requests by reading the file back, until DONE.
/// With `remove`, deletes the file at the end.
pub fn serve(side: &Side, file: &Path, remove: bool, mode: Mode) -> ToolResult<()> {
    if !side.info.caps.contains(Caps::RMA_PMEM) {
        return Err(format!(
            "provider {} does not offer RMA_PMEM (COMMIT_COMPLETE)",
            side.info.provider_name
        ));
    }
    let ctrl = Ctrl::new(side, mode, SERVER_PATIENCE)?;
    let cfg = ctrl.recv(side, true)?;
    if cfg.get(..4) != Some(&CONFIG[..]) {
        return Err("malformed configuration from the client".into());
    }
    let len = u64_at(&cfg, 4)? as usize;
    if len == 0 || len > side.info.limits.max_msg_size.max(1 << 30) {
        return Err(format!("region of {len} bytes asked for"));
    }
    // The target's persistent region: a file mapping, registered PMEM.
    let map = pmem::Mapping::create(file, len).map_err(ctx(&format!("map {}", file.display())))?;
    let info = TargetInfo {
        file: file.display().to_string(),
        fs: fs_type(file),
        kind: format!("{:?}", map.kind()),
        is_pmem: map.is_pmem(),
        remote: None,
    };
    let region = side
        .domain
        .register(map, Access::REMOTE_WRITE, MrFlags::PMEM)
        .map_err(ctx("register the mapping PMEM"))?;
    let mut desc = region.remote().to_bytes().to_vec();
    desc.push(info.is_pmem as u8);
    for s in [&info.kind, &info.fs, &info.file] {
        desc.extend_from_slice(&(s.len() as u16).to_le_bytes());
        desc.extend_from_slice(s.as_bytes());
    }
    ctrl.send(side, &desc)?;
    let result = loop {
        // Only DONE ends the conversation: post the next receive for anything else.
        let m = ctrl.recv(side, false)?;
        if m.get(..4) != Some(&DONE[..]) {
            side.ep
                .recv(ctrl.mr.iov(0, CTRL), RECV_CTX)
                .map_err(ctx("post receive"))?;
        }
        match m.get(..4) {
            Some(x) if x == VERIFY => {
                let (off, n, seed) = (u64_at(&m, 4)?, u64_at(&m, 12)?, u64_at(&m, 20)?);
                let report = verify_file(file, off as usize, n as usize, seed);
                ctrl.send(side, report.as_bytes())?;
            }
            Some(x) if x == DONE => break Ok(()),
            _ => break Err("malformed control message from the client".to_string()),
        }
    };
    drop(region);
    if remove {
        let _ = std::fs::remove_file(file);
    }
    result
}

/// Reads `len` bytes at `off` of `file` twice, with pread and through a new mapping,
/// and compares both with the pattern; returns "OK ..." or "MISMATCH ...".
fn verify_file(file: &Path, off: usize, len: usize, seed: u64) -> String {
    let want = pattern(seed, len);
    let mut plain = vec![0u8; len];
    let read = std::fs::File::open(file).and_then(|f| f.read_exact_at(&mut plain, off as u64));
    let mut mapped = vec![0u8; len];
    let fresh = pmem::Mapping::open(file).and_then(|m| m.read_at(off, &mut mapped));
    match (read, fresh) {
        (Err(e), _) | (_, Err(e)) => format!("MISMATCH reading {}: {e}", file.display()),
        _ if plain != want => format!("MISMATCH: pread of {} differs", file.display()),
        _ if mapped != want => format!("MISMATCH: a fresh mapping of {} differs", file.display()),
        _ => format!(
            "OK: {len} bytes at offset {off} read back from {} with pread and a fresh mapping",
            file.display()
        ),
    }
}

/// Sends CONFIG and returns the target's description (with its region descriptor).
fn open_target(side: &Side, ctrl: &Ctrl, len: usize) -> ToolResult<TargetInfo> {
    if !side.info.caps.contains(Caps::RMA_PMEM) {
        return Err(format!(
            "provider {} does not offer RMA_PMEM (COMMIT_COMPLETE)",
            side.info.provider_name
        ));
    }
    let mut cfg = CONFIG.to_vec();
    cfg.extend_from_slice(&(len as u64).to_le_bytes());
    ctrl.send(side, &cfg)?;
    let d = ctrl.recv(side, true)?;
    let bad = || "malformed descriptor from the server".to_string();
    let remote = RemoteMr::from_bytes(&d).map_err(|_| bad())?;
    let is_pmem = *d.get(RemoteMr::WIRE_SIZE).ok_or_else(bad)? != 0;
    let mut at = RemoteMr::WIRE_SIZE + 1;
    let mut text = || -> ToolResult<String> {
        let n = u16::from_le_bytes(
            d.get(at..at + 2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize;
        let s = d.get(at + 2..at + 2 + n).ok_or_else(bad)?;
        at += 2 + n;
        Ok(String::from_utf8_lossy(s).into_owned())
    };
    let (kind, fs, file) = (text()?, text()?, text()?);
    Ok(TargetInfo {
        file,
        fs,
        kind,
        is_pmem,
        remote: Some(remote),
    })
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The target's region.
    pub target: TargetInfo,
    /// Bytes written.
    pub len: usize,
    /// Offset in the file.
    pub offset: usize,
    /// Completion flags, as text.
    pub flags: String,
    /// Microseconds from posting the write to its COMMIT completion.
    pub commit_us: f64,
    /// The target's check of the file.
    pub verify: String,
    /// Whether the check passed.
    pub verified: bool,
}

/// The demo: one COMMIT_COMPLETE write of `len` bytes at `offset`, then the target's
/// check that the bytes are in the file.
pub fn demo(side: &Side, offset: usize, len: usize, mode: Mode) -> ToolResult<DemoReport> {
    let ctrl = Ctrl::new(side, mode, CLIENT_PATIENCE)?;
    let target = open_target(side, &ctrl, offset + len)?;
    let remote = target.remote.ok_or("no descriptor")?;
    let seed = 0x5EED ^ len as u64;
    let src = side
        .domain
        .alloc(len, Access::WRITE)
        .map_err(ctx("register the source"))?;
    src.write_at(0, &pattern(seed, len)).map_err(ctx("fill"))?;
    // The durable write: COMMIT_COMPLETE completes only once the target has persisted
    // every byte of the remote range.
    let msg = RmaMsg {
        iov: &[src.full()],
        rma_iov: &[remote.iov(offset as u64, len)],
        context: 7,
        data: 0,
    };
    let start = Instant::now();
    side.ep
        .writemsg(&msg, OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE)
        .map_err(ctx("writemsg COMMIT_COMPLETE"))?;
    let c = loop {
        let c = next_completion(&side.cq, mode)?;
        if c.context == 7 {
            break c;
        }
    };
    let commit_us = start.elapsed().as_secs_f64() * 1e6;
    if !c.flags.contains(CompFlags::COMMIT) {
        return Err(format!("the completion lacks COMMIT: {:?}", c.flags));
    }
    // Ask the target to read the file back.
    let mut v = VERIFY.to_vec();
    for x in [offset as u64, len as u64, seed] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    ctrl.send(side, &v)?;
    let verify = String::from_utf8_lossy(&ctrl.recv(side, false)?).into_owned();
    ctrl.send(side, DONE)?;
    // Wait for DONE's send completion so the server sees it before we close.
    next_completion(&side.cq, mode)?;
    Ok(DemoReport {
        target,
        len,
        offset,
        flags: format!("{:?}", c.flags),
        commit_us,
        verified: verify.starts_with("OK"),
        verify,
    })
}

/// What `--bench` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Write sizes.
    pub sizes: Vec<usize>,
    /// Timed iterations per size and level (`None`: by size, see [`bench_iterations`]).
    pub iterations: Option<usize>,
    /// Untimed writes before each size and level.
    pub warmup: usize,
    /// Runs; each run measures every size at both levels.
    pub runs: usize,
    /// Polling or sleeping waits.
    pub mode: Mode,
}

/// Default iterations per size: about 16 MiB written per level, 30 to 1,000.
pub fn bench_iterations(size: usize) -> usize {
    ((16usize << 20) / size.max(1)).clamp(30, 1000)
}

/// One size's result.
#[derive(Debug, Clone, Serialize)]
pub struct LatRow {
    /// Write size in bytes.
    pub size: usize,
    /// Timed iterations per run and level.
    pub iterations: usize,
    /// Median over runs of each run's median DELIVERY_COMPLETE latency, microseconds.
    pub delivery_us: f64,
    /// Same for COMMIT_COMPLETE.
    pub commit_us: f64,
    /// commit_us / delivery_us.
    pub ratio: f64,
    /// Each run's median, DELIVERY_COMPLETE.
    pub delivery_runs_us: Vec<f64>,
    /// Each run's median, COMMIT_COMPLETE.
    pub commit_runs_us: Vec<f64>,
}

/// The bench: latency (post to completion, one write outstanding) of RMA writes with
/// DELIVERY_COMPLETE and with COMMIT_COMPLETE into the same PMEM region, per size,
/// both levels in the same run.
pub fn bench(side: &Side, opts: &BenchOptions) -> ToolResult<(TargetInfo, Vec<LatRow>)> {
    let max = opts.sizes.iter().copied().max().unwrap_or(1).max(1);
    let ctrl = Ctrl::new(side, opts.mode, CLIENT_PATIENCE)?;
    let target = open_target(side, &ctrl, max)?;
    let remote = target.remote.ok_or("no descriptor")?;
    let src = side
        .domain
        .alloc(max, Access::WRITE)
        .map_err(ctx("register the source"))?;
    src.write_at(0, &pattern(1, max)).map_err(ctx("fill"))?;
    let levels = [
        OpFlags::COMPLETION | OpFlags::DELIVERY_COMPLETE,
        OpFlags::COMPLETION | OpFlags::COMMIT_COMPLETE,
    ];
    let mut runs: Vec<Vec<[f64; 2]>> = vec![Vec::new(); opts.sizes.len()];
    let mut id = 0u64;
    for run in 0..opts.runs.max(1) {
        for (k, &size) in opts.sizes.iter().enumerate() {
            let n = opts.iterations.unwrap_or_else(|| bench_iterations(size));
            let mut med = [0.0; 2];
            for (l, &flags) in levels.iter().enumerate() {
                let mut lat = Vec::with_capacity(n);
                for i in 0..opts.warmup + n {
                    let msg = RmaMsg {
                        iov: &[src.iov(0, size)],
                        rma_iov: &[remote.iov(0, size)],
                        context: id,
                        data: 0,
                    };
                    let t = Instant::now();
                    side.ep.writemsg(&msg, flags).map_err(ctx("writemsg"))?;
                    let c = next_completion(&side.cq, opts.mode)?;
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    if c.context != id {
                        return Err(format!("completion {} for write {id}", c.context));
                    }
                    if (l == 1) != c.flags.contains(CompFlags::COMMIT) {
                        return Err(format!("completion flags {:?} for {flags:?}", c.flags));
                    }
                    id += 1;
                    if i >= opts.warmup {
                        lat.push(us);
                    }
                }
                med[l] = median(&lat);
            }
            runs[k].push(med);
            eprintln!(
                "pmem-commit: run {}/{} {size} B: delivery {:.1} us, commit {:.1} us",
                run + 1,
                opts.runs.max(1),
                med[0],
                med[1]
            );
        }
    }
    ctrl.send(side, DONE)?;
    next_completion(&side.cq, opts.mode)?;
    let rows = opts
        .sizes
        .iter()
        .zip(runs)
        .map(|(&size, r)| {
            let d: Vec<f64> = r.iter().map(|x| x[0]).collect();
            let c: Vec<f64> = r.iter().map(|x| x[1]).collect();
            let (dm, cm) = (median(&d), median(&c));
            LatRow {
                size,
                iterations: opts.iterations.unwrap_or_else(|| bench_iterations(size)),
                delivery_us: dm,
                commit_us: cm,
                ratio: if dm > 0.0 { cm / dm } else { 0.0 },
                delivery_runs_us: d,
                commit_runs_us: c,
            }
        })
        .collect();
    Ok((target, rows))
}

/// The default target file: in the system temporary directory, unique per process.
pub fn default_file() -> PathBuf {
    std::env::temp_dir().join(format!("pmem-commit-{}.bin", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_reproducible() {
        assert_eq!(pattern(3, 100), pattern(3, 100));
        assert_ne!(pattern(3, 100), pattern(4, 100));
        assert_eq!(&pattern(3, 100)[..13], &pattern(3, 13)[..]);
    }

    #[test]
    fn fs_type_of_proc_and_shm() {
        assert_eq!(fs_type(Path::new("/proc/self/status")), "proc");
        if Path::new("/dev/shm").is_dir() {
            assert_eq!(fs_type(Path::new("/dev/shm/x")), "tmpfs");
        }
    }

    #[test]
    fn demo_over_tcp_is_verified_in_the_file() {
        let file =
            std::env::temp_dir().join(format!("pmem-commit-unit-{}.bin", std::process::id()));
        let f = file.clone();
        let r = crate::conn::run_self(
            "tcp",
            "127.0.0.1",
            move |s| serve(s, &f, true, Mode::Sleep),
            |s| demo(s, 100, 5000, Mode::Sleep),
        )
        .unwrap();
        assert!(r.verified, "{}", r.verify);
        assert!(r.flags.contains("COMMIT"), "{}", r.flags);
        assert_eq!((r.offset, r.len), (100, 5000));
        assert!(!file.exists(), "the default file is removed");
    }

    #[test]
    fn verify_file_reports_both_ways() {
        let dir = std::env::temp_dir().join(format!("pmem-commit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        let mut data = vec![0u8; 8192];
        data[100..1100].copy_from_slice(&pattern(9, 1000));
        std::fs::write(&f, &data).unwrap();
        assert!(verify_file(&f, 100, 1000, 9).starts_with("OK"));
        assert!(verify_file(&f, 101, 1000, 9).starts_with("MISMATCH"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `vm-cut`: the writer and the checker of the VM tier's power-cut definitions
//! `tests/vm/cuts/commit.sh` and `delivery.sh` (see tests/vm/README.md, "Power cuts").
//!
//! `vm-cut write --completion commit|delivery --dir D --run R [-p PROVIDER]`: a target
//! and an initiator in this process, connected over loopback (tcp by default). The
//! target maps `D/run-R.bin` (a page-cache file on the cut disk: ext4, not DAX) with
//! [`pmem::Mapping`] and registers it `PMEM`; the initiator writes records with
//! `COMMIT_COMPLETE` (the target msyncs the written range before it answers) or
//! `DELIVERY_COMPLETE` (placed in the mapping, nothing more), [`WINDOW`] in flight,
//! and prints `ACK <id>` for each record whose completion arrived, until the file is
//! full (then it idles until the VM dies) or the VM is killed.
//!
//! Record `id` is the [`RECORD`] bytes at offset `id * RECORD`, a pattern of (run, id)
//! that the check recomputes. `vm-cut check --dir D --run R` reads `D/run-R.bin` with
//! `pread` after the reboot and prints `HAVE <first>-<last>` for every range of intact
//! records, then removes the files of earlier runs.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fabric::{Access, Event, MrFlags, OpFlags, Progress, RmaMsg};
use fabric_examples::conn;

/// Bytes per record: one page, so that persisting a record touches its page only.
const RECORD: usize = 4096;
/// Records per run (the file is RECORD * RECORDS = 32 MiB, allocated unwritten).
/// Under TCG a run acks a few hundred records before its cut (DELIVERY: a few
/// thousand at most); a writer that fills the file idles until the cut.
const RECORDS: usize = 8192;
/// Writes in flight.
const WINDOW: usize = 4;
/// Longest wait for one completion.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a writer lives at most (the tier kills the VM within seconds).
const LIFETIME: Duration = Duration::from_secs(600);

type R<T> = Result<T, String>;

fn usage() -> ! {
    eprintln!(
        "usage: vm-cut write --completion commit|delivery --dir DIR --run N [-p PROVIDER]\n       vm-cut check --dir DIR --run N"
    );
    std::process::exit(2)
}

struct Args {
    write: bool,
    commit: bool,
    dir: PathBuf,
    run: u64,
    provider: String,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let write = match it.next().as_deref() {
        Some("write") => true,
        Some("check") => false,
        _ => usage(),
    };
    let (mut commit, mut dir, mut run, mut provider) = (None, None, None, "tcp".to_string());
    while let Some(a) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--completion" => {
                commit = Some(match v.as_str() {
                    "commit" => true,
                    "delivery" => false,
                    _ => usage(),
                })
            }
            "--dir" => dir = Some(PathBuf::from(v)),
            "--run" => run = Some(v.parse().unwrap_or_else(|_| usage())),
            "-p" | "--provider" => provider = v,
            _ => usage(),
        }
    }
    let (Some(dir), Some(run)) = (dir, run) else {
        usage()
    };
    if write && commit.is_none() {
        usage()
    }
    Args {
        write,
        commit: commit.unwrap_or(false),
        dir,
        run,
        provider,
    }
}

/// The contents of record `id` of run `run`: (run, id), then xorshift bytes seeded by
/// both, so that a record of another run or another slot never matches.
fn record(run: u64, id: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD);
    v.extend_from_slice(&run.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    let mut x = (run << 32) ^ id ^ 0x9E37_79B9_7F4A_7C15;
    while v.len() < RECORD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(RECORD);
    v
}

fn file_of(dir: &Path, run: u64) -> PathBuf {
    dir.join(format!("run-{run}.bin"))
}

fn write(a: &Args) -> R<()> {
    let path = file_of(&a.dir, a.run);
    let len = RECORD * RECORDS;
    let _ = std::fs::remove_file(&path);
    let map =
        pmem::Mapping::create(&path, len).map_err(|e| format!("map {}: {e}", path.display()))?;
    // The file and its name are made durable before any record is written: the check
    // must find the file of every run whose records were acked.
    File::open(&path)
        .and_then(|f| f.sync_all())
        .and_then(|_| File::open(&a.dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync {}: {e}", path.display()))?;
    eprintln!(
        "vm-cut: run {} writing {} ({:?}, is_pmem {}) with {} over {}",
        a.run,
        path.display(),
        map.kind(),
        map.is_pmem(),
        if a.commit {
            "COMMIT_COMPLETE"
        } else {
            "DELIVERY_COMPLETE"
        },
        a.provider
    );
    // The target: auto progress (the provider's thread runs the COMMIT persists).
    let listener = conn::listen(&a.provider, "127.0.0.1", 0, Progress::Auto)?;
    let port = listener.port;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> R<()> {
            let side = listener.accept(b"", conn::CONNECT_TIMEOUT)?;
            let region = side
                .domain
                .register(map, Access::REMOTE_WRITE, MrFlags::PMEM)
                .map_err(|e| format!("register the mapping PMEM: {e}"))?;
            tx.send(Ok(region.remote())).ok();
            // Serve until the initiator goes (or the VM dies).
            loop {
                match side.eq.wait(LIFETIME) {
                    Ok(Event::Shutdown { .. }) | Err(_) => return Ok(()),
                    Ok(_) => {}
                }
            }
        })();
        if let Err(e) = r {
            tx.send(Err(e)).ok();
        }
    });
    let side = conn::connect(
        &a.provider,
        "127.0.0.1",
        port,
        b"",
        Progress::Manual,
        conn::CONNECT_TIMEOUT,
    )?;
    let remote = rx
        .recv_timeout(conn::CONNECT_TIMEOUT)
        .map_err(|_| "the target did not answer".to_string())??;
    let src = side
        .domain
        .alloc(RECORD * WINDOW, Access::WRITE)
        .map_err(|e| format!("register the source: {e}"))?;
    let flags = OpFlags::COMPLETION
        | if a.commit {
            OpFlags::COMMIT_COMPLETE
        } else {
            OpFlags::DELIVERY_COMPLETE
        };
    let mut out = std::io::stdout().lock();
    // slot -> record id in flight there
    let mut busy: [Option<u64>; WINDOW] = [None; WINDOW];
    let mut next = 0u64;
    let mut inflight = 0usize;
    loop {
        while inflight < WINDOW && (next as usize) < RECORDS {
            let slot = busy.iter().position(Option::is_none).expect("a free slot");
            src.write_at(slot * RECORD, &record(a.run, next))
                .map_err(|e| format!("fill: {e}"))?;
            let msg = RmaMsg {
                iov: &[src.iov(slot * RECORD, RECORD)],
                rma_iov: &[remote.iov(next * RECORD as u64, RECORD)],
                context: slot as u64,
                data: 0,
            };
            side.ep
                .writemsg(&msg, flags)
                .map_err(|e| format!("writemsg record {next}: {e}"))?;
            busy[slot] = Some(next);
            next += 1;
            inflight += 1;
        }
        if inflight == 0 {
            eprintln!("vm-cut: run {}: file full ({RECORDS} records), idle", a.run);
            std::thread::sleep(LIFETIME);
            return Ok(());
        }
        let c = side
            .cq
            .wait(OP_TIMEOUT)
            .map_err(|e| format!("waiting for a completion: {e}"))?;
        let slot = c.context as usize;
        let id = busy
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| format!("completion for unknown context {}", c.context))?;
        inflight -= 1;
        if let Err(e) = &c.status {
            return Err(format!("record {id}: {e}"));
        }
        // Printed only now: the completion was seen.
        writeln!(out, "ACK {id}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }
}

/// Whether `buf` is record `id` of `run` (the header first: most slots are empty).
fn intact(buf: &[u8], run: u64, id: u64) -> bool {
    buf.len() == RECORD
        && buf[..8] == run.to_le_bytes()
        && buf[8..16] == id.to_le_bytes()
        && buf == record(run, id)
}

fn check(a: &Args) -> R<()> {
    let path = file_of(&a.dir, a.run);
    let f = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // Read in chunks of CHUNK records (a 4 KiB pread each is slow under TCG).
    const CHUNK: usize = 256;
    let mut buf = vec![0u8; RECORD * CHUNK];
    let mut got = 0usize; // bytes of the current chunk read
    let mut start: Option<u64> = None;
    let (mut have, mut ranges) = (0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for id in 0..=RECORDS as u64 {
        let i = id as usize % CHUNK;
        if i == 0 && (id as usize) < RECORDS {
            got = read_full(&f, &mut buf, id * RECORD as u64)
                .map_err(|e| format!("read {}: {e}", path.display()))?;
        }
        let ok = (id as usize) < RECORDS
            && (i + 1) * RECORD <= got
            && intact(&buf[i * RECORD..(i + 1) * RECORD], a.run, id);
        match (ok, start) {
            (true, None) => start = Some(id),
            (false, Some(s)) => {
                writeln!(out, "HAVE {s}-{}", id - 1).map_err(|e| e.to_string())?;
                have += id - s;
                ranges += 1;
                start = None;
            }
            _ => {}
        }
    }
    eprintln!(
        "vm-cut: run {}: {have} intact records in {ranges} ranges in {}",
        a.run,
        path.display()
    );
    // Earlier runs' files are no longer needed.
    for r in 1..a.run {
        let _ = std::fs::remove_file(file_of(&a.dir, r));
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `off` (less at the end of the file); the count.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn main() {
    let a = args();
    let r = if a.write { write(&a) } else { check(&a) };
    if let Err(e) = r {
        eprintln!("vm-cut: {e}");
        std::process::exit(1);
    }
}

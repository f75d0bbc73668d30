//! The load generator of `nvmeof-perf`, after spdk_nvme_perf: one thread per I/O
//! queue keeps `queue_depth` commands in flight for a fixed time, random or
//! sequential, reads, writes or a mix; every completion's latency (submission to
//! completion, as the host sees it) goes into a [`Histogram`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::stats::Histogram;
use crate::error::{Error, Result};
use crate::host::{check, Controller, Data, NamespaceInfo};
use crate::wire::opcodes::{IoCommand, IoOpcode};
use crate::wire::{SqeRepr, StatusContext};

/// The longest run [`run`] accepts (warm-up included).
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Random offsets (else sequential per queue).
    pub random: bool,
    /// Percent of reads, 0..=100.
    pub read_percent: u8,
}

impl Workload {
    /// fio's and spdk_nvme_perf's names: read, write, randread, randwrite, rw
    /// (readwrite), randrw; `mix` is the read percentage of the mixed ones.
    pub fn parse(name: &str, mix: u8) -> std::result::Result<Workload, String> {
        let (random, read_percent) = match name {
            "read" => (false, 100),
            "write" => (false, 0),
            "randread" => (true, 100),
            "randwrite" => (true, 0),
            "rw" | "readwrite" => (false, mix.min(100)),
            "randrw" => (true, mix.min(100)),
            other => {
                return Err(format!(
                    "workload {other:?}: read, write, randread, randwrite, rw, randrw"
                ))
            }
        };
        Ok(Workload {
            random,
            read_percent,
        })
    }

    /// The fio name.
    pub fn name(&self) -> &'static str {
        match (self.random, self.read_percent) {
            (false, 100) => "read",
            (false, 0) => "write",
            (true, 100) => "randread",
            (true, 0) => "randwrite",
            (false, _) => "rw",
            (true, _) => "randrw",
        }
    }
}

/// How to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerfConfig {
    /// The workload.
    pub workload: Workload,
    /// Bytes per I/O (a multiple of the namespace's block size).
    pub block_size: usize,
    /// Commands in flight per queue, 1..=128.
    pub queue_depth: u16,
    /// Measured time.
    pub duration: Duration,
    /// Time run before measuring starts.
    pub warmup: Duration,
}

/// A snapshot while the run goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Seconds since measuring started (negative during warm-up).
    pub elapsed_s: f64,
    /// I/Os completed in the last interval, per second.
    pub iops: f64,
    /// MB/s (10^6 bytes) in the last interval.
    pub mb_s: f64,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfResult {
    /// Measured seconds.
    pub elapsed_s: f64,
    /// Reads completed while measuring.
    pub reads: u64,
    /// Writes completed while measuring.
    pub writes: u64,
    /// Bytes moved while measuring.
    pub bytes: u64,
    /// Every I/O's latency.
    pub all: Histogram,
    /// Reads' latency.
    pub read: Histogram,
    /// Writes' latency.
    pub write: Histogram,
    /// Queues used.
    pub queues: usize,
    /// Queue depth used (the target may grant less than asked).
    pub queue_depth: u16,
}

impl PerfResult {
    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        (self.reads + self.writes) as f64 / self.elapsed_s.max(1e-9)
    }

    /// MB/s, 10^6 bytes.
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed_s.max(1e-9)
    }
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[derive(Default)]
struct Shared {
    ios: AtomicU64,
    bytes: AtomicU64,
    done: AtomicUsize,
    failed: AtomicBool,
}

struct QueueResult {
    reads: u64,
    writes: u64,
    bytes: u64,
    all: Histogram,
    read: Histogram,
    write: Histogram,
    depth: u16,
}

fn sqe_for(ns: &NamespaceInfo, read: bool, slba: u64, blocks: u32) -> SqeRepr {
    let mut sqe = SqeRepr {
        nsid: ns.nsid,
        opcode: if read {
            IoOpcode::Read.into()
        } else {
            IoOpcode::Write.into()
        },
        ..Default::default()
    };
    IoCommand {
        slba,
        nlb: (blocks - 1) as u16,
        ..Default::default()
    }
    .apply(&mut sqe);
    sqe
}

#[allow(clippy::too_many_arguments)]
fn run_queue(
    ctrl: &Controller,
    index: usize,
    queues: usize,
    ns: &NamespaceInfo,
    cfg: &PerfConfig,
    start_measure: Instant,
    end: Instant,
    shared: &Shared,
) -> Result<QueueResult> {
    let mut q = ctrl.io_queue(index)?;
    let depth = cfg.queue_depth.min(q.depth()).max(1);
    let io_blocks = (cfg.block_size / ns.block_size as usize) as u64;
    let slots = (ns.blocks / io_blocks).max(1);
    // Sequential streams start apart, one region per queue.
    let mut next_seq = slots / queues as u64 * index as u64;
    let mut rng = Xorshift(
        0x9E37_79B9_7F4A_7C15
            ^ ((index as u64 + 1) << 32)
            ^ start_measure.elapsed().as_nanos() as u64
            | 1,
    );
    let wbuf: Vec<u8> = (0..cfg.block_size)
        .map(|i| (i as u8) ^ (index as u8))
        .collect();
    let mut res = QueueResult {
        reads: 0,
        writes: 0,
        bytes: 0,
        all: Histogram::new(),
        read: Histogram::new(),
        write: Histogram::new(),
        depth,
    };
    // Submission time and direction of each outstanding command, by command ID
    // (commands complete in whatever order the target answers them).
    let mut inflight: Vec<Option<(Instant, bool)>> = vec![None; usize::from(q.depth())];
    let mut outstanding = 0usize;
    let mut data = Vec::with_capacity(cfg.block_size);
    let mut stop = false;
    loop {
        while !stop && outstanding < usize::from(depth) {
            let slot = if cfg.workload.random {
                rng.next() % slots
            } else {
                let s = next_seq % slots;
                next_seq += 1;
                s
            };
            let read = match cfg.workload.read_percent {
                100 => true,
                0 => false,
                p => rng.next() % 100 < u64::from(p),
            };
            let sqe = sqe_for(ns, read, slot * io_blocks, io_blocks as u32);
            let data = if read {
                Data::In(cfg.block_size)
            } else {
                Data::Out(&wbuf)
            };
            let t = Instant::now();
            let cid = q.submit(sqe, data)?;
            match inflight.get_mut(usize::from(cid)) {
                Some(entry) => *entry = Some((t, read)),
                None => {
                    return Err(Error::Protocol(format!(
                        "command ID {cid} beyond the queue"
                    )))
                }
            }
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        let (cid, cqe) = q.complete_any_into(&mut data)?;
        let now = Instant::now();
        let Some((t, read)) = inflight.get_mut(usize::from(cid)).and_then(Option::take) else {
            return Err(Error::Protocol(format!(
                "completion of command {cid} not submitted"
            )));
        };
        outstanding -= 1;
        check(&cqe, StatusContext::Io)?;
        if now >= end || shared.failed.load(Ordering::Relaxed) {
            stop = true;
        }
        shared.ios.fetch_add(1, Ordering::Relaxed);
        shared
            .bytes
            .fetch_add(cfg.block_size as u64, Ordering::Relaxed);
        if t >= start_measure && now <= end {
            let ns_lat = now.duration_since(t).as_nanos() as u64;
            res.all.record(ns_lat);
            if read {
                res.reads += 1;
                res.read.record(ns_lat);
            } else {
                res.writes += 1;
                res.write.record(ns_lat);
            }
            res.bytes += cfg.block_size as u64;
        }
    }
    Ok(res)
}

/// Runs `cfg` on namespace `ns` over `queues` of the controller's I/O queues (at
/// most as many as it has), calling `progress` about once a second.
pub fn run(
    ctrl: &Controller,
    ns: &NamespaceInfo,
    queues: usize,
    cfg: &PerfConfig,
    mut progress: impl FnMut(Progress),
) -> Result<PerfResult> {
    if cfg.block_size == 0 || !cfg.block_size.is_multiple_of(ns.block_size as usize) {
        return Err(Error::Config(format!(
            "I/O size {} is not a multiple of the {}-byte block",
            cfg.block_size, ns.block_size
        )));
    }
    if cfg.block_size > crate::host::MAX_HOST_TRANSFER
        || cfg.block_size / ns.block_size as usize > 65536
    {
        return Err(Error::Config(format!(
            "I/O size {} above the {} bytes one command moves",
            cfg.block_size,
            crate::host::MAX_HOST_TRANSFER
        )));
    }
    if (cfg.block_size / ns.block_size as usize) as u64 > ns.blocks {
        return Err(Error::Config("I/O size larger than the namespace".into()));
    }
    if !(1..=128).contains(&cfg.queue_depth) {
        return Err(Error::Config(format!(
            "queue depth {} outside 1..=128",
            cfg.queue_depth
        )));
    }
    if cfg.duration.is_zero() || cfg.duration + cfg.warmup > MAX_DURATION {
        return Err(Error::Config(format!(
            "duration {:?} (with warm-up {:?}): more than 0, at most {MAX_DURATION:?}",
            cfg.duration, cfg.warmup
        )));
    }
    let queues = queues.clamp(1, ctrl.io_queue_count().max(1));
    if ctrl.io_queue_count() == 0 {
        return Err(Error::Config("the controller has no I/O queues".into()));
    }
    let shared = Shared::default();
    let begin = Instant::now();
    let start_measure = begin + cfg.warmup;
    let end = start_measure + cfg.duration;
    let results: Vec<Result<QueueResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..queues)
            .map(|i| {
                let shared = &shared;
                s.spawn(move || {
                    let r = run_queue(ctrl, i, queues, ns, cfg, start_measure, end, shared);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Relaxed);
                    }
                    shared.done.fetch_add(1, Ordering::Release);
                    r
                })
            })
            .collect();
        let mut last = (Instant::now(), 0u64, 0u64);
        while shared.done.load(Ordering::Acquire) < queues {
            std::thread::sleep(Duration::from_millis(50));
            let now = Instant::now();
            let dt = now.duration_since(last.0).as_secs_f64();
            if dt >= 1.0 && now < end {
                let ios = shared.ios.load(Ordering::Relaxed);
                let bytes = shared.bytes.load(Ordering::Relaxed);
                progress(Progress {
                    elapsed_s: now.duration_since(begin).as_secs_f64() - cfg.warmup.as_secs_f64(),
                    iops: (ios - last.1) as f64 / dt,
                    mb_s: (bytes - last.2) as f64 / 1e6 / dt,
                });
                last = (now, ios, bytes);
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Protocol("an I/O thread panicked".into())))
            })
            .collect()
    });
    let mut out = PerfResult {
        elapsed_s: cfg.duration.as_secs_f64(),
        reads: 0,
        writes: 0,
        bytes: 0,
        all: Histogram::new(),
        read: Histogram::new(),
        write: Histogram::new(),
        queues,
        queue_depth: cfg.queue_depth,
    };
    for r in results {
        let r = r?;
        out.reads += r.reads;
        out.writes += r.writes;
        out.bytes += r.bytes;
        out.all.merge(&r.all);
        out.read.merge(&r.read);
        out.write.merge(&r.write);
        out.queue_depth = out.queue_depth.min(r.depth);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for name in ["read", "write", "randread", "randwrite", "rw", "randrw"] {
            let w = Workload::parse(name, 70).expect(name);
            assert_eq!(w.name(), name);
        }
        assert_eq!(Workload::parse("randrw", 70).unwrap().read_percent, 70);
        assert_eq!(Workload::parse("readwrite", 50).unwrap().name(), "rw");
        assert!(Workload::parse("trim", 50).is_err());
    }
}

//! Ping-pong latency and bandwidth, as fabtests' fi_pingpong measures them: the client
//! sends a message, the server echoes it back, one-way latency is half the round trip.
//!
//! Before the first size the client sends a configuration message (sizes, iterations,
//! warm-up), so the server needs no arguments beyond its address.

use std::time::{Duration, Instant};

use fabric::{Access, Completion, CompletionQueue, MemoryRegion};
use serde::Serialize;

use crate::conn::{self, Side};
use crate::sizes::auto_iterations;
use crate::{ctx, median, Mode, ToolResult};

const MAGIC: &[u8; 4] = b"FPP1";
pub(crate) const CONFIG_MAX: usize = 4096;
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(30);
const SEND_CTX: u64 = 1;
const RECV_CTX: u64 = 2;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Message sizes in bytes.
    pub sizes: Vec<usize>,
    /// Iterations per size (`None`: chosen per size, see [`auto_iterations`]).
    pub iterations: Option<usize>,
    /// Untimed iterations before each size.
    pub warmup: usize,
    /// Polling or sleeping waits.
    pub mode: Mode,
    /// Check every byte of every echo (the receive buffer is cleared before each
    /// round trip, and the check is not timed).
    pub verify: bool,
}

/// Result for one size.
#[derive(Debug, Clone, Serialize)]
pub struct PpResult {
    /// Message size in bytes.
    pub size: usize,
    /// Timed iterations (round trips).
    pub iterations: usize,
    /// Median one-way latency (half of the median round trip), microseconds.
    pub lat_median_us: f64,
    /// Mean one-way latency, microseconds (what fi_pingpong's usec/xfer reports).
    pub lat_mean_us: f64,
    /// 99th percentile one-way latency (half of that round trip), microseconds, where
    /// the round trips were timed one by one (not for fi_pingpong, which reports the
    /// mean only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lat_p99_us: Option<f64>,
    /// Bandwidth from the mean latency, MB/s (10^6 bytes; fi_pingpong's MB/sec).
    pub mb_per_s: f64,
    /// CPU cost of the timed iterations (2 messages and 2 x size bytes per round
    /// trip), when measured: of this process (both ends with `--self`), or of both
    /// `fi_pingpong` processes for the libfabric reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::CpuCost>,
}

/// The bookkeeping of one size's round trips, shared by the MSG and RDM ping-pongs:
/// warm-up, the timed part (wall clock less the untimed echo checks, CPU time), the
/// per-round-trip samples, and the echo check of every round trip with `verify` (of
/// the last one without). The echo lands at offset `at` of `mr`; `pattern` was sent.
pub(crate) struct SizeRun<'a> {
    mr: &'a MemoryRegion,
    at: usize,
    pattern: &'a [u8],
    iters: usize,
    warmup: usize,
    verify: bool,
    samples: Vec<f64>,
    timed_start: Instant,
    untimed: Duration,
    cpu0: f64,
}

impl<'a> SizeRun<'a> {
    pub(crate) fn new(
        mr: &'a MemoryRegion,
        at: usize,
        pattern: &'a [u8],
        iters: usize,
        warmup: usize,
        verify: bool,
    ) -> Self {
        SizeRun {
            mr,
            at,
            pattern,
            iters,
            warmup,
            verify,
            samples: Vec::with_capacity(iters),
            timed_start: Instant::now(),
            untimed: Duration::ZERO,
            cpu0: crate::cpu_seconds(false),
        }
    }

    /// Round trips to run, warm-up included.
    pub(crate) fn rounds(&self) -> usize {
        self.warmup + self.iters
    }

    /// Before round trip `i`: the timed part starts at the first timed one; with
    /// `verify` the echo buffer is cleared, so a lost or partial echo cannot pass on
    /// the previous one's bytes.
    pub(crate) fn begin(&mut self, i: usize) -> ToolResult<()> {
        if i == self.warmup {
            self.cpu0 = crate::cpu_seconds(false);
            self.timed_start = Instant::now();
            self.untimed = Duration::ZERO;
        }
        if self.verify {
            let t = Instant::now();
            self.mr
                .fill(self.at, self.pattern.len(), 0x5A)
                .map_err(ctx("clear"))?;
            self.untimed += t.elapsed();
        }
        Ok(())
    }

    /// After round trip `i`, started at `t0`: records it and checks the echo.
    pub(crate) fn end(&mut self, i: usize, t0: Instant) -> ToolResult<()> {
        if i >= self.warmup {
            self.samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        if self.verify || i + 1 == self.rounds() {
            let t = Instant::now();
            let size = self.pattern.len();
            let echoed = self.mr.to_vec(self.at, size).map_err(ctx("read echo"))?;
            if let Some(at) = echoed.iter().zip(self.pattern).position(|(a, b)| a != b) {
                return Err(format!(
                    "size {size}, round trip {i}: the echo differs from what was sent \
                     at byte {at}"
                ));
            }
            self.untimed += t.elapsed();
        }
        Ok(())
    }

    /// The size's figures.
    pub(crate) fn result(self) -> PpResult {
        let (size, iters) = (self.pattern.len(), self.iters);
        let cpu = crate::cpu_seconds(false) - self.cpu0;
        let wall = self.timed_start.elapsed();
        let elapsed = wall.saturating_sub(self.untimed).as_secs_f64() * 1e6;
        let mean = elapsed / (2.0 * iters.max(1) as f64);
        PpResult {
            size,
            iterations: iters,
            lat_median_us: median(&self.samples) / 2.0,
            lat_p99_us: Some(crate::quantile(&self.samples, 0.99) / 2.0),
            lat_mean_us: mean,
            mb_per_s: if mean > 0.0 { size as f64 / mean } else { 0.0 },
            cpu: Some(crate::CpuCost::new(
                cpu,
                wall.as_secs_f64(),
                (2 * size * iters) as f64,
                (2 * iters) as f64,
            )),
        }
    }
}

/// Waits for one successful completion.
pub fn next_completion(cq: &CompletionQueue, mode: Mode) -> ToolResult<Completion> {
    let c = match mode {
        Mode::Poll => cq.poll_wait(OP_TIMEOUT),
        Mode::Sleep => cq.wait(OP_TIMEOUT),
    }
    .map_err(ctx("waiting for a completion"))?;
    if let Err(e) = &c.status {
        return Err(format!("operation {} failed: {e}", c.context));
    }
    Ok(c)
}

pub(crate) fn encode_config(plan: &[(usize, usize)], warmup: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + plan.len() * 16);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(plan.len() as u32).to_le_bytes());
    v.extend_from_slice(&(warmup as u64).to_le_bytes());
    for &(s, i) in plan {
        v.extend_from_slice(&(s as u64).to_le_bytes());
        v.extend_from_slice(&(i as u64).to_le_bytes());
    }
    v
}

/// How long a server waits, once it has echoed everything, for its last echoes to
/// be acknowledged and the client to close (under loss, a retransmitted echo or ACK
/// needs the server's endpoint a while longer).
pub const LINGER: Duration = Duration::from_secs(10);

/// Largest warm-up or iteration count a server accepts (a bound, not a policy: about
/// an hour of 1 us round trips).
const MAX_COUNT: usize = 1 << 32;

pub(crate) fn decode_config(b: &[u8]) -> ToolResult<(Vec<(usize, usize)>, usize)> {
    let bad = |why: &str| format!("malformed ping-pong configuration from the client: {why}");
    if b.len() < 16 || &b[0..4] != MAGIC {
        return Err(bad("no header"));
    }
    let n = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    // The count must match the bytes that came: nothing is allocated on its word.
    if n.checked_mul(16).and_then(|x| x.checked_add(16)) != Some(b.len()) {
        return Err(bad(&format!(
            "{n} sizes announced in a message of {} bytes",
            b.len()
        )));
    }
    let u = |i: usize| -> ToolResult<usize> {
        let x: [u8; 8] = b
            .get(i..i + 8)
            .and_then(|x| x.try_into().ok())
            .ok_or_else(|| bad("short"))?;
        usize::try_from(u64::from_le_bytes(x)).map_err(|_| bad("value too large"))
    };
    let warmup = u(8)?;
    if warmup > MAX_COUNT {
        return Err(bad(&format!("warm-up count {warmup}")));
    }
    let mut plan = Vec::with_capacity(n);
    for k in 0..n {
        let (size, iters) = (u(16 + k * 16)?, u(24 + k * 16)?);
        if iters > MAX_COUNT {
            return Err(bad(&format!("iteration count {iters}")));
        }
        plan.push((size, iters));
    }
    Ok((plan, warmup))
}

pub(crate) fn plan(opts: &Options) -> Vec<(usize, usize)> {
    opts.sizes
        .iter()
        .map(|&s| (s, opts.iterations.unwrap_or_else(|| auto_iterations(s))))
        .collect()
}

fn check_sizes(side: &Side, sizes: &[usize]) -> ToolResult<()> {
    let max = side.info.limits.max_msg_size;
    if let Some(s) = sizes.iter().find(|&&s| s > max) {
        return Err(format!(
            "size {s} exceeds the provider's max_msg_size {max}"
        ));
    }
    Ok(())
}

/// The client half: sends the configuration, then measures each size.
pub fn client(side: &Side, opts: &Options) -> ToolResult<Vec<PpResult>> {
    check_sizes(side, &opts.sizes)?;
    let plan = plan(opts);
    let cfg = encode_config(&plan, opts.warmup);
    if cfg.len() > CONFIG_MAX {
        return Err("too many sizes".into());
    }
    let max = opts
        .sizes
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(CONFIG_MAX);
    let mr = side
        .domain
        .alloc(2 * max, Access::LOCAL)
        .map_err(ctx("register buffers"))?;
    mr.write_at(0, &cfg).map_err(ctx("config"))?;
    side.ep
        .send(mr.iov(0, cfg.len()), SEND_CTX)
        .map_err(ctx("send config"))?;
    next_completion(&side.cq, opts.mode)?;

    let mut results = Vec::with_capacity(plan.len());
    for &(size, iters) in &plan {
        let pattern: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        mr.write_at(0, &pattern).map_err(ctx("fill"))?;
        mr.fill(max, size, 0).map_err(ctx("clear"))?;
        let mut run = SizeRun::new(&mr, max, &pattern, iters, opts.warmup, opts.verify);
        for i in 0..run.rounds() {
            run.begin(i)?;
            side.ep
                .recv(mr.iov(max, size), RECV_CTX)
                .map_err(ctx("post receive"))?;
            let t0 = Instant::now();
            side.ep
                .send(mr.iov(0, size), SEND_CTX)
                .map_err(ctx("send"))?;
            let (mut sent, mut got) = (false, false);
            while !(sent && got) {
                let c = next_completion(&side.cq, opts.mode)?;
                match c.context {
                    SEND_CTX => sent = true,
                    RECV_CTX => {
                        if c.len != size {
                            return Err(format!("echo of {} bytes, expected {size}", c.len));
                        }
                        got = true
                    }
                    other => return Err(format!("unexpected completion context {other}")),
                }
            }
            run.end(i, t0)?;
        }
        results.push(run.result());
    }
    Ok(results)
}

/// The server half: receives the configuration and echoes every message.
pub fn server(side: &Side, mode: Mode) -> ToolResult<()> {
    let cfg_mr = side
        .domain
        .alloc(CONFIG_MAX, Access::LOCAL)
        .map_err(ctx("register"))?;
    side.ep
        .recv(cfg_mr.full(), RECV_CTX)
        .map_err(ctx("post receive"))?;
    let c = next_completion(&side.cq, mode)?;
    let (plan, warmup) = decode_config(&cfg_mr.to_vec(0, c.len).map_err(ctx("config"))?)?;
    check_sizes(side, &plan.iter().map(|p| p.0).collect::<Vec<_>>())?;
    let max = plan.iter().map(|p| p.0).max().unwrap_or(0);
    // Two buffers: echo from one while the next message lands in the other.
    let mr = side
        .domain
        .alloc(2 * max.max(1), Access::LOCAL)
        .map_err(ctx("register buffers"))?;
    for (size, iters) in plan {
        let total = warmup + iters;
        let buf = |k: usize| mr.iov((k % 2) * max, size);
        side.ep
            .recv(buf(0), RECV_CTX)
            .map_err(ctx("post receive"))?;
        for i in 0..total {
            // Wait for message i (send completions may arrive in between).
            loop {
                let c = next_completion(&side.cq, mode)?;
                if c.context == RECV_CTX {
                    break;
                }
            }
            // Echo first, then post the next receive: the echo is the critical path
            // (as a raw ping-pong's read-then-write), and the client's next message
            // cannot leave before the echo has reached it. Should it arrive first all
            // the same, the provider buffers it as unexpected until the receive is
            // posted.
            side.ep.send(buf(i), SEND_CTX).map_err(ctx("echo"))?;
            if i + 1 < total {
                side.ep
                    .recv(buf(i + 1), RECV_CTX)
                    .map_err(ctx("post receive"))?;
            }
        }
    }
    linger(side)
}

/// The end of a server: waits until the client has closed (it closes once it has
/// every echo; its last ACKs may need this endpoint), at most [`LINGER`], so a clean
/// run under loss ends cleanly at both ends. Completions that arrive meanwhile (the
/// last echoes', possibly canceled by the client's close) are drained: the client
/// judges the run.
pub fn linger(side: &Side) -> ToolResult<()> {
    let deadline = Instant::now() + LINGER;
    while Instant::now() < deadline {
        if side.cq.try_next().map_err(ctx("cq"))?.is_some() {
            continue;
        }
        match side.eq.read().map_err(ctx("eq"))? {
            Some(fabric::Event::Shutdown { .. }) => return Ok(()),
            Some(_) => {}
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    Ok(())
}

/// Runs both halves in this process over `node` (a loopback address).
pub fn run_self(provider: &str, node: &str, opts: &Options) -> ToolResult<Vec<PpResult>> {
    let mode = opts.mode;
    conn::run_self(
        provider,
        node,
        move |side| server(side, mode),
        |side| client(side, opts),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip_and_rejects_garbage() {
        let plan = vec![(8, 1000), (1 << 20, 200)];
        let (p, w) = decode_config(&encode_config(&plan, 7)).unwrap();
        assert_eq!(p, plan);
        assert_eq!(w, 7);
        assert!(decode_config(b"nope").is_err());
        let mut trunc = encode_config(&plan, 7);
        trunc.truncate(30);
        assert!(decode_config(&trunc).is_err());
    }

    /// The attack of the hostile-peer review: 28 bytes claiming 2^32-1 sizes used to
    /// make the server allocate 64 GiB and abort.
    #[test]
    fn a_huge_announced_count_is_refused_without_allocating() {
        let mut b = encode_config(&[(8, 10)], 0);
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        b.truncate(28);
        let e = decode_config(&b).unwrap_err();
        assert!(
            e.contains("4294967295 sizes announced in a message of 28 bytes"),
            "{e}"
        );
        // Absurd counts are refused too.
        let e = decode_config(&encode_config(&[(8, usize::MAX)], 0)).unwrap_err();
        assert!(e.contains("iteration count"), "{e}");
        let e = decode_config(&encode_config(&[(8, 1)], usize::MAX)).unwrap_err();
        assert!(e.contains("warm-up count"), "{e}");
    }
}

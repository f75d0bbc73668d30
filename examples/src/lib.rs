//! Shared code of the bundled tools: connection setup, the ping-pong (MSG endpoints,
//! and RDM endpoints in [`rdmpp`]) and RMA-bandwidth benchmarks, raw-socket reference
//! measurements (ping-pongs and one-way streams), CPU cost ([`CpuCost`]), and report
//! output (table, JSON, Markdown, SVG).
//!
//! ```no_run
//! use fabric_examples::{pingpong, Mode};
//! let opts = pingpong::Options { sizes: vec![8, 4096], iterations: None, warmup: 10, mode: Mode::Poll, verify: true };
//! let results = pingpong::run_self("tcp", "127.0.0.1", &opts).unwrap();
//! println!("8 B one-way: {:.2} us", results[0].lat_median_us);
//! ```

pub mod conn;
pub mod pingpong;
pub mod pmem_commit;
pub mod rawnet;
pub mod rcpp;
pub mod rdmpp;
pub mod reference;
pub mod report;
pub mod rmabw;
pub mod rping;
pub mod sizes;

/// Makes a closed standard output end the tool quietly, as it ends `cat` or `ls`
/// (`fabric-info | head` used to panic with "failed printing to stdout: Broken
/// pipe"): restores the default action of SIGPIPE, which the Rust runtime ignores.
/// Sockets are unaffected: the providers and std send with `MSG_NOSIGNAL`. Call it
/// first thing in `main`.
pub fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// How a tool waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Busy-poll the completion queue (lowest latency; what fi_pingpong does).
    Poll,
    /// Sleep in the completion queue's blocking read.
    Sleep,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" => Ok(Mode::Poll),
            "sleep" => Ok(Mode::Sleep),
            _ => Err(format!("mode '{s}': expected poll or sleep")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Poll => "poll",
            Mode::Sleep => "sleep",
        })
    }
}

/// CPU time (user + system) of this process, all its threads, in seconds
/// (`getrusage(RUSAGE_SELF)`); with `children`, of its waited-for child processes
/// (`RUSAGE_CHILDREN`) instead.
pub fn cpu_seconds(children: bool) -> f64 {
    let who = if children {
        libc::RUSAGE_CHILDREN
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// What a measured span cost in CPU: seconds of CPU (every thread of the process,
/// user + system; with `--self` both ends are in the process and counted) per GB
/// moved and per million messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CpuCost {
    /// CPU seconds spent in the span.
    pub cpu_s: f64,
    /// Wall seconds of the span (cpu_s / wall_s is the cores kept busy).
    pub wall_s: f64,
    /// CPU seconds per 10^9 bytes moved.
    pub s_per_gb: f64,
    /// CPU seconds per 10^6 messages (or transfers).
    pub s_per_mmsg: f64,
}

impl CpuCost {
    /// The cost of `cpu_s` CPU seconds over `wall_s` for `bytes` moved in `msgs`
    /// messages.
    pub fn new(cpu_s: f64, wall_s: f64, bytes: f64, msgs: f64) -> CpuCost {
        let per = |x: f64, unit: f64| if x > 0.0 { cpu_s / (x / unit) } else { 0.0 };
        CpuCost {
            cpu_s,
            wall_s,
            s_per_gb: per(bytes, 1e9),
            s_per_mmsg: per(msgs, 1e6),
        }
    }

    /// Measures `f`'s CPU and wall time (of this process) for `bytes` in `msgs`.
    pub fn measure<T>(bytes: f64, msgs: f64, f: impl FnOnce() -> T) -> (T, CpuCost) {
        let (c0, t0) = (cpu_seconds(false), std::time::Instant::now());
        let r = f();
        let (cpu, wall) = (cpu_seconds(false) - c0, t0.elapsed().as_secs_f64());
        (r, CpuCost::new(cpu, wall, bytes, msgs))
    }

    /// Cores kept busy on average (CPU seconds per wall second).
    pub fn cores(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.cpu_s / self.wall_s
        } else {
            0.0
        }
    }
}

/// Error type of the tools: a message for the user.
pub type ToolResult<T> = Result<T, String>;

/// Converts any displayable error into a tool error with context.
pub fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The `q` quantile of `v` (0 to 1: the smallest value with at least that fraction of
/// the values at or below it); 0 for an empty slice.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let k = ((q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[k - 1]
}

/// Median of a sample (sorted copy); 0 for an empty one.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_cost_counts_a_busy_span() {
        let (_, c) = super::CpuCost::measure(2e9, 4e6, || {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < std::time::Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        // A busy span of 50 ms wall is CPU time (ticks are 1-10 ms coarse).
        assert!(c.cpu_s > 0.0 && c.wall_s >= 0.05, "{c:?}");
        assert!((c.s_per_gb - c.cpu_s / 2.0).abs() < 1e-12);
        assert!((c.s_per_mmsg - c.cpu_s / 4.0).abs() < 1e-12);
        assert_eq!(super::CpuCost::new(1.0, 1.0, 0.0, 0.0).s_per_gb, 0.0);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }

    #[test]
    fn quantile_nearest_rank() {
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(super::quantile(&v, 0.99), 198.0);
        assert_eq!(super::quantile(&v, 0.5), 100.0);
        assert_eq!(super::quantile(&v, 1.0), 200.0);
        assert_eq!(super::quantile(&v, 0.0), 1.0);
        assert_eq!(super::quantile(&[7.0], 0.99), 7.0);
        assert_eq!(super::quantile(&[], 0.99), 0.0);
    }
}

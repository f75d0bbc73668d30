//! Shared code of the bundled tools: connection setup, the ping-pong and RMA-bandwidth
//! benchmarks, raw-socket reference measurements, and report output (table, JSON,
//! Markdown, SVG).
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

/// Error type of the tools: a message for the user.
pub type ToolResult<T> = Result<T, String>;

/// Converts any displayable error into a tool error with context.
pub fn ctx<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
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
    fn median_odd_even_empty() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }
}

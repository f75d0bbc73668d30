//! Logging for the tools: a minimal `tracing` subscriber printing events to stderr
//! (time since start, level, target, message and fields), filtered by a maximum
//! level taken from `NVMEOF_LOG` (error, warn, info, debug, trace); and a flag set by
//! SIGINT or SIGTERM for a clean shutdown.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Prints events at `max` level and above to stderr.
#[derive(Debug)]
pub struct StderrSubscriber {
    max: Level,
    start: Instant,
    next_span: AtomicU64,
}

impl StderrSubscriber {
    /// A subscriber showing `max` and more severe levels.
    pub fn new(max: Level) -> StderrSubscriber {
        StderrSubscriber {
            max,
            start: Instant::now(),
            next_span: AtomicU64::new(1),
        }
    }
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for StderrSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let t = self.start.elapsed();
        let meta = event.metadata();
        let mut line = Line(format!(
            "{:>5}.{:03} {:>5} {}:",
            t.as_secs(),
            t.subsec_millis(),
            meta.level(),
            meta.target()
        ));
        event.record(&mut line);
        line.0.push('\n');
        let _ = std::io::stderr().lock().write_all(line.0.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// The level `NVMEOF_LOG` names, else `default`.
pub fn level_from_env(default: Level) -> Level {
    match std::env::var("NVMEOF_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "error" => Level::ERROR,
        "warn" => Level::WARN,
        "info" => Level::INFO,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => default,
    }
}

/// Installs a [`StderrSubscriber`] as the global default (once; later calls do
/// nothing).
pub fn init(default: Level) {
    let _ = tracing::subscriber::set_global_default(StderrSubscriber::new(level_from_env(default)));
}

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig as u64, Ordering::Release);
    STOP.store(true, Ordering::Release);
}

/// Makes SIGINT and SIGTERM set the flag [`stop_requested`] reads (instead of
/// ending the process), and SIGPIPE end it quietly.
pub fn install_stop_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to atomics, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether SIGINT or SIGTERM arrived: the signal's name.
pub fn stop_requested() -> Option<&'static str> {
    if !STOP.load(Ordering::Acquire) {
        return None;
    }
    Some(match SIGNAL.load(Ordering::Acquire) as libc::c_int {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    })
}

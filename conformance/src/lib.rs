//! # fabric-conformance
//!
//! The conformance suite of the fabric API: cases in the spirit of libfabric's fabtests
//! (unit and functional groups) that any provider must pass, run from `cargo test` and
//! from the `fabric-conformance` binary, which prints one line per case and ends with
//! `N passed, N failed, N skipped`.
//!
//! ## Groups
//! - `getinfo`: hint matching (capabilities, endpoint type, provider name, addresses,
//!   progress), rejection reasons that name the missing capability or endpoint type,
//!   sane limits (`inject_size <= max_msg_size`, ...), the `FABRIC_PROVIDER` filter
//!   (through [`fabric::Registry::explain_with_filter`], never by changing the
//!   process environment).
//! - `mr`: keys unique and non-zero over many registrations, the `remote()` descriptor
//!   and its wire form, `read_at`/`write_at` bounds, local access rights checked at
//!   post (a send from a region without SEND access fails with `AccessDenied` and
//!   nothing reaches the peer), PMEM registration of heap memory refused, regions of
//!   another domain refused.
//! - `cq`: empty reads, bounded `sread`/`wait` timeouts, contexts and flags of
//!   completions, batched reads, error entries with detail, separate transmit and
//!   receive queues, selective completion, a sleeping waiter woken, async completions
//!   under tokio.
//! - `eq`: empty reads and timeouts, connection data both ways, oversized connection
//!   data refused, request info, a second connect refused, two clients on one
//!   listener, async events under tokio, shutdown events on both sides.
//! - `msg`: send/recv at sizes 0 to the provider's maximum (capped at 64 MiB),
//!   ordering of 1,000 messages, hundreds of operations in flight, inject and its size
//!   limit, remote CQ data, gather/scatter iovecs, unexpected messages, truncation,
//!   completion levels, manual progress with a thread per side, automatic progress.
//! - `rma`: write and read at many sizes and offsets (unaligned, across pages), write
//!   then read back, `writemsg`/`readmsg` with several local and remote iovecs,
//!   `writedata` consuming a posted receive (also when it comes before the receive),
//!   DELIVERY_COMPLETE, `inject_write`, UNCACHED targets, many writes in flight.
//! - `errors`: bad key, out of bounds (also offsets near `u64::MAX`), missing
//!   REMOTE_WRITE / REMOTE_READ, a key of a dropped region: each an error completion
//!   `RemoteAccess` with the target memory verified untouched; connection refused;
//!   reject with data; peer death mid-transfer; operations after shutdown; length
//!   mismatches and iovec limits refused at post. Each violation runs on a fresh pair
//!   and checks that it ended the connection at both ends (`semantics`).
//! - `pmem` (needs `RMA_PMEM`): COMMIT_COMPLETE writes into `pmem::Mapping` regions
//!   registered PMEM are in the file when they complete (1 B to 1 MiB, several iovecs,
//!   with remote CQ data, PMEM | UNCACHED), DELIVERY_COMPLETE vs COMMIT_COMPLETE
//!   completion flags, COMMIT naming a non-PMEM region refused with `RemoteInvalid` and
//!   nothing touched, INJECT | COMMIT_COMPLETE.
//! - `semantics`: the rules every provider keeps, as RC queue pairs do: a refused
//!   remote access ends the connection at both ends (`RemoteAccess` for it, `Canceled`
//!   for what was posted after, `Shutdown { reason: AccessError }` on both, target
//!   untouched); posts to an ended connection fail at the call (`NotConnected`, or
//!   `Shutdown` on the side that shut down); one Shutdown per end with its reason
//!   (`Local`, `Peer`); a write with remote CQ data completes at the initiator only once
//!   it consumed a receive at the target; a server that does not read its queues for
//!   2 s does not break its client's connection.
//!
//! Cases declare the capabilities they need ([`Case::needs`]); when the provider's
//! getinfo does not offer them the case is skipped with the provider's reason. A case
//! may also skip itself ([`CaseError::Skip`]) when a limit makes it meaningless.
//!
//! ## Running it
//! ```text
//! cargo run -p fabric-conformance -- -p tcp                 # everything
//! cargo run -p fabric-conformance -- -p tcp --filter 'rma/*' # one group
//! cargo run -p fabric-conformance -- -p tcp --list           # what exists
//! cargo run -p fabric-conformance -- -p tcp --json           # for machines
//! cargo test -p fabric-conformance                          # against tcp
//! ```
//!
//! ## Against a new provider
//! 1. Register it in the `fabric` facade crate (`providers/all`) behind a cargo
//!    feature, so `fabric::registry()` knows it.
//! 2. Run `fabric-conformance -p NAME`. Everything runs over 127.0.0.1 with listeners
//!    on port 0; the provider must accept `node`/`service`/`source` hints for that.
//! 3. Add `tests/NAME.rs` like `tests/tcp.rs` so `cargo test` keeps it passing.
//!
//! ## Writing a case
//! A case is a function `fn(&Ctx) -> CaseResult` listed in [`cases::all`]. Use
//! [`Ctx::pair`] for a connected pair (the one piece of connection setup), the `Pair`
//! waits (which drive both sides, so manual progress works in one thread), bounded
//! waits only, and [`ensure!`]/[`ensure_eq!`]/[`Check::ctx`] to fail with a message:
//! ```
//! use fabric::{Access, Caps};
//! use fabric_conformance::{ensure_eq, Case, CaseResult, Check, Ctx, Who};
//!
//! fn hello(ctx: &Ctx) -> CaseResult {
//!     let p = ctx.pair(Caps::MSG)?;
//!     let rx = p.server.alloc(5, Access::RECV)?;
//!     let tx = p.client.alloc(5, Access::SEND)?;
//!     tx.write_at(0, b"hello").ctx("fill")?;
//!     p.server.ep.recv(rx.full(), 1).ctx("recv")?;
//!     p.client.ep.send(tx.full(), 2).ctx("send")?;
//!     ensure_eq!(p.wait_ok(Who::Server)?.len, 5, "received length");
//!     ensure_eq!(rx.to_vec(0, 5).ctx("read")?, b"hello".to_vec(), "payload");
//!     Ok(())
//! }
//!
//! let case = Case { group: "msg", name: "hello", about: "says hello", needs: Caps::MSG, run: hello };
//! assert_eq!(case.id(), "msg/hello");
//! ```

pub mod case;
pub mod cases;
pub mod ctx;
pub mod pair;
pub mod payload;
pub mod runner;

pub use case::{expect_err, Case, CaseError, CaseResult, Check};
pub use ctx::{Ctx, Node};
pub use pair::{Pair, PairConfig, Side, Who};
pub use runner::{run, CaseReport, Outcome, Report, RunError, RunOptions};

/// A context for `provider` in the registry of every compiled-in provider.
pub fn ctx_for(provider: &str) -> Ctx {
    Ctx::new(provider, fabric::registry().clone())
}

/// Runs one group of the suite against `provider` for `cargo test`: prints every case
/// line and panics, listing the failed cases, if any case failed or none passed (a
/// provider that cannot run here fails rather than skips).
pub fn assert_group(provider: &str, group: &str) {
    let opts = RunOptions {
        filter: Some(format!("{group}/*")),
        ..RunOptions::default()
    };
    let report = run(&ctx_for(provider), &cases::all(), &opts, |r| {
        println!("{r}")
    })
    .unwrap_or_else(|e| panic!("cannot run the suite against {provider}: {e}"));
    println!("{group}: {}", report.summary());
    assert!(report.cases.iter().all(|c| c.group == group));
    assert!(
        report.failed == 0,
        "{} of {} {group} cases failed against {provider}:\n{}",
        report.failed,
        report.cases.len(),
        report.failures().join("\n")
    );
    assert!(
        report.passed > 0,
        "no {group} case passed against {provider}: {}",
        report.summary()
    );
}

/// Defines one `#[test]` per group of the suite against a provider, plus a test that
/// the groups cover every case. `guard` (optional) is evaluated and held for the
/// duration of each test, e.g. a lock that serializes tests sharing a device.
///
/// ```ignore
/// fabric_conformance::group_tests!("tcp");
/// ```
#[macro_export]
macro_rules! group_tests {
    ($provider:expr $(, guard = $guard:expr)?) => {
        $crate::group_tests!(@one $provider, getinfo $(, $guard)?);
        $crate::group_tests!(@one $provider, mr $(, $guard)?);
        $crate::group_tests!(@one $provider, cq $(, $guard)?);
        $crate::group_tests!(@one $provider, eq $(, $guard)?);
        $crate::group_tests!(@one $provider, msg $(, $guard)?);
        $crate::group_tests!(@one $provider, rma $(, $guard)?);
        $crate::group_tests!(@one $provider, errors $(, $guard)?);
        $crate::group_tests!(@one $provider, pmem $(, $guard)?);
        $crate::group_tests!(@one $provider, semantics $(, $guard)?);
        $crate::group_tests!(@one $provider, av $(, $guard)?);
        $crate::group_tests!(@one $provider, rdm $(, $guard)?);
        $crate::group_tests!(@one $provider, tagged $(, $guard)?);
        $crate::group_tests!(@one $provider, atomic $(, $guard)?);
        $crate::group_tests!(@one $provider, cntr $(, $guard)?);

        /// The per-group tests together run every case.
        #[test]
        fn groups_cover_every_case() {
            let tested = [
                "getinfo", "mr", "cq", "eq", "msg", "rma", "errors", "pmem", "semantics", "av",
                "rdm", "tagged", "atomic", "cntr",
            ];
            assert_eq!($crate::cases::GROUPS, tested);
            for c in $crate::cases::all() {
                assert!(tested.contains(&c.group), "{} is in no tested group", c.id());
            }
        }
    };
    (@one $provider:expr, $group:ident $(, $guard:expr)?) => {
        #[test]
        fn $group() {
            $(let _guard = $guard;)?
            $crate::assert_group($provider, stringify!($group));
        }
    };
}

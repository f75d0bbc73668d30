//! The cases, one module per group, and [`all`] that lists them.

use fabric::{Caps, Completion, CqErrorKind, Limits};

use crate::case::{Case, CaseError, CaseResult, Check};
use crate::pair::Pair;
use crate::payload::pattern;

pub mod atomic;
pub mod atomic_msg;
pub mod av;
pub mod cntr;
pub mod cq;
pub mod eq;
pub mod errors;
pub mod getinfo;
pub mod mr;
pub mod msg;
pub mod pmem;
pub mod rdm;
pub mod rma;
pub mod semantics;
pub mod tagged;

/// Every case, group by group.
pub fn all() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(getinfo::cases());
    v.extend(mr::cases());
    v.extend(cq::cases());
    v.extend(eq::cases());
    v.extend(msg::cases());
    v.extend(rma::cases());
    v.extend(errors::cases());
    v.extend(pmem::cases());
    v.extend(semantics::cases());
    v.extend(av::cases());
    v.extend(rdm::cases());
    v.extend(tagged::cases());
    v.extend(atomic::cases());
    v.extend(atomic_msg::cases());
    v.extend(cntr::cases());
    v
}

/// The group names, in run order.
pub const GROUPS: &[&str] = &[
    "getinfo",
    "mr",
    "cq",
    "eq",
    "msg",
    "rma",
    "errors",
    "pmem",
    "semantics",
    "av",
    "rdm",
    "tagged",
    "atomic",
    "cntr",
];

/// Shorthand for a table entry.
pub(crate) const fn case(
    group: &'static str,
    name: &'static str,
    needs: Caps,
    about: &'static str,
    run: fn(&crate::Ctx) -> CaseResult,
) -> Case {
    Case {
        group,
        name,
        about,
        needs,
        run,
    }
}

/// The limits of the pair's endpoints.
pub(crate) fn limits(p: &Pair) -> Limits {
    p.client.ep.info().limits
}

/// Skips the case unless the endpoints allow `iov` local and `rma_iov` remote iovecs
/// per operation.
pub(crate) fn require_iovs(p: &Pair, iov: usize, rma_iov: usize) -> CaseResult {
    let l = limits(p);
    if l.iov_limit < iov || l.rma_iov_limit < rma_iov {
        return Err(CaseError::skip(format!(
            "iov_limit {} / rma_iov_limit {} below {iov} / {rma_iov}",
            l.iov_limit, l.rma_iov_limit
        )));
    }
    Ok(())
}

/// An RMA-write source gathered from three iovecs over two regions (out of order and
/// unaligned), with the 4,130 bytes they gather in order.
pub(crate) struct Gather {
    a: fabric::MemoryRegion,
    b: fabric::MemoryRegion,
    /// What the three iovecs gather, in order.
    pub expected: Vec<u8>,
}

impl Gather {
    /// Registers and fills the two regions on `side` from patterns `seed` and `seed + 1`.
    pub(crate) fn new(side: &crate::Side, seed: u64) -> Result<Self, CaseError> {
        let a = side.alloc(5000, fabric::Access::WRITE)?;
        let b = side.alloc(200, fabric::Access::WRITE)?;
        let (pa, pb) = (pattern(seed, 5000), pattern(seed + 1, 200));
        a.write_at(0, &pa).ctx("fill")?;
        b.write_at(0, &pb).ctx("fill")?;
        let mut expected = pb[100..].to_vec();
        expected.extend_from_slice(&pa[1..4001]);
        expected.extend_from_slice(&pb[..30]);
        Ok(Gather { a, b, expected })
    }

    /// The three local iovecs.
    pub(crate) fn iovs(&self) -> [fabric::LocalIov<'_>; 3] {
        [self.b.iov(100, 100), self.a.iov(1, 4000), self.b.iov(0, 30)]
    }
}

/// A remote iovec of the first 64 bytes of `r` with a key that is not `r`'s.
pub(crate) fn wrong_key(r: &fabric::RemoteMr) -> fabric::RemoteIov {
    let mut i = r.iov(0, 64);
    i.key = r.key ^ 0x5A5A_5A5A;
    i
}

/// Whether `c` is an operation flushed by the end of its connection (`Canceled`, or
/// `ConnectionLost` where the connection was lost).
pub(crate) fn is_flushed(c: &Completion) -> bool {
    matches!(&c.status, Err(e) if matches!(e.kind, CqErrorKind::Canceled | CqErrorKind::ConnectionLost))
}

/// Fails unless `c` is an error completion of `kind`.
pub(crate) fn expect_cq_error(c: &Completion, kind: CqErrorKind, what: &str) -> CaseResult {
    match &c.status {
        Err(e) if e.kind == kind => Ok(()),
        Err(e) => Err(CaseError::fail(format!(
            "{what}: expected error completion {kind:?}, got {:?} ({e})",
            e.kind
        ))),
        Ok(()) => Err(CaseError::fail(format!(
            "{what}: expected error completion {kind:?}, got success {c:?}"
        ))),
    }
}

/// Fails unless `c` has all of `flags`.
pub(crate) fn expect_flags(c: &Completion, flags: fabric::CompFlags, what: &str) -> CaseResult {
    if !c.flags.contains(flags) {
        return Err(CaseError::fail(format!(
            "{what}: completion flags {:?} lack {:?}",
            c.flags,
            flags - c.flags
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_and_groups_known() {
        let all = all();
        let ids: HashSet<String> = all.iter().map(|c| c.id()).collect();
        assert_eq!(ids.len(), all.len(), "duplicate case ids");
        assert!(all.len() >= 45, "only {} cases", all.len());
        for c in &all {
            assert!(GROUPS.contains(&c.group), "unknown group of {}", c.id());
            assert!(!c.about.is_empty(), "{} has no description", c.id());
        }
    }
}

//! The cases, one module per group, and [`all`] that lists them.

use fabric::{Caps, Completion, CqErrorKind, Limits};

use crate::case::{Case, CaseError, CaseResult};
use crate::pair::Pair;

pub mod cq;
pub mod eq;
pub mod errors;
pub mod getinfo;
pub mod mr;
pub mod msg;
pub mod pmem;
pub mod rma;

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
    v
}

/// The group names, in run order.
pub const GROUPS: &[&str] = &["getinfo", "mr", "cq", "eq", "msg", "rma", "errors", "pmem"];

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

//! av: address vectors of the RDM layer (libfabric `fi_av`): insert, lookup,
//! reverse lookup, remove, refused names, and getinfo's RDM answer.

use fabric::rdm::{AddressVector, AvAttr, RdmAttr};
use fabric::{Access, Caps, EpType, ErrorKind};

use super::case;
use super::rdm::{alloc, rdm_info, world, NEEDS};
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::{ensure, ensure_eq};

const G: &str = "av";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "getinfo_rdm", NEEDS, "getinfo with EpType::Rdm answers '<provider>;rxm' with TAGGED and ATOMIC over a MSG answer", getinfo_rdm),
        case(G, "insert_lookup_remove", NEEDS, "insert (twice: one handle), lookup, reverse lookup, remove (twice: error)", insert_lookup_remove),
        case(G, "bad_names_and_handles", NEEDS, "a malformed name, a full table and a removed handle are errors", bad_names_and_handles),
    ]
}

fn getinfo_rdm(ctx: &Ctx) -> CaseResult {
    let info = rdm_info(ctx)?;
    ensure_eq!(info.info().ep_type, EpType::Rdm, "ep_type");
    ensure_eq!(
        info.info().provider_name,
        format!("{};rxm", ctx.provider()),
        "provider name"
    );
    ensure!(
        info.info()
            .caps
            .contains(Caps::TAGGED | Caps::ATOMIC | Caps::MSG),
        "caps {:?}",
        info.info().caps
    );
    ensure_eq!(info.msg().ep_type, EpType::Msg, "the layer runs on MSG");
    ensure_eq!(
        info.msg().provider_name,
        ctx.provider(),
        "underlying provider"
    );
    Ok(())
}

fn insert_lookup_remove(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let (a, b) = (&w[0], &w[1]);
    let av = AddressVector::open(&a.domain, AvAttr::default()).ctx("open av")?;
    ensure!(av.is_empty(), "a new av is not empty");
    let name = b.ep.name();
    let h = av.insert(&name).ctx("insert")?;
    ensure_eq!(
        av.insert(&name).ctx("insert again")?,
        h,
        "the same name, the same handle"
    );
    ensure_eq!(av.lookup(h), Some(name.clone()), "lookup");
    ensure_eq!(av.reverse_lookup(&name), Some(h), "reverse lookup");
    let h2 = av.insert(&a.ep.name()).ctx("insert")?;
    ensure!(h2 != h, "two names, one handle");
    ensure_eq!(av.len(), 2, "len");
    av.remove(h).ctx("remove")?;
    ensure_eq!(av.lookup(h), None, "lookup after remove");
    ensure_eq!(
        av.reverse_lookup(&name),
        None,
        "reverse lookup after remove"
    );
    ensure!(av.remove(h).is_err(), "removing twice succeeded");
    ensure_eq!(av.len(), 1, "len after remove");
    Ok(())
}

fn bad_names_and_handles(ctx: &Ctx) -> CaseResult {
    let w = world(ctx, 2, RdmAttr::default())?;
    let a = &w[0];
    for bad in [&b""[..], b"garbage", &[4, 127, 0, 0, 1][..]] {
        match a.av.insert(bad) {
            Err(e) if e.kind() == ErrorKind::InvalidArgument => {}
            other => return Err(CaseError::fail(format!("insert {bad:?}: {other:?}"))),
        }
    }
    let small = AddressVector::open(&a.domain, {
        let mut attr = AvAttr::default();
        attr.count = 1;
        attr
    })
    .ctx("open av")?;
    small.insert(&w[0].ep.name()).ctx("insert")?;
    ensure!(
        small.insert(&w[1].ep.name()).is_err(),
        "a full table took a name"
    );
    a.av.remove(a.to[1]).ctx("remove")?;
    let m = alloc(&a.domain, 8, Access::LOCAL)?;
    match a.ep.send_to(m.iov(0, 8), a.to[1], 1) {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => Ok(()),
        other => Err(CaseError::fail(format!(
            "send to a removed handle: {other:?}"
        ))),
    }
}

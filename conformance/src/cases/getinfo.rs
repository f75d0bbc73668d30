//! getinfo: hint matching, rejection reasons, limits, the provider filter (fabtests
//! unit/getinfo_test).

use std::net::SocketAddr;

use fabric::info::flag_names;
use fabric::{Address, Caps, CqAttr, EpType, EqAttr, Fabric, Hints, Info, MrMode, Progress};

use super::case;
use crate::case::{Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::{ensure, ensure_eq};

const G: &str = "getinfo";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(G, "provider_name", Caps::empty(), "answers name the provider; a hint naming another provider is rejected with the reason", provider_name),
        case(G, "caps_and_ep_type", Caps::MSG, "answers have every requested capability and the requested endpoint type", caps_and_ep_type),
        case(G, "missing_cap_reason", Caps::empty(), "asking for a capability the provider lacks is rejected, and the reason names it", missing_cap_reason),
        case(G, "ep_type_reason", Caps::empty(), "asking for an endpoint type the provider lacks is rejected, and the reason names it", ep_type_reason),
        case(G, "limits_sane", Caps::MSG, "limits are consistent (inject <= max_msg, cq data <= 8 bytes, queues and iovecs >= 1)", limits_sane),
        case(G, "provider_filter", Caps::empty(), "FABRIC_PROVIDER-style filters include and exclude the provider (explain_with_filter)", provider_filter),
        case(G, "addresses", Caps::MSG, "node/service become src_addr with source, dest_addr without", addresses),
        case(G, "dest_needs_service", Caps::MSG, "a destination without a port is rejected with a reason that says so", dest_needs_service),
        case(G, "mr_mode", Caps::MSG, "mr_mode hints: required modes reported, hints that forbid them rejected with the mode named", mr_mode),
        case(G, "progress_hint", Caps::MSG, "the requested progress model is in the answer", progress_hint),
        case(G, "answers_open", Caps::MSG, "every answer opens a fabric, domain, event queue and completion queue", answers_open),
    ]
}

fn offered_caps(ctx: &Ctx) -> Result<Caps, CaseError> {
    Ok(ctx
        .getinfo(&Hints::new())?
        .iter()
        .fold(Caps::empty(), |a, i| a | i.caps))
}

fn provider_name(ctx: &Ctx) -> CaseResult {
    let infos = ctx
        .registry()
        .getinfo(&Hints::new().provider(ctx.provider()))
        .ctx("getinfo by provider name")?;
    ensure!(!infos.is_empty(), "no answer");
    for i in &infos {
        ensure_eq!(
            i.provider_name.as_str(),
            ctx.provider(),
            "answer provider name"
        );
        ensure!(i.provider().is_some(), "answer carries no provider handle");
    }
    let other = Hints::new().provider("no-such-provider");
    let why = ctx
        .rejection(&other)
        .ok_or("hints naming provider 'no-such-provider' were answered")?;
    ensure!(
        why.contains("no-such-provider"),
        "rejection reason does not name the provider asked for: {why}"
    );
    Ok(())
}

fn caps_and_ep_type(ctx: &Ctx) -> CaseResult {
    let all = offered_caps(ctx)?;
    // Ask for the most the provider offers among the common capabilities.
    let want = all & (Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA);
    for i in ctx.getinfo(&ctx.hints(want))? {
        ensure!(
            i.caps.contains(want),
            "answer caps {} lack {}",
            flag_names(i.caps),
            flag_names(want - i.caps)
        );
        ensure_eq!(i.ep_type, EpType::Msg, "endpoint type");
    }
    Ok(())
}

fn missing_cap_reason(ctx: &Ctx) -> CaseResult {
    let all = offered_caps(ctx)?;
    let candidates = [
        Caps::TAGGED,
        Caps::ATOMIC,
        Caps::RMA_PMEM,
        Caps::REMOTE_CQ_DATA,
        Caps::RMA,
    ];
    let Some(&lacking) = candidates.iter().find(|c| !all.contains(**c)) else {
        return Err(CaseError::skip(
            "the provider offers every capability tried",
        ));
    };
    let hints = Hints::new()
        .provider(ctx.provider())
        .caps(Caps::MSG | lacking);
    let err = match ctx.registry().getinfo(&hints) {
        Ok(v) => {
            return Err(CaseError::fail(format!(
                "asked for {} (not offered), got {} answer(s)",
                flag_names(lacking),
                v.len()
            )))
        }
        Err(e) => e,
    };
    let mine = err
        .rejections
        .iter()
        .find(|r| r.provider == ctx.provider())
        .ok_or("the error lists no rejection for the provider")?;
    let name = flag_names(lacking);
    ensure!(
        mine.reason.contains(&name),
        "rejection reason does not name {name}: {}",
        mine.reason
    );
    let text = err.to_string();
    ensure!(
        text.contains(ctx.provider()) && text.contains(&name),
        "the error's text names neither the provider nor the capability: {text}"
    );
    Ok(())
}

fn ep_type_reason(ctx: &Ctx) -> CaseResult {
    let offered: Vec<EpType> = ctx
        .getinfo(&Hints::new())?
        .iter()
        .map(|i| i.ep_type)
        .collect();
    let Some(lacking) = [EpType::Rdm, EpType::Dgram, EpType::Msg]
        .into_iter()
        .find(|t| !offered.contains(t))
    else {
        return Err(CaseError::skip("the provider offers every endpoint type"));
    };
    let hints = Hints::new().provider(ctx.provider()).ep_type(lacking);
    let why = ctx
        .rejection(&hints)
        .ok_or_else(|| format!("endpoint type {lacking} was answered though not offered"))?;
    ensure!(
        why.contains("endpoint type") && why.contains(&lacking.to_string()),
        "rejection reason does not name endpoint type {lacking}: {why}"
    );
    Ok(())
}

fn limits_sane(ctx: &Ctx) -> CaseResult {
    for i in ctx.getinfo(&ctx.hints(Caps::MSG))? {
        let l = i.limits;
        ensure!(l.max_msg_size > 0, "max_msg_size is 0");
        ensure!(
            l.inject_size <= l.max_msg_size,
            "inject_size {} > max_msg_size {}",
            l.inject_size,
            l.max_msg_size
        );
        ensure!(l.cq_data_size <= 8, "cq_data_size {} > 8", l.cq_data_size);
        if i.caps.contains(Caps::REMOTE_CQ_DATA) {
            ensure!(
                l.cq_data_size > 0,
                "REMOTE_CQ_DATA offered with cq_data_size 0"
            );
        }
        ensure!(
            (1..=8).contains(&l.mr_key_size),
            "mr_key_size {} not in 1..=8",
            l.mr_key_size
        );
        ensure!(
            l.tx_size >= 1 && l.rx_size >= 1,
            "tx_size {} rx_size {}",
            l.tx_size,
            l.rx_size
        );
        ensure!(l.iov_limit >= 1, "iov_limit 0");
        if i.caps.contains(Caps::RMA) {
            ensure!(l.rma_iov_limit >= 1, "RMA offered with rma_iov_limit 0");
        }
        ensure!(
            l.cm_data_size >= fabric::RemoteMr::WIRE_SIZE,
            "cm_data_size {} cannot carry a region descriptor ({} bytes)",
            l.cm_data_size,
            fabric::RemoteMr::WIRE_SIZE
        );
    }
    Ok(())
}

fn provider_filter(ctx: &Ctx) -> CaseResult {
    let hints = Hints::new();
    let result = |filter: Option<&str>| {
        ctx.registry()
            .explain_with_filter(&hints, filter)
            .into_iter()
            .find(|m| m.provider == ctx.provider())
            .map(|m| m.result)
            .ok_or_else(|| CaseError::fail("explain lists no entry for the provider"))
    };
    let p = ctx.provider();
    ensure!(result(None)?.is_ok(), "no filter: rejected");
    ensure!(result(Some(p))?.is_ok(), "filter '{p}': rejected");
    ensure!(
        result(Some(&format!("other, {}", p.to_uppercase())))?.is_ok(),
        "a list filter with the name in upper case: rejected"
    );
    match result(Some(&format!("^{p}")))? {
        Ok(_) => return Err(CaseError::fail(format!("filter '^{p}' did not exclude it"))),
        Err(why) => ensure!(
            why.contains(fabric::PROVIDER_ENV),
            "exclusion reason does not name {}: {why}",
            fabric::PROVIDER_ENV
        ),
    }
    ensure!(
        result(Some("some-other-provider"))?.is_err(),
        "a filter naming only another provider did not exclude it"
    );
    Ok(())
}

fn addresses(ctx: &Ctx) -> CaseResult {
    let loopback0: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    for i in ctx.getinfo(&ctx.listen_hints(Caps::MSG, None))? {
        ensure_eq!(
            i.src_addr.clone(),
            Some(Address::Inet(loopback0)),
            "src_addr of a source hint"
        );
    }
    let dest: SocketAddr = "127.0.0.1:7".parse().expect("literal address");
    for i in ctx.getinfo(&ctx.connect_hints(Caps::MSG, None, &Address::Inet(dest))?)? {
        ensure_eq!(i.dest_addr.clone(), Some(Address::Inet(dest)), "dest_addr");
    }
    Ok(())
}

fn dest_needs_service(ctx: &Ctx) -> CaseResult {
    let hints = ctx.hints(Caps::MSG).node("127.0.0.1");
    let why = ctx
        .rejection(&hints)
        .ok_or("a destination without a port was answered")?;
    ensure!(
        why.contains("service") || why.contains("port"),
        "reason does not mention the missing port: {why}"
    );
    Ok(())
}

fn mr_mode(ctx: &Ctx) -> CaseResult {
    let infos = ctx.getinfo(&ctx.hints(Caps::MSG))?;
    let required = infos.iter().fold(MrMode::all(), |a, i| a & i.mr_mode);
    // Hints that allow everything must be answered.
    ctx.getinfo(&ctx.hints(Caps::MSG).mr_mode(MrMode::all()))?;
    let hints = ctx.hints(Caps::MSG).mr_mode(MrMode::empty());
    if required.is_empty() {
        ctx.getinfo(&hints)
            .map_err(|e| e.context("an answer requires no mr_mode, yet mr_mode(empty) failed"))?;
    } else {
        let why = ctx
            .rejection(&hints)
            .ok_or("every answer requires an mr_mode, yet mr_mode(empty) was answered")?;
        let name = flag_names(required);
        ensure!(
            why.contains("mr_mode"),
            "reason does not mention mr_mode: {why}"
        );
        ensure!(
            required.iter_names().any(|(n, _)| why.contains(n)),
            "reason does not name the required modes {name}: {why}"
        );
    }
    Ok(())
}

fn progress_hint(ctx: &Ctx) -> CaseResult {
    for p in [Progress::Auto, Progress::Manual] {
        for i in ctx.getinfo(&ctx.hints(Caps::MSG).progress(p))? {
            ensure_eq!(i.progress, p, "progress of the answer");
        }
    }
    Ok(())
}

fn answers_open(ctx: &Ctx) -> CaseResult {
    let infos: Vec<Info> = ctx.getinfo(&ctx.hints(Caps::MSG))?;
    for (n, i) in infos.iter().enumerate() {
        let what = |s: &str| format!("answer {n} ({}/{}): {s}", i.fabric_name, i.domain_name);
        let f = Fabric::open(i).ctx(what("open fabric"))?;
        let d = f.domain(i).ctx(what("open domain"))?;
        ensure!(
            d.info().provider_name == ctx.provider(),
            "domain info names another provider"
        );
        f.eq(EqAttr::default()).ctx(what("open eq"))?;
        d.cq(CqAttr::default()).ctx(what("open cq"))?;
        d.cq(CqAttr { size: 16 }).ctx(what("open small cq"))?;
    }
    Ok(())
}

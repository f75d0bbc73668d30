//! eq: connection events, connection data, shutdown, async events (fabtests unit/eq_test,
//! functional/cm_data).

use std::time::{Duration, Instant};

use fabric::{Access, AsyncEvents, Caps, EndpointConfig, ErrorKind, Event};

use super::case;
use crate::case::{expect_err, Case, CaseError, CaseResult, Check};
use crate::ctx::Ctx;
use crate::pair::{PairConfig, Who};
use crate::payload::pattern;
use crate::{ensure, ensure_eq};

const G: &str = "eq";

/// The cases of this group.
pub fn cases() -> Vec<Case> {
    vec![
        case(
            G,
            "empty_and_timeout",
            Caps::MSG,
            "an empty event queue reads None; sread and wait return after about the timeout",
            empty_and_timeout,
        ),
        case(
            G,
            "cm_data_both_ways",
            Caps::MSG,
            "connect data arrives with the request, accept data with the client's Connected",
            cm_data_both_ways,
        ),
        case(
            G,
            "cm_data_max",
            Caps::MSG,
            "connection data of exactly cm_data_size bytes arrives intact both ways",
            cm_data_max,
        ),
        case(
            G,
            "cm_data_too_large",
            Caps::MSG,
            "connect and accept with cm_data_size + 1 bytes are refused with InvalidArgument",
            cm_data_too_large,
        ),
        case(
            G,
            "conn_request_info",
            Caps::MSG,
            "a connection request's info names the provider and the peer",
            conn_request_info,
        ),
        case(
            G,
            "async_events",
            Caps::MSG,
            "a connection set up with events awaited under tokio",
            async_events,
        ),
        case(
            G,
            "shutdown_both_sides",
            Caps::MSG,
            "shutdown on one side gives Shutdown with the right fid on both",
            shutdown_both_sides,
        ),
        case(G, "connect_twice_refused", Caps::MSG, "connect on a connected endpoint and accept on a client endpoint are refused; the connection keeps working", connect_twice_refused),
        case(
            G,
            "two_connections",
            Caps::MSG,
            "one listener accepts two clients; messages reach the right endpoint",
            two_connections,
        ),
    ]
}

fn empty_and_timeout(ctx: &Ctx) -> CaseResult {
    let node = ctx.node(Caps::MSG)?;
    ensure!(
        node.eq.read().ctx("read")?.is_none(),
        "read on an empty eq returned an event"
    );
    let t = Instant::now();
    ensure!(
        node.eq
            .sread(Some(Duration::from_millis(100)))
            .ctx("sread")?
            .is_none(),
        "sread returned an event"
    );
    let took = t.elapsed();
    ensure!(
        took >= Duration::from_millis(90) && took < Duration::from_secs(3),
        "sread(100 ms) took {took:?}"
    );
    let t = Instant::now();
    match node.eq.wait(Duration::from_millis(100)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => return Err(CaseError::fail(format!("wait(100 ms): {other:?}"))),
    }
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "wait(100 ms) took {:?}",
        t.elapsed()
    );
    Ok(())
}

fn cm_data_both_ways(ctx: &Ctx) -> CaseResult {
    let mut cfg = PairConfig::new(Caps::MSG);
    cfg.connect_data = b"hello from the client".to_vec();
    cfg.accept_data = b"welcome, says the server".to_vec();
    let p = ctx.pair_with(&cfg)?;
    ensure_eq!(
        p.server.peer_data,
        cfg.connect_data,
        "connect data in the request"
    );
    ensure_eq!(
        p.client.connected_data,
        cfg.accept_data,
        "accept data in the client's Connected"
    );
    Ok(())
}

fn cm_data_max(ctx: &Ctx) -> CaseResult {
    let max = ctx.info(&ctx.hints(Caps::MSG))?.limits.cm_data_size;
    if max == 0 {
        return Err(CaseError::skip("cm_data_size is 0"));
    }
    let mut cfg = PairConfig::new(Caps::MSG);
    cfg.connect_data = pattern(1, max);
    cfg.accept_data = pattern(2, max);
    let p = ctx.pair_with(&cfg)?;
    ensure!(
        p.server.peer_data == cfg.connect_data,
        "connect data of {max} bytes changed ({} bytes arrived)",
        p.server.peer_data.len()
    );
    ensure!(
        p.client.connected_data == cfg.accept_data,
        "accept data of {max} bytes changed ({} bytes arrived)",
        p.client.connected_data.len()
    );
    Ok(())
}

fn cm_data_too_large(ctx: &Ctx) -> CaseResult {
    let l = ctx.listen(Caps::MSG, None)?;
    let max = l.node.info.limits.cm_data_size;
    let info = ctx.info(&ctx.connect_hints(Caps::MSG, None, &l.addr)?)?;
    let node = ctx.open(info)?;
    let ep = node
        .domain
        .endpoint(&node.info, EndpointConfig::new(&node.cq, &node.eq))
        .ctx("endpoint")?;
    expect_err(
        ep.connect(&vec![0u8; max + 1]),
        ErrorKind::InvalidArgument,
        "connect with cm_data_size + 1 bytes",
    )?;
    ep.connect(b"ok")
        .ctx("connect with small data after the refusal")?;
    let req = crate::pair::wait_conn_request(&l.node, &[&node], ctx.timeout())?;
    let sep = l
        .node
        .domain
        .endpoint(&req.info, EndpointConfig::new(&l.node.cq, &l.node.eq))
        .ctx("server endpoint")?;
    expect_err(
        sep.accept(&vec![0u8; max + 1]),
        ErrorKind::InvalidArgument,
        "accept with cm_data_size + 1 bytes",
    )?;
    Ok(())
}

fn conn_request_info(ctx: &Ctx) -> CaseResult {
    let l = ctx.listen(Caps::MSG, None)?;
    let c = ctx.connect(Caps::MSG, None, &l.addr, b"x")?;
    let req = crate::pair::wait_conn_request(&l.node, &[&c.node], ctx.timeout())?;
    ensure_eq!(
        req.info.provider_name.as_str(),
        ctx.provider(),
        "request info provider"
    );
    ensure!(
        req.info.conn_handle().is_some(),
        "request info has no connection handle"
    );
    ensure!(
        req.info.caps.contains(Caps::MSG),
        "request info caps {:?}",
        req.info.caps
    );
    ensure_eq!(req.data, b"x".to_vec(), "request data");
    if let Some(peer) = req.info.dest_addr.as_ref().and_then(|a| a.as_inet()) {
        ensure!(
            peer.ip().is_loopback(),
            "request from {peer}, expected loopback"
        );
    }
    Ok(())
}

fn async_events(ctx: &Ctx) -> CaseResult {
    let l = ctx.listen(Caps::MSG, None)?;
    let c = ctx.connect(Caps::MSG, None, &l.addr, b"async")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ctx("tokio runtime")?;
    let t = ctx.timeout();
    // Both sides are awaited at once: in manual progress each side moves only while
    // someone waits on it.
    let server = async {
        let ev = tokio::time::timeout(t, l.node.eq.next_event())
            .await
            .map_err(|_| "no connection request awaited in time")?
            .ctx("server next_event")?;
        let Event::ConnRequest(req) = ev else {
            return Err(CaseError::fail(format!("expected ConnRequest, got {ev:?}")));
        };
        ensure_eq!(req.data, b"async".to_vec(), "request data");
        ensure_eq!(req.listener, l.pep.fid(), "the request names its listener");
        let sep = l
            .node
            .domain
            .endpoint(&req.info, EndpointConfig::new(&l.node.cq, &l.node.eq))
            .ctx("server endpoint")?;
        sep.accept(b"yes").ctx("accept")?;
        let ev = tokio::time::timeout(t, l.node.eq.next_event())
            .await
            .map_err(|_| "server: no Connected in time")?
            .ctx("server")?;
        match ev {
            Event::Connected { fid, .. } if fid == sep.fid() => Ok(sep),
            other => Err(CaseError::fail(format!(
                "server: expected Connected, got {other:?}"
            ))),
        }
    };
    let client = async {
        let ev = tokio::time::timeout(t, c.node.eq.next_event())
            .await
            .map_err(|_| "client: no Connected in time")?
            .ctx("client")?;
        match ev {
            Event::Connected { fid, data } if fid == c.ep.fid() => {
                ensure_eq!(data, b"yes".to_vec(), "accept data");
                Ok(())
            }
            other => Err(CaseError::fail(format!(
                "client: expected Connected, got {other:?}"
            ))),
        }
    };
    let (s, cl) = rt.block_on(async { tokio::join!(server, client) });
    s?;
    cl
}

fn expect_shutdown(p: &crate::Pair, who: Who) -> CaseResult {
    let fid = p.side(who).ep.fid();
    match p.wait_event(who)? {
        Event::Shutdown { fid: f, .. } if f == fid => Ok(()),
        other => Err(CaseError::fail(format!(
            "{who:?}: expected Shutdown of {fid}, got {other:?}"
        ))),
    }
}

fn shutdown_both_sides(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    p.client.ep.shutdown().ctx("shutdown")?;
    expect_shutdown(&p, Who::Server)?;
    expect_shutdown(&p, Who::Client)?;
    Ok(())
}

fn two_connections(ctx: &Ctx) -> CaseResult {
    let l = ctx.listen(Caps::MSG, None)?;
    let t = ctx.timeout();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for i in 0..2u8 {
        let c = ctx.connect(Caps::MSG, None, &l.addr, &[i])?;
        let req = crate::pair::wait_conn_request(&l.node, &[&c.node], t)?;
        ensure_eq!(req.data, vec![i], "request data of client {i}");
        let sep = l
            .node
            .domain
            .endpoint(&req.info, EndpointConfig::new(&l.node.cq, &l.node.eq))
            .ctx("server endpoint")?;
        sep.accept(&[i]).ctx("accept")?;
        crate::pair::wait_connected(&c.node, &c.ep, &[&l.node], t)?;
        crate::pair::wait_connected(&l.node, &sep, &[&c.node], t)?;
        clients.push(c);
        servers.push(sep);
    }
    let rx = l.node.domain.alloc(128, Access::RECV).ctx("alloc")?;
    for (i, s) in servers.iter().enumerate() {
        s.recv(rx.iov(i * 64, 64), i as u64).ctx("post recv")?;
    }
    // Client 1 sends first: its message must land in server endpoint 1's receive.
    for i in [1usize, 0] {
        let c = &clients[i];
        let tx = c.node.domain.alloc(8, Access::SEND).ctx("alloc")?;
        tx.write_at(0, &[0x10 + i as u8; 8]).ctx("fill")?;
        c.ep.send(tx.full(), 0).ctx("send")?;
        let others: Vec<&crate::Node> = clients.iter().map(|c| &c.node).collect();
        let got = l.node.wait_completion(&others, t)?;
        ensure!(got.is_ok(), "{got:?}");
        ensure_eq!(
            got.context,
            i as u64,
            "receive that client {i}'s message completed"
        );
        ensure_eq!(
            rx.to_vec(i * 64, 8)?,
            vec![0x10 + i as u8; 8],
            "payload of client {i}"
        );
    }
    Ok(())
}

fn connect_twice_refused(ctx: &Ctx) -> CaseResult {
    let p = ctx.pair(Caps::MSG)?;
    ensure!(
        p.client.ep.connect(b"again").is_err(),
        "a second connect on a connected endpoint succeeded"
    );
    expect_err(
        p.client.ep.accept(b""),
        ErrorKind::InvalidArgument,
        "accept on a connecting endpoint",
    )?;
    let rx = p.server.alloc(8, Access::RECV)?;
    let tx = p.client.alloc(8, Access::SEND)?;
    p.server.ep.recv(rx.full(), 1).ctx("post recv")?;
    p.client.ep.send(tx.full(), 2).ctx("send")?;
    let r = p.wait_ok(Who::Server)?;
    ensure_eq!(r.context, 1, "receive after the refused calls");
    ensure!(
        p.client.take_event().is_none() && p.client.eq.read().ctx("eq read")?.is_none(),
        "an event followed the refused connect"
    );
    Ok(())
}

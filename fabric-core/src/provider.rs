//! The provider interface: what a provider implements (its "ops tables") and the
//! registry that getinfo searches. Applications use the wrapper types
//! ([`Fabric`](crate::Fabric), [`Domain`](crate::Domain), ...) instead.

use std::any::Any;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use crate::cq::{Completion, CqAttr};
use crate::endpoint::{RecvRequest, RmaRequest, SendRequest};
use crate::eq::{EqAttr, Event};
use crate::error::Result;
use crate::flags::{Access, MrFlags};
use crate::info::{
    match_offer, Address, GetInfoError, HintField, Hints, Info, Mismatch, Rejection,
};
use crate::memory::MemoryBacking;

/// A provider: a named implementation of the API over one transport.
pub trait Provider: Send + Sync + 'static {
    /// Short name ("tcp").
    fn name(&self) -> &'static str;
    /// Version (major, minor).
    fn version(&self) -> (u16, u16) {
        (0, 1)
    }
    /// Whether the provider can run on this machine; `Err` says why not (usually
    /// [`HintField::Availability`] or [`HintField::Config`]).
    fn available(&self) -> std::result::Result<(), Mismatch> {
        Ok(())
    }
    /// What the provider can do: one template [`Info`] per endpoint type / domain.
    fn offers(&self) -> Vec<Info>;
    /// Provider-specific check of a matched answer (e.g. whether the address is
    /// usable); may fill in names, and may narrow `info.limits.mr_key_size` to what
    /// `hints.mr_key_size` asks for when the provider can hand out narrower keys
    /// (getinfo rejects an answer whose keys are still wider). `Err` is the rejection
    /// reason, naming the field that did not match.
    fn check(&self, _hints: &Hints, _info: &mut Info) -> std::result::Result<(), Mismatch> {
        Ok(())
    }
    /// Opens a fabric for an answer of this provider.
    fn open_fabric(&self, info: &Info) -> Result<Arc<dyn FabricOps>>;
}

/// Provider side of a [`Fabric`](crate::Fabric).
pub trait FabricOps: Send + Sync {
    /// Opens a domain.
    fn open_domain(&self, info: &Info) -> Result<Arc<dyn DomainOps>>;
    /// Opens an event queue.
    fn open_eq(&self, attr: &EqAttr) -> Result<Arc<dyn EqOps>>;
    /// Opens a passive (listening) endpoint reporting to `eq`.
    fn open_passive_ep(
        &self,
        info: &Info,
        eq: &Arc<dyn EqOps>,
    ) -> Result<Arc<dyn PassiveEndpointOps>>;
    /// For downcasting.
    fn as_any(&self) -> &dyn Any;
}

/// The completion and event queues an endpoint reports to.
pub struct EndpointBinding {
    /// Queue for transmit-side completions.
    pub tx_cq: Arc<dyn CqOps>,
    /// Queue for receive-side completions.
    pub rx_cq: Arc<dyn CqOps>,
    /// Queue for connection events.
    pub eq: Arc<dyn EqOps>,
}

/// Provider side of a [`Domain`](crate::Domain).
pub trait DomainOps: Send + Sync {
    /// Opens a completion queue.
    fn open_cq(&self, attr: &CqAttr) -> Result<Arc<dyn CqOps>>;
    /// Registers memory. The provider keeps `memory` alive while the registration
    /// exists and while any operation uses it.
    fn register(
        &self,
        memory: Arc<dyn MemoryBacking>,
        access: Access,
        flags: MrFlags,
    ) -> Result<Arc<dyn MrOps>>;
    /// Opens an active endpoint (from a getinfo answer, or from a connection request's
    /// info to accept it).
    fn open_endpoint(&self, info: &Info, bind: EndpointBinding) -> Result<Arc<dyn EndpointOps>>;
    /// For downcasting.
    fn as_any(&self) -> &dyn Any;
}

/// Provider side of a memory registration. Dropping it deregisters.
pub trait MrOps: Send + Sync {
    /// The key peers use.
    fn key(&self) -> u64;
    /// The remote address of offset 0 (the virtual address with `MrMode::VIRT_ADDR`,
    /// else 0).
    fn base_addr(&self) -> u64;
    /// For downcasting (e.g. to reach a local key).
    fn as_any(&self) -> &dyn Any;
}

/// Provider side of a completion queue. Reading drives progress in manual mode.
pub trait CqOps: Send + Sync {
    /// Moves up to `max` completions into `out` without blocking; returns how many.
    fn read(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize>;
    /// The next completion without blocking: `read` of one, without an output
    /// vector (a busy poll's read allocates nothing). The default goes through `read`.
    fn read_one(&self) -> Result<Option<Completion>> {
        let mut v = Vec::with_capacity(1);
        self.read(&mut v, 1)?;
        Ok(v.pop())
    }
    /// Like `read`, but waits (sleeping, not spinning) up to `timeout` (`None`: forever)
    /// for at least one. Returns 0 on timeout.
    fn sread(
        &self,
        out: &mut Vec<Completion>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize>;
    /// Asks to be woken when a completion may be available. The provider makes progress
    /// in the background while a waker is registered.
    fn register_waker(&self, waker: &Waker);
    /// For downcasting when binding endpoints.
    fn as_any(&self) -> &dyn Any;
}

/// Provider side of an event queue.
pub trait EqOps: Send + Sync {
    /// The next event, without blocking.
    fn read(&self) -> Result<Option<Event>>;
    /// The next event, waiting up to `timeout` (`None`: forever); `None` on timeout.
    fn sread(&self, timeout: Option<Duration>) -> Result<Option<Event>>;
    /// Asks to be woken when an event may be available.
    fn register_waker(&self, waker: &Waker);
    /// For downcasting when binding endpoints.
    fn as_any(&self) -> &dyn Any;
}

/// Provider side of a passive endpoint.
pub trait PassiveEndpointOps: Send + Sync {
    /// Identifier that connection requests arriving here carry
    /// ([`ConnRequest::listener`](crate::ConnRequest::listener)).
    fn fid(&self) -> crate::Fid;
    /// Starts listening; connection requests arrive on the event queue.
    fn listen(&self) -> Result<()>;
    /// The bound address (with the real port after binding port 0).
    fn local_addr(&self) -> Result<Address>;
    /// Rejects a pending connection request, with optional data for the peer.
    fn reject(&self, request: &Info, data: &[u8]) -> Result<()>;
    /// Stops listening.
    fn close(&self);
}

/// Provider side of an active endpoint: what every endpoint has, whatever its type.
///
/// The operations are split as libfabric splits its ops tables (`fi_ops_cm`,
/// `fi_ops_msg`, `fi_ops_rma`, `fi_ops_tagged`, `fi_ops_atomic`): each class is a trait
/// of its own ([`CmOps`], [`MsgOps`], [`RmaOps`]) that an endpoint hands out through an
/// accessor here. An accessor returns `None` by default, and the wrapper then refuses
/// that class of operation with [`ErrorKind::NotSupported`](crate::ErrorKind). A
/// connected (MSG) endpoint returns all three; a reliable unconnected (RDM) endpoint has
/// no connection management and returns `None` from [`cm`](Self::cm). Tagged and
/// atomic classes come as further accessors with `None` defaults, so existing providers
/// need not change when they are added.
///
/// The wrapper ([`Endpoint`](crate::Endpoint)) has validated bounds, rights and sizes
/// before any `post_*` call reaches a provider.
pub trait EndpointOps: Send + Sync {
    /// Identifier reported in events.
    fn fid(&self) -> crate::Fid;
    /// Local address, once bound.
    fn local_addr(&self) -> Option<Address>;
    /// Releases the endpoint: called when the application drops it.
    fn close(&self);
    /// For downcasting.
    fn as_any(&self) -> &dyn Any;
    /// Connection management (`fi_ops_cm`); MSG endpoints only.
    fn cm(&self) -> Option<&dyn CmOps> {
        None
    }
    /// Message transfers (`fi_ops_msg`).
    fn msg(&self) -> Option<&dyn MsgOps> {
        None
    }
    /// RMA transfers (`fi_ops_rma`).
    fn rma(&self) -> Option<&dyn RmaOps> {
        None
    }
    /// Atomic operations (`fi_ops_atomic`); see [`crate::atomic`].
    fn atomic(&self) -> Option<&dyn AtomicOps> {
        None
    }
}

/// Connection management of a connected endpoint (libfabric `fi_ops_cm`).
pub trait CmOps: Send + Sync {
    /// Starts connecting; `Connected` or an error event follows on the event queue.
    fn connect(&self, addr: &Address, data: &[u8]) -> Result<()>;
    /// Accepts the connection request this endpoint was opened from.
    fn accept(&self, data: &[u8]) -> Result<()>;
    /// Shuts the connection down; outstanding operations complete in error.
    fn shutdown(&self) -> Result<()>;
    /// Peer address, once connected.
    fn peer_addr(&self) -> Option<Address>;
}

/// Message transfers (libfabric `fi_ops_msg`).
pub trait MsgOps: Send + Sync {
    /// Posts a send (or inject, when `req.payload` is inline).
    fn post_send(&self, req: SendRequest) -> Result<()>;
    /// Posts a receive.
    fn post_recv(&self, req: RecvRequest) -> Result<()>;
}

/// RMA transfers (libfabric `fi_ops_rma`).
pub trait RmaOps: Send + Sync {
    /// Posts an RMA write.
    fn post_write(&self, req: RmaRequest) -> Result<()>;
    /// Posts an RMA read.
    fn post_read(&self, req: RmaRequest) -> Result<()>;
}

/// Atomic operations (libfabric `fi_ops_atomic`) of a connected endpoint whose
/// provider answers [`Caps::ATOMIC`](crate::Caps::ATOMIC).
pub trait AtomicOps: Send + Sync {
    /// The most elements one call of `form` may carry for `op` on `dt` as the provider
    /// executes it natively, or `None` when it does not (the wrapper has already
    /// refused combinations no provider supports, see
    /// [`AtomicForm::allows`](crate::atomic::AtomicForm::allows)).
    fn valid(
        &self,
        op: crate::atomic::AtomicOp,
        dt: crate::atomic::Datatype,
        form: crate::atomic::AtomicForm,
    ) -> Option<usize>;
    /// Posts a validated atomic: lengths, form, count (within `valid`) and the local
    /// result range were checked by the wrapper; the remote access is the target's to
    /// check.
    fn post_atomic(&self, req: crate::atomic::AtomicRequest) -> Result<()>;
    /// Whether the target executes these atomics coherently with the target host's
    /// CPU atomic instructions on the same word (verbs' `IBV_ATOMIC_GLOB`; softroce,
    /// whose responder uses them). `false` (the default) means atomic only with
    /// respect to the device's own atomics (`IBV_ATOMIC_HCA`), as kernel rxe and many
    /// NICs are.
    fn cpu_coherent(&self) -> bool {
        false
    }
}

/// A set of providers that getinfo searches.
#[derive(Clone, Default)]
pub struct Registry {
    providers: Vec<Arc<dyn Provider>>,
}

/// The outcome of matching hints against one provider.
#[derive(Debug, Clone)]
pub struct ProviderMatch {
    /// Provider name.
    pub provider: String,
    /// Its answers, or why it has none (the reasons' messages joined by "; ").
    pub result: std::result::Result<Vec<Info>, String>,
    /// Why it has no answers, typed (empty when it has).
    pub mismatches: Vec<Mismatch>,
}

/// The environment variable that narrows the providers getinfo considers, like
/// libfabric's `FI_PROVIDER`: a comma-separated list of names, or `^a,b` to exclude.
pub const PROVIDER_ENV: &str = "FABRIC_PROVIDER";

fn name_list(s: &str) -> Vec<String> {
    s.split([',', ';'])
        .map(|x| x.trim().to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Checks a provider name against a filter in `FABRIC_PROVIDER` syntax.
fn filter_allows(filter: &str, name: &str) -> bool {
    let f = filter.trim();
    if let Some(excluded) = f.strip_prefix('^') {
        !name_list(excluded).iter().any(|n| n == name)
    } else {
        name_list(f).iter().any(|n| n == name)
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a provider (a later one with the same name replaces the earlier).
    pub fn register(&mut self, provider: Arc<dyn Provider>) {
        self.providers.retain(|p| p.name() != provider.name());
        self.providers.push(provider);
    }

    /// Builder form of [`register`](Self::register).
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Self {
        self.register(provider);
        self
    }

    /// The registered providers.
    pub fn providers(&self) -> &[Arc<dyn Provider>] {
        &self.providers
    }

    /// Matches hints against every provider, with the `FABRIC_PROVIDER` filter taken
    /// from the environment.
    pub fn explain(&self, hints: &Hints) -> Vec<ProviderMatch> {
        let env = std::env::var(PROVIDER_ENV).ok();
        self.explain_with_filter(hints, env.as_deref())
    }

    /// Matches hints against every provider, with an explicit `FABRIC_PROVIDER`-style
    /// filter (`None`: no filter).
    pub fn explain_with_filter(&self, hints: &Hints, filter: Option<&str>) -> Vec<ProviderMatch> {
        let addr = hints
            .resolve_addr()
            .map_err(|why| {
                let field = if hints.source {
                    HintField::SrcAddr
                } else {
                    HintField::DestAddr
                };
                Mismatch::new(field, why)
            })
            .and_then(|a| {
                if let Some(src) = hints.src_addr {
                    crate::info::check_local_ip(src.ip())?;
                }
                if let (Some(a), true) = (a, hints.source) {
                    crate::info::check_local_ip(a.ip())?;
                }
                Ok(a)
            });
        self.providers
            .iter()
            .map(|p| {
                let (result, mismatches) = match Self::match_provider(p, hints, filter, &addr) {
                    Ok(v) => (Ok(v), Vec::new()),
                    Err(m) => (
                        Err(m
                            .iter()
                            .map(|m| m.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")),
                        m,
                    ),
                };
                ProviderMatch {
                    provider: p.name().to_string(),
                    result,
                    mismatches,
                }
            })
            .collect()
    }

    fn match_provider(
        p: &Arc<dyn Provider>,
        hints: &Hints,
        filter: Option<&str>,
        addr: &std::result::Result<Option<std::net::SocketAddr>, Mismatch>,
    ) -> std::result::Result<Vec<Info>, Vec<Mismatch>> {
        let name = p.name();
        if let Some(f) = filter.filter(|f| !f.trim().is_empty()) {
            if !filter_allows(f, name) {
                return Err(vec![Mismatch::new(
                    HintField::Provider,
                    format!("excluded by {PROVIDER_ENV}={f}"),
                )]);
            }
        }
        if let Some(want) = &hints.provider {
            if !filter_allows(want, name) {
                return Err(vec![Mismatch::new(
                    HintField::Provider,
                    format!("hints ask for provider '{want}'"),
                )]);
            }
        }
        p.available().map_err(|why| {
            vec![Mismatch::new(
                why.field,
                format!("not available: {}", why.message),
            )]
        })?;
        let addr = addr.clone().map_err(|m| vec![m])?;
        let mut answers = Vec::new();
        let mut reasons: Vec<Mismatch> = Vec::new();
        for offer in p.offers() {
            match match_offer(&offer, hints, addr) {
                Ok(mut info) => match p.check(hints, &mut info) {
                    Ok(()) => match hints.mr_key_size {
                        Some(max) if info.limits.mr_key_size > max => reasons.push(Mismatch::new(
                            HintField::MrKeySize,
                            format!(
                                "memory keys are {} bytes, the hints allow at most {max}",
                                info.limits.mr_key_size
                            ),
                        )),
                        _ => answers.push(info.with_provider(p.clone())),
                    },
                    Err(why) => reasons.push(why),
                },
                Err(why) => reasons.push(why),
            }
        }
        if answers.is_empty() {
            reasons.dedup();
            if reasons.is_empty() {
                reasons.push(Mismatch::new(HintField::Other, "offers nothing"));
            }
            Err(reasons)
        } else {
            Ok(answers)
        }
    }

    /// When the hints name providers (not an exclusion) and none of them is
    /// registered, the error that says so and lists the registered ones.
    fn unknown_provider(&self, hints: &Hints) -> Option<GetInfoError> {
        let want = hints.provider.as_deref()?.trim();
        if want.starts_with('^') {
            return None;
        }
        let names = name_list(want);
        if names.is_empty()
            || self
                .providers
                .iter()
                .any(|p| names.iter().any(|n| n == p.name()))
        {
            return None;
        }
        let mut e = GetInfoError::new(Vec::new());
        e.unknown_provider = Some((
            names.join(","),
            self.providers
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
        ));
        Some(e)
    }

    /// Every answer from every provider that matches `hints`; when none does, the error
    /// lists each provider with the reason it was rejected.
    pub fn getinfo(&self, hints: &Hints) -> std::result::Result<Vec<Info>, GetInfoError> {
        if let Some(err) = self.unknown_provider(hints) {
            return Err(err);
        }
        let mut all = Vec::new();
        let mut rejections = Vec::new();
        for m in self.explain(hints) {
            match m.result {
                Ok(v) => all.extend(v),
                Err(reason) => rejections.push(Rejection {
                    provider: m.provider,
                    reason,
                    mismatches: m.mismatches,
                }),
            }
        }
        if all.is_empty() {
            Err(GetInfoError::new(rejections))
        } else {
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax() {
        assert!(filter_allows("tcp", "tcp"));
        assert!(filter_allows("softroce, tcp", "tcp"));
        assert!(!filter_allows("softroce", "tcp"));
        assert!(!filter_allows("^tcp", "tcp"));
        assert!(filter_allows("^tcp", "softroce"));
        assert!(filter_allows("TCP;verbs", "tcp"));
    }
}

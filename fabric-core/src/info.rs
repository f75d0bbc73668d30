//! Hints, answers ([`Info`]) and the matching rules of getinfo.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use crate::flags::{Caps, MrMode};
use crate::provider::Provider;

/// Endpoint types (libfabric `FI_EP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EpType {
    /// Connected, reliable (`FI_EP_MSG`): listen / connect / accept.
    Msg,
    /// Reliable, unconnected, addressed through an address vector (`FI_EP_RDM`).
    /// Reserved: no provider offers it yet.
    Rdm,
    /// Unreliable datagrams (`FI_EP_DGRAM`). Reserved.
    Dgram,
}

impl fmt::Display for EpType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EpType::Msg => "msg",
            EpType::Rdm => "rdm",
            EpType::Dgram => "dgram",
        })
    }
}

/// Who drives data movement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Progress {
    /// Data moves when the application reads a completion or event queue (the default,
    /// libfabric's `FI_PROGRESS_MANUAL`).
    #[default]
    Manual,
    /// A provider thread moves data in the background (`FI_PROGRESS_AUTO`).
    Auto,
}

/// A fabric address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// An IP address and port.
    Inet(SocketAddr),
    /// An opaque provider-specific address.
    Raw(Vec<u8>),
}

impl Address {
    /// The socket address, if this is one.
    pub fn as_inet(&self) -> Option<SocketAddr> {
        match self {
            Address::Inet(a) => Some(*a),
            Address::Raw(_) => None,
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::Inet(a)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet(a) => write!(f, "{a}"),
            Address::Raw(b) => {
                for x in b {
                    write!(f, "{x:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The limits of a provider's endpoints and domain, carried by every [`Info`].
///
/// Non-exhaustive (limits are added as the API grows): start from
/// [`Limits::DEFAULT`] and set the fields you know, also in a `const`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Limits {
    /// Largest message or RMA transfer, in bytes.
    pub max_msg_size: usize,
    /// Largest payload of `inject` (copied at the call; no completion).
    pub inject_size: usize,
    /// Size of memory-region keys, in bytes.
    pub mr_key_size: usize,
    /// Size of remote CQ data, in bytes (0 if unsupported).
    pub cq_data_size: usize,
    /// Transmit queue depth: operations outstanding per endpoint.
    pub tx_size: usize,
    /// Receive queue depth: receives posted per endpoint.
    pub rx_size: usize,
    /// Largest number of local iovecs per operation.
    pub iov_limit: usize,
    /// Largest number of remote iovecs per RMA operation.
    pub rma_iov_limit: usize,
    /// Size of connection data in connect/accept/reject.
    pub cm_data_size: usize,
    /// Path MTU, for providers that packetize (0 for stream providers).
    pub mtu: usize,
    /// A message longer than the receive it lands in ends the connection: the receive
    /// completes `Truncated` and both ends then see `Event::Shutdown` (RC transports,
    /// e.g. verbs, cannot truncate: the responder's queue pair goes to the error
    /// state). False: the receive completes `Truncated` and the connection lives on.
    pub truncation_ends_connection: bool,
}

impl Limits {
    /// Conservative limits: 64 KiB messages, no inject, 8-byte keys, no CQ data,
    /// queues of 64, one iovec, 0 bytes of connection data, no MTU. Providers override
    /// each field they know.
    pub const DEFAULT: Limits = Limits {
        max_msg_size: 64 << 10,
        inject_size: 0,
        mr_key_size: 8,
        cq_data_size: 0,
        tx_size: 64,
        rx_size: 64,
        iov_limit: 1,
        rma_iov_limit: 1,
        cm_data_size: 0,
        mtu: 0,
        truncation_ends_connection: false,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// A provider's answer to getinfo: what it offers, with which limits, at which address.
/// Pass it to [`Fabric::open`](crate::Fabric::open) and friends.
#[derive(Clone)]
pub struct Info {
    /// Provider name ("tcp", "softroce", "verbs").
    pub provider_name: String,
    /// Provider version (major, minor).
    pub provider_version: (u16, u16),
    /// Fabric name (e.g. "IP" or an RDMA device's fabric).
    pub fabric_name: String,
    /// Domain name (e.g. an interface or RDMA device).
    pub domain_name: String,
    /// Capabilities.
    pub caps: Caps,
    /// Endpoint type.
    pub ep_type: EpType,
    /// Registration modes the provider requires.
    pub mr_mode: MrMode,
    /// Progress model of domains opened from this answer.
    pub progress: Progress,
    /// Local address (listeners bind it).
    pub src_addr: Option<Address>,
    /// Peer address (connectors connect to it).
    pub dest_addr: Option<Address>,
    /// Provider limits.
    pub limits: Limits,
    provider: Option<Arc<dyn Provider>>,
    conn: Option<ConnHandle>,
}

impl fmt::Debug for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Info")
            .field("provider_name", &self.provider_name)
            .field("provider_version", &self.provider_version)
            .field("fabric_name", &self.fabric_name)
            .field("domain_name", &self.domain_name)
            .field("caps", &self.caps)
            .field("ep_type", &self.ep_type)
            .field("mr_mode", &self.mr_mode)
            .field("progress", &self.progress)
            .field("src_addr", &self.src_addr)
            .field("dest_addr", &self.dest_addr)
            .field("limits", &self.limits)
            .field("conn_request", &self.conn.is_some())
            .finish()
    }
}

impl Info {
    /// A template answer; providers fill it in and return it from
    /// [`Provider::offers`].
    pub fn new(provider_name: &str, caps: Caps, ep_type: EpType, limits: Limits) -> Self {
        Info {
            provider_name: provider_name.to_string(),
            provider_version: (0, 1),
            fabric_name: String::new(),
            domain_name: String::new(),
            caps,
            ep_type,
            mr_mode: MrMode::empty(),
            progress: Progress::Manual,
            src_addr: None,
            dest_addr: None,
            limits,
            provider: None,
            conn: None,
        }
    }

    /// The provider that produced this answer (set by getinfo).
    pub fn provider(&self) -> Option<&Arc<dyn Provider>> {
        self.provider.as_ref()
    }

    /// Attaches the provider (used by registries and providers).
    pub fn with_provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// The pending connection request this answer describes, if it came from a
    /// [`ConnRequest`](crate::ConnRequest) event.
    pub fn conn_handle(&self) -> Option<&ConnHandle> {
        self.conn.as_ref()
    }

    /// Attaches a pending connection request (used by providers).
    pub fn with_conn_handle(mut self, handle: ConnHandle) -> Self {
        self.conn = Some(handle);
        self
    }
}

/// An opaque provider object standing for a pending connection request.
#[derive(Clone)]
pub struct ConnHandle(pub Arc<dyn std::any::Any + Send + Sync>);

impl fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnHandle")
    }
}

/// What the application asks for. Every field left empty matches anything.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// Required capabilities.
    pub caps: Caps,
    /// Required endpoint type.
    pub ep_type: Option<EpType>,
    /// Provider name, or several separated by `,` or `;`.
    pub provider: Option<String>,
    /// Host name or IP address.
    pub node: Option<String>,
    /// Port.
    pub service: Option<String>,
    /// `node`/`service` name the local (listening) address rather than the peer's
    /// (libfabric `FI_SOURCE`).
    pub source: bool,
    /// The local address to use when `node`/`service` name the peer (libfabric's
    /// `hints->src_addr`): a connecting endpoint binds it, and a provider with one
    /// device per address (softroce) picks that device. Port 0: any port. getinfo
    /// rejects an address that is not on this machine.
    pub src_addr: Option<SocketAddr>,
    /// Registration modes the application can handle (`None`: any).
    pub mr_mode: Option<MrMode>,
    /// The widest memory key the application can carry, in bytes (libfabric's
    /// `domain_attr->mr_key_size` hint; e.g. 4 for NVMe-oF keyed SGLs). A provider
    /// whose keys are wider either narrows them for this answer or is rejected.
    pub mr_key_size: Option<usize>,
    /// Progress model wanted (`None`: the provider's default).
    pub progress: Option<Progress>,
}

impl Hints {
    /// Empty hints.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requires `caps`.
    pub fn caps(mut self, caps: Caps) -> Self {
        self.caps |= caps;
        self
    }
    /// Requires an endpoint type.
    pub fn ep_type(mut self, t: EpType) -> Self {
        self.ep_type = Some(t);
        self
    }
    /// Restricts to a provider by name.
    pub fn provider(mut self, name: &str) -> Self {
        self.provider = Some(name.to_string());
        self
    }
    /// Sets the node (host or IP).
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }
    /// Sets the service (port).
    pub fn service(mut self, service: impl ToString) -> Self {
        self.service = Some(service.to_string());
        self
    }
    /// Marks node/service as the local address to listen on.
    pub fn source(mut self, yes: bool) -> Self {
        self.source = yes;
        self
    }
    /// Sets the local address of a connecting endpoint (see [`Hints::src_addr`]
    /// the field); any port.
    pub fn src_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.src_addr = Some(SocketAddr::new(ip, 0));
        self
    }
    /// Sets the local address (and port, 0 for any) of a connecting endpoint.
    pub fn src_addr(mut self, addr: SocketAddr) -> Self {
        self.src_addr = Some(addr);
        self
    }
    /// Asks for memory keys of at most `bytes` bytes (see [`Hints::mr_key_size`] the
    /// field).
    pub fn mr_key_size(mut self, bytes: usize) -> Self {
        self.mr_key_size = Some(bytes);
        self
    }
    /// Sets the registration modes the application supports.
    pub fn mr_mode(mut self, m: MrMode) -> Self {
        self.mr_mode = Some(m);
        self
    }
    /// Requests a progress model.
    pub fn progress(mut self, p: Progress) -> Self {
        self.progress = Some(p);
        self
    }

    /// Resolves node/service into a socket address (IPv4 preferred). `Ok(None)` when
    /// neither is given.
    pub fn resolve_addr(&self) -> std::result::Result<Option<SocketAddr>, String> {
        if self.node.is_none() && self.service.is_none() {
            return Ok(None);
        }
        let node =
            self.node
                .as_deref()
                .unwrap_or(if self.source { "0.0.0.0" } else { "127.0.0.1" });
        let port: u16 = match self.service.as_deref() {
            None => 0,
            Some(s) => s
                .parse()
                .map_err(|_| format!("service '{s}' is not a port number"))?,
        };
        let addrs: Vec<SocketAddr> = (node, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve node '{node}': {e}"))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .map(Some)
            .ok_or_else(|| format!("node '{node}' resolved to no address"))
    }
}

/// What a provider's answer did not satisfy: the hint field (or machine condition)
/// that failed to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HintField {
    /// The provider cannot run here (no device, missing library or cargo feature).
    Availability,
    /// The provider's configuration (environment variables) is invalid.
    Config,
    /// [`Hints::provider`] or the `FABRIC_PROVIDER` filter.
    Provider,
    /// [`Hints::ep_type`].
    EpType,
    /// [`Hints::caps`].
    Caps,
    /// [`Hints::mr_mode`].
    MrMode,
    /// [`Hints::mr_key_size`].
    MrKeySize,
    /// The source address (node/service with `source`, or [`Hints::src_addr`]).
    SrcAddr,
    /// The destination address (node/service).
    DestAddr,
    /// Anything else a provider checks.
    Other,
}

/// Why a provider does not answer given hints (from [`Provider::available`] or
/// [`Provider::check`], or from getinfo's own matching): the
/// field that did not match and a message for people. `Display` shows the message.
///
/// [`Provider::available`]: crate::Provider::available
/// [`Provider::check`]: crate::Provider::check
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// What did not match.
    pub field: HintField,
    /// Why, in words.
    pub message: String,
}

impl Mismatch {
    /// A reason about `field`.
    pub fn new(field: HintField, message: impl Into<String>) -> Self {
        Mismatch {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Mismatch {}

/// A provider's reason for not answering given hints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Provider name.
    pub provider: String,
    /// Why it did not match (the [`Mismatch`]es' messages, joined by "; ").
    pub reason: String,
    /// The reasons, typed.
    pub mismatches: Vec<Mismatch>,
}

/// getinfo found no match; carries each provider's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GetInfoError {
    /// One entry per provider considered.
    pub rejections: Vec<Rejection>,
    /// Set when the hints name only providers that are not registered (misspelled, or
    /// not built): the names asked for and the names registered.
    pub unknown_provider: Option<(String, Vec<String>)>,
}

impl GetInfoError {
    /// An error carrying each provider's reason.
    pub fn new(rejections: Vec<Rejection>) -> Self {
        GetInfoError {
            rejections,
            unknown_provider: None,
        }
    }
}

impl fmt::Display for GetInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((asked, built)) = &self.unknown_provider {
            return write!(
                f,
                "no provider named '{asked}' (built: {})",
                if built.is_empty() {
                    "none".to_string()
                } else {
                    built.join(", ")
                }
            );
        }
        if self.rejections.is_empty() {
            return f.write_str("no provider is registered");
        }
        f.write_str("no provider matches the hints:")?;
        for r in &self.rejections {
            write!(f, "\n  {}: {}", r.provider, r.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for GetInfoError {}

impl From<GetInfoError> for crate::Error {
    fn from(e: GetInfoError) -> Self {
        crate::Error::new(crate::ErrorKind::NoData, e.to_string())
    }
}

/// Checks one offer against hints; `Err` carries the reason, `Ok` the answer.
pub(crate) fn match_offer(
    offer: &Info,
    hints: &Hints,
    addr: Option<SocketAddr>,
) -> std::result::Result<Info, Mismatch> {
    if let Some(t) = hints.ep_type {
        if t != offer.ep_type {
            return Err(Mismatch::new(
                HintField::EpType,
                format!("endpoint type {t} not offered (offers {})", offer.ep_type),
            ));
        }
    }
    let missing = hints.caps - offer.caps;
    if !missing.is_empty() {
        return Err(Mismatch::new(
            HintField::Caps,
            format!("missing capabilities {}", flag_names(missing)),
        ));
    }
    if let Some(app) = hints.mr_mode {
        let needed = offer.mr_mode - app;
        if !needed.is_empty() {
            return Err(Mismatch::new(
                HintField::MrMode,
                format!(
                    "requires mr_mode {} that the hints do not allow",
                    flag_names(needed)
                ),
            ));
        }
    }
    let mut info = offer.clone();
    if let Some(p) = hints.progress {
        info.progress = p;
    }
    if let Some(a) = addr {
        if hints.source {
            info.src_addr = Some(Address::Inet(a));
        } else {
            if a.port() == 0 {
                return Err(Mismatch::new(
                    HintField::DestAddr,
                    "a destination needs a service (port)",
                ));
            }
            info.dest_addr = Some(Address::Inet(a));
        }
    }
    if let Some(src) = hints.src_addr {
        match &info.src_addr {
            Some(Address::Inet(s)) if *s != src => {
                return Err(Mismatch::new(
                    HintField::SrcAddr,
                    format!(
                        "two source addresses: node/service with source ({s}) and src_addr ({src})"
                    ),
                ))
            }
            _ => info.src_addr = Some(Address::Inet(src)),
        }
    }
    Ok(info)
}

/// Checks that `ip` is an address of this machine (or the unspecified address), by
/// binding a UDP socket to it on an ephemeral port. `Err` is the rejection reason.
pub(crate) fn check_local_ip(ip: std::net::IpAddr) -> std::result::Result<(), Mismatch> {
    if ip.is_unspecified() {
        return Ok(());
    }
    match std::net::UdpSocket::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(Mismatch::new(
            HintField::SrcAddr,
            format!("source address {ip} is not an address of this machine"),
        )),
        Err(e) => Err(Mismatch::new(
            HintField::SrcAddr,
            format!("source address {ip} cannot be bound: {e}"),
        )),
    }
}

/// `A | B` names of set bitflags.
pub fn flag_names<F: bitflags::Flags>(f: F) -> String {
    let names: Vec<&str> = f.iter_names().map(|(n, _)| n).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(" | ")
    }
}

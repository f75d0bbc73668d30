//! nvmeof: an NVMe-oF host command line in the manner of nvme-cli, over the fabric
//! API. A user-space host: each command connects, does its work and disconnects.

use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nvmeof::host::{Controller, HostConfig, NamespaceInfo, TransportAddr, MAX_HOST_TRANSFER};
use nvmeof::tools::{host_source, logging, parse_list, parse_num};
use nvmeof::wire::identify::{IdentifyController, IdentifyNamespace};
use nvmeof::wire::log::{
    AddressFamily, DiscoveryLogEntry, LogPageId, RdmaCms, RdmaProviderType, RdmaQpType,
    SubsystemType, TransportType,
};
use nvmeof::wire::opcodes::{AdminOpcode, FeatureId, NSID_ALL};
use nvmeof::wire::text::Nqn;
use nvmeof::wire::SqeRepr;
use serde_json::{json, Map, Value};

const EXAMPLES: &str = "\
Example session (start a target first: `nvmeof-target` prints its address):
  nvmeof-target &          # ... port 1 listening: trtype softroce traddr 127.0.0.1 trsvcid 41234
  nvmeof discover -t softroce -a 127.0.0.1 -s 41234
  nvmeof id-ctrl  -t softroce -a 127.0.0.1 -s 41234 -o json
  head -c 4096 /dev/urandom > data.bin
  nvmeof write -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d data.bin
  nvmeof read  -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d back.bin
  cmp data.bin back.bin

Connection options: -t transport (the fabric provider: softroce; tcp's 64-bit keys do
not fit keyed SGLs), -a traddr, -s trsvcid, -n subsystem NQN (when omitted, the one
subsystem discovery lists), -w host-traddr (address to connect from; for softroce on
loopback a random 127.x.y.z is chosen), -q hostnqn. Commands that take nvme-cli's -s
(start block) and -n (namespace ID) spell these --trsvcid and --nqn.
Environment: NVMEOF_LOG=warn|info|debug (default warn).
Against the Linux kernel's target (nvmet-rdma, which listens through rdma_cm): set
SOFTROCE_CM=ib (softroce connects through rdma_cm's IB CM exchange over QP1) and give
-w, the local address on the target's network, e.g.
  SOFTROCE_CM=ib nvmeof discover -t softroce -a 192.168.100.2 -s 4420 -w 192.168.100.1";

#[derive(Parser)]
#[command(
    name = "nvmeof",
    about = "NVMe over Fabrics host tool in the manner of nvme-cli (user-space, over the fabric API)",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Normal,
    Json,
    Binary,
}

/// Connection options with nvme-cli's short names (-t -a -s -n -w -q).
#[derive(Args, Clone)]
struct Conn {
    /// Transport type: the fabric provider (softroce; rdma = verbs).
    #[arg(short = 't', long = "transport", default_value = "softroce")]
    transport: String,
    /// Target address.
    #[arg(short = 'a', long = "traddr", default_value = "127.0.0.1")]
    traddr: String,
    /// Target service (port).
    #[arg(short = 's', long = "trsvcid", default_value = "4420")]
    trsvcid: String,
    /// Subsystem NQN (default: the only one discovery lists).
    #[arg(short = 'n', long = "nqn")]
    nqn: Option<String>,
    /// Host address to connect from.
    #[arg(short = 'w', long = "host-traddr")]
    host_traddr: Option<IpAddr>,
    /// Host NQN.
    #[arg(short = 'q', long = "hostnqn")]
    hostnqn: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value = "normal"
    )]
    output: Format,
}

/// Connection options for commands whose -s and -n mean start block and namespace.
#[derive(Args, Clone)]
struct ConnLong {
    /// Transport type: the fabric provider (softroce; rdma = verbs).
    #[arg(short = 't', long = "transport", default_value = "softroce")]
    transport: String,
    /// Target address.
    #[arg(short = 'a', long = "traddr", default_value = "127.0.0.1")]
    traddr: String,
    /// Target service (port).
    #[arg(long = "trsvcid", default_value = "4420")]
    trsvcid: String,
    /// Subsystem NQN (default: the only one discovery lists).
    #[arg(long = "nqn")]
    nqn: Option<String>,
    /// Host address to connect from.
    #[arg(short = 'w', long = "host-traddr")]
    host_traddr: Option<IpAddr>,
    /// Host NQN.
    #[arg(short = 'q', long = "hostnqn")]
    hostnqn: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output-format",
        value_enum,
        default_value = "normal"
    )]
    output: Format,
}

impl From<ConnLong> for Conn {
    fn from(c: ConnLong) -> Conn {
        Conn {
            transport: c.transport,
            traddr: c.traddr,
            trsvcid: c.trsvcid,
            nqn: c.nqn,
            host_traddr: c.host_traddr,
            hostnqn: c.hostnqn,
            output: c.output,
        }
    }
}

#[derive(Args)]
struct NsArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
}

#[derive(Args)]
struct GetLogArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "0xffffffff", value_parser = num32)]
    nsid: u32,
    /// Log page identifier (1 error, 2 SMART, 4 changed namespaces, ...).
    #[arg(short = 'i', long = "log-id", value_parser = num8)]
    log_id: u8,
    /// Bytes to read (a multiple of 4).
    #[arg(short = 'l', long = "log-len", default_value = "512", value_parser = num32)]
    log_len: u32,
    /// Offset in the log page.
    #[arg(short = 'L', long = "lpo", default_value = "0", value_parser = num64)]
    lpo: u64,
    /// Write the raw page to stdout.
    #[arg(short = 'b', long = "raw-binary")]
    raw: bool,
}

#[derive(Args)]
struct GetFeatureArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "0", value_parser = num32)]
    nsid: u32,
    /// Feature identifier (6 volatile write cache, 7 number of queues, 0xf keep-alive timer, ...).
    #[arg(short = 'f', long = "feature-id", value_parser = num8)]
    fid: u8,
    /// Select: 0 current, 1 default, 2 saved, 3 supported capabilities.
    #[arg(short = 's', long = "sel", default_value = "0", value_parser = num8)]
    sel: u8,
    /// Command dword 11.
    #[arg(short = 'c', long = "cdw11", default_value = "0", value_parser = num32)]
    cdw11: u32,
}

#[derive(Args)]
struct RwArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
    /// First logical block.
    #[arg(short = 's', long = "start-block", default_value = "0", value_parser = num64)]
    slba: u64,
    /// Number of blocks, 0's based (default: from the data size).
    #[arg(short = 'c', long = "block-count", value_parser = num64)]
    nlb: Option<u64>,
    /// Data size in bytes (default: the blocks' size).
    #[arg(short = 'z', long = "data-size", value_parser = num64)]
    data_size: Option<u64>,
    /// Data file (read: written to it, else stdout; write/compare: read from it, else stdin).
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Force unit access (write).
    #[arg(short = 'f', long = "force-unit-access")]
    fua: bool,
}

#[derive(Args)]
struct FlushArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID (0xffffffff: every namespace).
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
}

#[derive(Args)]
struct RangeArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
    /// First logical block.
    #[arg(short = 's', long = "start-block", default_value = "0", value_parser = num64)]
    slba: u64,
    /// Number of blocks, 0's based.
    #[arg(short = 'c', long = "block-count", default_value = "0", value_parser = num64)]
    nlb: u64,
    /// Deallocate (write-zeroes).
    #[arg(short = 'd', long = "deac")]
    deac: bool,
}

#[derive(Args)]
struct DsmArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
    /// Comma separated first blocks of the ranges.
    #[arg(short = 's', long = "slbs")]
    slbs: String,
    /// Comma separated block counts of the ranges.
    #[arg(short = 'b', long = "blocks")]
    blocks: String,
    /// Attribute deallocate (the one supported).
    #[arg(long = "ad")]
    ad: bool,
}

#[derive(Args)]
struct CopyArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Namespace ID.
    #[arg(short = 'n', long = "namespace-id", default_value = "1", value_parser = num32)]
    nsid: u32,
    /// Destination block.
    #[arg(short = 'd', long = "sdlba", value_parser = num64)]
    sdlba: u64,
    /// Comma separated first blocks of the source ranges.
    #[arg(short = 's', long = "slbs")]
    slbs: String,
    /// Comma separated block counts of the source ranges, 0's based (as NLB).
    #[arg(short = 'b', long = "blocks")]
    blocks: String,
}

#[derive(Args)]
struct HoldArgs {
    #[command(flatten)]
    conn: ConnLong,
    /// Seconds to stay connected and idle.
    #[arg(long = "seconds", default_value = "12", value_parser = num64)]
    seconds: u64,
    /// Keep-alive timeout asked for in Connect (KATO), ms.
    #[arg(short = 'k', long = "keep-alive-tmo", default_value = "5000", value_parser = num32)]
    kato: u32,
    /// Send no Keep Alive commands: a target that enforces KATO ends the association.
    #[arg(long = "no-keep-alive")]
    no_keep_alive: bool,
    /// When the controller is gone: connect again (the host library's reconnect) and
    /// check the new association answers; exits 0 if it does.
    #[arg(long = "reconnect")]
    reconnect: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Discovery log of the target's discovery controller.
    Discover(Conn),
    /// Discover, then connect to every subsystem listed (and report; connections end
    /// when the tool exits).
    ConnectAll(Conn),
    /// Namespaces of every subsystem discovery lists.
    List(Conn),
    /// Identify Controller.
    IdCtrl(Conn),
    /// Identify Namespace.
    IdNs(NsArgs),
    /// Active namespace IDs.
    ListNs(ConnLong),
    /// Get Log Page.
    GetLog(GetLogArgs),
    /// Get Features.
    GetFeature(GetFeatureArgs),
    /// Read blocks.
    #[command(
        after_help = "Example: nvmeof read -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d back.bin"
    )]
    Read(RwArgs),
    /// Write blocks.
    #[command(
        after_help = "Example: nvmeof write -a 127.0.0.1 --trsvcid 41234 -n 1 -s 0 -c 7 -z 4096 -d data.bin"
    )]
    Write(RwArgs),
    /// Flush a namespace (or all with -n 0xffffffff).
    Flush(FlushArgs),
    /// Write zeroes (or deallocate with -d).
    WriteZeroes(RangeArgs),
    /// Dataset Management: deallocate ranges.
    Dsm(DsmArgs),
    /// Verify blocks (read and check on the target, no data moved).
    Verify(RangeArgs),
    /// Compare blocks with data.
    Compare(RwArgs),
    /// Copy ranges to a destination (simple copy).
    Copy(CopyArgs),
    /// Keep-alive check: connect with KATO, stay idle (Keep Alive commands sent every
    /// KATO / 2 unless --no-keep-alive), then see whether the controller still
    /// answers; exits 0 only if it does.
    Hold(HoldArgs),
}

fn num64(s: &str) -> Result<u64, String> {
    parse_num(s)
}

fn num32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_num(s)?).map_err(|_| format!("{s} does not fit 32 bits"))
}

fn num8(s: &str) -> Result<u8, String> {
    u8::try_from(parse_num(s)?).map_err(|_| format!("{s} does not fit 8 bits"))
}

type Res<T> = Result<T, String>;

fn err(e: nvmeof::Error) -> String {
    e.to_string()
}

impl Conn {
    fn addr(&self) -> TransportAddr {
        TransportAddr::new(&self.transport, &self.traddr, &self.trsvcid)
    }

    fn provider(&self) -> String {
        nvmeof::tools::config::provider_for_trtype(&self.transport)
    }

    fn host_config(&self, keep_alive: bool) -> HostConfig {
        let mut cfg = HostConfig {
            keep_alive,
            timeout: Duration::from_secs(10),
            src_ip: self
                .host_traddr
                .or_else(|| host_source(&self.provider(), &self.traddr)),
            ..HostConfig::default()
        };
        if let Some(q) = &self.hostnqn {
            cfg.hostnqn = q.clone();
        }
        cfg
    }

    fn target(&self) -> TransportAddr {
        let mut a = self.addr();
        a.provider = self.provider();
        a
    }

    fn discovery_log(&self) -> Res<nvmeof::wire::log::DiscoveryLog> {
        let ctrl = Controller::connect(&self.target(), Nqn::DISCOVERY, &self.host_config(false))
            .map_err(|e| format!("discovery controller at {}: {e}", self.where_()))?;
        let log = ctrl.discovery_log();
        let _ = ctrl.disconnect();
        log.map_err(err)
    }

    fn where_(&self) -> String {
        format!("{} {}:{}", self.provider(), self.traddr, self.trsvcid)
    }

    fn subnqn(&self) -> Res<String> {
        if let Some(n) = &self.nqn {
            return Ok(n.clone());
        }
        let log = self.discovery_log()?;
        let mut nqns: Vec<String> = log
            .entries
            .iter()
            .filter(|e| e.subtype == SubsystemType::Nvme)
            .map(|e| e.subnqn.as_str().to_string())
            .collect();
        nqns.dedup();
        match nqns.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!("discovery at {} lists no subsystem", self.where_())),
            many => Err(format!(
                "discovery lists {} subsystems; choose one with --nqn: {}",
                many.len(),
                many.join(", ")
            )),
        }
    }

    fn connect(&self) -> Res<Controller> {
        let nqn = self.subnqn()?;
        Controller::connect(&self.target(), &nqn, &self.host_config(true))
            .map_err(|e| format!("connect to {nqn} at {}: {e}", self.where_()))
    }
}

/// Prints `fields` as "name : value" lines or as a JSON object.
fn show(title: &str, fields: Vec<(&str, Value)>, format: Format) {
    if format == Format::Json {
        let map: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.into(), v)).collect();
        println!("{}", pretty(&Value::Object(map)));
        return;
    }
    if !title.is_empty() {
        println!("{title}");
    }
    for (k, v) in fields {
        let text = match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        println!("{k:<10}: {text}");
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn trtype_name(t: TransportType) -> &'static str {
    match t {
        TransportType::Rdma => "rdma",
        TransportType::FibreChannel => "fc",
        TransportType::Tcp => "tcp",
        TransportType::Loop => "loop",
        TransportType::Unknown(_) => "unrecognized",
    }
}

fn entry_fields(e: &DiscoveryLogEntry) -> Vec<(&'static str, Value)> {
    let adrfam = match e.adrfam {
        AddressFamily::Ipv4 => "ipv4",
        AddressFamily::Ipv6 => "ipv6",
        AddressFamily::Infiniband => "infiniband",
        AddressFamily::FibreChannel => "fibre-channel",
        AddressFamily::Loop => "loop",
        AddressFamily::Unknown(_) => "unrecognized",
    };
    let subtype = match e.subtype {
        SubsystemType::Referral => "discovery subsystem referral",
        SubsystemType::Nvme => "nvme subsystem",
        SubsystemType::CurrentDiscovery => "current discovery subsystem",
        SubsystemType::Unknown(_) => "unrecognized",
    };
    let treq = match e.treq & 0b11 {
        0 => "not specified",
        1 => "required",
        2 => "not required",
        _ => "reserved",
    };
    let prtype = match e.tsas.prtype {
        RdmaProviderType::NotSpecified => "not specified",
        RdmaProviderType::Infiniband => "infiniband",
        RdmaProviderType::Roce => "roce",
        RdmaProviderType::RoceV2 => "roce-v2",
        RdmaProviderType::Iwarp => "iwarp",
        RdmaProviderType::Unknown(_) => "unrecognized",
    };
    let qptype = match e.tsas.qptype {
        RdmaQpType::Connected => "connected",
        RdmaQpType::Datagram => "datagram",
        RdmaQpType::Unknown(_) => "unrecognized",
    };
    let cms = match e.tsas.cms {
        RdmaCms::RdmaCm => "rdma-cm",
        RdmaCms::Unknown(_) => "unrecognized",
    };
    vec![
        ("trtype", json!(trtype_name(e.trtype))),
        ("adrfam", json!(adrfam)),
        ("subtype", json!(subtype)),
        ("treq", json!(treq)),
        ("portid", json!(e.portid)),
        ("trsvcid", json!(e.trsvcid.as_str())),
        ("subnqn", json!(e.subnqn.as_str())),
        ("traddr", json!(e.traddr.as_str())),
        ("asqsz", json!(e.asqsz)),
        ("rdma_prtype", json!(prtype)),
        ("rdma_qptype", json!(qptype)),
        ("rdma_cms", json!(cms)),
        ("rdma_pkey", json!(format!("{:#06x}", e.tsas.pkey))),
    ]
}

fn discover(c: &Conn) -> Res<()> {
    let log = c.discovery_log()?;
    if c.output == Format::Json {
        let records: Vec<Value> = log
            .entries
            .iter()
            .map(|e| {
                Value::Object(
                    entry_fields(e)
                        .into_iter()
                        .map(|(k, v)| (k.into(), v))
                        .collect(),
                )
            })
            .collect();
        println!(
            "{}",
            pretty(&json!({"genctr": log.genctr, "records": records}))
        );
        return Ok(());
    }
    println!(
        "\nDiscovery Log Number of Records {}, Generation counter {}",
        log.entries.len(),
        log.genctr
    );
    for (i, e) in log.entries.iter().enumerate() {
        println!("=====Discovery Log Entry {i}======");
        for (k, v) in entry_fields(e) {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            println!("{:<8} {text}", format!("{k}:"));
        }
    }
    Ok(())
}

/// Connects to each subsystem discovery lists and calls `f` with the controller.
fn each_subsystem(
    c: &Conn,
    mut f: impl FnMut(&DiscoveryLogEntry, &Controller) -> Res<()>,
) -> Res<()> {
    let log = c.discovery_log()?;
    let provider = c.provider();
    let mut failures = Vec::new();
    for e in log
        .entries
        .iter()
        .filter(|e| e.subtype == SubsystemType::Nvme)
    {
        if c.nqn.as_deref().is_some_and(|n| n != e.subnqn.as_str()) {
            continue;
        }
        let addr = TransportAddr::from_entry(&provider, e);
        let nqn = e.subnqn.as_str();
        match Controller::connect(&addr, nqn, &c.host_config(true)) {
            Ok(ctrl) => {
                let r = f(e, &ctrl);
                let _ = ctrl.disconnect();
                r?;
            }
            Err(err) => {
                let msg = format!("{nqn} at {}:{}: {err}", addr.addr, addr.service);
                eprintln!("nvmeof: {msg}");
                failures.push(msg);
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} connection(s) failed", failures.len()))
    }
}

fn connect_all(c: &Conn) -> Res<()> {
    let mut out = Vec::new();
    each_subsystem(c, |e, ctrl| {
        let nsids = ctrl.active_namespaces().map_err(err)?;
        let id = ctrl.identify();
        out.push(json!({
            "subnqn": e.subnqn.as_str(),
            "traddr": e.traddr.as_str(),
            "trsvcid": e.trsvcid.as_str(),
            "cntlid": ctrl.cntlid(),
            "model": id.mn.as_str().trim(),
            "serial": id.sn.as_str().trim(),
            "io_queues": ctrl.io_queue_count(),
            "namespaces": nsids,
        }));
        Ok(())
    })?;
    if c.output == Format::Json {
        println!("{}", pretty(&json!({"connected": out})));
    } else {
        for o in &out {
            println!(
                "connected: {} at {}:{}, controller {}, namespaces {}",
                o["subnqn"].as_str().unwrap_or_default(),
                o["traddr"].as_str().unwrap_or_default(),
                o["trsvcid"].as_str().unwrap_or_default(),
                o["cntlid"],
                o["namespaces"]
            );
        }
        println!(
            "({} subsystem(s); a user-space host: connections end when nvmeof exits)",
            out.len()
        );
    }
    Ok(())
}

fn list(c: &Conn) -> Res<()> {
    let mut devices = Vec::new();
    each_subsystem(c, |e, ctrl| {
        let id = ctrl.identify();
        for nsid in ctrl.active_namespaces().map_err(err)? {
            let ns = ctrl.namespace(nsid).map_err(err)?;
            devices.push(json!({
                "SubsystemNQN": e.subnqn.as_str(),
                "Address": format!("{}:{}", e.traddr.as_str(), e.trsvcid.as_str()),
                "NameSpace": nsid,
                "SerialNumber": id.sn.as_str().trim(),
                "ModelNumber": id.mn.as_str().trim(),
                "Firmware": id.fr.as_str().trim(),
                "UsedBytes": ns.blocks * u64::from(ns.block_size),
                "MaximumLBA": ns.blocks,
                "PhysicalSize": ns.blocks * u64::from(ns.block_size),
                "SectorSize": ns.block_size,
            }));
        }
        Ok(())
    })?;
    if c.output == Format::Json {
        println!("{}", pretty(&json!({"Devices": devices})));
        return Ok(());
    }
    println!(
        "{:<40} {:<22} {:<20} {:<24} {:>4} {:>12} {:>8} {:<8}",
        "Subsystem NQN", "Address", "SN", "Model", "NS", "Size", "Format", "FW Rev"
    );
    println!(
        "{} {} {} {} {} {} {} {}",
        "-".repeat(40),
        "-".repeat(22),
        "-".repeat(20),
        "-".repeat(24),
        "-".repeat(4),
        "-".repeat(12),
        "-".repeat(8),
        "-".repeat(8)
    );
    for d in &devices {
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        let bytes = d["PhysicalSize"].as_u64().unwrap_or(0);
        println!(
            "{:<40} {:<22} {:<20} {:<24} {:>4} {:>12} {:>8} {:<8}",
            s("SubsystemNQN"),
            s("Address"),
            s("SerialNumber"),
            s("ModelNumber"),
            d["NameSpace"],
            human(bytes),
            format!("{} B", d["SectorSize"]),
            s("Firmware")
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

fn id_ctrl_fields(id: &IdentifyController) -> Vec<(&'static str, Value)> {
    let x = |v: u64| json!(format!("{v:#x}"));
    vec![
        ("vid", json!(id.vid)),
        ("ssvid", json!(id.ssvid)),
        ("sn", json!(id.sn.as_str())),
        ("mn", json!(id.mn.as_str())),
        ("fr", json!(id.fr.as_str())),
        ("rab", json!(id.rab)),
        ("ieee", json!(hex(&id.ieee))),
        ("cmic", json!(id.cmic)),
        ("mdts", json!(id.mdts)),
        ("cntlid", json!(id.cntlid)),
        ("ver", x(id.ver.into())),
        ("rtd3r", json!(id.rtd3r)),
        ("rtd3e", json!(id.rtd3e)),
        ("oaes", x(id.oaes.into())),
        ("ctratt", x(id.ctratt.into())),
        ("cntrltype", json!(u8::from(id.cntrltype))),
        ("fguid", json!(hex(&id.fguid))),
        ("oacs", x(id.oacs.into())),
        ("acl", json!(id.acl)),
        ("aerl", json!(id.aerl)),
        ("frmw", x(id.frmw.into())),
        ("lpa", x(id.lpa.into())),
        ("elpe", json!(id.elpe)),
        ("npss", json!(id.npss)),
        ("avscc", json!(id.avscc)),
        ("wctemp", json!(id.wctemp)),
        ("cctemp", json!(id.cctemp)),
        ("kas", json!(id.kas)),
        ("sqes", x(id.sqes.into())),
        ("cqes", x(id.cqes.into())),
        ("maxcmd", json!(id.maxcmd)),
        ("nn", json!(id.nn)),
        ("oncs", x(id.oncs.into())),
        ("fuses", json!(id.fuses)),
        ("fna", json!(id.fna)),
        ("vwc", x(id.vwc.into())),
        ("awun", json!(id.awun)),
        ("awupf", json!(id.awupf)),
        ("acwu", json!(id.acwu)),
        ("sgls", x(id.sgls.into())),
        ("mnan", json!(id.mnan)),
        ("subnqn", json!(id.subnqn.as_str())),
        ("ioccsz", json!(id.ioccsz)),
        ("iorcsz", json!(id.iorcsz)),
        ("icdoff", json!(id.icdoff)),
        ("fcatt", json!(id.fcatt)),
        ("msdbd", json!(id.msdbd)),
        ("ofcs", json!(id.ofcs)),
    ]
}

fn id_ctrl(c: &Conn) -> Res<()> {
    let ctrl = c.connect()?;
    let fields = id_ctrl_fields(ctrl.identify());
    let _ = ctrl.disconnect();
    show("NVME Identify Controller:", fields, c.output);
    Ok(())
}

fn id_ns_fields(id: &IdentifyNamespace) -> Vec<(&'static str, Value)> {
    let lbafs: Vec<Value> = id
        .lbaf
        .0
        .iter()
        .take(usize::from(id.nlbaf) + 1)
        .map(|f| json!({"ms": f.ms, "ds": f.lbads, "rp": f.rp}))
        .collect();
    vec![
        ("nsze", json!(id.nsze)),
        ("ncap", json!(id.ncap)),
        ("nuse", json!(id.nuse)),
        ("nsfeat", json!(id.nsfeat)),
        ("nlbaf", json!(id.nlbaf)),
        ("flbas", json!(id.flbas)),
        ("mc", json!(id.mc)),
        ("dpc", json!(id.dpc)),
        ("dps", json!(id.dps)),
        ("nmic", json!(id.nmic)),
        ("rescap", json!(id.rescap)),
        ("fpi", json!(id.fpi)),
        ("dlfeat", json!(id.dlfeat)),
        ("nawun", json!(id.nawun)),
        ("nawupf", json!(id.nawupf)),
        ("nacwu", json!(id.nacwu)),
        ("nabsn", json!(id.nabsn)),
        ("nabo", json!(id.nabo)),
        ("nabspf", json!(id.nabspf)),
        ("noiob", json!(id.noiob)),
        ("nvmcap", json!(id.nvmcap.to_string())),
        ("mssrl", json!(id.mssrl)),
        ("mcl", json!(id.mcl)),
        ("msrc", json!(id.msrc)),
        ("anagrpid", json!(id.anagrpid)),
        ("nsattr", json!(id.nsattr)),
        ("nvmsetid", json!(id.nvmsetid)),
        ("endgid", json!(id.endgid)),
        ("nguid", json!(hex(&id.nguid))),
        ("eui64", json!(hex(&id.eui64))),
        ("lbafs", Value::Array(lbafs)),
    ]
}

fn id_ns(a: NsArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    let ctrl = c.connect()?;
    let id = ctrl.identify_namespace(a.nsid).map_err(err);
    let _ = ctrl.disconnect();
    let id = id?;
    if c.output == Format::Json {
        show("", id_ns_fields(&id), Format::Json);
        return Ok(());
    }
    let fields: Vec<_> = id_ns_fields(&id)
        .into_iter()
        .filter(|(k, _)| *k != "lbafs")
        .collect();
    show(
        &format!("NVME Identify Namespace {}:", a.nsid),
        fields,
        Format::Normal,
    );
    for (i, f) in id.lbaf.0.iter().take(usize::from(id.nlbaf) + 1).enumerate() {
        let used = if i == id.formatted_index() {
            " (in use)"
        } else {
            ""
        };
        println!(
            "lbaf {i:>2} : ms:{:<3} lbads:{:<2} rp:{:#x}{used}",
            f.ms, f.lbads, f.rp
        );
    }
    Ok(())
}

fn list_ns(conn: ConnLong) -> Res<()> {
    let c: Conn = conn.into();
    let ctrl = c.connect()?;
    let ids = ctrl.active_namespaces().map_err(err);
    let _ = ctrl.disconnect();
    let ids = ids?;
    if c.output == Format::Json {
        let list: Vec<Value> = ids.iter().map(|n| json!({"nsid": n})).collect();
        println!("{}", pretty(&json!({"nsid_list": list})));
    } else {
        for (i, n) in ids.iter().enumerate() {
            println!("[{i:>4}]:{n:#x}");
        }
    }
    Ok(())
}

fn hexdump(data: &[u8]) {
    for (i, chunk) in data.chunks(16).enumerate() {
        let bytes: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!("{:04x}: {:<48} \"{text}\"", i * 16, bytes.join(" "));
    }
}

fn get_log(a: GetLogArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    if a.log_len == 0 || !a.log_len.is_multiple_of(4) {
        return Err(format!(
            "log length {} is not a positive multiple of 4",
            a.log_len
        ));
    }
    let ctrl = c.connect()?;
    let mut page = Vec::new();
    let mut r = Ok(());
    while page.len() < a.log_len as usize {
        let n = (a.log_len as usize - page.len()).min(MAX_HOST_TRANSFER) as u32;
        match ctrl.get_log_page(
            LogPageId::from(a.log_id),
            a.nsid,
            a.lpo + page.len() as u64,
            n,
        ) {
            Ok(p) => page.extend(p),
            Err(e) => {
                r = Err(err(e));
                break;
            }
        }
    }
    let _ = ctrl.disconnect();
    r?;
    match (a.raw, c.output) {
        (true, _) | (_, Format::Binary) => std::io::stdout()
            .write_all(&page)
            .map_err(|e| e.to_string())?,
        (_, Format::Json) => println!(
            "{}",
            pretty(&json!({
                "log_id": a.log_id,
                "namespace_id": a.nsid,
                "offset": a.lpo,
                "length": page.len(),
                "data": hex(&page),
            }))
        ),
        _ => {
            println!(
                "log_id:{:#04x} namespace_id:{:#x} offset:{} length:{}",
                a.log_id,
                a.nsid,
                a.lpo,
                page.len()
            );
            hexdump(&page);
        }
    }
    Ok(())
}

fn feature_name(fid: u8) -> String {
    match FeatureId::from(fid) {
        FeatureId::Unknown(_) => "Unknown".into(),
        known => {
            // "VolatileWriteCache" -> "Volatile Write Cache".
            let debug = format!("{known:?}");
            let mut out = String::new();
            for (i, ch) in debug.chars().enumerate() {
                if i > 0 && ch.is_ascii_uppercase() {
                    out.push(' ');
                }
                out.push(ch);
            }
            out
        }
    }
}

fn get_feature(a: GetFeatureArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    let ctrl = c.connect()?;
    let mut sqe = SqeRepr {
        opcode: AdminOpcode::GetFeatures.into(),
        nsid: a.nsid,
        ..Default::default()
    };
    sqe.cdw10_15[0] = u32::from(a.fid) | (u32::from(a.sel & 7) << 8);
    sqe.cdw10_15[1] = a.cdw11;
    let r = ctrl.admin(sqe, nvmeof::host::Data::None);
    let _ = ctrl.disconnect();
    let value = r.map_err(err)?.0.dw0;
    let name = feature_name(a.fid);
    if c.output == Format::Json {
        println!(
            "{}",
            pretty(&json!({"feature_id": a.fid, "name": name, "sel": a.sel, "value": value}))
        );
    } else {
        println!(
            "get-feature:{:#04x} ({name}), Current value:{value:#010x}",
            a.fid
        );
    }
    Ok(())
}

/// Blocks and bytes of a read, write or compare: from -c (0's based), else from -z,
/// else from `data_len` (the data given), else one block.
fn extent(a: &RwArgs, bs: u64, data_len: Option<u64>) -> Res<(u64, u64)> {
    let blocks = match (a.nlb, a.data_size, data_len) {
        (Some(c), _, _) => c + 1,
        (None, Some(z), _) => z.div_ceil(bs).max(1),
        (None, None, Some(n)) => n.div_ceil(bs).max(1),
        (None, None, None) => 1,
    };
    let bytes = blocks * bs;
    let size = a.data_size.unwrap_or(bytes);
    if size > bytes {
        return Err(format!(
            "data size {size} exceeds {blocks} block(s) of {bs} bytes"
        ));
    }
    Ok((blocks, size))
}

fn ns_of(ctrl: &Controller, nsid: u32) -> Res<NamespaceInfo> {
    ctrl.namespace(nsid).map_err(err)
}

/// Runs `f` over `blocks` blocks from `slba` in pieces one command can move.
fn chunked(
    ns: &NamespaceInfo,
    slba: u64,
    blocks: u64,
    mut f: impl FnMut(u64, u64, usize) -> Res<()>,
) -> Res<()> {
    let per = (MAX_HOST_TRANSFER as u64 / u64::from(ns.block_size)).max(1);
    let mut done = 0;
    while done < blocks {
        let n = (blocks - done).min(per);
        f(slba + done, n, (done * u64::from(ns.block_size)) as usize)?;
        done += n;
    }
    Ok(())
}

fn read_input(path: &Option<String>) -> Res<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).map_err(|e| format!("{p}: {e}")),
        None => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .map_err(|e| format!("stdin: {e}"))?;
            Ok(v)
        }
    }
}

fn report(c: &Conn, cmd: &str, extra: Value) {
    if c.output == Format::Json {
        let mut v = json!({"command": cmd, "status": "success"});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        println!("{}", pretty(&v));
    } else {
        eprintln!("{cmd}: Success");
    }
}

fn io_rw(a: RwArgs, cmd: &str) -> Res<()> {
    let c: Conn = a.conn.clone().into();
    let input = match cmd {
        "read" => None,
        _ => Some(read_input(&a.data)?),
    };
    let ctrl = c.connect()?;
    let r = (|| -> Res<(u64, u64, Vec<u8>)> {
        let ns = ns_of(&ctrl, a.nsid)?;
        let bs = u64::from(ns.block_size);
        let (blocks, size) = extent(&a, bs, input.as_ref().map(|d| d.len() as u64))?;
        let mut buf = vec![0u8; (blocks * bs) as usize];
        if let Some(data) = &input {
            let n = data.len().min(size as usize);
            buf[..n].copy_from_slice(&data[..n]);
        }
        match cmd {
            "read" => chunked(&ns, a.slba, blocks, |slba, n, off| {
                let len = (n * bs) as usize;
                ctrl.read(&ns, slba, &mut buf[off..off + len]).map_err(err)
            })?,
            "write" => chunked(&ns, a.slba, blocks, |slba, n, off| {
                let len = (n * bs) as usize;
                ctrl.write(&ns, slba, &buf[off..off + len], a.fua)
                    .map_err(err)
            })?,
            _ => chunked(&ns, a.slba, blocks, |slba, n, off| {
                let len = (n * bs) as usize;
                ctrl.compare(&ns, slba, &buf[off..off + len]).map_err(err)
            })?,
        }
        Ok((blocks, size, buf))
    })();
    let _ = ctrl.disconnect();
    let (blocks, size, buf) = r?;
    if cmd == "read" {
        let out = &buf[..size as usize];
        match &a.data {
            Some(p) => std::fs::write(p, out).map_err(|e| format!("{p}: {e}"))?,
            None if c.output == Format::Json => {}
            None => std::io::stdout()
                .write_all(out)
                .map_err(|e| e.to_string())?,
        }
    }
    report(
        &c,
        cmd,
        json!({"namespace_id": a.nsid, "start_block": a.slba, "blocks": blocks, "bytes": size}),
    );
    Ok(())
}

fn flush(a: FlushArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    let ctrl = c.connect()?;
    let r = ctrl.flush(a.nsid).map_err(err);
    let _ = ctrl.disconnect();
    r?;
    report(
        &c,
        "flush",
        json!({"namespace_id": a.nsid, "all": a.nsid == NSID_ALL}),
    );
    Ok(())
}

fn range_cmd(a: RangeArgs, cmd: &str) -> Res<()> {
    let c: Conn = a.conn.into();
    let ctrl = c.connect()?;
    let blocks = a.nlb + 1;
    let r = (|| -> Res<()> {
        let ns = ns_of(&ctrl, a.nsid)?;
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(65536) as u32;
            let slba = a.slba + done;
            if cmd == "verify" {
                ctrl.verify(&ns, slba, n)
            } else {
                ctrl.write_zeroes(&ns, slba, n, a.deac)
            }
            .map_err(err)?;
            done += u64::from(n);
        }
        Ok(())
    })();
    let _ = ctrl.disconnect();
    r?;
    report(
        &c,
        cmd,
        json!({"namespace_id": a.nsid, "start_block": a.slba, "blocks": blocks}),
    );
    Ok(())
}

fn ranges(slbs: &str, blocks: &str, what: &str) -> Res<Vec<(u64, u64)>> {
    let s = parse_list(slbs)?;
    let b = parse_list(blocks)?;
    if s.is_empty() || s.len() != b.len() {
        return Err(format!(
            "{what}: {} start blocks and {} block counts (need as many, at least one)",
            s.len(),
            b.len()
        ));
    }
    Ok(s.into_iter().zip(b).collect())
}

fn dsm(a: DsmArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    if !a.ad {
        return Err("dsm: only deallocate is supported: add --ad".into());
    }
    let list = ranges(&a.slbs, &a.blocks, "dsm")?
        .into_iter()
        .map(|(s, n)| {
            u32::try_from(n)
                .map(|n| (s, n))
                .map_err(|_| format!("{n} blocks in one range"))
        })
        .collect::<Res<Vec<_>>>()?;
    let ctrl = c.connect()?;
    let r = ns_of(&ctrl, a.nsid).and_then(|ns| ctrl.deallocate(&ns, &list).map_err(err));
    let _ = ctrl.disconnect();
    r?;
    report(
        &c,
        "dsm",
        json!({"namespace_id": a.nsid, "ranges": list.len()}),
    );
    Ok(())
}

fn copy(a: CopyArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    let list = ranges(&a.slbs, &a.blocks, "copy")?
        .into_iter()
        .map(|(s, nlb)| {
            u32::try_from(nlb + 1)
                .map(|n| (s, n))
                .map_err(|_| format!("{nlb} blocks in one range"))
        })
        .collect::<Res<Vec<_>>>()?;
    let ctrl = c.connect()?;
    let r = ns_of(&ctrl, a.nsid).and_then(|ns| ctrl.copy(&ns, &list, a.sdlba).map_err(err));
    let _ = ctrl.disconnect();
    r?;
    report(
        &c,
        "copy",
        json!({"namespace_id": a.nsid, "sdlba": a.sdlba, "ranges": list.len()}),
    );
    Ok(())
}

fn hold(a: HoldArgs) -> Res<()> {
    let c: Conn = a.conn.into();
    let nqn = c.subnqn()?;
    let mut cfg = c.host_config(!a.no_keep_alive);
    cfg.kato_ms = a.kato;
    let mut ctrl = Controller::connect(&c.target(), &nqn, &cfg)
        .map_err(|e| format!("connect to {nqn} at {}: {e}", c.where_()))?;
    // The target's view of KATO (Get Features, Keep Alive Timer).
    let kato = ctrl.get_features(FeatureId::KeepAliveTimer).map_err(err);
    let cntlid = ctrl.cntlid();
    std::thread::sleep(Duration::from_secs(a.seconds));
    let after = ctrl.get_features(FeatureId::NumberOfQueues);
    let alive = after.is_ok();
    let mut error = after.err().map(|e| e.to_string());
    // Reconnected: the new association answers Identify-backed I/O bring-up and a
    // Get Features; None when not asked or not needed.
    let mut reconnected = None;
    if a.reconnect && error.is_some() {
        let r = ctrl
            .reconnect()
            .and_then(|()| ctrl.get_features(FeatureId::NumberOfQueues));
        reconnected = Some(r.is_ok());
        if let Err(e) = r {
            error = Some(format!("{}; reconnect: {e}", error.unwrap_or_default()));
        } else {
            error = None;
        }
    }
    let new_cntlid = ctrl.cntlid();
    let _ = ctrl.disconnect();
    let kato = kato?;
    if c.output == Format::Json {
        println!(
            "{}",
            pretty(&json!({
                "kato_ms": kato,
                "held_s": a.seconds,
                "keep_alive": !a.no_keep_alive,
                "alive_after": alive,
                "reconnected": reconnected,
                "cntlid": cntlid,
                "cntlid_after": new_cntlid,
                "error": error,
            }))
        );
    } else {
        println!(
            "hold: KATO {kato} ms, idle {} s, keep-alive {}: controller {}",
            a.seconds,
            if a.no_keep_alive { "off" } else { "on" },
            match (&error, reconnected) {
                (None, Some(true)) => format!("gone, reconnected (controller {new_cntlid})"),
                (None, _) => "still answers".to_string(),
                (Some(e), _) => format!("gone ({e})"),
            }
        );
    }
    match error {
        None => Ok(()),
        Some(e) => Err(format!("controller gone after {} s idle: {e}", a.seconds)),
    }
}

fn run(cli: Cli) -> Res<()> {
    match cli.cmd {
        Command::Discover(c) => discover(&c),
        Command::ConnectAll(c) => connect_all(&c),
        Command::List(c) => list(&c),
        Command::IdCtrl(c) => id_ctrl(&c),
        Command::IdNs(a) => id_ns(a),
        Command::ListNs(c) => list_ns(c),
        Command::GetLog(a) => get_log(a),
        Command::GetFeature(a) => get_feature(a),
        Command::Read(a) => io_rw(a, "read"),
        Command::Write(a) => io_rw(a, "write"),
        Command::Compare(a) => io_rw(a, "compare"),
        Command::Flush(a) => flush(a),
        Command::WriteZeroes(a) => range_cmd(a, "write-zeroes"),
        Command::Verify(a) => range_cmd(a, "verify"),
        Command::Dsm(a) => dsm(a),
        Command::Copy(a) => copy(a),
        Command::Hold(a) => hold(a),
    }
}

fn main() -> ExitCode {
    logging::init(tracing::Level::WARN);
    let cli = Cli::parse();
    let name = std::env::args().nth(1).unwrap_or_default();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmeof {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

//! nvmeof-perf: NVMe-oF I/O performance in the manner of spdk_nvme_perf and fio:
//! random or sequential reads, writes or a mix, at a queue depth over some queues,
//! for a bounded time; IOPS, MB/s and latency percentiles, progress while it runs,
//! JSON, and an SVG latency histogram. `--self` starts its own target in-process.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nvmeof::host::{discover, Controller, HostConfig, TransportAddr};
use nvmeof::target::{Backing, NamespaceConfig, Port, PortConfig, SubsystemConfig, Target};
use nvmeof::tools::config::provider_for_trtype;
use nvmeof::tools::perf::{self, PerfConfig, PerfResult, Workload, MAX_DURATION};
use nvmeof::tools::stats::Histogram;
use nvmeof::tools::{host_source, logging, parse_size, random_loopback};
use nvmeof::wire::log::SubsystemType;
use serde_json::{json, Value};

const EXAMPLES: &str = "\
Examples:
  nvmeof-perf --self -w randread -o 4k -q 1 -t 10          QD1 latency, own target in memory
  nvmeof-perf --self -w randread -o 4k -q 32 -P 2 -t 10    IOPS over two queues
  nvmeof-perf --self --backend file -w randrw -M 70 --json --svg lat.svg
  nvmeof-perf -r 'trtype:softroce traddr:127.0.0.1 trsvcid:41234' -w randread -q 16

Workloads (-w): read, write, randread, randwrite, rw, randrw (-M: percent reads).
Latency is per command, submission to completion as the host sees it. Queues poll
their completion queues for NVMEOF_SPIN_US (default 200) µs after activity before
they sleep; NVMEOF_SPIN_US=0 always sleeps.
  nvmeof-perf --self --trtype tcp -w randread -o 4k -q 1     the same over tcp";

#[derive(Parser)]
#[command(
    name = "nvmeof-perf",
    about = "NVMe over Fabrics I/O performance (spdk_nvme_perf / fio style)",
    after_help = EXAMPLES
)]
struct Args {
    /// Target as spdk's transport ID: 'trtype:softroce traddr:A trsvcid:P', optionally subnqn:N.
    #[arg(short = 'r', long = "transport-id")]
    transport_id: Option<String>,
    /// Start a target in this process (a namespace on a free loopback address).
    #[arg(long = "self")]
    self_target: bool,
    /// --self: the fabric provider of the target's port (softroce, tcp, rdma = verbs).
    #[arg(long, default_value = "softroce")]
    trtype: String,
    /// --self: back end, memory, file (a temporary file) or file:PATH.
    #[arg(long, default_value = "memory")]
    backend: String,
    /// --self: namespace size.
    #[arg(long, default_value = "256M")]
    ns_size: String,
    /// --self: logical block size, 512 or 4096.
    #[arg(long, default_value_t = 512)]
    lba_size: u32,
    /// Workload: read, write, randread, randwrite, rw, randrw.
    #[arg(short = 'w', long = "rw", default_value = "randread")]
    workload: String,
    /// Percent reads of rw/randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50)]
    mix: u8,
    /// I/O size (4k, 128k, ...).
    #[arg(short = 'o', long = "bs", default_value = "4k")]
    io_size: String,
    /// Queue depth per queue, 1..=128.
    #[arg(short = 'q', long = "iodepth", default_value_t = 1)]
    queue_depth: u16,
    /// I/O queues (one thread each), 1..=16.
    #[arg(short = 'P', long = "queues", default_value_t = 1)]
    queues: u16,
    /// Measured seconds (at most 600 with the warm-up).
    #[arg(short = 't', long = "time", default_value_t = 10.0)]
    time: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Namespace ID.
    #[arg(short = 'n', long = "nsid", default_value_t = 1)]
    nsid: u32,
    /// Host address to connect from.
    #[arg(long = "host-traddr")]
    host_traddr: Option<IpAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write an SVG latency histogram here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress lines (on stderr).
    #[arg(long)]
    no_progress: bool,
}

struct SelfTarget {
    _target: Target,
    _port: Port,
    temp: Option<PathBuf>,
}

impl Drop for SelfTarget {
    fn drop(&mut self) {
        if let Some(p) = &self.temp {
            let _ = std::fs::remove_file(p);
        }
    }
}

const SELF_NQN: &str = "nqn.2024-01.io.fabric:nvmeof-perf";

fn start_self(a: &Args) -> Result<(SelfTarget, TransportAddr, String, String), String> {
    let size = parse_size(&a.ns_size)?;
    let (backing, temp, what) = match a.backend.as_str() {
        "memory" => (Backing::Memory { size }, None, "memory".to_string()),
        b if b == "file" || b.starts_with("file:") => {
            let (path, temp) = match b.strip_prefix("file:") {
                Some(p) => (PathBuf::from(p), None),
                None => {
                    let p = std::env::temp_dir()
                        .join(format!("nvmeof-perf-{}.img", std::process::id()));
                    (p.clone(), Some(p))
                }
            };
            // Written through once, so reads find allocated blocks in the page cache
            // rather than holes.
            prefill(&path, size).map_err(|e| format!("{}: {e}", path.display()))?;
            let what = format!("file {} (buffered)", path.display());
            (
                Backing::File {
                    path,
                    size: Some(size),
                },
                temp,
                what,
            )
        }
        other => return Err(format!("--backend {other:?}: memory, file or file:PATH")),
    };
    let target = Target::new();
    let mut s = SubsystemConfig::new(SELF_NQN);
    s.namespaces.push(NamespaceConfig {
        nsid: a.nsid,
        backing,
        block_size: a.lba_size,
    });
    target.add_subsystem(&s).map_err(|e| e.to_string())?;
    let ip = random_loopback(None);
    let provider = provider_for_trtype(&a.trtype);
    let port = target
        .add_port(&PortConfig::new(&provider, &ip.to_string()))
        .map_err(|e| e.to_string())?;
    let local = port.local_addr();
    let addr = TransportAddr::new(&provider, &local.ip().to_string(), local.port());
    Ok((
        SelfTarget {
            _target: target,
            _port: port,
            temp,
        },
        addr,
        SELF_NQN.into(),
        what,
    ))
}

fn prefill(path: &PathBuf, size: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_data()
}

/// spdk's transport ID: space separated key:value pairs.
fn parse_trid(s: &str) -> Result<(TransportAddr, Option<String>), String> {
    let (mut trtype, mut traddr, mut trsvcid, mut subnqn) =
        ("softroce".to_string(), None, "4420".to_string(), None);
    for part in s.split_whitespace() {
        let (k, v) = part
            .split_once(':')
            .or_else(|| part.split_once('='))
            .ok_or_else(|| format!("transport ID part {part:?} is not key:value"))?;
        match k.to_ascii_lowercase().as_str() {
            "trtype" => trtype = v.to_string(),
            "traddr" => traddr = Some(v.to_string()),
            "trsvcid" => trsvcid = v.to_string(),
            "subnqn" => subnqn = Some(v.to_string()),
            "adrfam" => {}
            other => return Err(format!("transport ID key {other:?}")),
        }
    }
    let traddr = traddr.ok_or("the transport ID needs traddr:")?;
    Ok((
        TransportAddr::new(&provider_for_trtype(&trtype), &traddr, trsvcid),
        subnqn,
    ))
}

fn lat_json(h: &Histogram) -> Value {
    let us = |ns: f64| (ns / 10.0).round() / 100.0;
    json!({
        "count": h.count(),
        "min_us": us(h.min() as f64),
        "avg_us": us(h.mean()),
        "p50_us": us(h.percentile(50.0) as f64),
        "p99_us": us(h.percentile(99.0) as f64),
        "p99_9_us": us(h.percentile(99.9) as f64),
        "max_us": us(h.max() as f64),
    })
}

fn row(name: &str, h: &Histogram, iops: f64, mbs: f64) {
    let us = |ns: f64| ns / 1e3;
    println!(
        "{name:<8} {iops:>12.1} {mbs:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        us(h.min() as f64),
        us(h.mean()),
        us(h.percentile(50.0) as f64),
        us(h.percentile(99.0) as f64),
        us(h.percentile(99.9) as f64),
        us(h.max() as f64)
    );
}

fn run(a: Args) -> Result<(), String> {
    logging::init(tracing::Level::WARN);
    let workload = Workload::parse(&a.workload, a.mix)?;
    let io_size = usize::try_from(parse_size(&a.io_size)?).map_err(|e| e.to_string())?;
    if !(1..=128).contains(&a.queue_depth) {
        return Err(format!("-q {}: 1..=128", a.queue_depth));
    }
    if !(1..=16).contains(&a.queues) {
        return Err(format!("-P {}: 1..=16", a.queues));
    }
    let max = MAX_DURATION.as_secs_f64();
    if !(a.time > 0.0 && a.warmup >= 0.0 && a.time + a.warmup <= max) {
        return Err(format!(
            "-t {} with --warmup {}: more than 0, at most {max} s together",
            a.time, a.warmup
        ));
    }
    let (guard, addr, subnqn, backend) = if a.self_target {
        if a.transport_id.is_some() {
            return Err("--self and -r exclude each other".into());
        }
        let (g, addr, nqn, what) = start_self(&a)?;
        (Some(g), addr, Some(nqn), what)
    } else {
        let trid = a
            .transport_id
            .as_deref()
            .ok_or("a target: -r 'trtype:softroce traddr:A trsvcid:P', or --self")?;
        let (addr, nqn) = parse_trid(trid)?;
        (None, addr, nqn, "remote".to_string())
    };
    let host = HostConfig {
        io_queues: a.queues,
        queue_depth: a.queue_depth.max(2),
        src_ip: a
            .host_traddr
            .or_else(|| host_source(&addr.provider, &addr.addr)),
        ..HostConfig::default()
    };
    let subnqn = match subnqn {
        Some(n) => n,
        None => {
            let entries = discover(&addr, &host).map_err(|e| format!("discovery: {e}"))?;
            let mut nqns: Vec<String> = entries
                .iter()
                .filter(|e| e.subtype == SubsystemType::Nvme)
                .map(|e| e.subnqn.as_str().to_string())
                .collect();
            nqns.dedup();
            match nqns.as_slice() {
                [one] => one.clone(),
                other => {
                    return Err(format!(
                        "discovery lists {} subsystems; name one with subnqn: in -r ({})",
                        other.len(),
                        other.join(", ")
                    ))
                }
            }
        }
    };
    let ctrl = Controller::connect(&addr, &subnqn, &host)
        .map_err(|e| format!("connect to {subnqn} at {}:{}: {e}", addr.addr, addr.service))?;
    let ns = ctrl.namespace(a.nsid).map_err(|e| e.to_string())?;
    let cfg = PerfConfig {
        workload,
        block_size: io_size,
        queue_depth: a.queue_depth,
        duration: Duration::from_secs_f64(a.time),
        warmup: Duration::from_secs_f64(a.warmup),
    };
    let title = format!(
        "{} {} B, QD {} x {} queue(s), {} s, {} {}:{} ns {} ({backend})",
        workload.name(),
        io_size,
        a.queue_depth,
        ctrl.io_queue_count().min(usize::from(a.queues)),
        a.time,
        addr.provider,
        addr.addr,
        addr.service,
        a.nsid
    );
    if !a.json {
        println!("nvmeof-perf: {title}");
    }
    let progress = !a.no_progress;
    let result = perf::run(&ctrl, &ns, usize::from(a.queues), &cfg, |p| {
        if progress {
            eprintln!(
                "{:>7.1} s: {:>10.0} IOPS {:>9.2} MB/s{}",
                p.elapsed_s,
                p.iops,
                p.mb_s,
                if p.elapsed_s < 0.0 { " (warm-up)" } else { "" }
            );
        }
    });
    let _ = ctrl.disconnect();
    let r: PerfResult = result.map_err(|e| e.to_string())?;
    drop(guard);
    if let Some(path) = &a.svg {
        std::fs::write(path, r.all.svg(&format!("nvmeof-perf: {title}")))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if a.json {
        let v = json!({
            "workload": workload.name(),
            "rwmixread": workload.read_percent,
            "io_size": io_size,
            "queue_depth": r.queue_depth,
            "queues": r.queues,
            "duration_s": r.elapsed_s,
            "warmup_s": a.warmup,
            "target": {
                "provider": addr.provider,
                "traddr": addr.addr,
                "trsvcid": addr.service,
                "subnqn": subnqn,
                "nsid": a.nsid,
                "backend": backend,
                "self": a.self_target,
            },
            "ios": r.reads + r.writes,
            "iops": (r.iops() * 10.0).round() / 10.0,
            "mb_s": (r.mb_s() * 100.0).round() / 100.0,
            "latency": lat_json(&r.all),
            "read": {"ios": r.reads, "latency": lat_json(&r.read)},
            "write": {"ios": r.writes, "latency": lat_json(&r.write)},
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<8} {:>12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "IOPS", "MB/s", "min us", "avg us", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    let secs = r.elapsed_s.max(1e-9);
    let io = io_size as f64;
    if r.reads > 0 && r.writes > 0 {
        row(
            "read",
            &r.read,
            r.reads as f64 / secs,
            r.reads as f64 * io / 1e6 / secs,
        );
        row(
            "write",
            &r.write,
            r.writes as f64 / secs,
            r.writes as f64 * io / 1e6 / secs,
        );
    }
    row("total", &r.all, r.iops(), r.mb_s());
    if let Some(p) = &a.svg {
        println!("latency histogram: {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmeof-perf: {e}");
            ExitCode::FAILURE
        }
    }
}

//! nvmeof-target: an NVMe-oF target configured from nvmetcli's saved-config JSON, or
//! from an embedded default (a 64 MiB memory namespace on softroce at 127.0.0.1, a
//! free port). Runs until SIGINT or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nvmeof::target::{Backing, Port, PortConfig, Target};
use nvmeof::tools::config::{provider_for_trtype, TargetConfig, DEFAULT_CONFIG};
use nvmeof::tools::{logging, random_loopback};

const EXAMPLES: &str = "\
Examples:
  nvmeof-target                      the embedded default: 64 MiB in memory, softroce
                                     on 127.0.0.1, a free port (printed)
  nvmeof-target target.json          nvmetcli's saved-config format
  nvmeof-target --dump-config > target.json

  then, in another shell (with the printed port):
  nvmeof discover -t softroce -a 127.0.0.1 -s 41234

Configuration: nvmetcli's `save` output. `addr.trtype` names the fabric provider
(rdma = verbs, softroce, tcp); trsvcid \"0\" takes a free port; a namespace's
`device.path` is a file, or \"memory:64M\" for memory (`device.size` sizes a file).
tcp has 64-bit memory keys, which keyed SGLs cannot carry: use softroce (or verbs).

Environment: NVMEOF_LOG=error|warn|info|debug|trace (default info);
NVMEOF_TARGET_TRADDR sets the embedded default's address (like -a).";

#[derive(Parser)]
#[command(
    name = "nvmeof-target",
    about = "NVMe over Fabrics target over the fabric API",
    after_help = EXAMPLES
)]
struct Args {
    /// nvmetcli saved-config JSON file (none: the embedded default).
    config: Option<String>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    dump_config: bool,
    /// Default configuration only: transport type (softroce, tcp, rdma).
    #[arg(short = 't', long = "trtype")]
    trtype: Option<String>,
    /// Default configuration only: address to listen on.
    #[arg(short = 'a', long = "traddr")]
    traddr: Option<String>,
    /// Default configuration only: service (port); 0 takes a free one.
    #[arg(short = 's', long = "trsvcid")]
    trsvcid: Option<String>,
}

fn describe(b: &Backing) -> String {
    match b {
        Backing::Memory { size } => format!("memory {} MiB", size >> 20),
        Backing::File { path, .. } => format!("file {}", path.display()),
        Backing::DirectFile { path, .. } => format!("file {} (O_DIRECT)", path.display()),
        Backing::Pmem { path, size } => format!("pmem {} {} MiB", path.display(), size >> 20),
    }
}

fn start_port(target: &Target, cfg: &PortConfig, may_move: bool) -> Result<Port, String> {
    match target.add_port(cfg) {
        Ok(p) => Ok(p),
        Err(e) if may_move && cfg.provider == "softroce" => {
            // Another process holds softroce's device on this address (UDP 4791):
            // the default moves to a free loopback address rather than fail.
            tracing::warn!(
                "softroce on {} is taken ({e}); trying another loopback address",
                cfg.addr
            );
            let mut last = e.to_string();
            for _ in 0..5 {
                let mut c = cfg.clone();
                c.addr = random_loopback(None).to_string();
                match target.add_port(&c) {
                    Ok(p) => return Ok(p),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(last)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn run(a: Args) -> Result<(), String> {
    if a.dump_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    logging::init(tracing::Level::INFO);
    logging::install_stop_signals();
    let env_addr = std::env::var("NVMEOF_TARGET_TRADDR")
        .ok()
        .filter(|s| !s.is_empty());
    let (mut cfg, default) = match &a.config {
        Some(path) => {
            if a.trtype.is_some() || a.traddr.is_some() || a.trsvcid.is_some() {
                return Err(
                    "-t/-a/-s change the embedded default; with a file, edit the file".into(),
                );
            }
            let json = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            (
                TargetConfig::from_json(&json).map_err(|e| format!("{path}: {e}"))?,
                false,
            )
        }
        None => (TargetConfig::default_config(), true),
    };
    let mut may_move = default;
    if default {
        let port = &mut cfg.ports[0];
        if let Some(t) = &a.trtype {
            port.provider = provider_for_trtype(t);
        }
        if let Some(addr) = a.traddr.clone().or(env_addr) {
            port.addr = addr;
            may_move = false;
        }
        if let Some(s) = &a.trsvcid {
            port.service = s.clone();
        }
    }
    let target = Target::new();
    for s in &cfg.subsystems {
        target
            .add_subsystem(s)
            .map_err(|e| format!("subsystem {}: {e}", s.nqn))?;
        let hosts = if s.allow_any_host {
            "any host".to_string()
        } else {
            format!("hosts {}", s.allowed_hosts.join(", "))
        };
        for n in &s.namespaces {
            println!(
                "nvmeof-target: subsystem {} namespace {}: {} ({}-byte blocks); {hosts}",
                s.nqn,
                n.nsid,
                describe(&n.backing),
                n.block_size
            );
        }
    }
    let mut ports = Vec::new();
    for p in &cfg.ports {
        let port = start_port(&target, p, may_move)
            .map_err(|e| format!("port {} {}:{}: {e}", p.provider, p.addr, p.service))?;
        let local = port.local_addr();
        println!(
            "nvmeof-target: port {} listening: trtype {} traddr {} trsvcid {} subsystems {}",
            port.id(),
            p.provider,
            local.ip(),
            local.port(),
            p.subsystems.join(",")
        );
        if ports.is_empty() {
            println!(
                "nvmeof-target: try: nvmeof discover -t {} -a {} -s {}",
                p.provider,
                local.ip(),
                local.port()
            );
        }
        ports.push(port);
    }
    println!("nvmeof-target: ready (SIGINT or SIGTERM stops it)");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tracing::info!("target running: {} port(s)", ports.len());
    let signal = loop {
        if let Some(sig) = logging::stop_requested() {
            break sig;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    tracing::info!(
        "{signal}: stopping ({} controller(s) connected)",
        target.controllers().len()
    );
    drop(ports);
    target.shutdown();
    // Queue threads notice the stop within one poll slice (20 ms).
    std::thread::sleep(Duration::from_millis(100));
    drop(target);
    println!("nvmeof-target: stopped");
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmeof-target: {e}");
            ExitCode::FAILURE
        }
    }
}

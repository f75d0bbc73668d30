//! fabric-info: like fi_info. Lists the providers, their attributes and limits, and for
//! given hints says why each provider does or does not match.

use clap::Parser;
use fabric::{Caps, EpType, Hints, Info, MrMode, Progress};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "fabric-info",
    about = "Show fabric providers, their attributes, and why each matches given hints",
    after_help = "Examples:\n  fabric-info                      every provider and what it offers\n  fabric-info -p tcp -v            one provider, with limits\n  fabric-info --caps msg,rma,rma_pmem   which providers can do durable RMA, and why not\n  fabric-info -n 127.0.0.1 -s 9228 --json"
)]
struct Args {
    /// Only this provider (or a comma list; FABRIC_PROVIDER also narrows the set).
    #[arg(short = 'p', long)]
    provider: Option<String>,
    /// Required capabilities, comma-separated (msg, rma, read, write, remote_read,
    /// remote_write, remote_cq_data, rma_pmem, tagged, atomic).
    #[arg(short = 'c', long)]
    caps: Option<String>,
    /// Endpoint type: msg, rdm or dgram.
    #[arg(short = 'e', long = "ep-type")]
    ep_type: Option<String>,
    /// Node (host or IP address).
    #[arg(short = 'n', long)]
    node: Option<String>,
    /// Service (port).
    #[arg(short = 's', long)]
    service: Option<String>,
    /// Node/service name the local (listening) address.
    #[arg(long)]
    source: bool,
    /// Registration modes the application supports, comma-separated (local, virt_addr,
    /// prov_key, allocated).
    #[arg(long = "mr-mode")]
    mr_mode: Option<String>,
    /// Show every attribute and limit.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Only list provider names.
    #[arg(short = 'l', long)]
    list: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn parse_flags<F: bitflags::Flags>(s: &str, what: &str) -> Result<F, String> {
    let mut out = F::empty();
    for name in s.split(',').map(|x| x.trim()).filter(|x| !x.is_empty()) {
        let f = F::from_name(&name.to_ascii_uppercase())
            .ok_or_else(|| format!("unknown {what} '{name}'"))?;
        out.insert(f);
    }
    Ok(out)
}

fn hints(a: &Args) -> Result<Hints, String> {
    let mut h = Hints::new();
    if let Some(c) = &a.caps {
        h = h.caps(parse_flags::<Caps>(c, "capability")?);
    }
    if let Some(e) = &a.ep_type {
        h = h.ep_type(match e.as_str() {
            "msg" => EpType::Msg,
            "rdm" => EpType::Rdm,
            "dgram" => EpType::Dgram,
            _ => return Err(format!("unknown endpoint type '{e}'")),
        });
    }
    if let Some(p) = &a.provider {
        h = h.provider(p);
    }
    if let Some(n) = &a.node {
        h = h.node(n);
    }
    if let Some(s) = &a.service {
        h = h.service(s);
    }
    if let Some(m) = &a.mr_mode {
        h = h.mr_mode(parse_flags::<MrMode>(m, "mr_mode")?);
    }
    Ok(h.source(a.source))
}

fn info_json(i: &Info) -> serde_json::Value {
    let l = &i.limits;
    json!({
        "provider": i.provider_name,
        "version": format!("{}.{}", i.provider_version.0, i.provider_version.1),
        "fabric": i.fabric_name,
        "domain": i.domain_name,
        "ep_type": i.ep_type.to_string(),
        "caps": fabric::info::flag_names(i.caps),
        "mr_mode": fabric::info::flag_names(i.mr_mode),
        "progress": match i.progress { Progress::Manual => "manual", Progress::Auto => "auto" },
        "src_addr": i.src_addr.as_ref().map(|a| a.to_string()),
        "dest_addr": i.dest_addr.as_ref().map(|a| a.to_string()),
        "limits": {
            "max_msg_size": l.max_msg_size, "inject_size": l.inject_size,
            "mr_key_size": l.mr_key_size, "cq_data_size": l.cq_data_size,
            "tx_size": l.tx_size, "rx_size": l.rx_size, "iov_limit": l.iov_limit,
            "rma_iov_limit": l.rma_iov_limit, "cm_data_size": l.cm_data_size, "mtu": l.mtu,
        }
    })
}

fn print_info(i: &Info, verbose: bool) {
    println!("provider: {}", i.provider_name);
    println!("    fabric: {}", i.fabric_name);
    println!("    domain: {}", i.domain_name);
    println!(
        "    version: {}.{}",
        i.provider_version.0, i.provider_version.1
    );
    println!("    type: {}", i.ep_type);
    println!("    caps: {}", fabric::info::flag_names(i.caps));
    if let Some(a) = &i.src_addr {
        println!("    src_addr: {a}");
    }
    if let Some(a) = &i.dest_addr {
        println!("    dest_addr: {a}");
    }
    if verbose {
        let l = &i.limits;
        println!("    mr_mode: {}", fabric::info::flag_names(i.mr_mode));
        println!("    progress: {:?}", i.progress);
        println!("    max_msg_size: {}", l.max_msg_size);
        println!("    inject_size: {}", l.inject_size);
        println!("    mr_key_size: {}", l.mr_key_size);
        println!("    cq_data_size: {}", l.cq_data_size);
        println!("    tx_size: {}", l.tx_size);
        println!("    rx_size: {}", l.rx_size);
        println!("    iov_limit: {}", l.iov_limit);
        println!("    rma_iov_limit: {}", l.rma_iov_limit);
        println!("    cm_data_size: {}", l.cm_data_size);
        println!("    mtu: {}", l.mtu);
    }
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    let h = match hints(&a) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("fabric-info: {e}");
            std::process::exit(2);
        }
    };
    if a.list {
        for n in fabric::provider_names() {
            println!("{n}");
        }
        return;
    }
    let matches = fabric::registry().explain(&h);
    let any = matches.iter().any(|m| m.result.is_ok());
    if a.json {
        let v: Vec<_> = matches
            .iter()
            .map(|m| match &m.result {
                Ok(infos) => json!({"provider": m.provider, "match": true,
                    "answers": infos.iter().map(info_json).collect::<Vec<_>>()}),
                Err(why) => json!({"provider": m.provider, "match": false, "reason": why}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for m in &matches {
            match &m.result {
                Ok(infos) => {
                    for i in infos {
                        print_info(i, a.verbose);
                    }
                }
                Err(why) => println!("provider: {}\n    no match: {why}", m.provider),
            }
        }
    }
    if !any {
        std::process::exit(1);
    }
}

//! fabric-pingpong: like fabtests' fi_pingpong. Measures one-way latency (median and
//! mean) and bandwidth per message size between a server and a client, or both ends in
//! one process with `--self`.

use clap::Parser;
use fabric_examples::conn;
use fabric_examples::pingpong::{self, Options, PpResult};
use fabric_examples::sizes::{fmt_size, parse_sizes};
use fabric_examples::Mode;

#[derive(Parser)]
#[command(
    name = "fabric-pingpong",
    about = "Ping-pong latency and bandwidth over a fabric provider",
    after_help = "Examples:\n  fabric-pingpong --self -p tcp -S 8,4k,64k,1M      both ends in this process\n  fabric-pingpong -p tcp                             server on 127.0.0.1:9228\n  fabric-pingpong -p tcp 127.0.0.1 -S all --json     client\n  fabric-pingpong --self -e rdm --tagged -p tcp -S 8 RDM endpoints (\"tcp;rxm\"), tagged"
)]
struct Args {
    #[command(flatten)]
    role: conn::RoleArgs,
    /// Sizes: comma list (8,4k,1M) or 'all' (powers of two to 1 MiB).
    #[arg(short = 'S', long, default_value = "all")]
    sizes: String,
    /// Iterations per size (default: by size, 200 to 50,000).
    #[arg(short = 'I', long)]
    iterations: Option<usize>,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long, default_value_t = 100)]
    warmup: usize,
    /// Waiting: poll (busy, lowest latency) or sleep (blocking reads).
    #[arg(short = 'm', long, default_value = "poll")]
    mode: Mode,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Check the data of every transfer (not timed). On by default with --self.
    #[arg(long, conflicts_with = "no_verify")]
    verify: bool,
    /// Do not check the data, also with --self.
    #[arg(long)]
    no_verify: bool,
    /// Speak rdma-core's ibv_rc_pingpong (its TCP exchange, default port 18515, and
    /// message pattern) over a softroce QP: -S one size, -I iterations (default
    /// 1000), --mtu, -P port, -s the address to listen on; every received byte is
    /// checked. See fabric_examples::rcpp.
    #[arg(long)]
    rc_pingpong: bool,
    /// Endpoint type: msg (connected) or rdm (reliable unconnected: the RDM layer over
    /// the provider, "tcp;rxm" or "softroce;rxm"; -p takes either form). With rdm, -s
    /// is the address each end's endpoint listens on.
    #[arg(short = 'e', long = "ep-type", default_value = "msg")]
    ep_type: EpKind,
    /// Tagged messages (tsend/trecv; with -e rdm, as fi_pingpong -m tagged).
    #[arg(long)]
    tagged: bool,
    /// Path MTU with --rc-pingpong (as ibv_rc_pingpong -m).
    #[arg(long, default_value_t = 1024)]
    mtu: u32,
}

/// The endpoint type of `-e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EpKind {
    Msg,
    Rdm,
}

fn run_rc_pingpong(a: &Args) -> Result<(), String> {
    use fabric_examples::rcpp;
    if a.role.provider != "softroce" && a.role.provider != "tcp" {
        return Err("--rc-pingpong runs on softroce (-p softroce)".into());
    }
    let sizes = parse_sizes(&a.sizes)?;
    let size = match sizes.as_slice() {
        [s] => *s,
        _ if a.sizes == "all" => 4096,
        _ => return Err("--rc-pingpong takes one size (-S), as ibv_rc_pingpong -s".into()),
    };
    let o = rcpp::Options {
        size,
        iters: a.iterations.unwrap_or(1000),
        mtu: a.mtu,
        port: a.role.port.unwrap_or(rcpp::DEFAULT_PORT),
        ..rcpp::Options::default()
    };
    let out = match (&a.role.dest, a.role.self_mode) {
        (_, true) => return Err("--rc-pingpong has no --self mode".into()),
        (Some(d), _) => rcpp::client(d, &o)?,
        (None, _) => {
            let ip = a
                .role
                .src_addr
                .parse()
                .map_err(|_| format!("-s {}: not an IPv4 address", a.role.src_addr))?;
            rcpp::server(ip, &o)?
        }
    };
    print!("{}", out.report(&o));
    Ok(())
}

fn print(provider: &str, what: &str, mode: Mode, self_mode: bool, res: &[PpResult], json: bool) {
    if json {
        let v = serde_json::json!({
            "provider": provider, "endpoint": what, "mode": mode,
            "cpu_counts_both_ends": self_mode, "results": res,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "# provider {provider}, {what}, completions by {mode}; latency is one-way (half the round trip)"
    );
    println!(
        "# CPU: getrusage of this process over the timed iterations ({}), per GB moved and per million messages",
        if self_mode {
            "both ends: --self runs them in this process"
        } else {
            "this end only"
        }
    );
    println!(
        "{:>8} {:>8} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12}",
        "bytes", "iters", "median_us", "mean_us", "p99_us", "MB/s", "cpu_s/GB", "cpu_s/Mmsg"
    );
    for r in res {
        let cpu = r.cpu.unwrap_or_default();
        println!(
            "{:>8} {:>8} {:>12.2} {:>12.2} {:>10.2} {:>10.1} {:>10.2} {:>12.2}",
            fmt_size(r.size),
            r.iterations,
            r.lat_median_us,
            r.lat_mean_us,
            r.lat_p99_us.unwrap_or(f64::NAN),
            r.mb_per_s,
            cpu.s_per_gb,
            cpu.s_per_mmsg
        );
    }
}

fn run_rdm(a: &Args, opts: &Options) -> Result<(), String> {
    use fabric_examples::rdmpp;
    let port = a.role.port.unwrap_or(9228);
    let (res, name) = match (&a.role.dest, a.role.self_mode) {
        (_, true) => {
            let res = rdmpp::run_self(&a.role.provider, &a.role.src_addr, a.tagged, opts)?;
            (res, None)
        }
        (Some(d), false) => {
            let side = rdmpp::open(&a.role.provider, &a.role.src_addr, 0, a.tagged)?;
            let res = rdmpp::client(&side, &rdmpp::server_name(d, port)?, opts)?;
            (res, Some(side.provider_name().to_string()))
        }
        (None, false) => {
            let side = rdmpp::open(&a.role.provider, &a.role.src_addr, port, a.tagged)?;
            eprintln!(
                "fabric-pingpong: {} RDM server on {}:{port}, waiting for a client",
                side.provider_name(),
                a.role.src_addr
            );
            return rdmpp::server(&side, a.mode);
        }
    };
    let provider = name.unwrap_or_else(|| {
        let p = &a.role.provider;
        if p.contains(';') {
            p.clone()
        } else {
            format!("{p};rxm")
        }
    });
    let what = if a.tagged {
        "RDM endpoints, tagged"
    } else {
        "RDM endpoints"
    };
    print(&provider, what, a.mode, a.role.self_mode, &res, a.json);
    Ok(())
}

fn run(a: &Args) -> Result<(), String> {
    if a.rc_pingpong {
        return run_rc_pingpong(a);
    }
    let opts = Options {
        sizes: parse_sizes(&a.sizes)?,
        iterations: a.iterations,
        warmup: a.warmup,
        mode: a.mode,
        verify: !a.no_verify && (a.verify || a.role.self_mode),
    };
    if a.ep_type == EpKind::Rdm {
        return run_rdm(a, &opts);
    }
    if a.tagged {
        return Err("--tagged needs -e rdm (tagged messages are an RDM capability here)".into());
    }
    let mode = a.mode;
    let role = a.role.role();
    let res = conn::run_role(
        "fabric-pingpong",
        &a.role.provider,
        role,
        a.role.port.unwrap_or(9228),
        move |side| pingpong::server(side, mode),
        |side| pingpong::client(side, &opts),
    )?;
    if let Some(res) = res {
        print(
            &a.role.provider,
            "MSG endpoints",
            a.mode,
            a.role.self_mode,
            &res,
            a.json,
        );
    }
    Ok(())
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("fabric-pingpong: {e}");
        std::process::exit(1);
    }
}

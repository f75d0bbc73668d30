//! fabric-rma-bw: like fabtests' fi_rma_bw. Keeps a window of RMA writes, reads or
//! writes with remote CQ data outstanding and reports bandwidth per size.

use clap::Parser;
use fabric_examples::conn;
use fabric_examples::rmabw::{self, BwResult, Options, RmaOp};
use fabric_examples::sizes::{fmt_size, parse_sizes};
use fabric_examples::Mode;

#[derive(Parser)]
#[command(
    name = "fabric-rma-bw",
    about = "RMA write / read / writedata bandwidth over a fabric provider",
    after_help = "Examples:\n  fabric-rma-bw --self -p tcp -o write -S 64k,1M\n  fabric-rma-bw -p tcp                         server on 127.0.0.1:9229\n  fabric-rma-bw -p tcp -o read 127.0.0.1       client"
)]
struct Args {
    #[command(flatten)]
    role: conn::RoleArgs,
    /// Operation: write, read or writedata.
    #[arg(short = 'o', long = "op", default_value = "write")]
    op: RmaOp,
    /// Sizes: comma list or 'all'.
    #[arg(short = 'S', long, default_value = "4k,64k,1M")]
    sizes: String,
    /// Transfers per size (default: about 256 MiB moved, 256 to 20,000).
    #[arg(short = 'I', long)]
    transfers: Option<usize>,
    /// Operations kept outstanding.
    #[arg(short = 'W', long, default_value_t = 64)]
    window: usize,
    /// Waiting: poll or sleep.
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
}

fn print(provider: &str, mode: Mode, self_mode: bool, res: &[BwResult], json: bool) {
    if json {
        let v = serde_json::json!({
            "provider": provider, "mode": mode, "cpu_counts_both_ends": self_mode,
            "results": res,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("# provider {provider}, completions by {mode}");
    println!(
        "# CPU: getrusage of this process over the timed transfers ({}); cores = CPU seconds per wall second",
        if self_mode {
            "both ends: --self runs them in this process"
        } else {
            "this end only"
        }
    );
    println!(
        "{:>10} {:>8} {:>10} {:>12} {:>12} {:>10} {:>12} {:>6}",
        "op", "bytes", "xfers", "MB/s", "usec/xfer", "cpu_s/GB", "cpu_s/Mxfer", "cores"
    );
    for r in res {
        println!(
            "{:>10} {:>8} {:>10} {:>12.1} {:>12.2} {:>10.2} {:>12.2} {:>6.2}",
            r.op.to_string(),
            fmt_size(r.size),
            r.transfers,
            r.mb_per_s,
            r.usec_per_xfer,
            r.cpu.s_per_gb,
            r.cpu.s_per_mmsg,
            r.cpu.cores()
        );
    }
}

fn run(a: &Args) -> Result<(), String> {
    let opts = Options {
        op: a.op,
        sizes: parse_sizes(&a.sizes)?,
        transfers: a.transfers,
        window: a.window,
        mode: a.mode,
        verify: !a.no_verify && (a.verify || a.role.self_mode),
    };
    let mode = a.mode;
    let role = a.role.role();
    let res = conn::run_role(
        "fabric-rma-bw",
        &a.role.provider,
        role,
        a.role.port.unwrap_or(9229),
        move |side| rmabw::serve(side, mode),
        |side| rmabw::client(side, &opts),
    )?;
    if let Some(res) = res {
        print(&a.role.provider, a.mode, a.role.self_mode, &res, a.json);
    }
    Ok(())
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("fabric-rma-bw: {e}");
        std::process::exit(1);
    }
}

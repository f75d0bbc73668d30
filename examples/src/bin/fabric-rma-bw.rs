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
    /// Provider.
    #[arg(short = 'p', long, default_value = "tcp")]
    provider: String,
    /// Server address (client mode). Without it (and without --self): server.
    dest: Option<String>,
    /// Run both ends in this process over loopback.
    #[arg(long = "self")]
    self_mode: bool,
    /// Operation: write, read or writedata.
    #[arg(short = 'o', long = "op", default_value = "write")]
    op: RmaOp,
    /// Address the server listens on.
    #[arg(short = 's', long = "src-addr", default_value = "127.0.0.1")]
    src_addr: String,
    /// Port of the server.
    #[arg(short = 'P', long, default_value_t = 9229)]
    port: u16,
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
}

fn print(provider: &str, res: &[BwResult], json: bool) {
    if json {
        let v = serde_json::json!({"provider": provider, "results": res});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("# provider {provider}");
    println!(
        "{:>10} {:>8} {:>10} {:>12} {:>12}",
        "op", "bytes", "xfers", "MB/s", "usec/xfer"
    );
    for r in res {
        println!(
            "{:>10} {:>8} {:>10} {:>12.1} {:>12.2}",
            r.op.to_string(),
            fmt_size(r.size),
            r.transfers,
            r.mb_per_s,
            r.usec_per_xfer
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
    };
    let mode = a.mode;
    let role = conn::role(a.self_mode, a.dest.as_deref(), &a.src_addr);
    let res = conn::run_role(
        "fabric-rma-bw",
        &a.provider,
        role,
        a.port,
        move |side| rmabw::serve(side, mode),
        |side| rmabw::client(side, &opts),
    )?;
    if let Some(res) = res {
        print(&a.provider, &res, a.json);
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("fabric-rma-bw: {e}");
        std::process::exit(1);
    }
}

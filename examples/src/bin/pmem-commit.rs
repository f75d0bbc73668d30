//! pmem-commit: a durable remote write, and how to check it.
//!
//! The target maps a file with `pmem::Mapping`, registers it PMEM; the initiator writes
//! into it with COMMIT_COMPLETE; when the completion arrives the target reads the file
//! back (pread and a fresh mapping) and says whether the bytes are there, and the tool
//! explains what the completion promised for that file (true pmem, or a page-cache
//! mapping made durable with msync). `--bench` measures write latency with
//! DELIVERY_COMPLETE against COMMIT_COMPLETE instead.

use std::path::PathBuf;

use clap::Parser;
use fabric_examples::conn;
use fabric_examples::pmem_commit::{self, BenchOptions, LatRow, TargetInfo};
use fabric_examples::report::Table;
use fabric_examples::sizes::{fmt_size, parse_size, parse_sizes};
use fabric_examples::Mode;

#[derive(Parser)]
#[command(
    name = "pmem-commit",
    about = "A durable remote write (RMA write with COMMIT_COMPLETE into a PMEM region) and its check",
    after_help = "Examples:\n  pmem-commit                                   both ends here, file in the temp dir\n  pmem-commit --file /dev/shm/region            target file on tmpfs\n  pmem-commit --bench --runs 5 --json           DELIVERY vs COMMIT latency, 64 B..1 MiB\n  pmem-commit --file /mnt/pmem/region           server (target) on 127.0.0.1:9230\n  pmem-commit 127.0.0.1                         client (initiator)"
)]
struct Args {
    /// Provider.
    #[arg(short = 'p', long, default_value = "tcp")]
    provider: String,
    /// Server address to connect to (client mode). Without it the tool runs both ends in
    /// this process (the default, same as --self) unless --server is given.
    dest: Option<String>,
    /// Run the target and the initiator in this process over loopback (default).
    #[arg(long = "self")]
    self_mode: bool,
    /// Be the target (server) only.
    #[arg(long, conflicts_with = "dest")]
    server: bool,
    /// Address the server listens on.
    #[arg(short = 's', long = "src-addr", default_value = "127.0.0.1")]
    src_addr: String,
    /// Port of the server.
    #[arg(short = 'P', long, default_value_t = 9230)]
    port: u16,
    /// Target file (created or resized); default: a file in the temp dir, removed at
    /// the end.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Bytes the demo writes.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    size: usize,
    /// Offset in the file of the demo write.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Measure DELIVERY_COMPLETE vs COMMIT_COMPLETE latency instead of the demo.
    #[arg(long)]
    bench: bool,
    /// Bench sizes: comma list or 'all'.
    #[arg(short = 'S', long, default_value = "64,256,1k,4k,16k,64k,256k,1M")]
    sizes: String,
    /// Bench: timed iterations per size and level (default: by size, 30 to 1,000).
    #[arg(short = 'I', long)]
    iterations: Option<usize>,
    /// Bench: untimed writes before each size and level.
    #[arg(short = 'w', long, default_value_t = 10)]
    warmup: usize,
    /// Bench: runs (the table gives the median over runs of each run's median).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Waiting: poll (busy) or sleep (blocking reads).
    #[arg(short = 'm', long, default_value = "poll")]
    mode: Mode,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

enum Outcome {
    Demo(pmem_commit::DemoReport),
    Bench(TargetInfo, Vec<LatRow>),
}

fn print_demo(a: &Args, r: &pmem_commit::DemoReport) {
    if a.json {
        let v = serde_json::json!({"provider": a.provider, "demo": r});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let t = &r.target;
    println!(
        "target file    {} ({}, mapping {}, is_pmem {})",
        t.file, t.fs, t.kind, t.is_pmem
    );
    println!(
        "COMMIT write   {} B at offset {} completed in {:.1} us, flags {}",
        r.len, r.offset, r.commit_us, r.flags
    );
    println!("check          {}", r.verify);
    println!("what it means  {}", t.meaning());
}

fn print_bench(a: &Args, t: &TargetInfo, rows: &[LatRow]) {
    if a.json {
        let v = serde_json::json!({
            "provider": a.provider, "mode": a.mode, "runs": a.runs, "target": t, "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let table = Table {
        title: format!(
            "# RMA write latency, DELIVERY_COMPLETE vs COMMIT_COMPLETE; provider {}, target {} \
             ({}, {}, is_pmem {}); one write outstanding, completions by {}; median of the \
             iterations, median over {} runs",
            a.provider, t.file, t.fs, t.kind, t.is_pmem, a.mode, a.runs
        ),
        header: [
            "size",
            "iters",
            "delivery_us",
            "commit_us",
            "commit/delivery",
        ]
        .map(String::from)
        .to_vec(),
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    fmt_size(r.size),
                    r.iterations.to_string(),
                    format!("{:.1}", r.delivery_us),
                    format!("{:.1}", r.commit_us),
                    format!("{:.2}", r.ratio),
                ]
            })
            .collect(),
    };
    print!("{}", table.to_text());
}

fn run(a: &Args) -> Result<(), String> {
    let (file, remove) = match &a.file {
        Some(f) => (f.clone(), false),
        None => (pmem_commit::default_file(), true),
    };
    let mode = a.mode;
    let bench = BenchOptions {
        sizes: parse_sizes(&a.sizes)?,
        iterations: a.iterations,
        warmup: a.warmup,
        runs: a.runs,
        mode,
    };
    let (size, offset, do_bench) = (a.size, a.offset, a.bench);
    // Both ends here unless told to be the server or given a server to connect to.
    let self_mode = a.self_mode || (!a.server && a.dest.is_none());
    let role = conn::role(self_mode, a.dest.as_deref(), &a.src_addr);
    let out = conn::run_role(
        "pmem-commit",
        &a.provider,
        role,
        a.port,
        move |side| pmem_commit::serve(side, &file, remove, mode),
        |side| {
            if do_bench {
                let (t, rows) = pmem_commit::bench(side, &bench)?;
                Ok(Outcome::Bench(t, rows))
            } else {
                pmem_commit::demo(side, offset, size, mode).map(Outcome::Demo)
            }
        },
    )?;
    match out {
        Some(Outcome::Demo(r)) => {
            print_demo(a, &r);
            if !r.verified {
                return Err("the committed bytes are not in the file".into());
            }
        }
        Some(Outcome::Bench(t, rows)) => print_bench(a, &t, &rows),
        None => {}
    }
    Ok(())
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("pmem-commit: {e}");
        std::process::exit(1);
    }
}

//! fabric-compare: the provider comparison. With no arguments it runs ping-pong latency
//! and bandwidth and RMA-write bandwidth on loopback for every provider that can run
//! here, and in the same run the references: a raw busy-polled TCP and UDP ping-pong,
//! and libfabric's tcp provider through `fi_pingpong` when it is installed. Each figure
//! is the median of several runs. Prints one table and writes Markdown, JSON and an
//! SVG plot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use fabric::{Caps, EpType, Hints};
use fabric_examples::pingpong::{self, PpResult};
use fabric_examples::report::{svg_plot, Line, Table};
use fabric_examples::rmabw::{self, RmaOp};
use fabric_examples::sizes::{auto_iterations, fmt_size, parse_sizes};
use fabric_examples::{median, rawnet, reference, Mode};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "fabric-compare",
    about = "Compare every provider that runs here with raw sockets and libfabric, on loopback",
    after_help = "Examples:\n  fabric-compare                         everything, 5 runs each, results in ./compare-out\n  fabric-compare --repeat 3 --providers tcp --no-libfabric\n  fabric-compare --quick                 a fast smoke run"
)]
struct Args {
    /// Ping-pong sizes.
    #[arg(short = 'S', long, default_value = "8,64,512,4k,16k,64k,256k,1M")]
    sizes: String,
    /// RMA write bandwidth sizes.
    #[arg(long = "rma-sizes", default_value = "64k,1M")]
    rma_sizes: String,
    /// Runs per measurement; figures are medians over runs.
    #[arg(short = 'r', long, default_value_t = 5)]
    repeat: usize,
    /// Only these providers (comma list); default: every one that can run here.
    #[arg(short = 'p', long)]
    providers: Option<String>,
    /// Skip the libfabric reference even if fi_pingpong is installed.
    #[arg(long = "no-libfabric")]
    no_libfabric: bool,
    /// Fewer iterations and runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Output directory for compare.md, compare.json and compare.svg.
    #[arg(short = 'o', long, default_value = "compare-out")]
    out: PathBuf,
    /// Loopback address to use.
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
}

#[derive(Serialize, Clone)]
struct Series {
    label: String,
    kind: &'static str,
    /// size -> (median one-way latency over runs of each run's mean, median MB/s)
    pingpong: BTreeMap<usize, (f64, f64)>,
    /// size -> median MB/s of RMA write
    rma_write: BTreeMap<usize, f64>,
    errors: Vec<String>,
}

impl Series {
    fn new(label: &str, kind: &'static str) -> Self {
        Series {
            label: label.to_string(),
            kind,
            pingpong: BTreeMap::new(),
            rma_write: BTreeMap::new(),
            errors: Vec::new(),
        }
    }
    fn add_runs(&mut self, runs: &[Vec<PpResult>]) {
        let mut by: BTreeMap<usize, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for run in runs {
            for r in run {
                let e = by.entry(r.size).or_default();
                e.0.push(r.lat_mean_us);
                e.1.push(r.mb_per_s);
            }
        }
        for (s, (l, b)) in by {
            self.pingpong.insert(s, (median(&l), median(&b)));
        }
    }
}

struct Progress {
    step: usize,
    total: usize,
    start: Instant,
}

impl Progress {
    fn say(&mut self, what: &str) {
        self.step += 1;
        eprintln!(
            "[{:>3}/{}] {:>6.1}s  {what}",
            self.step,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
    }
}

fn runnable_providers(filter: Option<&str>, addr: &str) -> Vec<(String, Result<(), String>)> {
    let hints = Hints::new()
        .caps(Caps::MSG | Caps::RMA)
        .ep_type(EpType::Msg)
        .node(addr)
        .service(0)
        .source(true);
    fabric::registry()
        .explain_with_filter(&hints, filter)
        .into_iter()
        .map(|m| (m.provider, m.result.map(|_| ())))
        .collect()
}

fn fmt_lat(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}
fn fmt_bw(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("fabric-compare: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let sizes = parse_sizes(&a.sizes)?;
    let rma_sizes = parse_sizes(&a.rma_sizes)?;
    let repeat = if a.quick { 1 } else { a.repeat.max(1) };
    let iters = |s: usize| {
        if a.quick {
            (auto_iterations(s) / 20).max(20)
        } else {
            auto_iterations(s)
        }
    };
    let iter_override = if a.quick { Some(50) } else { None };
    let warmup = if a.quick { 10 } else { 100 };

    let providers: Vec<String> = runnable_providers(a.providers.as_deref(), &a.addr)
        .into_iter()
        .filter_map(|(name, ok)| match ok {
            Ok(()) => Some(name),
            Err(why) => {
                eprintln!("fabric-compare: skipping provider {name}: {why}");
                None
            }
        })
        .collect();
    if providers.is_empty() {
        return Err("no provider can run here (see fabric-info)".into());
    }
    let fi = if a.no_libfabric {
        None
    } else {
        let f = reference::find_fi_pingpong();
        if f.is_none() {
            eprintln!(
                "fabric-compare: fi_pingpong not found (Debian package libfabric-bin); no libfabric reference row"
            );
        }
        f
    };
    let total =
        repeat * (providers.len() * 2 + 2) + fi.as_ref().map_or(0, |_| repeat * sizes.len());
    let mut prog = Progress {
        step: 0,
        total,
        start: Instant::now(),
    };
    let mut series = Vec::new();

    for p in &providers {
        let mut s = Series::new(p, "provider");
        let mut runs = Vec::new();
        for r in 0..repeat {
            prog.say(&format!("{p}: ping-pong run {}/{repeat}", r + 1));
            let opts = pingpong::Options {
                sizes: sizes.clone(),
                iterations: iter_override,
                warmup,
                mode: Mode::Poll,
                // Measured as fi_pingpong measures (it checks nothing by default);
                // fabric-pingpong --self is where the data is checked.
                verify: false,
            };
            match pingpong::run_self(p, &a.addr, &opts) {
                Ok(v) => runs.push(v),
                Err(e) => s.errors.push(format!("ping-pong: {e}")),
            }
        }
        s.add_runs(&runs);
        let mut bw: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for r in 0..repeat {
            prog.say(&format!("{p}: RMA write bandwidth run {}/{repeat}", r + 1));
            let opts = rmabw::Options {
                op: RmaOp::Write,
                sizes: rma_sizes.clone(),
                transfers: if a.quick { Some(64) } else { None },
                window: 64,
                mode: Mode::Poll,
                verify: false,
            };
            match rmabw::run_self(p, &a.addr, &opts) {
                Ok(v) => v
                    .iter()
                    .for_each(|x| bw.entry(x.size).or_default().push(x.mb_per_s)),
                Err(e) => s.errors.push(format!("rma write: {e}")),
            }
        }
        s.rma_write = bw.into_iter().map(|(k, v)| (k, median(&v))).collect();
        series.push(s);
    }

    if let Some(bin) = &fi {
        let mut s = Series::new("libfabric 1.17 tcp (fi_pingpong)", "reference");
        let mut by: BTreeMap<usize, Vec<PpResult>> = BTreeMap::new();
        for r in 0..repeat {
            for &size in &sizes {
                prog.say(&format!(
                    "libfabric tcp: fi_pingpong {} run {}/{repeat}",
                    fmt_size(size),
                    r + 1
                ));
                match reference::fi_pingpong(bin, "tcp", size, iter_override.unwrap_or(iters(size)))
                {
                    Ok(x) => by.entry(size).or_default().push(x),
                    Err(e) => s.errors.push(e),
                }
            }
        }
        // Regroup per run for add_runs.
        let runs: Vec<Vec<PpResult>> = (0..repeat)
            .map(|i| by.values().filter_map(|v| v.get(i).cloned()).collect())
            .collect();
        s.add_runs(&runs);
        series.push(s);
    }

    for (label, udp) in [
        ("raw TCP, busy-polled", false),
        ("raw UDP, busy-polled", true),
    ] {
        let mut s = Series::new(label, "reference");
        let mut runs = Vec::new();
        for r in 0..repeat {
            prog.say(&format!("{label}: run {}/{repeat}", r + 1));
            let res = if udp {
                rawnet::udp_pingpong(&a.addr, &sizes, iter_override, warmup)
            } else {
                rawnet::tcp_pingpong(&a.addr, &sizes, iter_override, warmup)
            };
            match res {
                Ok(v) => runs.push(v),
                Err(e) => s.errors.push(e.to_string()),
            }
        }
        s.add_runs(&runs);
        series.push(s);
    }

    // The reference for ratios: libfabric if measured, else raw TCP.
    let reference = series
        .iter()
        .find(|s| s.label.starts_with("libfabric") && !s.pingpong.is_empty())
        .or_else(|| series.iter().find(|s| s.label.starts_with("raw TCP")))
        .map(|s| s.label.clone())
        .unwrap_or_default();
    let ref_series = series.iter().find(|s| s.label == reference).cloned();
    let short = |l: &str| l.split(" (").next().unwrap_or(l).to_string();

    let mut lat = Table {
        title: format!(
            "Ping-pong one-way latency, microseconds (mean per run, median of {repeat} runs; lower is better)"
        ),
        header: vec!["size".into()],
        rows: Vec::new(),
    };
    let mut bw = Table {
        title: format!("Ping-pong bandwidth, MB/s (median of {repeat} runs; higher is better)"),
        header: vec!["size".into()],
        rows: Vec::new(),
    };
    for s in &series {
        lat.header.push(short(&s.label));
        bw.header.push(short(&s.label));
    }
    let providers_series: Vec<&Series> = series.iter().filter(|s| s.kind == "provider").collect();
    if ref_series.is_some() {
        for p in &providers_series {
            lat.header
                .push(format!("{} / {}", p.label, short(&reference)));
            bw.header
                .push(format!("{} / {}", p.label, short(&reference)));
        }
    }
    for &size in &sizes {
        let mut lr = vec![fmt_size(size)];
        let mut br = vec![fmt_size(size)];
        for s in &series {
            lr.push(fmt_lat(s.pingpong.get(&size).map(|x| x.0)));
            br.push(fmt_bw(s.pingpong.get(&size).map(|x| x.1)));
        }
        if let Some(r) = &ref_series {
            for p in &providers_series {
                let ratio = |f: fn(&(f64, f64)) -> f64| match (
                    p.pingpong.get(&size),
                    r.pingpong.get(&size),
                ) {
                    (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}", f(a) / f(b)),
                    _ => "-".into(),
                };
                lr.push(ratio(|x| x.0));
                br.push(ratio(|x| x.1));
            }
        }
        lat.rows.push(lr);
        bw.rows.push(br);
    }
    let mut rma = Table {
        title: format!("RMA write bandwidth, MB/s (window 64, median of {repeat} runs)"),
        header: vec!["size".into()],
        rows: Vec::new(),
    };
    for p in &providers_series {
        rma.header.push(p.label.clone());
    }
    for &size in &rma_sizes {
        let mut row = vec![fmt_size(size)];
        for p in &providers_series {
            row.push(fmt_bw(p.rma_write.get(&size).copied()));
        }
        rma.rows.push(row);
    }

    println!();
    for t in [&lat, &bw, &rma] {
        println!("{}", t.to_text());
    }
    let mut errors = Vec::new();
    for s in &series {
        for e in &s.errors {
            errors.push(format!("{}: {e}", s.label));
        }
    }
    for e in &errors {
        eprintln!("fabric-compare: error: {e}");
    }

    std::fs::create_dir_all(&a.out).map_err(|e| format!("create {}: {e}", a.out.display()))?;
    let mut md = String::from("# fabric-compare results\n\n");
    md.push_str(&format!(
        "Loopback ({}), completions by busy polling, {} runs per figure. Ratios are against {}.\n\n",
        a.addr,
        repeat,
        if reference.is_empty() { "nothing" } else { &reference }
    ));
    for t in [&lat, &bw, &rma] {
        md.push_str(&t.to_markdown());
        md.push('\n');
    }
    let lines = |f: fn(&(f64, f64)) -> f64| -> Vec<Line> {
        series
            .iter()
            .map(|s| Line {
                label: s.label.clone(),
                points: s.pingpong.iter().map(|(k, v)| (*k, f(v))).collect(),
            })
            .collect()
    };
    let svg = svg_plot(&lines(|x| x.0), &lines(|x| x.1));
    let write = |name: &str, body: &str| {
        let p = a.out.join(name);
        std::fs::write(&p, body).map_err(|e| format!("write {}: {e}", p.display()))
    };
    write("compare.md", &md)?;
    write("compare.svg", &svg)?;
    write(
        "compare.json",
        &serde_json::to_string_pretty(&serde_json::json!({
            "repeat": repeat, "reference": reference, "series": series, "errors": errors,
        }))
        .unwrap_or_default(),
    )?;
    eprintln!(
        "fabric-compare: wrote {0}/compare.md, {0}/compare.svg, {0}/compare.json in {1:.1}s",
        a.out.display(),
        prog.start.elapsed().as_secs_f64()
    );
    if !errors.is_empty() {
        return Err(format!("{} measurement(s) failed", errors.len()));
    }
    Ok(())
}

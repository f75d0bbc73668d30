//! fabric-compare: the provider comparison. With no arguments it runs ping-pong latency
//! and bandwidth and RMA-write bandwidth on loopback for every provider that can run
//! here, tcp's RDM endpoints (tagged, "tcp;rxm") beside its MSG endpoints, and in the
//! same run the references: each provider's limit (raw busy-polled TCP for tcp, raw
//! busy-polled UDP for softroce: ping-pongs, and one-way streams for bandwidth) and
//! libfabric's tcp provider through `fi_pingpong` (MSG, and RDM over `ofi_rxm`) when it
//! is installed. Each figure is the median of several runs. Prints the tables and
//! writes Markdown, JSON and an SVG plot (limits dashed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use fabric::{Caps, EpType, Hints};
use fabric_examples::pingpong::{self, PpResult};
use fabric_examples::report::{svg_plot, Line, Table};
use fabric_examples::rmabw::{self, RmaOp};
use fabric_examples::sizes::{auto_iterations, fmt_size, parse_sizes};
use fabric_examples::{median, rawnet, rdmpp, reference, Mode};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "fabric-compare",
    about = "Compare every provider that runs here with raw sockets and libfabric, on loopback",
    after_help = "Examples:\n  fabric-compare                         everything, 5 runs each, results in ./compare-out\n  fabric-compare --repeat 3 --provider tcp --no-libfabric\n  fabric-compare --provider softroce --sizes 8,1M --rma-sizes 1M\n  fabric-compare --quick                 a fast smoke run"
)]
struct Args {
    /// Ping-pong sizes (comma list: 8,4k,1M, or 'all').
    #[arg(short = 'S', long, default_value = "8,64,512,4k,16k,64k,256k,1M")]
    sizes: String,
    /// RMA write bandwidth sizes.
    #[arg(long = "rma-sizes", default_value = "64k,1M")]
    rma_sizes: String,
    /// Runs per measurement; figures are medians over runs.
    #[arg(short = 'r', long, default_value_t = 5)]
    repeat: usize,
    /// Only these providers (comma list); default: every one that can run here. The
    /// references measured are the selected providers' limits (tcp: raw TCP; softroce:
    /// raw UDP), and with tcp its RDM row and the libfabric rows.
    #[arg(short = 'p', long = "provider", visible_alias = "providers")]
    providers: Option<String>,
    /// Skip the libfabric reference even if fi_pingpong is installed.
    #[arg(long = "no-libfabric")]
    no_libfabric: bool,
    /// Skip tcp's RDM row (and libfabric's RDM reference).
    #[arg(long = "no-rdm")]
    no_rdm: bool,
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

/// What a row is.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// One of our providers (MSG endpoints).
    Provider,
    /// Our RDM layer over a provider.
    Rdm,
    /// libfabric, measured with its own tool.
    Reference,
    /// A raw-socket limit.
    Limit,
}

#[derive(Serialize, Clone)]
struct Series {
    label: String,
    kind: Kind,
    /// How completions were waited for and how progress was made.
    mode: &'static str,
    /// The row this one is compared with: the limit a provider's figures are divided
    /// by, the MSG row an RDM row is divided by, or (for libfabric) the row of ours
    /// divided by this one.
    limit: Option<String>,
    /// size -> (median one-way latency over runs of each run's mean, median MB/s)
    pingpong: BTreeMap<usize, (f64, f64)>,
    /// size -> median (CPU s per GB, CPU s per million messages) of the ping-pong
    cpu: BTreeMap<usize, (f64, f64)>,
    /// size -> median MB/s of RMA write (providers) or of the stream (limits)
    rma_write: BTreeMap<usize, f64>,
    /// size -> median (CPU s per GB, CPU s per million transfers) of the RMA writes
    rma_cpu: BTreeMap<usize, (f64, f64)>,
    errors: Vec<String>,
}

impl Series {
    fn new(label: &str, kind: Kind, mode: &'static str, limit: Option<&str>) -> Self {
        Series {
            label: label.to_string(),
            kind,
            mode,
            limit: limit.map(str::to_string),
            pingpong: BTreeMap::new(),
            cpu: BTreeMap::new(),
            rma_write: BTreeMap::new(),
            rma_cpu: BTreeMap::new(),
            errors: Vec::new(),
        }
    }
    fn add_runs(&mut self, runs: &[Vec<PpResult>]) {
        type Acc = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
        let mut by: BTreeMap<usize, Acc> = BTreeMap::new();
        for run in runs {
            for r in run {
                let e = by.entry(r.size).or_default();
                e.0.push(r.lat_mean_us);
                e.1.push(r.mb_per_s);
                if let Some(c) = r.cpu {
                    e.2.push(c.s_per_gb);
                    e.3.push(c.s_per_mmsg);
                }
            }
        }
        for (s, (l, b, g, m)) in by {
            self.pingpong.insert(s, (median(&l), median(&b)));
            if !g.is_empty() {
                self.cpu.insert(s, (median(&g), median(&m)));
            }
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
fn fmt_cpu(v: Option<f64>) -> String {
    v.map(|x| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    })
    .unwrap_or_else(|| "-".into())
}
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

const RAW_TCP: &str = "raw TCP, busy-polled";
const RAW_UDP: &str = "raw UDP, busy-polled";
const TCP_STREAM: &str = "raw TCP stream";
const UDP_STREAM: &str = "raw UDP 4 KiB-datagram stream";
const RDM_LABEL: &str = "tcp;rxm RDM tagged";
const LF_MSG: &str = "libfabric 1.17 tcp (fi_pingpong)";
const LF_RDM: &str = "libfabric 1.17 tcp;ofi_rxm RDM tagged (fi_pingpong)";

/// The limit a provider is measured against: raw UDP for the RoCE-over-UDP provider,
/// raw TCP for the others.
fn limit_of(provider: &str) -> (&'static str, &'static str) {
    if provider.starts_with("softroce") {
        (RAW_UDP, UDP_STREAM)
    } else {
        (RAW_TCP, TCP_STREAM)
    }
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
    let stream_bytes: usize = if a.quick { 16 << 20 } else { 256 << 20 };

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
    let has_tcp = providers.iter().any(|p| p == "tcp");
    let want_udp = providers.iter().any(|p| limit_of(p).0 == RAW_UDP);
    let want_tcp = providers.iter().any(|p| limit_of(p).0 == RAW_TCP);
    let rdm = has_tcp && !a.no_rdm;
    let fi = if a.no_libfabric || !has_tcp {
        None
    } else {
        let f = reference::find_fi_pingpong();
        if f.is_none() {
            eprintln!(
                "fabric-compare: fi_pingpong not found (Debian package libfabric-bin); no libfabric reference rows"
            );
        }
        f
    };
    let fi_rows = fi.as_ref().map_or(0, |_| 1 + usize::from(rdm));
    let total = repeat
        * (providers.len() * 2
            + usize::from(rdm)
            + 2 * (usize::from(want_tcp) + usize::from(want_udp))
            + fi_rows * sizes.len());
    let mut prog = Progress {
        step: 0,
        total,
        start: Instant::now(),
    };
    let mut series = Vec::new();
    let load_before = loadavg();
    // Beside tcp's MSG row: the ratio the RDM layer costs. Its runs alternate with the
    // MSG row's, so both rows see the same machine (on a small, shared machine the
    // latency floor moves by tens of percent between minutes).
    let mut rdm_series = rdm.then(|| {
        Series::new(
            RDM_LABEL,
            Kind::Rdm,
            "busy-poll, manual progress + the layer's thread",
            Some("tcp"),
        )
    });
    let mut rdm_runs = Vec::new();

    for p in &providers {
        let (lim, _) = limit_of(p);
        let mut s = Series::new(p, Kind::Provider, "busy-poll, manual progress", Some(lim));
        let mut runs = Vec::new();
        let opts = pingpong::Options {
            sizes: sizes.clone(),
            iterations: iter_override,
            warmup,
            mode: Mode::Poll,
            // Measured as fi_pingpong measures (it checks nothing by default);
            // fabric-pingpong --self is where the data is checked.
            verify: false,
        };
        for r in 0..repeat {
            prog.say(&format!("{p}: ping-pong run {}/{repeat}", r + 1));
            match pingpong::run_self(p, &a.addr, &opts) {
                Ok(v) => runs.push(v),
                Err(e) => s.errors.push(format!("ping-pong: {e}")),
            }
            if let (Some(rs), "tcp") = (rdm_series.as_mut(), p.as_str()) {
                prog.say(&format!("{RDM_LABEL}: ping-pong run {}/{repeat}", r + 1));
                match rdmpp::run_self("tcp", &a.addr, true, &opts) {
                    Ok(v) => rdm_runs.push(v),
                    Err(e) => rs.errors.push(format!("RDM ping-pong: {e}")),
                }
            }
        }
        s.add_runs(&runs);
        type Acc = (Vec<f64>, Vec<f64>, Vec<f64>);
        let mut bw: BTreeMap<usize, Acc> = BTreeMap::new();
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
                Ok(v) => v.iter().for_each(|x| {
                    let e = bw.entry(x.size).or_default();
                    e.0.push(x.mb_per_s);
                    e.1.push(x.cpu.s_per_gb);
                    e.2.push(x.cpu.s_per_mmsg);
                }),
                Err(e) => s.errors.push(format!("rma write: {e}")),
            }
        }
        for (k, (b, g, m)) in bw {
            s.rma_write.insert(k, median(&b));
            s.rma_cpu.insert(k, (median(&g), median(&m)));
        }
        series.push(s);
    }

    if let Some(mut s) = rdm_series {
        s.add_runs(&rdm_runs);
        series.push(s);
    }

    if let Some(bin) = &fi {
        let mut rows = vec![(LF_MSG, "tcp", "msg", false, Some("tcp"))];
        if rdm {
            rows.push((LF_RDM, "tcp;ofi_rxm", "rdm", true, Some(RDM_LABEL)));
        }
        for (label, prov, ep, tagged, mine) in rows {
            let mut s = Series::new(
                label,
                Kind::Reference,
                "busy-poll (fi_cq_read), provider default progress",
                mine,
            );
            let mut by: BTreeMap<usize, Vec<PpResult>> = BTreeMap::new();
            for r in 0..repeat {
                for &size in &sizes {
                    prog.say(&format!(
                        "libfabric {prov} {ep}: fi_pingpong {} run {}/{repeat}",
                        fmt_size(size),
                        r + 1
                    ));
                    match reference::fi_pingpong_ep(
                        bin,
                        prov,
                        ep,
                        tagged,
                        size,
                        iter_override.unwrap_or(iters(size)),
                    ) {
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
    }

    for (label, stream_label, udp, wanted) in [
        (RAW_TCP, TCP_STREAM, false, want_tcp),
        (RAW_UDP, UDP_STREAM, true, want_udp),
    ] {
        if !wanted {
            continue;
        }
        let mut s = Series::new(label, Kind::Limit, "busy-poll, non-blocking socket", None);
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
        // The one-way stream: the bandwidth limit (shown in the RMA table, the same
        // figure in every row: it does not depend on the RMA size).
        let chunk = if udp { 4096 } else { 64 << 10 };
        let mut st = Series::new(
            stream_label,
            Kind::Limit,
            "busy-poll, non-blocking socket",
            None,
        );
        let (mut b, mut g) = (Vec::new(), Vec::new());
        for r in 0..repeat {
            prog.say(&format!("{stream_label}: run {}/{repeat}", r + 1));
            match rawnet::stream(&a.addr, udp, chunk, stream_bytes) {
                Ok(x) => {
                    b.push(x.mb_per_s);
                    g.push(x.cpu.s_per_gb);
                }
                Err(e) => st.errors.push(e.to_string()),
            }
        }
        if !b.is_empty() {
            for &size in &rma_sizes {
                st.rma_write.insert(size, median(&b));
                st.rma_cpu.insert(size, (median(&g), 0.0));
            }
        }
        series.push(st);
    }
    let load_after = loadavg();

    let find = |l: &str| series.iter().find(|s| s.label == l);
    let short = |l: &str| l.split(" (").next().unwrap_or(l).to_string();
    let pp_series: Vec<&Series> = series.iter().filter(|s| !s.pingpong.is_empty()).collect();
    // Ratio columns, (numerator, denominator): each provider and the RDM row over
    // their limit or base row; ours over libfabric's beside it.
    let ratio_series: Vec<(&Series, &Series)> = series
        .iter()
        .filter_map(|s| {
            let other = find(s.limit.as_deref()?)?;
            Some(if s.kind == Kind::Reference {
                (other, s)
            } else {
                (s, other)
            })
        })
        .filter(|(a, b)| !a.pingpong.is_empty() && !b.pingpong.is_empty())
        .collect();
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
    for s in &pp_series {
        lat.header.push(short(&s.label));
        bw.header.push(short(&s.label));
    }
    for (s, l) in &ratio_series {
        let h = format!("{} / {}", short(&s.label), short(&l.label));
        lat.header.push(h.clone());
        bw.header.push(h);
    }
    for &size in &sizes {
        let mut lr = vec![fmt_size(size)];
        let mut br = vec![fmt_size(size)];
        for s in &pp_series {
            lr.push(fmt_lat(s.pingpong.get(&size).map(|x| x.0)));
            br.push(fmt_bw(s.pingpong.get(&size).map(|x| x.1)));
        }
        for (s, l) in &ratio_series {
            let (a, b) = (s.pingpong.get(&size), l.pingpong.get(&size));
            lr.push(ratio(a.map(|x| x.0), b.map(|x| x.0)));
            br.push(ratio(a.map(|x| x.1), b.map(|x| x.1)));
        }
        lat.rows.push(lr);
        bw.rows.push(br);
    }

    let rma_series: Vec<&Series> = series.iter().filter(|s| !s.rma_write.is_empty()).collect();
    let mut rma = Table {
        title: format!(
            "RMA write bandwidth, MB/s (window 64, median of {repeat} runs), beside the raw one-way streams (TCP in 64 KiB writes, UDP in 4 KiB datagrams: the same figure in every row)"
        ),
        header: vec!["size".into()],
        rows: Vec::new(),
    };
    for s in &rma_series {
        rma.header.push(short(&s.label));
    }
    let rma_ratios: Vec<(&Series, &Series)> = series
        .iter()
        .filter(|s| s.kind == Kind::Provider)
        .filter_map(|s| Some((s, find(limit_of(&s.label).1)?)))
        .collect();
    for (s, l) in &rma_ratios {
        rma.header
            .push(format!("{} / {}", short(&s.label), short(&l.label)));
    }
    for &size in &rma_sizes {
        let mut row = vec![fmt_size(size)];
        for s in &rma_series {
            row.push(fmt_bw(s.rma_write.get(&size).copied()));
        }
        for (s, l) in &rma_ratios {
            row.push(ratio(
                s.rma_write.get(&size).copied(),
                l.rma_write.get(&size).copied(),
            ));
        }
        rma.rows.push(row);
    }

    // How each row was measured, and what it cost in CPU.
    let small = sizes.iter().copied().min().unwrap_or(8);
    let large = sizes.iter().copied().max().unwrap_or(small);
    let rma_large = rma_sizes.iter().copied().max();
    let mut how = Table {
        title: String::from(
            "How each row was measured, and its CPU cost (getrusage of the measuring process over the timed part: both ends, as both run in it; libfabric: both fi_pingpong processes, whole run; busy polling keeps a core per end busy by design)"
        ),
        header: vec![
            "row".into(),
            "kind".into(),
            "completions, progress".into(),
            "ratios against".into(),
            format!("CPU s / M msgs, {} B ping-pong", small),
            format!("CPU s / GB, {} ping-pong", fmt_size(large)),
            format!(
                "CPU s / GB, {} RMA write or stream",
                rma_large.map(fmt_size).unwrap_or_default()
            ),
        ],
        rows: Vec::new(),
    };
    for s in &series {
        how.rows.push(vec![
            short(&s.label),
            format!("{:?}", s.kind).to_lowercase(),
            s.mode.to_string(),
            s.limit.as_deref().map(short).unwrap_or_else(|| "-".into()),
            fmt_cpu(s.cpu.get(&small).map(|x| x.1)),
            fmt_cpu(s.cpu.get(&large).map(|x| x.0)),
            fmt_cpu(rma_large.and_then(|k| s.rma_cpu.get(&k)).map(|x| x.0)),
        ]);
    }

    println!();
    for t in [&lat, &bw, &rma, &how] {
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
        "Loopback ({}), {} runs per figure, load average {} before and {} after. Each \
         provider's ratios divide by its limit measured in the same run (tcp: raw TCP; \
         softroce: raw UDP); the RDM row's by tcp's MSG row; libfabric's rows are \
         beside ours.\n\n",
        a.addr,
        repeat,
        load_before.as_deref().unwrap_or("?"),
        load_after.as_deref().unwrap_or("?"),
    ));
    for t in [&lat, &bw, &rma, &how] {
        md.push_str(&t.to_markdown());
        md.push('\n');
    }
    let lines = |f: fn(&(f64, f64)) -> f64| -> Vec<Line> {
        pp_series
            .iter()
            .map(|s| Line {
                label: s.label.clone(),
                points: s.pingpong.iter().map(|(k, v)| (*k, f(v))).collect(),
                dashed: s.kind == Kind::Limit,
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
            "repeat": repeat, "addr": a.addr, "sizes": sizes, "rma_sizes": rma_sizes,
            "load_before": load_before, "load_after": load_after,
            "series": series, "errors": errors,
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

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg has them.
fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

//! `fabric-conformance`: runs the conformance suite against one provider.
//!
//! The CLI uses clap's derive API: the options are declared once as a struct whose doc
//! comments become `--help`, parsing and error messages come for free, and the
//! workspace's other tools can share the same style.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use fabric_conformance::{cases, ctx_for, run, RunOptions};

/// Runs the fabric conformance suite against a provider.
#[derive(Parser, Debug)]
#[command(
    name = "fabric-conformance",
    version,
    after_help = "Examples:\n  \
        fabric-conformance -p tcp                      run every case against tcp\n  \
        fabric-conformance -p tcp --filter 'rma/*'     only the rma group\n  \
        fabric-conformance -p tcp --filter bad_key     cases whose id contains bad_key\n  \
        fabric-conformance -p tcp --list               list the cases\n  \
        fabric-conformance -p tcp --json > report.json a report for machines\n  \
        fabric-conformance -p softroce --addr 127.9.0.1  softroce on that address\n\n\
        Output: one line per case (PASS/FAIL/SKIP), then 'N passed, N failed, N skipped'.\n\
        The exit status is 1 if any case failed."
)]
struct Cli {
    /// Provider to test (e.g. tcp).
    #[arg(short = 'p', long = "provider")]
    provider: String,
    /// List the selected cases instead of running them.
    #[arg(long)]
    list: bool,
    /// Select cases by `group/name`: a substring, or a glob with `*` and `?`.
    #[arg(long, value_name = "PATTERN")]
    filter: Option<String>,
    /// Print the report as JSON (instead of one line per case).
    #[arg(long)]
    json: bool,
    /// Time limit per case, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    case_timeout: u64,
    /// Loopback address both ends of every case use (default: 127.0.0.1; for
    /// softroce a free 127.x.y.z, since its device needs UDP 4791 of the address).
    #[arg(long, value_name = "IP")]
    addr: Option<std::net::IpAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let all = cases::all();
    if cli.list {
        let selected = fabric_conformance::runner::select(&all, cli.filter.as_deref());
        if cli.json {
            let v: Vec<_> = selected
                .iter()
                .map(|c| serde_json::json!({"group": c.group, "name": c.name, "about": c.about, "needs": fabric::info::flag_names(c.needs)}))
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else {
            for c in &selected {
                println!("{:<40} {}", c.id(), c.about);
            }
            println!("{} cases", selected.len());
        }
        return ExitCode::SUCCESS;
    }
    let mut ctx = ctx_for(&cli.provider);
    if let Some(a) = cli.addr {
        ctx = ctx.with_addr(a);
    }
    if !cli.json {
        println!("# {} on {}", cli.provider, ctx.addr());
    }
    let opts = RunOptions {
        filter: cli.filter.clone(),
        case_timeout: Duration::from_secs(cli.case_timeout),
    };
    let json = cli.json;
    let report = match run(&ctx, &all, &opts, |r| {
        if !json {
            println!("{r}");
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fabric-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("fabric-conformance: cannot encode the report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        println!("{}", report.summary());
    }
    if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

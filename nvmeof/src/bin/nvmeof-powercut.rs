//! nvmeof-powercut: the workload of the VM tier's power-cut test of a buffered file
//! namespace's volatile write cache (tests/vm/cuts/nvmeof-vwc*.sh).
//!
//! `nvmeof-powercut write [--no-flush] DIR RUN` runs an NVMe-oF target (a buffered
//! file namespace, DIR/ns-RUN.img) and a host in this process over tcp on 127.0.0.1
//! and writes numbered, checksummed 4 KiB records, printing `ACK <id>` once each is
//! durable: even ids written with FUA, odd ids written then flushed. `--no-flush`
//! acknowledges at the plain write's completion (the control: what a power cut loses
//! without Flush or FUA). `nvmeof-powercut check DIR RUN` prints `HAVE <first>-<last>`
//! for the records present and intact. The writer stays (up to an hour) after its
//! last record, since the power cut is meant to end it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nvmeof::tools::powercut::{self, Durability, RECORDS};

#[derive(Parser)]
#[command(
    name = "nvmeof-powercut",
    about = "Power-cut workload for a buffered file namespace (VWC): write and check",
    after_help = "Examples:\n  nvmeof-powercut write /mnt/cut run1 > acks.txt   # until killed or the namespace is full\n  nvmeof-powercut check /mnt/cut run1             # HAVE 0-1234"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write records, printing `ACK <id>` when each is durable.
    Write {
        /// Acknowledge at plain write completion (no FUA, no Flush).
        #[arg(long)]
        no_flush: bool,
        /// Records to write at most.
        #[arg(long, default_value_t = RECORDS)]
        count: u64,
        /// Directory of the namespace file.
        dir: PathBuf,
        /// Run name (the file is DIR/ns-RUN.img).
        run: String,
    },
    /// Print `HAVE <first>-<last>` for the records present and intact.
    Check {
        /// Directory of the namespace file.
        dir: PathBuf,
        /// Run name.
        run: String,
    },
}

fn main() -> ExitCode {
    let r = match Args::parse().cmd {
        Cmd::Write {
            no_flush,
            count,
            dir,
            run,
        } => {
            let d = if no_flush {
                Durability::None
            } else {
                Durability::FuaOrFlush
            };
            powercut::write(&dir, &run, d, count, &mut std::io::stdout().lock())
                .map(|()| powercut::hold())
        }
        Cmd::Check { dir, run } => powercut::check(&dir, &run).map(|ranges| {
            for (a, b) in ranges {
                println!("HAVE {a}-{b}");
            }
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmeof-powercut: {e}");
            ExitCode::FAILURE
        }
    }
}

//! fabric-rping: rdma-core's `rping` over the fabric API (softroce, connected through
//! IB CM over QP1 with rdma_cm's header), so that a stock `rping` is its peer in
//! either role. Same flags as rping: -s or -c, -a address, -p port (7174), -S size
//! (64), -C count, -V (validate), -v (print the data), -I source address.
//! See fabric_examples::rping for the protocol.

use std::time::Duration;

use clap::Parser;
use fabric_examples::rping::{self, Options};

#[derive(Parser)]
#[command(
    name = "fabric-rping",
    about = "rping (librdmacm's example) over softroce and IB CM",
    disable_version_flag = true,
    after_help = "Examples (kernel rxe peer on 10.0.2.2, this host 10.0.2.1):\n  fabric-rping -s -a 10.0.2.1 -V        then on the peer: rping -c -a 10.0.2.1 -V -C 10\n  fabric-rping -c -a 10.0.2.2 -V -C 10  with the peer running: rping -s -a 10.0.2.2 -V"
)]
struct Args {
    /// Server role.
    #[arg(short = 's', conflicts_with = "client")]
    server: bool,
    /// Client role.
    #[arg(short = 'c')]
    client: bool,
    /// Server: the address to listen on (the softroce device's); client: the server.
    #[arg(short = 'a')]
    addr: String,
    /// Client: the local address to connect from.
    #[arg(short = 'I')]
    src: Option<std::net::IpAddr>,
    /// Port.
    #[arg(short = 'p', default_value_t = rping::DEFAULT_PORT)]
    port: u16,
    /// Ping size in bytes (26 to 65535).
    #[arg(short = 'S', default_value_t = 64)]
    size: usize,
    /// Pings (client: 0 means 1 here; server: serve until the client disconnects).
    #[arg(short = 'C', default_value_t = 0)]
    count: usize,
    /// Check the data of every ping.
    #[arg(short = 'V')]
    validate: bool,
    /// Print each ping's data.
    #[arg(short = 'v')]
    verbose: bool,
    /// Accepted for rping compatibility (no debug output).
    #[arg(short = 'd')]
    debug: bool,
    /// Provider.
    #[arg(long, default_value = "softroce")]
    provider: String,
    /// Seconds to wait for the peer (to connect, and for each step).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn main() {
    fabric_examples::quiet_on_closed_pipe();
    let a = Args::parse();
    if a.server == a.client {
        eprintln!("fabric-rping: one of -s (server) or -c (client)");
        std::process::exit(2);
    }
    let _ = a.debug;
    let o = Options {
        provider: a.provider.clone(),
        addr: a.addr.clone(),
        src: a.src,
        port: a.port,
        size: a.size,
        count: a.count,
        validate: a.validate,
        verbose: a.verbose,
        timeout: Duration::from_secs(a.timeout),
    };
    match rping::run(a.server, &o) {
        Ok(out) => {
            if let Some(d) = &out.device {
                println!("{d}");
            }
            println!(
                "fabric-rping {}: {} pings of {} bytes, {} verified{}",
                if a.server { "server" } else { "client" },
                out.pings,
                a.size,
                out.verified,
                if out.peer_disconnected {
                    ", the peer disconnected"
                } else {
                    ""
                }
            );
        }
        Err(e) => {
            eprintln!("fabric-rping: {e}");
            std::process::exit(1);
        }
    }
}

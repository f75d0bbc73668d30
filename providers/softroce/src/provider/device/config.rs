//! How a device behaves: fault injection, capture, retry count, backstop, pacing
//! ([`DeviceConfig`], from the environment or [`configure_device`](super::configure_device)).

use super::*;

/// How a device behaves: fault injection and capture. Read from the environment
/// (`SOFTROCE_FAULTS`, `SOFTROCE_PCAP`) when a device is created, unless a program
/// set one with [`configure_device`](crate::configure_device) first.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    /// Faults injected on every frame this device sends, with the seed.
    pub faults: Option<(FaultConfig, u64)>,
    /// Where to write a pcap of every frame this device sends (as full IPv4 frames).
    pub pcap: Option<PathBuf>,
    /// Transport retry count of QPs connected on this device (`None`: 7, as rxe and
    /// most applications use). Counts above 7 are a local extension for very lossy
    /// links (see `RtsAttr::retry_cnt`); they change no packet.
    pub retry_cnt: Option<u8>,
    /// The progress backstop's interval (`None`: [`DEFAULT_BACKSTOP`], 1 ms;
    /// `Some(Duration::ZERO)`: no backstop). When no application thread has run the
    /// device's transport for this long, the device's backstop thread runs it (see
    /// the crate docs, "Progress").
    pub backstop: Option<Duration>,
    /// Output pacing (`None`: [`Pace::default`], turns of 64 packets, no gap).
    pub pace: Option<Pace>,
    /// UDP segmentation offload (`None`: on where the kernel has it). On, runs of
    /// packets of one length to one peer leave as one GSO send each (the kernel
    /// splits them; each packet's ICRC is built for the IP ID its datagram gets);
    /// off, one datagram per `sendmmsg` entry. The wire is the same either way.
    pub gso: Option<bool>,
    /// How endpoints connecting from this device's address reach their peer
    /// (`None`: [`CmProtocol::Tcp`]; `SOFTROCE_CM=tcp|ib`). Listeners answer both.
    pub cm: Option<CmProtocol>,
}

/// The connection manager a connecting endpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CmProtocol {
    /// The `ibv_rc_pingpong`-style exchange over TCP (the default).
    #[default]
    Tcp,
    /// IB CM MADs over QP1 with rdma_cm's header (what librdmacm and kernel rdma_cm
    /// peers speak; see the crate docs, "Connection management").
    Ib,
}

/// How a device paces each QP's output: a QP sends at most `burst` packets in a row,
/// then waits for every other QP's and the receive side's turn and, with a `gap`, at
/// least `gap` after any turn in which it sent (its ACKs wait too) before it sends
/// more. So a 1 MiB READ is not answered (nor a 1 MiB WRITE sent) as
/// one 256-packet burst that a slow receiver (kernel rxe in a small VM, a busy host)
/// loses in bulk, and one QP's big transfer does not hold the device while other
/// connections wait. `gap` zero: turns only, no rate limit (the default; the wire and
/// the peer's window limit the rate). With a gap the QP's rate is at most
/// `burst × MTU / gap` (e.g. 16 × 4 KiB / 100 µs ≈ 650 MB/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Packets a QP sends per turn (at least 1).
    pub burst: usize,
    /// Least time between two turns of a QP.
    pub gap: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            burst: 64,
            gap: Duration::ZERO,
        }
    }
}

impl DeviceConfig {
    /// The configuration the environment asks for. `SOFTROCE_FAULTS` is a comma list
    /// of `drop=P`, `dup=P`, `reorder=P`, `corrupt=P` (probabilities 0..1), `seed=N`,
    /// `delay_us=N`, `jitter_us=N`, `reorder_us=N` (extra delay of a reordered frame,
    /// default 200); `SOFTROCE_PCAP` a file path; `SOFTROCE_RETRY_CNT` the transport
    /// retry count; `SOFTROCE_BACKSTOP_US` the backstop interval in µs (0: off);
    /// `SOFTROCE_GSO` 0 or 1 (UDP segmentation offload off or on).
    /// `SOFTROCE_CM` the connection manager of connecting endpoints (`tcp`, `ib`).
    pub fn from_env() -> Result<Self, String> {
        let mut c = DeviceConfig::default();
        if let Ok(s) = std::env::var("SOFTROCE_FAULTS") {
            if !s.trim().is_empty() {
                c.faults = Some(parse_faults(&s)?);
            }
        }
        if let Ok(p) = std::env::var("SOFTROCE_PCAP") {
            if !p.trim().is_empty() {
                c.pcap = Some(PathBuf::from(p));
            }
        }
        if let Ok(b) = std::env::var("SOFTROCE_BACKSTOP_US") {
            if !b.trim().is_empty() {
                c.backstop = Some(Duration::from_micros(b.trim().parse().map_err(|_| {
                    format!("SOFTROCE_BACKSTOP_US={b} is not a whole number of µs (0: off)")
                })?));
            }
        }
        if let Ok(p) = std::env::var("SOFTROCE_PACE") {
            if !p.trim().is_empty() {
                c.pace = Some(parse_pace(&p)?);
            }
        }
        if let Ok(g) = std::env::var("SOFTROCE_GSO") {
            c.gso = match g.trim() {
                "" => None,
                "1" | "on" => Some(true),
                "0" | "off" => Some(false),
                _ => return Err(format!("SOFTROCE_GSO={g}: 1/on or 0/off")),
            };
        }
        if let Ok(m) = std::env::var("SOFTROCE_CM") {
            c.cm = match m.trim().to_ascii_lowercase().as_str() {
                "" => None,
                "tcp" => Some(CmProtocol::Tcp),
                "ib" | "rdmacm" | "rdma_cm" => Some(CmProtocol::Ib),
                _ => return Err(format!("SOFTROCE_CM={m}: one of tcp, ib")),
            };
        }
        if let Ok(r) = std::env::var("SOFTROCE_RETRY_CNT") {
            if !r.trim().is_empty() {
                c.retry_cnt = Some(r.trim().parse().map_err(|_| {
                    format!("SOFTROCE_RETRY_CNT={r} is not a number from 0 to 255")
                })?);
            }
        }
        Ok(c)
    }
}

/// Parses a `SOFTROCE_PACE` value: `burst=N` (packets per turn, default 64) and
/// `gap_us=N` (µs between a QP's turns, default 0), comma-separated.
pub fn parse_pace(s: &str) -> Result<Pace, String> {
    let mut p = Pace::default();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("SOFTROCE_PACE: '{item}' is not key=value"))?;
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| format!("SOFTROCE_PACE: {k}={v} is not a whole number"))?;
        match k.trim() {
            "burst" if (1..=1 << 20).contains(&n) => p.burst = n as usize,
            "burst" => return Err(format!("SOFTROCE_PACE: burst={n} is not in 1..2^20")),
            "gap_us" if n <= 1_000_000 => p.gap = Duration::from_micros(n),
            "gap_us" => return Err(format!("SOFTROCE_PACE: gap_us={n} is over 1 s")),
            other => return Err(format!("SOFTROCE_PACE: unknown key '{other}'")),
        }
    }
    Ok(p)
}

/// Parses a `SOFTROCE_FAULTS` value.
pub fn parse_faults(s: &str) -> Result<(FaultConfig, u64), String> {
    let mut f = FaultConfig::perfect(Duration::ZERO);
    f.reorder_delay = Duration::from_micros(200);
    let mut seed = 1u64;
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("SOFTROCE_FAULTS: '{item}' is not key=value"))?;
        let prob = || -> Result<f64, String> {
            let p: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("SOFTROCE_FAULTS: {k}={v} is not a number"))?;
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                Err(format!("SOFTROCE_FAULTS: {k}={v} is not in 0..1"))
            }
        };
        let micros = || -> Result<Duration, String> {
            v.trim()
                .parse()
                .map(Duration::from_micros)
                .map_err(|_| format!("SOFTROCE_FAULTS: {k}={v} is not a whole number"))
        };
        match k.trim() {
            "drop" => f.drop = prob()?,
            "dup" | "duplicate" => f.duplicate = prob()?,
            "reorder" => f.reorder = prob()?,
            "corrupt" => f.corrupt = prob()?,
            "delay_us" => f.delay = micros()?,
            "jitter_us" => f.jitter = micros()?,
            "reorder_us" => f.reorder_delay = micros()?,
            "seed" => {
                seed = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("SOFTROCE_FAULTS: seed={v} is not a number"))?
            }
            other => return Err(format!("SOFTROCE_FAULTS: unknown key '{other}'")),
        }
    }
    Ok((f, seed))
}

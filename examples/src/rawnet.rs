//! Reference measurements with plain sockets and no fabric: a busy-polled TCP
//! ping-pong and a busy-polled UDP ping-pong on loopback. They are the floor the
//! providers are compared against in the same run.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::pingpong::PpResult;
use crate::sizes::auto_iterations;
use crate::{cpu_seconds, median, CpuCost};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest UDP payload on IPv4.
pub const MAX_UDP: usize = 65_507;

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "raw ping-pong peer stopped answering",
    )
}

fn spin_read(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    let mut spins = 0u32;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(4096) && Instant::now() > deadline {
                    return Err(timed_out());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn spin_write(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut put = 0;
    while put < buf.len() {
        match s.write(&buf[put..]) {
            Ok(n) => put += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(timed_out());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn plan(sizes: &[usize], iterations: Option<usize>) -> Vec<(usize, usize)> {
    sizes
        .iter()
        .map(|&s| (s, iterations.unwrap_or_else(|| auto_iterations(s))))
        .collect()
}

fn result(size: usize, iters: usize, samples: &[f64], total_us: f64, cpu_s: f64) -> PpResult {
    let mean = total_us / (2.0 * iters.max(1) as f64);
    PpResult {
        size,
        iterations: iters,
        lat_median_us: median(samples) / 2.0,
        lat_p99_us: Some(crate::quantile(samples, 0.99) / 2.0),
        lat_mean_us: mean,
        mb_per_s: if mean > 0.0 { size as f64 / mean } else { 0.0 },
        cpu: Some(CpuCost::new(
            cpu_s,
            total_us / 1e6,
            (2 * size * iters) as f64,
            (2 * iters) as f64,
        )),
    }
}

/// Busy-polled TCP ping-pong between two threads over `node` (a loopback address).
pub fn tcp_pingpong(
    node: &str,
    sizes: &[usize],
    iterations: Option<usize>,
    warmup: usize,
) -> io::Result<Vec<PpResult>> {
    let plan = plan(sizes, iterations);
    let listener = TcpListener::bind((node, 0))?;
    let addr = listener.local_addr()?;
    let splan = plan.clone();
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let deadline = Instant::now() + TIMEOUT;
        for (size, iters) in splan {
            let mut buf = vec![0u8; size];
            for _ in 0..warmup + iters {
                spin_read(&mut s, &mut buf, deadline)?;
                spin_write(&mut s, &buf, deadline)?;
            }
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_nonblocking(true)?;
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    for &(size, iters) in &plan {
        let tx = vec![0x5Au8; size];
        let mut rx = vec![0u8; size];
        let mut samples = Vec::with_capacity(iters);
        let mut start = Instant::now();
        let mut cpu0 = cpu_seconds(false);
        for i in 0..warmup + iters {
            if i == warmup {
                cpu0 = cpu_seconds(false);
                start = Instant::now();
            }
            let t0 = Instant::now();
            spin_write(&mut c, &tx, deadline)?;
            spin_read(&mut c, &mut rx, deadline)?;
            if i >= warmup {
                samples.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        out.push(result(
            size,
            iters,
            &samples,
            start.elapsed().as_secs_f64() * 1e6,
            cpu_seconds(false) - cpu0,
        ));
    }
    server
        .join()
        .map_err(|_| io::Error::other("raw TCP server thread panicked"))??;
    Ok(out)
}

fn spin_recv(s: &UdpSocket, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let mut spins = 0u32;
    loop {
        match s.recv(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(4096) && Instant::now() > deadline {
                    return Err(timed_out());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Busy-polled UDP ping-pong between two threads over `node`; sizes above
/// [`MAX_UDP`] are left out. Loopback does not lose datagrams unless the receiver's
/// buffer overflows, which a ping-pong never does.
pub fn udp_pingpong(
    node: &str,
    sizes: &[usize],
    iterations: Option<usize>,
    warmup: usize,
) -> io::Result<Vec<PpResult>> {
    let sizes: Vec<usize> = sizes.iter().copied().filter(|&s| s <= MAX_UDP).collect();
    let plan = plan(&sizes, iterations);
    let a = UdpSocket::bind((node, 0))?;
    let b = UdpSocket::bind((node, 0))?;
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let splan = plan.clone();
    let server = std::thread::spawn(move || -> io::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; MAX_UDP];
        for (size, iters) in splan {
            for _ in 0..warmup + iters {
                let n = spin_recv(&b, &mut buf, deadline)?;
                if n != size {
                    return Err(io::Error::other("UDP datagram of the wrong size"));
                }
                b.send(&buf[..n])?;
            }
        }
        Ok(())
    });
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    let mut rx = vec![0u8; MAX_UDP];
    for &(size, iters) in &plan {
        let tx = vec![0x5Au8; size];
        let mut samples = Vec::with_capacity(iters);
        let mut start = Instant::now();
        let mut cpu0 = cpu_seconds(false);
        for i in 0..warmup + iters {
            if i == warmup {
                cpu0 = cpu_seconds(false);
                start = Instant::now();
            }
            let t0 = Instant::now();
            a.send(&tx)?;
            spin_recv(&a, &mut rx, deadline)?;
            if i >= warmup {
                samples.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        out.push(result(
            size,
            iters,
            &samples,
            start.elapsed().as_secs_f64() * 1e6,
            cpu_seconds(false) - cpu0,
        ));
    }
    server
        .join()
        .map_err(|_| io::Error::other("raw UDP server thread panicked"))??;
    Ok(out)
}

/// Asks for a receive buffer of `bytes` (the kernel caps it at net.core.rmem_max);
/// failure leaves the default, which only lowers the figure.
fn set_rcvbuf(s: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A one-way stream's result: what arrived and how fast.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamResult {
    /// Bytes per send call (the datagram size for UDP).
    pub chunk: usize,
    /// Bytes the receiver got.
    pub bytes: usize,
    /// MB/s (10^6 bytes) received, from the first send to the last byte received.
    pub mb_per_s: f64,
    /// Datagrams the receiver did not get (UDP; loopback drops only when the
    /// receiver's buffer overflows).
    pub lost: usize,
    /// CPU of both threads over the stream.
    pub cpu: CpuCost,
}

/// A busy-polled one-way stream of `total` bytes in sends of `chunk` bytes between
/// two threads over `node`: TCP (`udp` false) or UDP datagrams of `chunk` bytes (the
/// limit a RoCE-over-UDP provider sending one 4 KiB packet per datagram works
/// against).
pub fn stream(node: &str, udp: bool, chunk: usize, total: usize) -> io::Result<StreamResult> {
    if chunk == 0 || (udp && chunk > MAX_UDP) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stream chunk of {chunk} bytes"),
        ));
    }
    let count = total.div_ceil(chunk);
    let deadline = Instant::now() + TIMEOUT;
    let cpu0 = cpu_seconds(false);
    let start = Instant::now();
    let (got, lost) = if udp {
        let a = UdpSocket::bind((node, 0))?;
        let b = UdpSocket::bind((node, 0))?;
        a.connect(b.local_addr()?)?;
        b.connect(a.local_addr()?)?;
        b.set_nonblocking(true)?;
        set_rcvbuf(&b, 4 << 20);
        // Flow control, as a reliable transport over UDP has: at most WINDOW datagrams
        // in flight (sent and not yet received), so the stream measures what the
        // receiver can take instead of how fast the kernel drops.
        const WINDOW: usize = 32;
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r2 = received.clone();
        let sent_all = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = sent_all.clone();
        let rx = std::thread::spawn(move || -> io::Result<usize> {
            let mut buf = vec![0u8; MAX_UDP];
            let mut got = 0usize;
            let mut idle_since: Option<Instant> = None;
            // Until every datagram came, or none came for 100 ms once the sender is
            // done (the rest was lost).
            while got < count * chunk {
                match b.recv(&mut buf) {
                    Ok(n) => {
                        got += n;
                        r2.fetch_add(1, std::sync::atomic::Ordering::Release);
                        idle_since = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            break;
                        }
                        if !s2.load(std::sync::atomic::Ordering::Acquire) {
                            continue;
                        }
                        let t = *idle_since.get_or_insert_with(Instant::now);
                        if t.elapsed() > Duration::from_millis(100) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        });
        let tx = vec![0xA5u8; chunk];
        let mut sent = 0usize;
        while sent < count {
            let seen = received.load(std::sync::atomic::Ordering::Acquire);
            if sent - seen.min(sent) >= WINDOW {
                // A datagram dropped for good would stall the window: after 10 ms
                // without progress, count it as lost and go on.
                let t = Instant::now();
                while received.load(std::sync::atomic::Ordering::Acquire) == seen {
                    if t.elapsed() > Duration::from_millis(10) {
                        received.fetch_add(1, std::sync::atomic::Ordering::Release);
                        break;
                    }
                    std::hint::spin_loop();
                }
                continue;
            }
            match a.send(&tx) {
                Ok(_) => sent += 1,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                // The kernel had no buffer for it: a drop, counted as lost.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => sent += 1,
                Err(e) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(timed_out());
            }
        }
        sent_all.store(true, std::sync::atomic::Ordering::Release);
        let got = rx
            .join()
            .map_err(|_| io::Error::other("raw UDP receiver panicked"))??;
        (got, count - got / chunk)
    } else {
        let listener = TcpListener::bind((node, 0))?;
        let addr = listener.local_addr()?;
        let rx = std::thread::spawn(move || -> io::Result<usize> {
            let (mut s, _) = listener.accept()?;
            s.set_nonblocking(true)?;
            let mut buf = vec![0u8; chunk.max(1 << 16)];
            let mut got = 0usize;
            while got < count * chunk {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(timed_out());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        });
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        c.set_nonblocking(true)?;
        let tx = vec![0xA5u8; chunk];
        for _ in 0..count {
            spin_write(&mut c, &tx, deadline)?;
        }
        let got = rx
            .join()
            .map_err(|_| io::Error::other("raw TCP receiver panicked"))??;
        (got, 0)
    };
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(false) - cpu0;
    Ok(StreamResult {
        chunk,
        bytes: got,
        mb_per_s: if secs > 0.0 {
            got as f64 / secs / 1e6
        } else {
            0.0
        },
        lost,
        cpu: CpuCost::new(cpu, secs, got as f64, (got / chunk) as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_references_measure_every_size() {
        let r = tcp_pingpong("127.0.0.1", &[8, 70_000], Some(50), 5).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|x| x.lat_median_us > 0.0 && x.mb_per_s > 0.0));
        let u = udp_pingpong("127.0.0.1", &[8, 70_000], Some(50), 5).unwrap();
        assert_eq!(u.len(), 1, "sizes above the UDP limit are left out");
        assert_eq!(u[0].size, 8);
    }

    #[test]
    fn raw_streams_move_what_they_say() {
        let t = stream("127.0.0.1", false, 65536, 8 << 20).unwrap();
        assert_eq!(t.bytes, 8 << 20);
        assert_eq!(t.lost, 0);
        assert!(t.mb_per_s > 0.0);
        let u = stream("127.0.0.1", true, 4096, 4 << 20).unwrap();
        assert_eq!(u.bytes + u.lost * 4096, 4 << 20, "{u:?}");
        assert!(u.bytes > 0 && u.mb_per_s > 0.0, "{u:?}");
        assert!(stream("127.0.0.1", true, 70_000, 1 << 20).is_err());
    }
}

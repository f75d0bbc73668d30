//! The few system calls the driver needs beyond std: an unconnected UDP socket with
//! `IP_PMTUDISC_DO`, batched `recvmmsg`/`sendmmsg`, an eventfd and `ppoll`.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

/// Largest datagram the device receives: BTH + RETH + ImmDt + 4096 payload + ICRC,
/// rounded up.
pub(crate) const MAX_DATAGRAM: usize = 4096 + 128;
/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub(crate) const BATCH: usize = 32;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is a valid socket; the option value is a c_int that lives for the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Binds the device's UDP socket on `ip:port`: non-blocking, don't-fragment with
/// IP ID 0 (`IP_PMTUDISC_DO`, what the ICRC assumes), large buffers.
pub(crate) fn bind_udp(ip: Ipv4Addr, port: u16) -> io::Result<UdpSocket> {
    // Shared with the other processes that use the device on `ip` (SO_REUSEPORT).
    let sock = super::device::share::bind_reuseport(SocketAddrV4::new(ip, port))?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // FORCE needs CAP_NET_ADMIN; otherwise the kernel caps at rmem_max/wmem_max.
        if setsockopt_int(fd, libc::SOL_SOCKET, force, 8 << 20).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, 8 << 20);
        }
    }
    Ok(sock)
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Receive buffers for one `recvmmsg` batch.
pub(crate) struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    addrs: Vec<libc::sockaddr_in>,
    lens: Vec<usize>,
}

impl RecvBatch {
    pub(crate) fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH],
            addrs: vec![sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
            lens: vec![0; BATCH],
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // On the stack: this runs on every poll, mostly to find nothing.
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        });
        let mut msgs: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        });
        // SAFETY: every pointer in msgs refers to buffers owned by self or by the local
        // iovs vector, all alive for the call and sized as declared.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, m) in msgs.iter().enumerate().take(n) {
            self.lens[i] = m.msg_len as usize;
        }
        Ok(n)
    }

    /// Datagram `i` of the last batch: source address and bytes.
    pub(crate) fn get(&self, i: usize) -> (SocketAddrV4, &[u8]) {
        let a = &self.addrs[i];
        let src = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        (src, &self.bufs[i][..self.lens[i].min(MAX_DATAGRAM)])
    }
}

/// Sends `frames` (destination, bytes) with as few `sendmmsg` calls as possible.
/// Returns how many were handed to the kernel; a full socket buffer (`EAGAIN`) or a
/// per-datagram error drops the rest (RC retransmits them).
pub(crate) fn send_batch(fd: RawFd, frames: &[(SocketAddrV4, Vec<u8>)]) -> usize {
    let mut sent = 0;
    for chunk in frames.chunks(BATCH) {
        let mut addrs: Vec<libc::sockaddr_in> =
            chunk.iter().map(|(a, _)| sockaddr_in(*a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: plain old data; all-zero is valid.
                let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
                m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut off = 0;
        let mut tries = 0;
        while off < msgs.len() && tries < 8 {
            tries += 1;
            // SAFETY: msgs[off..] point into addrs/iovs/frames, alive for the call.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs[off..].as_mut_ptr(),
                    (msgs.len() - off) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return sent + off,
                    // e.g. ECONNREFUSED from an ICMP error of an earlier datagram:
                    // skip this one.
                    _ => {
                        off += 1;
                        continue;
                    }
                }
            }
            off += n as usize;
        }
        sent += off;
    }
    sent
}

/// Whether any of `fds` is readable (or hung up, or in error) now; does not wait.
pub(crate) fn any_readable(fds: &[RawFd]) -> bool {
    if fds.is_empty() {
        return false;
    }
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a live array of pollfd of the given length.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 0) };
    // An error (EINTR, ENOMEM): let the caller look at every socket.
    n != 0
}

/// Connects a TCP socket to `dst` from `src` (port 0: any), waiting up to `timeout`.
pub(crate) fn connect_from(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    let (std::net::SocketAddr::V4(src), std::net::SocketAddr::V4(dst)) = (src, dst) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "connect_from needs IPv4 addresses",
        ));
    };
    // SAFETY: plain syscall; the result is checked.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd is a fresh socket we own; the TcpStream closes it on every path.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let s = sockaddr_in(src);
    // SAFETY: s is a live sockaddr_in of `len` bytes.
    cvt(unsafe { libc::bind(fd, (&s as *const libc::sockaddr_in).cast(), len) })?;
    let d = sockaddr_in(dst);
    // SAFETY: d is a live sockaddr_in of `len` bytes.
    let r = unsafe { libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: p is a live pollfd.
        if cvt(unsafe { libc::poll(&mut p, 1, ms) })? == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

//! Thin, safe wrappers over the Linux system calls the provider uses: epoll, eventfd,
//! poll, non-blocking connect, socket options, and vectored send / receive.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// An epoll instance.
pub struct Epoll {
    fd: OwnedFd,
}

/// Readiness reported by [`Epoll::wait`].
pub type EpollEvent = libc::epoll_event;

impl Epoll {
    /// Creates an epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call; the returned descriptor is owned below.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Adds `fd` with `events`, reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    /// Changes the events of a registered `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// Removes `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (0: poll, -1: forever) and fills `out` (its capacity
    /// bounds the number of events).
    pub fn wait(&self, out: &mut Vec<EpollEvent>, timeout_ms: libc::c_int) -> io::Result<usize> {
        out.clear();
        let cap = out.capacity().clamp(1, 1024);
        out.reserve(cap);
        // SAFETY: out has room for `cap` events; the kernel writes at most that many.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                out.as_mut_ptr(),
                cap as libc::c_int,
                timeout_ms,
            )
        };
        match cvt(n) {
            Ok(n) => {
                // SAFETY: the kernel initialized the first n entries.
                unsafe { out.set_len(n as usize) };
                Ok(n as usize)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The descriptor, for poll().
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Starts a non-blocking connect. Returns the socket and whether it is already
/// connected (else completion is signalled by writability).
pub fn connect_nonblocking(addr: &SocketAddr) -> io::Result<(TcpStream, bool)> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain system call.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fresh descriptor, owned from here on.
    let sock = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let (ss, len) = sockaddr(addr);
    // SAFETY: ss holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    if r == 0 {
        return Ok((sock, true));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok((sock, false))
    } else {
        Err(e)
    }
}

/// The pending error of a socket (SO_ERROR), e.g. the outcome of a connect.
pub fn take_socket_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err/len are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(err))
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: passes a valid int of the size given. Failure leaves the default, which
    // only affects performance.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn read_proc_usize(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Prepares a connected socket: non-blocking, TCP_NODELAY, and a large send buffer
/// where the system allows one (setting SO_SNDBUF disables autotuning, so it is only
/// set when `net.core.wmem_max` permits at least 1 MiB; the receive side keeps Linux
/// autotuning, whose ceiling `tcp_rmem` is normally far above `rmem_max`).
pub fn tune_stream(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    static SNDBUF: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let want = *SNDBUF.get_or_init(|| {
        read_proc_usize("/proc/sys/net/core/wmem_max")
            .filter(|m| *m >= 1 << 20)
            .map(|m| m.min(8 << 20))
    });
    if let Some(n) = want {
        setsockopt_int(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            n as libc::c_int,
        );
    }
    Ok(())
}

/// Scatter-receives into `iov`; `Ok(0)` is end of stream.
///
/// # Safety
/// Each iovec must describe memory that is valid for writes of its `iov_len` bytes for
/// the duration of the call and that no reference (`&`/`&mut`) covers meanwhile.
pub unsafe fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: the caller upholds the contract above; the kernel writes at most the
    // iovecs' total.
    cvt_size(unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) })
}

/// Receives into `buf`; `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// Gather-sends `iov` without raising SIGPIPE.
///
/// # Safety
/// Each iovec must describe memory that is valid for reads of its `iov_len` bytes for
/// the duration of the call.
pub unsafe fn sendv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid; we set the iovec fields.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: msg points at the caller's iovecs, which describe readable memory.
    cvt_size(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// Shuts both directions of a socket down (the peer sees end of stream).
pub fn shutdown_both(fd: RawFd) {
    // SAFETY: plain system call on a descriptor we own; errors (not connected) are fine.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Shuts the sending direction down (the peer sees end of stream; reading goes on).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain system call on a descriptor we own; errors (not connected) are fine.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

//! The system interface of the provider: epoll through `rustix`, socket creation,
//! non-blocking connect and options through `socket2` (and `std`), and the two calls
//! that move payloads between sockets and registered memory, `readv` and `sendmsg`,
//! written here because they take raw iovecs over memory a peer may write: they are
//! `unsafe fn` with their contract stated.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use std::mem::MaybeUninit;

use rustix::event::{epoll, Timespec};
use rustix::net::RecvFlags;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

pub use rustix::event::epoll::EventFlags as Interest;

/// Readiness reported by [`Epoll::wait`].
#[derive(Debug, Clone, Copy)]
pub struct EpollEvent {
    /// The token the descriptor was registered with.
    pub token: u64,
    /// What it is ready for.
    pub flags: Interest,
}

/// Events taken from the kernel per `epoll_wait`.
const WAIT_BATCH: usize = 64;

/// An epoll instance (level-triggered; tokens are `u64`).
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Creates an epoll instance.
    pub fn new() -> io::Result<Epoll> {
        Ok(Epoll {
            fd: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    /// Adds `fd` with `interest`, reported with `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        Ok(epoll::add(
            &self.fd,
            fd,
            epoll::EventData::new_u64(token),
            interest,
        )?)
    }

    /// Changes the interest of a registered `fd`.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        Ok(epoll::modify(
            &self.fd,
            fd,
            epoll::EventData::new_u64(token),
            interest,
        )?)
    }

    /// Removes `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(epoll::delete(&self.fd, fd)?)
    }

    /// Waits up to `timeout_ms` (0: poll, negative: forever) and replaces the contents
    /// of `out` with at most 64 events.
    pub fn wait(&self, out: &mut Vec<EpollEvent>, timeout_ms: i32) -> io::Result<usize> {
        out.clear();
        let timeout = (timeout_ms >= 0).then(|| Timespec {
            tv_sec: i64::from(timeout_ms / 1000),
            tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
        });
        let mut raw = [MaybeUninit::<epoll::Event>::uninit(); WAIT_BATCH];
        match epoll::wait(&self.fd, &mut raw[..], timeout.as_ref()) {
            Ok((ready, _)) => {
                out.extend(ready.iter().map(|e| EpollEvent {
                    token: e.data.u64(),
                    flags: e.flags,
                }));
                Ok(out.len())
            }
            Err(rustix::io::Errno::INTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// The descriptor, for poll().
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Starts a non-blocking connect. Returns the socket and whether it is already
/// connected (else completion is signalled by writability).
pub fn connect_nonblocking(addr: &SocketAddr) -> io::Result<(TcpStream, bool)> {
    // socket2 creates it close-on-exec.
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    let done = match sock.connect(&(*addr).into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
        Err(e) => return Err(e),
    };
    Ok((sock.into(), done))
}

/// The pending error of a socket (SO_ERROR), e.g. the outcome of a connect.
pub fn take_socket_error(s: &TcpStream) -> io::Result<()> {
    match s.take_error()? {
        None => Ok(()),
        Some(e) => Err(e),
    }
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
        // Failure leaves the default, which only affects performance.
        let _ = SockRef::from(s).set_send_buffer_size(n);
    }
    Ok(())
}

/// Receives into `buf` without blocking; `Ok(0)` is end of stream.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let (n, _) = rustix::net::recv(fd, buf, RecvFlags::DONTWAIT)?;
    Ok(n)
}

/// Scatter-receives into `iov`; `Ok(0)` is end of stream.
///
/// # Safety
/// Each iovec must describe memory that is valid for writes of its `iov_len` bytes for
/// the duration of the call and that no reference (`&`/`&mut`) covers meanwhile.
pub unsafe fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: the caller upholds the contract above; the kernel writes at most the
    // iovecs' total.
    let r = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Gather-sends of at most this many bytes are copied into one buffer and sent with
/// `send(2)` instead of `sendmsg(2)`.
const SMALL_SEND: usize = 512;

/// Gather-sends `iov` without raising SIGPIPE.
///
/// # Safety
/// Each iovec must describe memory that is valid for reads of its `iov_len` bytes for
/// the duration of the call.
pub unsafe fn sendv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    if iov.len() > 1 && total <= SMALL_SEND {
        // A small message (a header and a short payload): one copy into a stack
        // buffer and a plain send(2), which spares the kernel importing the msghdr and
        // iovec array (measured: the cheaper call on the 8-byte ping-pong's path).
        // Not zeroed first: only the `at` bytes copied in are ever read.
        let mut buf = std::mem::MaybeUninit::<[u8; SMALL_SEND]>::uninit();
        let base = buf.as_mut_ptr().cast::<u8>();
        let mut at = 0;
        for v in iov {
            // SAFETY: the caller guarantees each iovec is readable for iov_len bytes;
            // at + iov_len <= total <= SMALL_SEND, so the copy stays inside buf, a
            // distinct stack allocation.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, base.add(at), v.iov_len)
            };
            at += v.iov_len;
        }
        // SAFETY: buf is valid for reads of `at` bytes.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                at,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        return if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        };
    }
    // SAFETY: an all-zero msghdr is valid; we set the iovec fields.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: msg points at the caller's iovecs, which describe readable memory.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Shuts both directions of a socket down (the peer sees end of stream); errors (not
/// connected) are fine.
pub fn shutdown_both(s: &TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Shuts the sending direction down (the peer sees end of stream; reading goes on).
pub fn shutdown_write(s: &TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
}

//! One device shared by every process on the host (issue 10, item 4), as kernel rxe is.
//!
//! Every process that opens the device on `ip` binds its own UDP socket on `ip:4791`
//! with `SO_REUSEPORT` (the kernel allows it only to sockets of the same user, and
//! refuses it when a program that did not ask for sharing, such as kernel rxe, holds
//! the port). Each process takes a *slot* 1..=255: the abstract Unix datagram socket
//! `@softroce/<ip>/<slot>`, whose bind is atomic and exclusive and which the kernel
//! releases when the process exits, so a slot can never leak. A process's QP numbers
//! carry its slot in bits 16..24 (`slot << 16 | n`), so the owner of any QPN is known
//! from the number alone.
//!
//! The kernel hands each arriving datagram to one socket of the group (by a hash of
//! its addresses and ports). The receiving process dispatches datagrams for its own
//! QPs as before and forwards the others, unchanged and with their source address, to
//! the owner's slot socket; the owner feeds them to the same receive path (ICRC, IP ID
//! window, source check, QP). No process is special: when one exits, the kernel
//! spreads its flows over the others, which forward as needed. Costs: a datagram for
//! another process crosses one more socket (a copy and a system call at each end);
//! the slot sockets accept only datagrams from processes of the same user
//! (`SCM_CREDENTIALS` checked on every datagram, others dropped and counted), so a
//! local user cannot forge a peer's source address through them. Limits: 255
//! processes per address, 65,536 QPs per process. QP1 (IB CM MADs) is handled by the
//! process that receives it.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

/// Bytes before the forwarded frame: the source IPv4 address and UDP port.
const HEADER: usize = 6;

/// This process's slot on one device address.
pub(crate) struct Share {
    ip: Ipv4Addr,
    slot: u8,
    sock: UnixDatagram,
    uid: u32,
}

fn slot_name(ip: Ipv4Addr, slot: u8) -> String {
    format!("softroce/{ip}/{slot}")
}

impl Share {
    /// Takes a free slot for `ip` (starting at a random one).
    pub(crate) fn open(ip: Ipv4Addr) -> io::Result<Share> {
        let start = rand::random::<u8>();
        for k in 0..255u16 {
            let slot = (((u16::from(start) + k) % 255) + 1) as u8;
            let addr = UnixAddr::from_abstract_name(slot_name(ip, slot).as_bytes())?;
            match UnixDatagram::bind_addr(&addr) {
                Ok(sock) => {
                    sock.set_nonblocking(true)?;
                    pass_credentials(sock.as_raw_fd())?;
                    // SAFETY: getuid cannot fail.
                    let uid = unsafe { libc::getuid() };
                    return Ok(Share {
                        ip,
                        slot,
                        sock,
                        uid,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("softroce: 255 processes already share the device on {ip}"),
        ))
    }

    /// This process's slot (the QPN bits 16..24).
    pub(crate) fn slot(&self) -> u8 {
        self.slot
    }

    /// The slot that owns `qpn` (0: none, e.g. QP1).
    pub(crate) fn owner(qpn: u32) -> u8 {
        (qpn >> 16) as u8
    }

    /// Forwards a datagram received from `src` to the process in `slot`. False when
    /// no process holds that slot (the QP does not exist) or its socket is full.
    pub(crate) fn forward(&self, slot: u8, src: SocketAddrV4, frame: &[u8]) -> bool {
        let Ok(addr) = UnixAddr::from_abstract_name(slot_name(self.ip, slot).as_bytes()) else {
            return false;
        };
        let mut msg = Vec::with_capacity(HEADER + frame.len());
        msg.extend_from_slice(&src.ip().octets());
        msg.extend_from_slice(&src.port().to_be_bytes());
        msg.extend_from_slice(frame);
        self.sock.send_to_addr(&msg, &addr).is_ok()
    }

    /// Receives one forwarded datagram into `buf`: its source and the frame's length,
    /// `Ok(None)` when there is none. A datagram from another user or without the
    /// header is dropped and reported as `Err(())` (the caller counts it).
    pub(crate) fn recv(&self, buf: &mut [u8]) -> Result<Option<(SocketAddrV4, usize)>, ()> {
        let (n, uid) = match recv_with_uid(self.sock.as_raw_fd(), buf) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(_) => return Ok(None),
        };
        if uid != Some(self.uid) || n < HEADER {
            return Err(());
        }
        let src = SocketAddrV4::new(
            Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]),
            u16::from_be_bytes([buf[4], buf[5]]),
        );
        buf.copy_within(HEADER..n, 0);
        Ok(Some((src, n - HEADER)))
    }

    /// The slot socket, to poll.
    pub(crate) fn raw(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`: it joins the sockets other
/// processes of this user bound there the same way, and fails with `AddrInUse` when
/// the port is held without sharing (kernel rxe, another program).
pub(crate) fn bind_reuseport(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nothing else owns; the UdpSocket closes it.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: fd is a valid socket; the option value and the address live for the
    // calls, with their sizes stated.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(sock)
}

fn pass_credentials(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: fd is a valid socket; the option value is a c_int that lives for the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One non-blocking `recvmsg` with the sender's credentials (`SO_PASSCRED`).
fn recv_with_uid(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, Option<u32>)>> {
    // Room for one SCM_CREDENTIALS control message, u64-aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: fd is a valid socket; msg points at live buffers of the stated lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    let n = n as usize;
    if n > buf.len() || msg.msg_flags & libc::MSG_TRUNC != 0 {
        // Longer than any frame: not ours to look at.
        return Ok(Some((0, None)));
    }
    let mut uid = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
    // msg_controllen; the credentials are read unaligned from inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                uid = Some(cred.uid);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((n, uid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exclusive_and_forwarding_keeps_the_source() {
        let ip = Ipv4Addr::new(127, 200, 201, rand::random::<u8>() | 1);
        let a = Share::open(ip).unwrap();
        let b = Share::open(ip).unwrap();
        assert_ne!(a.slot(), b.slot());
        assert!((1..=255).contains(&a.slot()));
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 0xC001);
        assert!(a.forward(b.slot(), src, b"frame bytes"));
        let mut buf = [0u8; 64];
        // Unix datagrams are queued at the receiver by the send itself.
        let (from, n) = b.recv(&mut buf).unwrap().expect("the forwarded frame");
        assert_eq!(from, src);
        assert_eq!(&buf[..n], b"frame bytes");
        // A slot nobody holds: not delivered.
        let free = (1..=255u8)
            .find(|&s| s != a.slot() && s != b.slot())
            .unwrap();
        assert!(!a.forward(free, src, b"x"));
        // A datagram without the header is refused.
        let addr = UnixAddr::from_abstract_name(slot_name(ip, b.slot()).as_bytes()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"abc", &addr)
            .unwrap();
        assert_eq!(b.recv(&mut buf), Err(()));
        assert_eq!(b.recv(&mut buf), Ok(None));
        // From another user (run as root: python3 as nobody), with a valid header:
        // refused, so a local user cannot pass forged frames in.
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::process::CommandExt;
            let name = slot_name(ip, b.slot());
            let script = format!(
                "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
                 s.sendto(bytes([10, 1, 2, 3, 0xC0, 0x01]) + b'forged', b'\\0{name}')"
            );
            match std::process::Command::new("python3")
                .args(["-c", &script])
                .uid(65534)
                .gid(65534)
                .status()
            {
                Ok(st) if st.success() => {
                    assert_eq!(b.recv(&mut buf), Err(()), "a frame from another user");
                }
                other => eprintln!("SKIP the other-user check: python3 as nobody: {other:?}"),
            }
        }
        // The slot is released with its socket.
        let s = b.slot();
        drop(b);
        let addr = UnixAddr::from_abstract_name(slot_name(ip, s).as_bytes()).unwrap();
        assert!(UnixDatagram::bind_addr(&addr).is_ok());
        assert_eq!(Share::owner(u32::from(s) << 16 | 0x1234), s);
    }
}

//! The few system calls the driver needs beyond std: an unconnected UDP socket with
//! `IP_PMTUDISC_DO`, batched `recvmmsg`/`sendmmsg` with UDP segmentation offload
//! (`UDP_SEGMENT`, GSO) on send and UDP receive offload (`UDP_GRO`) on receive, an
//! eventfd and `ppoll`.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

/// Datagrams (or GRO super-datagrams) per `recvmmsg` call, and the frames a QP's
/// output is gathered into before it is sent.
pub(crate) const BATCH: usize = 32;
/// Receive buffer per `recvmmsg` slot: a whole GRO super-datagram (the UDP payload
/// limit; smaller buffers would truncate one).
const RX_SLOT: usize = 65_536;
/// Largest UDP payload of one IPv4 datagram, GSO super-datagrams included.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Most segments in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64, 128 in
/// newer kernels).
pub(crate) const GSO_MAX_SEGS: usize = 64;
/// `SOL_UDP` options (linux/udp.h): segmentation offload on send, receive offload.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

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
/// IP ID 0 (`IP_PMTUDISC_DO`, what the ICRC assumes), large buffers, `UDP_GRO` (a
/// GSO send of several packets arrives as one super-datagram, split again by
/// [`RecvBatch`]) where the kernel has it.
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
    // Without it (kernels before 5.0) datagrams arrive one by one, as sent.
    let _ = setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1);
    Ok(sock)
}

/// Whether the kernel offers UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18):
/// the socket option reads back.
pub(crate) fn gso_supported(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are live locals of the sizes declared.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
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

/// Receive buffers for one `recvmmsg` batch, and the packets found in it: a GRO
/// super-datagram (several packets of one sender that the kernel kept together, with
/// their segment size in a `UDP_GRO` control message) is split back into its packets.
pub(crate) struct RecvBatch {
    /// [`BATCH`] slots of [`RX_SLOT`] bytes (zeroed lazily by the allocator: only the
    /// pages datagrams land in become resident).
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_in>,
    ctrl: Vec<CmsgBuf>,
    /// Packets of the last batch: slot, offset in the slot, length.
    pkts: Vec<(u32, u32, u32)>,
    /// Datagrams the last `recvmmsg` returned.
    msgs: usize,
    /// Datagrams of the last batch truncated (larger than a slot: none a RoCEv2
    /// peer sends) and dropped.
    pub(crate) truncated: usize,
    /// Packets of the last batch that came in GRO super-datagrams.
    pub(crate) gro: usize,
}

/// Space for one control message with an `int` (`CMSG_SPACE(4)` is 24 on 64-bit),
/// aligned as a `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

impl RecvBatch {
    pub(crate) fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * RX_SLOT],
            addrs: vec![sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
            ctrl: vec![CmsgBuf([0; 32]); BATCH],
            pkts: Vec::with_capacity(BATCH),
            msgs: 0,
            truncated: 0,
            gro: 0,
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; returns how many packets
    /// they held ([`Self::get`]). [`Self::full`] says whether there may be more.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        // On the stack: this runs on every poll, mostly to find nothing.
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: slot i lies within bufs (BATCH * RX_SLOT bytes).
            iov_base: unsafe { base.add(i * RX_SLOT) }.cast(),
            iov_len: RX_SLOT,
        });
        let mut msgs: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
            m
        });
        self.pkts.clear();
        self.msgs = 0;
        self.truncated = 0;
        self.gro = 0;
        // SAFETY: every pointer in msgs refers to buffers owned by self or to the
        // local iovs array, all alive for the call and sized as declared.
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
        self.msgs = n;
        for (i, m) in msgs.iter().enumerate().take(n) {
            let len = (m.msg_len as usize).min(RX_SLOT);
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.truncated += 1;
                continue;
            }
            let seg = gro_segment_size(&m.msg_hdr).filter(|&g| g > 0 && g < len);
            match seg {
                None => self.pkts.push((i as u32, 0, len as u32)),
                Some(g) => {
                    self.gro += len.div_ceil(g);
                    let mut off = 0;
                    while off < len {
                        let l = g.min(len - off);
                        self.pkts.push((i as u32, off as u32, l as u32));
                        off += l;
                    }
                }
            }
        }
        Ok(self.pkts.len())
    }

    /// Whether the last `recvmmsg` filled every slot (more may be waiting).
    pub(crate) fn full(&self) -> bool {
        self.msgs >= BATCH
    }

    /// Packet `i` of the last batch: source address and bytes.
    pub(crate) fn get(&self, i: usize) -> (SocketAddrV4, &[u8]) {
        let (slot, off, len) = self.pkts[i];
        let (slot, off, len) = (slot as usize, off as usize, len as usize);
        let a = &self.addrs[slot];
        let src = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        let start = slot * RX_SLOT + off;
        (src, &self.bufs[start..start + len])
    }
}

/// The segment size of a GRO super-datagram, from its `UDP_GRO` control message.
fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    if h.msg_controllen == 0 || h.msg_control.is_null() {
        return None;
    }
    // SAFETY: h was filled by recvmmsg: msg_control/msg_controllen describe the
    // control messages the kernel wrote into our CmsgBuf, which the CMSG macros walk
    // within those bounds; the data of a UDP_GRO message is an int (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
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

/// Splits `frames` into GSO groups, appended to `groups` as (first, count): runs of
/// frames to one destination of one length (the last of a run may be shorter), at
/// most [`GSO_MAX_SEGS`] and [`MAX_UDP_PAYLOAD`] bytes each. A group of one is an
/// ordinary datagram.
pub(crate) fn gso_groups(frames: &[(SocketAddrV4, Vec<u8>)], groups: &mut Vec<(usize, usize)>) {
    let mut i = 0;
    while i < frames.len() {
        let (dst, first) = &frames[i];
        let seg = first.len().max(1);
        let max = GSO_MAX_SEGS.min(MAX_UDP_PAYLOAD / seg).max(1);
        let mut total = first.len();
        let mut j = i + 1;
        while j < frames.len() && j - i < max {
            let (d, f) = &frames[j];
            if d != dst || f.is_empty() || f.len() > seg || total + f.len() > MAX_UDP_PAYLOAD {
                break;
            }
            total += f.len();
            j += 1;
            if f.len() < seg {
                break;
            }
        }
        groups.push((i, j - i));
        i = j;
    }
}

/// What [`send_groups`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupsSent {
    /// Groups handed to the kernel, in order (or skipped after a per-datagram
    /// error: their frames are lost, RC retransmits them).
    pub(crate) groups: usize,
    /// Frames in those groups that the kernel took.
    pub(crate) frames: usize,
    /// The kernel refused segmentation offload for the group at `groups` (EINVAL,
    /// EIO, ENOTSUP...: a path without it); nothing from there on was sent.
    pub(crate) gso_refused: bool,
}

/// Sends `frames` as `groups` (from [`gso_groups`]): each group of several frames as
/// one `sendmsg` with a `UDP_SEGMENT` control message (segment size = the group's
/// first frame), which the kernel splits into datagrams numbered with IP IDs 0, 1, 2,
/// ... from this unconnected DF socket (the caller built each frame's ICRC for its
/// ID), and as few `sendmmsg` calls as possible. A full socket buffer (`EAGAIN`) stops
/// (the rest is lost, as a full NIC queue; RC retransmits).
pub(crate) fn send_groups(
    fd: RawFd,
    frames: &[(SocketAddrV4, Vec<u8>)],
    groups: &[(usize, usize)],
) -> GroupsSent {
    let mut done = GroupsSent {
        groups: 0,
        frames: 0,
        gso_refused: false,
    };
    for chunk in groups.chunks(BATCH) {
        let mut addrs: [libc::sockaddr_in; BATCH] =
            [sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH];
        let mut ctrl = [CmsgBuf([0; 32]); BATCH];
        let nframes: usize = chunk.iter().map(|g| g.1).sum();
        let first = chunk.first().map_or(0, |g| g.0);
        let iovs: Vec<libc::iovec> = frames[first..first + nframes]
            .iter()
            .map(|(_, b)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(chunk.len());
        for (k, &(start, count)) in chunk.iter().enumerate() {
            addrs[k] = sockaddr_in(frames[start].0);
            // SAFETY: plain old data; all-zero is valid.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (&mut addrs[k] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = iovs[start - first..].as_ptr() as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = count as _;
            if count > 1 {
                let seg = frames[start].1.len() as u16;
                m.msg_hdr.msg_control = ctrl[k].0.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                m.msg_hdr.msg_controllen =
                    unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
                // SAFETY: msg_control points at ctrl[k] (32 bytes, cmsghdr-aligned),
                // which holds CMSG_SPACE(2) = 24 bytes: the header and the u16 fit.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
            msgs.push(m);
        }
        let mut off = 0;
        let mut tries = 0;
        while off < msgs.len() && tries < 8 {
            tries += 1;
            // SAFETY: msgs[off..] point into addrs, ctrl, iovs and frames, all alive
            // for the call.
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
                    io::ErrorKind::WouldBlock => return done,
                    _ if chunk[off].1 > 1
                        && matches!(
                            e.raw_os_error(),
                            Some(
                                libc::EINVAL
                                    | libc::EIO
                                    | libc::EOPNOTSUPP
                                    | libc::ENOPROTOOPT
                                    | libc::EMSGSIZE
                            )
                        ) =>
                    {
                        done.gso_refused = true;
                        return done;
                    }
                    // e.g. ECONNREFUSED from an ICMP error of an earlier datagram:
                    // skip this one.
                    _ => {
                        off += 1;
                        done.groups += 1;
                        continue;
                    }
                }
            }
            for g in &chunk[off..off + n as usize] {
                done.frames += g.1;
            }
            done.groups += n as usize;
            off += n as usize;
        }
        if off < msgs.len() {
            return done;
        }
    }
    done
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(spec: &[(u8, usize)]) -> Vec<(SocketAddrV4, Vec<u8>)> {
        spec.iter()
            .map(|&(d, len)| {
                (
                    SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, d), 4791),
                    vec![0; len],
                )
            })
            .collect()
    }

    #[test]
    fn gso_groups_are_runs_of_one_peer_and_length() {
        let mut g = Vec::new();
        // A write: FIRST (with RETH, longer: the next, shorter, ends its group),
        // MIDDLEs, a shorter LAST, then an ACK to another peer.
        let f = frames(&[
            (1, 4128),
            (1, 4112),
            (1, 4112),
            (1, 4112),
            (1, 100),
            (2, 20),
        ]);
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 2), (2, 3), (5, 1)]);
        // A shorter frame ends a group; a longer one starts the next.
        g.clear();
        let f = frames(&[(1, 1000), (1, 1000), (1, 500), (1, 1000), (1, 1000)]);
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 3), (3, 2)]);
        // At most MAX_UDP_PAYLOAD bytes per group: 15 packets of 4112.
        g.clear();
        let f = frames(&[(1, 4112); 40]);
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 15), (15, 15), (30, 10)]);
        // At most GSO_MAX_SEGS per group.
        g.clear();
        let f = frames(&[(1, 40); 150]);
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 64), (64, 64), (128, 22)]);
        // Empty frames never join a group.
        g.clear();
        let f = frames(&[(1, 0), (1, 0)]);
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn gso_send_arrives_as_one_gro_datagram_or_as_segments() {
        let rx = bind_udp(Ipv4Addr::LOCALHOST, 0).unwrap();
        let tx = bind_udp(Ipv4Addr::LOCALHOST, 0).unwrap();
        if !gso_supported(tx.as_raw_fd()) {
            println!("SKIP: no UDP_SEGMENT in this kernel");
            return;
        }
        let dst = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let mut f: Vec<(SocketAddrV4, Vec<u8>)> = (0..5u8)
            .map(|i| (dst, vec![i; if i == 4 { 300 } else { 1000 }]))
            .collect();
        f.push((dst, vec![9; 1000]));
        let mut g = Vec::new();
        gso_groups(&f, &mut g);
        assert_eq!(g, vec![(0, 5), (5, 1)]);
        let r = send_groups(tx.as_raw_fd(), &f, &g);
        assert_eq!(
            r,
            GroupsSent {
                groups: 2,
                frames: 6,
                gso_refused: false
            }
        );
        let mut b = RecvBatch::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut gro = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < 6 && std::time::Instant::now() < deadline {
            let n = b.recv(rx.as_raw_fd()).unwrap_or(0);
            gro += b.gro;
            for i in 0..n {
                got.push(b.get(i).1.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = f.iter().map(|x| x.1.clone()).collect();
        assert_eq!(got, want, "the packets, split back at their boundaries");
        // Loopback hands a GRO socket the GSO send whole.
        assert_eq!(gro, 5);
    }
}

//! The RoCEv2 invariant CRC, computed exactly as Linux rdma_rxe (`rxe_icrc.c`) and
//! scapy's `contrib.roce` do.
//!
//! CRC-32 (reflected, polynomial 0xEDB88320, zlib conventions) over
//!
//! ```text
//! FF FF FF FF FF FF FF FF            stand-in for the IB LRH
//! IPv4 header   TOS=0xFF, TTL=0xFF, header checksum=0xFFFF (the rest as sent,
//!               including total length, ID and flags/fragment offset)
//! UDP header    checksum=0xFFFF
//! BTH           byte 4 (FECN/BECN/resv6) = 0xFF
//! everything after the BTH up to (not including) the ICRC
//! ```
//!
//! The result is stored in the last four bytes of the packet, least significant byte
//! first. `crc32fast` provides the CRC-32 itself: it is the standard zlib CRC with a
//! table-free SIMD path, which matters because every packet is checksummed twice.

use std::net::Ipv4Addr;

use super::{Error, Result};

/// Length of the ICRC trailer.
pub const ICRC_LEN: usize = 4;

/// What the ICRC covers besides the UDP payload: the IPv4 and UDP header fields that
/// are not masked.
///
/// A receiver on a plain UDP socket cannot see the IP ID and DF bit. [`Self::rxe`]
/// makes a context with ID 0 and DF set: what a user-space sender on an unconnected
/// socket with `IP_PMTUDISC_DO` (this crate) produces. Linux rdma_rxe also sets DF but
/// numbers its IDs; a receiver checks its packets with [`Self::solve_ip_id`] and
/// [`IpIdWindow`] (see the crate docs, "Receiving rxe's packets").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcrcContext {
    /// IPv4 source address.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination address.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port (4791 for RoCEv2).
    pub dst_port: u16,
    /// IPv4 identification field.
    pub ip_id: u16,
    /// IPv4 "don't fragment" flag.
    pub dont_fragment: bool,
}

impl IcrcContext {
    /// Context with rxe's IP defaults: ID 0 and DF set.
    pub fn rxe(src_ip: Ipv4Addr, dst_ip: Ipv4Addr, src_port: u16, dst_port: u16) -> Self {
        Self {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            ip_id: 0,
            dont_fragment: true,
        }
    }

    /// Pseudo IPv4 and UDP headers for a UDP payload of `roce_len` bytes, with the
    /// masked fields already set to ones.
    fn pseudo_headers(&self, roce_len: usize) -> Result<([u8; 20], [u8; 8])> {
        let udp_len =
            u16::try_from(roce_len + 8).map_err(|_| Error::Malformed("packet too long"))?;
        let ip_len =
            u16::try_from(roce_len + 28).map_err(|_| Error::Malformed("packet too long"))?;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        ip[6] = if self.dont_fragment { 0x40 } else { 0 };
        ip[9] = 17;
        ip[12..16].copy_from_slice(&self.src_ip.octets());
        ip[16..20].copy_from_slice(&self.dst_ip.octets());
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        Ok((ip, udp))
    }

    /// Computes the ICRC of `roce` (a whole UDP payload from the BTH on, including its
    /// four ICRC bytes, whose value is ignored).
    pub fn compute(&self, roce: &[u8]) -> Result<u32> {
        let (ip, udp) = self.pseudo_headers(roce.len())?;
        compute_with_headers(&ip, &udp, roce)
    }

    /// Writes the ICRC into the last four bytes of `roce`.
    pub fn fill(&self, roce: &mut [u8]) -> Result<()> {
        let crc = self.compute(roce)?;
        let n = roce.len();
        roce[n - ICRC_LEN..].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Checks the ICRC stored at the end of `roce`.
    pub fn verify(&self, roce: &[u8]) -> Result<()> {
        let computed = self.compute(roce)?;
        check(roce, computed)
    }
}

impl IcrcContext {
    /// The IP ID for which the ICRC stored at the end of `roce` verifies, the other
    /// fields as in `self` (whose `ip_id` is ignored): what a receiver on a plain UDP
    /// socket, which never sees the IP header, uses to check a packet of a sender
    /// that numbers its IP IDs (Linux rdma_rxe does, and covers the ID with the ICRC).
    ///
    /// The CRC is affine in the 16 ID bits: `crc(id) = crc(0) ^ L(id)` with `L`
    /// linear and injective (a CRC-32 detects every burst of up to 32 bits). So
    /// `stored ^ crc(0)` is run backwards over the bytes that follow the ID and then
    /// over the two ID bytes; an ID exists only when what remains is zero. The cost is
    /// one CRC (as [`Self::verify`]) plus at most 16 32×32 bit-matrix products.
    ///
    /// What it costs in detection: a corrupted packet passes when *some* ID makes its
    /// ICRC verify, which happens with probability 2^-16 instead of 2^-32 for random
    /// corruption. A caller that also requires the ID to be plausible for the sender
    /// ([`IpIdWindow`]: within a window of W values after the last one seen) is back
    /// to about W·2^-32.
    pub fn solve_ip_id(&self, roce: &[u8]) -> Result<u16> {
        let zero = IcrcContext { ip_id: 0, ..*self };
        let computed = zero.compute(roce)?;
        let stored = stored(roce)?;
        let delta = stored ^ computed;
        if delta == 0 {
            return Ok(0);
        }
        // Bytes the CRC processes after the ID: the rest of the 20-byte IPv4 header
        // (14), the UDP header (8) and the packet up to the ICRC.
        let after = 14 + 8 + roce.len() - ICRC_LEN;
        let at_id = unshift_zero_bytes(delta, after);
        match id_from_register(at_id) {
            Some(id) => Ok(id),
            None => Err(Error::BadIcrc { stored, computed }),
        }
    }
}

/// The reflected CRC-32 table (polynomial 0xEDB88320), one byte at a time.
const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// `INV_TOP[TABLE[i] >> 24] == i`: the top bytes of the table are a permutation, which
/// is what lets the CRC register be run backwards.
const INV_TOP: [u8; 256] = {
    let mut inv = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        inv[(TABLE[i] >> 24) as usize] = i as u8;
        i += 1;
    }
    inv
};

/// One step of the (linear, zero-initialised) CRC register over a zero byte, undone.
fn unstep_zero(s: u32) -> u32 {
    let idx = INV_TOP[(s >> 24) as usize];
    ((s ^ TABLE[idx as usize]) << 8) | u32::from(idx)
}

/// A 32×32 matrix over GF(2): column `j` is the image of bit `j`.
type Matrix = [u32; 32];

fn apply(m: &Matrix, mut v: u32) -> u32 {
    let mut r = 0;
    while v != 0 {
        r ^= m[v.trailing_zeros() as usize];
        v &= v - 1;
    }
    r
}

/// The matrices of running the register over 2^k zero bytes, k = 0..17, one step
/// being `step` (a zero byte, forwards or backwards).
fn zero_powers(step: fn(u32) -> u32) -> [Matrix; 17] {
    let mut p = [[0u32; 32]; 17];
    for (j, col) in p[0].iter_mut().enumerate() {
        *col = step(1 << j);
    }
    for k in 1..17 {
        let prev = p[k - 1];
        for (col, v) in p[k].iter_mut().zip(prev) {
            *col = apply(&prev, v);
        }
    }
    p
}

/// Applies `p` (from [`zero_powers`]) for `n` zero bytes (`n` < 2^17).
fn over_zero_bytes(p: &[Matrix; 17], mut v: u32, n: usize) -> u32 {
    for (k, m) in p.iter().enumerate() {
        if n >> k & 1 != 0 {
            v = apply(m, v);
        }
    }
    v
}

/// `powers()[k]`: running the register backwards over 2^k zero bytes.
fn powers() -> &'static [Matrix; 17] {
    static P: std::sync::OnceLock<[Matrix; 17]> = std::sync::OnceLock::new();
    P.get_or_init(|| zero_powers(unstep_zero))
}

/// Runs the linear CRC register backwards over `n` zero bytes (`n` < 2^17).
fn unshift_zero_bytes(v: u32, n: usize) -> u32 {
    over_zero_bytes(powers(), v, n)
}

/// The 16-bit value whose two bytes (big-endian), fed to a zeroed register, leave
/// `s` in it, if there is one.
fn id_from_register(s: u32) -> Option<u16> {
    let idx = INV_TOP[(s >> 24) as usize];
    let s1_shifted = s ^ TABLE[idx as usize];
    let hi = INV_TOP[((s1_shifted >> 16) & 0xFF) as usize];
    if TABLE[hi as usize] >> 8 != s1_shifted {
        return None;
    }
    let lo = idx ^ (TABLE[hi as usize] & 0xFF) as u8;
    Some(u16::from_be_bytes([hi, lo]))
}

/// One step of the linear CRC register over a zero byte, forward.
fn step_zero(s: u32) -> u32 {
    (s >> 8) ^ TABLE[(s & 0xFF) as usize]
}

/// `forward_powers()[k]`: running the register forwards over 2^k zero bytes.
fn forward_powers() -> &'static [Matrix; 17] {
    static P: std::sync::OnceLock<[Matrix; 17]> = std::sync::OnceLock::new();
    P.get_or_init(|| zero_powers(step_zero))
}

/// Runs the linear CRC register forwards over `n` zero bytes (`n` < 2^17).
fn shift_zero_bytes(v: u32, n: usize) -> u32 {
    over_zero_bytes(forward_powers(), v, n)
}

/// How the ICRC of a packet of one length changes with its IP ID, for a sender that
/// knows which ID each packet will carry: a UDP segmentation offload (GSO) send of
/// `n` packets from an unconnected socket with DF leaves with IDs 0, 1, ..., n-1, so
/// packet `i` is built with ID 0 and its ICRC moved to ID `i` with [`Self::apply`].
///
/// The CRC is affine in the 16 ID bits (see [`IcrcContext::solve_ip_id`]):
/// `crc(id) = crc(0) ^ delta(id)`, `delta` linear, so it is the XOR of one column
/// per set ID bit; the 16 columns depend only on the packet length and cost about a
/// microsecond to compute, after which each packet costs a few XORs instead of a
/// second CRC over its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpIdDelta {
    roce_len: usize,
    cols: [u32; 16],
}

impl IpIdDelta {
    /// The columns for packets (BTH through ICRC) of `roce_len` bytes.
    pub fn new(roce_len: usize) -> Self {
        // Bytes after the ID: rest of the IPv4 header (14), UDP header (8), the
        // packet up to the ICRC.
        let after = 14 + 8 + roce_len.saturating_sub(ICRC_LEN);
        let mut cols = [0u32; 16];
        for (bit, col) in cols.iter_mut().enumerate() {
            let [hi, lo] = (1u16 << bit).to_be_bytes();
            let mut s = 0u32;
            for b in [hi, lo] {
                s = (s >> 8) ^ TABLE[((s ^ u32::from(b)) & 0xFF) as usize];
            }
            *col = shift_zero_bytes(s, after);
        }
        IpIdDelta { roce_len, cols }
    }

    /// The packet length these columns are for.
    pub fn roce_len(&self) -> usize {
        self.roce_len
    }

    /// `crc(id) ^ crc(0)` for a packet of this length.
    pub fn delta(&self, id: u16) -> u32 {
        let mut v = id;
        let mut r = 0;
        while v != 0 {
            r ^= self.cols[v.trailing_zeros() as usize];
            v &= v - 1;
        }
        r
    }

    /// Moves the ICRC stored at the end of `roce` (of this length) from one IP ID to
    /// another: `from` 0 and `to` i for GSO segment i, and back.
    pub fn apply(&self, roce: &mut [u8], from: u16, to: u16) {
        let n = roce.len();
        if n != self.roce_len || n < ICRC_LEN {
            return;
        }
        let d = self.delta(from ^ to);
        let mut b = [0u8; 4];
        b.copy_from_slice(&roce[n - ICRC_LEN..]);
        let v = u32::from_le_bytes(b) ^ d;
        roce[n - ICRC_LEN..].copy_from_slice(&v.to_le_bytes());
    }
}

/// Whether an IP ID is plausible for one sender, given the last ones accepted from it.
///
/// Linux numbers the IDs of DF packets per (source, destination, protocol) bucket:
/// +1 per packet, plus, when the bucket has been idle, a random jump of up to the
/// jiffies that passed (`ip_idents_reserve`). So an ID is accepted when it is at most
/// [`IP_ID_BEHIND`] behind the newest accepted one (reordering), or at most
/// [`IP_ID_AHEAD`] plus one per millisecond since then ahead of it (lost packets,
/// packets to other QPs, the idle jump). The first ID of a sender is accepted as it
/// comes. A sender that always sends ID 0 (this crate, any unconnected-socket sender)
/// stays at 0 and is held to the same window.
///
/// Detection cost: a randomly corrupted packet passes [`IcrcContext::solve_ip_id`] with
/// probability 2^-16 and then lands in the window with probability about
/// (W = behind + ahead)/2^16, so about W·2^-32 ≈ 2^-20 for a busy sender (2^-16 for
/// the first packet of a sender, and growing towards it after minutes of silence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpIdWindow {
    last: Option<(u16, u64)>,
}

/// How far behind the newest accepted ID an ID may be ([`IpIdWindow`]).
pub const IP_ID_BEHIND: u16 = 256;
/// How far ahead of the newest accepted ID an ID may be, plus one per millisecond
/// since it ([`IpIdWindow`]).
pub const IP_ID_AHEAD: u32 = 4096;

impl IpIdWindow {
    /// A window that has seen nothing (accepts the first ID).
    pub const fn new() -> Self {
        Self { last: None }
    }

    /// Judges `id` received at `now_ns` (any monotonic clock in nanoseconds) and, if
    /// it is accepted and newer, moves the window.
    pub fn accept(&mut self, id: u16, now_ns: u64) -> bool {
        let Some((last, at)) = self.last else {
            self.last = Some((id, now_ns));
            return true;
        };
        let ahead = id.wrapping_sub(last);
        if ahead == 0 {
            self.last = Some((id, now_ns));
            return true;
        }
        if last.wrapping_sub(id) <= IP_ID_BEHIND {
            return true;
        }
        let ms = now_ns.saturating_sub(at) / 1_000_000;
        let limit = u64::from(IP_ID_AHEAD) + ms;
        if u64::from(ahead) <= limit {
            self.last = Some((id, now_ns));
            true
        } else {
            false
        }
    }
}

/// The ICRC stored in the last four bytes of a packet.
pub fn stored(roce: &[u8]) -> Result<u32> {
    let n = roce.len();
    if n < 12 + ICRC_LEN {
        return Err(Error::Truncated);
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&roce[n - ICRC_LEN..]);
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn check(roce: &[u8], computed: u32) -> Result<()> {
    let stored = stored(roce)?;
    if stored == computed {
        Ok(())
    } else {
        Err(Error::BadIcrc { stored, computed })
    }
}

/// Computes the ICRC from the IPv4 header as received (any length, options included),
/// the 8-byte UDP header and the UDP payload (BTH onward, ICRC included). The masked
/// fields are masked here; the caller passes the headers unchanged.
pub fn compute_with_headers(ip_header: &[u8], udp_header: &[u8], roce: &[u8]) -> Result<u32> {
    if ip_header.len() < 20 || udp_header.len() != 8 {
        return Err(Error::Truncated);
    }
    if roce.len() < 12 + ICRC_LEN {
        return Err(Error::Truncated);
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&[0xFF; 8]);
    let mut ip_fixed = [0u8; 20];
    ip_fixed.copy_from_slice(&ip_header[..20]);
    ip_fixed[1] = 0xFF; // TOS
    ip_fixed[8] = 0xFF; // TTL
    ip_fixed[10] = 0xFF; // header checksum
    ip_fixed[11] = 0xFF;
    h.update(&ip_fixed);
    h.update(&ip_header[20..]);
    let mut udp = [0u8; 8];
    udp.copy_from_slice(udp_header);
    udp[6] = 0xFF; // UDP checksum
    udp[7] = 0xFF;
    h.update(&udp);
    let mut bth = [0u8; 12];
    bth.copy_from_slice(&roce[..12]);
    bth[4] = 0xFF; // FECN, BECN, resv6
    h.update(&bth);
    h.update(&roce[12..roce.len() - ICRC_LEN]);
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> Vec<u8> {
        let mut p = vec![0x04, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0x80, 0, 0, 1];
        p.extend_from_slice(b"abcd");
        p.extend_from_slice(&[0; 4]);
        p
    }

    #[test]
    fn fill_then_verify_and_masking() {
        let ctx = IcrcContext::rxe(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            0xC001,
            4791,
        );
        let mut p = packet();
        ctx.fill(&mut p).unwrap();
        ctx.verify(&p).unwrap();
        // FECN/BECN are masked: flipping them keeps the ICRC valid.
        p[4] = 0xC0;
        ctx.verify(&p).unwrap();
        // Anything else is covered.
        p[5] = 1;
        assert!(matches!(ctx.verify(&p), Err(Error::BadIcrc { .. })));
        p[5] = 0;
        let other_id = IcrcContext { ip_id: 1, ..ctx };
        assert!(other_id.verify(&p).is_err());
        let no_df = IcrcContext {
            dont_fragment: false,
            ..ctx
        };
        assert!(no_df.verify(&p).is_err());
    }

    #[test]
    fn solve_ip_id_finds_every_id_and_refuses_corruption() {
        let base = IcrcContext::rxe(
            Ipv4Addr::new(192, 168, 100, 2),
            Ipv4Addr::new(192, 168, 100, 1),
            0xC0DE,
            4791,
        );
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for len in [0usize, 1, 4, 63, 1024, 4096] {
            let mut p = vec![0x04, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0x80, 0, 0, 1];
            p.extend((0..len).map(|i| (i * 7) as u8));
            p.extend_from_slice(&[0; 4]);
            for id in [0u16, 1, 2, 0x00FF, 0x0100, 0x8000, 0xFFFF, next() as u16] {
                let ctx = IcrcContext { ip_id: id, ..base };
                ctx.fill(&mut p).unwrap();
                assert_eq!(base.solve_ip_id(&p), Ok(id), "len {len} id {id:#x}");
                // A flipped bit anywhere covered: some ID may still fit (2^-16), but
                // not the right one, and almost never any.
                let (mut refused, mut tried) = (0, 0);
                for _ in 0..64 {
                    let mut q = p.clone();
                    let at = (next() as usize) % (q.len() - 4);
                    if at == 4 {
                        continue; // FECN/BECN byte: masked
                    }
                    tried += 1;
                    q[at] ^= 1 << (next() % 8);
                    match base.solve_ip_id(&q) {
                        Ok(got) => assert_ne!(got, id),
                        Err(Error::BadIcrc { .. }) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                assert!(
                    refused + 2 >= tried,
                    "len {len} id {id:#x}: {refused}/{tried} refused"
                );
            }
        }
        // Without DF (not what rxe sends) no ID fits the header the receiver assumes.
        let mut p = packet();
        IcrcContext {
            ip_id: 7,
            dont_fragment: false,
            ..base
        }
        .fill(&mut p)
        .unwrap();
        assert!(base.solve_ip_id(&p).is_err());
    }

    #[test]
    fn ip_id_delta_moves_the_icrc_to_another_id() {
        let base = IcrcContext::rxe(
            Ipv4Addr::new(127, 3, 4, 5),
            Ipv4Addr::new(127, 6, 7, 8),
            4791,
            4791,
        );
        for len in [0usize, 4, 20, 1024, 4096, 4112] {
            let mut p = vec![0x0A, 0, 0xFF, 0xFF, 0, 0, 0, 0x11, 0x80, 0, 0, 1];
            p.extend((0..len).map(|i| (i * 13 + 1) as u8));
            p.extend_from_slice(&[0; 4]);
            let d = IpIdDelta::new(p.len());
            assert_eq!(d.roce_len(), p.len());
            for id in [1u16, 2, 3, 15, 63, 64, 0x1234, 0xFFFF] {
                base.fill(&mut p).unwrap();
                let at_zero = p.clone();
                d.apply(&mut p, 0, id);
                IcrcContext { ip_id: id, ..base }.verify(&p).unwrap();
                assert_eq!(base.solve_ip_id(&p), Ok(id), "len {len} id {id}");
                assert!(base.verify(&p).is_err());
                // Back again (GSO refused: sent one by one with ID 0).
                d.apply(&mut p, id, 0);
                assert_eq!(p, at_zero);
            }
            // A packet of another length is left alone.
            let mut q = p.clone();
            q.push(0);
            let before = q.clone();
            d.apply(&mut q, 0, 5);
            assert_eq!(q, before);
        }
    }

    #[test]
    fn ip_id_window() {
        let mut w = IpIdWindow::new();
        assert!(w.accept(0xFFF0, 0)); // first: anything
        assert!(w.accept(0xFFF1, 10));
        assert!(w.accept(0x0005, 20)); // wraps forward
        assert!(w.accept(0xFFF8, 30)); // a little behind (reordered)
        assert!(!w.accept(0x0005 + IP_ID_AHEAD as u16 + 1, 40)); // too far ahead
        assert!(!w.accept(0x0005u16.wrapping_sub(IP_ID_BEHIND + 1), 50)); // too far behind
                                                                          // After a second of silence the window has grown by ~1000.
        assert!(w.accept(0x0005 + IP_ID_AHEAD as u16 + 900, 1_000_000_000));
        // ID-0 senders stay at 0.
        let mut z = IpIdWindow::new();
        for t in 0..10 {
            assert!(z.accept(0, t));
        }
        assert!(!z.accept(0x8000, 11));
    }

    #[test]
    fn short_packets_are_errors() {
        let ctx = IcrcContext::rxe(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 4791);
        assert_eq!(ctx.compute(&[0u8; 15]), Err(Error::Truncated));
        assert_eq!(stored(&[0u8; 3]), Err(Error::Truncated));
    }
}

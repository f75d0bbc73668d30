//! IPv4 + UDP encapsulation of RoCEv2 packets (full frames for pcap files, raw
//! sockets and ICRC checks against the real IP header).

use std::net::Ipv4Addr;

use super::icrc::{self, IcrcContext};
use super::{field, Error, Result};

/// UDP destination port of RoCEv2.
pub const ROCE_UDP_PORT: u16 = 4791;
/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;

/// UDP source port rxe picks for a QP: `0xC000 | (hash(qpn) & 0x3FFF)`.
///
/// rxe hashes with the kernel's `hash_32`; any value in 0xC000..=0xFFFF is legal, so
/// we use a fixed multiplicative hash of the QPN (deterministic, spreads flows).
pub fn rxe_source_port(qpn: u32) -> u16 {
    let h = qpn.wrapping_mul(0x61C8_8647) >> 18; // 14 bits
    0xC000 | (h as u16 & 0x3FFF)
}

/// The IPv4 and UDP header fields of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// IPv4 source address.
    pub src_ip: Ipv4Addr,
    /// IPv4 destination address.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// IPv4 identification.
    pub ip_id: u16,
    /// IPv4 DF flag.
    pub dont_fragment: bool,
    /// IPv4 time to live.
    pub ttl: u8,
    /// IPv4 type of service (DSCP/ECN).
    pub tos: u8,
}

impl FrameInfo {
    /// What rxe sends: ID 0, DF set, TTL 64, TOS 0, destination port 4791.
    pub fn rxe(src_ip: Ipv4Addr, dst_ip: Ipv4Addr, src_port: u16) -> Self {
        Self {
            src_ip,
            dst_ip,
            src_port,
            dst_port: ROCE_UDP_PORT,
            ip_id: 0,
            dont_fragment: true,
            ttl: 64,
            tos: 0,
        }
    }

    /// The ICRC context these headers imply.
    pub fn icrc_context(&self) -> IcrcContext {
        IcrcContext {
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            ip_id: self.ip_id,
            dont_fragment: self.dont_fragment,
        }
    }
}

/// Internet checksum (RFC 1071) of a header.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in header.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// A view over an IPv4 datagram carrying UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4UdpFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4UdpFrame<T> {
    /// Wraps a frame after checking: IPv4, header length, total length within the
    /// buffer, header checksum, protocol UDP, UDP length consistent.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let f = Self { buffer };
        f.check()?;
        Ok(f)
    }

    fn check(&self) -> Result<()> {
        let b = self.buffer.as_ref();
        if b.len() < IPV4_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(Error::Malformed("not IPv4"));
        }
        let ihl = usize::from(b[0] & 0x0F) * 4;
        if ihl < IPV4_HEADER_LEN {
            return Err(Error::Malformed("IPv4 header length"));
        }
        let total = usize::from(field::u16_at(b, 2));
        if total < ihl + UDP_HEADER_LEN || total > b.len() {
            return Err(Error::Truncated);
        }
        if ipv4_checksum(&b[..ihl]) != 0 {
            return Err(Error::Malformed("IPv4 header checksum"));
        }
        if b[9] != 17 {
            return Err(Error::Malformed("IPv4 protocol is not UDP"));
        }
        if field::u16_at(b, 6) & 0x3FFF != 0 {
            return Err(Error::Malformed("IPv4 fragment"));
        }
        let udp_len = usize::from(field::u16_at(b, ihl + 4));
        if udp_len != total - ihl {
            return Err(Error::Malformed("UDP length"));
        }
        Ok(())
    }

    fn ihl(&self) -> usize {
        usize::from(self.buffer.as_ref()[0] & 0x0F) * 4
    }

    fn total(&self) -> usize {
        usize::from(field::u16_at(self.buffer.as_ref(), 2))
    }

    /// The IPv4 header (with options).
    pub fn ip_header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.ihl()]
    }

    /// The UDP header.
    pub fn udp_header(&self) -> &[u8] {
        let ihl = self.ihl();
        &self.buffer.as_ref()[ihl..ihl + UDP_HEADER_LEN]
    }

    /// The UDP payload: the RoCEv2 packet from the BTH on, ICRC included.
    pub fn udp_payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.ihl() + UDP_HEADER_LEN..self.total()]
    }

    /// Header fields.
    pub fn info(&self) -> FrameInfo {
        let b = self.buffer.as_ref();
        let ihl = self.ihl();
        FrameInfo {
            src_ip: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            dst_ip: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            src_port: field::u16_at(b, ihl),
            dst_port: field::u16_at(b, ihl + 2),
            ip_id: field::u16_at(b, 4),
            dont_fragment: b[6] & 0x40 != 0,
            ttl: b[8],
            tos: b[1],
        }
    }

    /// Computes the ICRC over the headers as they are in the frame.
    pub fn compute_icrc(&self) -> Result<u32> {
        icrc::compute_with_headers(self.ip_header(), self.udp_header(), self.udp_payload())
    }

    /// Verifies the ICRC stored at the end of the UDP payload.
    pub fn verify_icrc(&self) -> Result<()> {
        let computed = self.compute_icrc()?;
        icrc::check(self.udp_payload(), computed)
    }
}

/// Builds a full IPv4 + UDP frame around `roce` (UDP checksum 0, as rxe sends).
pub fn build_frame(info: &FrameInfo, roce: &[u8]) -> Result<Vec<u8>> {
    let total = u16::try_from(IPV4_HEADER_LEN + UDP_HEADER_LEN + roce.len())
        .map_err(|_| Error::Malformed("packet too long for IPv4"))?;
    let mut f = Vec::with_capacity(usize::from(total));
    f.extend_from_slice(&[0x45, info.tos]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&info.ip_id.to_be_bytes());
    f.extend_from_slice(&[if info.dont_fragment { 0x40 } else { 0 }, 0]);
    f.extend_from_slice(&[info.ttl, 17, 0, 0]);
    f.extend_from_slice(&info.src_ip.octets());
    f.extend_from_slice(&info.dst_ip.octets());
    let csum = ipv4_checksum(&f[..IPV4_HEADER_LEN]);
    f[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&info.src_port.to_be_bytes());
    f.extend_from_slice(&info.dst_port.to_be_bytes());
    f.extend_from_slice(&(total - IPV4_HEADER_LEN as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(roce);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_round_trip() {
        let info = FrameInfo::rxe(
            Ipv4Addr::new(192, 168, 1, 1),
            Ipv4Addr::new(192, 168, 1, 2),
            0xC123,
        );
        let mut roce = vec![
            0x11, 0, 0xFF, 0xFF, 0, 0, 0, 5, 0, 0, 0, 9, 0x1F, 0, 0, 1, 0, 0, 0, 0,
        ];
        info.icrc_context().fill(&mut roce).unwrap();
        let frame = build_frame(&info, &roce).unwrap();
        let f = Ipv4UdpFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(f.info(), info);
        assert_eq!(f.udp_payload(), &roce[..]);
        f.verify_icrc().unwrap();
        // TTL and TOS are masked out of the ICRC (fix the IP checksum after changing).
        let mut g = frame.clone();
        g[8] = 3;
        g[1] = 0xB8;
        g[10] = 0;
        g[11] = 0;
        let c = ipv4_checksum(&g[..20]);
        g[10..12].copy_from_slice(&c.to_be_bytes());
        Ipv4UdpFrame::new_checked(&g[..])
            .unwrap()
            .verify_icrc()
            .unwrap();
    }

    #[test]
    fn rejects_garbage() {
        assert!(Ipv4UdpFrame::new_checked(&[0u8; 10][..]).is_err());
        assert!(Ipv4UdpFrame::new_checked(&[0x45u8; 40][..]).is_err());
        let info = FrameInfo::rxe(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1);
        let mut frame = build_frame(&info, &[0u8; 16]).unwrap();
        frame[15] ^= 1;
        assert_eq!(
            Ipv4UdpFrame::new_checked(&frame[..]),
            Err(Error::Malformed("IPv4 header checksum"))
        );
    }

    #[test]
    fn source_port_range() {
        for qpn in [0u32, 1, 17, 0xFFFFFF] {
            assert!(rxe_source_port(qpn) >= 0xC000);
        }
    }
}

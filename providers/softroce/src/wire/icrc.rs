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
/// A receiver on a plain UDP socket cannot see the IP ID and DF bit; [`Self::rxe`]
/// assumes what rxe sends (ID 0, DF set), which is also what a user-space sender on an
/// unconnected socket with `IP_PMTUDISC_DO` produces.
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
    fn short_packets_are_errors() {
        let ctx = IcrcContext::rxe(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 4791);
        assert_eq!(ctx.compute(&[0u8; 15]), Err(Error::Truncated));
        assert_eq!(stored(&[0u8; 3]), Err(Error::Truncated));
    }
}

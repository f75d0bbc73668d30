//! A minimal pcap writer for full IPv4 + UDP + RoCEv2 frames, readable by tshark,
//! Wireshark and scapy.

use std::io::{self, Write};

use crate::rc::Time;

/// Link type: raw IP (packets start with the IPv4 header).
pub const LINKTYPE_RAW: u32 = 101;
/// Link type: IPv4 only.
pub const LINKTYPE_IPV4: u32 = 228;

/// Writes a pcap (microsecond timestamps, version 2.4) stream.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header for `linktype` ([`LINKTYPE_RAW`] or
    /// [`LINKTYPE_IPV4`]).
    pub fn new(mut out: W, linktype: u32) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xA1B2_C3D4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        h.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        h.extend_from_slice(&65535u32.to_le_bytes()); // snaplen
        h.extend_from_slice(&linktype.to_le_bytes());
        out.write_all(&h)?;
        Ok(Self { out })
    }

    /// Appends one frame captured at `time`.
    pub fn write_frame(&mut self, time: Time, frame: &[u8]) -> io::Result<()> {
        let ns = time.as_nanos();
        let secs = u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX);
        let usecs = ((ns % 1_000_000_000) / 1000) as u32;
        let len = u32::try_from(frame.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&secs.to_le_bytes());
        h[4..8].copy_from_slice(&usecs.to_le_bytes());
        h[8..12].copy_from_slice(&len.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(frame)
    }

    /// The underlying writer (e.g. to flush it while capturing).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Flushes and returns the writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_record() {
        let mut w = PcapWriter::new(Vec::new(), LINKTYPE_RAW).unwrap();
        w.write_frame(Time(1_500_002_000), &[0x45, 0]).unwrap();
        let b = w.into_inner().unwrap();
        assert_eq!(&b[..4], &[0xD4, 0xC3, 0xB2, 0xA1]);
        assert_eq!(&b[20..24], &101u32.to_le_bytes());
        assert_eq!(&b[24..28], &1u32.to_le_bytes());
        assert_eq!(&b[28..32], &500_002u32.to_le_bytes());
        assert_eq!(&b[32..36], &2u32.to_le_bytes());
        assert_eq!(&b[40..], &[0x45, 0]);
    }
}

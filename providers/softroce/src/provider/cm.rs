//! The out-of-band connection exchange over TCP, in the form of rdma-core's
//! `ibv_rc_pingpong`: each side sends `LLLL:QQQQQQ:PPPPPP:GGGG…` (LID, QPN, PSN in hex
//! and the 16-byte GID as 32 hex digits, the IPv4-mapped address `::ffff:a.b.c.d`;
//! 51 characters and a NUL, as pingpong's `sizeof msg`), followed here by a
//! length-prefixed extension: `u32` big-endian length, then kind (request, accept,
//! reject, ready-to-use), path MTU (`u16`), connection data length (`u16`) and data.
//!
//! Client: REQ. Server: REP (accept, with its QPN/PSN) or REJ (with reject data).
//! Client: RTU once its QP is ready to receive, which raises the server's
//! `Connected` (as RDMA CM's REQ/REP/RTU). The TCP connection then stays open as the
//! connection's management channel: its closure means the peer is gone.

use std::net::Ipv4Addr;

/// Length of the pingpong text including its NUL.
pub(crate) const TEXT_LEN: usize = 52;
/// Largest connection data.
pub(crate) const MAX_CM_DATA: usize = 256;
/// Largest extension body.
const MAX_EXT: usize = 5 + MAX_CM_DATA;

/// What a CM message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Request = 1,
    Accept = 2,
    Reject = 3,
    ReadyToUse = 4,
    /// Either side, before it closes the TCP connection of an established one: why
    /// the connection ends (one byte of data, [`reason_code`]).
    Disconnect = 5,
}

/// The byte a `Disconnect` carries for a reason.
pub(crate) fn reason_code(r: fabric_core::ShutdownReason) -> u8 {
    use fabric_core::ShutdownReason as R;
    match r {
        R::Local => 1,
        R::Peer => 2,
        R::Lost => 3,
        R::AccessError => 4,
        R::Protocol => 5,
        _ => 0,
    }
}

/// The reason a `Disconnect`'s byte names, as the receiving side sees it: the sender
/// shutting down is `Peer` here, the other reasons are the same.
pub(crate) fn peer_reason(code: Option<u8>) -> fabric_core::ShutdownReason {
    use fabric_core::ShutdownReason as R;
    match code {
        Some(3) => R::Lost,
        Some(4) => R::AccessError,
        Some(5) => R::Protocol,
        _ => R::Peer,
    }
}

/// One CM message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CmMsg {
    pub(crate) kind: Kind,
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    /// The sender's device address (from the GID).
    pub(crate) ip: Ipv4Addr,
    pub(crate) mtu: u16,
    pub(crate) data: Vec<u8>,
}

/// The IPv4-mapped GID of `ip`, as 32 hex digits (pingpong's `gid_to_wire_gid`).
pub(crate) fn wire_gid(ip: Ipv4Addr) -> String {
    let mut g = [0u8; 16];
    g[10] = 0xFF;
    g[11] = 0xFF;
    g[12..].copy_from_slice(&ip.octets());
    g.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_gid(s: &str) -> Option<Ipv4Addr> {
    if s.len() != 32 {
        return None;
    }
    let mut g = [0u8; 16];
    for (i, b) in g.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    if g[..10].iter().any(|&b| b != 0) || g[10] != 0xFF || g[11] != 0xFF {
        return None;
    }
    Some(Ipv4Addr::new(g[12], g[13], g[14], g[15]))
}

/// Why a connection-management message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CmDecodeError {
    /// The address text is not ASCII.
    NotText,
    /// The address text is not `LID:QPN:PSN:GID`.
    NotAddress(String),
    /// A number of the address text is not hexadecimal.
    NotHex {
        /// Which field.
        field: &'static str,
        /// What it held.
        text: String,
    },
    /// The GID is not an IPv4-mapped GID.
    NotIpv4Gid(String),
    /// The extension length is out of range.
    ExtensionLength(usize),
    /// An unknown message kind.
    UnknownKind(u8),
    /// The data length disagrees with the extension length.
    DataLength,
}

impl std::fmt::Display for CmDecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmDecodeError::NotText => write!(f, "CM text is not ASCII"),
            CmDecodeError::NotAddress(t) => write!(f, "CM text '{t}' is not LID:QPN:PSN:GID"),
            CmDecodeError::NotHex { field, text } => {
                write!(f, "CM {field} '{text}' is not hex")
            }
            CmDecodeError::NotIpv4Gid(g) => write!(f, "CM GID '{g}' is not an IPv4-mapped GID"),
            CmDecodeError::ExtensionLength(n) => write!(f, "CM extension of {n} bytes"),
            CmDecodeError::UnknownKind(k) => write!(f, "CM message kind {k}"),
            CmDecodeError::DataLength => {
                write!(f, "CM data length disagrees with the extension length")
            }
        }
    }
}

impl std::error::Error for CmDecodeError {}

impl CmMsg {
    /// Serializes the message.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let text = format!(
            "{:04x}:{:06x}:{:06x}:{}",
            0,
            self.qpn & 0xFF_FFFF,
            self.psn & 0xFF_FFFF,
            wire_gid(self.ip)
        );
        let mut out = Vec::with_capacity(TEXT_LEN + 4 + MAX_EXT);
        out.extend_from_slice(text.as_bytes());
        out.resize(TEXT_LEN, 0);
        let data = &self.data[..self.data.len().min(MAX_CM_DATA)];
        let body_len = 5 + data.len();
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.mtu.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// Parses a message from the front of `buf`: `Ok(None)` if more bytes are needed,
    /// `Ok(Some((msg, consumed)))`, or `Err` with the reason for malformed input.
    pub(crate) fn decode(buf: &[u8]) -> Result<Option<(CmMsg, usize)>, CmDecodeError> {
        if buf.len() < TEXT_LEN + 4 {
            return Ok(None);
        }
        let text = &buf[..TEXT_LEN];
        let end = text.iter().position(|&b| b == 0).unwrap_or(TEXT_LEN);
        let text = std::str::from_utf8(&text[..end]).map_err(|_| CmDecodeError::NotText)?;
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 4 {
            return Err(CmDecodeError::NotAddress(text.to_string()));
        }
        let hex = |s: &str, field: &'static str| {
            u32::from_str_radix(s, 16).map_err(|_| CmDecodeError::NotHex {
                field,
                text: s.to_string(),
            })
        };
        let _lid = hex(parts[0], "LID")?;
        let qpn = hex(parts[1], "QPN")?;
        let psn = hex(parts[2], "PSN")?;
        let ip =
            parse_gid(parts[3]).ok_or_else(|| CmDecodeError::NotIpv4Gid(parts[3].to_string()))?;
        let mut l = [0u8; 4];
        l.copy_from_slice(&buf[TEXT_LEN..TEXT_LEN + 4]);
        let body_len = u32::from_be_bytes(l) as usize;
        if !(5..=MAX_EXT).contains(&body_len) {
            return Err(CmDecodeError::ExtensionLength(body_len));
        }
        let total = TEXT_LEN + 4 + body_len;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[TEXT_LEN + 4..total];
        let kind = match body[0] {
            1 => Kind::Request,
            2 => Kind::Accept,
            3 => Kind::Reject,
            4 => Kind::ReadyToUse,
            5 => Kind::Disconnect,
            k => return Err(CmDecodeError::UnknownKind(k)),
        };
        let mtu = u16::from_be_bytes([body[1], body[2]]);
        let dlen = usize::from(u16::from_be_bytes([body[3], body[4]]));
        if 5 + dlen != body_len {
            return Err(CmDecodeError::DataLength);
        }
        Ok(Some((
            CmMsg {
                kind,
                qpn: qpn & 0xFF_FFFF,
                psn: psn & 0xFF_FFFF,
                ip,
                mtu,
                data: body[5..].to_vec(),
            },
            total,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_pingpong_text() {
        let m = CmMsg {
            kind: Kind::Request,
            qpn: 0x11,
            psn: 0xABCDEF,
            ip: Ipv4Addr::new(127, 0, 0, 1),
            mtu: 4096,
            data: b"hello".to_vec(),
        };
        let b = m.encode();
        assert_eq!(
            &b[..51],
            b"0000:000011:abcdef:00000000000000000000ffff7f000001"
        );
        assert_eq!(b[51], 0);
        assert_eq!(CmMsg::decode(&b[..60]).unwrap(), None);
        let (back, n) = CmMsg::decode(&b).unwrap().unwrap();
        assert_eq!((back, n), (m, b.len()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            CmMsg::decode(&[b'x'; 80]),
            Err(CmDecodeError::NotAddress(_))
        ));
        let mut b = CmMsg {
            kind: Kind::Accept,
            qpn: 1,
            psn: 2,
            ip: Ipv4Addr::LOCALHOST,
            mtu: 1024,
            data: vec![],
        }
        .encode();
        b[TEXT_LEN + 4] = 9;
        assert_eq!(CmMsg::decode(&b), Err(CmDecodeError::UnknownKind(9)));
        b[TEXT_LEN] = 0xFF; // an extension longer than any CM message
        assert!(matches!(
            CmMsg::decode(&b),
            Err(CmDecodeError::ExtensionLength(_))
        ));
    }
}

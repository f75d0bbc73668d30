//! Fabrics commands: opcode 0x7F with a command type (FCTYPE) at byte 4.
//!
//! | FCTYPE | command | here |
//! |--------|---------|------|
//! | 0x00 | Property Set | [`PropertySetCommand`] |
//! | 0x01 | Connect | [`ConnectCommand`] + [`ConnectData`] (1024 bytes of data) |
//! | 0x04 | Property Get | [`PropertyGetCommand`] |
//! | 0x05, 0x06 | Authentication Send/Receive | named, rejected as unsupported |
//! | 0x08 | Disconnect | named, rejected as unsupported |
//!
//! Fabrics SQE layout: opcode @0, CID @2, FCTYPE @4, SGL @24, command-specific
//! fields from @40. Connect: RECFMT u16 @40, QID u16 @42 (0 = admin queue), SQSIZE u16
//! @44 (0's based), CATTR u8 @46, KATO u32 @48 (ms). Property Get/Set: ATTRIB @40
//! (bits 2:0: 0 = 4 bytes, 1 = 8 bytes), OFFSET u32 @44, Set's VALUE u64 @48.
//!
//! A Connect that fails for a bad parameter reports where in DW0
//! ([`InvalidParameterLocation`]); a successful one returns the controller ID
//! ([`ConnectResponse`]).

use super::field::{self, u16_at, u32_at, u64_at, u8_at};
use super::sgl::SglRepr;
use super::sqe::{offsets as sqe_offsets, sqe_bytes, Sqe};
use super::text::Nqn;
use super::{StatusCode, WireError};

/// Opcode of every Fabrics command.
pub const FABRICS_OPCODE: u8 = 0x7f;

/// Byte offsets of Fabrics SQE fields.
pub mod offsets {
    /// Fabrics command type.
    pub const FCTYPE: usize = 4;
    /// Connect: record format.
    pub const RECFMT: usize = 40;
    /// Connect: queue identifier.
    pub const QID: usize = 42;
    /// Connect: submission queue size (0's based).
    pub const SQSIZE: usize = 44;
    /// Connect: connect attributes.
    pub const CATTR: usize = 46;
    /// Connect: keep alive timeout (ms).
    pub const KATO: usize = 48;
    /// Property Get/Set: attributes (size).
    pub const ATTRIB: usize = 40;
    /// Property Get/Set: property offset.
    pub const OFFSET: usize = 44;
    /// Property Set: value.
    pub const VALUE: usize = 48;
}

raw_enum! {
    /// Fabrics command types (FCTYPE, SQE byte 4).
    pub enum FabricsType: u8 {
        /// Property Set.
        PropertySet = 0x00,
        /// Connect.
        Connect = 0x01,
        /// Property Get.
        PropertyGet = 0x04,
        /// Authentication Send (not supported yet).
        AuthenticationSend = 0x05,
        /// Authentication Receive (not supported yet).
        AuthenticationReceive = 0x06,
        /// Disconnect (not supported yet).
        Disconnect = 0x08,
    }
}

/// Size of a property (ATTRIB bits 2:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PropertySize {
    /// 4 bytes (ATTRIB 0).
    #[default]
    Four,
    /// 8 bytes (ATTRIB 1).
    Eight,
}

impl PropertySize {
    /// Size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            PropertySize::Four => 4,
            PropertySize::Eight => 8,
        }
    }

    fn attrib(self) -> u8 {
        match self {
            PropertySize::Four => 0,
            PropertySize::Eight => 1,
        }
    }
}

/// Connect command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectCommand {
    /// Command identifier.
    pub cid: u16,
    /// Where the 1024 bytes of [`ConnectData`] are (in-capsule or keyed).
    pub sgl: SglRepr,
    /// Queue identifier: 0 for the admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based (0 is invalid).
    pub sqsize: u16,
    /// Connect attributes.
    pub cattr: u8,
    /// Keep alive timeout in milliseconds (admin queue only; 0 = none).
    pub kato: u32,
}

impl Default for ConnectCommand {
    fn default() -> Self {
        ConnectCommand {
            cid: 0,
            sgl: SglRepr::InCapsule {
                offset: 0,
                length: ConnectData::LEN as u32,
            },
            qid: 0,
            sqsize: 31,
            cattr: 0,
            kato: 0,
        }
    }
}

/// Property Get command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PropertyGetCommand {
    /// Command identifier.
    pub cid: u16,
    /// Property size.
    pub size: PropertySize,
    /// Property offset (see [`properties`](super::properties)).
    pub offset: u32,
}

/// Property Set command fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PropertySetCommand {
    /// Command identifier.
    pub cid: u16,
    /// Property size.
    pub size: PropertySize,
    /// Property offset.
    pub offset: u32,
    /// Value (only the low 4 bytes for a 4-byte property).
    pub value: u64,
}

/// A validated Fabrics command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FabricsCommand {
    /// Connect.
    Connect(ConnectCommand),
    /// Property Get.
    PropertyGet(PropertyGetCommand),
    /// Property Set.
    PropertySet(PropertySetCommand),
}

fn invalid(field: &'static str, offset: usize, status: StatusCode) -> WireError {
    WireError::Invalid {
        structure: "fabrics command",
        field,
        offset,
        status,
    }
}

fn property_size(attrib: u8) -> Result<PropertySize, WireError> {
    match attrib & 0x7 {
        0 => Ok(PropertySize::Four),
        1 => Ok(PropertySize::Eight),
        _ => Err(invalid("ATTRIB", offsets::ATTRIB, StatusCode::InvalidField)),
    }
}

impl FabricsCommand {
    /// Parses a Fabrics SQE.
    ///
    /// Errors: an opcode other than 0x7F, or an FCTYPE this crate does not handle
    /// (authentication, disconnect, unknown), give *Invalid Command Opcode*, as Linux
    /// nvmet answers an unknown capsule type. A Connect with RECFMT other than 0 gives
    /// *Connect Incompatible Format*; SQSIZE 0 gives *Connect Invalid Parameters*;
    /// an SGL that does not describe exactly 1024 bytes gives *Data SGL Length
    /// Invalid*. A property size other than 4 or 8 bytes gives *Invalid Field*.
    pub fn parse<T: AsRef<[u8]>>(sqe: &Sqe<T>) -> Result<FabricsCommand, WireError> {
        if sqe.opcode() != FABRICS_OPCODE {
            return Err(invalid("opcode", 0, StatusCode::InvalidOpcode));
        }
        let b = sqe.buf();
        let cid = sqe.cid();
        match FabricsType::from(u8_at(b, offsets::FCTYPE)) {
            FabricsType::Connect => {
                if u16_at(b, offsets::RECFMT) != 0 {
                    return Err(invalid(
                        "RECFMT",
                        offsets::RECFMT,
                        StatusCode::ConnectIncompatibleFormat,
                    ));
                }
                let sqsize = u16_at(b, offsets::SQSIZE);
                if sqsize == 0 {
                    return Err(invalid(
                        "SQSIZE",
                        offsets::SQSIZE,
                        StatusCode::ConnectInvalidParameters,
                    ));
                }
                let sgl =
                    SglRepr::parse(&sqe.dptr_sgl()).map_err(|e| e.within(sqe_offsets::DPTR))?;
                if sgl.data_length() as usize != ConnectData::LEN {
                    return Err(invalid(
                        "SGL length",
                        sqe_offsets::DPTR + 8,
                        StatusCode::DataSglLengthInvalid,
                    ));
                }
                Ok(FabricsCommand::Connect(ConnectCommand {
                    cid,
                    sgl,
                    qid: u16_at(b, offsets::QID),
                    sqsize,
                    cattr: u8_at(b, offsets::CATTR),
                    kato: u32_at(b, offsets::KATO),
                }))
            }
            FabricsType::PropertyGet => Ok(FabricsCommand::PropertyGet(PropertyGetCommand {
                cid,
                size: property_size(u8_at(b, offsets::ATTRIB))?,
                offset: u32_at(b, offsets::OFFSET),
            })),
            FabricsType::PropertySet => Ok(FabricsCommand::PropertySet(PropertySetCommand {
                cid,
                size: property_size(u8_at(b, offsets::ATTRIB))?,
                offset: u32_at(b, offsets::OFFSET),
                value: u64_at(b, offsets::VALUE),
            })),
            _ => Err(invalid(
                "FCTYPE",
                offsets::FCTYPE,
                StatusCode::InvalidOpcode,
            )),
        }
    }

    /// Writes all 64 bytes of the SQE (byte 1 says SGL, as Linux hosts send it).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, sqe: &mut Sqe<T>) {
        sqe.clear();
        sqe.set_opcode(FABRICS_OPCODE);
        sqe.set_flags(0x40);
        let (cid, fctype) = match self {
            FabricsCommand::Connect(c) => (c.cid, FabricsType::Connect),
            FabricsCommand::PropertyGet(c) => (c.cid, FabricsType::PropertyGet),
            FabricsCommand::PropertySet(c) => (c.cid, FabricsType::PropertySet),
        };
        sqe.set_cid(cid);
        let b = sqe.buf_mut();
        field::set_u8(b, offsets::FCTYPE, fctype.into());
        match self {
            FabricsCommand::Connect(c) => {
                field::set_u16(b, offsets::QID, c.qid);
                field::set_u16(b, offsets::SQSIZE, c.sqsize);
                field::set_u8(b, offsets::CATTR, c.cattr);
                field::set_u32(b, offsets::KATO, c.kato);
                c.sgl.emit(&mut sqe.dptr_sgl_mut());
            }
            FabricsCommand::PropertyGet(c) => {
                field::set_u8(b, offsets::ATTRIB, c.size.attrib());
                field::set_u32(b, offsets::OFFSET, c.offset);
            }
            FabricsCommand::PropertySet(c) => {
                field::set_u8(b, offsets::ATTRIB, c.size.attrib());
                field::set_u32(b, offsets::OFFSET, c.offset);
                field::set_u64(b, offsets::VALUE, c.value);
            }
        }
    }

    /// The SQE as 64 bytes.
    pub fn to_bytes(&self) -> [u8; 64] {
        sqe_bytes(|view| self.emit(view))
    }
}

crate::fixed_layout! {
    /// Connect command data (1024 bytes).
    ///
    /// `parse` rejects an NQN field without a NUL terminator (or longer than 223
    /// bytes, or not UTF-8) with *Connect Invalid Parameters* at the field's offset;
    /// [`ConnectData::validate`] also rejects empty NQNs.
    pub struct ConnectData: 1024 bytes, "connect data", invalid = StatusCode::ConnectInvalidParameters {
        /// Host identifier (a UUID).
        hostid: [u8; 16] = 0,
        /// Controller ID: [`ConnectData::DYNAMIC_CNTLID`] on an admin queue in the
        /// dynamic controller model, the ID returned by the admin Connect on I/O queues.
        cntlid: u16 = 16,
        /// NQN of the subsystem to connect to.
        subnqn: Nqn = 256,
        /// NQN of the host.
        hostnqn: Nqn = 512,
    }
}

impl ConnectData {
    /// CNTLID asking the subsystem to allocate a controller (dynamic model).
    pub const DYNAMIC_CNTLID: u16 = 0xFFFF;

    /// Checks what `parse` cannot: both NQNs present. The error carries the offset a
    /// target reports in [`InvalidParameterLocation`] (with `in_data` set).
    pub fn validate(&self) -> Result<(), WireError> {
        let empty = |field, offset| WireError::Invalid {
            structure: "connect data",
            field,
            offset,
            status: StatusCode::ConnectInvalidParameters,
        };
        if self.subnqn.is_empty() {
            return Err(empty("subnqn", 256));
        }
        if self.hostnqn.is_empty() {
            return Err(empty("hostnqn", 512));
        }
        Ok(())
    }
}

/// DW0 of a successful Connect completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnectResponse {
    /// Controller ID (bits 15:0).
    pub cntlid: u16,
    /// Authentication requirements (bits 17:16); 0 = none.
    pub authreq: u8,
}

impl ConnectResponse {
    /// From a completion's DW0.
    pub fn from_dw0(dw0: u32) -> ConnectResponse {
        ConnectResponse {
            cntlid: dw0 as u16,
            authreq: ((dw0 >> 16) & 0x3) as u8,
        }
    }

    /// To a completion's DW0.
    pub fn to_dw0(&self) -> u32 {
        u32::from(self.cntlid) | (u32::from(self.authreq & 0x3) << 16)
    }
}

/// DW0 of a Connect completed with *Connect Invalid Parameters*: which byte was bad,
/// in the SQE or in the Connect data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InvalidParameterLocation {
    /// IATTR (bit 16): the offset is into the Connect data, not the SQE.
    pub in_data: bool,
    /// IPO (bits 15:0): byte offset of the invalid parameter.
    pub offset: u16,
}

impl InvalidParameterLocation {
    /// The location a [`WireError::Invalid`] names; `in_data` says whether it came
    /// from parsing the Connect data. `None` for a truncated buffer.
    pub fn from_error(error: &WireError, in_data: bool) -> Option<Self> {
        match error {
            WireError::Invalid { offset, .. } => Some(InvalidParameterLocation {
                in_data,
                offset: u16::try_from(*offset).ok()?,
            }),
            WireError::Truncated { .. } => None,
        }
    }

    /// From a completion's DW0.
    pub fn from_dw0(dw0: u32) -> Self {
        InvalidParameterLocation {
            in_data: dw0 & (1 << 16) != 0,
            offset: dw0 as u16,
        }
    }

    /// To a completion's DW0.
    pub fn to_dw0(&self) -> u32 {
        u32::from(self.offset) | (u32::from(self.in_data) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::layout::checks;
    use crate::wire::sgl::KeyedSgl;
    use proptest::prelude::*;

    fn parse(b: &[u8]) -> Result<FabricsCommand, WireError> {
        FabricsCommand::parse(&Sqe::new_checked(b).unwrap())
    }

    #[test]
    fn connect_exact_bytes() {
        let c = ConnectCommand {
            cid: 3,
            qid: 1,
            sqsize: 127,
            kato: 0,
            ..Default::default()
        };
        let b = FabricsCommand::Connect(c).to_bytes();
        assert_eq!(b[0], 0x7f);
        assert_eq!(&b[2..4], &[3, 0]);
        assert_eq!(b[4], 0x01, "FCTYPE Connect");
        assert_eq!(&b[32..36], &1024u32.to_le_bytes(), "in-capsule length");
        assert_eq!(b[39], 0x01, "data block, offset subtype");
        assert_eq!(&b[40..42], &[0, 0], "RECFMT");
        assert_eq!(&b[42..44], &[1, 0], "QID");
        assert_eq!(&b[44..46], &[127, 0], "SQSIZE");
        assert_eq!(parse(&b).unwrap(), FabricsCommand::Connect(c));
    }

    #[test]
    fn connect_rejections() {
        let good = FabricsCommand::Connect(ConnectCommand::default()).to_bytes();
        let mut b = good;
        b[40] = 1;
        assert!(matches!(
            parse(&b),
            Err(WireError::Invalid {
                offset: 40,
                status: StatusCode::ConnectIncompatibleFormat,
                ..
            })
        ));
        let mut b = good;
        b[44] = 0;
        let e = parse(&b).unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::ConnectInvalidParameters));
        assert_eq!(
            InvalidParameterLocation::from_error(&e, false)
                .unwrap()
                .to_dw0(),
            44
        );
        let mut b = good;
        b[32] = 0; // SGL length 1024 -> 1024 & !0xff... = 1024 still; change byte 33
        b[33] = 0x08;
        assert_eq!(
            parse(&b).unwrap_err().status(),
            Some(StatusCode::DataSglLengthInvalid)
        );
        let mut b = good;
        b[0] = 0x06;
        assert_eq!(
            parse(&b).unwrap_err().status(),
            Some(StatusCode::InvalidOpcode)
        );
        for fctype in [0x05u8, 0x06, 0x08, 0x02, 0xFF] {
            let mut b = good;
            b[4] = fctype;
            assert!(matches!(
                parse(&b),
                Err(WireError::Invalid {
                    offset: 4,
                    status: StatusCode::InvalidOpcode,
                    ..
                })
            ));
        }
    }

    #[test]
    fn property_commands() {
        let get = FabricsCommand::PropertyGet(PropertyGetCommand {
            cid: 1,
            size: PropertySize::Eight,
            offset: 0,
        });
        let b = get.to_bytes();
        assert_eq!((b[4], b[40], &b[44..48]), (0x04, 1, &[0u8, 0, 0, 0][..]));
        assert_eq!(parse(&b).unwrap(), get);
        let set = FabricsCommand::PropertySet(PropertySetCommand {
            cid: 2,
            size: PropertySize::Four,
            offset: 0x14,
            value: 0x0046_0001,
        });
        let b = set.to_bytes();
        assert_eq!((b[4], b[40], b[44]), (0x00, 0, 0x14));
        assert_eq!(&b[48..52], &[1, 0, 0x46, 0]);
        assert_eq!(parse(&b).unwrap(), set);
        let mut bad = b;
        bad[40] = 2;
        assert_eq!(
            parse(&bad).unwrap_err().status(),
            Some(StatusCode::InvalidField)
        );
    }

    fn sample_data() -> ConnectData {
        ConnectData {
            hostid: [0xAB; 16],
            cntlid: ConnectData::DYNAMIC_CNTLID,
            subnqn: Nqn::new("nqn.2024-01.io.example:disk1").unwrap(),
            hostnqn: Nqn::new("nqn.2014-08.org.nvmexpress:uuid:abababab").unwrap(),
        }
    }

    #[test]
    fn connect_data_exact_bytes() {
        let d = sample_data();
        let mut b = [0xEEu8; 1024];
        d.emit(&mut b).unwrap();
        assert_eq!(&b[..16], &[0xAB; 16]);
        assert_eq!(&b[16..18], &[0xFF, 0xFF]);
        assert_eq!(&b[256..256 + 28], b"nqn.2024-01.io.example:disk1");
        assert_eq!(b[256 + 28], 0);
        assert_eq!(&b[512..512 + 10], b"nqn.2014-0");
        assert!(b[768..].iter().all(|&x| x == 0), "reserved bytes zeroed");
        let back = ConnectData::parse(&b).unwrap();
        assert_eq!(back, d);
        back.validate().unwrap();
        checks::field_table_is_sound::<ConnectData>();
    }

    #[test]
    fn connect_data_rejections() {
        let mut b = [0u8; 1024];
        sample_data().emit(&mut b).unwrap();
        let mut unterminated = b;
        unterminated[512..768].fill(b'a');
        let e = ConnectData::parse(&unterminated).unwrap_err();
        assert!(matches!(
            e,
            WireError::Invalid {
                offset: 512,
                status: StatusCode::ConnectInvalidParameters,
                ..
            }
        ));
        assert_eq!(
            InvalidParameterLocation::from_error(&e, true)
                .unwrap()
                .to_dw0(),
            0x1_0200
        );
        let mut no_subnqn = b;
        no_subnqn[256..512].fill(0);
        let e = ConnectData::parse(&no_subnqn)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, WireError::Invalid { offset: 256, .. }));
        assert!(ConnectData::parse(&b[..1023]).is_err());
    }

    #[test]
    fn connect_response_dw0() {
        let r = ConnectResponse {
            cntlid: 0x11,
            authreq: 0,
        };
        assert_eq!(r.to_dw0(), 0x11);
        assert_eq!(
            ConnectResponse::from_dw0(0x0001_0011),
            ConnectResponse {
                cntlid: 0x11,
                authreq: 1
            }
        );
        let loc = InvalidParameterLocation::from_dw0(0x1_0010);
        assert_eq!(
            loc,
            InvalidParameterLocation {
                in_data: true,
                offset: 16
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn connect_round_trip(cid in any::<u16>(), qid in any::<u16>(), sqsize in 1u16.., cattr in any::<u8>(),
                              kato in any::<u32>(), keyed in any::<bool>(), addr in any::<u64>(), key in any::<u32>()) {
            let sgl = if keyed {
                SglRepr::Keyed(KeyedSgl::new(addr, 1024, key, false).unwrap())
            } else {
                SglRepr::InCapsule { offset: 0, length: 1024 }
            };
            let c = FabricsCommand::Connect(ConnectCommand { cid, sgl, qid, sqsize, cattr, kato });
            prop_assert_eq!(parse(&c.to_bytes()).unwrap(), c);
        }

        #[test]
        fn connect_data_round_trip(hostid in any::<[u8; 16]>(), cntlid in any::<u16>(),
                                   sub in "[a-z0-9.:-]{1,223}", host in "[a-z0-9.:-]{1,223}") {
            let d = ConnectData { hostid, cntlid, subnqn: Nqn::new(&sub).unwrap(), hostnqn: Nqn::new(&host).unwrap() };
            let mut b = [0u8; 1024];
            d.emit(&mut b).unwrap();
            prop_assert_eq!(ConnectData::parse(&b).unwrap(), d);
        }

        #[test]
        fn random_sqe_never_panics(bytes in any::<[u8; 64]>()) {
            let mut b = bytes;
            b[0] = FABRICS_OPCODE;
            if let Ok(cmd) = parse(&b) {
                prop_assert_eq!(parse(&cmd.to_bytes()).unwrap(), cmd);
            }
        }

        #[test]
        fn random_connect_data_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(d) = ConnectData::parse(&bytes) {
                let _ = d.validate();
            }
        }
    }
}

//! Identify: the command's fields and the 4096-byte data structures it returns.
//!
//! * [`IdentifyCommand`] – CNS, CNTID (CDW10), CNS specific ID and CSI (CDW11);
//! * [`IdentifyController`] – CNS 0x01;
//! * [`IdentifyNamespace`] – CNS 0x00, with [`LbaFormat`]s;
//! * [`NamespaceList`] – CNS 0x02 (also the Changed Namespace List log page);
//! * [`NamespaceIdDescriptor`] – CNS 0x03 (EUI64, NGUID, UUID, CSI).
//!
//! The structures are plain structs with public fields and `Default`, so a target
//! builds one with struct update syntax and emits it into a 4096-byte buffer:
//!
//! ```
//! use nvmeof::wire::identify::{IdentifyController, sgls};
//! use nvmeof::wire::text::{Ascii, Nqn};
//!
//! let id = IdentifyController {
//!     vid: 0x1b36,
//!     sn: Ascii::new("0123456789")?,
//!     subnqn: Nqn::new("nqn.2024-01.io.example:disk1")?,
//!     sgls: sgls::SUPPORTED | sgls::KEYED | sgls::OFFSET,
//!     ioccsz: IdentifyController::ioccsz_for_inline(4096),
//!     ..Default::default()
//! };
//! let mut page = [0u8; 4096];
//! id.emit(&mut page)?;
//! assert_eq!(&page[768..772], b"nqn.");
//! assert_eq!(IdentifyController::parse(&page)?, id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::field::{self, bits32, u32_at, u8_at};
use super::layout::{FieldCodec, FieldKind};
use super::sqe::SqeRepr;
use super::text::{Ascii, Nqn};
use super::{StatusCode, WireError};

/// Size of every Identify data structure.
pub const IDENTIFY_DATA_LEN: usize = 4096;

raw_enum! {
    /// Controller or Namespace Structure (CNS, CDW10 bits 7:0).
    pub enum Cns: u8 {
        /// Identify Namespace.
        Namespace = 0x00,
        /// Identify Controller.
        Controller = 0x01,
        /// Active namespace ID list.
        ActiveNamespaceList = 0x02,
        /// Namespace identification descriptor list.
        NamespaceIdDescriptors = 0x03,
        /// I/O command set specific Identify Namespace.
        CommandSetNamespace = 0x05,
        /// I/O command set specific Identify Controller.
        CommandSetController = 0x06,
        /// I/O command set specific active namespace ID list.
        CommandSetActiveNamespaceList = 0x07,
        /// I/O command set independent Identify Namespace.
        IndependentNamespace = 0x08,
    }
}

/// Identify command fields (CDW10-11; NSID is in the SQE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IdentifyCommand {
    /// What to identify (CDW10 bits 7:0).
    pub cns: Cns,
    /// Controller identifier (CDW10 bits 31:16).
    pub cntid: u16,
    /// CNS specific identifier (CDW11 bits 15:0).
    pub cnssid: u16,
    /// Command set identifier (CDW11 bits 31:24).
    pub csi: u8,
}

impl IdentifyCommand {
    /// Reads the fields from an SQE.
    pub fn from_sqe(sqe: &SqeRepr) -> IdentifyCommand {
        let [cdw10, cdw11, ..] = sqe.cdw10_15;
        IdentifyCommand {
            cns: Cns::from(bits32(cdw10, 0, 8) as u8),
            cntid: bits32(cdw10, 16, 16) as u16,
            cnssid: bits32(cdw11, 0, 16) as u16,
            csi: bits32(cdw11, 24, 8) as u8,
        }
    }

    /// Writes the fields into an SQE's CDW10-11.
    pub fn apply(&self, sqe: &mut SqeRepr) {
        sqe.cdw10_15[0] = u32::from(u8::from(self.cns)) | (u32::from(self.cntid) << 16);
        sqe.cdw10_15[1] = u32::from(self.cnssid) | (u32::from(self.csi) << 24);
    }
}

/// Bits of [`IdentifyController::sgls`].
pub mod sgls {
    /// SGLs supported, no alignment requirement (bits 1:0 = 01b).
    pub const SUPPORTED: u32 = 0b01;
    /// Keyed SGL data block descriptors supported (bit 2).
    pub const KEYED: u32 = 1 << 2;
    /// Offset-based (in-capsule) descriptors supported (bit 20).
    pub const OFFSET: u32 = 1 << 20;
}

/// Bits of [`IdentifyController::oncs`] (optional NVM commands).
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set Features, Select field in Get Features.
    pub const SAVE_SELECT: u16 = 1 << 4;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
    /// Verify.
    pub const VERIFY: u16 = 1 << 7;
    /// Copy.
    pub const COPY: u16 = 1 << 8;
}

/// Bits of [`IdentifyController::vwc`].
pub mod vwc {
    /// A volatile write cache is present (bit 0).
    pub const PRESENT: u8 = 1 << 0;
    /// Flush with NSID 0xFFFFFFFF supported (bits 2:1 = 11b).
    pub const FLUSH_ALL_NSID: u8 = 0b11 << 1;
}

raw_enum! {
    /// Controller type (CNTRLTYPE).
    pub enum ControllerType: u8 {
        /// Not reported.
        NotReported = 0,
        /// I/O controller.
        Io = 1,
        /// Discovery controller.
        Discovery = 2,
        /// Administrative controller.
        Administrative = 3,
    }
}

crate::fixed_layout! {
    /// Identify Controller data structure (CNS 0x01, 4096 bytes). Power state
    /// descriptors and vendor specific bytes are not modelled (emitted as zero).
    pub struct IdentifyController: 4096 bytes, "identify controller", invalid = StatusCode::InvalidField {
        /// PCI vendor ID.
        vid: u16 = 0,
        /// PCI subsystem vendor ID.
        ssvid: u16 = 2,
        /// Serial number.
        sn: Ascii<20> = 4,
        /// Model number.
        mn: Ascii<40> = 24,
        /// Firmware revision.
        fr: Ascii<8> = 64,
        /// Recommended arbitration burst.
        rab: u8 = 72,
        /// IEEE OUI identifier.
        ieee: [u8; 3] = 73,
        /// Controller multi-path I/O and namespace sharing capabilities.
        cmic: u8 = 76,
        /// Maximum data transfer size, as 2^MDTS minimum pages (0 = no limit).
        mdts: u8 = 77,
        /// Controller ID.
        cntlid: u16 = 78,
        /// Version (as the VS property).
        ver: u32 = 80,
        /// RTD3 resume latency (µs).
        rtd3r: u32 = 84,
        /// RTD3 entry latency (µs).
        rtd3e: u32 = 88,
        /// Optional asynchronous events supported.
        oaes: u32 = 92,
        /// Controller attributes.
        ctratt: u32 = 96,
        /// Controller type.
        cntrltype: ControllerType = 111,
        /// FRU globally unique identifier.
        fguid: [u8; 16] = 112,
        /// Optional admin command support.
        oacs: u16 = 256,
        /// Abort command limit, 0's based.
        acl: u8 = 258,
        /// Asynchronous event request limit, 0's based.
        aerl: u8 = 259,
        /// Firmware updates.
        frmw: u8 = 260,
        /// Log page attributes.
        lpa: u8 = 261,
        /// Error log page entries, 0's based.
        elpe: u8 = 262,
        /// Number of power states supported, 0's based.
        npss: u8 = 263,
        /// Admin vendor specific command configuration.
        avscc: u8 = 264,
        /// Warning composite temperature threshold (K).
        wctemp: u16 = 266,
        /// Critical composite temperature threshold (K).
        cctemp: u16 = 268,
        /// Keep alive support: granularity in 100 ms units (0 = not supported).
        kas: u16 = 320,
        /// Submission queue entry size: required (bits 3:0) and maximum (bits 7:4),
        /// as powers of two (0x66 = 64 bytes).
        sqes: u8 = 512,
        /// Completion queue entry size, as `sqes` (0x44 = 16 bytes).
        cqes: u8 = 513,
        /// Maximum outstanding commands (fabrics).
        maxcmd: u16 = 514,
        /// Number of namespaces (highest valid NSID).
        nn: u32 = 516,
        /// Optional NVM command support ([`oncs`]).
        oncs: u16 = 520,
        /// Fused operation support.
        fuses: u16 = 522,
        /// Format NVM attributes.
        fna: u8 = 524,
        /// Volatile write cache ([`vwc`]).
        vwc: u8 = 525,
        /// Atomic write unit normal, 0's based blocks.
        awun: u16 = 526,
        /// Atomic write unit power fail, 0's based blocks.
        awupf: u16 = 528,
        /// Atomic compare and write unit, 0's based blocks.
        acwu: u16 = 532,
        /// SGL support ([`sgls`]).
        sgls: u32 = 536,
        /// Maximum number of allowed namespaces.
        mnan: u32 = 540,
        /// NVM subsystem NQN.
        subnqn: Nqn = 768,
        /// I/O queue command capsule supported size, in 16-byte units including the
        /// 64-byte SQE (fabrics).
        ioccsz: u32 = 1792,
        /// I/O queue response capsule supported size, in 16-byte units (fabrics).
        iorcsz: u32 = 1796,
        /// In-capsule data offset, in 16-byte units (Linux hosts require 0).
        icdoff: u16 = 1800,
        /// Fabrics controller attributes (bit 0: static controller model).
        fcatt: u8 = 1802,
        /// Maximum SGL data block descriptors, 0 = no limit.
        msdbd: u8 = 1803,
        /// Optional fabrics commands supported.
        ofcs: u16 = 1804,
    }
}

impl IdentifyController {
    /// IOCCSZ for a target accepting `inline_bytes` of in-capsule data: the SQE and
    /// the data, in 16-byte units, rounded up.
    pub fn ioccsz_for_inline(inline_bytes: u32) -> u32 {
        inline_bytes.saturating_add(64).div_ceil(16)
    }

    /// In-capsule data bytes IOCCSZ allows (beyond the 64-byte SQE).
    pub fn inline_data_size(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }
}

/// One LBA format: metadata size, data size, relative performance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub ms: u16,
    /// LBA data size, as a power of two (9 = 512 bytes; 0 = format not available).
    pub lbads: u8,
    /// Relative performance (2 bits, 0 = best).
    pub rp: u8,
}

impl LbaFormat {
    /// Block size in bytes, if `lbads` is a supported power (9 ..= 31).
    pub fn block_size(&self) -> Option<u32> {
        (9..32).contains(&self.lbads).then(|| 1u32 << self.lbads)
    }
}

/// The 64 LBA format descriptors of Identify Namespace (bytes 128-383).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LbaFormats(pub [LbaFormat; 64]);

impl Default for LbaFormats {
    fn default() -> Self {
        LbaFormats([LbaFormat::default(); 64])
    }
}

impl FieldCodec for LbaFormats {
    const SIZE: usize = 64 * 4;
    const KIND: FieldKind = FieldKind::Canonical;
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        let mut out = LbaFormats::default();
        for (f, b) in out.0.iter_mut().zip(bytes.chunks_exact(4)) {
            *f = LbaFormat {
                ms: field::u16_at(b, 0),
                lbads: u8_at(b, 2),
                rp: u8_at(b, 3) & 0x3,
            };
        }
        Some(out)
    }
    fn encode(&self, bytes: &mut [u8]) {
        for (f, b) in self.0.iter().zip(bytes.chunks_exact_mut(4)) {
            field::set_u16(b, 0, f.ms);
            field::set_u8(b, 2, f.lbads);
            field::set_u8(b, 3, f.rp & 0x3);
        }
    }
}

crate::fixed_layout! {
    /// Identify Namespace data structure (CNS 0x00, 4096 bytes), NVM command set.
    pub struct IdentifyNamespace: 4096 bytes, "identify namespace", invalid = StatusCode::InvalidField {
        /// Namespace size (blocks).
        nsze: u64 = 0,
        /// Namespace capacity (blocks).
        ncap: u64 = 8,
        /// Namespace utilization (blocks).
        nuse: u64 = 16,
        /// Namespace features (bit 0 thin provisioning, bit 4 optimal I/O fields).
        nsfeat: u8 = 24,
        /// Number of LBA formats, 0's based.
        nlbaf: u8 = 25,
        /// Formatted LBA size: format index bits 3:0 (and 6:5 above 16), metadata at
        /// end of LBA bit 4.
        flbas: u8 = 26,
        /// Metadata capabilities.
        mc: u8 = 27,
        /// End-to-end data protection capabilities.
        dpc: u8 = 28,
        /// End-to-end data protection type settings.
        dps: u8 = 29,
        /// Namespace multi-path I/O and sharing capabilities.
        nmic: u8 = 30,
        /// Reservation capabilities.
        rescap: u8 = 31,
        /// Format progress indicator.
        fpi: u8 = 32,
        /// Deallocate logical block features (bits 2:0: what deallocated blocks read as).
        dlfeat: u8 = 33,
        /// Namespace atomic write unit normal.
        nawun: u16 = 34,
        /// Namespace atomic write unit power fail.
        nawupf: u16 = 36,
        /// Namespace atomic compare and write unit.
        nacwu: u16 = 38,
        /// Namespace atomic boundary size normal.
        nabsn: u16 = 40,
        /// Namespace atomic boundary offset.
        nabo: u16 = 42,
        /// Namespace atomic boundary size power fail.
        nabspf: u16 = 44,
        /// Namespace optimal I/O boundary.
        noiob: u16 = 46,
        /// NVM capacity (bytes).
        nvmcap: u128 = 48,
        /// Namespace preferred write granularity.
        npwg: u16 = 64,
        /// Namespace preferred write alignment.
        npwa: u16 = 66,
        /// Namespace preferred deallocate granularity.
        npdg: u16 = 68,
        /// Namespace preferred deallocate alignment.
        npda: u16 = 70,
        /// Namespace optimal write size.
        nows: u16 = 72,
        /// Maximum single source range length (Copy).
        mssrl: u16 = 74,
        /// Maximum copy length (Copy).
        mcl: u32 = 76,
        /// Maximum source range count, 0's based (Copy).
        msrc: u8 = 80,
        /// Number of unique capability LBA formats.
        nulbaf: u8 = 82,
        /// ANA group identifier.
        anagrpid: u32 = 92,
        /// Namespace attributes (bit 0: write protected).
        nsattr: u8 = 99,
        /// NVM set identifier.
        nvmsetid: u16 = 100,
        /// Endurance group identifier.
        endgid: u16 = 102,
        /// Namespace globally unique identifier.
        nguid: [u8; 16] = 104,
        /// IEEE extended unique identifier.
        eui64: [u8; 8] = 120,
        /// LBA formats; the first `nlbaf + 1` are meaningful.
        lbaf: LbaFormats = 128,
    }
}

impl IdentifyNamespace {
    /// Index of the format in use (FLBAS bits 3:0, plus bits 6:5 as bits 5:4).
    pub fn formatted_index(&self) -> usize {
        usize::from(self.flbas & 0xF) | (usize::from((self.flbas >> 5) & 0x3) << 4)
    }

    /// The LBA format in use, if its index is within NLBAF.
    pub fn formatted_lba(&self) -> Option<LbaFormat> {
        let i = self.formatted_index();
        if i > usize::from(self.nlbaf) {
            return None;
        }
        self.lbaf.0.get(i).copied()
    }

    /// Block size in bytes of the format in use.
    pub fn block_size(&self) -> Option<u32> {
        self.formatted_lba()?.block_size()
    }
}

/// A list of up to 1024 NSIDs in ascending order, zero-terminated, in 4096 bytes:
/// the active namespace ID list (CNS 0x02) and the Changed Namespace List log page
/// (where a single `0xFFFFFFFF` means more than 1024 changed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceList {
    nsids: Vec<u32>,
}

impl NamespaceList {
    /// Most entries a list holds.
    pub const MAX_ENTRIES: usize = 1024;
    /// Size in bytes.
    pub const LEN: usize = 4096;
    /// The entry that alone says "more than 1024 namespaces changed".
    pub const OVERFLOW: u32 = 0xFFFF_FFFF;

    fn invalid(index: usize) -> WireError {
        WireError::Invalid {
            structure: "namespace list",
            field: "nsid",
            offset: index * 4,
            status: StatusCode::InvalidField,
        }
    }

    /// A list of `nsids`: at most 1024, non-zero, strictly ascending.
    pub fn new(nsids: Vec<u32>) -> Result<Self, WireError> {
        if nsids.len() > Self::MAX_ENTRIES {
            return Err(Self::invalid(Self::MAX_ENTRIES));
        }
        for (i, &n) in nsids.iter().enumerate() {
            if n == 0 || (i > 0 && nsids[i - 1] >= n) {
                return Err(Self::invalid(i));
            }
        }
        Ok(NamespaceList { nsids })
    }

    /// The list of a Changed Namespace List that overflowed.
    pub fn overflow() -> Self {
        NamespaceList {
            nsids: vec![Self::OVERFLOW],
        }
    }

    /// Whether this is the overflow marker.
    pub fn is_overflow(&self) -> bool {
        self.nsids == [Self::OVERFLOW]
    }

    /// The NSIDs.
    pub fn nsids(&self) -> &[u32] {
        &self.nsids
    }

    /// Parses the list: entries up to the first zero, which must ascend.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let buf = field::checked(buf, Self::LEN, "namespace list")?;
        let nsids = (0..Self::MAX_ENTRIES)
            .map(|i| u32_at(buf, i * 4))
            .take_while(|&n| n != 0)
            .collect();
        Self::new(nsids)
    }

    /// Writes the list and zero-fills the rest of the 4096 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let got = buf.len();
        let buf = buf.get_mut(..Self::LEN).ok_or(WireError::Truncated {
            structure: "namespace list",
            needed: Self::LEN,
            got,
        })?;
        buf.fill(0);
        for (i, &n) in self.nsids.iter().enumerate() {
            field::set_u32(buf, i * 4, n);
        }
        Ok(())
    }
}

/// One namespace identification descriptor (CNS 0x03).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamespaceIdDescriptor {
    /// NIDT 1: IEEE extended unique identifier (8 bytes).
    Eui64([u8; 8]),
    /// NIDT 2: namespace globally unique identifier (16 bytes).
    Nguid([u8; 16]),
    /// NIDT 3: UUID (16 bytes).
    Uuid([u8; 16]),
    /// NIDT 4: command set identifier (1 byte; 0 = NVM).
    Csi(u8),
    /// Another type, kept as read.
    Unknown {
        /// Type.
        nidt: u8,
        /// Identifier bytes.
        data: Vec<u8>,
    },
}

impl NamespaceIdDescriptor {
    const HEADER: usize = 4;

    fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => 1,
            Self::Nguid(_) => 2,
            Self::Uuid(_) => 3,
            Self::Csi(_) => 4,
            Self::Unknown { nidt, .. } => *nidt,
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Self::Eui64(d) => d,
            Self::Nguid(d) | Self::Uuid(d) => d,
            Self::Csi(c) => core::slice::from_ref(c),
            Self::Unknown { data, .. } => data,
        }
    }

    /// Parses a descriptor list (4096 bytes): descriptors `{NIDT u8, NIDL u8, 2
    /// reserved, NIDL bytes}` until NIDT 0 or the end. A known type with the wrong
    /// length, or a descriptor running past the end, is *Invalid Field*.
    pub fn parse_list(buf: &[u8]) -> Result<Vec<Self>, WireError> {
        let buf = field::checked(buf, IDENTIFY_DATA_LEN, "namespace id descriptor list")?;
        let invalid = |field, offset| WireError::Invalid {
            structure: "namespace id descriptor list",
            field,
            offset,
            status: StatusCode::InvalidField,
        };
        let mut out = Vec::new();
        let mut at = 0;
        while at + Self::HEADER <= buf.len() {
            let nidt = u8_at(buf, at);
            if nidt == 0 {
                break;
            }
            let nidl = usize::from(u8_at(buf, at + 1));
            let data = buf
                .get(at + Self::HEADER..at + Self::HEADER + nidl)
                .ok_or(invalid("NIDL", at + 1))?;
            let d = match (nidt, nidl) {
                (1, 8) => Self::Eui64(field::array(data, 0)),
                (2, 16) => Self::Nguid(field::array(data, 0)),
                (3, 16) => Self::Uuid(field::array(data, 0)),
                (4, 1) => Self::Csi(u8_at(data, 0)),
                (1..=4, _) => return Err(invalid("NIDL", at + 1)),
                _ => Self::Unknown {
                    nidt,
                    data: data.to_vec(),
                },
            };
            out.push(d);
            at += Self::HEADER + nidl;
        }
        Ok(out)
    }

    /// Writes a descriptor list into 4096 bytes (zero-filled after the last).
    /// Errors if the list does not fit, or an `Unknown` descriptor has type 0 or more
    /// than 255 bytes.
    pub fn emit_list(list: &[Self], buf: &mut [u8]) -> Result<(), WireError> {
        let got = buf.len();
        let buf = buf
            .get_mut(..IDENTIFY_DATA_LEN)
            .ok_or(WireError::Truncated {
                structure: "namespace id descriptor list",
                needed: IDENTIFY_DATA_LEN,
                got,
            })?;
        buf.fill(0);
        let mut at = 0;
        for d in list {
            let data = d.data();
            let invalid = WireError::Invalid {
                structure: "namespace id descriptor list",
                field: "descriptor",
                offset: at,
                status: StatusCode::InvalidField,
            };
            let nidl = u8::try_from(data.len()).map_err(|_| invalid)?;
            if d.nidt() == 0 || at + Self::HEADER + data.len() > IDENTIFY_DATA_LEN {
                return Err(invalid);
            }
            field::set_u8(buf, at, d.nidt());
            field::set_u8(buf, at + 1, nidl);
            field::put(buf, at + Self::HEADER, data);
            at += Self::HEADER + data.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::layout::checks;
    use crate::wire::text::Ascii;
    use proptest::prelude::*;

    fn sample_controller() -> IdentifyController {
        IdentifyController {
            vid: 0x1b36,
            ssvid: 0x1af4,
            sn: Ascii::new("SN0001").unwrap(),
            mn: Ascii::new("Linux").unwrap(),
            fr: Ascii::new("6.8").unwrap(),
            mdts: 5,
            cntlid: 1,
            ver: 0x0001_0300,
            cntrltype: ControllerType::Io,
            kas: 50,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn: 32,
            oncs: oncs::DSM | oncs::WRITE_ZEROES | oncs::VERIFY | oncs::COPY,
            vwc: vwc::PRESENT | vwc::FLUSH_ALL_NSID,
            sgls: sgls::SUPPORTED | sgls::KEYED | sgls::OFFSET,
            subnqn: Nqn::new("nqn.2024-01.io.example:disk1").unwrap(),
            ioccsz: IdentifyController::ioccsz_for_inline(8192),
            iorcsz: 1,
            icdoff: 0,
            msdbd: 1,
            ..Default::default()
        }
    }

    #[test]
    fn identify_controller_exact_offsets() {
        let id = sample_controller();
        let mut b = [0xCCu8; 4096];
        id.emit(&mut b).unwrap();
        assert_eq!(&b[0..4], &[0x36, 0x1b, 0xf4, 0x1a]);
        assert_eq!(&b[4..24], b"SN0001              ");
        assert_eq!(&b[24..29], b"Linux");
        assert_eq!(b[64..72], *b"6.8     ");
        assert_eq!(b[77], 5, "MDTS");
        assert_eq!(&b[78..80], &[1, 0], "CNTLID");
        assert_eq!(&b[80..84], &[0, 3, 1, 0], "VER 1.3");
        assert_eq!(b[111], 1, "CNTRLTYPE");
        assert_eq!(&b[320..322], &[50, 0], "KAS");
        assert_eq!((b[512], b[513]), (0x66, 0x44), "SQES/CQES");
        assert_eq!(&b[516..520], &[32, 0, 0, 0], "NN");
        assert_eq!(&b[520..522], &[0x8C, 0x01], "ONCS DSM|WZ|Verify|Copy");
        assert_eq!(b[525], 0x07, "VWC");
        assert_eq!(&b[536..540], &[0x05, 0, 0x10, 0], "SGLS bits 0, 2, 20");
        assert_eq!(&b[768..796], b"nqn.2024-01.io.example:disk1");
        assert!(b[796..1024].iter().all(|&x| x == 0));
        assert_eq!(&b[1792..1796], &516u32.to_le_bytes(), "IOCCSZ (64+8192)/16");
        assert_eq!(&b[1796..1800], &[1, 0, 0, 0], "IORCSZ");
        assert_eq!(&b[1800..1802], &[0, 0], "ICDOFF");
        assert_eq!(b[1803], 1, "MSDBD");
        assert!(b[2048..].iter().all(|&x| x == 0), "reserved zero");
        let back = IdentifyController::parse(&b).unwrap();
        assert_eq!(back, id);
        assert_eq!(back.inline_data_size(), 8192);
        checks::field_table_is_sound::<IdentifyController>();
    }

    #[test]
    fn identify_controller_rejects_bad_text() {
        let mut b = [0u8; 4096];
        sample_controller().emit(&mut b).unwrap();
        let mut bad = b;
        bad[768..1024].fill(b'x'); // SUBNQN without terminator
        assert!(matches!(
            IdentifyController::parse(&bad),
            Err(WireError::Invalid {
                offset: 768,
                status: StatusCode::InvalidField,
                ..
            })
        ));
        let mut bad = b;
        bad[4] = 0x80; // SN not ASCII
        assert!(IdentifyController::parse(&bad).is_err());
        assert!(IdentifyController::parse(&b[..4095]).is_err());
    }

    #[test]
    fn identify_namespace_exact_offsets() {
        let mut lbaf = LbaFormats::default();
        lbaf.0[0] = LbaFormat {
            ms: 0,
            lbads: 9,
            rp: 0,
        };
        lbaf.0[1] = LbaFormat {
            ms: 8,
            lbads: 12,
            rp: 2,
        };
        let ns = IdentifyNamespace {
            nsze: 0x10_0000,
            ncap: 0x10_0000,
            nuse: 0x8000,
            nlbaf: 1,
            flbas: 1,
            dlfeat: 0x01,
            mssrl: 128,
            mcl: 1024,
            msrc: 7,
            lbaf,
            ..Default::default()
        };
        let mut b = [0u8; 4096];
        ns.emit(&mut b).unwrap();
        assert_eq!(&b[0..8], &0x10_0000u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0, 0x80, 0, 0]);
        assert_eq!((b[25], b[26], b[33]), (1, 1, 1));
        assert_eq!(&b[74..76], &[128, 0], "MSSRL");
        assert_eq!(&b[76..80], &1024u32.to_le_bytes(), "MCL");
        assert_eq!(b[80], 7, "MSRC");
        assert_eq!(&b[128..132], &[0, 0, 9, 0], "LBAF0");
        assert_eq!(&b[132..136], &[8, 0, 12, 2], "LBAF1");
        let back = IdentifyNamespace::parse(&b).unwrap();
        assert_eq!(back, ns);
        assert_eq!(back.block_size(), Some(4096));
        let mut ns2 = ns.clone();
        ns2.flbas = 2; // index beyond NLBAF
        assert_eq!(ns2.block_size(), None);
        checks::field_table_is_sound::<IdentifyNamespace>();
    }

    #[test]
    fn namespace_list() {
        let l = NamespaceList::new(vec![1, 2, 10]).unwrap();
        let mut b = [0xFFu8; 4096];
        l.emit(&mut b).unwrap();
        assert_eq!(&b[..16], &[1, 0, 0, 0, 2, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(NamespaceList::parse(&b).unwrap(), l);
        assert!(NamespaceList::new(vec![2, 1]).is_err());
        assert!(NamespaceList::new(vec![0]).is_err());
        assert!(NamespaceList::new((1..=1025).collect()).is_err());
        let full = NamespaceList::new((1..=1024).collect()).unwrap();
        full.emit(&mut b).unwrap();
        assert_eq!(NamespaceList::parse(&b).unwrap().nsids().len(), 1024);
        let mut bad = [0u8; 4096];
        bad[0] = 5;
        bad[4] = 3;
        assert!(matches!(
            NamespaceList::parse(&bad),
            Err(WireError::Invalid { offset: 4, .. })
        ));
        assert!(NamespaceList::overflow().is_overflow());
        assert!(NamespaceList::parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn ns_id_descriptors() {
        let list = vec![
            NamespaceIdDescriptor::Eui64([1; 8]),
            NamespaceIdDescriptor::Nguid([2; 16]),
            NamespaceIdDescriptor::Uuid([3; 16]),
            NamespaceIdDescriptor::Csi(0),
        ];
        let mut b = [0u8; 4096];
        NamespaceIdDescriptor::emit_list(&list, &mut b).unwrap();
        assert_eq!(&b[..4], &[1, 8, 0, 0]);
        assert_eq!(&b[12..16], &[2, 16, 0, 0]);
        assert_eq!(&b[32..36], &[3, 16, 0, 0]);
        assert_eq!(&b[52..57], &[4, 1, 0, 0, 0]);
        assert_eq!(NamespaceIdDescriptor::parse_list(&b).unwrap(), list);
        let mut bad = b;
        bad[1] = 7; // EUI64 with NIDL 7
        assert!(matches!(
            NamespaceIdDescriptor::parse_list(&bad),
            Err(WireError::Invalid { offset: 1, .. })
        ));
        // Unknown descriptors of 259 bytes each; the 16th runs past byte 4096.
        let mut past_end = [0u8; 4096];
        for at in (0..16).map(|i| i * 259) {
            past_end[at] = 9;
            past_end[at + 1] = 255;
        }
        assert!(NamespaceIdDescriptor::parse_list(&past_end).is_err());
        let too_big = vec![NamespaceIdDescriptor::Nguid([0; 16]); 300];
        assert!(NamespaceIdDescriptor::emit_list(&too_big, &mut b).is_err());
    }

    #[test]
    fn identify_command_fields() {
        let mut sqe = SqeRepr::default();
        let c = IdentifyCommand {
            cns: Cns::ActiveNamespaceList,
            cntid: 3,
            cnssid: 0,
            csi: 0,
        };
        c.apply(&mut sqe);
        assert_eq!(sqe.cdw10_15[0], 0x0003_0002);
        assert_eq!(IdentifyCommand::from_sqe(&sqe), c);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn identify_round_trips(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            checks::random_bytes_round_trip::<IdentifyController>(bytes.clone());
            checks::random_bytes_round_trip::<IdentifyNamespace>(bytes.clone());
            // Random bytes never panic the list parsers.
            let _ = NamespaceList::parse(&bytes);
            if let Ok(list) = NamespaceIdDescriptor::parse_list(&bytes) {
                let mut out = [0u8; 4096];
                NamespaceIdDescriptor::emit_list(&list, &mut out).unwrap();
                prop_assert_eq!(NamespaceIdDescriptor::parse_list(&out).unwrap(), list);
            }
        }

        #[test]
        fn namespace_list_round_trip(mut nsids in proptest::collection::btree_set(1u32.., 0..1024)) {
            let l = NamespaceList::new(std::mem::take(&mut nsids).into_iter().collect()).unwrap();
            let mut b = [0u8; 4096];
            l.emit(&mut b).unwrap();
            prop_assert_eq!(NamespaceList::parse(&b).unwrap(), l);
        }
    }
}

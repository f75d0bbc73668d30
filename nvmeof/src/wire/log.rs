//! Log pages and the Get Log Page command.
//!
//! * [`GetLogPage`] – LID, LSP, RAE, NUMDL/NUMDU, LSI, LPO, UUID index, CSI;
//! * discovery log (LID 0x70): [`DiscoveryLogHeader`] (1024 bytes) and
//!   [`DiscoveryLogEntry`] records (1024 bytes each, with [`RdmaTsas`]), together as
//!   [`DiscoveryLog`];
//! * [`ErrorInformationEntry`] (LID 0x01, 64 bytes each);
//! * [`SmartLog`] (LID 0x02, 512 bytes);
//! * the Changed Namespace List (LID 0x04) is a [`NamespaceList`].

use super::field::bits32;
use super::layout::{parse_list, FixedLayout};
use super::sqe::SqeRepr;
use super::text::{Nqn, NulPadded};
use super::{StatusCode, WireError};

pub use super::identify::NamespaceList;

raw_enum! {
    /// Log page identifiers (LID).
    pub enum LogPageId: u8 {
        /// Error information.
        ErrorInformation = 0x01,
        /// SMART / health information.
        SmartHealth = 0x02,
        /// Firmware slot information.
        FirmwareSlot = 0x03,
        /// Changed namespace list.
        ChangedNamespaceList = 0x04,
        /// Commands supported and effects.
        CommandsSupported = 0x05,
        /// Device self-test.
        DeviceSelfTest = 0x06,
        /// Asymmetric namespace access.
        Ana = 0x0c,
        /// Discovery (discovery controllers).
        Discovery = 0x70,
        /// Reservation notification.
        ReservationNotification = 0x80,
        /// Sanitize status.
        SanitizeStatus = 0x81,
    }
}

/// Get Log Page command fields (CDW10-14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GetLogPage {
    /// Log page identifier (CDW10 bits 7:0).
    pub lid: LogPageId,
    /// Log specific parameter (CDW10 bits 14:8).
    pub lsp: u8,
    /// Retain asynchronous event (CDW10 bit 15).
    pub rae: bool,
    /// Number of dwords to return, 0's based: NUMDL (CDW10 bits 31:16) and NUMDU
    /// (CDW11 bits 15:0).
    pub numd: u32,
    /// Log specific identifier (CDW11 bits 31:16).
    pub lsi: u16,
    /// Log page offset in bytes (CDW12-13).
    pub lpo: u64,
    /// UUID index (CDW14 bits 6:0).
    pub uuid_index: u8,
    /// Offset type: LPO is an index, not bytes (CDW14 bit 23).
    pub ot: bool,
    /// Command set identifier (CDW14 bits 31:24).
    pub csi: u8,
}

impl GetLogPage {
    /// Reads the fields from an SQE.
    pub fn from_sqe(sqe: &SqeRepr) -> GetLogPage {
        let [cdw10, cdw11, _, _, cdw14, _] = sqe.cdw10_15;
        GetLogPage {
            lid: LogPageId::from(bits32(cdw10, 0, 8) as u8),
            lsp: bits32(cdw10, 8, 7) as u8,
            rae: bits32(cdw10, 15, 1) != 0,
            numd: bits32(cdw10, 16, 16) | (bits32(cdw11, 0, 16) << 16),
            lsi: bits32(cdw11, 16, 16) as u16,
            lpo: sqe.cdw_u64(12),
            uuid_index: bits32(cdw14, 0, 7) as u8,
            ot: bits32(cdw14, 23, 1) != 0,
            csi: bits32(cdw14, 24, 8) as u8,
        }
    }

    /// Writes the fields into an SQE's CDW10-14.
    pub fn apply(&self, sqe: &mut SqeRepr) {
        sqe.cdw10_15[0] = u32::from(u8::from(self.lid))
            | (u32::from(self.lsp & 0x7F) << 8)
            | (u32::from(self.rae) << 15)
            | ((self.numd & 0xFFFF) << 16);
        sqe.cdw10_15[1] = (self.numd >> 16) | (u32::from(self.lsi) << 16);
        sqe.set_cdw_u64(12, self.lpo);
        sqe.cdw10_15[4] = u32::from(self.uuid_index & 0x7F)
            | (u32::from(self.ot) << 23)
            | (u32::from(self.csi) << 24);
    }

    /// Bytes the command asks for: `(numd + 1) * 4`.
    pub fn transfer_len(&self) -> u64 {
        (u64::from(self.numd) + 1) * 4
    }

    /// The fields to read `len` bytes (a multiple of 4, at least 4) of page `lid`
    /// from byte `offset`.
    pub fn for_bytes(lid: LogPageId, offset: u64, len: u32) -> GetLogPage {
        GetLogPage {
            lid,
            numd: (len / 4).saturating_sub(1),
            lpo: offset,
            ..Default::default()
        }
    }
}

raw_enum! {
    /// Transport type (TRTYPE).
    pub enum TransportType: u8 {
        /// RDMA.
        Rdma = 1,
        /// Fibre Channel.
        FibreChannel = 2,
        /// TCP.
        Tcp = 3,
        /// Intra-host (loop).
        Loop = 254,
    }
}

raw_enum! {
    /// Address family (ADRFAM).
    pub enum AddressFamily: u8 {
        /// IPv4.
        Ipv4 = 1,
        /// IPv6.
        Ipv6 = 2,
        /// InfiniBand.
        Infiniband = 3,
        /// Fibre Channel.
        FibreChannel = 4,
        /// Intra-host.
        Loop = 254,
    }
}

raw_enum! {
    /// Subsystem type (SUBTYPE) of a discovery log entry.
    pub enum SubsystemType: u8 {
        /// A referral to another discovery service.
        Referral = 1,
        /// An NVM subsystem.
        Nvme = 2,
        /// The current discovery subsystem.
        CurrentDiscovery = 3,
    }
}

/// Bits of [`DiscoveryLogEntry::treq`] (transport requirements).
pub mod treq {
    /// Secure channel not specified (bits 1:0 = 00b).
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0b00;
    /// Secure channel required (bits 1:0 = 01b).
    pub const SECURE_CHANNEL_REQUIRED: u8 = 0b01;
    /// Secure channel not required (bits 1:0 = 10b).
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
    /// SQ flow control disable supported (bit 2).
    pub const DISABLE_SQFLOW: u8 = 1 << 2;
}

raw_enum! {
    /// RDMA QP service type (TSAS byte 0).
    pub enum RdmaQpType: u8 {
        /// Reliable connected.
        Connected = 1,
        /// Reliable datagram.
        Datagram = 2,
    }
}

raw_enum! {
    /// RDMA provider type (TSAS byte 1).
    pub enum RdmaProviderType: u8 {
        /// No provider specified.
        NotSpecified = 1,
        /// InfiniBand.
        Infiniband = 2,
        /// RoCE (v1).
        Roce = 3,
        /// RoCE v2.
        RoceV2 = 4,
        /// iWARP.
        Iwarp = 5,
    }
}

raw_enum! {
    /// RDMA connection management service (TSAS byte 2).
    pub enum RdmaCms: u8 {
        /// RDMA_CM.
        RdmaCm = 1,
    }
}

crate::fixed_layout! {
    /// Transport specific address subtype for RDMA (the 256-byte TSAS of a discovery
    /// log entry). Other transports use the same bytes differently (TCP: SECTYPE at
    /// byte 0); their entries read as this struct keep only these fields.
    pub struct RdmaTsas: 256 bytes, "RDMA TSAS", invalid = StatusCode::InvalidField {
        /// QP service type.
        qptype: RdmaQpType = 0,
        /// Provider type.
        prtype: RdmaProviderType = 1,
        /// Connection management service.
        cms: RdmaCms = 2,
        /// Partition key (InfiniBand).
        pkey: u16 = 8,
    }
}

crate::fixed_layout! {
    /// Discovery log page header (the first 1024 bytes of LID 0x70).
    pub struct DiscoveryLogHeader: 1024 bytes, "discovery log header", invalid = StatusCode::InvalidField {
        /// Generation counter: changes whenever the log changes.
        genctr: u64 = 0,
        /// Number of records (entries) that follow.
        numrec: u64 = 8,
        /// Record format, 0.
        recfmt: u16 = 16,
    }
}

crate::fixed_layout! {
    /// One discovery log page entry (1024 bytes).
    pub struct DiscoveryLogEntry: 1024 bytes, "discovery log entry", invalid = StatusCode::InvalidField {
        /// Transport type.
        trtype: TransportType = 0,
        /// Address family.
        adrfam: AddressFamily = 1,
        /// Subsystem type.
        subtype: SubsystemType = 2,
        /// Transport requirements ([`treq`]).
        treq: u8 = 3,
        /// Port ID.
        portid: u16 = 4,
        /// Controller ID (0xFFFF: dynamic).
        cntlid: u16 = 6,
        /// Admin max SQ size.
        asqsz: u16 = 8,
        /// Entry flags.
        eflags: u16 = 10,
        /// Transport service identifier (e.g. "4420").
        trsvcid: NulPadded<32> = 32,
        /// Subsystem NQN.
        subnqn: Nqn = 256,
        /// Transport address (e.g. "192.168.0.1").
        traddr: NulPadded<256> = 512,
        /// Transport specific address subtype (RDMA).
        tsas: RdmaTsas = 768,
    }
}

/// A whole discovery log page: header and entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiscoveryLog {
    /// Generation counter.
    pub genctr: u64,
    /// Entries (the header's NUMREC is their count).
    pub entries: Vec<DiscoveryLogEntry>,
}

impl DiscoveryLog {
    /// Parses a page read from offset 0. A host reads the header first and then
    /// `1024 * (numrec + 1)` bytes; a shorter buffer is an error, so a page that
    /// changed between reads does not parse as a wrong one. A record format other
    /// than 0 is *Invalid Field*.
    pub fn parse(buf: &[u8]) -> Result<DiscoveryLog, WireError> {
        let header = DiscoveryLogHeader::parse(buf)?;
        if header.recfmt != 0 {
            return Err(WireError::Invalid {
                structure: "discovery log header",
                field: "recfmt",
                offset: 16,
                status: StatusCode::InvalidField,
            });
        }
        let count = usize::try_from(header.numrec).unwrap_or(usize::MAX);
        let rest = buf.get(DiscoveryLogHeader::LEN..).unwrap_or_default();
        let entries = parse_list(rest, count).map_err(|e| e.within(DiscoveryLogHeader::LEN))?;
        Ok(DiscoveryLog {
            genctr: header.genctr,
            entries,
        })
    }

    /// Bytes of the whole page.
    pub fn len(&self) -> usize {
        DiscoveryLogHeader::LEN + self.entries.len() * DiscoveryLogEntry::LEN
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The whole page as bytes (a target then copies the requested LPO range).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        let header = DiscoveryLogHeader {
            genctr: self.genctr,
            numrec: self.entries.len() as u64,
            recfmt: 0,
        };
        // `out` was sized for the header and every entry, so these emits cannot fail.
        let _ = header.emit(&mut out);
        for (e, chunk) in self
            .entries
            .iter()
            .zip(out[DiscoveryLogHeader::LEN..].chunks_exact_mut(DiscoveryLogEntry::LEN))
        {
            let _ = e.emit_bytes(chunk);
        }
        out
    }
}

crate::fixed_layout! {
    /// Error information log entry (64 bytes; LID 0x01 returns a list of them).
    pub struct ErrorInformationEntry: 64 bytes, "error information entry", invalid = StatusCode::InvalidField {
        /// Error count: unique, increasing; 0 = empty entry.
        error_count: u64 = 0,
        /// Submission queue ID of the failed command.
        sqid: u16 = 8,
        /// Command ID of the failed command.
        cid: u16 = 10,
        /// Status field as in the CQE (bit 0 phase; see [`Status::from_field`](super::Status::from_field)).
        status_field: u16 = 12,
        /// Parameter error location: byte (bits 7:0) and bit (bits 10:8) in the SQE.
        parameter_error_location: u16 = 14,
        /// First LBA that had the error.
        lba: u64 = 16,
        /// Namespace ID.
        nsid: u32 = 24,
        /// Vendor specific information available (log page ID).
        vs: u8 = 28,
        /// Transport type.
        trtype: TransportType = 29,
        /// Command specific information.
        cs: u64 = 32,
        /// Transport type specific information.
        trtype_specific: u16 = 40,
    }
}

impl ErrorInformationEntry {
    /// The parameter error location for byte `byte`, bit `bit` of the SQE.
    pub fn parameter_location(byte: u8, bit: u8) -> u16 {
        u16::from(byte) | (u16::from(bit & 0x7) << 8)
    }
}

crate::fixed_layout! {
    /// SMART / health information log (LID 0x02, 512 bytes). 128-bit counters are
    /// `u128`; data units are thousands of 512-byte units.
    pub struct SmartLog: 512 bytes, "SMART / health log", invalid = StatusCode::InvalidField {
        /// Critical warning bits.
        critical_warning: u8 = 0,
        /// Composite temperature (kelvin).
        temperature: u16 = 1,
        /// Available spare (%).
        avail_spare: u8 = 3,
        /// Available spare threshold (%).
        spare_thresh: u8 = 4,
        /// Percentage used.
        percent_used: u8 = 5,
        /// Endurance group critical warning summary.
        endurance_group_warning: u8 = 6,
        /// Data units read.
        data_units_read: u128 = 32,
        /// Data units written.
        data_units_written: u128 = 48,
        /// Host read commands.
        host_reads: u128 = 64,
        /// Host write commands.
        host_writes: u128 = 80,
        /// Controller busy time (minutes).
        ctrl_busy_time: u128 = 96,
        /// Power cycles.
        power_cycles: u128 = 112,
        /// Power on hours.
        power_on_hours: u128 = 128,
        /// Unsafe shutdowns.
        unsafe_shutdowns: u128 = 144,
        /// Media and data integrity errors.
        media_errors: u128 = 160,
        /// Number of error information log entries.
        num_err_log_entries: u128 = 176,
        /// Warning composite temperature time (minutes).
        warning_temp_time: u32 = 192,
        /// Critical composite temperature time (minutes).
        critical_comp_time: u32 = 196,
        /// Temperature sensors 1-8 (kelvin).
        temp_sensors: [u16; 8] = 200,
        /// Thermal management temperature 1 transition count.
        thm_temp1_trans_count: u32 = 216,
        /// Thermal management temperature 2 transition count.
        thm_temp2_trans_count: u32 = 220,
        /// Total time for thermal management temperature 1 (s).
        thm_temp1_total_time: u32 = 224,
        /// Total time for thermal management temperature 2 (s).
        thm_temp2_total_time: u32 = 228,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::layout::checks;
    use proptest::prelude::*;

    fn rdma_entry() -> DiscoveryLogEntry {
        DiscoveryLogEntry {
            trtype: TransportType::Rdma,
            adrfam: AddressFamily::Ipv4,
            subtype: SubsystemType::Nvme,
            treq: treq::SECURE_CHANNEL_NOT_SPECIFIED,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 32,
            eflags: 0,
            trsvcid: NulPadded::new("4420").unwrap(),
            subnqn: Nqn::new("nqn.2024-01.io.example:disk1").unwrap(),
            traddr: NulPadded::new("192.168.1.10").unwrap(),
            tsas: RdmaTsas {
                qptype: RdmaQpType::Connected,
                prtype: RdmaProviderType::NotSpecified,
                cms: RdmaCms::RdmaCm,
                pkey: 0,
            },
        }
    }

    #[test]
    fn discovery_log_exact_offsets() {
        let log = DiscoveryLog {
            genctr: 7,
            entries: vec![rdma_entry(), rdma_entry()],
        };
        let b = log.to_vec();
        assert_eq!(b.len(), 3 * 1024);
        assert_eq!(&b[0..8], &7u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..18], &[0, 0]);
        let e = &b[1024..2048];
        assert_eq!(
            &e[0..4],
            &[1, 1, 2, 0],
            "TRTYPE RDMA, ADRFAM IPv4, SUBTYPE NVMe, TREQ"
        );
        assert_eq!(&e[4..10], &[1, 0, 0xFF, 0xFF, 32, 0]);
        assert_eq!(&e[32..37], b"4420\0");
        assert_eq!(&e[256..260], b"nqn.");
        assert_eq!(&e[512..525], b"192.168.1.10\0");
        assert_eq!(&e[768..771], &[1, 1, 1], "QPTYPE, PRTYPE, CMS");
        assert_eq!(DiscoveryLog::parse(&b).unwrap(), log);
        // A buffer cut inside the entries is an error, not a shorter log.
        assert!(matches!(
            DiscoveryLog::parse(&b[..2500]),
            Err(WireError::Truncated { .. })
        ));
        let mut bad = b.clone();
        bad[16] = 1;
        assert_eq!(
            DiscoveryLog::parse(&bad).unwrap_err().status(),
            Some(StatusCode::InvalidField)
        );
        // Space-padded addresses (as some targets send) read the same.
        let mut spaced = b.clone();
        spaced[1024 + 32 + 4..1024 + 64].fill(b' ');
        assert_eq!(DiscoveryLog::parse(&spaced).unwrap(), log);
        checks::field_table_is_sound::<DiscoveryLogHeader>();
        checks::field_table_is_sound::<DiscoveryLogEntry>();
        checks::field_table_is_sound::<RdmaTsas>();
    }

    #[test]
    fn get_log_page_fields() {
        let g = GetLogPage::for_bytes(LogPageId::Discovery, 1024, 4096);
        let mut sqe = SqeRepr::default();
        g.apply(&mut sqe);
        assert_eq!(sqe.cdw10_15[0], 0x70 | (1023 << 16));
        assert_eq!(sqe.cdw10_15[2], 1024);
        assert_eq!(GetLogPage::from_sqe(&sqe), g);
        assert_eq!(g.transfer_len(), 4096);
        let big = GetLogPage {
            numd: 0x1_0002,
            rae: true,
            lsp: 0x7F,
            ..Default::default()
        };
        big.apply(&mut sqe);
        assert_eq!(sqe.cdw10_15[1] & 0xFFFF, 1, "NUMDU");
        assert_eq!(sqe.cdw10_15[0] >> 16, 2, "NUMDL");
        assert_eq!(GetLogPage::from_sqe(&sqe), big);
    }

    #[test]
    fn error_and_smart_exact_offsets() {
        let e = ErrorInformationEntry {
            error_count: 1,
            sqid: 2,
            cid: 3,
            status_field: 0x8004,
            parameter_error_location: ErrorInformationEntry::parameter_location(44, 0),
            trtype: TransportType::Rdma,
            ..Default::default()
        };
        let mut b = [0u8; 64];
        e.emit(&mut b).unwrap();
        assert_eq!(&b[8..16], &[2, 0, 3, 0, 0x04, 0x80, 44, 0]);
        assert_eq!(b[29], 1);
        assert_eq!(ErrorInformationEntry::parse(&b).unwrap(), e);
        let s = SmartLog {
            temperature: 300,
            avail_spare: 100,
            data_units_read: 1 << 70,
            power_on_hours: 5,
            ..Default::default()
        };
        let mut b = [0u8; 512];
        s.emit(&mut b).unwrap();
        assert_eq!(&b[1..3], &300u16.to_le_bytes());
        assert_eq!(b[3], 100);
        assert_eq!(b[32 + 8], 0x40, "bit 70 of DATA UNITS READ");
        assert_eq!(b[128], 5);
        assert_eq!(SmartLog::parse(&b).unwrap(), s);
        checks::field_table_is_sound::<ErrorInformationEntry>();
        checks::field_table_is_sound::<SmartLog>();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn log_round_trips(bytes in proptest::collection::vec(any::<u8>(), 1024)) {
            checks::random_bytes_round_trip::<DiscoveryLogHeader>(bytes.clone());
            checks::random_bytes_round_trip::<DiscoveryLogEntry>(bytes.clone());
            checks::random_bytes_round_trip::<ErrorInformationEntry>(bytes.clone());
            checks::random_bytes_round_trip::<SmartLog>(bytes.clone());
            // Random pages never panic the parser.
            let _ = DiscoveryLog::parse(&bytes);
        }

        #[test]
        fn get_log_page_round_trip(lid in any::<u8>(), lsp in 0u8..0x80, rae in any::<bool>(), numd in any::<u32>(),
                                   lsi in any::<u16>(), lpo in any::<u64>(), uuid_index in 0u8..0x80,
                                   ot in any::<bool>(), csi in any::<u8>()) {
            let g = GetLogPage { lid: LogPageId::from(lid), lsp, rae, numd, lsi, lpo, uuid_index, ot, csi };
            let mut sqe = SqeRepr::default();
            g.apply(&mut sqe);
            prop_assert_eq!(GetLogPage::from_sqe(&sqe), g);
        }
    }
}

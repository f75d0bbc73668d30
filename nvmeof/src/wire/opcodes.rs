//! Admin and NVM I/O opcodes, the fields of the NVM I/O commands, Dataset Management
//! ranges and Copy source range entries.
//!
//! Read, Write, Compare, Write Zeroes and Verify share one layout
//! ([`IoCommand`]): SLBA in CDW10-11, NLB (0's based) in CDW12 bits 15:0, FUA bit 30,
//! Limited Retry bit 31. Dataset Management ([`DsmCommand`]) and Copy
//! ([`CopyCommand`]) carry a list of ranges as data ([`DsmRange`],
//! [`CopySourceRange`]).

use super::field::{bits32, with_bits32};
use super::sqe::SqeRepr;
use super::status::StatusCode;

raw_enum! {
    /// Admin command set opcodes.
    pub enum AdminOpcode: u8 {
        /// Delete I/O Submission Queue.
        DeleteIoSq = 0x00,
        /// Create I/O Submission Queue.
        CreateIoSq = 0x01,
        /// Get Log Page.
        GetLogPage = 0x02,
        /// Delete I/O Completion Queue.
        DeleteIoCq = 0x04,
        /// Create I/O Completion Queue.
        CreateIoCq = 0x05,
        /// Identify.
        Identify = 0x06,
        /// Abort.
        Abort = 0x08,
        /// Set Features.
        SetFeatures = 0x09,
        /// Get Features.
        GetFeatures = 0x0a,
        /// Asynchronous Event Request.
        AsyncEventRequest = 0x0c,
        /// Namespace Management.
        NamespaceManagement = 0x0d,
        /// Firmware Commit.
        FirmwareCommit = 0x10,
        /// Firmware Image Download.
        FirmwareImageDownload = 0x11,
        /// Device Self-test.
        DeviceSelfTest = 0x14,
        /// Namespace Attachment.
        NamespaceAttachment = 0x15,
        /// Keep Alive.
        KeepAlive = 0x18,
        /// Directive Send.
        DirectiveSend = 0x19,
        /// Directive Receive.
        DirectiveReceive = 0x1a,
        /// Fabrics command (see [`fabrics`](super::fabrics)).
        Fabrics = 0x7f,
        /// Format NVM.
        FormatNvm = 0x80,
        /// Security Send.
        SecuritySend = 0x81,
        /// Security Receive.
        SecurityReceive = 0x82,
        /// Sanitize.
        Sanitize = 0x84,
    }
}

raw_enum! {
    /// NVM command set I/O opcodes.
    pub enum IoOpcode: u8 {
        /// Flush (NSID 0xFFFFFFFF: all namespaces).
        Flush = 0x00,
        /// Write.
        Write = 0x01,
        /// Read.
        Read = 0x02,
        /// Write Uncorrectable.
        WriteUncorrectable = 0x04,
        /// Compare.
        Compare = 0x05,
        /// Write Zeroes.
        WriteZeroes = 0x08,
        /// Dataset Management.
        DatasetManagement = 0x09,
        /// Verify.
        Verify = 0x0c,
        /// Reservation Register.
        ReservationRegister = 0x0d,
        /// Reservation Report.
        ReservationReport = 0x0e,
        /// Reservation Acquire.
        ReservationAcquire = 0x11,
        /// Reservation Release.
        ReservationRelease = 0x15,
        /// Copy.
        Copy = 0x19,
    }
}

/// NSID that addresses every namespace (Flush, some Get Log Page/Features uses).
pub const NSID_ALL: u32 = 0xFFFF_FFFF;

/// The CDW10-13 fields of Read, Write, Compare, Write Zeroes, Verify and Write
/// Uncorrectable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IoCommand {
    /// Starting LBA (CDW10-11).
    pub slba: u64,
    /// Number of logical blocks, 0's based as on the wire: 0 means one block
    /// (CDW12 bits 15:0).
    pub nlb: u16,
    /// Directive type (CDW12 bits 23:20, Write).
    pub dtype: u8,
    /// Storage tag check (CDW12 bit 24).
    pub stc: bool,
    /// Deallocate (CDW12 bit 25, Write Zeroes).
    pub deac: bool,
    /// Protection information field (CDW12 bits 29:26).
    pub prinfo: u8,
    /// Force unit access (CDW12 bit 30).
    pub fua: bool,
    /// Limited retry (CDW12 bit 31).
    pub lr: bool,
    /// Dataset management hints (CDW13 bits 7:0).
    pub dsm: u8,
    /// Directive specific (CDW13 bits 31:16).
    pub dspec: u16,
}

impl IoCommand {
    /// Reads the fields from an SQE's CDW10-13.
    pub fn from_sqe(sqe: &SqeRepr) -> IoCommand {
        let [_, _, cdw12, cdw13, ..] = sqe.cdw10_15;
        IoCommand {
            slba: sqe.cdw_u64(10),
            nlb: bits32(cdw12, 0, 16) as u16,
            dtype: bits32(cdw12, 20, 4) as u8,
            stc: bits32(cdw12, 24, 1) != 0,
            deac: bits32(cdw12, 25, 1) != 0,
            prinfo: bits32(cdw12, 26, 4) as u8,
            fua: bits32(cdw12, 30, 1) != 0,
            lr: bits32(cdw12, 31, 1) != 0,
            dsm: bits32(cdw13, 0, 8) as u8,
            dspec: bits32(cdw13, 16, 16) as u16,
        }
    }

    /// Writes the fields into an SQE's CDW10-13 (CDW14-15 are left alone).
    pub fn apply(&self, sqe: &mut SqeRepr) {
        let mut cdw12 = u32::from(self.nlb);
        cdw12 = with_bits32(cdw12, 20, 4, self.dtype.into());
        cdw12 = with_bits32(cdw12, 24, 1, self.stc.into());
        cdw12 = with_bits32(cdw12, 25, 1, self.deac.into());
        cdw12 = with_bits32(cdw12, 26, 4, self.prinfo.into());
        cdw12 = with_bits32(cdw12, 30, 1, self.fua.into());
        cdw12 = with_bits32(cdw12, 31, 1, self.lr.into());
        sqe.set_cdw_u64(10, self.slba);
        sqe.cdw10_15[2] = cdw12;
        sqe.cdw10_15[3] = u32::from(self.dsm) | (u32::from(self.dspec) << 16);
    }

    /// Number of blocks the command covers (`nlb + 1`).
    pub fn block_count(&self) -> u32 {
        u32::from(self.nlb) + 1
    }

    /// Whether the command stays inside a namespace of `nsze` blocks; a target
    /// answers [`StatusCode::LbaOutOfRange`] otherwise.
    pub fn check_range(&self, nsze: u64) -> Result<(), StatusCode> {
        match self.slba.checked_add(u64::from(self.block_count())) {
            Some(end) if end <= nsze => Ok(()),
            _ => Err(StatusCode::LbaOutOfRange),
        }
    }
}

/// The CDW10-11 fields of Dataset Management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DsmCommand {
    /// Number of ranges, 0's based (CDW10 bits 7:0).
    pub nr: u8,
    /// Integral dataset for read (CDW11 bit 0).
    pub idr: bool,
    /// Integral dataset for write (CDW11 bit 1).
    pub idw: bool,
    /// Deallocate (CDW11 bit 2).
    pub ad: bool,
}

impl DsmCommand {
    /// Reads the fields from an SQE.
    pub fn from_sqe(sqe: &SqeRepr) -> DsmCommand {
        let [cdw10, cdw11, ..] = sqe.cdw10_15;
        DsmCommand {
            nr: bits32(cdw10, 0, 8) as u8,
            idr: bits32(cdw11, 0, 1) != 0,
            idw: bits32(cdw11, 1, 1) != 0,
            ad: bits32(cdw11, 2, 1) != 0,
        }
    }

    /// Writes the fields into an SQE's CDW10-11.
    pub fn apply(&self, sqe: &mut SqeRepr) {
        sqe.cdw10_15[0] = u32::from(self.nr);
        sqe.cdw10_15[1] =
            u32::from(self.idr) | (u32::from(self.idw) << 1) | (u32::from(self.ad) << 2);
    }

    /// Number of ranges (`nr + 1`).
    pub fn range_count(&self) -> usize {
        usize::from(self.nr) + 1
    }
}

crate::fixed_layout! {
    /// One Dataset Management range (16 bytes).
    pub struct DsmRange: 16 bytes, "dataset management range", invalid = StatusCode::InvalidField {
        /// Context attributes.
        cattr: u32 = 0,
        /// Length in logical blocks (not 0's based).
        nlb: u32 = 4,
        /// Starting LBA.
        slba: u64 = 8,
    }
}

/// The CDW10-12 fields of Copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CopyCommand {
    /// Starting destination LBA (CDW10-11).
    pub sdlba: u64,
    /// Number of source ranges, 0's based (CDW12 bits 7:0).
    pub nr: u8,
    /// Source range entry format (CDW12 bits 11:8); 0 is [`CopySourceRange`].
    pub format: u8,
    /// Protection information for reads (CDW12 bits 15:12).
    pub prinfor: u8,
    /// Directive type (CDW12 bits 23:20).
    pub dtype: u8,
    /// Storage tag check for writes (CDW12 bit 24).
    pub stcw: bool,
    /// Protection information for writes (CDW12 bits 29:26).
    pub prinfow: u8,
    /// Force unit access (CDW12 bit 30).
    pub fua: bool,
    /// Limited retry (CDW12 bit 31).
    pub lr: bool,
}

impl CopyCommand {
    /// Reads the fields from an SQE.
    pub fn from_sqe(sqe: &SqeRepr) -> CopyCommand {
        let cdw12 = sqe.cdw10_15[2];
        CopyCommand {
            sdlba: sqe.cdw_u64(10),
            nr: bits32(cdw12, 0, 8) as u8,
            format: bits32(cdw12, 8, 4) as u8,
            prinfor: bits32(cdw12, 12, 4) as u8,
            dtype: bits32(cdw12, 20, 4) as u8,
            stcw: bits32(cdw12, 24, 1) != 0,
            prinfow: bits32(cdw12, 26, 4) as u8,
            fua: bits32(cdw12, 30, 1) != 0,
            lr: bits32(cdw12, 31, 1) != 0,
        }
    }

    /// Writes the fields into an SQE's CDW10-12.
    pub fn apply(&self, sqe: &mut SqeRepr) {
        let mut cdw12 = u32::from(self.nr);
        cdw12 = with_bits32(cdw12, 8, 4, self.format.into());
        cdw12 = with_bits32(cdw12, 12, 4, self.prinfor.into());
        cdw12 = with_bits32(cdw12, 20, 4, self.dtype.into());
        cdw12 = with_bits32(cdw12, 24, 1, self.stcw.into());
        cdw12 = with_bits32(cdw12, 26, 4, self.prinfow.into());
        cdw12 = with_bits32(cdw12, 30, 1, self.fua.into());
        cdw12 = with_bits32(cdw12, 31, 1, self.lr.into());
        sqe.set_cdw_u64(10, self.sdlba);
        sqe.cdw10_15[2] = cdw12;
    }

    /// Number of source ranges (`nr + 1`).
    pub fn range_count(&self) -> usize {
        usize::from(self.nr) + 1
    }
}

crate::fixed_layout! {
    /// A Copy source range entry, format 0 (32 bytes).
    pub struct CopySourceRange: 32 bytes, "copy source range", invalid = StatusCode::InvalidField {
        /// Starting LBA.
        slba: u64 = 8,
        /// Number of logical blocks, 0's based.
        nlb: u16 = 16,
        /// Expected initial logical block reference tag.
        eilbrt: u32 = 24,
        /// Expected logical block application tag.
        elbat: u16 = 28,
        /// Expected logical block application tag mask.
        elbatm: u16 = 30,
    }
}

raw_enum! {
    /// Feature identifiers (Set/Get Features CDW10 bits 7:0).
    pub enum FeatureId: u8 {
        /// Arbitration.
        Arbitration = 0x01,
        /// Power Management.
        PowerManagement = 0x02,
        /// Temperature Threshold.
        TemperatureThreshold = 0x04,
        /// Error Recovery.
        ErrorRecovery = 0x05,
        /// Volatile Write Cache.
        VolatileWriteCache = 0x06,
        /// Number of Queues.
        NumberOfQueues = 0x07,
        /// Interrupt Coalescing.
        InterruptCoalescing = 0x08,
        /// Write Atomicity Normal.
        WriteAtomicity = 0x0a,
        /// Asynchronous Event Configuration.
        AsyncEventConfig = 0x0b,
        /// Keep Alive Timer.
        KeepAliveTimer = 0x0f,
        /// Host Identifier.
        HostIdentifier = 0x81,
    }
}

/// The Number of Queues feature value (Set Features CDW11, completion DW0): I/O
/// submission and completion queue counts, both 0's based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NumberOfQueues {
    /// Number of I/O submission queues, 0's based (bits 15:0).
    pub nsqr: u16,
    /// Number of I/O completion queues, 0's based (bits 31:16).
    pub ncqr: u16,
}

impl NumberOfQueues {
    /// From the dword.
    pub fn from_dword(v: u32) -> NumberOfQueues {
        NumberOfQueues {
            nsqr: v as u16,
            ncqr: (v >> 16) as u16,
        }
    }

    /// To the dword.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.nsqr) | (u32::from(self.ncqr) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::layout::checks;
    use proptest::prelude::*;

    #[test]
    fn opcode_values() {
        assert_eq!(u8::from(IoOpcode::Read), 0x02);
        assert_eq!(u8::from(IoOpcode::Write), 0x01);
        assert_eq!(u8::from(IoOpcode::Flush), 0x00);
        assert_eq!(u8::from(IoOpcode::WriteZeroes), 0x08);
        assert_eq!(u8::from(IoOpcode::DatasetManagement), 0x09);
        assert_eq!(u8::from(IoOpcode::Verify), 0x0c);
        assert_eq!(u8::from(IoOpcode::Compare), 0x05);
        assert_eq!(u8::from(IoOpcode::Copy), 0x19);
        assert_eq!(u8::from(AdminOpcode::GetLogPage), 0x02);
        assert_eq!(u8::from(AdminOpcode::Identify), 0x06);
        assert_eq!(u8::from(AdminOpcode::Abort), 0x08);
        assert_eq!(u8::from(AdminOpcode::SetFeatures), 0x09);
        assert_eq!(u8::from(AdminOpcode::GetFeatures), 0x0a);
        assert_eq!(u8::from(AdminOpcode::AsyncEventRequest), 0x0c);
        assert_eq!(u8::from(AdminOpcode::KeepAlive), 0x18);
        assert_eq!(AdminOpcode::from(0x7f), AdminOpcode::Fabrics);
        assert_eq!(IoOpcode::from(0x03), IoOpcode::Unknown(0x03));
    }

    #[test]
    fn write_fua_exact_bytes() {
        let mut sqe = SqeRepr::default();
        IoCommand {
            slba: 0x1_0000_0002,
            nlb: 7,
            fua: true,
            ..Default::default()
        }
        .apply(&mut sqe);
        let b = sqe.to_bytes();
        assert_eq!(&b[40..48], &[2, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&b[48..52], &[7, 0, 0, 0x40], "NLB 7 (8 blocks), FUA bit 30");
        let cmd = IoCommand::from_sqe(&sqe);
        assert_eq!(cmd.block_count(), 8);
        assert!(cmd.check_range(0x1_0000_000A).is_ok());
        assert_eq!(
            cmd.check_range(0x1_0000_0009),
            Err(StatusCode::LbaOutOfRange)
        );
        let huge = IoCommand {
            slba: u64::MAX,
            ..Default::default()
        };
        assert_eq!(huge.check_range(u64::MAX), Err(StatusCode::LbaOutOfRange));
    }

    #[test]
    fn dsm_range_and_copy_range_exact_bytes() {
        let r = DsmRange {
            cattr: 1,
            nlb: 0x20,
            slba: 0x1234,
        };
        let mut b = [0u8; 16];
        r.emit(&mut b).unwrap();
        assert_eq!(b, [1, 0, 0, 0, 0x20, 0, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        let c = CopySourceRange {
            slba: 0x55,
            nlb: 3,
            ..Default::default()
        };
        let mut b = [0xFFu8; 32];
        c.emit(&mut b).unwrap();
        assert_eq!(&b[..8], &[0; 8]);
        assert_eq!(b[8], 0x55);
        assert_eq!(&b[16..18], &[3, 0]);
        assert!(DsmRange::parse(&[0u8; 15]).is_err());
        checks::field_table_is_sound::<DsmRange>();
        checks::field_table_is_sound::<CopySourceRange>();
    }

    #[test]
    fn copy_fields() {
        let mut sqe = SqeRepr::default();
        let c = CopyCommand {
            sdlba: 9,
            nr: 2,
            format: 0,
            fua: true,
            lr: true,
            ..Default::default()
        };
        c.apply(&mut sqe);
        assert_eq!(sqe.cdw10_15[2], 2 | (1 << 30) | (1 << 31));
        assert_eq!(CopyCommand::from_sqe(&sqe), c);
        assert_eq!(c.range_count(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn io_command_round_trip(
            (slba, nlb, dtype, prinfo, dsm, dspec) in any::<(u64, u16, u8, u8, u8, u16)>(),
            flags in any::<[bool; 4]>(),
        ) {
            let cmd = IoCommand {
                slba, nlb, dtype: dtype & 0xF, prinfo: prinfo & 0xF, dsm, dspec,
                stc: flags[0], deac: flags[1], fua: flags[2], lr: flags[3],
            };
            let mut sqe = SqeRepr::default();
            cmd.apply(&mut sqe);
            prop_assert_eq!(IoCommand::from_sqe(&sqe), cmd);
        }

        #[test]
        fn dsm_round_trip(nr in any::<u8>(), f in any::<[bool; 3]>()) {
            let cmd = DsmCommand { nr, idr: f[0], idw: f[1], ad: f[2] };
            let mut sqe = SqeRepr::default();
            cmd.apply(&mut sqe);
            prop_assert_eq!(DsmCommand::from_sqe(&sqe), cmd);
        }

        #[test]
        fn ranges_round_trip(bytes in proptest::collection::vec(any::<u8>(), 32)) {
            checks::random_bytes_round_trip::<DsmRange>(bytes.clone());
            checks::random_bytes_round_trip::<CopySourceRange>(bytes);
        }
    }
}

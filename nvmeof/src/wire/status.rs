//! Completion status: status code types, status codes and the status field.
//!
//! The status field of a completion (CQE bytes 14-15) is
//! `P` bit 0 (phase), `SC` bits 8:1, `SCT` bits 11:9, `CRD` bits 13:12, `M` bit 14,
//! `DNR` bit 15. [`Status`] is the field without the phase bit and keeps SCT and SC
//! raw, so nothing read is lost; [`StatusCode`] is their typed meaning.
//!
//! Command-specific codes from 0x80 up mean different things for Fabrics commands
//! (Connect ...) and for NVM I/O commands, so decoding needs a [`StatusContext`].

raw_enum! {
    /// Status Code Type (SCT, 3 bits).
    pub enum StatusCodeType: u8 {
        /// Generic command status.
        Generic = 0,
        /// Command-specific status.
        CommandSpecific = 1,
        /// Media and data integrity errors.
        MediaDataIntegrity = 2,
        /// Path-related status.
        PathRelated = 3,
        /// Vendor specific.
        VendorSpecific = 7,
    }
}

/// Which kind of command a status answers; picks the meaning of command-specific
/// codes 0x80 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusContext {
    /// An admin command other than a Fabrics command.
    Admin,
    /// A Fabrics command (opcode 0x7F: Connect, Property Get/Set, ...).
    Fabrics,
    /// An NVM command set I/O command.
    Io,
}

/// Typed status codes.
///
/// Encoding ([`StatusCode::sct`], [`StatusCode::sc`]) never needs context; decoding
/// ([`StatusCode::decode`]) does for command-specific codes 0x80 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    // Generic command status (SCT 0).
    /// Successful completion.
    Success,
    /// Invalid command opcode.
    InvalidOpcode,
    /// Invalid field in command.
    InvalidField,
    /// Command ID conflict.
    CommandIdConflict,
    /// Data transfer error.
    DataTransferError,
    /// Commands aborted due to power loss notification.
    AbortedPowerLoss,
    /// Internal error.
    InternalError,
    /// Command abort requested.
    AbortRequested,
    /// Command aborted due to SQ deletion.
    AbortedSqDeleted,
    /// Command aborted due to failed fused command.
    AbortedFailedFused,
    /// Command aborted due to missing fused command.
    AbortedMissingFused,
    /// Invalid namespace or format.
    InvalidNamespaceOrFormat,
    /// Command sequence error.
    CommandSequenceError,
    /// Invalid SGL segment descriptor.
    InvalidSglSegmentDescriptor,
    /// Invalid number of SGL descriptors.
    InvalidSglDescriptorCount,
    /// Data SGL length invalid.
    DataSglLengthInvalid,
    /// Metadata SGL length invalid.
    MetadataSglLengthInvalid,
    /// SGL descriptor type invalid.
    SglDescriptorTypeInvalid,
    /// Invalid use of controller memory buffer.
    InvalidCmbUse,
    /// PRP offset invalid.
    PrpOffsetInvalid,
    /// Atomic write unit exceeded.
    AtomicWriteUnitExceeded,
    /// Operation denied.
    OperationDenied,
    /// SGL offset invalid.
    SglOffsetInvalid,
    /// Host identifier inconsistent format.
    HostIdInconsistentFormat,
    /// Keep alive timer expired.
    KeepAliveExpired,
    /// Keep alive timeout invalid.
    KeepAliveInvalid,
    /// Command aborted due to preempt and abort.
    AbortedPreempt,
    /// Sanitize failed.
    SanitizeFailed,
    /// Sanitize in progress.
    SanitizeInProgress,
    /// SGL data block granularity invalid.
    SglDataBlockGranularityInvalid,
    /// Command not supported for queue in CMB.
    CommandNotSupportedForCmbQueue,
    /// Namespace is write protected.
    NamespaceWriteProtected,
    /// Command interrupted.
    CommandInterrupted,
    /// Transient transport error.
    TransientTransportError,
    /// LBA out of range.
    LbaOutOfRange,
    /// Capacity exceeded.
    CapacityExceeded,
    /// Namespace not ready.
    NamespaceNotReady,
    /// Reservation conflict.
    ReservationConflict,
    /// Format in progress.
    FormatInProgress,

    // Command specific status (SCT 1), any command.
    /// Completion queue invalid.
    CompletionQueueInvalid,
    /// Invalid queue identifier.
    InvalidQueueIdentifier,
    /// Invalid queue size.
    InvalidQueueSize,
    /// Abort command limit exceeded.
    AbortLimitExceeded,
    /// Asynchronous event request limit exceeded.
    AsyncEventLimitExceeded,
    /// Invalid firmware slot.
    InvalidFirmwareSlot,
    /// Invalid firmware image.
    InvalidFirmwareImage,
    /// Invalid interrupt vector.
    InvalidInterruptVector,
    /// Invalid log page.
    InvalidLogPage,
    /// Invalid format.
    InvalidFormat,
    /// Invalid queue deletion.
    InvalidQueueDeletion,
    /// Feature identifier not saveable.
    FeatureNotSaveable,
    /// Feature not changeable.
    FeatureNotChangeable,
    /// Feature not namespace specific.
    FeatureNotPerNamespace,
    /// Overlapping range.
    OverlappingRange,
    /// Namespace insufficient capacity.
    NamespaceInsufficientCapacity,
    /// Namespace identifier unavailable.
    NamespaceIdUnavailable,
    /// Namespace already attached.
    NamespaceAlreadyAttached,
    /// Namespace is private.
    NamespaceIsPrivate,
    /// Namespace not attached.
    NamespaceNotAttached,
    /// Controller list invalid.
    ControllerListInvalid,
    /// Invalid controller identifier.
    InvalidControllerIdentifier,

    // Command specific status (SCT 1) of Fabrics commands.
    /// Connect: incompatible format (RECFMT).
    ConnectIncompatibleFormat,
    /// Connect: controller busy.
    ConnectControllerBusy,
    /// Connect: invalid parameters (IATTR/IPO in DW0 say which).
    ConnectInvalidParameters,
    /// Connect: restart discovery.
    ConnectRestartDiscovery,
    /// Connect: invalid host.
    ConnectInvalidHost,
    /// Invalid queue type.
    InvalidQueueType,
    /// Discover restart.
    DiscoverRestart,
    /// Authentication required.
    AuthenticationRequired,

    // Command specific status (SCT 1) of NVM I/O commands.
    /// Conflicting attributes (Dataset Management, Read, Write).
    ConflictingAttributes,
    /// Invalid protection information.
    InvalidProtectionInformation,
    /// Attempted write to read only range.
    WriteToReadOnlyRange,
    /// Command size limit exceeded (Copy).
    CommandSizeLimitExceeded,

    // Media and data integrity errors (SCT 2).
    /// Write fault.
    WriteFault,
    /// Unrecovered read error.
    UnrecoveredReadError,
    /// End-to-end guard check error.
    GuardCheckError,
    /// End-to-end application tag check error.
    ApplicationTagCheckError,
    /// End-to-end reference tag check error.
    ReferenceTagCheckError,
    /// Compare failure.
    CompareFailure,
    /// Access denied.
    AccessDenied,
    /// Deallocated or unwritten logical block.
    DeallocatedOrUnwrittenBlock,

    // Path related status (SCT 3).
    /// Internal path error.
    InternalPathError,
    /// Asymmetric access persistent loss.
    AnaPersistentLoss,
    /// Asymmetric access inaccessible.
    AnaInaccessible,
    /// Asymmetric access transition.
    AnaTransition,
    /// Controller pathing error.
    ControllerPathingError,
    /// Host pathing error.
    HostPathingError,
    /// Command aborted by host.
    AbortedByHost,

    /// A code this crate does not name (or not in the given context), kept raw.
    Unknown {
        /// Status code type (3 bits).
        sct: u8,
        /// Status code.
        sc: u8,
    },
}

use StatusCode as C;
use StatusContext as X;

/// (code, SCT, SC, context the meaning is limited to).
const TABLE: &[(StatusCode, u8, u8, Option<StatusContext>)] = &[
    (C::Success, 0, 0x00, None),
    (C::InvalidOpcode, 0, 0x01, None),
    (C::InvalidField, 0, 0x02, None),
    (C::CommandIdConflict, 0, 0x03, None),
    (C::DataTransferError, 0, 0x04, None),
    (C::AbortedPowerLoss, 0, 0x05, None),
    (C::InternalError, 0, 0x06, None),
    (C::AbortRequested, 0, 0x07, None),
    (C::AbortedSqDeleted, 0, 0x08, None),
    (C::AbortedFailedFused, 0, 0x09, None),
    (C::AbortedMissingFused, 0, 0x0a, None),
    (C::InvalidNamespaceOrFormat, 0, 0x0b, None),
    (C::CommandSequenceError, 0, 0x0c, None),
    (C::InvalidSglSegmentDescriptor, 0, 0x0d, None),
    (C::InvalidSglDescriptorCount, 0, 0x0e, None),
    (C::DataSglLengthInvalid, 0, 0x0f, None),
    (C::MetadataSglLengthInvalid, 0, 0x10, None),
    (C::SglDescriptorTypeInvalid, 0, 0x11, None),
    (C::InvalidCmbUse, 0, 0x12, None),
    (C::PrpOffsetInvalid, 0, 0x13, None),
    (C::AtomicWriteUnitExceeded, 0, 0x14, None),
    (C::OperationDenied, 0, 0x15, None),
    (C::SglOffsetInvalid, 0, 0x16, None),
    (C::HostIdInconsistentFormat, 0, 0x18, None),
    (C::KeepAliveExpired, 0, 0x19, None),
    (C::KeepAliveInvalid, 0, 0x1a, None),
    (C::AbortedPreempt, 0, 0x1b, None),
    (C::SanitizeFailed, 0, 0x1c, None),
    (C::SanitizeInProgress, 0, 0x1d, None),
    (C::SglDataBlockGranularityInvalid, 0, 0x1e, None),
    (C::CommandNotSupportedForCmbQueue, 0, 0x1f, None),
    (C::NamespaceWriteProtected, 0, 0x20, None),
    (C::CommandInterrupted, 0, 0x21, None),
    (C::TransientTransportError, 0, 0x22, None),
    (C::LbaOutOfRange, 0, 0x80, None),
    (C::CapacityExceeded, 0, 0x81, None),
    (C::NamespaceNotReady, 0, 0x82, None),
    (C::ReservationConflict, 0, 0x83, None),
    (C::FormatInProgress, 0, 0x84, None),
    (C::CompletionQueueInvalid, 1, 0x00, None),
    (C::InvalidQueueIdentifier, 1, 0x01, None),
    (C::InvalidQueueSize, 1, 0x02, None),
    (C::AbortLimitExceeded, 1, 0x03, None),
    (C::AsyncEventLimitExceeded, 1, 0x05, None),
    (C::InvalidFirmwareSlot, 1, 0x06, None),
    (C::InvalidFirmwareImage, 1, 0x07, None),
    (C::InvalidInterruptVector, 1, 0x08, None),
    (C::InvalidLogPage, 1, 0x09, None),
    (C::InvalidFormat, 1, 0x0a, None),
    (C::InvalidQueueDeletion, 1, 0x0c, None),
    (C::FeatureNotSaveable, 1, 0x0d, None),
    (C::FeatureNotChangeable, 1, 0x0e, None),
    (C::FeatureNotPerNamespace, 1, 0x0f, None),
    (C::OverlappingRange, 1, 0x14, None),
    (C::NamespaceInsufficientCapacity, 1, 0x15, None),
    (C::NamespaceIdUnavailable, 1, 0x16, None),
    (C::NamespaceAlreadyAttached, 1, 0x18, None),
    (C::NamespaceIsPrivate, 1, 0x19, None),
    (C::NamespaceNotAttached, 1, 0x1a, None),
    (C::ControllerListInvalid, 1, 0x1c, None),
    (C::InvalidControllerIdentifier, 1, 0x1f, None),
    (C::ConnectIncompatibleFormat, 1, 0x80, Some(X::Fabrics)),
    (C::ConnectControllerBusy, 1, 0x81, Some(X::Fabrics)),
    (C::ConnectInvalidParameters, 1, 0x82, Some(X::Fabrics)),
    (C::ConnectRestartDiscovery, 1, 0x83, Some(X::Fabrics)),
    (C::ConnectInvalidHost, 1, 0x84, Some(X::Fabrics)),
    (C::InvalidQueueType, 1, 0x85, Some(X::Fabrics)),
    (C::DiscoverRestart, 1, 0x90, Some(X::Fabrics)),
    (C::AuthenticationRequired, 1, 0x91, Some(X::Fabrics)),
    (C::ConflictingAttributes, 1, 0x80, Some(X::Io)),
    (C::InvalidProtectionInformation, 1, 0x81, Some(X::Io)),
    (C::WriteToReadOnlyRange, 1, 0x82, Some(X::Io)),
    (C::CommandSizeLimitExceeded, 1, 0x83, Some(X::Io)),
    (C::WriteFault, 2, 0x80, None),
    (C::UnrecoveredReadError, 2, 0x81, None),
    (C::GuardCheckError, 2, 0x82, None),
    (C::ApplicationTagCheckError, 2, 0x83, None),
    (C::ReferenceTagCheckError, 2, 0x84, None),
    (C::CompareFailure, 2, 0x85, None),
    (C::AccessDenied, 2, 0x86, None),
    (C::DeallocatedOrUnwrittenBlock, 2, 0x87, None),
    (C::InternalPathError, 3, 0x00, None),
    (C::AnaPersistentLoss, 3, 0x01, None),
    (C::AnaInaccessible, 3, 0x02, None),
    (C::AnaTransition, 3, 0x03, None),
    (C::ControllerPathingError, 3, 0x60, None),
    (C::HostPathingError, 3, 0x70, None),
    (C::AbortedByHost, 3, 0x71, None),
];

impl StatusCode {
    /// Every named code (for tests and tables).
    pub fn all() -> impl Iterator<Item = StatusCode> {
        TABLE.iter().map(|e| e.0)
    }

    fn entry(self) -> Option<&'static (StatusCode, u8, u8, Option<StatusContext>)> {
        TABLE.iter().find(|e| e.0 == self)
    }

    /// Status code type (3 bits).
    pub fn sct(self) -> u8 {
        match self {
            C::Unknown { sct, .. } => sct & 0x7,
            code => code.entry().map_or(0, |e| e.1),
        }
    }

    /// Status code.
    pub fn sc(self) -> u8 {
        match self {
            C::Unknown { sc, .. } => sc,
            code => code.entry().map_or(0, |e| e.2),
        }
    }

    /// The typed meaning of `sct`/`sc` for a command of kind `context`; `Unknown`
    /// when unnamed (or named only for another kind of command).
    pub fn decode(sct: u8, sc: u8, context: StatusContext) -> StatusCode {
        let sct = sct & 0x7;
        TABLE
            .iter()
            .find(|e| e.1 == sct && e.2 == sc && e.3.is_none_or(|c| c == context))
            .map_or(C::Unknown { sct, sc }, |e| e.0)
    }
}

/// A completion status without the phase bit: SCT and SC (raw), Command Retry
/// Delay, More, Do Not Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    /// Status code type (3 bits).
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Command retry delay index (2 bits).
    pub crd: u8,
    /// More information in the Error Information log page.
    pub more: bool,
    /// Do not retry: the same command would fail again.
    pub dnr: bool,
}

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        crd: 0,
        more: false,
        dnr: false,
    };

    /// The status for `code`, retry allowed.
    pub fn new(code: StatusCode) -> Status {
        Status {
            sct: code.sct(),
            sc: code.sc(),
            ..Status::SUCCESS
        }
    }

    /// The same status with Do Not Retry set.
    pub fn with_dnr(self) -> Status {
        Status { dnr: true, ..self }
    }

    /// The same status with More set.
    pub fn with_more(self) -> Status {
        Status { more: true, ..self }
    }

    /// Whether this is a successful completion (SCT 0, SC 0).
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The status code type.
    pub fn code_type(&self) -> StatusCodeType {
        StatusCodeType::from(self.sct & 0x7)
    }

    /// The typed status code for a command of kind `context`.
    pub fn code(&self, context: StatusContext) -> StatusCode {
        StatusCode::decode(self.sct, self.sc, context)
    }

    /// The CQE status field (bytes 14-15) with phase tag `phase`.
    pub fn to_field(&self, phase: bool) -> u16 {
        u16::from(phase)
            | (u16::from(self.sc) << 1)
            | (u16::from(self.sct & 0x7) << 9)
            | (u16::from(self.crd & 0x3) << 12)
            | (u16::from(self.more) << 14)
            | (u16::from(self.dnr) << 15)
    }

    /// The status in a CQE status field (the phase bit is ignored).
    pub fn from_field(field: u16) -> Status {
        Status {
            sc: (field >> 1) as u8,
            sct: ((field >> 9) & 0x7) as u8,
            crd: ((field >> 12) & 0x3) as u8,
            more: field & (1 << 14) != 0,
            dnr: field & (1 << 15) != 0,
        }
    }
}

impl From<StatusCode> for Status {
    fn from(code: StatusCode) -> Status {
        Status::new(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invalid_field_with_dnr_is_0x8004() {
        let s = Status::new(StatusCode::InvalidField).with_dnr();
        assert_eq!(s.to_field(false), 0x8004);
        assert_eq!(s.to_field(true), 0x8005);
        assert_eq!(Status::from_field(0x8005), s);
    }

    #[test]
    fn known_field_values() {
        // SCT 1 SC 0x82 with DNR: Connect Invalid Parameters as nvmet sends it.
        let s = Status::new(StatusCode::ConnectInvalidParameters).with_dnr();
        assert_eq!(s.to_field(false), 0x8000 | (1 << 9) | (0x82 << 1));
        assert_eq!(
            s.code(StatusContext::Fabrics),
            StatusCode::ConnectInvalidParameters
        );
        // The same bits for a Write mean "write to read only range".
        assert_eq!(s.code(StatusContext::Io), StatusCode::WriteToReadOnlyRange);
        assert_eq!(
            s.code(StatusContext::Admin),
            StatusCode::Unknown { sct: 1, sc: 0x82 }
        );
        let cf = Status::new(StatusCode::CompareFailure);
        assert_eq!(cf.to_field(false), (2 << 9) | (0x85 << 1));
        assert_eq!(cf.code_type(), StatusCodeType::MediaDataIntegrity);
        assert_eq!(
            Status::new(StatusCode::LbaOutOfRange).to_field(false),
            0x100
        );
    }

    #[test]
    fn every_named_code_decodes_to_itself() {
        for code in StatusCode::all() {
            let ctx = TABLE.iter().find(|e| e.0 == code).unwrap().3;
            let ctx = ctx.unwrap_or(StatusContext::Admin);
            assert_eq!(
                StatusCode::decode(code.sct(), code.sc(), ctx),
                code,
                "{code:?}"
            );
        }
        // No two entries collide within one context.
        for a in TABLE {
            for b in TABLE {
                if a.0 != b.0 && a.1 == b.1 && a.2 == b.2 {
                    assert!(a.3.is_some() && b.3.is_some() && a.3 != b.3, "{a:?} {b:?}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn field_round_trips(field in any::<u16>()) {
            let s = Status::from_field(field);
            prop_assert_eq!(s.to_field(field & 1 != 0), field);
            let code = s.code(StatusContext::Io);
            prop_assert_eq!((code.sct(), code.sc()), (s.sct, s.sc));
        }
    }
}

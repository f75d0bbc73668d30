//! NVMe and NVMe over Fabrics wire formats.
//!
//! Written in the manner of smoltcp's `wire` module, like the softroce provider's
//! `wire`:
//!
//! * a *view* `Foo<T: AsRef<[u8]>>` over a byte buffer. `Foo::new_checked` verifies
//!   that the buffer is long enough; there is no unchecked constructor, so the field
//!   accessors never panic;
//! * a *representation* `FooRepr`, the validated high-level form, with
//!   `parse(&view) -> Result<FooRepr, WireError>` and `emit(&self, &mut view)`.
//!
//! Larger fixed-size data structures (Identify data, log pages, Connect data) are
//! described once as a table of `field: Type = offset` entries ([`layout`]); from that
//! table come the struct, its `parse(&[u8])` and `emit(&mut [u8])`, and the field
//! list the tests check for overlaps.
//!
//! Modules, one per concept:
//!
//! * [`sqe`] – the 64-byte submission queue entry;
//! * [`cqe`] – the 16-byte completion queue entry;
//! * [`status`] – status code types and status codes;
//! * [`sgl`] – SGL descriptors (data block, in-capsule offset, keyed, transport);
//! * [`opcodes`] – admin and NVM I/O opcodes, I/O command fields, DSM and Copy ranges;
//! * [`fabrics`] – Fabrics commands (Connect, Property Get/Set) and Connect data;
//! * [`properties`] – controller properties CAP, VS, CC, CSTS;
//! * [`identify`] – Identify Controller, Identify Namespace, namespace lists and
//!   namespace identification descriptors;
//! * [`log`] – Get Log Page fields, discovery log, error information, SMART/health,
//!   changed namespace list;
//! * [`rdma_cm`] – the RDMA transport's CM request/accept/reject private data;
//! * [`text`] – fixed-width text fields (space-padded ASCII, NUL-padded strings, NQNs).
//!
//! Nothing here panics on input: short buffers and malformed fields produce
//! [`WireError`], which names the structure, the field and the NVMe status a target
//! should answer with.

use core::fmt;

/// Defines an enum over a raw integer with one variant per named value and an
/// `Unknown` variant that keeps any other value, plus the conversions both ways and a
/// [`layout::FieldCodec`] so the enum can be a field of a fixed layout.
macro_rules! raw_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this crate does not name, kept as read.
            Unknown($repr),
        }

        impl From<$repr> for $name {
            fn from(raw: $repr) -> Self {
                match raw {
                    $( $value => Self::$variant, )+
                    other => Self::Unknown(other),
                }
            }
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> $repr {
                match value {
                    $( $name::$variant => $value, )+
                    $name::Unknown(other) => other,
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::from(0 as $repr)
            }
        }

        impl $crate::wire::layout::FieldCodec for $name {
            const SIZE: usize = core::mem::size_of::<$repr>();
            const KIND: $crate::wire::layout::FieldKind = $crate::wire::layout::FieldKind::Exact;
            fn decode(bytes: &[u8]) -> Option<Self> {
                <$repr as $crate::wire::layout::FieldCodec>::decode(bytes).map(Self::from)
            }
            fn encode(&self, bytes: &mut [u8]) {
                <$repr as $crate::wire::layout::FieldCodec>::encode(&<$repr>::from(*self), bytes)
            }
        }
    };
}

#[macro_use]
pub mod layout;

pub mod cqe;
pub mod fabrics;
pub(crate) mod field;
pub mod identify;
pub mod log;
pub mod opcodes;
pub mod properties;
pub mod rdma_cm;
pub mod sgl;
pub mod sqe;
pub mod status;
pub mod text;

pub use cqe::{Cqe, CqeRepr};
pub use layout::{FieldCodec, FieldInfo, FieldKind, FixedLayout};
pub use sgl::{KeyedSgl, Sgl, SglRepr};
pub use sqe::{Dptr, Fuse, Psdt, Sqe, SqeRepr};
pub use status::{Status, StatusCode, StatusCodeType, StatusContext};

/// Why bytes could not be read as (or written into) an NVMe structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the structure.
    Truncated {
        /// The structure being read or written.
        structure: &'static str,
        /// Bytes the structure needs.
        needed: usize,
        /// Bytes the buffer has.
        got: usize,
    },
    /// A field holds a value the structure does not allow.
    Invalid {
        /// The structure being read.
        structure: &'static str,
        /// The offending field.
        field: &'static str,
        /// Byte offset of the field from the start of the structure (what a target
        /// reports as the parameter error location, or as the Connect IPO).
        offset: usize,
        /// The status a target should complete the command with.
        status: StatusCode,
    },
}

impl WireError {
    /// The same error seen from an enclosing structure, where the inner structure
    /// starts at byte `base`.
    pub fn within(self, base: usize) -> WireError {
        match self {
            WireError::Invalid {
                structure,
                field,
                offset,
                status,
            } => WireError::Invalid {
                structure,
                field,
                offset: offset.saturating_add(base),
                status,
            },
            truncated => truncated,
        }
    }

    /// The NVMe status a target should answer with, for [`WireError::Invalid`];
    /// `None` for a truncated buffer, whose answer depends on where the bytes came
    /// from (a short capsule, a short data transfer).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            WireError::Truncated { .. } => None,
            WireError::Invalid { status, .. } => Some(*status),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated {
                structure,
                needed,
                got,
            } => write!(f, "{structure}: need {needed} bytes, buffer has {got}"),
            WireError::Invalid {
                structure,
                field,
                offset,
                status,
            } => write!(
                f,
                "{structure}: invalid {field} at byte {offset} ({status:?})"
            ),
        }
    }
}

impl std::error::Error for WireError {}

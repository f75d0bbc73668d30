//! Controller properties, read and written with Fabrics Property Get/Set.
//!
//! | offset | size | property |
//! |--------|------|----------|
//! | 0x00   | 8    | [`Cap`] controller capabilities |
//! | 0x08   | 4    | [`Vs`] version |
//! | 0x14   | 4    | [`Cc`] controller configuration |
//! | 0x1C   | 4    | [`Csts`] controller status |
//! | 0x20   | 4    | NSSR NVM subsystem reset |
//!
//! Each register is a newtype over its raw value with a getter per field and a
//! `with_` builder per field; values too wide for a field are cut to its width.

use super::fabrics::PropertySize;

/// Offset of CAP.
pub const CAP: u32 = 0x00;
/// Offset of VS.
pub const VS: u32 = 0x08;
/// Offset of CC.
pub const CC: u32 = 0x14;
/// Offset of CSTS.
pub const CSTS: u32 = 0x1C;
/// Offset of NSSR.
pub const NSSR: u32 = 0x20;

/// The size of the property at `offset`, for the properties a fabrics controller
/// has; `None` for any other offset.
pub fn property_size(offset: u32) -> Option<PropertySize> {
    match offset {
        CAP => Some(PropertySize::Eight),
        VS | CC | CSTS | NSSR => Some(PropertySize::Four),
        _ => None,
    }
}

/// A register field's value type.
trait RegisterField {
    /// From the field's bits (already shifted down and masked to the field width).
    fn from_bits(bits: u64) -> Self;
    /// To bits (not yet shifted or masked).
    fn to_bits(self) -> u64;
}

impl RegisterField for bool {
    fn from_bits(bits: u64) -> Self {
        bits != 0
    }
    fn to_bits(self) -> u64 {
        self.into()
    }
}

macro_rules! register_field_int {
    ($($t:ty),*) => {$(
        impl RegisterField for $t {
            fn from_bits(bits: u64) -> Self {
                // The getter masked `bits` to the field width, which fits `$t`.
                bits as $t
            }
            fn to_bits(self) -> u64 {
                self.into()
            }
        }
    )*};
}

register_field_int!(u8, u16);

macro_rules! register {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($raw:ty) {
            $( $(#[$fmeta:meta])* $get:ident / $with:ident : $t:ty = $lo:literal, $width:literal; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $raw);

        impl $name {
            $(
                $(#[$fmeta])*
                pub fn $get(&self) -> $t {
                    let v = (self.0 >> $lo) & ((1 << $width) - 1);
                    <$t as RegisterField>::from_bits(u64::from(v))
                }

                #[doc = concat!("This value with `", stringify!($get), "` set.")]
                pub fn $with(self, v: $t) -> Self {
                    let mask: $raw = ((1 << $width) - 1) << $lo;
                    // Cutting to the register width is fine: the mask keeps only the field.
                    let v = RegisterField::to_bits(v) as $raw;
                    $name((self.0 & !mask) | ((v << $lo) & mask))
                }
            )*
        }
    };
}

register! {
    /// CAP, controller capabilities (offset 0x00, 8 bytes).
    pub struct Cap(u64) {
        /// Maximum queue entries supported, 0's based (bits 15:0).
        mqes / with_mqes: u16 = 0, 16;
        /// Contiguous queues required (bit 16).
        cqr / with_cqr: bool = 16, 1;
        /// Arbitration mechanisms supported (bits 18:17).
        ams / with_ams: u8 = 17, 2;
        /// Worst-case time to ready, in 500 ms units (bits 31:24).
        to / with_to: u8 = 24, 8;
        /// Doorbell stride (bits 35:32).
        dstrd / with_dstrd: u8 = 32, 4;
        /// NVM subsystem reset supported (bit 36).
        nssrs / with_nssrs: bool = 36, 1;
        /// Command sets supported (bits 44:37; bit 37 = NVM command set).
        css / with_css: u8 = 37, 8;
        /// Boot partition support (bit 45).
        bps / with_bps: bool = 45, 1;
        /// Minimum memory page size, as 2^(12 + MPSMIN) (bits 51:48).
        mpsmin / with_mpsmin: u8 = 48, 4;
        /// Maximum memory page size, as 2^(12 + MPSMAX) (bits 55:52).
        mpsmax / with_mpsmax: u8 = 52, 4;
    }
}

register! {
    /// VS, version (offset 0x08).
    pub struct Vs(u32) {
        /// Tertiary version (bits 7:0).
        tertiary / with_tertiary: u8 = 0, 8;
        /// Minor version (bits 15:8).
        minor / with_minor: u8 = 8, 8;
        /// Major version (bits 31:16).
        major / with_major: u16 = 16, 16;
    }
}

impl Vs {
    /// Version `major.minor.tertiary`.
    pub fn new(major: u16, minor: u8, tertiary: u8) -> Vs {
        Vs(0)
            .with_major(major)
            .with_minor(minor)
            .with_tertiary(tertiary)
    }
}

register! {
    /// CC, controller configuration (offset 0x14).
    pub struct Cc(u32) {
        /// Enable (bit 0).
        en / with_en: bool = 0, 1;
        /// I/O command set selected (bits 6:4).
        css / with_css: u8 = 4, 3;
        /// Memory page size, as 2^(12 + MPS) (bits 10:7).
        mps / with_mps: u8 = 7, 4;
        /// Arbitration mechanism selected (bits 13:11).
        ams / with_ams: u8 = 11, 3;
        /// Shutdown notification (bits 15:14), see [`ShutdownNotification`].
        shn / with_shn: u8 = 14, 2;
        /// I/O submission queue entry size, as 2^IOSQES (bits 19:16; 6 = 64 bytes).
        iosqes / with_iosqes: u8 = 16, 4;
        /// I/O completion queue entry size, as 2^IOCQES (bits 23:20; 4 = 16 bytes).
        iocqes / with_iocqes: u8 = 20, 4;
    }
}

register! {
    /// CSTS, controller status (offset 0x1C).
    pub struct Csts(u32) {
        /// Ready (bit 0).
        rdy / with_rdy: bool = 0, 1;
        /// Controller fatal status (bit 1).
        cfs / with_cfs: bool = 1, 1;
        /// Shutdown status (bits 3:2), see [`ShutdownStatus`].
        shst / with_shst: u8 = 2, 2;
        /// NVM subsystem reset occurred (bit 4).
        nssro / with_nssro: bool = 4, 1;
        /// Processing paused (bit 5).
        pp / with_pp: bool = 5, 1;
    }
}

raw_enum! {
    /// CC.SHN values.
    pub enum ShutdownNotification: u8 {
        /// No notification.
        None = 0,
        /// Normal shutdown.
        Normal = 1,
        /// Abrupt shutdown.
        Abrupt = 2,
    }
}

raw_enum! {
    /// CSTS.SHST values.
    pub enum ShutdownStatus: u8 {
        /// Normal operation.
        Normal = 0,
        /// Shutdown processing occurring.
        Occurring = 1,
        /// Shutdown processing complete.
        Complete = 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // CAP of a Linux nvmet controller: MQES 1023, CQR, TO 15 (7.5 s), CSS NVM.
        let cap = Cap(0)
            .with_mqes(1023)
            .with_cqr(true)
            .with_to(15)
            .with_css(1);
        assert_eq!(cap.0, 0x0000_0020_0F01_03FF);
        assert_eq!(
            (cap.mqes(), cap.to(), cap.css(), cap.mpsmin()),
            (1023, 15, 1, 0)
        );
        let cc = Cc(0).with_en(true).with_iosqes(6).with_iocqes(4);
        assert_eq!(cc.0, 0x0046_0001);
        assert_eq!(Cc(0x0046_4001).shn(), 1);
        assert_eq!(Vs::new(1, 3, 0).0, 0x0001_0300);
        let csts = Csts(0)
            .with_rdy(true)
            .with_shst(ShutdownStatus::Complete.into());
        assert_eq!(csts.0, 0b1001);
        assert!(Csts(0b10).cfs());
        assert_eq!(property_size(CAP), Some(PropertySize::Eight));
        assert_eq!(property_size(CSTS), Some(PropertySize::Four));
        assert_eq!(property_size(0x24), None);
        // Too-wide values are cut to the field.
        assert_eq!(Cc(0).with_css(0xFF).css(), 0x7);
        assert!(!Cc(0).with_css(0xFF).en());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn cc_fields_round_trip(en in any::<bool>(), css in 0u8..8, mps in 0u8..16, shn in 0u8..4,
                                sq in 0u8..16, cq in 0u8..16) {
            let cc = Cc(0).with_en(en).with_css(css).with_mps(mps).with_shn(shn)
                .with_iosqes(sq).with_iocqes(cq);
            prop_assert_eq!((cc.en(), cc.css(), cc.mps(), cc.shn(), cc.iosqes(), cc.iocqes()),
                            (en, css, mps, shn, sq, cq));
        }

        #[test]
        fn cap_getters_rebuild_value(raw in any::<u64>()) {
            let c = Cap(raw);
            let rebuilt = Cap(raw).with_mqes(c.mqes()).with_to(c.to()).with_css(c.css());
            prop_assert_eq!(rebuilt, c);
        }
    }
}

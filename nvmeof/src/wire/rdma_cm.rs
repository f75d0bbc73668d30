//! Private data of the RDMA CM messages that set up an NVMe-oF RDMA queue pair.
//!
//! * [`CmRequest`] – sent by the host with RDMA_CM connect (32 bytes): RECFMT u16 @0
//!   (0), QID u16 @2, HRQSIZE u16 @4 (host receive queue size), HSQSIZE u16 @6 (host
//!   send queue size, 0's based), CNTLID u16 @8 (Linux hosts fill it; reserved
//!   otherwise);
//! * [`CmAccept`] – sent by the target with accept (32 bytes): RECFMT u16 @0, CRQSIZE
//!   u16 @2 (controller receive queue size);
//! * [`CmReject`] – sent by the target with reject (4 bytes): RECFMT u16 @0, STS u16
//!   @2 ([`CmRejectStatus`]).

use super::{StatusCode, WireError};

/// The only record format defined (NVMe-oF RDMA transport 1.0).
pub const RECFMT_1_0: u16 = 0;

raw_enum! {
    /// Status of an RDMA CM reject.
    pub enum CmRejectStatus: u16 {
        /// Invalid private data length.
        InvalidPrivateDataLength = 0x01,
        /// Invalid record format.
        InvalidRecfmt = 0x02,
        /// Invalid queue ID.
        InvalidQid = 0x03,
        /// Invalid host send queue size.
        InvalidHsqsize = 0x04,
        /// Invalid host receive queue size.
        InvalidHrqsize = 0x05,
        /// No resources.
        NoResources = 0x06,
        /// Invalid IRD.
        InvalidIrd = 0x07,
        /// Invalid ORD.
        InvalidOrd = 0x08,
    }
}

crate::fixed_layout! {
    /// RDMA CM request private data (32 bytes).
    pub struct CmRequest: 32 bytes, "RDMA CM request private data", invalid = StatusCode::InvalidField {
        /// Record format, 0.
        recfmt: u16 = 0,
        /// Queue ID: 0 for the admin queue.
        qid: u16 = 2,
        /// Host receive queue size (entries).
        hrqsize: u16 = 4,
        /// Host send queue size, 0's based.
        hsqsize: u16 = 6,
        /// Controller ID (I/O queues of Linux hosts; 0 otherwise).
        cntlid: u16 = 8,
    }
}

impl CmRequest {
    /// Parses a connect request's private data as a target must: a short buffer is
    /// [`CmRejectStatus::InvalidPrivateDataLength`], a RECFMT other than 0
    /// [`CmRejectStatus::InvalidRecfmt`]; the error is what to reject with.
    pub fn parse_private_data(buf: &[u8]) -> Result<CmRequest, CmRejectStatus> {
        let req = CmRequest::parse(buf).map_err(|_| CmRejectStatus::InvalidPrivateDataLength)?;
        if req.recfmt != RECFMT_1_0 {
            return Err(CmRejectStatus::InvalidRecfmt);
        }
        Ok(req)
    }

    /// Entries in the target's receive queue this asks for (`hsqsize + 1`).
    pub fn host_send_queue_entries(&self) -> u32 {
        u32::from(self.hsqsize) + 1
    }
}

crate::fixed_layout! {
    /// RDMA CM accept private data (32 bytes).
    pub struct CmAccept: 32 bytes, "RDMA CM accept private data", invalid = StatusCode::InvalidField {
        /// Record format, 0.
        recfmt: u16 = 0,
        /// Controller receive queue size (entries).
        crqsize: u16 = 2,
    }
}

crate::fixed_layout! {
    /// RDMA CM reject private data (4 bytes).
    pub struct CmReject: 4 bytes, "RDMA CM reject private data", invalid = StatusCode::InvalidField {
        /// Record format, 0.
        recfmt: u16 = 0,
        /// Why the connection was rejected.
        status: CmRejectStatus = 2,
    }
}

impl CmReject {
    /// A reject with `status` in record format 0.
    pub fn new(status: CmRejectStatus) -> CmReject {
        CmReject {
            recfmt: RECFMT_1_0,
            status,
        }
    }
}

impl From<WireError> for CmRejectStatus {
    /// Private data that does not parse has the wrong length.
    fn from(_: WireError) -> Self {
        CmRejectStatus::InvalidPrivateDataLength
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::layout::checks;
    use proptest::prelude::*;

    #[test]
    fn exact_bytes() {
        let req = CmRequest {
            recfmt: 0,
            qid: 1,
            hrqsize: 128,
            hsqsize: 127,
            cntlid: 5,
        };
        let mut b = [0xFFu8; 32];
        req.emit(&mut b).unwrap();
        assert_eq!(&b[..10], &[0, 0, 1, 0, 128, 0, 127, 0, 5, 0]);
        assert!(b[10..].iter().all(|&x| x == 0));
        assert_eq!(CmRequest::parse_private_data(&b), Ok(req.clone()));
        assert_eq!(req.host_send_queue_entries(), 128);

        let mut a = [0u8; 32];
        CmAccept {
            recfmt: 0,
            crqsize: 128,
        }
        .emit(&mut a)
        .unwrap();
        assert_eq!(&a[..4], &[0, 0, 128, 0]);

        let mut r = [0u8; 4];
        CmReject::new(CmRejectStatus::InvalidOrd)
            .emit(&mut r)
            .unwrap();
        assert_eq!(r, [0, 0, 8, 0]);
        assert_eq!(
            CmReject::parse(&r).unwrap().status,
            CmRejectStatus::InvalidOrd
        );
        checks::field_table_is_sound::<CmRequest>();
        checks::field_table_is_sound::<CmAccept>();
        checks::field_table_is_sound::<CmReject>();
    }

    #[test]
    fn target_rejections() {
        assert_eq!(
            CmRequest::parse_private_data(&[0u8; 31]),
            Err(CmRejectStatus::InvalidPrivateDataLength)
        );
        let mut b = [0u8; 32];
        b[0] = 1;
        assert_eq!(
            CmRequest::parse_private_data(&b),
            Err(CmRejectStatus::InvalidRecfmt)
        );
        assert_eq!(u16::from(CmRejectStatus::NoResources), 6);
        assert_eq!(CmRejectStatus::from(9), CmRejectStatus::Unknown(9));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 32)) {
            checks::random_bytes_round_trip::<CmRequest>(bytes.clone());
            checks::random_bytes_round_trip::<CmAccept>(bytes.clone());
            checks::random_bytes_round_trip::<CmReject>(bytes);
        }
    }
}

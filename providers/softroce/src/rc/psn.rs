//! 24-bit packet sequence number arithmetic.

/// PSNs are 24 bits wide.
pub const PSN_MASK: u32 = 0x00FF_FFFF;

/// Most PSNs a requester has unacknowledged at once (rxe: RXE_MAX_UNACKED_PSNS).
pub const MAX_UNACKED_PSNS: i32 = 128;

/// Packets sent without AckReq before one is requested (rxe: RXE_MAX_PKT_PER_ACK).
pub const MAX_PKTS_PER_ACK: u32 = 64;

/// `a + n` modulo 2^24.
pub fn add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & PSN_MASK
}

/// Signed distance `a - b` in 24-bit sequence space (negative: `a` is before `b`).
pub fn diff(a: u32, b: u32) -> i32 {
    ((a.wrapping_sub(b) << 8) as i32) >> 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        assert_eq!(add(PSN_MASK, 1), 0);
        assert_eq!(diff(0, PSN_MASK), 1);
        assert_eq!(diff(PSN_MASK, 0), -1);
        assert_eq!(diff(5, 3), 2);
        assert_eq!(diff(3, 5), -2);
        assert_eq!(diff(0x800000, 0), -0x800000);
    }
}

//! `Hints::mr_key_size(4)`: getinfo narrows tcp's keys to 32 bits for that answer (its
//! own test binary, apart from the one that sets FABRIC_TCP_KEY_SIZE process-wide).

mod common;

use common::*;

#[test]
fn four_byte_keys_from_the_hints() {
    let info = registry()
        .getinfo(&hints().mr_key_size(4))
        .unwrap()
        .remove(0);
    assert_eq!(info.limits.mr_key_size, 4);
    assert_eq!(
        registry().getinfo(&hints()).unwrap()[0].limits.mr_key_size,
        8,
        "without the hint the keys stay 8 bytes"
    );
    // Keys narrower than tcp can hand out are refused with the reason.
    let e = registry().getinfo(&hints().mr_key_size(2)).unwrap_err();
    assert!(
        e.to_string()
            .contains("memory keys are 8 bytes, the hints allow at most 2"),
        "{e}"
    );
}

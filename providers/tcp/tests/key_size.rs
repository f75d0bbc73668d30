//! `FABRIC_TCP_KEY_SIZE=4`: getinfo narrows `mr_key_size` to 4 and the domain hands out
//! 32-bit keys that work for RMA. Its own test binary: the variable is process-wide.

mod common;

use common::*;
use fabric_core::*;

#[test]
fn four_byte_keys_from_the_environment() {
    std::env::set_var(fabric_tcp::KEY_SIZE_ENV, "4");
    let info = listen_info(Progress::Manual);
    assert_eq!(info.limits.mr_key_size, 4);
    let p = pair();
    for _ in 0..64 {
        let mr = p.server.domain.alloc(64, Access::REMOTE).unwrap();
        let k = mr.remote().key;
        assert!(k != 0 && k <= u64::from(u32::MAX), "{k:#x}");
    }
    let target = p.server.domain.alloc(64, Access::REMOTE).unwrap();
    let src = p.client.domain.alloc(8, Access::LOCAL).unwrap();
    src.write_at(0, b"32-bit!!").unwrap();
    p.client
        .ep
        .write(src.full(), target.remote().iov(8, 8), 1)
        .unwrap();
    ok(&next(&p.client.cq));
    assert_eq!(target.to_vec(8, 8).unwrap(), b"32-bit!!");

    // A value other than 4 or 8 is refused with a reason.
    std::env::set_var(fabric_tcp::KEY_SIZE_ENV, "2");
    let e = registry().getinfo(&hints()).unwrap_err();
    assert!(e.to_string().contains("FABRIC_TCP_KEY_SIZE=2"), "{e}");
    std::env::set_var(fabric_tcp::KEY_SIZE_ENV, "8");
    assert_eq!(listen_info(Progress::Manual).limits.mr_key_size, 8);
}

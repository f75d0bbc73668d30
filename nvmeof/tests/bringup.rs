//! Controller bring-up over softroce and tcp: Connect, CC.EN, CSTS.RDY, Identify, I/O.
mod common;
use common::*;

/// tcp hands out 32-bit keys for this getinfo (the hints ask for `mr_key_size(4)`), so
/// keyed SGLs work over it as over softroce.
fn bring_up_and_identify(provider: &str) {
    bring_up(setup(provider));
}

over_providers!(bring_up_and_identify);

fn bring_up(s: Setup) {
    let ctrl = s.connect();
    let id = ctrl.identify();
    assert_eq!(id.subnqn.as_str(), SUBNQN);
    assert_eq!(id.cntlid, ctrl.cntlid());
    assert_eq!(ctrl.io_queue_count(), 2);
    let ns = ctrl.namespace(1).unwrap();
    assert_eq!(ns.blocks, NS_BLOCKS);
    let data = pattern(1, 4096);
    ctrl.write(&ns, 10, &data, false).unwrap();
    let mut back = vec![0u8; 4096];
    ctrl.read(&ns, 10, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        s.target.read_namespace(SUBNQN, 1, 10 * 512, 4096).unwrap(),
        data
    );
    ctrl.disconnect().unwrap();
}

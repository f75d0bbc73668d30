//! Admin side over softroce and tcp: Identify fields against the spec, properties, features,
//! log pages, discovery, host access control, keep-alive expiry.
mod common;
use common::*;

use std::time::{Duration, Instant};

use nvmeof::host::{discover, Controller, HostConfig};
use nvmeof::target::SubsystemConfig;
use nvmeof::wire::fabrics::{InvalidParameterLocation, PropertySize};
use nvmeof::wire::identify::{oncs, sgls, vwc, ControllerType, NamespaceIdDescriptor};
use nvmeof::wire::log::{LogPageId, SubsystemType};
use nvmeof::wire::opcodes::FeatureId;
use nvmeof::wire::properties::{Cap, Csts, Vs, CAP, CC, CSTS, VS};
use nvmeof::wire::StatusCode;
use nvmeof::Error;

fn identify_properties_features_logs(provider: &str) {
    let s = setup(provider);
    let ctrl = s.connect();
    let id = ctrl.identify();
    assert_eq!(id.cntrltype, ControllerType::Io);
    assert_eq!((id.sqes, id.cqes), (0x66, 0x44));
    assert_eq!(id.icdoff, 0, "Linux hosts need ICDOFF 0");
    assert_ne!(id.sgls & sgls::KEYED, 0);
    assert_ne!(id.sgls & sgls::OFFSET, 0);
    assert_eq!(id.ioccsz, (64 + 4096) / 16);
    assert_eq!(id.iorcsz, 1);
    assert_eq!(id.kas, 1);
    assert_eq!(id.nn, 1024);
    assert_eq!(id.vwc & vwc::FLUSH_ALL_NSID, vwc::FLUSH_ALL_NSID);
    for bit in [
        oncs::COMPARE,
        oncs::DSM,
        oncs::WRITE_ZEROES,
        oncs::VERIFY,
        oncs::COPY,
    ] {
        assert_ne!(id.oncs & bit, 0);
    }
    assert_eq!(id.mdts, 5);
    assert_eq!(id.sn.as_str(), "0123456789abcdef");

    let cap = Cap(ctrl.property_get(CAP, PropertySize::Eight).unwrap());
    assert_eq!(cap.mqes(), 127);
    assert!(cap.cqr());
    assert_eq!(cap.css() & 1, 1);
    assert_eq!(
        Vs(ctrl.property_get(VS, PropertySize::Four).unwrap() as u32),
        Vs::new(1, 4, 0)
    );
    assert!(Csts(ctrl.property_get(CSTS, PropertySize::Four).unwrap() as u32).rdy());
    // A property that does not exist, and a wrong size.
    assert_eq!(
        ctrl.property_get(0x50, PropertySize::Four)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::InvalidField)
    );
    assert_eq!(
        ctrl.property_get(CAP, PropertySize::Four)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::InvalidField)
    );

    let idns = ctrl.identify_namespace(1).unwrap();
    assert_eq!(
        (idns.nsze, idns.ncap, idns.nlbaf, idns.flbas),
        (NS_BLOCKS, NS_BLOCKS, 0, 0)
    );
    assert_eq!(idns.lbaf.0[0].lbads, 9);
    assert_eq!(idns.dlfeat & 0x7, 1);
    // Inactive NSID in range: zeros; invalid NSID: Invalid Namespace or Format.
    assert_eq!(ctrl.identify_namespace(5).unwrap().nsze, 0);
    assert_eq!(
        ctrl.identify_namespace(0).unwrap_err().status_code(),
        Some(StatusCode::InvalidNamespaceOrFormat)
    );
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1]);
    let d = ctrl.namespace_descriptors(1).unwrap();
    assert!(matches!(d[0], NamespaceIdDescriptor::Nguid(g) if g == idns.nguid && g != [0; 16]));
    assert!(d.contains(&NamespaceIdDescriptor::Csi(0)));

    // Features.
    assert_eq!(
        ctrl.get_features(FeatureId::NumberOfQueues).unwrap(),
        0x0001_0001
    );
    assert_eq!(
        ctrl.set_features(FeatureId::KeepAliveTimer, 3050).unwrap(),
        0
    );
    assert_eq!(
        ctrl.get_features(FeatureId::KeepAliveTimer).unwrap(),
        3100,
        "rounded up to KAS"
    );
    ctrl.set_features(FeatureId::VolatileWriteCache, 0).unwrap();
    assert_eq!(ctrl.get_features(FeatureId::VolatileWriteCache).unwrap(), 0);
    ctrl.set_features(FeatureId::VolatileWriteCache, 1).unwrap();
    assert_eq!(
        ctrl.get_features(FeatureId::Arbitration)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::InvalidField)
    );
    ctrl.keep_alive().unwrap();

    // Logs: an unknown page, and the error log recording the failures above.
    assert_eq!(
        ctrl.get_log_page(LogPageId::FirmwareSlot, 0, 0, 512)
            .unwrap_err()
            .status_code(),
        Some(StatusCode::InvalidLogPage)
    );
    let errors = ctrl
        .get_log_page(LogPageId::ErrorInformation, 0, 0, 256)
        .unwrap();
    let newest = nvmeof::wire::log::ErrorInformationEntry::parse(&errors).unwrap();
    assert!(newest.error_count >= 4, "{newest:?}");
    assert_eq!(newest.sqid, 0);

    // Shutdown notification: SHST complete.
    let cc = ctrl.property_get(CC, PropertySize::Four).unwrap() as u32;
    ctrl.property_set(CC, cc | (1 << 14)).unwrap();
    assert_eq!(
        Csts(ctrl.property_get(CSTS, PropertySize::Four).unwrap() as u32).shst(),
        2
    );
}

fn discovery_lists_the_subsystem(provider: &str) {
    let s = setup(provider);
    let entries = discover(&s.addr, &s.host_config()).unwrap();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.subnqn.as_str(), SUBNQN);
    assert_eq!(e.subtype, SubsystemType::Nvme);
    assert_eq!(e.traddr.as_str(), s.addr.addr);
    assert_eq!(e.trsvcid.as_str(), s.addr.service);
    assert_eq!(e.cntlid, 0xFFFF);
    // Connect with what discovery said.
    let addr = nvmeof::host::TransportAddr::from_entry(provider, e);
    let ctrl = Controller::connect(&addr, e.subnqn.as_str(), &s.host_config()).unwrap();
    assert_eq!(ctrl.identify().subnqn.as_str(), SUBNQN);
}

fn host_not_allowed_is_refused(provider: &str) {
    let mut sub = SubsystemConfig::new(SUBNQN);
    sub.allow_any_host = false;
    sub.allowed_hosts = vec!["nqn.2014-08.org.nvmexpress:uuid:someone-else".into()];
    let s = setup_with(provider, sub);
    let e = Controller::connect(&s.addr, SUBNQN, &s.host_config()).unwrap_err();
    match e {
        Error::Command {
            status,
            context,
            dw0,
        } => {
            assert_eq!(status.code(context), StatusCode::ConnectInvalidHost);
            assert!(status.dnr);
            let ipo = InvalidParameterLocation::from_dw0(dw0);
            assert!(ipo.in_data);
            assert_eq!(ipo.offset, 512, "HOSTNQN in the Connect data");
        }
        other => panic!("{other}"),
    }
    // Not in the discovery log either; an unknown subsystem is Invalid Parameters.
    assert!(discover(&s.addr, &s.host_config()).unwrap().is_empty());
    let e =
        Controller::connect(&s.addr, "nqn.2024-01.io.fabric:nope", &s.host_config()).unwrap_err();
    assert_eq!(e.status_code(), Some(StatusCode::ConnectInvalidParameters));
}

fn keep_alive_expiry_tears_the_controller_down(provider: &str) {
    let s = setup(provider);
    let cfg = HostConfig {
        kato_ms: 300,
        keep_alive: false,
        ..s.host_config()
    };
    // The timer runs from the Connect command, inside Controller::connect.
    let before_connect = Instant::now();
    let ctrl = Controller::connect(&s.addr, SUBNQN, &cfg).unwrap();
    assert_eq!(s.target.controllers().len(), 1);
    let start = Instant::now();
    while !s.target.controllers().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "controller still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(before_connect.elapsed() >= Duration::from_millis(300));
    // Its queues are gone: commands fail.
    let ns = nvmeof::host::NamespaceInfo {
        nsid: 1,
        block_size: 512,
        blocks: NS_BLOCKS,
    };
    let mut b = vec![0u8; 512];
    assert!(ctrl.read(&ns, 0, &mut b).is_err());
    assert!(ctrl.keep_alive().is_err());

    // With keep-alive running, the controller stays past three timeouts (1 s: the
    // host sends every 500 ms, room for a loaded machine).
    let cfg = HostConfig {
        kato_ms: 1000,
        keep_alive: true,
        ..s.host_config()
    };
    let ctrl = Controller::connect(&s.addr, SUBNQN, &cfg).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(s.target.controllers().len(), 1);
    ctrl.read(&ns, 0, &mut b).unwrap();
}

over_providers!(
    identify_properties_features_logs,
    discovery_lists_the_subsystem,
    host_not_allowed_is_refused,
    keep_alive_expiry_tears_the_controller_down
);

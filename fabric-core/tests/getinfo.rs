//! getinfo matching, rejection reasons and the FABRIC_PROVIDER filter, against fake
//! providers (no data path needed).

use std::sync::Arc;

use fabric_core::provider::FabricOps;
use fabric_core::*;

struct Fake {
    name: &'static str,
    caps: Caps,
    mr_mode: MrMode,
    available: bool,
}

impl Provider for Fake {
    fn name(&self) -> &'static str {
        self.name
    }
    fn available(&self) -> std::result::Result<(), Mismatch> {
        if self.available {
            Ok(())
        } else {
            Err(Mismatch::new(HintField::Availability, "no device"))
        }
    }
    fn offers(&self) -> Vec<Info> {
        let mut limits = Limits::DEFAULT;
        limits.max_msg_size = 1 << 20;
        limits.inject_size = 64;
        limits.mr_key_size = 8;
        limits.cq_data_size = 8;
        limits.tx_size = 128;
        limits.rx_size = 128;
        limits.iov_limit = 4;
        limits.rma_iov_limit = 4;
        limits.cm_data_size = 256;
        limits.mtu = 0;
        let mut i = Info::new(self.name, self.caps, EpType::Msg, limits);
        i.mr_mode = self.mr_mode;
        vec![i]
    }
    fn check(&self, _hints: &Hints, info: &mut Info) -> std::result::Result<(), Mismatch> {
        if let Some(Address::Inet(a)) = &info.dest_addr {
            if !a.ip().is_loopback() {
                return Err(Mismatch::new(
                    HintField::DestAddr,
                    format!("{a} is not a loopback address"),
                ));
            }
        }
        info.fabric_name = "IP".into();
        Ok(())
    }
    fn open_fabric(&self, _info: &Info) -> Result<Arc<dyn FabricOps>> {
        Err(Error::unsupported("fake"))
    }
}

fn registry() -> Registry {
    Registry::new()
        .with(Arc::new(Fake {
            name: "alpha",
            caps: Caps::MSG | Caps::RMA | Caps::REMOTE_CQ_DATA,
            mr_mode: MrMode::PROV_KEY,
            available: true,
        }))
        .with(Arc::new(Fake {
            name: "beta",
            caps: Caps::MSG | Caps::RMA | Caps::RMA_PMEM,
            mr_mode: MrMode::PROV_KEY | MrMode::VIRT_ADDR | MrMode::LOCAL,
            available: true,
        }))
        .with(Arc::new(Fake {
            name: "gamma",
            caps: Caps::all(),
            mr_mode: MrMode::empty(),
            available: false,
        }))
}

#[test]
fn empty_hints_match_every_available_provider() {
    let r = registry();
    let infos = r.getinfo(&Hints::new()).unwrap();
    let names: Vec<_> = infos.iter().map(|i| i.provider_name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(infos.iter().all(|i| i.provider().is_some()));
    assert_eq!(infos[0].fabric_name, "IP");
    assert_eq!(infos[0].limits.inject_size, 64);
}

#[test]
fn caps_select_and_rejections_name_each_provider() {
    let r = registry();
    let infos = r.getinfo(&Hints::new().caps(Caps::RMA_PMEM)).unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].provider_name, "beta");

    let err = r.getinfo(&Hints::new().caps(Caps::TAGGED)).unwrap_err();
    assert_eq!(err.rejections.len(), 3);
    assert!(err.rejections[0].reason.contains("TAGGED"), "{err}");
    assert!(
        err.rejections[2]
            .reason
            .contains("not available: no device"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("alpha: missing capabilities TAGGED"),
        "{text}"
    );
    let e: Error = err.into();
    assert_eq!(e.kind(), ErrorKind::NoData);
}

#[test]
fn mr_mode_and_ep_type_rejections() {
    let r = registry();
    let err = r.explain_with_filter(&Hints::new().mr_mode(MrMode::PROV_KEY), None);
    assert!(err[0].result.is_ok());
    let beta = err[1].result.as_ref().unwrap_err();
    assert!(
        beta.contains("VIRT_ADDR") && beta.contains("LOCAL"),
        "{beta}"
    );

    assert!(
        err[1]
            .mismatches
            .iter()
            .all(|m| m.field == HintField::MrMode),
        "{:?}",
        err[1].mismatches
    );

    let m = r.explain_with_filter(&Hints::new().ep_type(EpType::Rdm), None);
    let a = m[0].result.as_ref().unwrap_err();
    assert!(a.contains("endpoint type rdm not offered"), "{a}");
    assert_eq!(m[0].mismatches[0].field, HintField::EpType);
    assert_eq!(m[0].mismatches[0].to_string(), *a);
}

#[test]
fn rejections_are_typed() {
    let r = registry();
    let err = r
        .getinfo(&Hints::new().caps(Caps::MSG | Caps::TAGGED))
        .unwrap_err();
    let fields: Vec<Vec<HintField>> = err
        .rejections
        .iter()
        .map(|r| r.mismatches.iter().map(|m| m.field).collect())
        .collect();
    assert_eq!(fields[0], vec![HintField::Caps], "{err}");
    assert_eq!(fields[2], vec![HintField::Availability], "{err}");
    let far = r
        .getinfo(&Hints::new().node("192.0.2.1").service("7000"))
        .unwrap_err();
    assert!(
        far.rejections[0]
            .mismatches
            .iter()
            .any(|m| m.field == HintField::DestAddr && m.message.contains("not a loopback")),
        "{far}"
    );
}

#[test]
fn provider_name_hints_and_env_filter() {
    let r = registry();
    let m = r.explain_with_filter(&Hints::new().provider("beta"), None);
    assert!(m[0]
        .result
        .as_ref()
        .unwrap_err()
        .contains("hints ask for provider 'beta'"));
    assert!(m[1].result.is_ok());

    let m = r.explain_with_filter(&Hints::new(), Some("^alpha"));
    assert!(m[0]
        .result
        .as_ref()
        .unwrap_err()
        .contains("excluded by FABRIC_PROVIDER=^alpha"));
    assert!(m[1].result.is_ok());
    let m = r.explain_with_filter(&Hints::new(), Some("alpha"));
    assert!(m[0].result.is_ok());
    assert!(m[1].result.is_err());
}

#[test]
fn addresses_resolve_and_are_checked_by_the_provider() {
    let r = registry();
    let infos = r
        .getinfo(
            &Hints::new()
                .node("127.0.0.1")
                .service(4242)
                .provider("alpha"),
        )
        .unwrap();
    assert_eq!(
        infos[0].dest_addr,
        Some(Address::Inet("127.0.0.1:4242".parse().unwrap()))
    );
    assert_eq!(infos[0].src_addr, None);

    let infos = r
        .getinfo(
            &Hints::new()
                .node("127.0.0.2")
                .service(0)
                .source(true)
                .provider("alpha"),
        )
        .unwrap();
    assert_eq!(
        infos[0].src_addr,
        Some(Address::Inet("127.0.0.2:0".parse().unwrap()))
    );

    let err = r
        .getinfo(&Hints::new().node("192.0.2.1").service(1).provider("alpha"))
        .unwrap_err();
    assert!(err.rejections[0].reason.contains("not a loopback"), "{err}");

    let err = r
        .getinfo(&Hints::new().node("127.0.0.1").service("http-ish"))
        .unwrap_err();
    assert!(err.to_string().contains("not a port number"), "{err}");

    let err = r
        .getinfo(&Hints::new().node("127.0.0.1").provider("alpha"))
        .unwrap_err();
    assert!(err.to_string().contains("needs a service"), "{err}");
}

#[test]
fn info_without_provider_cannot_open() {
    let info = Info::new(
        "x",
        Caps::MSG,
        EpType::Msg,
        registry().getinfo(&Hints::new()).unwrap()[0].limits,
    );
    let e = Fabric::open(&info).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn unknown_provider_names_the_built_ones() {
    let r = registry();
    let err = r.getinfo(&Hints::new().provider("tpc")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no provider named 'tpc' (built: alpha, beta, gamma)"
    );
    assert!(err.rejections.is_empty());
    // One known name among unknown ones: the usual per-provider reasons.
    let infos = r.getinfo(&Hints::new().provider("tpc,alpha")).unwrap();
    assert_eq!(infos[0].provider_name, "alpha");
    // An exclusion is not a request for a name.
    assert!(r.getinfo(&Hints::new().provider("^tpc")).is_ok());
    let e: Error = r
        .getinfo(&Hints::new().provider("verbs"))
        .unwrap_err()
        .into();
    assert_eq!(e.kind(), ErrorKind::NoData);
    assert!(e.to_string().contains("no provider named 'verbs'"), "{e}");
}

#[test]
fn src_addr_is_carried_and_must_be_local() {
    let r = registry();
    let hints = Hints::new()
        .node("127.0.0.1")
        .service(7000)
        .src_ip("127.0.0.3".parse().unwrap());
    let infos = r.getinfo(&hints).unwrap();
    for i in &infos {
        assert_eq!(
            i.src_addr,
            Some(Address::Inet("127.0.0.3:0".parse().unwrap()))
        );
        assert_eq!(
            i.dest_addr,
            Some(Address::Inet("127.0.0.1:7000".parse().unwrap()))
        );
    }
    // 192.0.2.0/24 (TEST-NET-1) is never assigned to a host: bind() says
    // EADDRNOTAVAIL, no packet is sent.
    let err = r
        .getinfo(&hints.clone().src_ip("192.0.2.1".parse().unwrap()))
        .unwrap_err();
    assert_eq!(err.rejections.len(), 3);
    for rej in &err.rejections[..2] {
        assert_eq!(
            rej.reason, "source address 192.0.2.1 is not an address of this machine",
            "{err}"
        );
    }
    // A listener's node must be local too.
    let err = r
        .getinfo(&Hints::new().node("192.0.2.1").service(0).source(true))
        .unwrap_err();
    assert!(
        err.to_string().contains("not an address of this machine"),
        "{err}"
    );
    // Two different source addresses are refused with a reason.
    let err = r
        .getinfo(
            &Hints::new()
                .node("127.0.0.1")
                .service(0)
                .source(true)
                .src_ip("127.0.0.2".parse().unwrap()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("two source addresses"), "{err}");
}

#[test]
fn mr_key_size_hint_rejects_wider_keys_with_a_reason() {
    let r = registry();
    // The fakes have 8-byte keys and do not narrow them.
    let err = r.getinfo(&Hints::new().mr_key_size(4)).unwrap_err();
    assert!(
        err.to_string()
            .contains("alpha: memory keys are 8 bytes, the hints allow at most 4"),
        "{err}"
    );
    assert!(r.getinfo(&Hints::new().mr_key_size(8)).is_ok());
}

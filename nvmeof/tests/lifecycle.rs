//! Association life cycle over softroce and tcp: a target that restarts and a host
//! that reconnects (outstanding commands fail clearly, data written before is there
//! after), and a host process that vanishes (the target frees its controller).
mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvmeof::host::{Controller, HostConfig, TransportAddr};
use nvmeof::target::{Backing, NamespaceConfig, PortConfig, SubsystemConfig, Target};
use nvmeof::Error;

fn temp_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nvmeof-life-{tag}-{}-{}",
        std::process::id(),
        random_loopback()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ns.img")
}

fn file_subsystem(path: &Path) -> SubsystemConfig {
    let mut sub = SubsystemConfig::new(SUBNQN);
    sub.namespaces.push(NamespaceConfig {
        nsid: 1,
        backing: Backing::File {
            path: path.to_path_buf(),
            size: Some(4 << 20),
        },
        block_size: 512,
    });
    sub
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn target_restart_and_reconnect(provider: &str) {
    let path = temp_file(provider);
    let s = setup_with(provider, file_subsystem(&path));
    let mut ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    let before = pattern(21, 8192);
    ctrl.write(&ns, 32, &before, true).unwrap();

    // The target goes away (process restart: every queue and the port end).
    let service = s.port.local_addr().port();
    let ip = s.port.local_addr().ip();
    let host_cfg = s.host_config();
    drop(s.port);
    drop(s.target);

    // A command now fails, clearly, and in bounded time.
    let mut b = vec![0u8; 512];
    let started = Instant::now();
    let e = ctrl.read(&ns, 32, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Disconnected(_) | Error::Timeout(_) | Error::Fabric(_)
        ),
        "{e}"
    );
    assert!(started.elapsed() < host_cfg.timeout + Duration::from_secs(2));

    // The target comes back on the same address and port, with the same file.
    let target = Target::new();
    target.add_subsystem(&file_subsystem(&path)).unwrap();
    let mut pc = PortConfig::new(provider, &ip.to_string());
    pc.service = service.to_string();
    let port = target.add_port(&pc).unwrap();
    assert_eq!(port.local_addr().port(), service);

    ctrl.reconnect().unwrap();
    assert_eq!(target.controllers().len(), 1);
    assert_eq!(ctrl.cntlid(), target.controllers()[0].cntlid);
    let mut back = vec![0u8; before.len()];
    ctrl.read(&ns, 32, &mut back).unwrap();
    assert_eq!(back, before, "data written before the restart");
    let after = pattern(22, 4096);
    ctrl.write(&ns, 64, &after, false).unwrap();
    assert_eq!(
        target.read_namespace(SUBNQN, 1, 64 * 512, 4096).unwrap(),
        after
    );
    ctrl.disconnect().unwrap();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The child side of `host_vanishes`: connects to the target named in the
/// environment, says so, then waits to be killed (at most 60 s).
#[test]
fn vanishing_host_child() {
    let (Ok(provider), Ok(addr), Ok(service), Ok(src)) = (
        std::env::var("NVMEOF_CHILD_PROVIDER"),
        std::env::var("NVMEOF_CHILD_ADDR"),
        std::env::var("NVMEOF_CHILD_SERVICE"),
        std::env::var("NVMEOF_CHILD_SRC"),
    ) else {
        return; // Not the child: nothing to do.
    };
    let cfg = HostConfig {
        hostnqn: HOSTNQN.into(),
        src_ip: Some(src.parse().unwrap()),
        // A long keep-alive timeout: the target must notice the lost connection,
        // not a missed keep-alive.
        kato_ms: 120_000,
        keep_alive: false,
        ..HostConfig::default()
    };
    let ctrl = Controller::connect(
        &TransportAddr::new(&provider, &addr, &service),
        SUBNQN,
        &cfg,
    )
    .unwrap();
    println!("CONNECTED {}", ctrl.cntlid());
    std::thread::sleep(Duration::from_secs(60));
}

fn host_vanishes(provider: &str) {
    let s = setup(provider);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "vanishing_host_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NVMEOF_CHILD_PROVIDER", provider)
        .env("NVMEOF_CHILD_ADDR", &s.addr.addr)
        .env("NVMEOF_CHILD_SERVICE", &s.addr.service)
        .env("NVMEOF_CHILD_SRC", s.host_ip.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let connected = lines
        .by_ref()
        .take(50)
        .map_while(Result::ok)
        .find(|l| l.contains("CONNECTED"));
    assert!(connected.is_some(), "the child host did not connect");
    assert_eq!(s.target.controllers().len(), 1);
    // The host process dies without a word (SIGKILL, by its PID).
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the controller freed", Duration::from_secs(10), || {
        s.target.controllers().is_empty()
    });
    // And the target serves the next host.
    let ctrl = s.connect();
    let ns = ctrl.namespace(1).unwrap();
    ctrl.write(&ns, 0, &pattern(5, 512), false).unwrap();
    assert_eq!(s.target.controllers().len(), 1);
}

over_providers!(target_restart_and_reconnect, host_vanishes);

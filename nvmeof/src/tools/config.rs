//! nvmetcli's saved-config JSON (what `nvmetcli save` writes and `nvmetcli restore`
//! reads) as this crate's target configuration.
//!
//! ```json
//! {
//!   "hosts": [ { "nqn": "nqn.2014-08.org.nvmexpress:uuid:host-a" } ],
//!   "ports": [ {
//!       "addr": { "adrfam": "ipv4", "traddr": "127.0.0.1", "treq": "not specified",
//!                 "trsvcid": "4420", "trtype": "softroce" },
//!       "param": { "inline_data_size": "4096" },
//!       "portid": 1, "referrals": [],
//!       "subsystems": [ "nqn.2024-01.io.example:disk" ] } ],
//!   "subsystems": [ {
//!       "allowed_hosts": [ "nqn.2014-08.org.nvmexpress:uuid:host-a" ],
//!       "attr": { "allow_any_host": "0", "serial": "abc123", "model": "disk" },
//!       "namespaces": [
//!         { "device": { "path": "/var/tmp/disk.img", "size": "1G" }, "enable": 1, "nsid": 1 },
//!         { "device": { "path": "memory:64M" }, "enable": 1, "nsid": 2 } ],
//!       "nqn": "nqn.2024-01.io.example:disk" } ]
//! }
//! ```
//!
//! Read as nvmetcli writes it: `addr.trtype` names the fabric provider
//! ([`provider_for_trtype`]: "rdma" is verbs, "softroce"/"rxe" softroce, "tcp" tcp,
//! any other name a provider of that name); `trsvcid` "0" takes a free port;
//! `param.inline_data_size` sets the in-capsule data size. Namespaces with
//! `"enable": 0` are skipped. Extensions (nvmetcli has block devices and files only):
//! `device.path` `"memory:<size>"` is a memory namespace, `device.size` gives a file
//! its length (created if missing), and `block_size` (512 or 4096) sits beside `nsid`.
//! Unknown keys (uuid, nguid, ana_grpid, referrals, ...) are accepted and ignored.

use std::path::PathBuf;

use serde_json::Value;

use super::parse_size;
use crate::target::{Backing, NamespaceConfig, PortConfig, SubsystemConfig};

/// A whole target: subsystems and the ports that export them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Subsystems with their namespaces and allowed hosts.
    pub subsystems: Vec<SubsystemConfig>,
    /// Ports, each with its provider, address and exported subsystems.
    pub ports: Vec<PortConfig>,
}

/// The configuration `nvmeof-target` starts with when given no file: a 64 MiB memory
/// namespace in one subsystem open to any host, on softroce at 127.0.0.1, a free port.
pub const DEFAULT_CONFIG: &str = r#"{
  "hosts": [],
  "ports": [
    {
      "addr": {
        "adrfam": "ipv4",
        "traddr": "127.0.0.1",
        "treq": "not specified",
        "trsvcid": "0",
        "trtype": "softroce"
      },
      "portid": 1,
      "referrals": [],
      "subsystems": [ "nqn.2024-01.io.fabric:nvmeof-target" ]
    }
  ],
  "subsystems": [
    {
      "allowed_hosts": [],
      "attr": {
        "allow_any_host": "1",
        "model": "fabric nvmeof memory",
        "serial": "fabric0001"
      },
      "namespaces": [
        { "device": { "path": "memory:64M" }, "enable": 1, "nsid": 1 }
      ],
      "nqn": "nqn.2024-01.io.fabric:nvmeof-target"
    }
  ]
}
"#;

/// The fabric provider an nvmetcli `trtype` names.
pub fn provider_for_trtype(trtype: &str) -> String {
    match trtype.to_ascii_lowercase().as_str() {
        "rdma" | "verbs" => "verbs".into(),
        "softroce" | "rxe" | "roce" => "softroce".into(),
        "tcp" => "tcp".into(),
        other => other.into(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        _ => None,
    }
}

fn field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(text)
}

fn truthy(v: Option<String>, default: bool) -> bool {
    match v.as_deref().map(str::trim) {
        None => default,
        Some(s) => !matches!(s, "0" | "" | "false" | "no" | "n"),
    }
}

fn list<'a>(v: &'a Value, key: &str) -> Result<&'a [Value], String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("{key:?} is not a list")),
    }
}

fn namespace(n: &Value, subnqn: &str) -> Result<Option<NamespaceConfig>, String> {
    if !truthy(field(n, "enable"), true) {
        return Ok(None);
    }
    let nsid = n
        .get("nsid")
        .and_then(|v| v.as_u64().or_else(|| text(v)?.parse().ok()))
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{subnqn}: a namespace without a numeric \"nsid\""))?;
    let device = n.get("device").cloned().unwrap_or(Value::Null);
    let path = field(&device, "path")
        .ok_or_else(|| format!("{subnqn} namespace {nsid}: no \"device\".\"path\""))?;
    let size = field(&device, "size")
        .map(|s| parse_size(&s))
        .transpose()
        .map_err(|e| format!("{subnqn} namespace {nsid}: {e}"))?;
    let backing = if let Some(mem) = path.strip_prefix("memory") {
        let size = match mem.strip_prefix(':') {
            Some(s) => Some(parse_size(s).map_err(|e| format!("{subnqn} namespace {nsid}: {e}"))?),
            None if mem.is_empty() => size,
            None => None,
        }
        .ok_or_else(|| {
            format!("{subnqn} namespace {nsid}: a memory namespace needs a size (\"memory:64M\")")
        })?;
        Backing::Memory { size }
    } else if let Some(p) = path.strip_prefix("pmem:") {
        let size = size.ok_or_else(|| {
            format!("{subnqn} namespace {nsid}: a pmem namespace needs \"device\".\"size\"")
        })?;
        Backing::Pmem {
            path: PathBuf::from(p),
            size,
        }
    } else if !truthy(field(n, "buffered_io"), true) {
        // nvmet's namespace attribute: buffered_io 0 is direct I/O.
        Backing::DirectFile {
            path: PathBuf::from(path),
            size,
        }
    } else {
        Backing::File {
            path: PathBuf::from(path),
            size,
        }
    };
    let block_size = match field(n, "block_size") {
        None => 512,
        Some(b) => b
            .parse()
            .map_err(|_| format!("{subnqn} namespace {nsid}: block_size {b:?}"))?,
    };
    Ok(Some(NamespaceConfig {
        nsid,
        backing,
        block_size,
    }))
}

fn subsystem(s: &Value) -> Result<SubsystemConfig, String> {
    let nqn = field(s, "nqn").ok_or("a subsystem without \"nqn\"")?;
    let mut cfg = SubsystemConfig::new(&nqn);
    let attr = s.get("attr").cloned().unwrap_or(Value::Null);
    cfg.allow_any_host = truthy(field(&attr, "allow_any_host"), false);
    if let Some(serial) = field(&attr, "serial") {
        cfg.serial = serial;
    }
    if let Some(model) = field(&attr, "model") {
        cfg.model = model;
    }
    cfg.allowed_hosts = list(s, "allowed_hosts")?
        .iter()
        .map(|h| text(h).ok_or_else(|| format!("{nqn}: an allowed host that is not a string")))
        .collect::<Result<_, _>>()?;
    for n in list(s, "namespaces")? {
        if let Some(ns) = namespace(n, &nqn)? {
            cfg.namespaces.push(ns);
        }
    }
    Ok(cfg)
}

fn port(p: &Value, known: &[SubsystemConfig]) -> Result<PortConfig, String> {
    let id = field(p, "portid").unwrap_or_else(|| "?".into());
    let addr = p
        .get("addr")
        .ok_or_else(|| format!("port {id}: no \"addr\""))?;
    let trtype = field(addr, "trtype").ok_or_else(|| format!("port {id}: no addr.trtype"))?;
    let traddr = field(addr, "traddr").ok_or_else(|| format!("port {id}: no addr.traddr"))?;
    let mut cfg = PortConfig::new(&provider_for_trtype(&trtype), &traddr);
    if let Some(svc) = field(addr, "trsvcid") {
        cfg.service = svc;
    }
    if let Some(inline) = p.get("param").and_then(|x| field(x, "inline_data_size")) {
        cfg.inline_data = usize::try_from(parse_size(&inline)?)
            .map_err(|_| format!("port {id}: inline_data_size {inline}"))?;
    }
    for s in list(p, "subsystems")? {
        let nqn = text(s).ok_or_else(|| format!("port {id}: a subsystem that is not a string"))?;
        if !known.iter().any(|k| k.nqn == nqn) {
            return Err(format!("port {id} exports {nqn}, which is not configured"));
        }
        cfg.subsystems.push(nqn);
    }
    if cfg.subsystems.is_empty() {
        return Err(format!(
            "port {id} exports no subsystem (list them in its \"subsystems\")"
        ));
    }
    Ok(cfg)
}

impl TargetConfig {
    /// Parses nvmetcli's saved-config JSON.
    pub fn from_json(json: &str) -> Result<TargetConfig, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("JSON: {e}"))?;
        if !v.is_object() {
            return Err("the configuration is not a JSON object".into());
        }
        let subsystems = list(&v, "subsystems")?
            .iter()
            .map(subsystem)
            .collect::<Result<Vec<_>, _>>()?;
        let ports = list(&v, "ports")?
            .iter()
            .map(|p| port(p, &subsystems))
            .collect::<Result<Vec<_>, _>>()?;
        if ports.is_empty() {
            return Err("no ports: the target would listen nowhere".into());
        }
        Ok(TargetConfig { subsystems, ports })
    }

    /// The embedded default ([`DEFAULT_CONFIG`]).
    pub fn default_config() -> TargetConfig {
        TargetConfig::from_json(DEFAULT_CONFIG)
            .unwrap_or_else(|e| unreachable!("the embedded default configuration is valid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses() {
        let c = TargetConfig::default_config();
        assert_eq!(c.subsystems.len(), 1);
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].provider, "softroce");
        assert_eq!(c.ports[0].service, "0");
        assert!(c.subsystems[0].allow_any_host);
        assert_eq!(
            c.subsystems[0].namespaces[0].backing,
            Backing::Memory { size: 64 << 20 }
        );
    }

    #[test]
    fn nvmetcli_shapes() {
        let json = r#"{
          "hosts": [{"nqn": "nqn.2014-08.org.nvmexpress:uuid:a"}],
          "ports": [{"addr": {"adrfam": "ipv4", "traddr": "10.0.0.1", "treq": "not specified",
                              "trsvcid": "4420", "trtype": "rdma"},
                     "param": {"inline_data_size": "8192"},
                     "portid": 1, "referrals": [], "subsystems": ["nqn.2024-01.x:s"]}],
          "subsystems": [{"allowed_hosts": ["nqn.2014-08.org.nvmexpress:uuid:a"],
                          "attr": {"allow_any_host": "0", "serial": "s1", "version": "1.3"},
                          "namespaces": [
                            {"device": {"path": "/tmp/x.img", "size": "1M", "nguid": "00"},
                             "enable": 1, "nsid": 1, "block_size": 4096},
                            {"device": {"path": "memory:1M"}, "enable": 0, "nsid": 2}],
                          "nqn": "nqn.2024-01.x:s"}]
        }"#;
        let c = TargetConfig::from_json(json).expect("parses");
        let p = &c.ports[0];
        assert_eq!(
            (p.provider.as_str(), p.addr.as_str(), p.service.as_str()),
            ("verbs", "10.0.0.1", "4420")
        );
        assert_eq!(p.inline_data, 8192);
        assert_eq!(p.subsystems, vec!["nqn.2024-01.x:s".to_string()]);
        let s = &c.subsystems[0];
        assert!(!s.allow_any_host);
        assert_eq!(s.serial, "s1");
        assert_eq!(s.namespaces.len(), 1, "the disabled namespace is skipped");
        assert_eq!(s.namespaces[0].block_size, 4096);
        assert_eq!(
            s.namespaces[0].backing,
            Backing::File {
                path: "/tmp/x.img".into(),
                size: Some(1 << 20)
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let bad_port = r#"{"subsystems": [], "ports": [{"addr": {"trtype": "tcp",
            "traddr": "127.0.0.1"}, "portid": 3, "subsystems": ["nqn.2024-01.x:none"]}]}"#;
        let e = TargetConfig::from_json(bad_port).unwrap_err();
        assert!(e.contains("not configured"), "{e}");
        let no_size = r#"{"subsystems": [{"nqn": "nqn.2024-01.x:s", "namespaces":
            [{"nsid": 1, "device": {"path": "memory"}}]}], "ports": []}"#;
        assert!(TargetConfig::from_json(no_size)
            .unwrap_err()
            .contains("needs a size"));
        assert!(TargetConfig::from_json("[1]").is_err());
    }
}

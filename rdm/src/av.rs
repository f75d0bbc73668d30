//! Address vectors (libfabric `fi_av`): a table of peer endpoint names, each inserted
//! name answered by a compact [`FiAddr`] handle that the data operations take.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fabric_core::{Address, Domain, Error, Result};
use parking_lot::Mutex;

/// A peer's handle in an [`AddressVector`] (libfabric `fi_addr_t` of an `FI_AV_TABLE`):
/// the index at which its name was inserted. Handles of removed names are not reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiAddr(u64);

impl FiAddr {
    /// The table index.
    pub fn index(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FiAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fi_addr {}", self.0)
    }
}

/// Attributes of an address vector.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AvAttr {
    /// Most names the table holds (inserts beyond it fail).
    pub count: usize,
}

impl Default for AvAttr {
    fn default() -> Self {
        AvAttr { count: 1 << 16 }
    }
}

struct Table {
    slots: Vec<Option<Vec<u8>>>,
    by_name: HashMap<Vec<u8>, u64>,
    live: usize,
}

/// An address vector opened on a domain; clones share the table. Bind it to
/// [`RdmEndpoint`](crate::RdmEndpoint)s of the same domain.
#[derive(Clone)]
pub struct AddressVector {
    table: Arc<Mutex<Table>>,
    /// Bumped by every insert of a new name and every removal (endpoints cache
    /// reverse lookups per connection until it changes).
    gen: Arc<AtomicU64>,
    domain: Domain,
    attr: AvAttr,
}

impl std::fmt::Debug for AddressVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressVector")
            .field("len", &self.len())
            .finish()
    }
}

impl AddressVector {
    /// Opens an empty address vector on `domain`.
    pub fn open(domain: &Domain, attr: AvAttr) -> Result<AddressVector> {
        if attr.count == 0 {
            return Err(Error::invalid("av: count must be at least 1"));
        }
        Ok(AddressVector {
            table: Arc::new(Mutex::new(Table {
                slots: Vec::new(),
                by_name: HashMap::new(),
                live: 0,
            })),
            gen: Arc::new(AtomicU64::new(0)),
            domain: domain.clone(),
            attr,
        })
    }

    /// The domain the table was opened on.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Inserts an endpoint name (from [`RdmEndpoint::name`](crate::RdmEndpoint::name));
    /// a name already present answers its existing handle.
    pub fn insert(&self, name: &[u8]) -> Result<FiAddr> {
        decode_name(name)?;
        let mut t = self.table.lock();
        if let Some(&i) = t.by_name.get(name) {
            return Ok(FiAddr(i));
        }
        if t.live >= self.attr.count {
            return Err(Error::invalid(format!(
                "av: the table is full ({} names)",
                self.attr.count
            )));
        }
        let i = t.slots.len() as u64;
        t.slots.push(Some(name.to_vec()));
        t.by_name.insert(name.to_vec(), i);
        t.live += 1;
        self.gen.fetch_add(1, Ordering::Release);
        Ok(FiAddr(i))
    }

    /// Removes a name; its handle is no longer valid. Connections already made to the
    /// peer stay until they are idle.
    pub fn remove(&self, addr: FiAddr) -> Result<()> {
        let mut t = self.table.lock();
        let name = t
            .slots
            .get_mut(addr.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| Error::invalid(format!("av remove: {addr} is not in the table")))?;
        t.by_name.remove(&name);
        t.live -= 1;
        self.gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The name behind a handle.
    pub fn lookup(&self, addr: FiAddr) -> Option<Vec<u8>> {
        self.table
            .lock()
            .slots
            .get(addr.0 as usize)
            .and_then(Clone::clone)
    }

    /// The handle of a name, if it is in the table (how a receive's source is
    /// reported).
    pub fn reverse_lookup(&self, name: &[u8]) -> Option<FiAddr> {
        self.table.lock().by_name.get(name).map(|&i| FiAddr(i))
    }

    /// A number that changes whenever the table does.
    pub(crate) fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Names in the table.
    pub fn len(&self) -> usize {
        self.table.lock().live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The wire form of an endpoint name: the address of its listener. `4` + IPv4 (4) +
/// port (2, big-endian); `6` + IPv6 (16) + port; `0` + length (1) + raw bytes (at
/// most 255).
pub fn encode_name(addr: &Address) -> Result<Vec<u8>> {
    Ok(match addr {
        Address::Inet(SocketAddr::V4(a)) => {
            let mut v = vec![4];
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
            v
        }
        Address::Inet(SocketAddr::V6(a)) => {
            let mut v = vec![6];
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
            v
        }
        Address::Raw(b) if b.len() <= 255 => {
            let mut v = vec![0, b.len() as u8];
            v.extend_from_slice(b);
            v
        }
        other => {
            return Err(Error::unsupported(format!(
                "address {other} has no RDM endpoint name form"
            )))
        }
    })
}

/// Parses [`encode_name`]'s output; anything else is an error, never a panic.
pub fn decode_name(name: &[u8]) -> Result<Address> {
    let bad = || Error::invalid(format!("not an RDM endpoint name: {name:02x?}"));
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match name.first() {
        Some(4) if name.len() == 7 => {
            let ip = Ipv4Addr::new(name[1], name[2], name[3], name[4]);
            Ok(Address::Inet(SocketAddr::new(
                IpAddr::V4(ip),
                port(&name[5..]),
            )))
        }
        Some(6) if name.len() == 19 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&name[1..17]);
            Ok(Address::Inet(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)),
                port(&name[17..]),
            )))
        }
        Some(0) if name.len() >= 2 && name.len() == 2 + name[1] as usize => {
            Ok(Address::Raw(name[2..].to_vec()))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_garbage_is_refused() {
        for a in [
            Address::Inet("127.1.2.3:4791".parse().unwrap()),
            Address::Inet("[::1]:80".parse().unwrap()),
            Address::Raw(vec![1, 2, 3]),
        ] {
            assert_eq!(decode_name(&encode_name(&a).unwrap()).unwrap(), a);
        }
        for bad in [&[][..], &[4, 1, 2], &[9, 0, 0, 0, 0, 0, 0], &[0, 5, 1]] {
            assert!(decode_name(bad).is_err(), "{bad:?}");
        }
    }
}

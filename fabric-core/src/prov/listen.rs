//! What a connection manager over TCP shares: the accepted connections whose request
//! has not fully arrived yet ([`HalfOpen`], capped and aged, so that silent peers
//! cannot hold descriptors forever) and the token that carries an arrived request from
//! the listener's event to the endpoint that accepts it ([`ConnToken`]).

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::info::{ConnHandle, Info};

/// The address a passive endpoint of `info` listens on: its source address, or an
/// ephemeral loopback port without one; `provider` names who refuses a non-IP one.
pub fn listen_addr(info: &Info, provider: &str) -> Result<SocketAddr> {
    match &info.src_addr {
        None => Ok(SocketAddr::from(([127, 0, 0, 1], 0))),
        Some(a) => a.as_inet().ok_or_else(|| {
            Error::new(
                ErrorKind::AddressNotAvailable,
                format!("{provider} listens on IP addresses only, not {a}"),
            )
        }),
    }
}

/// A non-blocking listening socket on `addr` (a failure names the address).
pub fn bind_listener(addr: SocketAddr) -> Result<TcpListener> {
    let sock =
        TcpListener::bind(addr).map_err(|e| Error::from(e).context(format!("bind {addr}")))?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Default bound on half-open connections per listener set.
pub const HALF_OPEN_MAX: usize = 128;
/// Default time a half-open connection has to send its request.
pub const HALF_OPEN_AGE: Duration = Duration::from_secs(10);

/// Connections accepted whose connection request is still arriving: at most `max`
/// (one more closes the oldest), each for at most `age`. Dropping an entry closes its
/// socket.
#[derive(Debug)]
pub struct HalfOpen<T> {
    entries: Vec<(u64, Instant, T)>,
    max: usize,
    age: Duration,
}

impl<T> HalfOpen<T> {
    /// An empty set with a cap and an age.
    pub fn new(max: usize, age: Duration) -> Self {
        HalfOpen {
            entries: Vec::new(),
            max: max.max(1),
            age,
        }
    }
    /// The age limit.
    pub fn age(&self) -> Duration {
        self.age
    }
    /// Adds `item` under `id`, accepted at `now`; at the cap the oldest entries are
    /// removed first and returned (to be closed).
    pub fn insert(&mut self, id: u64, item: T, now: Instant) -> Vec<T> {
        let mut evicted = Vec::new();
        while self.entries.len() >= self.max {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].1);
            let Some(i) = oldest else { break };
            evicted.push(self.entries.swap_remove(i).2);
        }
        self.entries.push((id, now, item));
        evicted
    }
    /// Removes and returns the entries older than the age at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let age = self.age;
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if now.saturating_duration_since(self.entries[i].1) >= age {
                out.push(self.entries.swap_remove(i).2);
            } else {
                i += 1;
            }
        }
        out
    }
    /// When the oldest entry ages out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.1 + self.age).min()
    }
    /// The entry `id`.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.entries
            .iter_mut()
            .find(|e| e.0 == id)
            .map(|e| &mut e.2)
    }
    /// Whether `id` is here.
    pub fn contains(&self, id: u64) -> bool {
        self.entries.iter().any(|e| e.0 == id)
    }
    /// Removes the entry `id`.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let i = self.entries.iter().position(|e| e.0 == id)?;
        Some(self.entries.swap_remove(i).2)
    }
    /// Keeps the entries for which `f` holds.
    pub fn retain(&mut self, mut f: impl FnMut(&mut T) -> bool) {
        self.entries.retain_mut(|e| f(&mut e.2));
    }
    /// The ids, in no order.
    pub fn ids(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.0).collect()
    }
    /// The entries, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|e| &e.2)
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<T> Default for HalfOpen<T> {
    /// [`HALF_OPEN_MAX`] entries of at most [`HALF_OPEN_AGE`].
    fn default() -> Self {
        HalfOpen::new(HALF_OPEN_MAX, HALF_OPEN_AGE)
    }
}

/// What a connection request carries from the listener to the accepting (or
/// rejecting) side, inside the request's [`ConnHandle`]: taken once.
pub struct ConnToken<T: Send + 'static>(Mutex<Option<T>>);

impl<T: Send + 'static> ConnToken<T> {
    /// `info` carrying `item` as its connection request.
    pub fn attach(info: Info, item: T) -> Info {
        info.with_conn_handle(ConnHandle(std::sync::Arc::new(ConnToken(Mutex::new(
            Some(item),
        )))))
    }
    /// Takes the item out of a connection request's info (made by `provider`).
    pub fn take(info: &Info, provider: &str) -> Result<T> {
        let h = info
            .conn_handle()
            .ok_or_else(|| Error::invalid("the info carries no connection request"))?;
        let t = h.0.downcast_ref::<ConnToken<T>>().ok_or_else(|| {
            Error::invalid(format!(
                "the connection request is not from the {provider} provider"
            ))
        })?;
        t.0.lock().take().ok_or_else(|| {
            Error::invalid("the connection request was already accepted or rejected")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_open_entries_are_capped_and_aged() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut h = HalfOpen::new(2, Duration::from_millis(100));
        assert!(h.insert(1, "a", s(0)).is_empty());
        assert!(h.insert(2, "b", s(10)).is_empty());
        assert_eq!(h.insert(3, "c", s(20)), ["a"], "the oldest makes room");
        assert_eq!(h.len(), 2);
        assert!(!h.contains(1) && h.contains(3));
        assert_eq!(h.next_deadline(), Some(s(110)));
        assert!(h.expire(s(109)).is_empty());
        assert_eq!(h.expire(s(110)), ["b"]);
        *h.get_mut(3).unwrap() = "C";
        assert_eq!(h.remove(3), Some("C"));
        assert!(h.is_empty() && h.next_deadline().is_none());
        h.insert(4, "d", s(0));
        h.insert(5, "e", s(0));
        h.retain(|x| *x == "e");
        assert_eq!(h.ids(), [5]);
        let d = HalfOpen::<()>::default();
        assert_eq!((d.max, d.age()), (HALF_OPEN_MAX, HALF_OPEN_AGE));
    }

    #[test]
    fn listeners_bind_the_source_address_or_ephemeral_loopback() {
        let mut info = Info::new(
            "x",
            crate::Caps::MSG,
            crate::EpType::Msg,
            crate::Limits::DEFAULT,
        );
        let a = listen_addr(&info, "x").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 0);
        let l = bind_listener(a).unwrap();
        let bound = l.local_addr().unwrap();
        assert_ne!(bound.port(), 0);
        // Non-blocking: accept with nobody connecting returns at once.
        assert_eq!(
            l.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        info.src_addr = Some(crate::Address::Inet(bound));
        assert_eq!(listen_addr(&info, "x").unwrap(), bound);
        let e = bind_listener(bound).unwrap_err();
        assert!(e.to_string().contains(&format!("bind {bound}")), "{e}");
    }

    #[test]
    fn a_conn_token_is_taken_once_and_only_by_its_type() {
        let info = Info::new(
            "x",
            crate::Caps::MSG,
            crate::EpType::Msg,
            crate::Limits::DEFAULT,
        );
        assert!(ConnToken::<u32>::take(&info, "x").is_err());
        let info = ConnToken::attach(info, 7u32);
        let e = ConnToken::<String>::take(&info, "other").err().unwrap();
        assert!(e.to_string().contains("other provider"), "{e}");
        assert_eq!(ConnToken::<u32>::take(&info, "x").unwrap(), 7);
        let e = ConnToken::<u32>::take(&info, "x").err().unwrap();
        assert!(e.to_string().contains("already"), "{e}");
    }
}

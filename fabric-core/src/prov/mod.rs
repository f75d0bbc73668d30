//! The shared provider layer (libfabric's prov/util): what every provider needs, once,
//! so that a provider writes its data path and its connection manager and nothing
//! else. Applications do not need this module.
//!
//! - [`key_map`]: the memory keys of a domain and the one remote-access check
//!   ([`KeyMap::verify`](key_map::KeyMap::verify)): key, rights, bounds, PMEM.
//! - [`sgl`]: scatter/gather lists over an operation's segments or a remote access's
//!   verified ranges, with copies by offset and a streaming cursor.
//! - [`queue`]: completion and event queue objects over a provider's [`Progress`]
//!   engine (and the downcast an endpoint binding needs), and the background progress
//!   thread.
//! - [`listen`]: what a connection manager over TCP shares: the listening socket,
//!   half-open connections with a cap and an age, and the connection-request token.
//! - [`crate::wait`]: the waitable FIFO behind those queues.

pub mod key_map;
pub mod listen;
#[cfg(target_os = "linux")]
pub mod queue;
pub mod sgl;

pub use key_map::{AccessError, AddrMode, KeyMap, KeyedMr, Need, Registration, RemoteRange};
pub use listen::{bind_listener, listen_addr, ConnToken, HalfOpen, HALF_OPEN_AGE, HALF_OPEN_MAX};
#[cfg(target_os = "linux")]
pub use queue::{start_progress_thread, Progress, ProviderCq, ProviderEq, PROGRESS_THREAD_TICK};
pub use sgl::{Cursor, ScatterList};

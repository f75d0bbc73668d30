//! Persistent memory primitives (work in progress).

//! User-space RoCEv2 (work in progress).

//! fabric-core (work in progress)

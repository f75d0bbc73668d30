//! The conformance suite against the tcp provider, one test per group so failures are
//! easy to read. Each test prints every case line and asserts no failure and at least
//! one pass (a provider that cannot run here fails the test rather than skipping it).

fabric_conformance::group_tests!("tcp");

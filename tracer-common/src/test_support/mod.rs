//! What the tests, the benchmarks and the lab share, behind the `test-support` feature so that
//! neither the kernel programs nor the shipped binary carry it: crafted Ethernet frames for
//! `BPF_PROG_TEST_RUN` (`craft`), and running work inside a network namespace (`netns`).
pub mod craft;
pub mod netns;

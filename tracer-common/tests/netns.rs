//! The network-namespace helper of the tests, against the real kernel: it needs root (the
//! unit tests of `cargo test --lib` do not), so it is an integration test.
use std::{io, path::PathBuf};

use tracer_common::test_support::netns::{Netns, run_in};

fn own_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("reading this thread's namespace")
}

#[test]
fn work_runs_elsewhere_and_the_caller_stays_put() {
    let before = own_netns();
    let inside = run_in(Netns::Fresh, own_netns)
        .unwrap_or_else(|error| panic!("this test needs root to create a namespace: {error}"));
    assert_ne!(inside, before);
    assert_eq!(own_netns(), before);
}

#[test]
fn a_missing_namespace_is_named_in_the_error() {
    let error = run_in(Netns::Named("trc-no-such-netns"), || ()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::NotFound);
    assert!(
        error.to_string().contains("/run/netns/trc-no-such-netns"),
        "{error}"
    );
}

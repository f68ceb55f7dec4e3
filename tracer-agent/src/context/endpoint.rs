//! The API server's addresses, as the cluster endpoint hostname resolves on this node.
//!
//! The answer depends on the endpoint access mode (public NLB addresses, or the private
//! EKS-owned ENIs inside the VPC) and changes when the mode does, so it is asked again on a
//! short period, in a thread of its own: `getaddrinfo` blocks.
use std::{
    collections::BTreeSet,
    net::{IpAddr, ToSocketAddrs as _},
    time::Duration,
};

use tokio::sync::watch;

/// The latest answer: the addresses, or why the name did not resolve.
pub(crate) type Resolution = Result<BTreeSet<IpAddr>, String>;

/// Resolves `host` now and every `period`, publishing each answer that differs from the last.
/// The thread ends when the receiver is dropped.
pub(crate) fn spawn_resolver(host: String, period: Duration) -> watch::Receiver<Resolution> {
    let (sender, receiver) = watch::channel(Err(format!("{host} not resolved yet")));
    std::thread::spawn(move || {
        while !sender.is_closed() {
            let answer = resolve(&host);
            sender.send_if_modified(|current| {
                let changed = *current != answer;
                *current = answer;
                changed
            });
            std::thread::sleep(period);
        }
    });
    receiver
}

/// Resolves `host` once, as the node's resolver answers now.
pub(crate) fn resolve(host: &str) -> Resolution {
    (host, 443)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|addr| addr.ip()).collect())
        .map_err(|error| format!("{host} does not resolve: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_reports_failures() {
        let localhost = resolve("localhost").expect("localhost resolves");
        assert!(localhost.iter().all(IpAddr::is_loopback), "{localhost:?}");
        let error = resolve("no-such-name.invalid").expect_err(".invalid never resolves");
        assert!(
            error.contains("no-such-name.invalid does not resolve"),
            "{error}"
        );
    }
}

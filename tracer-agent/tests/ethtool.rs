//! The driver statistics reader (`ethtool -S`'s ioctl) against the real kernel, in a fresh
//! network namespace: a veth pair, whose driver has private statistics too. They need root.
use tracer_agent::{aggregate::ena::EnaReading, datapath::ethtool::Ethtool};
use tracer_common::test_support::netns::{self, Netns};

/// `ip ARGS` in the calling thread's namespace; a failure fails the test.
fn ip(args: &[&str]) {
    netns::ip(args).unwrap_or_else(|error| panic!("{error}"));
}

fn index_of(name: &std::ffi::CStr) -> u64 {
    // SAFETY: a NUL-terminated name; if_nametoindex reads nothing else.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "{name:?}: {}", std::io::Error::last_os_error());
    u64::from(index)
}

/// Runs `work` in a fresh network namespace with a veth pair `v0`–`v1`.
fn with_veth_pair(work: impl FnOnce() + Send) {
    netns::run_in(Netns::Fresh, || {
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        work();
    })
    .unwrap_or_else(|error| panic!("these tests need root: {error}"));
}

#[test]
fn a_veths_statistics_are_read_by_name_with_the_kernels_values() {
    with_veth_pair(|| {
        let ethtool = Ethtool::open().expect("socket");
        assert_eq!(
            ethtool.driver("v0").expect("driver").as_deref(),
            Some("veth")
        );
        for (this, peer) in [("v0", c"v1"), ("v1", c"v0")] {
            let statistics = ethtool.statistics(this).expect("statistics");
            let value_of = |name: &str| {
                statistics
                    .iter()
                    .find(|(statistic, _)| statistic == name)
                    .map(|(_, value)| *value)
            };
            assert_eq!(
                value_of("peer_ifindex"),
                Some(index_of(peer)),
                "{this}: {statistics:?}"
            );
            assert_eq!(
                value_of("rx_queue_0_xdp_packets"),
                Some(0),
                "{statistics:?}"
            );
            let mut names: Vec<&str> = statistics.iter().map(|(name, _)| name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), statistics.len(), "one value per name");
        }
    });
}

#[test]
fn interfaces_of_other_drivers_give_no_ena_reading_and_no_error() {
    with_veth_pair(|| {
        let ethtool = Ethtool::open().expect("socket");
        assert_eq!(ethtool.driver("lo").expect("lo"), None, "no driver to tell");
        for name in ["v0", "lo"] {
            assert_eq!(EnaReading::read(&ethtool, name).expect(name), None);
        }
        let error = ethtool.driver("absent0").expect_err("no such interface");
        assert!(error.to_string().contains("absent0"), "{error}");
    });
}

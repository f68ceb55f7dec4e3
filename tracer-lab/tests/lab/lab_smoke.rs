//! The lab itself, for real (needs root): it comes up, every default scenario ends as expected
//! with exactly the bytes it meant to send, the endpoint mode switches DNS and the NLB at once,
//! two labs live side by side, and nothing is left behind by `down`, by drop or by a failed `up`.
use std::process::Command;

use tracer_common::labels::{Endpoint, Path};
use tracer_lab::lab::{self, ClientKind, EndpointMode, Lab, LabOptions, Outcome};

fn require_root_and_ip() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root to create network namespaces (run `cargo xtask test` as root)"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "ip not found: run `cargo xtask setup` (installs iproute2)"
    );
}

fn options(mode: EndpointMode) -> LabOptions {
    LabOptions {
        mode,
        external_snat: false,
        helper_exe: env!("CARGO_BIN_EXE_tracer-lab").into(),
    }
}

/// Namespaces and state directory of lab `id` that still exist.
fn leftovers(id: &str) -> Vec<String> {
    let prefix = format!("trc-{id}-");
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    let state_dir = std::path::Path::new("/run/tracer-lab").join(id);
    if state_dir.exists() {
        left.push(state_dir.display().to_string());
    }
    left
}

/// Runs `lab client <args>` in `role`'s namespace and returns its JSON report.
fn client(lab: &Lab, role: &str, args: &[&str]) -> serde_json::Value {
    let output = lab
        .command_in(role, env!("CARGO_BIN_EXE_tracer-lab"))
        .args(["lab", "client"])
        .args(args)
        .output()
        .expect("running the lab client");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the client's JSON report")
}

#[test]
fn every_scenario_ends_as_expected_and_down_removes_everything() {
    require_root_and_ip();
    let lab = Lab::up(&options(EndpointMode::PublicPrivate)).expect("lab up");
    let id = lab.id().to_owned();
    let scenarios = lab::scenarios(EndpointMode::PublicPrivate);
    let sent = lab.run_traffic(&scenarios).expect("traffic");
    assert_eq!(sent.len(), scenarios.len());
    for (scenario, sent) in scenarios.iter().zip(&sent) {
        assert!(
            sent.as_expected(),
            "{} did not end as expected: {sent:?}",
            scenario.name
        );
        if scenario.client == ClientKind::Sink {
            assert_eq!(
                sent.payload_bytes,
                u64::from(sent.connected) * scenario.bytes_per_connection,
                "{}",
                scenario.name
            );
        }
    }
    let outcome = |name: &str| sent.iter().find(|s| s.scenario == name).unwrap();
    assert_eq!(outcome("dropped_syn").timed_out, 1);
    assert_eq!(outcome("refused").refused, 1);
    assert_eq!(
        outcome(Path::NodeToApiserver.as_str()).expected_endpoint,
        Some(Endpoint::Private)
    );
    assert_eq!(outcome("dropped_syn").expected_outcome, Outcome::TimedOut);

    // Public-private: the NLB serves; the node, inside the VPC, is told the ENIs.
    let nlb = "203.0.113.10:443";
    let resolve = |role| client(&lab, role, &["dns", "--to", "10.0.0.2:53"])["answers"].clone();
    assert_eq!(
        resolve("node"),
        serde_json::json!(["10.0.1.50", "10.0.2.50"])
    );
    assert_eq!(
        resolve("inet"),
        serde_json::json!(["203.0.113.10", "203.0.113.11"])
    );
    assert_eq!(
        client(&lab, "node", &["sink", "--to", nlb, "--bytes", "10"])["connected"],
        1
    );

    lab.set_mode(EndpointMode::Private).expect("mode private");
    assert_eq!(lab.mode().unwrap(), EndpointMode::Private);
    assert_eq!(
        resolve("inet"),
        serde_json::json!(["10.0.1.50", "10.0.2.50"])
    );
    assert_eq!(
        client(&lab, "node", &["sink", "--to", nlb, "--bytes", "10"])["timed_out"],
        1
    );

    lab.set_mode(EndpointMode::Public).expect("mode public");
    assert_eq!(
        resolve("node"),
        serde_json::json!(["203.0.113.10", "203.0.113.11"])
    );

    lab.down().expect("lab down");
    assert_eq!(leftovers(&id), Vec::<String>::new(), "left behind by down");
}

#[test]
fn two_labs_live_side_by_side_and_drop_removes_them() {
    require_root_and_ip();
    let first = Lab::up(&options(EndpointMode::Public)).expect("first lab up");
    let second = Lab::up(&options(EndpointMode::Private)).expect("second lab up");
    assert_ne!(first.id(), second.id());
    let local = || {
        lab::scenarios(EndpointMode::Public)
            .into_iter()
            .filter(|s| {
                s.name == Path::PodToPodLocal.as_str() || s.name == Path::NodeToApiserver.as_str()
            })
            .collect::<Vec<_>>()
    };
    for lab in [&first, &second] {
        let sent = lab.run_traffic(&local()).expect("traffic");
        assert!(
            sent.iter().all(|s| s.connected == s.connections),
            "{sent:?}"
        );
    }
    let ids = [first.id().to_owned(), second.id().to_owned()];
    drop(first);
    drop(second);
    for id in ids {
        assert_eq!(leftovers(&id), Vec::<String>::new(), "left behind by drop");
    }
}

#[test]
fn a_failed_up_leaves_nothing_behind() {
    require_root_and_ip();
    // A helper that exits at once: no server ever listens.
    let error = Lab::up(&LabOptions {
        helper_exe: "/bin/false".into(),
        ..options(EndpointMode::Public)
    })
    .err()
    .expect("up must fail when its servers cannot start");
    let message = format!("{error:#}");
    assert!(message.contains("did not start listening"), "{message}");
    let id = message
        .split_once("bringing up lab ")
        .map(|(_, rest)| &rest[..4])
        .unwrap_or_else(|| panic!("the error names the lab: {message}"));
    assert_eq!(
        leftovers(id),
        Vec::<String>::new(),
        "left behind by a failed up"
    );
}

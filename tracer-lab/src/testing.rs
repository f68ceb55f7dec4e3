//! What the lab tests share: the root check, a lab in an endpoint mode, a lab with the agent
//! running and ready. `helper_exe` is the binary the lab runs its servers and clients with
//! (`env!("CARGO_BIN_EXE_tracer-lab")` in the lab tests).
use std::time::Duration;

use crate::{
    agent::LabAgent,
    build,
    lab::{self, EndpointMode, Lab, LabOptions, Scenario},
    run,
};

/// Fails the test, saying why, unless it runs as root.
pub fn require_root() {
    assert!(
        run::is_root(),
        "the lab tests need root (CAP_NET_ADMIN, CAP_BPF) to create network namespaces and load eBPF programs"
    );
}

/// A lab in `mode`, the node SNATing pod egress (the VPC CNI's default).
pub fn lab(mode: EndpointMode, helper_exe: &str) -> Lab {
    require_root();
    Lab::up(&LabOptions {
        mode,
        external_snat: false,
        helper_exe: helper_exe.into(),
    })
    .expect("lab up")
}

/// A lab in `mode` with the agent (`LabAgent::start`) ready.
pub fn lab_with_agent(mode: EndpointMode, helper_exe: &str) -> (Lab, LabAgent) {
    let lab = lab(mode, helper_exe);
    let mut agent = LabAgent::start(&lab, &build::tracer_path()).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    (lab, agent)
}

/// The lab's scenarios called `names` in `mode`; fails the test if one is missing.
pub fn scenarios(mode: EndpointMode, names: &[&str]) -> Vec<Scenario> {
    let chosen: Vec<Scenario> = lab::scenarios(mode)
        .into_iter()
        .filter(|s| names.contains(&s.name))
        .collect();
    assert_eq!(chosen.len(), names.len(), "the lab lacks one of {names:?}");
    chosen
}

//! Developer automation for the tracer, as a library so that integration tests share it. The
//! lab, and what drives it, is the `tracer_lab` crate.
pub mod bench;
pub mod demo;
pub mod setup;
pub mod test;

use tracer_lab::lab::{EndpointMode, Lab, LabOptions};

/// The lab the demo and the benchmarks run in: the node SNATing pod egress (the VPC CNI's
/// default), this binary serving the lab's clients and servers.
pub fn lab_in(mode: EndpointMode) -> anyhow::Result<Lab> {
    Lab::up(&LabOptions {
        mode,
        external_snat: false,
        helper_exe: std::env::current_exe()?,
    })
}

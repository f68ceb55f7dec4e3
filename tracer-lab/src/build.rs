//! Building the `tracer` binary the lab runs.
use std::{path::PathBuf, process::Command};

use crate::run::require_success;

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or(manifest_dir.clone(), PathBuf::from)
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// The virtualenv `cargo xtask setup` installs the manifest tools in.
pub fn venv() -> PathBuf {
    target_dir().join("xtask-venv")
}

/// A program installed in the virtualenv: `kubectl`, `helm`, `kubernetes-validate`, `python`.
pub fn venv_tool(name: &str) -> PathBuf {
    venv().join("bin").join(name)
}

/// Where cargo puts the `tracer` binary of `profile` ("debug" or "release").
fn tracer_in(profile: &str) -> PathBuf {
    target_dir().join(profile).join("tracer")
}

/// Where cargo puts the debug `tracer` binary (what the tests run).
pub fn tracer_path() -> PathBuf {
    tracer_in("debug")
}

/// Builds the agent (kernel programs included) and returns the binary's path.
pub fn agent() -> anyhow::Result<PathBuf> {
    build_agent(&[], "debug")
}

/// The optimized agent, for benchmarks of its own CPU and memory and for the container image.
pub fn agent_release() -> anyhow::Result<PathBuf> {
    build_agent(&["--release"], "release")
}

fn build_agent(flags: &[&str], profile: &str) -> anyhow::Result<PathBuf> {
    eprintln!(
        "build: cargo build -p tracer-agent {} (kernel programs via aya-build)",
        flags.join(" ")
    );
    require_success(
        Command::new(env!("CARGO"))
            .args(["build", "-p", "tracer-agent"])
            .args(flags)
            .current_dir(workspace_root()),
    )?;
    Ok(tracer_in(profile))
}

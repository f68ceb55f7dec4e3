//! `cargo xtask test`: the whole suite, as CI runs it.
use std::{process::Command, time::Instant};

use anyhow::bail;

use tracer_lab::{build, figures, run};

use crate::setup;

pub fn test() -> anyhow::Result<()> {
    if !run::is_root() {
        bail!(
            "cargo xtask test needs root: the kernel-program tests load eBPF programs and the lab tests create network namespaces (run it with sudo, or as root in CI)"
        );
    }
    setup::setup()?;
    // The user-space crates are every member but the kernel crate, which only builds for the
    // BPF target, with nightly (as aya-build builds it). The lab crate is not a default member:
    // name the crates, so that its tests run here.
    let user_space = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO"));
        command.args(args);
        command
    };
    let user_space_crates = |subcommand: &str, args: &[&str]| {
        let mut command = user_space(&[subcommand, "--workspace", "--exclude", "tracer-ebpf"]);
        command.args(args);
        command
    };
    let kernel_clippy = {
        let mut command = Command::new("rustup");
        command
            .args(["run", "nightly", "cargo", "clippy", "-p", "tracer-ebpf"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .env(
                "RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            )
            .env(
                "CARGO_TARGET_DIR",
                build::workspace_root().join("target/clippy-ebpf"),
            );
        command
    };
    let steps = [
        ("formatting", user_space(&["fmt", "--all", "--", "--check"])),
        (
            "clippy (user space)",
            user_space_crates("clippy", &["--all-targets", "--", "-D", "warnings"]),
        ),
        ("clippy (kernel programs)", kernel_clippy),
        ("build", user_space_crates("build", &[])),
        // One test at a time: the lab tests drive real traffic and time it.
        (
            "unit, kernel-program and lab tests",
            user_space_crates("test", &["--", "--test-threads=1"]),
        ),
        // Regression guards: a second clock read or a per-packet event in the datapath, or a
        // slower exposition, fails the build (goals loosened by a quarter for shared machines).
        (
            "datapath benchmark (guard)",
            user_space(&["xtask", "bench", "datapath", "--guard"]),
        ),
        (
            "scrape benchmark (guard)",
            user_space(&["xtask", "bench", "scrape", "--guard"]),
        ),
    ];
    figures::clear()?;
    for (name, mut command) in steps {
        let started = Instant::now();
        eprintln!("test: {name}: {}", run::describe(&command));
        run::require_success(command.current_dir(build::workspace_root()))?;
        eprintln!("test: {name} passed in {:.1?}", started.elapsed());
    }
    for (name, text) in figures::all()? {
        eprintln!("test: figure {name}:\n{}", text.trim_end());
    }
    Ok(())
}

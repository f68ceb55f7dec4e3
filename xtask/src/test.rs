//! `cargo xtask test`: the whole suite, as CI runs it.
use std::{process::Command, time::Instant};

use anyhow::bail;

use crate::{build, run, setup};

pub fn test() -> anyhow::Result<()> {
    if !run::is_root() {
        bail!(
            "cargo xtask test needs root: the kernel-program tests load eBPF programs and the lab tests create network namespaces (run it with sudo, or as root in CI)"
        );
    }
    setup::setup()?;
    let cargo = env!("CARGO");
    let steps: [(&str, &[&str]); 4] = [
        ("formatting", &["fmt", "--all", "--", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("build", &["build", "--workspace"]),
        // One test at a time: the lab tests drive real traffic and time it.
        (
            "unit, kernel-program and lab tests",
            &["test", "--workspace", "--", "--test-threads=1"],
        ),
    ];
    for (name, args) in steps {
        let started = Instant::now();
        eprintln!("test: {name}: cargo {}", args.join(" "));
        run::require_success(
            Command::new(cargo)
                .args(args)
                .current_dir(build::workspace_root()),
        )?;
        eprintln!("test: {name} passed in {:.1?}", started.elapsed());
    }
    Ok(())
}

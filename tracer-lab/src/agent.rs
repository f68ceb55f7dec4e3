//! The real `tracer agent`, running inside a lab's node namespace: started, waited for,
//! scraped and stopped the same way by the demo and the integration tests.
use std::{
    fs::File,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    lab::{Bpffs, Lab},
    run::command_output,
    scrape::{self, Sample},
};

/// Where the agent listens inside the node namespace (loopback: nothing leaves the lab).
pub const METRICS_ADDR: &str = "127.0.0.1:9477";
/// The port of [`METRICS_ADDR`], for an agent listening on every address of the lab node.
pub const METRICS_PORT: u16 = 9477;
/// Short so that tests and the demo see their traffic within a fraction of a second.
pub const POLL_INTERVAL: &str = "200ms";
/// Shorter than the default 5 s, so an endpoint-mode switch shows within a second.
pub const RESOLVE_INTERVAL: &str = "1s";
/// Shorter than the default 3 s: the lab's dropped SYN is declared unanswered sooner.
pub const SYN_TIMEOUT: &str = "1s";

/// Polling, SYN timeout and re-resolution shorter than the defaults, so that tests and the
/// demo see their traffic within a fraction of a second.
pub fn quick_flags() -> Vec<String> {
    [
        "--poll-interval",
        POLL_INTERVAL,
        "--syn-timeout",
        SYN_TIMEOUT,
        "--resolve-interval",
        RESOLVE_INTERVAL,
    ]
    .map(String::from)
    .to_vec()
}

/// The context flags a real node's configuration would give (`agent` and `explain` take the
/// same): control-plane ENIs, the cluster endpoint's name, kube-dns, the service CIDR. The VPC
/// CIDR comes from the lab's IMDS and the API server addresses from the lab's resolver, as on
/// EC2.
pub fn context_flags(lab: &Lab) -> Vec<String> {
    let facts = lab.facts();
    let mut flags: Vec<String> = vec![
        "--cluster-dns".into(),
        facts.cluster_dns.to_string(),
        "--service-cidr".into(),
        facts.service_cidr.to_string(),
        "--cluster-endpoint".into(),
        facts.cluster_endpoint.clone(),
    ];
    for ip in &facts.controlplane_ips {
        flags.extend(["--controlplane-ip".into(), ip.to_string()]);
    }
    flags
}

/// Where an agent started with [`restart_flags`] keeps its state: in the lab's state directory.
pub fn state_file(lab: &Lab) -> PathBuf {
    lab.state_dir().join("agent").join("state")
}

/// `--pin-path` in `bpffs` and `--state-file` in the lab: an agent that a kill does not reset.
pub fn restart_flags(lab: &Lab, bpffs: &Bpffs) -> Vec<String> {
    vec![
        "--pin-path".into(),
        bpffs.pin_path().display().to_string(),
        "--state-file".into(),
        state_file(lab).display().to_string(),
    ]
}

/// The value of `field` in each of `pid`'s `fdinfo` files that `select` keeps.
fn fdinfo_values(pid: u32, field: &str, select: impl Fn(&str) -> bool) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| select(info))
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| value.trim().parse().ok())
        })
        .collect()
}

/// The value of line `field` (`Uid`, `VmRSS`, …) of `/proc/PID/status`, trimmed.
pub fn status_field(pid: u32, field: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn is_tcx_link(fdinfo: &str) -> bool {
    fdinfo.contains("link_type:\ttcx")
}

/// The locked-memory limit a container gets from a runtime that sets none: the kernel's
/// historical default, the smallest a node hands out.
const CONTAINER_MEMLOCK_BYTES: u64 = 64 * 1024;

/// How a container runtime runs the agent under the DaemonSet's security context: a non-root
/// uid, the binary's file capabilities as the image sets them, only the granted capabilities
/// in the bounding set, no_new_privs, and a small RLIMIT_MEMLOCK.
#[derive(Clone, Debug)]
pub struct Confinement {
    pub uid: u32,
    /// As Kubernetes writes them: `BPF`, `NET_ADMIN`, …
    pub capabilities: Vec<String>,
    /// As `setcap` takes them: `cap_bpf,cap_net_admin+p`.
    pub file_capabilities: String,
}

impl Confinement {
    /// The same, with one capability taken away.
    pub fn without(&self, capability: &str) -> Self {
        Self {
            capabilities: self
                .capabilities
                .iter()
                .filter(|cap| *cap != capability)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    /// setpriv's `--bounding-set` argument: `-all,+bpf,+net_admin`.
    fn bounding_set(&self) -> String {
        std::iter::once("-all".to_owned())
            .chain(
                self.capabilities
                    .iter()
                    .map(|cap| format!("+{}", cap.to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Copies `tracer` where the unprivileged uid can run it and gives the copy the image's
    /// file capabilities.
    fn install(&self, tracer: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let copy = dir.join("tracer");
        std::fs::copy(tracer, &copy)
            .with_context(|| format!("copying {} to {}", tracer.display(), copy.display()))?;
        command_output(
            Command::new("setcap")
                .arg(&self.file_capabilities)
                .arg(&copy),
        )?;
        Ok(copy)
    }

    /// Runs `tracer ARGS` to its end under this confinement (the binary copied into `dir`).
    pub fn run(&self, tracer: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
        let copy = self.install(tracer, dir)?;
        let argv = self.wrap(&copy);
        Command::new(&argv[0])
            .args(&argv[1..])
            .args(args)
            .output()
            .with_context(|| format!("running {}", argv.join(" ")))
    }

    /// The programs that run `binary` under this confinement, outermost first.
    fn wrap(&self, binary: &Path) -> Vec<String> {
        let uid = self.uid.to_string();
        vec![
            "prlimit".into(),
            format!("--memlock={CONTAINER_MEMLOCK_BYTES}:{CONTAINER_MEMLOCK_BYTES}"),
            "setpriv".into(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--inh-caps=-all".into(),
            format!("--bounding-set={}", self.bounding_set()),
            "--no-new-privs".into(),
            binary.to_string_lossy().into_owned(),
        ]
    }
}

/// A process's resident memory, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss_kib: u64,
    /// The peak since the process started.
    pub peak_kib: u64,
}

pub struct LabAgent {
    ns: String,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    keep: bool,
    /// The copy of the binary a confined agent runs, removed with the agent.
    confined_copy: Option<PathBuf>,
}

impl LabAgent {
    /// Starts `tracer agent` in the lab's node namespace with `quick_flags` and the lab's
    /// `context_flags`.
    pub fn start(lab: &Lab, tracer: &Path) -> anyhow::Result<Self> {
        let mut flags = quick_flags();
        flags.extend(context_flags(lab));
        Self::start_with(lab, tracer, flags)
    }

    /// Starts `tracer agent --metrics-addr METRICS_ADDR` with `flags`.
    pub fn start_with(lab: &Lab, tracer: &Path, flags: Vec<String>) -> anyhow::Result<Self> {
        Self::launch(lab, tracer, METRICS_ADDR, flags, None)
    }

    /// Like `start`, listening on every address of the node as the DaemonSet does (port
    /// [`METRICS_PORT`]), with `extra` flags: for tests whose clients are pods. It is still
    /// scraped on loopback.
    pub fn start_on_every_address(
        lab: &Lab,
        tracer: &Path,
        extra: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut flags = quick_flags();
        flags.extend(context_flags(lab));
        flags.extend(extra);
        let every_address = SocketAddr::from(([0, 0, 0, 0], METRICS_PORT));
        Self::launch(lab, tracer, &every_address.to_string(), flags, None)
    }

    /// Like `start`, run as the DaemonSet runs the agent (see [`Confinement`]), with `extra`
    /// flags.
    pub fn start_confined(
        lab: &Lab,
        tracer: &Path,
        confinement: &Confinement,
        extra: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut flags = quick_flags();
        flags.extend(context_flags(lab));
        flags.extend(extra);
        Self::launch(lab, tracer, METRICS_ADDR, flags, Some(confinement))
    }

    fn launch(
        lab: &Lab,
        tracer: &Path,
        listen: &str,
        flags: Vec<String>,
        confinement: Option<&Confinement>,
    ) -> anyhow::Result<Self> {
        if !tracer.exists() {
            bail!(
                "{} not found: build it first (`cargo build -p tracer-agent`)",
                tracer.display()
            );
        }
        let mut args: Vec<String> = vec!["agent".into(), "--metrics-addr".into(), listen.into()];
        args.extend(flags);
        let log = std::env::temp_dir().join(format!("tracer-agent-{}.log", lab.id()));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (argv, confined_copy) = match confinement {
            None => (vec![tracer.to_string_lossy().into_owned()], None),
            Some(confinement) => {
                let dir = std::env::temp_dir().join(format!("tracer-confined-{}", lab.id()));
                let copy = confinement.install(tracer, &dir)?;
                (confinement.wrap(&copy), Some(dir))
            }
        };
        let mut command = lab.command_in("node", &argv[0]);
        command
            .args(&argv[1..])
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        eprintln!(
            "agent: starting {} {} in {}",
            argv.join(" "),
            args.join(" "),
            lab.ns("node")
        );
        let child = command.spawn().context("starting the agent")?;
        Ok(Self {
            ns: lab.ns("node"),
            child,
            addr: METRICS_ADDR.parse()?,
            log,
            keep: false,
            confined_copy,
        })
    }

    /// Waits for the agent to exit by itself; returns its exit code and log.
    pub fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<(Option<i32>, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Ok((status.code(), log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the agent still runs after {timeout:?}:\n{}",
            self.log_tail()
        )
    }

    /// Waits until `/readyz` answers 200, or fails with the agent's reasons and log.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            match self.get("/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((_, body)) => last = body,
                Err(error) => last = format!("{error:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the agent was not ready after {timeout:?}: {last}\n{}",
            self.log_tail()
        )
    }

    /// Waits until the agent has polled once from start to end after this call (two new
    /// snapshots published): its snapshot then includes everything done before the call.
    pub fn wait_whole_poll(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let (mut last, mut published) = (self.snapshot_time()?, 0);
        while published < 2 {
            if Instant::now() > deadline {
                bail!(
                    "the agent published {published} snapshot(s) in {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            let time = self.snapshot_time()?;
            if time != last {
                (last, published) = (time, published + 1);
            }
        }
        Ok(())
    }

    /// When the latest snapshot was taken (`time_unix_ms` of `/api/v1/paths`).
    fn snapshot_time(&self) -> anyhow::Result<u64> {
        let (status, body) = self.get("/api/v1/paths")?;
        let paths: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("/api/v1/paths answered {status}: {body}"))?;
        paths["time_unix_ms"]
            .as_u64()
            .with_context(|| format!("/api/v1/paths has no time_unix_ms: {body}"))
    }

    pub fn scrape(&self) -> anyhow::Result<Vec<Sample>> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {body}");
        }
        scrape::parse(&body)
    }

    /// The raw exposition, for showing.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        Ok(self.get("/metrics")?.1)
    }

    /// `GET path` (with its query) on the agent: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        scrape::http_get(&self.ns, self.addr, path)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ids of the eBPF programs the agent holds, from `/proc/PID/fdinfo` (other agents
    /// may run beside it: theirs are not in the list).
    pub fn programs(&self) -> Vec<u64> {
        fdinfo_values(self.pid(), "prog_id:", |_| true)
    }

    /// The agent's resident memory now and at its peak (`VmRSS`, `VmHWM`), in KiB.
    pub fn memory_kib(&self) -> anyhow::Result<Memory> {
        let kib = |name: &str| -> anyhow::Result<u64> {
            let value = status_field(self.pid(), name)?;
            value
                .split_whitespace()
                .next()
                .and_then(|kib| kib.parse().ok())
                .with_context(|| format!("{name} of /proc/{}/status is {value:?}", self.pid()))
        };
        Ok(Memory {
            rss_kib: kib("VmRSS")?,
            peak_kib: kib("VmHWM")?,
        })
    }

    /// The kernel memory charged for the agent's maps (the `memlock` of each map it holds).
    pub fn map_memlock_bytes(&self) -> u64 {
        fdinfo_values(self.pid(), "memlock:", |info| info.contains("map_type:"))
            .iter()
            .sum()
    }

    /// The interfaces (ifindex) the agent holds tcx links on.
    pub fn linked_ifindexes(&self) -> Vec<u64> {
        fdinfo_values(self.pid(), "ifindex:", is_tcx_link)
    }

    /// The program each tcx link the agent holds runs, by id: a link taken over from a pin
    /// runs the killed agent's program until the agent moves it to its own.
    pub fn linked_programs(&self) -> Vec<u64> {
        fdinfo_values(self.pid(), "prog_id:", is_tcx_link)
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took and the exit code.
    pub fn stop(self) -> anyhow::Result<(Duration, Option<i32>)> {
        self.stop_logged().map(|(took, code, _)| (took, code))
    }

    /// [`stop`](Self::stop), also returning everything the agent logged.
    pub fn stop_logged(mut self) -> anyhow::Result<(Duration, Option<i32>, String)> {
        let started = Instant::now();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.try_wait()? {
                return Ok((started.elapsed(), status.code(), self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "the agent did not exit within 10 s of SIGTERM:\n{}",
            self.log_tail()
        )
    }

    /// Leaves the agent running after this handle is gone (`lab down` stops it).
    pub fn keep_running(mut self) {
        self.keep = true;
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- agent log ({}) ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.confined_copy {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

//! The real `tracer agent`, running inside a lab's node namespace: started, waited for,
//! scraped and stopped the same way by the demo and the integration tests.
use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    lab::Lab,
    scrape::{self, Sample},
};

/// Where the agent listens inside the node namespace (loopback: nothing leaves the lab).
pub const METRICS_ADDR: &str = "127.0.0.1:9477";
/// Short so that tests and the demo see their traffic within a fraction of a second.
pub const POLL_INTERVAL: &str = "200ms";
/// Shorter than the default 5 s, so an endpoint-mode switch shows within a second.
pub const RESOLVE_INTERVAL: &str = "1s";
/// Shorter than the default 3 s: the lab's dropped SYN is declared unanswered sooner.
pub const SYN_TIMEOUT: &str = "1s";

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

pub struct LabAgent {
    ns: String,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    keep: bool,
}

impl LabAgent {
    /// Starts `tracer agent` in the lab's node namespace with the lab's `context_flags`.
    pub fn start(lab: &Lab, tracer: &Path) -> anyhow::Result<LabAgent> {
        LabAgent::start_with(lab, tracer, context_flags(lab))
    }

    /// Starts `tracer agent` with the given context flags instead of the lab's.
    pub fn start_with(lab: &Lab, tracer: &Path, context: Vec<String>) -> anyhow::Result<LabAgent> {
        if !tracer.exists() {
            bail!(
                "{} not found: build it first (`cargo build -p tracer-agent`)",
                tracer.display()
            );
        }
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--metrics-addr".into(),
            METRICS_ADDR.into(),
            "--poll-interval".into(),
            POLL_INTERVAL.into(),
            "--syn-timeout".into(),
            SYN_TIMEOUT.into(),
            "--resolve-interval".into(),
            RESOLVE_INTERVAL.into(),
        ];
        args.extend(context);
        let log = std::env::temp_dir().join(format!("tracer-agent-{}.log", lab.id()));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = lab.command_in("node", &tracer.to_string_lossy());
        command
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        eprintln!(
            "agent: starting {} {} in {}",
            tracer.display(),
            args.join(" "),
            lab.ns("node")
        );
        let child = command.spawn().context("starting the agent")?;
        Ok(LabAgent {
            ns: lab.ns("node"),
            child,
            addr: METRICS_ADDR.parse()?,
            log,
            keep: false,
        })
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

    /// Sends SIGTERM and waits for the exit; returns how long it took and the exit code.
    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> anyhow::Result<(Duration, Option<i32>)> {
        let started = Instant::now();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.try_wait()? {
                return Ok((started.elapsed(), status.code()));
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

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
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
    }
}

//! `cargo xtask bench footprint`: what the agent itself costs — CPU and resident memory of the
//! (release) agent with 0, 1k, 10k and 100k active flows, and the kernel memory of its maps.
//! The idle agent, measured in the same run, is the baseline.
//!
//! The flows are UDP datagrams from pod-a to distinct ports of pod-b (local) and pod-r
//! (remote), re-sent every second so that they stay active; the agent polls at its default
//! interval (1 s). Goals (issue 7): user CPU ≤ 0.02 core at 10k flows, RSS ≤ 64 MiB, maps
//! ≤ 32 MiB with the default table.
//!
//! With `--pinned`, the agent runs as for restarts without loss (`--pin-path` on a bpffs of
//! the lab's own, `--state-file`): the cost of saving every connection every poll shows, and
//! the state file's size is reported.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use tracer_lab::{
    agent::{self, LabAgent, context_flags},
    build,
    lab::{Bpffs, EndpointMode, exec},
    scrape,
};

/// How long each state is measured.
const WINDOW: Duration = Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

struct State {
    flows: u32,
    /// `--flow-table-size`; None for the default.
    table: Option<u32>,
}

const STATES: [State; 4] = [
    State {
        flows: 0,
        table: None,
    },
    State {
        flows: 1_000,
        table: None,
    },
    State {
        flows: 10_000,
        table: None,
    },
    // More flows than the default table holds: the table is sized for them.
    State {
        flows: 100_000,
        table: Some(262_144),
    },
];

#[derive(Serialize)]
struct Row {
    flows: u32,
    table_entries: f64,
    flow_table_size: u32,
    cpu_cores: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    maps_mib: f64,
    /// With `--pinned`.
    state_file_mib: Option<f64>,
}

/// Measures the states whose flow counts are in `only` (all of them when it is empty), with
/// the agent saving its state for restarts when `pinned`.
pub fn footprint(
    check: bool,
    json: Option<&std::path::Path>,
    only: &[u32],
    pinned: bool,
) -> anyhow::Result<()> {
    let known: Vec<u32> = STATES.iter().map(|state| state.flows).collect();
    if let Some(unknown) = only.iter().find(|flows| !known.contains(flows)) {
        bail!("--flows {unknown}: not a state of the bench; choose among {known:?}");
    }
    let states = STATES
        .iter()
        .filter(|state| only.is_empty() || only.contains(&state.flows));
    let tracer = build::agent_release()?;
    let lab = crate::lab_in(EndpointMode::Public)?;
    let bpffs = pinned.then(|| Bpffs::mount(&lab)).transpose()?;
    let facts = lab.facts();
    let from = IpAddr::from(facts.pod_ips["pod-a"]);
    let targets = [facts.pod_ips["pod-b"], facts.pod_ips["pod-r"]].map(IpAddr::from);
    let mut rows = Vec::new();
    for state in states {
        eprintln!("bench footprint: {} flows", state.flows);
        let table = state.table.unwrap_or(DEFAULT_TABLE);
        let mut flags = context_flags(&lab);
        flags.extend(["--flow-table-size".into(), table.to_string()]);
        if let Some(bpffs) = &bpffs {
            flags.extend(agent::restart_flags(&lab, bpffs));
        }
        let mut agent = LabAgent::start_with(&lab, &tracer, flags)?;
        agent.wait_ready(Duration::from_secs(15))?;
        let pod_a = lab.ns("pod-a");
        spray(&pod_a, from, targets, state.flows)?;
        let cpu_before = cpu_seconds(agent.pid())?;
        let started = Instant::now();
        while started.elapsed() < WINDOW {
            std::thread::sleep(Duration::from_secs(1));
            spray(&pod_a, from, targets, state.flows)?;
        }
        let cpu = (cpu_seconds(agent.pid())? - cpu_before) / started.elapsed().as_secs_f64();
        let entries = scrape::sum(&agent.scrape()?, "tracer_flow_table_entries", &[]);
        let memory = agent.memory_kib()?;
        rows.push(Row {
            flows: state.flows,
            table_entries: entries,
            flow_table_size: table,
            cpu_cores: cpu,
            rss_mib: memory.rss_kib as f64 / 1024.0,
            peak_rss_mib: memory.peak_kib as f64 / 1024.0,
            maps_mib: agent.map_memlock_bytes() as f64 / MIB,
            state_file_mib: bpffs
                .is_some()
                .then(|| std::fs::metadata(agent::state_file(&lab)))
                .transpose()
                .context("the agent's state file")?
                .map(|file| file.len() as f64 / MIB),
        });
        agent.stop()?;
    }
    drop(bpffs);
    lab.down()?;

    println!(
        "| active flows | in table | table size | agent CPU (cores) | RSS (peak) MiB | kernel maps MiB | state file MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {:.0} | {} | {:.4} | {:.1} ({:.1}) | {:.1} | {} |",
            row.flows,
            row.table_entries,
            row.flow_table_size,
            row.cpu_cores,
            row.rss_mib,
            row.peak_rss_mib,
            row.maps_mib,
            row.state_file_mib
                .map_or("(not pinned)".to_owned(), |mib| format!("{mib:.1}"))
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if check {
        let at_10k = rows.iter().find(|row| row.flows == 10_000);
        let default_maps = rows.iter().find(|row| row.flow_table_size == DEFAULT_TABLE);
        if at_10k.is_some_and(|row| row.cpu_cores > 0.02)
            || rows.iter().any(|row| row.peak_rss_mib > 64.0)
            || default_maps.is_some_and(|row| row.maps_mib > 32.0)
        {
            bail!(
                "footprint goals missed (CPU ≤ 0.02 core at 10k flows, RSS ≤ 64 MiB, maps ≤ 32 MiB)"
            );
        }
    }
    Ok(())
}

const DEFAULT_TABLE: u32 = tracer_common::DEFAULT_FLOW_TABLE_SIZE;

/// The source port of every datagram, so that each round refreshes the same flows.
const SOURCE_PORT: u16 = 40_000;

/// One datagram from `from` to each of `flows` (target, port) pairs: one flow each.
fn spray(ns: &str, from: IpAddr, targets: [IpAddr; 2], flows: u32) -> anyhow::Result<()> {
    exec::within(ns, move || {
        let socket = UdpSocket::bind(SocketAddr::new(from, SOURCE_PORT))?;
        for n in 0..flows {
            let target = targets[(n % 2) as usize];
            let port = 1024 + (n / 2) as u16;
            // A full socket buffer drops a datagram locally: that flow shows up next round.
            let _ = socket.send_to(b"footprint", SocketAddr::new(target, port));
        }
        Ok(())
    })
}

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(index)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

//! The agent as the DaemonSet runs it, for real, in the lab node: uid and capabilities read
//! from the rendered manifest, file capabilities from the Dockerfile's `setcap`, only those
//! capabilities in the bounding set, no_new_privs, a 64 KiB RLIMIT_MEMLOCK and no bpffs. It
//! attaches, becomes ready, counts traffic (NAT observed through conntrack) and detaches on
//! SIGTERM; without any one of its capabilities the kernel refuses it and the agent exits 1
//! naming the missing one.
use std::{
    collections::BTreeSet, os::unix::fs::MetadataExt as _, process::Command, time::Duration,
};

use tracer_common::labels::Path;
use tracer_lab::{
    agent::{self, Confinement, LabAgent},
    build, deploy,
    lab::{Bpffs, EndpointMode, Lab},
    run::command_output,
    scrape, testing,
};

/// The DaemonSet's confinement, from the rendered base and the Dockerfile.
fn manifest_confinement() -> Confinement {
    let yaml = deploy::render("base").expect("render the base manifests");
    let objects = deploy::parse(&yaml).expect("parse them");
    let dockerfile = deploy::dockerfile().expect("read the Dockerfile");
    deploy::confinement(&objects, &dockerfile).expect("the DaemonSet's security context")
}

fn lab_up() -> Lab {
    testing::require_root();
    testing::lab(
        EndpointMode::PublicPrivate,
        env!("CARGO_BIN_EXE_tracer-lab"),
    )
}

/// A line of /proc/PID/status, e.g. `CapEff`.
fn status_field(pid: u32, field: &str) -> String {
    agent::status_field(pid, field).unwrap_or_else(|error| panic!("{error:#}"))
}

/// Capability names of a hex mask, as `capsh --decode` spells them (`cap_bpf`).
fn decode_capabilities(mask: &str) -> BTreeSet<String> {
    let decoded = command_output(Command::new("capsh").arg(format!("--decode={mask}")))
        .expect("capsh (libcap2-bin, installed by cargo xtask setup)");
    let names = decoded
        .trim()
        .split_once('=')
        .map_or("", |(_, names)| names);
    names
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// tracer programs loaded by `uid` (bpftool reports the loader's uid).
fn tracer_programs_loaded_by(uid: u32) -> usize {
    let listing = command_output(Command::new("bpftool").args(["-j", "prog", "show"]))
        .expect("bpftool prog show");
    let programs: Vec<serde_json::Value> = serde_json::from_str(&listing).expect("bpftool JSON");
    programs
        .iter()
        .filter(|program| {
            program["uid"] == uid
                && program["name"]
                    .as_str()
                    .is_some_and(|name| name.starts_with("tracer_"))
        })
        .count()
}

#[test]
fn the_manifests_capabilities_suffice_for_a_non_root_agent() {
    let confinement = manifest_confinement();
    assert_ne!(confinement.uid, 0, "the DaemonSet runs the agent as root");
    let lab = lab_up();
    let mut agent = LabAgent::start_confined(&lab, &build::tracer_path(), &confinement, Vec::new())
        .expect("start the confined agent");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("the confined agent becomes ready");

    let pid = agent.pid();
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace()
            .all(|uid| uid == confinement.uid.to_string()),
        "the agent runs as uid {}: Uid {uids}",
        confinement.uid
    );
    let granted: BTreeSet<String> = confinement
        .capabilities
        .iter()
        .map(|cap| format!("cap_{}", cap.to_lowercase()))
        .collect();
    assert_eq!(
        decode_capabilities(&status_field(pid, "CapEff")),
        granted,
        "the agent holds exactly the manifest's capabilities"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|line| line.starts_with("Max locked memory") && line.contains(" 65536 ")),
        "the agent runs with a 64 KiB RLIMIT_MEMLOCK, so this kernel charges its maps to the memory cgroup:\n{limits}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    assert!(
        !mounts.lines().any(|line| line.contains(" - bpf ")),
        "the agent must run without a bpffs mount, as the DaemonSet has none"
    );
    let loaded = tracer_programs_loaded_by(confinement.uid);
    assert!(
        loaded >= 2,
        "bpftool shows {loaded} tracer programs loaded by uid {}",
        confinement.uid
    );

    // Plain, DNATed and SNATed traffic: NAT is observed through conntrack (CAP_NET_ADMIN).
    let wanted = [
        Path::PodToPodLocal.as_str(),
        Path::PodToService.as_str(),
        Path::PodToExternal.as_str(),
    ];
    let scenarios = testing::scenarios(EndpointMode::PublicPrivate, &wanted);
    let sent = lab.run_traffic(&scenarios).expect("traffic");
    std::thread::sleep(Duration::from_millis(900));
    let samples = agent.scrape().expect("scrape /metrics");
    for sent in &sent {
        let counted = scrape::sum(
            &samples,
            "tracer_path_bytes_total",
            &[
                ("path", sent.expected_path.as_str()),
                ("nat", sent.expected_nat.as_str()),
                ("direction", "forward"),
            ],
        );
        eprintln!(
            "confined agent: {:<18} nat={:<5} sent {:>7} B, counted {:>7} B",
            sent.expected_path.as_str(),
            sent.expected_nat.as_str(),
            sent.payload_bytes,
            counted
        );
        assert!(
            sent.connected == sent.connections
                && scrape::counts_payload(counted, sent.payload_bytes),
            "{}: {}/{} connections, {counted} B counted for {} B sent\n{}",
            sent.scenario,
            sent.connected,
            sent.connections,
            sent.payload_bytes,
            agent.log_tail()
        );
    }

    let (took, code) = agent.stop().expect("stop");
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert!(took < Duration::from_secs(2), "took {took:?} to exit");
    // The links die with the agent's file descriptors; the programs follow.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while tracer_programs_loaded_by(confinement.uid) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tracer_programs_loaded_by(confinement.uid),
        0,
        "tracer programs loaded by uid {} outlive the agent",
        confinement.uid
    );
    lab.down().expect("lab down");
}

#[test]
fn without_any_one_capability_the_agent_exits_naming_it() {
    let confinement = manifest_confinement();
    let lab = lab_up();
    for cap in &confinement.capabilities {
        let agent = LabAgent::start_confined(
            &lab,
            &build::tracer_path(),
            &confinement.without(cap),
            Vec::new(),
        )
        .expect("start the agent");
        let (code, log) = agent
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|error| panic!("without {cap}: {error:#}"));
        eprintln!(
            "without {cap}: exit {code:?}: {}",
            log.lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(240)
                .collect::<String>()
        );
        assert_eq!(code, Some(1), "without {cap}:\n{log}");
        assert!(
            !log.contains("panicked"),
            "without {cap} the agent panicked:\n{log}"
        );
        let (diagnosis, kernel) = log.split_once("The kernel said").unwrap_or_else(|| {
            panic!("without {cap}, no diagnosis before the kernel's error:\n{log}")
        });
        assert!(
            diagnosis.contains(&format!("missing capabilities: CAP_{cap} (")),
            "without {cap}:\n{log}"
        );
        for other in confinement
            .capabilities
            .iter()
            .filter(|other| *other != cap)
        {
            assert!(
                !diagnosis.contains(&format!("CAP_{other} (")),
                "without {cap}, {other} is named missing too:\n{log}"
            );
        }
        assert!(
            kernel.contains("loading the datapath"),
            "the kernel refused the datapath itself:\n{log}"
        );
    }
    lab.down().expect("lab down");
}

#[test]
fn the_init_container_prepares_the_pin_and_state_directories_for_the_confined_agent() {
    let yaml = deploy::helm_template(&["--set", "pinPath=/sys/fs/bpf/tracer"])
        .expect("render the chart with pinPath");
    let objects = deploy::parse(&yaml).expect("parse it");
    let dockerfile = deploy::dockerfile().expect("read the Dockerfile");
    let prepare = deploy::init_confinement(&objects, &dockerfile).expect("the init container");
    let confinement = deploy::confinement(&objects, &dockerfile).expect("the agent");
    let lab = lab_up();
    let bpffs = Bpffs::mount(&lab).expect("a bpffs for the pins");
    let state = agent::state_file(&lab);
    let state_dir = state
        .parent()
        .expect("the state file's directory")
        .to_owned();
    let pins = bpffs.pin_path();
    // As the kubelet makes a missing DirectoryOrCreate hostPath: root's, 0755.
    for dir in [&pins, &state_dir] {
        std::fs::create_dir_all(dir).expect("make the directory");
    }
    let copies = lab.state_dir().join("prepare");
    let (pins_arg, state_arg) = (pins.display().to_string(), state_dir.display().to_string());
    let owner = format!("--owner={0}:{0}", confinement.uid);
    let args = ["prepare", &owner, &pins_arg, &state_arg];

    let denied = prepare
        .without("CHOWN")
        .run(&build::tracer_path(), &copies, &args)
        .expect("run prepare without CHOWN");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs CAP_CHOWN"), "{stderr}");
    let prepared = prepare
        .run(&build::tracer_path(), &copies, &args)
        .expect("run prepare");
    assert!(
        prepared.status.success(),
        "{}",
        String::from_utf8_lossy(&prepared.stderr)
    );
    for dir in [&pins, &state_dir] {
        let metadata = std::fs::metadata(dir).expect("prepared");
        assert_eq!(
            (metadata.uid(), metadata.mode() & 0o7777),
            (confinement.uid, 0o700),
            "{} after prepare",
            dir.display()
        );
    }

    // The agent, as the DaemonSet runs it, pins and saves there.
    let flags = agent::restart_flags(&lab, &bpffs);
    let mut agent = LabAgent::start_confined(&lab, &build::tracer_path(), &confinement, flags)
        .expect("start the confined agent");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("the confined agent becomes ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let linked = || {
        std::fs::read_dir(&pins).map_or(0, |entries| {
            entries
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("link-"))
                .count()
        })
    };
    while (linked() == 0 || !state.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        linked() > 0 && state.exists(),
        "the confined agent pinned {} links, state saved: {}\n{}",
        linked(),
        state.exists(),
        agent.log_tail()
    );
    let (_, code) = agent.stop().expect("stop");
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    drop(bpffs);
    lab.down().expect("lab down");
}

//! `tracer top`, the real binary in a real terminal (tmux), in the lab's node namespace while
//! the lab's traffic runs: reading the agent, and standalone with the datapath loaded by
//! itself. Keys sort, filter and quit as a person would press them; the screen is read back;
//! and after it exits the terminal must be as it was (normal screen, cursor, cooked mode).
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde_json::Value;
use tracer_common::labels::Path;
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    lab::{self, EndpointMode, Lab, Scenario},
    scrape, testing,
    tmux::{PROMPT, Tmux},
};

pub(crate) const AGENT_URL: &str = "http://127.0.0.1:9477";
/// Short, so that tests see several refreshes within seconds.
const INTERVAL: &str = "500ms";
/// How long a traffic loop may run at most (a round takes a few seconds).
const MAX_ROUNDS: u32 = 20;

fn tracer() -> PathBuf {
    let tracer = build::tracer_path();
    assert!(
        tracer.exists(),
        "{} not built (cargo build -p tracer-agent)",
        tracer.display()
    );
    tracer
}

fn lab_up() -> Lab {
    testing::require_root();
    testing::lab(
        EndpointMode::PublicPrivate,
        env!("CARGO_BIN_EXE_tracer-lab"),
    )
}

fn agent_up(lab: &Lab) -> LabAgent {
    let mut agent = LabAgent::start(lab, &tracer()).expect("agent start");
    agent
        .wait_ready(Duration::from_secs(15))
        .expect("agent ready");
    agent
}

/// The lab's scenarios, and the paths they must show.
fn scenarios() -> (Vec<Scenario>, BTreeSet<&'static str>) {
    let scenarios = lab::scenarios(EndpointMode::PublicPrivate);
    let paths = scenarios.iter().map(|s| s.expected_path.as_str()).collect();
    (scenarios, paths)
}

/// Runs `body` while the lab's scenarios run in a loop on another thread (bounded; stopped as
/// soon as `body` returns or fails).
fn with_traffic<T>(lab: &Lab, body: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let (scenarios, _) = scenarios();
            for _ in 0..MAX_ROUNDS {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Err(error) = lab.run_traffic(&scenarios) {
                    eprintln!("traffic: {error:#}");
                }
            }
        });
        let _stop = StopOnDrop(&stop);
        body()
    })
}

/// The command line that runs `tracer top` in the lab's node namespace, with every flow (the
/// filter works on the flows fetched).
pub(crate) fn top_command(lab: &Lab, args: &[String]) -> String {
    format!(
        "ip netns exec {} {} top --interval {INTERVAL} --limit 1000 {}",
        lab.ns("node"),
        tracer().display(),
        args.join(" ")
    )
}

/// One table as drawn: its header and its rows.
struct DrawnTable {
    header: Vec<char>,
    rows: Vec<Vec<char>>,
}

impl DrawnTable {
    /// The cell of `row` under the column titled `title`: text cells start where their title
    /// starts, numbers end where their title ends (both are aligned like their cells).
    fn cell(&self, row: &[char], title: &str) -> String {
        let header: String = self.header.iter().collect();
        let Some(byte_start) = header.find(title) else {
            panic!("no column {title:?} in {header:?}");
        };
        let start = header[..byte_start].chars().count();
        let end = start + title.chars().count();
        let at = |index: usize| row.get(index).copied().unwrap_or(' ');
        let word = |from: usize, to: usize| {
            row[from.min(row.len())..to.min(row.len())]
                .iter()
                .collect::<String>()
        };
        if at(start) != ' ' && matches!(at(start - 1), ' ' | '│') {
            let to = (start..)
                .find(|&i| at(i) == ' ' || at(i) == '│')
                .unwrap_or(start);
            word(start, to)
        } else {
            let from = (0..end)
                .rev()
                .find(|&i| at(i) == ' ')
                .map_or(end, |i| i + 1);
            word(from, end)
        }
    }

    fn column(&self, title: &str) -> Vec<String> {
        self.rows.iter().map(|row| self.cell(row, title)).collect()
    }
}

/// Finds the table whose header row starts with `first_column`.
fn table(screen: &str, first_column: &str) -> Option<DrawnTable> {
    let lines: Vec<Vec<char>> = screen.lines().map(|line| line.chars().collect()).collect();
    let header_at = lines.iter().position(|line| {
        line.iter()
            .collect::<String>()
            .starts_with(&format!("│{first_column} "))
    })?;
    let rows = lines[header_at + 1..]
        .iter()
        .take_while(|line| line.first() == Some(&'│'))
        .filter(|line| line[1..].iter().any(|c| !matches!(c, ' ' | '│')))
        .cloned()
        .collect();
    Some(DrawnTable {
        header: lines[header_at].clone(),
        rows,
    })
}

fn paths_table(screen: &str) -> DrawnTable {
    table(screen, "path").unwrap_or_else(|| panic!("no paths table on the screen:\n{screen}"))
}

fn flows_table(screen: &str) -> DrawnTable {
    table(screen, "proto")
        .or_else(|| table(screen, "initiator"))
        .unwrap_or_else(|| panic!("no flows table on the screen:\n{screen}"))
}

/// A rate cell that shows traffic: a number above zero.
fn moving(cell: &str) -> bool {
    !matches!(cell, "" | "0" | "–")
}

/// Waits until every one of `paths` has been seen with a non-zero bytes/s (not necessarily on
/// the same screen: the scenarios run one after the other). Returns the screen that showed
/// the most at once.
fn wait_for_rates(tmux: &Tmux, paths: &BTreeSet<&str>, timeout: Duration) -> String {
    let mut seen = BTreeSet::new();
    let mut best = (0, String::new());
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let screen = tmux.screen().expect("capture");
        if let Some(table) = table(&screen, "path") {
            let now: Vec<String> = table
                .rows
                .iter()
                .filter(|row| moving(&table.cell(row, "bytes/s")))
                .map(|row| table.cell(row, "path"))
                .collect();
            if now.len() >= best.0 {
                best = (now.len(), screen.clone());
            }
            seen.extend(now);
        }
        if paths.iter().all(|path| seen.contains(*path)) {
            return best.1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let missing: Vec<&&str> = paths.iter().filter(|p| !seen.contains(**p)).collect();
    panic!(
        "paths never shown with a non-zero bytes/s: {missing:?}\nlast screen:\n{}",
        tmux.screen().unwrap_or_default()
    );
}

/// Sorting: by path name (`<` moves left from bytes/s, one column a press), then reversed
/// (`r`).
fn check_sorting(tmux: &Tmux) {
    let sorted_by_path = |s: &str| s.contains("sort path ▲");
    // Twice around every column at most, whatever a slow redraw makes us overshoot.
    for _ in 0..30 {
        if sorted_by_path(&tmux.screen().expect("capture")) {
            break;
        }
        tmux.press(&["<"]).expect("keys");
        std::thread::sleep(Duration::from_millis(150));
    }
    let screen = tmux
        .wait_for("a sort by path", Duration::from_secs(3), sorted_by_path)
        .expect("sorted by path");
    let names = paths_table(&screen).column("path");
    let mut sorted = names.clone();
    sorted.sort();
    assert!(
        names.len() > 1 && names == sorted,
        "not sorted by path:\n{screen}"
    );
    tmux.press(&["r"]).expect("keys");
    let screen = tmux
        .wait_for("a reversed sort", Duration::from_secs(3), |s| {
            s.contains("sort path ▼")
        })
        .expect("reversed");
    let names = paths_table(&screen).column("path");
    sorted.reverse();
    assert_eq!(names, sorted, "not reversed:\n{screen}");
}

/// Filtering by a path name hides every other path and every other flow; Esc brings them back.
fn check_filter(tmux: &Tmux) {
    tmux.press(&["/"]).expect("keys");
    tmux.type_text("pod_to_pod").expect("text");
    tmux.press(&["Enter"]).expect("keys");
    let screen = tmux
        .wait_for("the filter applied", Duration::from_secs(3), |s| {
            s.contains("filter \"pod_to_pod\"")
        })
        .expect("filter");
    let paths: BTreeSet<String> = paths_table(&screen).column("path").into_iter().collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            Path::PodToPodLocal.as_str().to_owned(),
            Path::PodToPodRemote.as_str().to_owned()
        ]),
        "the filter must leave exactly the pod_to_pod paths:\n{screen}"
    );
    let flows = flows_table(&screen).column("path");
    assert!(
        !flows.is_empty(),
        "no pod_to_pod flow under the filter:\n{screen}"
    );
    assert!(
        flows.iter().all(|path| path.starts_with("pod_to_pod")),
        "a flow of another path is shown under the filter:\n{screen}"
    );
    tmux.press(&["Escape"]).expect("keys");
    let screen = tmux
        .wait_for("the filter cleared", Duration::from_secs(3), |s| {
            !s.contains("filter \"")
        })
        .expect("cleared");
    assert!(
        paths_table(&screen).rows.len() > 2,
        "Esc must bring every path back:\n{screen}"
    );
}

/// After the program exits: the shell's prompt on the normal screen, the cursor visible,
/// the exit status 0 and the terminal in cooked mode with echo (what `stty` says, through a
/// shell that does not touch the modes itself).
fn check_terminal_restored(tmux: &Tmux) {
    tmux.wait_for("the shell prompt back", Duration::from_secs(5), |s| {
        s.lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .is_some_and(|line| line.starts_with(PROMPT.trim_end()))
    })
    .expect("prompt");
    assert!(
        !tmux.alternate_screen().unwrap(),
        "still on the alternate screen"
    );
    assert!(tmux.cursor_visible().unwrap(), "the cursor is still hidden");
    // The answers are printed inside brackets: the typed command line itself cannot match.
    tmux.type_line(
        "echo \"exit=[$?]\" \"modes=[$(stty -a | tr ' ;' '\\n\\n' | grep -x -e -icanon -e icanon -e -echo -e echo | paste -sd' ')]\"",
    )
    .expect("type");
    let answer = |s: &str| {
        s.lines()
            .find(|line| line.starts_with("exit=["))
            .map(str::to_owned)
    };
    let screen = tmux
        .wait_for(
            "the exit status and the modes",
            Duration::from_secs(5),
            |s| answer(s).is_some(),
        )
        .expect("stty");
    assert_eq!(
        answer(&screen).unwrap_or_default().trim(),
        "exit=[0] modes=[icanon echo]",
        "tracer top must exit 0 and leave the terminal in cooked mode with echo:\n{screen}"
    );
}

/// Every line of the tables is whole: each starts and ends with a border.
fn check_not_garbled(screen: &str) {
    let lines: Vec<&str> = screen.lines().collect();
    let first_table = lines
        .iter()
        .position(|line| line.starts_with('┌'))
        .unwrap_or_else(|| panic!("no table:\n{screen}"));
    let status = lines
        .iter()
        .rposition(|line| line.starts_with('└'))
        .unwrap_or_else(|| panic!("no table end:\n{screen}"));
    for line in &lines[first_table..=status] {
        let line = line.trim_end();
        let first = line.chars().next().unwrap_or(' ');
        let last = line.chars().last().unwrap_or(' ');
        assert!(
            "┌│└".contains(first) && "┐│┘".contains(last),
            "broken table line {line:?} in:\n{screen}"
        );
    }
}

/// Where the test writes the screen it captured (docs/top-screen.txt comes from it).
fn keep_screen(name: &str, screen: &str) {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, screen).expect("write the screen");
    eprintln!("screen kept in {}", path.display());
}

#[test]
fn top_reads_the_agent_sorts_filters_and_gives_the_terminal_back() {
    let lab = lab_up();
    let agent = agent_up(&lab);
    let tmux = Tmux::start("top-agent", 110, 48).expect("tmux");
    let (_, paths) = scenarios();
    with_traffic(&lab, || {
        tmux.type_line(&top_command(&lab, &["--agent".into(), AGENT_URL.into()]))
            .expect("type");
        tmux.wait_for("the agent source", Duration::from_secs(5), |s| {
            s.contains(&format!("source: agent at {AGENT_URL}"))
        })
        .expect("tracer top started");
        let screen = wait_for_rates(&tmux, &paths, Duration::from_secs(40));
        keep_screen("top-screen.txt", &screen);
        check_not_garbled(&screen);
        check_sorting(&tmux);
        check_filter(&tmux);
        tmux.press(&["q"]).expect("q");
    });
    check_terminal_restored(&tmux);
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn top_at_80_by_24_elides_columns_survives_resizes_and_sigterm() {
    let lab = lab_up();
    let agent = agent_up(&lab);
    let tmux = Tmux::start("top-small", 80, 24).expect("tmux");
    with_traffic(&lab, || {
        tmux.type_line(&top_command(&lab, &["--agent".into(), AGENT_URL.into()]))
            .expect("type");
        let rates = |s: &str| {
            table(s, "path").is_some_and(|t| {
                let rates = t.column("bytes/s");
                rates.len() >= 3 && rates.iter().all(|rate| moving(rate))
            })
        };
        let screen = tmux
            .wait_for("paths with rates", Duration::from_secs(20), rates)
            .expect("rates at 80×24");
        check_not_garbled(&screen);
        let (_, known) = scenarios();
        for path in paths_table(&screen).column("path") {
            assert!(
                known.contains(path.as_str()),
                "path name cut or unknown: {path:?}\n{screen}"
            );
        }
        assert!(screen.contains("columns hidden"), "{screen}");
        for (width, height) in [(120, 40), (80, 24)] {
            tmux.resize(width, height).expect("resize");
            let screen = tmux
                .wait_for("the resized view", Duration::from_secs(5), |s| {
                    s.lines().filter(|l| l.starts_with('└')).count() == 2
                        && s.lines()
                            .next()
                            .is_some_and(|l| l.starts_with("tracer top"))
                })
                .expect("resize");
            check_not_garbled(&screen);
        }
        let pid = tmux
            .foreground_pid()
            .expect("pid")
            .expect("tracer top is running");
        // SAFETY: signalling the process this test started in the pane.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    });
    check_terminal_restored(&tmux);
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn top_once_json_equals_the_agents_own_api() {
    let lab = lab_up();
    let agent = agent_up(&lab);
    let (scenarios, _) = scenarios();
    lab.run_traffic(&scenarios).expect("traffic");
    // Traffic stopped: a few polls (200 ms) later the counters hold still.
    std::thread::sleep(Duration::from_millis(1_000));
    let output = lab
        .command_in("node", &tracer().to_string_lossy())
        .args([
            "top", "--once", "--json", "--limit", "5", "--agent", AGENT_URL,
        ])
        .output()
        .expect("tracer top --once --json");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let api = |path: &str| -> Value {
        let (status, body) =
            scrape::http_get(&lab.ns("node"), agent::METRICS_ADDR.parse().unwrap(), path)
                .expect("GET");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("the agent's JSON")
    };
    let paths = api("/api/v1/paths");
    assert!(
        paths["paths"]
            .as_array()
            .is_some_and(|rows| rows.len() >= 10),
        "the lab's paths: {paths}"
    );
    assert_eq!(
        printed["paths"]["paths"], paths["paths"],
        "--once --json and /api/v1/paths disagree on the counters"
    );
    let flows = api("/api/v1/flows?limit=5");
    assert_eq!(printed["flows"]["flows"], flows["flows"]);
    drop(agent);
    lab.down().expect("lab down");
}

#[test]
fn without_an_agent_or_privileges_top_says_what_it_needs() {
    testing::require_root();
    // A copy anyone may run, run as nobody with no capabilities, against a port where no agent
    // listens (loopback of the root namespace: refused at once, nothing leaves the host).
    let dir = std::env::temp_dir().join(format!("tracer-top-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("tracer");
    std::fs::copy(tracer(), &copy).expect("copy tracer");
    let output = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&copy)
        .args(["top", "--agent", "http://127.0.0.1:1", "--once", "--json"])
        .output()
        .expect("setpriv (util-linux) runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no agent answers at http://127.0.0.1:1")
            && stderr.contains("needs root or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON")
            && stderr.contains("this process lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
        "{stderr}"
    );
}

/// The eBPF programs process `pid` holds: its program and link file descriptors (tcx links
/// name the program they attach).
fn programs_held(pid: u32) -> BTreeSet<u32> {
    let mut held = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let text = std::fs::read_to_string(entry.expect("fdinfo entry").path()).unwrap_or_default();
        held.extend(
            text.lines()
                .filter_map(|line| line.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    held
}

/// Waits (2 s at most) until none of `programs` is loaded any more: once tracer top exits,
/// only an attachment it left behind (a clsact filter, a pinned link) could keep one.
fn assert_unloaded(programs: &BTreeSet<u32>) {
    assert!(!programs.is_empty(), "tracer top held no eBPF program");
    let loaded = || -> Vec<u32> {
        programs
            .iter()
            .copied()
            .filter(|id| {
                std::process::Command::new("bpftool")
                    .args(["prog", "show", "id", &id.to_string()])
                    .output()
                    .is_ok_and(|output| output.status.success())
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !loaded().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        loaded(),
        Vec::<u32>::new(),
        "programs still loaded after tracer top exited"
    );
}

/// `tracer top` with the flags the lab agent gets, and no agent to answer.
fn standalone_args(lab: &Lab) -> Vec<String> {
    let mut args = agent::context_flags(lab);
    args.extend([
        "--syn-timeout".into(),
        agent::SYN_TIMEOUT.into(),
        "--agent".into(),
        AGENT_URL.into(),
    ]);
    args
}

#[test]
fn top_standalone_runs_the_datapath_itself_and_detaches_on_quit() {
    let lab = lab_up();
    let tmux = Tmux::start("top-standalone", 110, 48).expect("tmux");
    let (_, paths) = scenarios();
    let held = with_traffic(&lab, || {
        tmux.type_line(&top_command(&lab, &standalone_args(&lab)))
            .expect("type");
        tmux.wait_for("the standalone source", Duration::from_secs(15), |s| {
            s.contains("source: standalone datapath")
        })
        .expect("tracer top started standalone");
        let pid = tmux
            .foreground_pid()
            .expect("pid")
            .expect("tracer top runs");
        let held = programs_held(pid);
        wait_for_rates(&tmux, &paths, Duration::from_secs(40));
        check_filter(&tmux);
        tmux.press(&["q"]).expect("q");
        held
    });
    check_terminal_restored(&tmux);
    assert_unloaded(&held);
    lab.down().expect("lab down");
}

#[test]
fn top_standalone_once_json_counts_the_traffic_of_one_interval() {
    let lab = lab_up();
    let (output, held) = with_traffic(&lab, || {
        let child = lab
            .command_in("node", &tracer().to_string_lossy())
            .args(["top", "--once", "--json", "--interval", "2s"])
            .args(standalone_args(&lab))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tracer top --once --json");
        // `ip netns exec` becomes tracer: the child's pid is tracer top's.
        std::thread::sleep(Duration::from_secs(1));
        let held = programs_held(child.id());
        (child.wait_with_output().expect("output"), held)
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let counted: Vec<&str> = printed["paths"]["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter(|row| row["forward_bytes"].as_u64().is_some_and(|bytes| bytes > 0))
        .filter_map(|row| row["path"].as_str())
        .collect();
    assert!(
        counted.len() >= 3,
        "two seconds of the lab's traffic must show on several paths: {counted:?}\n{stderr}"
    );
    assert!(
        printed["flows"]["flows"]
            .as_array()
            .is_some_and(|flows| !flows.is_empty()),
        "{printed}"
    );
    assert_unloaded(&held);
    lab.down().expect("lab down");
}

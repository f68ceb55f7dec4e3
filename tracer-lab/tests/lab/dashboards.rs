//! The Grafana dashboards and the Prometheus alerting rules, proven: the dashboards import as
//! they are, the rules pass `promtool check` and their unit tests, and — with a real Prometheus
//! (Debian's package) scraping the real agent in the lab while traffic runs on every path —
//! every template variable and panel query returns data (those of the ENA allowances, which only
//! an ENA interface has, evaluate without data), every metric name they use is one Prometheus
//! ingested from the agent (the ENA ones must be absent), every rule evaluates cleanly, and each
//! alert is active exactly when the lab calls for it (the public-endpoint alert in `public`
//! mode, not in `private`; agent down once the agent is stopped).
use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use tracer_common::labels::{Endpoint, Path};
use tracer_lab::{
    agent::{self, LabAgent},
    build,
    dashboards::{self, Dashboard, PanelQuery},
    figures,
    lab::{self, EndpointMode, Lab, Scenario},
    prometheus::{Config, Prometheus, Rule, ScrapeTarget, Series},
    testing,
};

/// Names agreed with another branch that this branch's agent does not export yet. Panels and
/// rules using them cannot return data here and are listed as waiting. Once the agent exports
/// one, this test fails until it is removed from the list — then its panels must return data
/// like the others.
const NOT_YET_EXPORTED: [&str; 0] = [];

/// Names the agent exports only for node ENIs driven by `ena` (the VPC's allowances): the
/// lab's node interfaces are veths, so here they must be absent — a series would be the agent
/// reading another driver as ENA. Their panels and rules must still parse and evaluate; the
/// panels answer nothing (their values are checked by the agent's tests on a recorded ENA
/// layout and a real veth's statistics).
const ONLY_ON_ENA: [&str; 2] = [
    "tracer_ena_allowance_exceeded_total",
    "tracer_ena_conntrack_allowance_available",
];

const RULES: &str = "deploy/prometheus/tracer-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/tracer-rules.test.yaml";

/// The scrape job the rules and dashboards expect, and the target labels a real deployment
/// sets by relabeling (docs/dashboards.md).
const JOB: &str = "tracer";
const CLUSTER: &str = "lab";

/// Scrape and rule evaluation interval: short, so that the test sees rates within seconds.
const INTERVAL: Duration = Duration::from_secs(1);
/// What Grafana makes of `$__rate_interval` with a 1 s scrape interval: four scrapes.
const RATE_INTERVAL: &str = "4s";

/// Unanswered SYNs per path that TracerUnansweredSynsRising needs within 10 minutes.
const UNANSWERED_SYN_FLOOR: u32 = 3;

/// Whether each alert must be active (pending or firing) after the lab's traffic, agent up.
fn expected_active(alert: &str, mode: EndpointMode) -> Option<bool> {
    match alert {
        // Node traffic goes out through the NLB in public mode only; pods reach the API server
        // through the EKS-owned ENIs in every mode.
        "TracerApiServerViaPublicEndpoint" => Some(mode == EndpointMode::Public),
        // The lab's security group drops SYNs silently on one path.
        "TracerUnansweredSynsRising" => Some(true),
        // Nothing in the lab hides an interface from the tracer.
        "TracerFlowTableNearlyFull"
        | "TracerAgentDown"
        | "TracerAgentNotReady"
        | "TracerInterfaceBlind" => Some(false),
        // No ENA interface in the lab: the allowance series never exist.
        "TracerEnaLinklocalAllowanceExceeded" | "TracerEnaConntrackAllowanceExceeded" => {
            Some(false)
        }
        _ => None,
    }
}

#[test]
fn dashboards_import_as_they_are() {
    let dashboards = Dashboard::load_all(&dashboards::dir()).expect("loading the dashboards");
    assert!(!dashboards.is_empty(), "no dashboard in dashboards/");
    let problems = dashboards::problems(&dashboards);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(build::workspace_root())
            .output()
            .expect("running promtool (Debian package `prometheus`: run `cargo xtask setup`)");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_panel_and_alert_works_on_a_real_prometheus_scraping_the_lab_in_public_mode() {
    let mut run = Observed::start(EndpointMode::Public);
    let mut failures = Vec::new();
    let dashboards = Dashboard::load_all(&dashboards::dir()).expect("loading the dashboards");
    let queries: Vec<PanelQuery> = dashboards.iter().flat_map(Dashboard::queries).collect();
    let rules = run.prometheus.rules().expect("rules");

    check_metric_names(&run, &queries, &rules, &mut failures);
    check_variables(&run, &dashboards, &mut failures);
    let table = check_panels(&run, &queries, &mut failures);
    check_rules(&rules, EndpointMode::Public, &mut failures);

    // The agent stops answering: TracerAgentDown becomes active on the next evaluations.
    run.agent.take().expect("the agent").stop().expect("stop");
    if let Err(states) =
        run.wait_for_rules(|rule| rule.name != "TracerAgentDown" || rule.is_active())
    {
        failures.push(format!(
            "TracerAgentDown did not become active after the agent stopped: {states}"
        ));
    }
    figures::record("dashboards", &table).expect("record the lab run's values");
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        run.prometheus.log_tail()
    );
}

#[test]
fn the_public_endpoint_alert_stays_quiet_in_private_mode() {
    let run = Observed::start(EndpointMode::Private);
    let mut failures = Vec::new();
    check_rules(
        &run.prometheus.rules().expect("rules"),
        EndpointMode::Private,
        &mut failures,
    );
    // It had its chance: the node did talk to the API server, privately, and so did the pods.
    for path in [Path::NodeToApiserver, Path::PodToApiserver] {
        let private = Endpoint::Private;
        let expr = format!(
            "sum(increase(tracer_path_bytes_total{{path=\"{path}\", endpoint=\"{private}\"}}[5m])) > 0"
        );
        if run.prometheus.query(&expr).expect("query").is_empty() {
            failures.push(format!("no private {path} traffic in private mode: {expr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A lab in one endpoint mode, the agent in its node, and Prometheus next to the agent
/// scraping it and evaluating the rules, after traffic on every path. Fields drop in order:
/// Prometheus, the agent, then the lab.
struct Observed {
    prometheus: Prometheus,
    agent: Option<LabAgent>,
    lab: Lab,
    started: SystemTime,
    node: String,
    mode: EndpointMode,
}

impl Observed {
    fn start(mode: EndpointMode) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the lab tests need root to create network namespaces and load eBPF programs"
        );
        let began = Instant::now();
        let lab = testing::lab(mode, env!("CARGO_BIN_EXE_tracer-lab"));
        let mut agent = LabAgent::start(&lab, &build::tracer_path()).expect("agent start");
        agent
            .wait_ready(Duration::from_secs(15))
            .expect("agent ready");
        // The name EKS gives a node: its private DNS name.
        let node = format!("ip-{}", lab.facts().node_ip).replace('.', "-");
        let rule_files = [build::workspace_root().join(RULES)];
        let mut prometheus = Prometheus::start(
            &lab,
            "node",
            &Config {
                interval: INTERVAL,
                target: ScrapeTarget {
                    secure: None,
                    job: JOB,
                    address: agent::METRICS_ADDR,
                    labels: &[("cluster", CLUSTER), ("node", &node)],
                },
                rule_files: &rule_files,
            },
        )
        .expect("prometheus start");
        prometheus
            .wait_ready(Duration::from_secs(15))
            .expect("prometheus ready");
        let mut run = Self {
            prometheus,
            agent: Some(agent),
            lab,
            started: SystemTime::now(),
            node,
            mode,
        };
        run.wait_for_query(&format!("up{{job=\"{JOB}\"}} == 1"));
        // Prometheus cannot see the growth of a counter that first appears with its final
        // value, so a first round creates every series and the second one makes them grow.
        let traffic: Vec<Scenario> = lab::scenarios(mode)
            .into_iter()
            .map(|scenario| match scenario.name {
                "dropped_syn" => Scenario {
                    connections: UNANSWERED_SYN_FLOOR,
                    ..scenario
                },
                _ => scenario,
            })
            .collect();
        run.started = SystemTime::now();
        for _round in 0..2 {
            run.lab.run_traffic(&traffic).expect("traffic");
            std::thread::sleep(2 * INTERVAL);
        }
        if let Err(states) = run.wait_for_rules(|rule| {
            rule.health == "ok" && expected_active(&rule.name, mode) == Some(rule.is_active())
        }) {
            eprintln!("rules not as expected yet (checked below): {states}");
        }
        // Two more evaluations, so that an alert that should stay inactive had its chance.
        std::thread::sleep(2 * INTERVAL);
        eprintln!(
            "{mode}: lab, agent, Prometheus and traffic in {:.1} s",
            began.elapsed().as_secs_f64()
        );
        run
    }

    /// Waits (at most 10 s) until `expr` returns something.
    fn wait_for_query(&self, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.prometheus.query(expr).expect("query").is_empty() {
            assert!(
                Instant::now() < deadline,
                "{expr} returned nothing for 10 s\n{}",
                self.prometheus.log_tail()
            );
            std::thread::sleep(INTERVAL / 4);
        }
    }

    /// Waits (at most 15 s) until every rule satisfies `condition`; otherwise returns the
    /// rules' last states.
    fn wait_for_rules(&self, condition: impl Fn(&Rule) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rules = self.prometheus.rules().expect("rules");
            if rules.iter().all(&condition) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(rules
                    .iter()
                    .map(|r| format!("{} {} ({})", r.name, r.state, r.health))
                    .collect::<Vec<_>>()
                    .join(", "));
            }
            std::thread::sleep(INTERVAL / 2);
        }
    }

    /// `$cluster`, `$node` and `$__rate_interval` as Grafana substitutes them for a user who
    /// picked the lab's cluster and node.
    fn substitute(&self, expr: &str) -> String {
        dashboards::substitute(
            expr,
            &[
                ("cluster", CLUSTER),
                ("node", &self.node),
                ("__rate_interval", RATE_INTERVAL),
            ],
        )
    }
}

/// Every metric name of every panel and rule is one Prometheus ingested from the agent's
/// endpoint (its own `up` and `scrape_*` series of that target included), or one listed as not
/// exported yet — and those must really be missing.
fn check_metric_names(
    run: &Observed,
    queries: &[PanelQuery],
    rules: &[Rule],
    failures: &mut Vec<String>,
) {
    let exported = run
        .prometheus
        .label_values("__name__", &format!("{{job=\"{JOB}\"}}"))
        .expect("metric names");
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let panels = queries
        .iter()
        .map(|q| (format!("panel {:?}", q.panel), &q.expr));
    let alerts = rules.iter().map(|r| (format!("rule {}", r.name), &r.query));
    for (user, expr) in panels.chain(alerts) {
        for name in dashboards::metric_names(expr) {
            users.entry(name).or_default().push(user.clone());
        }
    }
    for (name, used_by) in &users {
        let is_exported = exported.contains(name);
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            if is_exported {
                failures.push(format!(
                    "{name} is exported now: remove it from NOT_YET_EXPORTED"
                ));
            }
        } else if ONLY_ON_ENA.contains(&name.as_str()) {
            if is_exported {
                failures.push(format!(
                    "{name} is exported in the lab, whose node interfaces are veths: only ENA interfaces have it"
                ));
            }
        } else if !is_exported {
            failures.push(format!(
                "{name} (used by {}) is not a metric of the agent's scrape",
                used_by.join(", ")
            ));
        }
    }
    for name in NOT_YET_EXPORTED.into_iter().chain(ONLY_ON_ENA) {
        if !users.contains_key(name) {
            failures.push(format!(
                "{name} is in NOT_YET_EXPORTED or ONLY_ON_ENA but nothing uses it"
            ));
        }
    }
}

/// Every `label_values` template variable offers the lab's cluster and node.
fn check_variables(run: &Observed, dashboards: &[Dashboard], failures: &mut Vec<String>) {
    for dashboard in dashboards {
        for variable in dashboard.label_values() {
            let selector = run.substitute(&variable.selector);
            let values = run
                .prometheus
                .label_values(&variable.label, &selector)
                .expect("label values");
            let wanted = match variable.label.as_str() {
                "cluster" => CLUSTER,
                "node" => &run.node,
                other => panic!("{}: a variable of label {other}", dashboard.title()),
            };
            if !values.iter().any(|v| v == wanted) {
                failures.push(format!(
                    "{}: variable {} = label_values({selector}, {}) gave {values:?}, not {wanted}",
                    dashboard.title(),
                    variable.variable,
                    variable.label
                ));
            }
        }
    }
}

/// Runs every panel query over the run as Grafana would (a range query, one step per scrape)
/// and requires a finite value in its answer; returns the table of what each one showed.
fn check_panels(run: &Observed, queries: &[PanelQuery], failures: &mut Vec<String>) -> String {
    let mut table = format!(
        "Dashboard panels in the lab ({} mode, cluster={CLUSTER}, node={}, $__rate_interval={RATE_INTERVAL}): peak of each series over the run\n\n\
         | dashboard | panel | PromQL | peak values |\n| --- | --- | --- | --- |\n",
        run.mode, run.node
    );
    for query in queries {
        let expr = run.substitute(&query.expr);
        if expr.contains('$') {
            failures.push(format!(
                "panel {:?}: unknown variable in {expr}",
                query.panel
            ));
            continue;
        }
        let waiting: Vec<&str> = NOT_YET_EXPORTED
            .into_iter()
            .filter(|name| dashboards::metric_names(&expr).contains(*name))
            .collect();
        let answer = match run.prometheus.query_range(&expr, run.started, INTERVAL) {
            Ok(answer) => answer,
            Err(error) => {
                failures.push(format!("panel {:?}: {error:#}", query.panel));
                continue;
            }
        };
        let shown = peaks(&answer, &query.legend, &query.unit);
        let needs_ena = ONLY_ON_ENA
            .into_iter()
            .any(|name| dashboards::metric_names(&expr).contains(name));
        let values = if !waiting.is_empty() {
            format!(
                "waiting for {} (not exported on this branch)",
                waiting.join(", ")
            )
        } else if needs_ena {
            if !shown.is_empty() {
                failures.push(format!(
                    "panel {:?} shows ENA allowances in a lab without ENA: {}",
                    query.panel,
                    shown.join(", ")
                ));
            }
            "evaluates; no data without an ENA interface (none in the lab)".to_owned()
        } else if shown.is_empty() {
            failures.push(format!("panel {:?} returned no data: {expr}", query.panel));
            "**no data**".to_owned()
        } else {
            shown.join("<br>")
        };
        table += &format!(
            "| {} | {} | `{}` | {values} |\n",
            query.dashboard,
            query.panel,
            query.expr.replace('|', "\\|")
        );
    }
    table
}

/// "legend: peak" for each series with a finite value.
fn peaks(answer: &[Series], legend: &str, unit: &str) -> Vec<String> {
    answer
        .iter()
        .filter_map(|series| {
            let peak = series
                .values
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .reduce(f64::max)?;
            Some(format!(
                "{}: {}",
                fill_legend(legend, series),
                human(peak, unit)
            ))
        })
        .collect()
}

/// The legend as Grafana shows it: `{{label}}` replaced by the series' value, or by nothing
/// when the series lacks the label.
fn fill_legend(legend: &str, series: &Series) -> String {
    let mut filled = String::new();
    let mut rest = legend;
    while let Some((before, after)) = rest.split_once("{{") {
        filled += before;
        let (label, after) = after.split_once("}}").unwrap_or((after, ""));
        filled += series.labels.get(label.trim()).map_or("", String::as_str);
        rest = after;
    }
    filled += rest;
    filled.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A value in the panel's unit, as a reader of the docs wants it.
fn human(value: f64, unit: &str) -> String {
    let scaled = |suffix: &str| {
        let (value, prefix) = match value.abs() {
            v if v >= 1e9 => (value / 1e9, "G"),
            v if v >= 1e6 => (value / 1e6, "M"),
            v if v >= 1e3 => (value / 1e3, "k"),
            _ => (value, ""),
        };
        let number = format!("{value:.3}");
        let number = number.trim_end_matches('0').trim_end_matches('.');
        format!("{number} {prefix}{suffix}").trim_end().to_owned()
    };
    match unit {
        "Bps" => scaled("B/s"),
        "bytes" => scaled("B"),
        "pps" => scaled("packets/s"),
        "cps" => scaled("/s"),
        "percentunit" => format!("{:.1} %", value * 100.0),
        "s" if value.abs() < 1e-3 => format!("{:.1} µs", value * 1e6),
        "s" if value.abs() < 1.0 => format!("{:.2} ms", value * 1e3),
        "s" => format!("{value:.2} s"),
        _ => scaled(""),
    }
}

/// Every rule evaluated cleanly, and each alert's state is what the lab calls for.
fn check_rules(rules: &[Rule], mode: EndpointMode, failures: &mut Vec<String>) {
    if rules.is_empty() {
        failures.push(format!("Prometheus loaded no rule from {RULES}"));
    }
    for rule in rules {
        if rule.health != "ok" {
            failures.push(format!(
                "rule {}: health {} {}",
                rule.name, rule.health, rule.last_error
            ));
        }
        match expected_active(&rule.name, mode) {
            None => failures.push(format!(
                "alert {}: no expectation in this test: add it to expected_active",
                rule.name
            )),
            Some(active) if active != rule.is_active() => failures.push(format!(
                "alert {} is {} in {mode} mode, expected {}: {}",
                rule.name,
                rule.state,
                if active {
                    "pending or firing"
                } else {
                    "inactive"
                },
                rule.query
            )),
            Some(_) => eprintln!("{mode}: alert {} {}", rule.name, rule.state),
        }
    }
}

//! What a scrape of `/metrics` costs as the series grow: `cargo bench -p tracer-agent --bench
//! scrape [-- --check] [--json PATH]` (or `cargo xtask bench scrape`). No privileges needed.
//!
//! For 1k, 10k and 100k series of the capped family `tracer_workload_bytes_total` (the cap
//! raised to fit), next to a snapshot with every path of the taxonomy, it measures:
//! - the heap the series hold, per series: a counting global allocator, read before and after
//!   filling the family, in the same run;
//! - the time to render the whole exposition: the median of `ROUNDS` renders, and the same
//!   snapshot rendered without the workload series (the baseline), so the difference is what
//!   the series cost;
//! - the transient buffer a render allocates, per series;
//! - for comparison, the render time and heap per series of the same workload series held and
//!   rendered by the maintained crates: `prometheus` (text format 0.0.4) and
//!   `prometheus-client` (OpenMetrics text only). They are not goals: they say why the
//!   agent's renderer is its own (docs/design.md, "One pipeline, one snapshot per poll").
//!
//! Goals (issue 4): ≤ 10 ms at 10k series, ≤ 50 ms at 100k, ≤ 300 B of heap per series.
//! `--check` makes a missed goal an error (exit status 1); `--json PATH` writes the results.
mod report;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::bail;
use serde::Serialize;
use tracer_agent::{
    aggregate::workload::WorkloadSeries,
    classify::Path,
    pipeline::snapshot::{LATENCY_BUCKETS, Snapshot},
    serve::api::{AttachedInterfaces, FlowTableStats, Histogram, PathRow, PathsResponse},
    serve::export::Metrics,
};

/// Counts the bytes the program holds on the heap, and the most it held.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only counters move.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn grew(bytes: usize) {
    let held = HELD.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(held, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Renders per measurement (odd, so the median is one of them).
const ROUNDS: usize = 21;

/// A size, and the goals at that size.
struct Case {
    series: usize,
    goal_ms: Option<f64>,
}

const CASES: [Case; 3] = [
    Case {
        series: 1_000,
        goal_ms: None,
    },
    Case {
        series: 10_000,
        goal_ms: Some(10.0),
    },
    Case {
        series: 100_000,
        goal_ms: Some(50.0),
    },
];
const GOAL_HEAP_BYTES_PER_SERIES: f64 = 300.0;

#[derive(Serialize)]
struct Row {
    workload_series: usize,
    /// Every sample line of the exposition, the taxonomy's families included.
    exposition_series: usize,
    exposition_bytes: usize,
    render_ms: f64,
    baseline_render_ms: f64,
    goal_ms: Option<f64>,
    heap_bytes_per_series: f64,
    render_buffer_bytes_per_series: f64,
    goal_heap_bytes_per_series: f64,
    pass: bool,
    /// The same workload series with the `prometheus` crate.
    prometheus_crate: Comparison,
    /// The same workload series with the `prometheus-client` crate.
    prometheus_client: Comparison,
}

/// What a maintained crate costs for the same workload series.
#[derive(Serialize)]
struct Comparison {
    render_ms: f64,
    heap_bytes_per_series: f64,
}

#[derive(Serialize)]
struct Report {
    rounds: usize,
    results: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let options = report::options("scrape")?;
    eprintln!("scrape benchmark: render medians of {ROUNDS}, heap by a counting allocator");
    let snapshot = every_path();
    let mut results = Vec::new();
    for case in &CASES {
        results.push(measure(case, &snapshot, &options)?);
    }
    print_table(&results);
    let missed = results.iter().filter(|row| !row.pass).count();
    let report = Report {
        rounds: ROUNDS,
        results,
    };
    report::finish(&options, &report, missed)
}

fn measure(case: &Case, snapshot: &Snapshot, options: &report::Options) -> anyhow::Result<Row> {
    let baseline = Metrics::new(case.series);
    let baseline_render_ms = median_render_ms(&baseline, snapshot)?;

    let before = HELD.load(Ordering::Relaxed);
    let metrics = Metrics::new(case.series);
    let family = metrics.workload_bytes();
    for index in 0..case.series {
        family.add(&workload(index), 1_500 * index as u64);
    }
    let held = HELD.load(Ordering::Relaxed) - before;
    // The cap holds: the family is full, and one more series is refused and counted.
    family.add(&workload(case.series), 1);
    if family.len() != case.series || family.refused() != 1 {
        bail!(
            "{} series: the family holds {} and refused {} (expected {} and 1)",
            case.series,
            family.len(),
            family.refused(),
            case.series
        );
    }

    let render_ms = median_render_ms(&metrics, snapshot)?;
    let at_rest = HELD.load(Ordering::Relaxed);
    PEAK.store(at_rest, Ordering::Relaxed);
    let text = metrics.render(snapshot);
    let buffer = PEAK.load(Ordering::Relaxed) - at_rest;
    let exposition_series = text.lines().filter(|line| !line.starts_with('#')).count();

    let heap_bytes_per_series = held as f64 / case.series as f64;
    let pass = heap_bytes_per_series <= options.goal(GOAL_HEAP_BYTES_PER_SERIES)
        && case
            .goal_ms
            .is_none_or(|goal| render_ms <= options.goal(goal));
    Ok(Row {
        workload_series: case.series,
        exposition_series,
        exposition_bytes: text.len(),
        render_ms,
        baseline_render_ms,
        goal_ms: case.goal_ms,
        heap_bytes_per_series,
        render_buffer_bytes_per_series: buffer as f64 / case.series as f64,
        goal_heap_bytes_per_series: GOAL_HEAP_BYTES_PER_SERIES,
        pass,
        prometheus_crate: with_prometheus_crate(case.series)?,
        prometheus_client: with_prometheus_client(case.series)?,
    })
}

/// The workload series in a `prometheus` crate registry, rendered in the text format 0.0.4.
fn with_prometheus_crate(series: usize) -> anyhow::Result<Comparison> {
    let before = HELD.load(Ordering::Relaxed);
    let registry = prometheus::Registry::new();
    let family = prometheus::IntCounterVec::new(
        prometheus::Opts::new("tracer_workload_bytes_total", "Bytes per workload."),
        &["namespace", "workload", "path"],
    )?;
    registry.register(Box::new(family.clone()))?;
    for index in 0..series {
        let series = workload(index);
        family
            .with_label_values(&[&series.namespace, &series.workload, series.path.as_str()])
            .inc_by(1_500 * index as u64);
    }
    let held = HELD.load(Ordering::Relaxed) - before;
    let encoder = prometheus::TextEncoder::new();
    let render_ms = median_ms(|| {
        let mut text = String::new();
        encoder.encode_utf8(&registry.gather(), &mut text)?;
        Ok(text)
    })?;
    Ok(Comparison {
        render_ms,
        heap_bytes_per_series: held as f64 / series as f64,
    })
}

/// The workload series in a `prometheus-client` registry, rendered as OpenMetrics text.
fn with_prometheus_client(series: usize) -> anyhow::Result<Comparison> {
    use prometheus_client::metrics::{counter::Counter, family::Family};
    type Labels = [(&'static str, String); 3];
    let before = HELD.load(Ordering::Relaxed);
    let mut registry = prometheus_client::registry::Registry::default();
    let family = Family::<Labels, Counter>::default();
    registry.register(
        "tracer_workload_bytes",
        "Bytes per workload.",
        family.clone(),
    );
    for index in 0..series {
        let series = workload(index);
        let labels = [
            ("namespace", series.namespace),
            ("workload", series.workload),
            ("path", series.path.as_str().to_owned()),
        ];
        family.get_or_create(&labels).inc_by(1_500 * index as u64);
    }
    let held = HELD.load(Ordering::Relaxed) - before;
    let render_ms = median_ms(|| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    })?;
    Ok(Comparison {
        render_ms,
        heap_bytes_per_series: held as f64 / series as f64,
    })
}

/// A workload of a realistic name: 50 namespaces, one workload per series, every path.
fn workload(index: usize) -> WorkloadSeries {
    const PATHS: [Path; 5] = [
        Path::PodToPodLocal,
        Path::PodToPodRemote,
        Path::PodToService,
        Path::PodToExternal,
        Path::PodToDns,
    ];
    WorkloadSeries {
        namespace: format!("team-{:02}-prod", index % 50),
        workload: format!("checkout-service-{index:06}"),
        path: PATHS[index % PATHS.len()],
    }
}

fn median_render_ms(metrics: &Metrics, snapshot: &Snapshot) -> anyhow::Result<f64> {
    median_ms(|| Ok(metrics.render(black_box(snapshot))))
}

/// The median time of `ROUNDS` renders (after one to warm up), in milliseconds.
fn median_ms<T>(mut render: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    black_box(render()?);
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        black_box(render()?);
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples[ROUNDS / 2].as_secs_f64() * 1e3)
}

/// A snapshot with a row for every path of the taxonomy (both endpoints on the API server
/// paths, every NAT where the lab sees one), handshakes in every bucket: the bounded families
/// at their fullest.
fn every_path() -> Snapshot {
    let rows = [
        ("controlplane_to_kubelet", None, "none"),
        ("external_to_node", None, "none"),
        ("external_to_pod", None, "dnat"),
        ("node_to_apiserver", Some("private"), "none"),
        ("node_to_apiserver", Some("public"), "none"),
        ("node_to_external", None, "none"),
        ("node_to_imds", None, "none"),
        ("node_to_node", None, "none"),
        ("pod_to_apiserver", Some("private"), "dnat"),
        ("pod_to_apiserver", Some("public"), "snat"),
        ("pod_to_dns", None, "dnat"),
        ("pod_to_external", None, "snat"),
        ("pod_to_imds", None, "snat"),
        ("pod_to_pod_local", None, "none"),
        ("pod_to_pod_remote", None, "none"),
        ("pod_to_service", None, "dnat"),
        ("unknown", None, "none"),
    ];
    let handshakes = Histogram {
        count: 1_000,
        sum_seconds: 1.25,
        buckets: LATENCY_BUCKETS
            .iter()
            .enumerate()
            .map(|(index, bound)| (*bound, 50 * index as u64))
            .collect(),
    };
    let paths = rows
        .iter()
        .map(|(path, endpoint, nat)| PathRow {
            path: (*path).to_owned(),
            endpoint: endpoint.map(str::to_owned),
            nat: (*nat).to_owned(),
            zone: None,
            forward_packets: 123_456,
            forward_bytes: 98_765_432,
            reply_packets: 120_000,
            reply_bytes: 87_654_321,
            flows: 1_000,
            active_flows: 10,
            unanswered_syns: 3,
            resets: 2,
            handshakes: handshakes.clone(),
        })
        .collect();
    Snapshot {
        paths: PathsResponse {
            attached_interfaces: AttachedInterfaces { pod: 30, node: 3 },
            flow_table: FlowTableStats {
                entries: 5_000,
                capacity: 65_536,
                evictions: 0,
            },
            paths,
            ..PathsResponse::default()
        },
        ..Snapshot::default()
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>8} {:>8} {:>9}  {:>9} {:>9} {:>6}  {:>9} {:>9} {:>5}  result",
        "workload",
        "series",
        "bytes",
        "render ms",
        "baseline",
        "goal",
        "heap B/s",
        "buffer B/s",
        "goal"
    );
    for row in rows {
        println!(
            "{:>8} {:>8} {:>9}  {:>9.2} {:>9.2} {:>6}  {:>9.0} {:>9.0} {:>5.0}  {}",
            row.workload_series,
            row.exposition_series,
            row.exposition_bytes,
            row.render_ms,
            row.baseline_render_ms,
            row.goal_ms
                .map_or("-".to_owned(), |goal| format!("{goal:.0}")),
            row.heap_bytes_per_series,
            row.render_buffer_bytes_per_series,
            row.goal_heap_bytes_per_series,
            if row.pass { "pass" } else { "FAIL" }
        );
    }
    println!(
        "(render: median of {ROUNDS}; baseline = the same snapshot without workload series; \
         heap B/s = bytes the series hold, per series; buffer B/s = transient bytes of one render)"
    );
    println!("\nthe same workload series with the maintained crates (for comparison, not goals):");
    println!(
        "{:>8}  {:>14} {:>14}  {:>16} {:>16}",
        "workload", "prometheus ms", "heap B/s", "prom-client ms", "heap B/s"
    );
    for row in rows {
        println!(
            "{:>8}  {:>14.2} {:>14.0}  {:>16.2} {:>16.0}",
            row.workload_series,
            row.prometheus_crate.render_ms,
            row.prometheus_crate.heap_bytes_per_series,
            row.prometheus_client.render_ms,
            row.prometheus_client.heap_bytes_per_series,
        );
    }
}

//! The columns of both tables, defined once: title, width, how narrow terminals drop them,
//! what a cell shows and how the column sorts.
use std::cmp::Ordering;

use super::{
    app::{FlowView, PathView},
    rates::Quantile,
};

/// What a column sorts by: numbers (unknown lowest) or text.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum SortKey {
    Number(Option<f64>),
    Text(String),
}

impl Eq for SortKey {}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Self::Number(a), Self::Number(b)) => match (a, b) {
                (Some(a), Some(b)) => a.total_cmp(b),
                (a, b) => a.is_some().cmp(&b.is_some()),
            },
            (Self::Text(a), Self::Text(b)) => a.cmp(b),
            (Self::Number(_), Self::Text(_)) => Ordering::Less,
            (Self::Text(_), Self::Number(_)) => Ordering::Greater,
        }
    }
}

pub(super) struct Column<R> {
    pub title: &'static str,
    pub width: u16,
    /// Lower stays longer: a narrow terminal drops the highest first.
    pub priority: u8,
    /// Numbers are right-aligned and sort largest first.
    pub numeric: bool,
    pub text: fn(&R) -> String,
    /// None: the column does not sort (the sparkline).
    pub sort: Option<fn(&R) -> SortKey>,
}

/// Width of the bytes/s sparkline, in samples (one per refresh).
pub(super) const TREND_WIDTH: u16 = 10;

pub(super) const PATH_COLUMNS: &[Column<PathView>] = &[
    Column {
        title: "path",
        width: 23,
        priority: 0,
        numeric: false,
        text: |view| view.row.path.clone(),
        sort: Some(|view| SortKey::Text(view.row.path.clone())),
    },
    Column {
        title: "endpt",
        width: 7,
        priority: 3,
        numeric: false,
        text: |view| view.row.endpoint.clone().unwrap_or_default(),
        sort: Some(|view| SortKey::Text(view.row.endpoint.clone().unwrap_or_default())),
    },
    Column {
        title: "nat",
        width: 4,
        priority: 4,
        numeric: false,
        text: |view| view.row.nat.clone(),
        sort: Some(|view| SortKey::Text(view.row.nat.clone())),
    },
    Column {
        title: "zone",
        width: 5,
        priority: 9,
        numeric: false,
        text: |view| zone(&view.row.zone),
        sort: Some(|view| SortKey::Text(zone(&view.row.zone))),
    },
    Column {
        title: "pkts/s",
        width: 7,
        priority: 2,
        numeric: true,
        text: |view| rate(view.rates.map(|r| r.packets)),
        sort: Some(|view| SortKey::Number(view.rates.map(|r| r.packets))),
    },
    Column {
        title: "bytes/s",
        width: 7,
        priority: 1,
        numeric: true,
        text: |view| rate(view.rates.map(|r| r.bytes)),
        sort: Some(|view| SortKey::Number(view.rates.map(|r| r.bytes))),
    },
    Column {
        title: "active",
        width: 6,
        priority: 5,
        numeric: true,
        text: |view| si(view.row.active_flows as f64),
        sort: Some(|view| SortKey::Number(Some(view.row.active_flows as f64))),
    },
    Column {
        title: "new/s",
        width: 6,
        priority: 10,
        numeric: true,
        text: |view| rate(view.rates.map(|r| r.new_flows)),
        sort: Some(|view| SortKey::Number(view.rates.map(|r| r.new_flows))),
    },
    Column {
        title: "hs p50",
        width: 7,
        priority: 11,
        numeric: true,
        text: |view| quantile(view.rates.and_then(|r| r.handshake_p50)),
        sort: Some(|view| {
            SortKey::Number(
                view.rates
                    .and_then(|r| r.handshake_p50)
                    .map(Quantile::seconds),
            )
        }),
    },
    Column {
        title: "hs p99",
        width: 7,
        priority: 8,
        numeric: true,
        text: |view| quantile(view.rates.and_then(|r| r.handshake_p99)),
        sort: Some(|view| {
            SortKey::Number(
                view.rates
                    .and_then(|r| r.handshake_p99)
                    .map(Quantile::seconds),
            )
        }),
    },
    Column {
        title: "unans/s",
        width: 7,
        priority: 6,
        numeric: true,
        text: |view| rate(view.rates.map(|r| r.unanswered_syns)),
        sort: Some(|view| SortKey::Number(view.rates.map(|r| r.unanswered_syns))),
    },
    Column {
        title: "rst/s",
        width: 5,
        priority: 7,
        numeric: true,
        text: |view| rate(view.rates.map(|r| r.resets)),
        sort: Some(|view| SortKey::Number(view.rates.map(|r| r.resets))),
    },
    Column {
        title: "trend",
        width: TREND_WIDTH,
        priority: 12,
        numeric: false,
        text: |view| sparkline(&view.history),
        sort: None,
    },
];

pub(super) const FLOW_COLUMNS: &[Column<FlowView>] = &[
    Column {
        title: "proto",
        width: 5,
        priority: 4,
        numeric: false,
        text: |view| view.row.proto.clone(),
        sort: Some(|view| SortKey::Text(view.row.proto.clone())),
    },
    Column {
        title: "initiator",
        width: 21,
        priority: 0,
        numeric: false,
        text: |view| view.row.initiator.clone(),
        sort: Some(|view| SortKey::Text(view.row.initiator.clone())),
    },
    Column {
        title: "→ responder",
        width: 21,
        priority: 1,
        numeric: false,
        text: |view| view.row.responder.clone(),
        sort: Some(|view| SortKey::Text(view.row.responder.clone())),
    },
    Column {
        title: "path",
        width: 23,
        priority: 2,
        numeric: false,
        text: |view| view.row.path.clone(),
        sort: Some(|view| SortKey::Text(view.row.path.clone())),
    },
    Column {
        title: "bytes/s",
        width: 7,
        priority: 3,
        numeric: true,
        text: |view| rate(view.bytes_per_second),
        sort: Some(|view| SortKey::Number(view.bytes_per_second)),
    },
    Column {
        title: "bytes",
        width: 7,
        priority: 5,
        numeric: true,
        text: |view| si(view.bytes() as f64),
        sort: Some(|view| SortKey::Number(Some(view.bytes() as f64))),
    },
    Column {
        title: "hs",
        width: 6,
        priority: 6,
        numeric: true,
        text: |view| seconds(view.row.handshake_seconds),
        sort: Some(|view| SortKey::Number(view.row.handshake_seconds)),
    },
    Column {
        title: "state",
        width: 11,
        priority: 8,
        numeric: false,
        text: |view| view.row.tcp_state.clone().unwrap_or_default(),
        sort: Some(|view| SortKey::Text(view.row.tcp_state.clone().unwrap_or_default())),
    },
    Column {
        title: "nat",
        width: 4,
        priority: 7,
        numeric: false,
        text: |view| view.row.nat.clone(),
        sort: Some(|view| SortKey::Text(view.row.nat.clone())),
    },
    Column {
        title: "pods",
        width: 40,
        priority: 9,
        numeric: false,
        text: FlowView::pods,
        sort: Some(|view| SortKey::Text(view.pods())),
    },
];

/// The columns that fit in `width` cells (one cell between columns), most important first
/// kept, returned in display order.
pub(super) fn fit<R>(columns: &[Column<R>], width: u16) -> Vec<usize> {
    let mut by_priority: Vec<usize> = (0..columns.len()).collect();
    by_priority.sort_by_key(|&index| columns[index].priority);
    let mut used = 0u16;
    let mut kept: Vec<usize> = Vec::new();
    for index in by_priority {
        let needed = columns[index].width + u16::from(!kept.is_empty());
        if used + needed <= width {
            used += needed;
            kept.push(index);
        }
    }
    kept.sort_unstable();
    kept
}

/// `text` cut to `width` characters, the last one an ellipsis when something was cut.
pub(super) fn elide(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    if width > 0 {
        cut.push('…');
    }
    cut
}

/// 1234 → "1.2k": three significant digits at most, SI prefixes.
pub(super) fn si(value: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    if value < 10.0 && value.fract() != 0.0 {
        return format!("{value:.1}");
    }
    let mut scaled = value;
    for prefix in ["", "k", "M", "G", "T"] {
        if scaled < 999.5 {
            return if scaled < 99.95 && !prefix.is_empty() {
                format!("{scaled:.1}{prefix}")
            } else {
                format!("{scaled:.0}{prefix}")
            };
        }
        scaled /= 1000.0;
    }
    format!("{scaled:.0}P")
}

/// `same_zone` / `cross_zone` as "same" / "cross"; empty when unknown.
fn zone(label: &Option<String>) -> String {
    label
        .as_deref()
        .map_or("", |zone| zone.trim_end_matches("_zone"))
        .to_owned()
}

/// A rate, or a dash before two snapshots have been seen.
fn rate(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), si)
}

/// 0.000123 → "123µs", 0.0042 → "4.2ms", 1.5 → "1.50s"; a dash when unknown.
pub(super) fn seconds(value: Option<f64>) -> String {
    let Some(value) = value else {
        return "–".to_owned();
    };
    if value < 0.0001 {
        format!("{:.1}µs", value * 1e6)
    } else if value < 0.001 {
        format!("{:.0}µs", value * 1e6)
    } else if value < 0.01 {
        format!("{:.1}ms", value * 1e3)
    } else if value < 1.0 {
        format!("{:.0}ms", value * 1e3)
    } else {
        format!("{value:.2}s")
    }
}

/// "<100µs" (all in the first bucket), ">13.11s" (past the last), else the estimate.
fn quantile(value: Option<Quantile>) -> String {
    match value {
        None => "–".to_owned(),
        Some(Quantile::Below(bound)) => format!("<{}", seconds(Some(bound))),
        Some(Quantile::Within(estimate)) => seconds(Some(estimate)),
        Some(Quantile::Above(bound)) => format!(">{}", seconds(Some(bound))),
    }
}

/// The last values as block characters, scaled to the largest of them.
pub(super) fn sparkline(values: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let highest = values.iter().copied().fold(0.0, f64::max);
    values
        .iter()
        .map(|&value| {
            if highest <= 0.0 || value <= 0.0 {
                ' '
            } else {
                let level = (value / highest * (BARS.len() - 1) as f64).round() as usize;
                BARS[level.min(BARS.len() - 1)]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_top() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(0.5), "0.5");
        assert_eq!(si(3.0), "3");
        assert_eq!(si(42.0), "42");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1_234.0), "1.2k");
        assert_eq!(si(123_456.0), "123k");
        assert_eq!(si(99_990.0), "100k");
        assert_eq!(si(5_600_000.0), "5.6M");
        assert_eq!(seconds(Some(0.000_123)), "123µs");
        assert_eq!(seconds(Some(0.000_012_5)), "12.5µs");
        assert_eq!(seconds(Some(0.004_2)), "4.2ms");
        assert_eq!(seconds(Some(0.25)), "250ms");
        assert_eq!(seconds(Some(1.5)), "1.50s");
        assert_eq!(seconds(None), "–");
    }

    #[test]
    fn every_cell_fits_its_column() {
        for value in [0.0, 0.05, 9.99, 999.4, 999.6, 99_999.0, 1e15] {
            assert!(si(value).chars().count() <= 5, "{}", si(value));
        }
        for value in [0.0, 0.000_099_9, 0.000_999_9, 0.009_99, 0.999, 59.99] {
            assert!(seconds(Some(value)).chars().count() <= 6, "{value}");
        }
        assert_eq!(quantile(Some(Quantile::Below(0.0001))), "<100µs");
        assert_eq!(quantile(Some(Quantile::Above(13.1072))), ">13.11s");
        assert_eq!(quantile(Some(Quantile::Within(0.0042))), "4.2ms");
    }

    #[test]
    fn elide_marks_what_was_cut() {
        assert_eq!(elide("pod_to_pod_local", 20), "pod_to_pod_local");
        assert_eq!(elide("[fd00::1234:5678]:44321", 10), "[fd00::12…");
        assert_eq!(elide("abc", 0), "");
    }

    #[test]
    fn sparkline_scales_to_the_largest_value() {
        assert_eq!(sparkline(&[0.0, 50.0, 100.0]), " ▅█");
        assert_eq!(sparkline(&[0.0, 0.0]), "  ");
    }

    #[test]
    fn narrow_terminals_drop_the_least_important_columns() {
        let every = fit(PATH_COLUMNS, u16::MAX);
        assert_eq!(every.len(), PATH_COLUMNS.len());
        // An 80-column terminal leaves 78 inside the borders.
        let narrow = fit(PATH_COLUMNS, 78);
        let titles: Vec<&str> = narrow.iter().map(|&i| PATH_COLUMNS[i].title).collect();
        assert_eq!(
            titles,
            [
                "path", "endpt", "nat", "pkts/s", "bytes/s", "active", "unans/s", "rst/s"
            ]
        );
        let used: u16 = narrow.iter().map(|&i| PATH_COLUMNS[i].width + 1).sum();
        assert!(used - 1 <= 78);
        let flows: Vec<&str> = fit(FLOW_COLUMNS, 78)
            .iter()
            .map(|&i| FLOW_COLUMNS[i].title)
            .collect();
        assert_eq!(flows, ["initiator", "→ responder", "path", "bytes/s"]);
    }

    #[test]
    fn unknown_numbers_sort_lowest() {
        let mut keys = vec![
            SortKey::Number(Some(2.0)),
            SortKey::Number(None),
            SortKey::Number(Some(-1.0)),
        ];
        keys.sort();
        assert_eq!(
            keys,
            [
                SortKey::Number(None),
                SortKey::Number(Some(-1.0)),
                SortKey::Number(Some(2.0))
            ]
        );
    }
}

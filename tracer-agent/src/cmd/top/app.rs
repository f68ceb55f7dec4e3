//! What `tracer top` shows and how keys change it: pure state, no terminal. Readings come in
//! (`apply`), actions come in (`act`), rows go out (`visible_paths`, `visible_flows`).
use std::collections::HashMap;

use super::{
    Reading,
    columns::{Column, FLOW_COLUMNS, PATH_COLUMNS, TREND_WIDTH},
    rates::{PathRates, growth},
};
use crate::serve::api::{FlowRow, PathRow};

/// A path row with its rates over the last refresh interval and its recent bytes/s.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct PathView {
    pub row: PathRow,
    /// None until two readings have been seen.
    pub rates: Option<PathRates>,
    /// Bytes/s of the last refreshes, oldest first.
    pub history: Vec<f64>,
}

impl PathView {
    fn key(row: &PathRow) -> (String, Option<String>, String, Option<String>) {
        (
            row.path.clone(),
            row.endpoint.clone(),
            row.nat.clone(),
            row.zone.clone(),
        )
    }

    /// What the filter looks in: the path and its labels.
    fn haystack(&self) -> String {
        let row = &self.row;
        format!(
            "{} {} {} {}",
            row.path,
            row.endpoint.as_deref().unwrap_or(""),
            row.nat,
            row.zone.as_deref().unwrap_or("")
        )
    }
}

/// A connection with its byte rate over the last refresh interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct FlowView {
    pub row: FlowRow,
    /// None for a connection not listed in the previous reading.
    pub bytes_per_second: Option<f64>,
}

impl FlowView {
    fn key(row: &FlowRow) -> (String, String, String) {
        (
            row.proto.clone(),
            row.initiator.clone(),
            row.responder.clone(),
        )
    }

    pub(super) fn bytes(&self) -> u64 {
        self.row.forward_bytes + self.row.reply_bytes
    }

    /// "namespace/pod → namespace/pod", the unknown side as "-"; empty when neither is known.
    pub(super) fn pods(&self) -> String {
        let (initiator, responder) = (&self.row.initiator_pod, &self.row.responder_pod);
        if initiator.is_none() && responder.is_none() {
            return String::new();
        }
        format!(
            "{} → {}",
            initiator.as_deref().unwrap_or("-"),
            responder.as_deref().unwrap_or("-")
        )
    }

    /// What the filter looks in: the path, every address and the pod names.
    fn haystack(&self) -> String {
        let row = &self.row;
        format!(
            "{} {} {} {} {} {} {}",
            row.proto,
            row.initiator,
            row.responder,
            row.requested.as_deref().unwrap_or(""),
            row.path,
            row.endpoint.as_deref().unwrap_or(""),
            self.pods()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Focus {
    Paths,
    Flows,
}

/// Which column a table is sorted by (an index into its columns), and which way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Sort {
    pub column: usize,
    pub descending: bool,
}

/// What a key asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Quit,
    ToggleHelp,
    /// Esc outside the filter prompt: closes the help, else clears the filter.
    Dismiss,
    SwitchTable,
    TogglePause,
    SortNext,
    SortPrevious,
    ReverseSort,
    SelectUp,
    SelectDown,
    /// `/`: opens the filter prompt, empty.
    EditFilter,
    FilterInput(char),
    FilterBackspace,
    ApplyFilter,
    ClearFilter,
}

pub(super) struct App {
    /// "agent at URL" or "standalone datapath".
    pub source: String,
    /// The reading shown.
    pub reading: Option<Reading>,
    paths: Vec<PathView>,
    flows: Vec<FlowView>,
    pub focus: Focus,
    pub path_sort: Sort,
    pub flow_sort: Sort,
    /// Selected row of each table, in display order.
    pub selected: [usize; 2],
    /// Applied filter (lower case); empty shows everything.
    pub filter: String,
    /// The filter being typed, while the prompt is open.
    pub editing: Option<String>,
    pub paused: bool,
    pub help: bool,
    /// The source's last failure; cleared by the next reading.
    pub error: Option<String>,
    pub quit: bool,
}

impl App {
    pub(super) fn new(source: String) -> Self {
        Self {
            source,
            reading: None,
            paths: Vec::new(),
            flows: Vec::new(),
            focus: Focus::Paths,
            path_sort: Sort {
                column: column_index(PATH_COLUMNS, "bytes/s"),
                descending: true,
            },
            flow_sort: Sort {
                column: column_index(FLOW_COLUMNS, "bytes"),
                descending: true,
            },
            selected: [0, 0],
            filter: String::new(),
            editing: None,
            paused: false,
            help: false,
            error: None,
            quit: false,
        }
    }

    /// Takes in a new reading: rates are the growth since the one shown, over the time
    /// between the two polls (the source's clock, not ours). Paused, nothing changes.
    pub(super) fn apply(&mut self, reading: Reading) {
        self.error = None;
        if self.paused {
            return;
        }
        let previous = self.reading.as_ref();
        if previous.is_some_and(|p| p.paths.time_unix_ms == reading.paths.time_unix_ms) {
            // The same poll of the source again: nothing new to show.
            return;
        }
        let interval = |before: u64, now: u64| -> Option<f64> {
            (now > before).then(|| (now - before) as f64 / 1000.0)
        };
        let path_seconds =
            previous.and_then(|p| interval(p.paths.time_unix_ms, reading.paths.time_unix_ms));
        let flow_seconds =
            previous.and_then(|p| interval(p.flows.time_unix_ms, reading.flows.time_unix_ms));
        let old_paths: HashMap<_, &PathView> = self
            .paths
            .iter()
            .map(|view| (PathView::key(&view.row), view))
            .collect();
        let paths = reading
            .paths
            .paths
            .iter()
            .map(|row| {
                let old = old_paths.get(&PathView::key(row));
                let rates = path_seconds
                    .map(|seconds| PathRates::between(old.map(|view| &view.row), row, seconds));
                let mut history = old.map(|view| view.history.clone()).unwrap_or_default();
                if let Some(rates) = rates {
                    history.push(rates.bytes);
                    let excess = history.len().saturating_sub(usize::from(TREND_WIDTH));
                    history.drain(..excess);
                }
                PathView {
                    row: row.clone(),
                    rates,
                    history,
                }
            })
            .collect();
        let old_flows: HashMap<_, &FlowView> = self
            .flows
            .iter()
            .map(|view| (FlowView::key(&view.row), view))
            .collect();
        let flows = reading
            .flows
            .flows
            .iter()
            .map(|row| {
                let bytes_per_second =
                    flow_seconds
                        .zip(old_flows.get(&FlowView::key(row)))
                        .map(|(seconds, old)| {
                            let now = row.forward_bytes + row.reply_bytes;
                            growth(old.bytes(), now) / seconds
                        });
                FlowView {
                    row: row.clone(),
                    bytes_per_second,
                }
            })
            .collect();
        self.paths = paths;
        self.flows = flows;
        self.reading = Some(reading);
    }

    /// The paths the filter lets through, sorted.
    pub(super) fn visible_paths(&self) -> Vec<&PathView> {
        visible(
            &self.paths,
            PATH_COLUMNS,
            self.path_sort,
            &self.filter,
            PathView::haystack,
        )
    }

    /// The flows the filter lets through, sorted.
    pub(super) fn visible_flows(&self) -> Vec<&FlowView> {
        visible(
            &self.flows,
            FLOW_COLUMNS,
            self.flow_sort,
            &self.filter,
            FlowView::haystack,
        )
    }

    pub(super) fn act(&mut self, action: Action) {
        match action {
            Action::Quit => self.quit = true,
            Action::ToggleHelp => self.help = !self.help,
            Action::Dismiss => {
                if self.help {
                    self.help = false;
                } else {
                    self.filter.clear();
                }
            }
            Action::SwitchTable => {
                self.focus = match self.focus {
                    Focus::Paths => Focus::Flows,
                    Focus::Flows => Focus::Paths,
                }
            }
            Action::TogglePause => self.paused = !self.paused,
            Action::SortNext => self.move_sort(1),
            Action::SortPrevious => self.move_sort(-1),
            Action::ReverseSort => {
                let sort = self.focused_sort();
                sort.descending = !sort.descending;
            }
            Action::SelectUp => self.move_selection(-1),
            Action::SelectDown => self.move_selection(1),
            Action::EditFilter => self.editing = Some(String::new()),
            Action::FilterInput(c) => {
                if let Some(text) = self.editing.as_mut() {
                    text.push(c);
                }
            }
            Action::FilterBackspace => {
                if let Some(text) = self.editing.as_mut() {
                    text.pop();
                }
            }
            Action::ApplyFilter => {
                if let Some(text) = self.editing.take() {
                    self.filter = text.trim().to_lowercase();
                    self.selected = [0, 0];
                }
            }
            Action::ClearFilter => {
                self.editing = None;
                self.filter.clear();
            }
        }
    }

    fn focused_sort(&mut self) -> &mut Sort {
        match self.focus {
            Focus::Paths => &mut self.path_sort,
            Focus::Flows => &mut self.flow_sort,
        }
    }

    /// Moves the focused table's sort to the next sortable column; numbers sort largest first.
    fn move_sort(&mut self, step: isize) {
        let sortable: Vec<(usize, bool)> = match self.focus {
            Focus::Paths => sortable(PATH_COLUMNS),
            Focus::Flows => sortable(FLOW_COLUMNS),
        };
        let sort = self.focused_sort();
        let at = sortable
            .iter()
            .position(|(index, _)| *index == sort.column)
            .unwrap_or(0);
        let next = (at as isize + step).rem_euclid(sortable.len() as isize) as usize;
        let (column, numeric) = sortable[next];
        *sort = Sort {
            column,
            descending: numeric,
        };
    }

    fn move_selection(&mut self, step: isize) {
        let (index, rows) = match self.focus {
            Focus::Paths => (0, self.visible_paths().len()),
            Focus::Flows => (1, self.visible_flows().len()),
        };
        let last = rows.saturating_sub(1) as isize;
        self.selected[index] = (self.selected[index] as isize + step).clamp(0, last) as usize;
    }
}

fn column_index<R>(columns: &[Column<R>], title: &str) -> usize {
    columns
        .iter()
        .position(|column| column.title == title)
        .unwrap_or(0)
}

/// (index, numeric) of the columns that sort.
fn sortable<R>(columns: &[Column<R>]) -> Vec<(usize, bool)> {
    columns
        .iter()
        .enumerate()
        .filter(|(_, column)| column.sort.is_some())
        .map(|(index, column)| (index, column.numeric))
        .collect()
}

fn visible<'a, R>(
    rows: &'a [R],
    columns: &[Column<R>],
    sort: Sort,
    filter: &str,
    haystack: fn(&R) -> String,
) -> Vec<&'a R> {
    let mut shown: Vec<&R> = rows
        .iter()
        .filter(|row| filter.is_empty() || haystack(row).to_lowercase().contains(filter))
        .collect();
    if let Some(key) = columns.get(sort.column).and_then(|column| column.sort) {
        // Stable: rows that tie keep the source's order.
        shown.sort_by_cached_key(|row| key(row));
        if sort.descending {
            shown.reverse();
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::{FlowsResponse, PathsResponse};

    fn path_row(path: &str, bytes: u64) -> PathRow {
        PathRow {
            path: path.into(),
            nat: "none".into(),
            forward_bytes: bytes,
            forward_packets: bytes / 100,
            ..PathRow::default()
        }
    }

    fn flow_row(initiator: &str, path: &str, bytes: u64) -> FlowRow {
        FlowRow {
            proto: "tcp".into(),
            initiator: initiator.into(),
            responder: "10.0.1.102:8080".into(),
            path: path.into(),
            nat: "none".into(),
            forward_bytes: bytes,
            ..FlowRow::default()
        }
    }

    fn reading(time_unix_ms: u64, paths: Vec<PathRow>, flows: Vec<FlowRow>) -> Reading {
        Reading {
            paths: PathsResponse {
                time_unix_ms,
                paths,
                ..PathsResponse::default()
            },
            flows: FlowsResponse {
                time_unix_ms,
                flows,
            },
        }
    }

    fn names(app: &App) -> Vec<String> {
        app.visible_paths()
            .iter()
            .map(|view| view.row.path.clone())
            .collect()
    }

    #[test]
    fn rates_are_over_the_sources_interval() {
        let mut app = App::new("test".into());
        app.apply(reading(
            10_000,
            vec![path_row("pod_to_pod_local", 1_000)],
            vec![flow_row("10.0.1.101:4000", "pod_to_pod_local", 1_000)],
        ));
        assert_eq!(
            app.visible_paths()[0].rates,
            None,
            "one reading: no rate yet"
        );
        app.apply(reading(
            12_000,
            vec![
                path_row("pod_to_pod_local", 5_000),
                path_row("pod_to_external", 800),
            ],
            vec![
                flow_row("10.0.1.101:4000", "pod_to_pod_local", 5_000),
                flow_row("10.0.1.101:4001", "pod_to_external", 800),
            ],
        ));
        let paths = app.visible_paths();
        assert_eq!(paths[0].row.path, "pod_to_pod_local");
        assert_eq!(paths[0].rates.map(|r| r.bytes), Some(2_000.0));
        assert_eq!(paths[0].history, [2_000.0]);
        assert_eq!(
            paths[1].rates.map(|r| r.bytes),
            Some(400.0),
            "new path from zero"
        );
        let flows = app.visible_flows();
        assert_eq!(flows[0].bytes_per_second, Some(2_000.0));
        assert_eq!(flows[1].bytes_per_second, None, "not seen before");
    }

    #[test]
    fn the_same_poll_twice_changes_nothing_and_pause_freezes() {
        let mut app = App::new("test".into());
        app.apply(reading(1_000, vec![path_row("a", 0)], vec![]));
        app.apply(reading(2_000, vec![path_row("a", 1_000)], vec![]));
        app.apply(reading(2_000, vec![path_row("a", 1_000)], vec![]));
        assert_eq!(app.visible_paths()[0].rates.map(|r| r.bytes), Some(1_000.0));
        app.act(Action::TogglePause);
        app.apply(reading(3_000, vec![path_row("a", 9_000)], vec![]));
        assert_eq!(app.visible_paths()[0].rates.map(|r| r.bytes), Some(1_000.0));
        app.act(Action::TogglePause);
        // Rates after a pause span the whole time since the last reading shown.
        app.apply(reading(5_000, vec![path_row("a", 7_000)], vec![]));
        assert_eq!(app.visible_paths()[0].rates.map(|r| r.bytes), Some(2_000.0));
        assert_eq!(app.visible_paths()[0].history, [1_000.0, 2_000.0]);
    }

    #[test]
    fn the_history_keeps_the_sparklines_width() {
        let mut app = App::new("test".into());
        for second in 0..30u64 {
            app.apply(reading(
                second * 1000,
                vec![path_row("a", second * 10)],
                vec![],
            ));
        }
        assert_eq!(
            app.visible_paths()[0].history.len(),
            usize::from(TREND_WIDTH)
        );
    }

    #[test]
    fn sorting_moves_between_columns_and_reverses() {
        let mut app = App::new("test".into());
        let rows = vec![
            path_row("b_path", 100),
            path_row("a_path", 900),
            path_row("c_path", 500),
        ];
        app.apply(reading(0, rows.clone(), vec![]));
        app.apply(reading(
            1_000,
            rows.iter()
                .map(|r| path_row(&r.path, r.forward_bytes * 2))
                .collect(),
            vec![],
        ));
        assert_eq!(
            names(&app),
            ["a_path", "c_path", "b_path"],
            "bytes/s, largest first"
        );
        app.act(Action::ReverseSort);
        assert_eq!(names(&app), ["b_path", "c_path", "a_path"]);
        // From bytes/s back to the first column, the path name: alphabetical.
        let bytes = column_index(PATH_COLUMNS, "bytes/s");
        let sortable_before_bytes = PATH_COLUMNS[..bytes]
            .iter()
            .filter(|column| column.sort.is_some())
            .count();
        for _ in 0..sortable_before_bytes {
            app.act(Action::SortPrevious);
        }
        assert_eq!(PATH_COLUMNS[app.path_sort.column].title, "path");
        assert_eq!(names(&app), ["a_path", "b_path", "c_path"]);
        app.act(Action::SortPrevious);
        assert_eq!(
            PATH_COLUMNS[app.path_sort.column].title, "rst/s",
            "wraps, skipping the sparkline"
        );
        app.act(Action::SortNext);
        assert_eq!(PATH_COLUMNS[app.path_sort.column].title, "path");
        // The flows table keeps its own sort.
        app.act(Action::SwitchTable);
        app.act(Action::SortNext);
        assert_eq!(FLOW_COLUMNS[app.flow_sort.column].title, "hs");
        assert_eq!(PATH_COLUMNS[app.path_sort.column].title, "path");
    }

    #[test]
    fn the_filter_matches_paths_addresses_and_pods() {
        let mut app = App::new("test".into());
        let mut with_pod = flow_row("10.0.1.103:5000", "pod_to_external", 10);
        with_pod.initiator_pod = Some("shop/cart-7d9".into());
        app.apply(reading(
            0,
            vec![
                path_row("pod_to_pod_local", 1),
                path_row("pod_to_external", 1),
            ],
            vec![
                flow_row("10.0.1.101:4000", "pod_to_pod_local", 10),
                with_pod,
            ],
        ));
        let type_filter = |app: &mut App, text: &str| {
            app.act(Action::EditFilter);
            text.chars().for_each(|c| app.act(Action::FilterInput(c)));
            app.act(Action::ApplyFilter);
        };
        type_filter(&mut app, "EXTERNAL");
        assert_eq!(names(&app), ["pod_to_external"]);
        assert_eq!(app.visible_flows().len(), 1);
        type_filter(&mut app, "10.0.1.101");
        assert!(
            app.visible_paths().is_empty(),
            "addresses are not in the paths table"
        );
        assert_eq!(app.visible_flows()[0].row.path, "pod_to_pod_local");
        app.act(Action::EditFilter);
        "10.0.1.1"
            .chars()
            .for_each(|c| app.act(Action::FilterInput(c)));
        app.act(Action::FilterBackspace);
        assert_eq!(app.editing.as_deref(), Some("10.0.1."));
        assert_eq!(app.filter, "10.0.1.101", "in force until Enter");
        app.act(Action::ClearFilter);
        assert_eq!(
            (app.editing.clone(), app.filter.clone()),
            (None, String::new())
        );
        type_filter(&mut app, "cart");
        assert_eq!(app.visible_flows()[0].pods(), "shop/cart-7d9 → -");
        app.act(Action::Dismiss);
        assert_eq!(app.visible_flows().len(), 2, "Esc clears the filter");
    }

    #[test]
    fn selection_stays_within_the_rows() {
        let mut app = App::new("test".into());
        app.apply(reading(0, vec![path_row("a", 1), path_row("b", 2)], vec![]));
        for _ in 0..5 {
            app.act(Action::SelectDown);
        }
        assert_eq!(app.selected[0], 1);
        app.act(Action::SelectUp);
        app.act(Action::SelectUp);
        assert_eq!(app.selected[0], 0);
    }
}

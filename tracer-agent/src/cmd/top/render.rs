//! Drawing one frame from the app state: a header, the paths table, the top flows table and a
//! status line; the help over them when asked. Columns that do not fit are dropped, least
//! important first, and cells are cut with an ellipsis, so any size from 80×24 up stays legible.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState},
};

use super::{
    app::{App, Focus, Sort},
    columns::{Column, FLOW_COLUMNS, PATH_COLUMNS, elide, fit},
    input::HELP,
};

/// What the abbreviated column titles mean, for the help screen.
const COLUMN_NOTES: &[(&str, &str)] = &[
    (
        "endpt",
        "API server endpoint taken: public (NLB) or private (ENIs)",
    ),
    (
        "zone",
        "same_zone / cross_zone, for other VPC hosts whose zone is known",
    ),
    ("active", "connections of the path now in the flow table"),
    ("new/s", "connections started per second"),
    (
        "hs p50/p99",
        "TCP SYN → SYN-ACK time of the handshakes of the interval",
    ),
    (
        "unans/s",
        "TCP SYNs per second that got no answer (silent drops)",
    ),
    ("rst/s", "TCP connections reset per second"),
];

pub(super) fn draw(frame: &mut Frame<'_>, app: &App, now_unix_ms: u64) {
    let [header, tables, status] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_lines(app, now_unix_ms)), header);

    let paths = app.visible_paths();
    let flows = app.visible_flows();
    // Each table wants its rows plus borders and titles; the flows get at least half the room
    // when both cannot have all they want.
    let want = |rows: usize| rows as u16 + 3;
    let paths_height = want(paths.len())
        .min(tables.height - want(flows.len()).min(tables.height / 2))
        .max(4);
    let [paths_area, flows_area] =
        Layout::vertical([Constraint::Length(paths_height), Constraint::Min(0)]).areas(tables);

    let paths_table = TableView {
        name: "Paths",
        columns: PATH_COLUMNS,
        sort: app.path_sort,
        rows: paths.iter().map(|view| cells(PATH_COLUMNS, view)).collect(),
        focused: app.focus == Focus::Paths,
        selected: app.selected[0],
    };
    draw_table(frame, paths_area, paths_table, &app.filter);
    let flows_table = TableView {
        name: "Top flows",
        columns: FLOW_COLUMNS,
        sort: app.flow_sort,
        rows: flows.iter().map(|view| cells(FLOW_COLUMNS, view)).collect(),
        focused: app.focus == Focus::Flows,
        selected: app.selected[1],
    };
    draw_table(frame, flows_area, flows_table, &app.filter);

    frame.render_widget(Paragraph::new(status_line(app)), status);
    if app.help {
        draw_help(frame);
    }
}

/// Three lines: the data's age, readiness, version and node; where the data comes from; what
/// the agent sees.
fn header_lines(app: &App, now_unix_ms: u64) -> Vec<Line<'static>> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut source = Line::raw(format!("source: {}", app.source));
    let Some(reading) = &app.reading else {
        return vec![
            Line::styled("tracer top · waiting for the first reading…", bold),
            source,
        ];
    };
    let paths = &reading.paths;
    let age = now_unix_ms.saturating_sub(paths.time_unix_ms) as f64 / 1000.0;
    let health = if paths.ready {
        Span::styled("ready", Style::new().fg(Color::Green))
    } else {
        Span::styled("not ready", Style::new().fg(Color::Yellow))
    };
    // What matters most first: a narrow terminal cuts the end of the line. Blind interfaces
    // right after the readiness: the counts below miss their traffic.
    let blind = (!paths.blind_interfaces.is_empty()).then(|| {
        Span::styled(
            format!(" · blind: {}", paths.blind_interfaces.join(", ")),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        )
    });
    let first = Line::from_iter(
        [
            Some(Span::styled("tracer top", bold)),
            Some(Span::raw(format!(" · data {age:.1}s old · "))),
            Some(health),
            blind,
            Some(Span::raw(format!(
                " · tracer v{} · node {}",
                paths.version,
                paths.node.as_deref().unwrap_or("(no --node-name)")
            ))),
        ]
        .into_iter()
        .flatten(),
    );
    if !paths.problems.is_empty() {
        source.push_span(Span::styled(
            format!(" · {}", paths.problems.join("; ")),
            Style::new().fg(Color::Yellow),
        ));
    }
    let endpoints = if paths.apiserver_endpoints.is_empty() {
        "none seen".to_owned()
    } else {
        paths.apiserver_endpoints.join("+")
    };
    let context = Line::raw(format!(
        "interfaces {} pod, {} node · API server endpoint {endpoints} · flow table {}/{}",
        paths.attached_interfaces.pod,
        paths.attached_interfaces.node,
        paths.flow_table.entries,
        paths.flow_table.capacity
    ));
    vec![first, source, context]
}

fn cells<R>(columns: &[Column<R>], row: &R) -> Vec<String> {
    columns.iter().map(|column| (column.text)(row)).collect()
}

/// One table to draw: its cells already as text, in column order.
struct TableView<'a, R> {
    name: &'a str,
    columns: &'a [Column<R>],
    sort: Sort,
    rows: Vec<Vec<String>>,
    focused: bool,
    selected: usize,
}

fn draw_table<R>(frame: &mut Frame<'_>, area: Rect, table: TableView<'_, R>, filter: &str) {
    let TableView {
        name,
        columns,
        sort,
        rows,
        focused,
        selected,
    } = table;
    let shown = fit(columns, area.width.saturating_sub(2));
    let hidden = columns.len() - shown.len();
    let arrow = if sort.descending { "▼" } else { "▲" };
    let mut title = format!(
        " {name} ({}) · sort {} {arrow}",
        rows.len(),
        columns[sort.column].title
    );
    if !filter.is_empty() {
        title.push_str(&format!(" · filter \"{filter}\""));
    }
    if hidden > 0 {
        let plural = if hidden == 1 { "" } else { "s" };
        title.push_str(&format!(" · {hidden} column{plural} hidden"));
    }
    title.push(' ');
    let border = if focused {
        Style::new().fg(Color::Cyan)
    } else {
        Style::new().fg(Color::DarkGray)
    };
    let cell = |column: &Column<R>, text: &str| -> Cell<'static> {
        let text = elide(text, usize::from(column.width));
        if column.numeric {
            Cell::from(Line::from(text).right_aligned())
        } else {
            Cell::from(text)
        }
    };
    let sorted = Style::new()
        .fg(Color::Cyan)
        .add_modifier(Modifier::UNDERLINED);
    let header = Row::new(shown.iter().map(|&index| {
        let column = &columns[index];
        let title = cell(column, column.title);
        if index == sort.column {
            title.style(sorted)
        } else {
            title
        }
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|row| {
        Row::new(
            shown
                .iter()
                .map(|&index| cell(&columns[index], &row[index])),
        )
    });
    let widths = shown
        .iter()
        .map(|&index| Constraint::Length(columns[index].width));
    let highlight = if focused {
        Style::new().add_modifier(Modifier::REVERSED)
    } else {
        Style::new()
    };
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(title).border_style(border))
        .row_highlight_style(highlight);
    let selected = (!rows.is_empty()).then(|| selected.min(rows.len() - 1));
    let mut state = TableState::default().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

fn status_line(app: &App) -> Line<'static> {
    if let Some(text) = &app.editing {
        return Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{text}▏")),
            Span::styled(
                "  Enter apply · Esc clear",
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    }
    let mut spans = Vec::new();
    if app.paused {
        spans.push(Span::styled(
            "PAUSED ",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    if let Some(error) = &app.error {
        spans.push(Span::styled(
            format!("{error} "),
            Style::new().fg(Color::Red),
        ));
    }
    spans.push(Span::styled(
        "? help · < > sort · r reverse · / filter · Tab table · p pause · q quit",
        Style::new().fg(Color::DarkGray),
    ));
    Line::from(spans)
}

fn draw_help(frame: &mut Frame<'_>) {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line<'_>> = HELP
        .iter()
        .map(|(keys, what)| {
            Line::from(vec![
                Span::styled(format!("{keys:<12}"), bold),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.extend(COLUMN_NOTES.iter().map(|(column, what)| {
        Line::from(vec![
            Span::styled(format!("{column:<12}"), bold),
            Span::raw(*what),
        ])
    }));
    let area = frame.area();
    let width = area.width.min(84);
    let height = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(" tracer top keys (? or Esc to close) ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        cmd::top::{Reading, app::Action},
        serve::api::{FlowRow, FlowsResponse, PathRow, PathsResponse},
    };

    const PATHS: [&str; 3] = [
        "controlplane_to_kubelet",
        "pod_to_apiserver",
        "pod_to_pod_remote",
    ];

    fn app() -> App {
        let mut app = App::new("agent at http://127.0.0.1:9477".into());
        for second in 1..=2u64 {
            let rows = PATHS
                .iter()
                .map(|path| PathRow {
                    path: (*path).into(),
                    endpoint: path.contains("apiserver").then(|| "private".into()),
                    nat: "dnat".into(),
                    forward_bytes: second * 1_500_000,
                    forward_packets: second * 1_000,
                    ..PathRow::default()
                })
                .collect();
            let flows = (0..30)
                .map(|i| FlowRow {
                    proto: "tcp".into(),
                    initiator: format!("10.0.1.{i}:43210"),
                    responder: "[fd00:1234:5678:9abc::10]:443".into(),
                    path: "pod_to_pod_remote".into(),
                    nat: "none".into(),
                    forward_bytes: second * 1000 * i,
                    initiator_pod: Some("default/web-0".into()),
                    ..FlowRow::default()
                })
                .collect();
            app.apply(Reading {
                paths: PathsResponse {
                    node: Some("ip-10-0-1-10".into()),
                    version: "0.1.0".into(),
                    time_unix_ms: second * 1000,
                    apiserver_endpoints: vec!["private".into()],
                    ready: true,
                    paths: rows,
                    ..PathsResponse::default()
                },
                flows: FlowsResponse {
                    time_unix_ms: second * 1000,
                    flows,
                },
            });
        }
        app
    }

    fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, app, 2_500)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect())
            .collect()
    }

    #[test]
    fn an_80_by_24_terminal_shows_every_path_whole_with_its_rates() {
        let lines = screen(&app(), 80, 24);
        let text = lines.join("\n");
        assert!(text.contains("node ip-10-0-1-10"), "{text}");
        assert!(
            text.contains("tracer top · data 0.5s old · ready"),
            "{text}"
        );
        assert!(text.contains("data 0.5s old"), "{text}");
        for path in PATHS {
            let line = lines
                .iter()
                .find(|line| line.contains(path))
                .unwrap_or_else(|| panic!("{path} missing:\n{text}"));
            assert!(line.contains("1.5M"), "bytes/s of {path}: {line}");
        }
        assert!(text.contains("columns hidden"), "{text}");
        assert!(
            text.contains("[fd00:1234:5678:9abc…"),
            "addresses elided: {text}"
        );
    }

    #[test]
    fn a_wide_terminal_shows_every_column() {
        let text = screen(&app(), 200, 50).join("\n");
        for column in PATH_COLUMNS.iter().map(|c| c.title) {
            assert!(text.contains(column), "{column} missing:\n{text}");
        }
        assert!(text.contains("default/web-0 → -"), "{text}");
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn an_agent_that_is_not_ready_says_why() {
        let mut app = app();
        let mut reading = app.reading.clone().unwrap();
        reading.paths.time_unix_ms += 1000;
        reading.paths.ready = false;
        reading.paths.problems = vec!["VPC CIDR unknown".into()];
        app.apply(reading);
        let text = screen(&app, 120, 30).join("\n");
        assert!(text.contains("· not ready ·"), "{text}");
        assert!(text.contains("· VPC CIDR unknown"), "{text}");
    }

    #[test]
    fn blind_interfaces_are_named_after_the_readiness() {
        let mut app = app();
        let mut reading = app.reading.clone().unwrap();
        reading.paths.time_unix_ms += 1000;
        reading.paths.blind_interfaces = vec!["eni1a".into(), "eth0".into()];
        app.apply(reading);
        let text = screen(&app, 80, 24).join("\n");
        assert!(text.contains("· ready · blind: eni1a, eth0 ·"), "{text}");
    }

    #[test]
    fn help_filter_prompt_and_tiny_terminals_draw() {
        let mut app = app();
        app.act(Action::ToggleHelp);
        let text = screen(&app, 80, 24).join("\n");
        assert!(text.contains("reverse the sort order"), "{text}");
        app.act(Action::Dismiss);
        app.act(Action::EditFilter);
        app.act(Action::FilterInput('x'));
        assert!(screen(&app, 80, 24).join("\n").contains("filter: x"));
        // Smaller than anyone should use: still no panic.
        for (width, height) in [(1, 1), (20, 5), (80, 3)] {
            screen(&app, width, height);
        }
    }
}

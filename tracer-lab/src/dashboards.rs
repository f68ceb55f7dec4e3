//! The Grafana dashboards in `dashboards/`: loading them, what makes them importable as they
//! are, their panels' queries with the template variables substituted, and the metric names a
//! PromQL expression uses — so that tests can check them against what the agent exports.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::build;

/// Where the dashboards live.
pub fn dir() -> PathBuf {
    build::workspace_root().join("dashboards")
}

/// What a panel and its targets must point at: the `datasource` template variable.
const DATASOURCE_UID: &str = "${datasource}";

/// Label matchers every selector of a panel carries, so that the `cluster` and `node` variables
/// filter everything the dashboard shows.
const FILTERS: [&str; 2] = ["cluster=~\"$cluster\"", "node=~\"$node\""];

pub struct Dashboard {
    pub file: PathBuf,
    json: Value,
}

/// One query of one panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
    pub legend: String,
    pub unit: String,
}

/// A `label_values(selector, label)` template variable.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelValues {
    pub variable: String,
    pub selector: String,
    pub label: String,
}

impl Dashboard {
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let json = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", file.display()))?;
        Ok(Self {
            file: file.to_owned(),
            json,
        })
    }

    /// Every `*.json` file in `dir`, sorted by name.
    pub fn load_all(dir: &Path) -> anyhow::Result<Vec<Self>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|file| file.extension().is_some_and(|ext| ext == "json"));
        files.sort();
        files.iter().map(|file| Self::load(file)).collect()
    }

    pub fn uid(&self) -> &str {
        self.json["uid"].as_str().unwrap_or_default()
    }

    pub fn title(&self) -> &str {
        self.json["title"].as_str().unwrap_or_default()
    }

    /// Panels that show data (rows left out, the panels of collapsed rows included).
    fn panels(&self) -> Vec<&Value> {
        let mut panels = Vec::new();
        for panel in as_slice(&self.json["panels"]) {
            if panel["type"] == "row" {
                panels.extend(as_slice(&panel["panels"]));
            } else {
                panels.push(panel);
            }
        }
        panels
    }

    pub fn queries(&self) -> Vec<PanelQuery> {
        self.panels()
            .into_iter()
            .flat_map(|panel| {
                as_slice(&panel["targets"]).iter().map(|target| PanelQuery {
                    dashboard: self.title().to_owned(),
                    panel: text(&panel["title"]),
                    expr: text(&target["expr"]),
                    legend: text(&target["legendFormat"]),
                    unit: text(&panel["fieldConfig"]["defaults"]["unit"]),
                })
            })
            .collect()
    }

    fn variables(&self) -> &[Value] {
        as_slice(&self.json["templating"]["list"])
    }

    pub fn label_values(&self) -> Vec<LabelValues> {
        self.variables()
            .iter()
            .filter(|variable| variable["type"] == "query")
            .filter_map(|variable| {
                let (selector, label) = parse_label_values(variable["query"].as_str()?)?;
                Some(LabelValues {
                    variable: text(&variable["name"]),
                    selector,
                    label,
                })
            })
            .collect()
    }

    /// Why Grafana would not import this dashboard as it is, or would show it badly: empty
    /// when it is fine.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut problem = |what: String| problems.push(format!("{}: {what}", self.file.display()));
        if self.uid().is_empty() || self.title().is_empty() {
            problem("no uid or no title".into());
        }
        if !self.json["__inputs"].is_null() {
            problem("__inputs: the datasource is a template variable, not an import input".into());
        }
        let datasource = self
            .variables()
            .iter()
            .find(|variable| variable["name"] == "datasource");
        if datasource.is_none_or(|d| d["type"] != "datasource" || d["query"] != "prometheus") {
            problem("no `datasource` variable of type datasource, query prometheus".into());
        }
        let label_values = self.label_values();
        for name in ["cluster", "node"] {
            if !label_values
                .iter()
                .any(|v| v.variable == name && v.label == name)
            {
                problem(format!("no `{name}` variable of label_values(…, {name})"));
            }
        }
        visit_datasources(&self.json, &mut |where_, datasource| {
            if datasource["type"] != "prometheus" || datasource["uid"] != DATASOURCE_UID {
                problem(format!(
                    "{where_} uses datasource {datasource}, not {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
                ));
            }
        });
        let mut ids = BTreeSet::new();
        for panel in self.panels() {
            let title = text(&panel["title"]);
            if !ids.insert(panel["id"].as_u64()) || panel["id"].is_null() {
                problem(format!("panel {title:?}: missing or duplicate id"));
            }
            if panel["datasource"].is_null() {
                problem(format!("panel {title:?}: no datasource"));
            }
            if text(&panel["description"]).len() < 40 {
                problem(format!(
                    "panel {title:?}: no description telling what to look for"
                ));
            }
            if text(&panel["fieldConfig"]["defaults"]["unit"]).is_empty() {
                problem(format!("panel {title:?}: no unit"));
            }
            if as_slice(&panel["targets"]).is_empty() {
                problem(format!("panel {title:?}: no query"));
            }
        }
        for query in self.queries() {
            if query.expr.is_empty() {
                problem(format!("panel {:?}: a target without expr", query.panel));
            }
            for selector in selectors(&query.expr) {
                let matchers: String = selector.matchers.split_whitespace().collect();
                for filter in FILTERS {
                    if !matchers.contains(filter) {
                        problem(format!(
                            "panel {:?}: {} lacks {filter}",
                            query.panel, selector.metric
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// What keeps a set of dashboards from being imported side by side: each one's problems and
/// uids used twice.
pub fn problems(dashboards: &[Dashboard]) -> Vec<String> {
    let mut problems: Vec<String> = dashboards.iter().flat_map(Dashboard::problems).collect();
    let mut uids = BTreeSet::new();
    for dashboard in dashboards {
        if !uids.insert(dashboard.uid()) {
            problems.push(format!(
                "{}: uid {:?} is used by another dashboard",
                dashboard.file.display(),
                dashboard.uid()
            ));
        }
    }
    problems
}

/// Replaces `$name` and `${name}` by their values, as Grafana does before querying.
pub fn substitute(expr: &str, variables: &[(&str, &str)]) -> String {
    let mut expr = expr.to_owned();
    for (name, value) in variables {
        expr = expr
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    expr
}

/// A metric selector in a PromQL expression: the metric's name and its label matchers as
/// written (without the braces).
#[derive(Debug, PartialEq)]
pub struct Selector {
    pub metric: String,
    pub matchers: String,
}

/// The metric names an expression reads.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    selectors(expr).into_iter().map(|s| s.metric).collect()
}

/// Words that are never metric names: operators, modifiers, and the aggregations (which may be
/// followed by `by (…)` before their parenthesis).
const NOT_METRICS: [&str; 25] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// Modifiers followed by a list of label names in parentheses.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric selectors of a PromQL expression, found by a small scanner: a name that is not a
/// keyword and not followed by `(` (a function or aggregation) is a metric; strings, range
/// brackets, numbers, `$variables` and label lists (`by (…)`) are skipped.
pub fn selectors(expr: &str) -> Vec<Selector> {
    let bytes = expr.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let word_end = |mut i: usize| {
        while i < bytes.len() && (is_word(bytes[i]) || bytes[i] == b'.') {
            i += 1;
        }
        i
    };
    let next_char = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' | b'`' => i = past_string(bytes, i),
            b'[' => i = past_closing(bytes, i, b']'),
            b'{' => i = past_closing(bytes, i, b'}'),
            b'$' => i = word_end(i + 1),
            b if b.is_ascii_digit() || b == b'.' => i = word_end(i),
            b if is_word(b) => {
                let end = word_end(i);
                let word = &expr[i..end];
                let next = next_char(end);
                let opens = |c: u8| bytes.get(next) == Some(&c);
                i = end;
                if LABEL_LISTS.contains(&word) && opens(b'(') {
                    i = past_closing(bytes, next, b')');
                } else if !NOT_METRICS.contains(&word) && !opens(b'(') {
                    let matchers = if opens(b'{') {
                        i = past_closing(bytes, next, b'}');
                        expr[next + 1..i - 1].to_owned()
                    } else {
                        String::new()
                    };
                    found.push(Selector {
                        metric: word.to_owned(),
                        matchers,
                    });
                }
            }
            _ => i += 1,
        }
    }
    found
}

/// The index just past the string literal starting at `start`.
fn past_string(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() && bytes[i] != quote {
        i += if bytes[i] == b'\\' && quote != b'`' {
            2
        } else {
            1
        };
    }
    (i + 1).min(bytes.len())
}

/// The index just past the `close` matching the opening bracket at `start`, strings skipped.
fn past_closing(bytes: &[u8], start: usize, close: u8) -> usize {
    let open = bytes[start];
    let mut depth = 0;
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' | b'`' => {
                i = past_string(bytes, i);
                continue;
            }
            b if b == open => depth += 1,
            b if b == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    bytes.len()
}

/// `label_values(selector, label)` → (selector, label).
fn parse_label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

/// Calls `visit` with every `datasource` object in the dashboard and where it is.
fn visit_datasources(value: &Value, visit: &mut impl FnMut(&str, &Value)) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "datasource" {
                    let owner = match (map.get("title"), map.get("name")) {
                        (Some(title), _) => format!("panel {title}"),
                        (None, Some(name)) => format!("variable {name}"),
                        _ => "a target".to_owned(),
                    };
                    visit(&owner, child);
                } else {
                    visit_datasources(child, visit);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| visit_datasources(item, visit)),
        _ => {}
    }
}

fn as_slice(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn finds_the_metrics_and_only_them() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (path, le) (rate(tracer_path_handshake_seconds_bucket{cluster=~"$cluster", path!~"a}b|or"}[$__rate_interval])))"#
            ),
            ["tracer_path_handshake_seconds_bucket"]
        );
        assert_eq!(
            names(
                "sum(rate(a_total[5m] offset 10m)) / on (node) group_left(version) b > bool 0.5 and c unless d or vector(0)"
            ),
            ["a_total", "b", "c", "d"]
        );
        assert_eq!(
            names("count(up{job=\"tracer\"} == 0) or vector(1e3)"),
            ["up"]
        );
        assert_eq!(
            names("sum without (instance) (x) * ignoring(le) y + count by (a) (z)"),
            ["x", "y", "z"]
        );
        assert!(names("vector(1) + time()").is_empty());
    }

    #[test]
    fn keeps_the_matchers_of_each_selector() {
        let found = selectors(r#"a{cluster=~"$cluster", node=~"$node"} / b"#);
        assert_eq!(
            found,
            [
                Selector {
                    metric: "a".into(),
                    matchers: r#"cluster=~"$cluster", node=~"$node""#.into()
                },
                Selector {
                    metric: "b".into(),
                    matchers: String::new()
                }
            ]
        );
    }

    #[test]
    fn a_dashboard_grafana_would_import_badly_is_refused() {
        let json = serde_json::json!({
            "uid": "x", "title": "X",
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "cluster", "type": "query", "query": "label_values(up, cluster)",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            ]},
            "panels": [{
                "id": 1, "type": "timeseries", "title": "P", "description": "short",
                "datasource": {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"},
                "fieldConfig": {"defaults": {}},
                "targets": [{"expr": "rate(x{cluster=~\"$cluster\"}[5m])"}]
            }]
        });
        let dashboard = || Dashboard {
            file: "x.json".into(),
            json: json.clone(),
        };
        let found = problems(&[dashboard(), dashboard()]).join("\n");
        for expected in [
            "no `node` variable",
            "panel \"P\" uses datasource",
            "panel \"P\": no description",
            "panel \"P\": no unit",
            "x lacks node=~\"$node\"",
            "uid \"x\" is used by another dashboard",
        ] {
            assert!(found.contains(expected), "{expected:?} not in:\n{found}");
        }
    }

    #[test]
    fn substitutes_both_variable_forms() {
        assert_eq!(
            substitute(
                r#"rate(x{node=~"$node",c="${cluster}"}[$__rate_interval])"#,
                &[
                    ("node", "n1"),
                    ("cluster", "c1"),
                    ("__rate_interval", "15s")
                ]
            ),
            r#"rate(x{node=~"n1",c="c1"}[15s])"#
        );
    }

    #[test]
    fn reads_label_values_queries() {
        assert_eq!(
            parse_label_values(r#"label_values(tracer_build_info{cluster=~"$cluster"}, node)"#),
            Some((
                r#"tracer_build_info{cluster=~"$cluster"}"#.to_owned(),
                "node".to_owned()
            ))
        );
        assert_eq!(parse_label_values("query_result(up)"), None);
    }
}

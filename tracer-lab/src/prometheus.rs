//! A real Prometheus server (Debian's `prometheus` package) running inside a lab namespace,
//! scraping the agent there and answering PromQL through its HTTP API — the way dashboards and
//! alerting rules are proven to work on what the agent exports.
//!
//! Its configuration and storage live in a temporary directory; dropping the handle kills the
//! server and removes the directory, also when a test fails.
use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::{lab::Lab, scrape};

/// Where Prometheus listens inside the namespace (loopback: nothing leaves the lab).
const LISTEN_ADDR: &str = "127.0.0.1:9090";

/// One scrape job with one target and the labels Prometheus attaches to its series.
pub struct ScrapeTarget<'a> {
    pub job: &'a str,
    pub address: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// Over HTTPS with a bearer token, as a Prometheus in the cluster scrapes the agent from
    /// another pod; plain HTTP without.
    pub secure: Option<SecureScrape<'a>>,
}

/// What an HTTPS scrape with a token needs.
pub struct SecureScrape<'a> {
    /// The certificate Prometheus trusts for the target.
    pub ca_file: &'a Path,
    /// The file holding the bearer token (a service account's token, in a cluster).
    pub token_file: &'a Path,
}

/// What to run: how often, whom to scrape, which rule files to evaluate.
pub struct Config<'a> {
    /// Scrape and rule evaluation interval.
    pub interval: Duration,
    pub target: ScrapeTarget<'a>,
    pub rule_files: &'a [PathBuf],
}

impl Config<'_> {
    /// prometheus.yml.
    fn to_yaml(&self) -> String {
        let interval = format!("{}ms", self.interval.as_millis());
        let labels: String = self
            .target
            .labels
            .iter()
            .map(|(name, value)| format!("          {name}: {value:?}\n"))
            .collect();
        let rule_files: String = self
            .rule_files
            .iter()
            .map(|file| format!("  - {:?}\n", file.display().to_string()))
            .collect();
        let secure = self.target.secure.as_ref().map_or_else(String::new, |secure| {
            format!(
                "    scheme: https\n    tls_config:\n      ca_file: {:?}\n    authorization:\n      credentials_file: {:?}\n",
                secure.ca_file.display().to_string(),
                secure.token_file.display().to_string(),
            )
        });
        format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\n\
             rule_files:\n{rule_files}\
             scrape_configs:\n  - job_name: {job:?}\n{secure}    static_configs:\n      - targets: [{address:?}]\n        labels:\n{labels}",
            job = self.target.job,
            address = self.target.address,
        )
    }
}

/// One series of a query's answer: its labels and its values (one for an instant query, one
/// per step for a range query).
#[derive(Clone, Debug)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub values: Vec<f64>,
}

/// A rule as Prometheus loaded and last evaluated it.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub query: String,
    /// Alerting rules: "inactive", "pending" or "firing".
    pub state: String,
    /// "ok", "err" or "unknown" (not evaluated yet).
    pub health: String,
    pub last_error: String,
}

impl Rule {
    /// Pending or firing: the expression returns something.
    pub fn is_active(&self) -> bool {
        self.state == "pending" || self.state == "firing"
    }
}

pub struct Prometheus {
    ns: String,
    addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` in `role`'s namespace of the lab with `config`; storage and
    /// configuration in a fresh temporary directory.
    pub fn start(lab: &Lab, role: &str, config: &Config<'_>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", lab.id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the stale {}", dir.display()))?;
        }
        let child = spawn(lab, role, config, &dir).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        eprintln!(
            "prometheus: started in {} on {LISTEN_ADDR}, files in {}",
            lab.ns(role),
            dir.display()
        );
        Ok(Self {
            ns: lab.ns(role),
            addr: LISTEN_ADDR.parse()?,
            child,
            dir,
        })
    }

    /// Waits until `/-/ready` answers 200, or fails with the server's log.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}); is Debian's `prometheus` package installed (`cargo xtask setup`)?\n{}",
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = scrape::http_get(&self.ns, self.addr, "/-/ready") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "prometheus was not ready after {timeout:?}:\n{}",
            self.log_tail()
        )
    }

    /// An instant query, evaluated now.
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Series>> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        series(&data, "value")
    }

    /// A range query from `start` to now, one value per `step`, as a Grafana panel asks.
    pub fn query_range(
        &self,
        expr: &str,
        start: SystemTime,
        step: Duration,
    ) -> anyhow::Result<Vec<Series>> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={:.3}&end={:.3}&step={}",
            url_encode(expr),
            unix_seconds(start),
            unix_seconds(SystemTime::now()),
            step.as_secs_f64()
        ))?;
        series(&data, "values")
    }

    /// The values of `label` on the series `selector` matches (Grafana's `label_values`).
    pub fn label_values(&self, label: &str, selector: &str) -> anyhow::Result<Vec<String>> {
        let data = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            url_encode(selector)
        ))?;
        let values = data
            .as_array()
            .ok_or_else(|| anyhow!("label values: not a list: {data}"))?;
        Ok(values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }

    /// Every rule loaded, with its last evaluation.
    pub fn rules(&self) -> anyhow::Result<Vec<Rule>> {
        let data = self.api("/api/v1/rules")?;
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        Ok(groups
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .map(|rule| Rule {
                name: text(&rule["name"]),
                query: text(&rule["query"]),
                state: text(&rule["state"]),
                health: text(&rule["health"]),
                last_error: text(&rule["lastError"]),
            })
            .collect())
    }

    /// `GET path` on the HTTP API; the `data` of a successful answer.
    fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = scrape::http_get(&self.ns, self.addr, path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status} to {path}: {body}"))?;
        if answer["status"] != "success" {
            bail!(
                "prometheus answered {status} to {path}: {}",
                answer["error"].as_str().unwrap_or(&body)
            );
        }
        Ok(answer["data"].clone())
    }

    pub fn log_tail(&self) -> String {
        let log = self.dir.join("prometheus.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- prometheus log ({}) ---\n{}",
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("prometheus: removing {}: {error}", self.dir.display());
        }
    }
}

/// Writes the configuration into `dir` and starts the server, logging to `dir`.
fn spawn(lab: &Lab, role: &str, config: &Config<'_>, dir: &Path) -> anyhow::Result<Child> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config.to_yaml())
        .with_context(|| format!("writing {}", config_file.display()))?;
    let log = File::create(dir.join("prometheus.log"))?;
    let mut command = lab.command_in(role, "prometheus");
    command
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={LISTEN_ADDR}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    command
        .spawn()
        .with_context(|| format!("starting prometheus in {}", lab.ns(role)))
}

/// The series of a `vector` (values under `value`) or `matrix` (under `values`) answer.
fn series(data: &Value, values_key: &str) -> anyhow::Result<Vec<Series>> {
    let result = data["result"]
        .as_array()
        .ok_or_else(|| anyhow!("no result in {data}"))?;
    result
        .iter()
        .map(|item| {
            let labels = item["metric"]
                .as_object()
                .map(|labels| {
                    labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let points = match &item[values_key] {
                Value::Array(points) if values_key == "value" => vec![Value::Array(points.clone())],
                Value::Array(points) => points.clone(),
                other => bail!("unexpected {values_key} in the answer: {other}"),
            };
            let values = points
                .iter()
                .map(|point| {
                    point[1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| anyhow!("malformed sample {point}"))
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Series { labels, values })
        })
        .collect()
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query parameter.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql_for_a_query_string() {
        assert_eq!(
            url_encode(r#"rate(x{a=~"b|c"}[1m]) > 0"#),
            "rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29%20%3E%200"
        );
        assert_eq!(url_encode("µ"), "%C2%B5");
    }

    #[test]
    fn writes_a_configuration_prometheus_reads() {
        let rules = [PathBuf::from("/x/rules.yaml")];
        let config = Config {
            interval: Duration::from_secs(1),
            target: ScrapeTarget {
                secure: None,
                job: "tracer",
                address: "127.0.0.1:9477",
                labels: &[("cluster", "lab"), ("node", "ip-10-0-1-10")],
            },
            rule_files: &rules,
        };
        assert_eq!(
            config.to_yaml(),
            "global:\n  scrape_interval: 1000ms\n  scrape_timeout: 1000ms\n  evaluation_interval: 1000ms\n\
             rule_files:\n  - \"/x/rules.yaml\"\n\
             scrape_configs:\n  - job_name: \"tracer\"\n    static_configs:\n      - targets: [\"127.0.0.1:9477\"]\n        labels:\n          cluster: \"lab\"\n          node: \"ip-10-0-1-10\"\n"
        );
    }

    #[test]
    fn reads_vectors_and_matrices() {
        let vector: Value = serde_json::from_str(
            r#"{"resultType":"vector","result":[{"metric":{"path":"a"},"value":[1,"2.5"]}]}"#,
        )
        .unwrap();
        let read = series(&vector, "value").unwrap();
        assert_eq!(read[0].labels["path"], "a");
        assert_eq!(read[0].values, [2.5]);
        let matrix: Value = serde_json::from_str(
            r#"{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"],[2,"NaN"],[3,"+Inf"]]}]}"#,
        )
        .unwrap();
        let values = &series(&matrix, "values").unwrap()[0].values;
        assert_eq!(values[0], 1.0);
        assert!(values[1].is_nan() && values[2].is_infinite());
    }
}

//! Reading the agent's HTTP endpoints from inside the lab's node namespace, and parsing the
//! Prometheus text format into samples the demo and the tests can query.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, anyhow};

use crate::lab::{exec, http};

/// `GET path` on `addr` from inside network namespace `ns`; returns (status, body).
///
/// The request runs on a dedicated thread that joins the namespace, so the caller's own
/// namespace never changes.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    exec::within(ns, move || {
        let timeout = Duration::from_secs(5);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let response = http::read_response(&mut stream)
            .with_context(|| format!("reading the answer of {addr}{path}"))?;
        Ok((response.status, response.body))
    })
}

/// One sample of the exposition: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus / OpenMetrics text format (the subset the agent writes).
pub fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("malformed sample line {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("malformed value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))?),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| anyhow!("malformed labels {text:?}"))?;
        let end = after
            .find('"')
            .ok_or_else(|| anyhow!("unterminated label value in {text:?}"))?;
        labels.insert(name.to_owned(), after[..end].to_owned());
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

/// Sum of the samples named `name` whose labels include every pair of `matching`.
pub fn sum(samples: &[Sample], name: &str, matching: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            matching
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .sum()
}

/// Whether `counted` L3 bytes account for `payload` bytes sent: at least the payload, at most
/// the payload plus generous header overhead (TCP/IP headers, handshakes, retransmissions).
pub fn counts_payload(counted: f64, payload: u64) -> bool {
    counted >= payload as f64 && counted <= payload as f64 * 1.25 + 20_000.0
}

#[cfg(test)]
mod tests {
    use tracer_common::labels::Path;

    use super::*;

    #[test]
    fn parses_the_agents_format() {
        let text = "# HELP tracer_path_bytes Bytes.\n# TYPE tracer_path_bytes counter\n\
                    tracer_path_bytes_total{path=\"pod_to_external\",endpoint=\"\",nat=\"snat\",direction=\"forward\"} 1500\n\
                    tracer_path_bytes_total{path=\"pod_to_external\",endpoint=\"\",nat=\"snat\",direction=\"reply\"} 60\n\
                    tracer_flow_table_entries 3\n# EOF\n";
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(
            sum(
                &samples,
                "tracer_path_bytes_total",
                &[("path", Path::PodToExternal.as_str())]
            ),
            1560.0
        );
        assert_eq!(
            sum(
                &samples,
                "tracer_path_bytes_total",
                &[("direction", "forward")]
            ),
            1500.0
        );
        assert_eq!(sum(&samples, "tracer_flow_table_entries", &[]), 3.0);
        assert!(parse("tracer_x{a=\"1\" nonsense").is_err());
    }
}

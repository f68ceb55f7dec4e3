//! Reading a running agent's JSON API with a minimal HTTP/1.0 client: one GET per body, on
//! loopback or the node's network, so no HTTP library is needed.
use std::{fmt, io, str::FromStr, time::Duration};

use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::Reading;
use crate::serve::api::{self, FlowsResponse, PathsResponse};

/// An agent's base URL: `http://HOST:PORT[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    host: String,
    port: u16,
    /// Path before `/api/v1/…`, without a trailing slash (empty for the agent itself; set
    /// behind a proxy).
    prefix: String,
}

impl FromStr for AgentUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| format!("{text:?}: the agent URL must start with http://"))?;
        let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                let port = port
                    .parse()
                    .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
                (host, port)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            prefix: prefix
                .trim_end_matches('/')
                .split('/')
                .filter(|part| !part.is_empty())
                .map(|part| format!("/{part}"))
                .collect(),
        })
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nothing answers there: the caller may run the datapath itself instead.
    #[error("no agent answers at {url}: {source}")]
    Unreachable { url: String, source: io::Error },
    #[error("the agent at {url} answered {path} with HTTP {status}: {body}")]
    Status {
        url: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("the agent at {url} sent {path} in a form this tracer top cannot read: {reason}")]
    Malformed {
        url: String,
        path: String,
        reason: String,
    },
}

/// Longest wait for one answer; the agent answers from memory, in microseconds.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest body read: 1000 flows are about 500 kB.
const MAX_RESPONSE: u64 = 16 << 20;

/// Reads the JSON API of a running agent.
pub(super) struct AgentClient {
    url: AgentUrl,
    /// How many flows to ask for.
    limit: u32,
}

impl AgentClient {
    pub(super) fn new(url: AgentUrl, limit: u32) -> Self {
        Self { url, limit }
    }

    pub(super) fn url(&self) -> &AgentUrl {
        &self.url
    }

    pub(super) async fn read(&self) -> Result<Reading, FetchError> {
        let paths: PathsResponse = self.get(api::PATHS).await?;
        let flows: FlowsResponse = self
            .get(&format!("{}?limit={}", api::FLOWS, self.limit))
            .await?;
        Ok(Reading { paths, flows })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, FetchError> {
        let url = self.url.to_string();
        let (status, body) = tokio::time::timeout(TIMEOUT, self.exchange(path))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer within 2 s",
                ))
            })
            .map_err(|source| FetchError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let malformed = |reason: String| FetchError::Malformed {
            url: url.clone(),
            path: path.to_owned(),
            reason,
        };
        let status = status.ok_or_else(|| malformed("not an HTTP answer".to_owned()))?;
        let body = String::from_utf8(body).map_err(|_| malformed("not UTF-8".to_owned()))?;
        if status != 200 {
            return Err(FetchError::Status {
                url,
                path: path.to_owned(),
                status,
                body: body.trim().chars().take(200).collect(),
            });
        }
        serde_json::from_str(&body).map_err(|error| malformed(error.to_string()))
    }

    /// One HTTP/1.0 exchange: the server closes the connection after the body, so the body is
    /// everything after the header (never chunked: HTTP/1.0 has no chunks). Returns the status
    /// (None when the answer is not HTTP) and the body.
    async fn exchange(&self, path: &str) -> io::Result<(Option<u16>, Vec<u8>)> {
        let mut stream = TcpStream::connect((self.url.host.as_str(), self.url.port)).await?;
        let request = format!(
            "GET {}{path} HTTP/1.0\r\nHost: {}:{}\r\nAccept: application/json\r\n\r\n",
            self.url.prefix, self.url.host, self.url.port
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut answer).await?;
        Ok(parse_answer(answer))
    }
}

fn parse_answer(mut answer: Vec<u8>) -> (Option<u16>, Vec<u8>) {
    let Some(end) = answer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return (None, answer);
    };
    let status = std::str::from_utf8(&answer[..end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok());
    let body = answer.split_off(end + 4);
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls() {
        let url: AgentUrl = "http://127.0.0.1:9477".parse().unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.prefix.as_str()),
            ("127.0.0.1", 9477, "")
        );
        assert_eq!(url.to_string(), "http://127.0.0.1:9477");
        let url: AgentUrl = "http://[fd00::1]:8080/tracer/".parse().unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.prefix.as_str()),
            ("fd00::1", 8080, "/tracer")
        );
        assert_eq!(url.to_string(), "http://[fd00::1]:8080/tracer");
        let url: AgentUrl = "http://localhost".parse().unwrap();
        assert_eq!(url.port, 80);
        for bad in [
            "127.0.0.1:9477",
            "https://x:1",
            "http://:9477",
            "http://x:port",
        ] {
            assert!(bad.parse::<AgentUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn answers() {
        let answer = b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":1}".to_vec();
        assert_eq!(parse_answer(answer), (Some(200), b"{\"a\":1}".to_vec()));
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH".to_vec()).0, None);
    }

    /// A real exchange with a stand-in on loopback: a 404 is an answer (an agent too old for
    /// the API), a closed port is no agent.
    #[tokio::test]
    async fn statuses_and_silence_are_told_apart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")
                .await
                .unwrap();
        });
        let client = AgentClient::new(format!("http://127.0.0.1:{port}").parse().unwrap(), 20);
        let error = client.read().await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Status { status: 404, body, .. } if body == "not found"),
            "{error}"
        );
        // The stand-in served one connection and is gone: nothing listens any more.
        let error = client.read().await.unwrap_err();
        assert!(matches!(error, FetchError::Unreachable { .. }), "{error}");
    }
}

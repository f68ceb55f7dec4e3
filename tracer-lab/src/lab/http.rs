//! Just enough HTTP/1.1 for the lab: one request per connection (`Connection: close`), for the
//! external host on the internet, IMDS and their clients.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddrV4, TcpStream},
};

use anyhow::{Context as _, bail, ensure};

use super::{sink::write_payload, traffic::Report};

/// Bounds on what a peer may send before the body: the lab's requests are tiny.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

pub(crate) struct Request {
    pub method: String,
    pub path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    /// A header's value; names are case-insensitive.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn content_length(&self) -> anyhow::Result<u64> {
        self.header("Content-Length")
            .map_or(Ok(0), |value| value.parse().context("bad Content-Length"))
    }
}

/// Reads a request line and headers; the body, if any, is left in `reader`.
pub(crate) fn read_request(reader: &mut impl BufRead) -> anyhow::Result<Request> {
    let head = read_head(reader)?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (words.next(), words.next(), words.next())
    else {
        bail!("malformed request line {request_line:?}");
    };
    ensure!(
        version.starts_with("HTTP/1."),
        "unsupported version {version:?}"
    );
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
    })
}

/// Everything up to the blank line that ends the head, bounded by [`MAX_HEAD_BYTES`].
fn read_head(reader: &mut impl BufRead) -> anyhow::Result<String> {
    let mut head = String::new();
    loop {
        let before = head.len();
        let read = reader
            .by_ref()
            .take((MAX_HEAD_BYTES - before) as u64)
            .read_line(&mut head)?;
        ensure!(read > 0, "the connection ended inside the head");
        if head[before..].trim_end_matches(['\r', '\n']).is_empty() {
            return Ok(head);
        }
        ensure!(
            head.len() < MAX_HEAD_BYTES,
            "head longer than {MAX_HEAD_BYTES} bytes"
        );
    }
}

/// Writes a complete response with `Content-Length` and `Connection: close`.
pub(crate) fn write_response(
    out: &mut impl Write,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

/// The external host on the internet: `POST /upload` reads and counts the body, `GET /` greets.
pub(crate) fn external_host(stream: TcpStream) -> anyhow::Result<()> {
    let mut reader = BufReader::new(&stream);
    let request = read_request(&mut reader)?;
    let (status, body) = match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/upload") => {
            let expected = request.content_length()?;
            let received = io::copy(&mut reader.by_ref().take(expected), &mut io::sink())?;
            if received == expected {
                (200, format!("received {received} bytes\n"))
            } else {
                (
                    400,
                    format!("body ended after {received} of {expected} bytes\n"),
                )
            }
        }
        ("GET", "/") => (200, "hello from the internet\n".to_owned()),
        _ => (404, "not found\n".to_owned()),
    };
    write_response(&mut &stream, status, &[], &body)?;
    Ok(())
}

pub(crate) struct Response {
    pub status: u16,
    pub body: String,
}

/// One request on a fresh connection, counted in `report` (connection outcome, bytes written);
/// `body_bytes` bytes of payload follow the head. `None` when there was no connection or the
/// exchange failed (recorded in `report`).
pub(crate) fn request(
    report: &mut Report,
    attempt: u32,
    to: SocketAddrV4,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body_bytes: u64,
) -> Option<Response> {
    let mut stream = report.connect(attempt, to)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        to.ip()
    );
    if body_bytes > 0 || method == "POST" || method == "PUT" {
        head += &format!("Content-Length: {body_bytes}\r\n");
    }
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    match exchange(&mut stream, &head, body_bytes, &mut report.payload_bytes) {
        Ok(response) => Some(response),
        Err(error) => {
            report.transfer_failed(attempt, error);
            None
        }
    }
}

/// `POST /upload` of `bytes` bytes, `connections` times; the external host must confirm the
/// count.
pub(crate) fn upload_client(to: SocketAddrV4, connections: u32, bytes: u64) -> Report {
    let mut report = Report::new(to);
    let expected = format!("received {bytes} bytes\n");
    for attempt in 1..=connections {
        match request(&mut report, attempt, to, "POST", "/upload", &[], bytes) {
            Some(response) if response.status == 200 && response.body == expected => {}
            Some(response) => report.transfer_failed(
                attempt,
                format!(
                    "the external host answered {}: {}",
                    response.status,
                    response.body.trim()
                ),
            ),
            None => {}
        }
    }
    report
}

/// Writes the head and the body, counting into `written`, and reads the whole response.
fn exchange(
    stream: &mut TcpStream,
    head: &str,
    body_bytes: u64,
    written: &mut u64,
) -> anyhow::Result<Response> {
    stream.write_all(head.as_bytes())?;
    *written += head.len() as u64;
    write_payload(stream, body_bytes, written)?;
    read_response(stream)
}

/// Reads a whole response (the server closes the connection), at most 1 MiB of it.
pub(crate) fn read_response(stream: &mut impl Read) -> anyhow::Result<Response> {
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the response has no complete head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(|| format!("malformed status line in {head:?}"))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_is_parsed_and_the_body_left_to_read() {
        let mut input: &[u8] =
            b"PUT /latest/api/token HTTP/1.1\r\nx-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 3\r\n\r\nabc";
        let request = read_request(&mut input).unwrap();
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("PUT", "/latest/api/token")
        );
        assert_eq!(
            request.header("X-aws-ec2-metadata-token-ttl-seconds"),
            Some("60")
        );
        assert_eq!(request.content_length().unwrap(), 3);
        assert_eq!(input, b"abc");
    }

    #[test]
    fn a_response_round_trips() {
        let mut raw = Vec::new();
        write_response(&mut raw, 404, &[("X-Extra", "1")], "not found\n").unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Content-Length: 10\r\n") && text.contains("X-Extra: 1\r\n"));
        let response = parse_response(&raw).unwrap();
        assert_eq!(
            (response.status, response.body.as_str()),
            (404, "not found\n")
        );
    }

    #[test]
    fn a_truncated_head_is_an_error() {
        assert!(read_request(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n"[..]).is_err());
        assert!(read_request(&mut &b"nonsense\r\n\r\n"[..]).is_err());
    }
}

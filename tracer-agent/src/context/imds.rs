//! The EC2 instance metadata service (IMDS), read at start-up (and again until it answers) so
//! that nothing about the VPC — its CIDR blocks, the subnet, the node's ENIs — has to be
//! configured by hand.
//!
//! A deliberately tiny blocking HTTP/1.1 client: IMDS answers a handful of short plain-text
//! documents on a link-local address, so a full HTTP stack would buy nothing. Every exchange is
//! bounded in time and size.
use std::{
    fmt::Display,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    str::FromStr,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::context::cidr::Cidr;

/// What IMDS says about this node and its VPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeMetadata {
    pub instance_id: String,
    pub availability_zone: String,
    /// The primary private IP: the address pod egress is SNATed to.
    pub local_ipv4: Ipv4Addr,
    /// The VPC's IPv4 CIDR blocks (a VPC can have several).
    pub vpc_cidrs: Vec<Cidr>,
    /// The subnet of the primary ENI.
    pub subnet_cidr: Cidr,
    /// Every ENI attached to the instance, by device number (0 is the primary).
    pub interfaces: Vec<Interface>,
}

/// An ENI attached to the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Interface {
    pub mac: String,
    pub interface_id: String,
    pub device_number: u32,
    /// The primary and secondary IPs; the VPC CNI hands the secondary ones to pods.
    pub local_ipv4s: Vec<Ipv4Addr>,
}

/// What went wrong with IMDS, worded as the cause in a sentence that names IMDS and its
/// address ("IMDS at … has not given …: connection refused").
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImdsError {
    /// The connection failed: refused, reset, unreachable.
    #[error("{}", connection_failure(.source))]
    Unreachable { path: String, source: io::Error },
    #[error("timed out after {}", seconds(*.timeout))]
    Timeout { path: String, timeout: Duration },
    #[error("HTTP status {status} for {path}")]
    Http { path: String, status: u16 },
    #[error("malformed answer to {path}: {what}")]
    Malformed { path: String, what: String },
}

/// IMDS answers in milliseconds; a second means it is not there (not on EC2, or blocked).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the agent waits before asking IMDS again after a failure.
pub(crate) const RETRY: Duration = Duration::from_secs(5);

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Six hours, the usual TTL; the token is used within one `fetch`.
const TOKEN_TTL_SECONDS: &str = "21600";
const METADATA_PATH: &str = "/latest/meta-data/";
/// Lists the instance's ENIs, one MAC per line with a trailing '/'.
const MACS: &str = "network/interfaces/macs/";
/// Every document we read is a few hundred bytes; anything larger is not IMDS.
const MAX_RESPONSE: usize = 64 * 1024;

/// A blocking IMDS client; each request gets `timeout` in all (connect, write and read).
#[derive(Clone, Debug)]
pub(crate) struct ImdsClient {
    base: SocketAddr,
    timeout: Duration,
}

impl ImdsClient {
    pub(crate) fn new(base: SocketAddr, timeout: Duration) -> Self {
        Self { base, timeout }
    }

    /// IMDSv2 first (a session token from `PUT /latest/api/token`, sent with every GET); falls
    /// back to IMDSv1 (no token) when the PUT is refused with 403/404/405 or times out, as on
    /// instances or proxies that do not speak v2.
    pub(crate) fn fetch(&self) -> Result<NodeMetadata, ImdsError> {
        let token = self.token()?;
        let session = Session {
            client: self,
            token: token.as_deref(),
        };
        session.node_metadata()
    }

    fn token(&self) -> Result<Option<String>, ImdsError> {
        let ttl = [
            (TOKEN_TTL_HEADER, TOKEN_TTL_SECONDS),
            ("Content-Length", "0"),
        ];
        match self.request("PUT", TOKEN_PATH, &ttl) {
            Ok(Response { status: 200, body }) => {
                let token = text(TOKEN_PATH, body)?.trim().to_owned();
                // The token goes back into a header: it must not be able to end it.
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(malformed(TOKEN_PATH, "the token is empty or not printable"));
                }
                Ok(Some(token))
            }
            Ok(Response {
                status: status @ 403..=405, // forbidden, not found, method not allowed
                ..
            }) => {
                tracing::debug!(status, "IMDSv2 token refused; falling back to IMDSv1");
                Ok(None)
            }
            Ok(Response { status, .. }) => Err(ImdsError::Http {
                path: TOKEN_PATH.to_owned(),
                status,
            }),
            Err(ImdsError::Timeout { .. }) => {
                tracing::debug!("IMDSv2 token request timed out; falling back to IMDSv1");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// One HTTP/1.1 exchange on a fresh connection, within the client's timeout.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response, ImdsError> {
        let deadline = Instant::now() + self.timeout;
        let io_error = |source: io::Error| match source.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ImdsError::Timeout {
                path: path.to_owned(),
                timeout: self.timeout,
            },
            _ => ImdsError::Unreachable {
                path: path.to_owned(),
                source,
            },
        };
        let mut stream = TcpStream::connect_timeout(&self.base, self.timeout).map_err(io_error)?;
        let headers: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{headers}\r\n",
            self.base
        );
        stream
            .set_write_timeout(Some(remaining(deadline).map_err(io_error)?))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(io_error)?;

        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(response) =
                parse_response(&received, false).map_err(|what| malformed(path, what))?
            {
                return Ok(response);
            }
            stream
                .set_read_timeout(Some(remaining(deadline).map_err(io_error)?))
                .map_err(io_error)?;
            let read = stream.read(&mut chunk).map_err(io_error)?;
            if read == 0 {
                return parse_response(&received, true)
                    .map_err(|what| malformed(path, what))?
                    .ok_or_else(|| {
                        malformed(path, "connection closed in the middle of the headers")
                    });
            }
            if received.len() + read > MAX_RESPONSE {
                return Err(malformed(path, "response larger than 64 KiB"));
            }
            received.extend_from_slice(&chunk[..read]);
        }
    }
}

/// A token (or none, for IMDSv1) and the requests that use it.
struct Session<'a> {
    client: &'a ImdsClient,
    token: Option<&'a str>,
}

impl Session<'_> {
    fn node_metadata(&self) -> Result<NodeMetadata, ImdsError> {
        let primary_mac = self.get("mac")?;
        let primary_mac = mac_address("mac", primary_mac.trim())?;
        let mut interfaces = self
            .lines(MACS)?
            .iter()
            .map(|line| self.interface(mac_address(MACS, line.trim_end_matches('/'))?))
            .collect::<Result<Vec<_>, _>>()?;
        interfaces.sort_by_key(|interface| interface.device_number);
        Ok(NodeMetadata {
            instance_id: self.get("instance-id")?.trim().to_owned(),
            availability_zone: self.get("placement/availability-zone")?.trim().to_owned(),
            local_ipv4: self.parse("local-ipv4")?,
            vpc_cidrs: self.vpc_cidrs(primary_mac)?,
            subnet_cidr: self.parse(&eni_document(primary_mac, "subnet-ipv4-cidr-block"))?,
            interfaces,
        })
    }

    /// The VPC's CIDR blocks: its IPv4 blocks (at least one: a VPC without any is not an
    /// answer), then its IPv6 blocks, which a dual-stack VPC (every IPv6 EKS cluster's) has
    /// and IMDS answers 404 for where there are none.
    fn vpc_cidrs(&self, primary_mac: &str) -> Result<Vec<Cidr>, ImdsError> {
        let document = eni_document(primary_mac, "vpc-ipv4-cidr-blocks");
        let mut cidrs = self.parse_lines(&document)?;
        if cidrs.is_empty() {
            return Err(malformed(&metadata_path(&document), "no CIDR block"));
        }
        match self.parse_lines::<Cidr>(&eni_document(primary_mac, "vpc-ipv6-cidr-blocks")) {
            Ok(ipv6) => cidrs.extend(ipv6),
            Err(ImdsError::Http { status: 404, .. }) => {}
            Err(error) => return Err(error),
        }
        Ok(cidrs)
    }

    fn interface(&self, mac: &str) -> Result<Interface, ImdsError> {
        Ok(Interface {
            mac: mac.to_owned(),
            interface_id: self
                .get(&eni_document(mac, "interface-id"))?
                .trim()
                .to_owned(),
            device_number: self.parse(&eni_document(mac, "device-number"))?,
            local_ipv4s: self.parse_lines(&eni_document(mac, "local-ipv4s"))?,
        })
    }

    fn get(&self, document: &str) -> Result<String, ImdsError> {
        let path = metadata_path(document);
        let token = self.token.map(|token| (TOKEN_HEADER, token));
        match self.client.request("GET", &path, token.as_slice())? {
            Response { status: 200, body } => text(&path, body),
            Response { status, .. } => Err(ImdsError::Http { path, status }),
        }
    }

    /// The non-empty lines of a document.
    fn lines(&self, document: &str) -> Result<Vec<String>, ImdsError> {
        Ok(self
            .get(document)?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn parse<T: FromStr<Err: Display>>(&self, document: &str) -> Result<T, ImdsError> {
        parse_value(document, self.get(document)?.trim())
    }

    fn parse_lines<T: FromStr<Err: Display>>(&self, document: &str) -> Result<Vec<T>, ImdsError> {
        self.lines(document)?
            .iter()
            .map(|line| parse_value(document, line))
            .collect()
    }
}

/// The VPC's CIDR blocks as IMDS gave them, or why it has not yet (an [`ImdsError`] in words).
pub(crate) type VpcCidrs = Result<Vec<Cidr>, String>;

/// Asks IMDS for the VPC's CIDR blocks in a thread of its own (the client blocks), every
/// [`RETRY`] until it answers, publishing each attempt's outcome: the cause of the latest
/// failure is what readiness shows. The thread ends with the answer, or when the receiver is
/// dropped.
pub(crate) fn spawn_vpc_lookup(client: ImdsClient) -> watch::Receiver<VpcCidrs> {
    let (sender, receiver) = watch::channel(Err("no answer yet".to_owned()));
    std::thread::spawn(move || {
        loop {
            let answer = client.fetch().map(|metadata| metadata.vpc_cidrs);
            let answered = answer.is_ok();
            // Sending fails once the receiver is gone: nobody is waiting any more.
            let sent = sender.send(answer.map_err(|error| error.to_string()));
            if answered || sent.is_err() {
                return;
            }
            std::thread::sleep(RETRY);
        }
    });
    receiver
}

/// The readiness sentence while the VPC CIDRs are missing: where they were asked, the latest
/// cause, and what the agent and the operator can do about it.
pub(crate) fn vpc_cidrs_missing(imds: SocketAddr, cause: &str) -> String {
    format!(
        "IMDS at {imds} has not given the VPC CIDRs: {cause} (retrying every {}; or pass --vpc-cidr); until then remote and external traffic is labelled unknown",
        seconds(RETRY)
    )
}

/// A connection failure in words (`connection refused`), without the OS error number.
fn connection_failure(error: &io::Error) -> String {
    use io::ErrorKind as Kind;
    match error.kind() {
        kind @ (Kind::ConnectionRefused
        | Kind::ConnectionReset
        | Kind::ConnectionAborted
        | Kind::HostUnreachable
        | Kind::NetworkUnreachable
        | Kind::NetworkDown) => kind.to_string(),
        _ => error.to_string(),
    }
}

/// A duration as people say it: `1 s`, `0.5 s`.
fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// The request path of a metadata document.
fn metadata_path(document: &str) -> String {
    format!("{METADATA_PATH}{document}")
}

/// The document of one ENI.
fn eni_document(mac: &str, document: &str) -> String {
    format!("{MACS}{mac}/{document}")
}

fn parse_value<T: FromStr<Err: Display>>(document: &str, value: &str) -> Result<T, ImdsError> {
    value
        .parse()
        .map_err(|error| malformed(&metadata_path(document), format!("{value:?}: {error}")))
}

/// A MAC address as IMDS writes it (`0e:12:34:56:78:9a`); checked because it becomes part of
/// the next request paths.
fn mac_address<'a>(document: &str, mac: &'a str) -> Result<&'a str, ImdsError> {
    let valid = mac.len() == 17
        && mac
            .split(':')
            .all(|octet| octet.len() == 2 && octet.bytes().all(|b| b.is_ascii_hexdigit()));
    if valid {
        Ok(mac)
    } else {
        Err(malformed(
            &metadata_path(document),
            format!("{mac:?} is not a MAC address"),
        ))
    }
}

fn text(path: &str, body: Vec<u8>) -> Result<String, ImdsError> {
    String::from_utf8(body).map_err(|_| malformed(path, "body is not UTF-8"))
}

fn malformed(path: &str, what: impl Into<String>) -> ImdsError {
    ImdsError::Malformed {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// Time left before `deadline`; a timeout error once it has passed.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// Parses what has been received so far: `Ok(None)` while more is needed. With Content-Length
/// the response is complete once that many body bytes are in; without it, at end of stream.
fn parse_response(received: &[u8], at_eof: bool) -> Result<Option<Response>, String> {
    let Some(head_len) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&received[..head_len]).map_err(|_| "headers are not UTF-8")?;
    let body = &received[head_len + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..]
            if version.starts_with("HTTP/1.")
                && code.len() == 3
                && code.bytes().all(|b| b.is_ascii_digit()) =>
        {
            code.parse::<u16>().ok()
        }
        _ => None,
    }
    .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unsupported Transfer-Encoding {value:?}"));
        }
    }
    let body = match content_length {
        Some(length) if body.len() >= length => Some(&body[..length]),
        Some(length) if at_eof => {
            return Err(format!("body ended after {} of {length} bytes", body.len()));
        }
        Some(_) => None,
        None => at_eof.then_some(body),
    };
    Ok(body.map(|body| Response {
        status,
        body: body.to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::HashMap,
        io::BufRead as _,
        io::BufReader,
        net::TcpListener,
        sync::{Arc, Mutex},
        thread,
    };

    const TOKEN: &str = "AQAEAFakeToken==";
    const MAC0: &str = "0e:00:00:00:00:01";
    const MAC1: &str = "0e:00:00:00:00:02";

    /// How the stand-in IMDS answers the token PUT.
    #[derive(Clone, Copy)]
    enum TokenMode {
        /// IMDSv2 required: GETs without the token get 401.
        Required,
        /// v2 unsupported: the PUT gets this status, GETs need no token.
        Refused(u16),
        /// The PUT is never answered (as with a hop limit of 1 from a container).
        Hang,
    }

    /// One request as the server saw it.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path: String,
        headers: HashMap<String, String>,
    }

    /// The full path of an ENI's document.
    fn eni(mac: &str, document: &str) -> String {
        metadata_path(&eni_document(mac, document))
    }

    /// The documents of an instance with two ENIs, the secondary listed first.
    fn documents() -> HashMap<String, String> {
        let plain = [
            ("instance-id", "i-0123456789abcdef0"),
            ("placement/availability-zone", "eu-west-1a"),
            ("local-ipv4", "10.0.0.10"),
            ("mac", MAC0),
        ]
        .map(|(document, body)| (metadata_path(document), body));
        let enis = [
            (eni(MAC0, "interface-id"), "eni-000a"),
            (eni(MAC0, "device-number"), "0"),
            (eni(MAC0, "local-ipv4s"), "10.0.0.10\n10.0.0.11\n10.0.0.12"),
            (
                eni(MAC0, "vpc-ipv4-cidr-blocks"),
                "10.0.0.0/16\n100.64.0.0/16\n",
            ),
            (eni(MAC0, "subnet-ipv4-cidr-block"), "10.0.0.0/24"),
            (eni(MAC1, "interface-id"), "eni-000b"),
            (eni(MAC1, "device-number"), "1"),
            (eni(MAC1, "local-ipv4s"), "10.0.0.20"),
        ];
        let macs = (metadata_path(MACS), format!("{MAC1}/\n{MAC0}/"));
        plain
            .into_iter()
            .chain(enis)
            .map(|(path, body)| (path, body.to_owned()))
            .chain([macs])
            .collect()
    }

    /// A stand-in IMDS on a loopback port: serves `documents` as IMDS does (one request per
    /// connection, `Connection: close`) and records what it was asked.
    fn serve(
        mode: TokenMode,
        documents: HashMap<String, String>,
    ) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        thread::spawn(move || {
            let mut unanswered = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let request = read_request(&stream);
                let (status, body) = answer(mode, &documents, &request);
                log.lock().unwrap().push(request);
                match status {
                    Some(status) => write_response(&stream, status, &body),
                    // Keep the connection open without answering.
                    None => unanswered.push(stream),
                }
            }
        });
        (addr, seen)
    }

    fn read_request(stream: &TcpStream) -> Seen {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let Some((name, value)) = line.trim_end().split_once(": ") else {
                break;
            };
            headers.insert(name.to_ascii_lowercase(), value.to_owned());
        }
        Seen {
            method,
            path,
            headers,
        }
    }

    /// Status (None: never answer) and body for a request.
    fn answer(
        mode: TokenMode,
        documents: &HashMap<String, String>,
        request: &Seen,
    ) -> (Option<u16>, String) {
        let token = request.headers.get(&TOKEN_HEADER.to_ascii_lowercase());
        match (mode, request.method.as_str()) {
            (TokenMode::Required, "PUT") => (Some(200), TOKEN.to_owned()),
            (TokenMode::Refused(status), "PUT") => (Some(status), String::new()),
            (TokenMode::Hang, "PUT") => (None, String::new()),
            (TokenMode::Required, _) if token.map(String::as_str) != Some(TOKEN) => {
                (Some(401), String::new())
            }
            _ => match documents.get(&request.path) {
                Some(body) => (Some(200), body.clone()),
                None => (Some(404), String::new()),
            },
        }
    }

    fn write_response(mut stream: &TcpStream, status: u16, body: &str) {
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
    }

    fn client(addr: SocketAddr) -> ImdsClient {
        ImdsClient::new(addr, Duration::from_millis(500))
    }

    fn expected() -> NodeMetadata {
        NodeMetadata {
            instance_id: "i-0123456789abcdef0".to_owned(),
            availability_zone: "eu-west-1a".to_owned(),
            local_ipv4: Ipv4Addr::new(10, 0, 0, 10),
            vpc_cidrs: vec![
                "10.0.0.0/16".parse().unwrap(),
                "100.64.0.0/16".parse().unwrap(),
            ],
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            interfaces: vec![
                Interface {
                    mac: MAC0.to_owned(),
                    interface_id: "eni-000a".to_owned(),
                    device_number: 0,
                    local_ipv4s: vec![
                        Ipv4Addr::new(10, 0, 0, 10),
                        Ipv4Addr::new(10, 0, 0, 11),
                        Ipv4Addr::new(10, 0, 0, 12),
                    ],
                },
                Interface {
                    mac: MAC1.to_owned(),
                    interface_id: "eni-000b".to_owned(),
                    device_number: 1,
                    local_ipv4s: vec![Ipv4Addr::new(10, 0, 0, 20)],
                },
            ],
        }
    }

    #[test]
    fn imdsv2_sends_the_token_with_every_get() {
        let (addr, seen) = serve(TokenMode::Required, documents());
        assert_eq!(client(addr).fetch().unwrap(), expected());
        let seen = seen.lock().unwrap();
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path.as_str()),
            ("PUT", TOKEN_PATH)
        );
        assert_eq!(
            seen[0].headers[&TOKEN_TTL_HEADER.to_ascii_lowercase()],
            "21600"
        );
        assert!(seen.len() > 10);
        for get in &seen[1..] {
            assert_eq!(get.method, "GET");
            assert_eq!(
                get.headers[&TOKEN_HEADER.to_ascii_lowercase()],
                TOKEN,
                "{}",
                get.path
            );
            assert_eq!(get.headers["connection"], "close");
        }
    }

    #[test]
    fn refused_token_falls_back_to_imdsv1() {
        for status in [403, 404, 405] {
            let (addr, seen) = serve(TokenMode::Refused(status), documents());
            assert_eq!(client(addr).fetch().unwrap(), expected());
            let seen = seen.lock().unwrap();
            assert!(
                seen[1..]
                    .iter()
                    .all(|get| !get.headers.contains_key(&TOKEN_HEADER.to_ascii_lowercase()))
            );
        }
    }

    #[test]
    fn unanswered_token_falls_back_to_imdsv1() {
        let (addr, _) = serve(TokenMode::Hang, documents());
        let started = Instant::now();
        assert_eq!(client(addr).fetch().unwrap(), expected());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn other_token_errors_are_reported() {
        let (addr, _) = serve(TokenMode::Refused(500), documents());
        let error = client(addr).fetch().unwrap_err();
        assert!(
            matches!(&error, ImdsError::Http { path, status: 500 } if path == TOKEN_PATH),
            "{error}"
        );
        assert_eq!(error.to_string(), "HTTP status 500 for /latest/api/token");
    }

    /// A dual-stack VPC (an IPv6 cluster's): its IPv6 blocks follow the IPv4 ones.
    #[test]
    fn ipv6_blocks_are_read_where_the_vpc_has_them() {
        let mut documents = documents();
        documents.insert(
            eni(MAC0, "vpc-ipv6-cidr-blocks"),
            "2600:1f14:abc:de00::/56\n".to_owned(),
        );
        let (addr, _) = serve(TokenMode::Required, documents);
        let mut expected = expected();
        expected
            .vpc_cidrs
            .push("2600:1f14:abc:de00::/56".parse().unwrap());
        assert_eq!(client(addr).fetch().unwrap(), expected);
    }

    #[test]
    fn missing_document_is_an_http_error() {
        let mut documents = documents();
        documents.remove(&metadata_path("instance-id"));
        let (addr, _) = serve(TokenMode::Required, documents);
        let error = client(addr).fetch().unwrap_err();
        assert!(
            matches!(&error, ImdsError::Http { status: 404, path } if path.ends_with("instance-id")),
            "{error}"
        );
    }

    #[test]
    fn bad_cidr_is_named() {
        let mut documents = documents();
        let path = eni(MAC0, "vpc-ipv4-cidr-blocks");
        documents.insert(path.clone(), "10.0.0.0/16\n10.1.0.5/16".to_owned());
        let (addr, _) = serve(TokenMode::Required, documents);
        let error = client(addr).fetch().unwrap_err();
        assert!(
            matches!(&error, ImdsError::Malformed { path: p, .. } if *p == path),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .starts_with(&format!("malformed answer to {path}: \"10.1.0.5/16\"")),
            "{error}"
        );
    }

    #[test]
    fn a_vpc_without_cidr_blocks_is_malformed() {
        let mut documents = documents();
        let path = eni(MAC0, "vpc-ipv4-cidr-blocks");
        documents.insert(path.clone(), "\n".to_owned());
        let (addr, _) = serve(TokenMode::Required, documents);
        let error = client(addr).fetch().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("malformed answer to {path}: no CIDR block")
        );
    }

    #[test]
    fn bad_mac_is_rejected_before_it_becomes_a_path() {
        let mut documents = documents();
        documents.insert(metadata_path(MACS), "../../x/".to_owned());
        let (addr, _) = serve(TokenMode::Required, documents);
        let error = client(addr).fetch().unwrap_err();
        assert!(matches!(error, ImdsError::Malformed { .. }), "{error}");
    }

    /// A server that answers every connection with the same raw bytes.
    fn serve_raw(response: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                read_request(&stream);
                let _ = (&stream).write_all(&response);
            }
        });
        addr
    }

    #[test]
    fn garbage_responses_are_malformed() {
        for garbage in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"HTTP/1.1 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\xff\xfe",
        ] {
            let error = client(serve_raw(garbage.to_vec())).fetch().unwrap_err();
            assert!(
                matches!(error, ImdsError::Malformed { .. }),
                "{garbage:?}: {error}"
            );
        }
    }

    #[test]
    fn oversized_response_is_malformed() {
        let mut huge = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        huge.resize(MAX_RESPONSE + 1, b'a');
        let error = client(serve_raw(huge)).fetch().unwrap_err();
        assert!(
            matches!(&error, ImdsError::Malformed { what, .. } if what.contains("64 KiB")),
            "{error}"
        );
    }

    #[test]
    fn silent_server_times_out_within_the_timeout() {
        // Never accepted: the kernel completes the handshake, nobody ever answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let error = client(addr).fetch().unwrap_err();
        assert!(
            matches!(&error, ImdsError::Timeout { path, .. } if path.ends_with("/mac")),
            "{error}"
        );
        assert_eq!(error.to_string(), "timed out after 0.5 s");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
    }

    #[test]
    fn dripping_server_times_out_within_the_timeout() {
        // Each byte arrives well within the timeout; the whole answer never does.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                thread::spawn(move || {
                    stream.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
                    while stream.write_all(b"X").is_ok() {
                        thread::sleep(Duration::from_millis(50));
                    }
                });
            }
        });
        let started = Instant::now();
        let error = client(addr).fetch().unwrap_err();
        assert!(matches!(error, ImdsError::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[test]
    fn closed_port_is_unreachable() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = client(addr).fetch().unwrap_err();
        assert!(matches!(error, ImdsError::Unreachable { .. }), "{error}");
        assert_eq!(error.to_string(), "connection refused");
    }

    #[test]
    fn the_missing_vpc_cidrs_sentence_names_imds_the_cause_and_the_way_out() {
        let imds = SocketAddr::from(([169, 254, 169, 254], 80));
        assert_eq!(
            vpc_cidrs_missing(imds, "timed out after 1 s"),
            "IMDS at 169.254.169.254:80 has not given the VPC CIDRs: timed out after 1 s \
             (retrying every 5 s; or pass --vpc-cidr); until then remote and external traffic \
             is labelled unknown"
        );
    }

    /// Waits up to 2 s for `lookup` to publish `expected`.
    async fn publishes(mut lookup: watch::Receiver<VpcCidrs>, expected: VpcCidrs) {
        let wait = lookup.wait_for(|answer| *answer == expected);
        let seen = tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_ok();
        assert!(
            seen,
            "{expected:?} not within 2 s; last {:?}",
            *lookup.borrow()
        );
    }

    #[tokio::test]
    async fn the_lookup_publishes_the_cause_or_the_answer() {
        // Nothing listens: the attempt is refused at once.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let refused = Err("connection refused".to_owned());
        publishes(spawn_vpc_lookup(client(closed)), refused).await;
        let (imds, _) = serve(TokenMode::Required, documents());
        publishes(spawn_vpc_lookup(client(imds)), Ok(expected().vpc_cidrs)).await;
    }

    #[test]
    fn response_parsing() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let response = Response {
            status: 200,
            body: b"hello".to_vec(),
        };
        assert_eq!(parse_response(full, false), Ok(Some(response)));
        assert_eq!(parse_response(&full[..full.len() - 1], false), Ok(None));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Len", false),
            Ok(None)
        );
        let no_length = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(no_length, false), Ok(None));
        assert_eq!(
            parse_response(no_length, true),
            Ok(Some(Response {
                status: 404,
                body: b"nope".to_vec()
            }))
        );
    }
}

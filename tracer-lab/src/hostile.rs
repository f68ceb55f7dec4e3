//! Hostile clients of the agent's HTTP server, run from a lab pod, and a watch of the agent
//! while they run (its memory, how long a scrape from the node takes): what the listener test
//! and `cargo xtask bench hostile` share.
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{agent::LabAgent, lab::exec};

/// How long a client waits for a connection to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Half a request head: the blank line that would end it never comes.
const HALF_REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: agent\r\n";

/// Bytes no HTTP server can parse. Not a TLS handshake either (those start with 0x16 and go to
/// the TLS side, under the same timeout).
const GARBAGE: &[u8] = b"\x00\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not http \xff\xfe\r\n\r\n";

/// Connections opened from a pod, each having sent what it sends.
pub struct Opened {
    /// Each connection and when its bytes were sent.
    streams: Vec<(TcpStream, Instant)>,
}

/// Opens `count` connections from namespace `ns` to `agent`, each sending half a request and
/// then nothing (a slow-loris client).
pub fn open_slow(ns: &str, agent: SocketAddr, count: usize) -> anyhow::Result<Opened> {
    open_sending(ns, agent, count, HALF_REQUEST)
}

/// Opens `count` connections from namespace `ns` to `agent`, each sending bytes that are not
/// HTTP.
pub fn open_garbage(ns: &str, agent: SocketAddr, count: usize) -> anyhow::Result<Opened> {
    open_sending(ns, agent, count, GARBAGE)
}

fn open_sending(
    ns: &str,
    agent: SocketAddr,
    count: usize,
    bytes: &'static [u8],
) -> anyhow::Result<Opened> {
    let streams = exec::within(ns, move || {
        let mut streams = Vec::with_capacity(count);
        for _ in 0..count {
            let mut stream = TcpStream::connect_timeout(&agent, CONNECT_TIMEOUT)
                .with_context(|| format!("connecting to {agent}"))?;
            // A connection the agent refused at once may be reset already: it is closed, as
            // `wait_closed` sees.
            if let Err(error) = stream.write_all(bytes)
                && !closed_by_peer(&error)
            {
                return Err(error).context("sending");
            }
            streams.push((stream, Instant::now()));
        }
        Ok(streams)
    })?;
    Ok(Opened { streams })
}

fn closed_by_peer(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

/// How the agent closed a set of hostile connections.
#[derive(Clone, Copy, Debug)]
pub struct Closing {
    pub connections: usize,
    /// Connections still open at the limit `wait_closed` was given.
    pub still_open: usize,
    /// The longest any connection stayed open after sending, as seen by its client (an
    /// upper bound: the connections are checked one after the other).
    pub slowest: Duration,
}

impl Opened {
    /// Waits until the agent has closed every connection, or until `limit` after the last
    /// one sent; then closes what is left.
    pub fn wait_closed(self, limit: Duration) -> anyhow::Result<Closing> {
        let deadline = self
            .streams
            .last()
            .map_or_else(Instant::now, |(_, sent)| *sent)
            + limit;
        let connections = self.streams.len();
        let mut still_open = 0;
        let mut slowest = Duration::ZERO;
        for (mut stream, sent) in self.streams {
            if wait_eof(&mut stream, deadline)? {
                slowest = slowest.max(sent.elapsed());
            } else {
                still_open += 1;
            }
        }
        Ok(Closing {
            connections,
            still_open,
            slowest,
        })
    }
}

/// Reads (an error answer, if any) until the peer closes: true, or false at `deadline`.
fn wait_eof(stream: &mut TcpStream, deadline: Instant) -> anyhow::Result<bool> {
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(error) if closed_by_peer(&error) => return Ok(true),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(error) => return Err(error).context("reading a hostile connection"),
        }
    }
}

/// Sends `requests` whole `GET /metrics` requests over plain HTTP from namespace `ns`, each
/// on a connection of its own, from `clients` threads at once; returns how many got each
/// status (0: no answer). A pod without a token is answered 403 by default.
pub fn flood(
    ns: &str,
    agent: SocketAddr,
    clients: usize,
    requests: usize,
) -> anyhow::Result<BTreeMap<u16, usize>> {
    let per_client = requests.div_ceil(clients);
    thread::scope(|scope| {
        // Every client started before any is waited for: they send at once.
        let mut workers = Vec::with_capacity(clients);
        for _ in 0..clients {
            workers.push(scope.spawn(move || {
                exec::within(ns, move || {
                    (0..per_client)
                        .map(|_| get_metrics(agent))
                        .collect::<anyhow::Result<Vec<u16>>>()
                })
            }));
        }
        let mut statuses = BTreeMap::new();
        for worker in workers {
            let Ok(answers) = worker.join() else {
                anyhow::bail!("a flood client panicked");
            };
            for status in answers? {
                *statuses.entry(status).or_default() += 1;
            }
        }
        Ok(statuses)
    })
}

/// The status of one `GET /metrics` over HTTP/1.0 (the answer read to its end).
fn get_metrics(agent: SocketAddr) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&agent, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        // Refused at once (over the per-client limit): no status.
        Err(error) if closed_by_peer(&error) => return Ok(0),
        Err(error) => return Err(error).context("reading an answer of the flood"),
    }
    let status = answer
        .split(|byte| *byte == b' ')
        .nth(1)
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse().ok());
    Ok(status.unwrap_or(0))
}

/// What the watch saw of the agent.
#[derive(Clone, Debug, Default)]
pub struct Watched {
    /// How long each scrape took, in the order taken.
    pub scrape_times: Vec<Duration>,
    /// Scrapes that failed or did not answer 200.
    pub failed_scrapes: Vec<String>,
    /// The highest resident memory seen, in KiB.
    pub rss_peak_kib: u64,
}

impl Watched {
    /// The slowest scrape.
    pub fn slowest_scrape(&self) -> Duration {
        self.scrape_times
            .iter()
            .copied()
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// The 99th percentile of the scrape times.
    pub fn scrape_p99(&self) -> Duration {
        let mut times = self.scrape_times.clone();
        times.sort_unstable();
        let rank = (times.len() * 99).div_ceil(100);
        times
            .get(rank.saturating_sub(1))
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

/// How often the watch scrapes and reads the agent's memory.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Runs `work` while scraping `/metrics` on the agent (from the node, on loopback) and
/// reading its resident memory every [`WATCH_INTERVAL`].
pub fn watching<T>(
    agent: &LabAgent,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Watched)> {
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let watch = scope.spawn(|| {
            let mut watched = Watched::default();
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                match agent.get("/metrics") {
                    Ok((200, _)) => watched.scrape_times.push(started.elapsed()),
                    Ok((status, _)) => watched.failed_scrapes.push(format!("answered {status}")),
                    Err(error) => watched.failed_scrapes.push(format!("{error:#}")),
                }
                if let Ok(memory) = agent.memory_kib() {
                    watched.rss_peak_kib = watched.rss_peak_kib.max(memory.rss_kib);
                }
                thread::sleep(WATCH_INTERVAL);
            }
            watched
        });
        let outcome = work();
        done.store(true, Ordering::Relaxed);
        let watched = watch
            .join()
            .map_err(|_| anyhow::anyhow!("the watch of the agent panicked"))?;
        Ok((outcome?, watched))
    })
}

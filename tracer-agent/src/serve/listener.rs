//! The accept loop of `--metrics-addr`: every connection is bounded in time, in size and in
//! number, so that no client (a hostile pod included) can hold the agent's memory or keep a
//! scrape from being answered. Each connection the agent refuses or cuts short is counted in
//! `tracer_http_connections_rejected_total{reason}`.
//!
//! One port serves both HTTP and HTTPS: a connection whose first byte opens a TLS handshake
//! is served over TLS, any other as plain HTTP, and every request carries a [`Peer`] saying
//! which, and whether the client is on the node's loopback — what [`access`] decides by.
//! The kubelet's probes and `tracer top` stay plain; scrapers with a token use HTTPS.
//!
//! [`access`]: super::access
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper::{
    server::conn::http1,
    service::{Service as _, service_fn},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tracer_common::label_enum;
use tracing::{debug, warn};

use crate::serve::access::Peer;

/// How long a client has to send a request's head once the agent waits for it. hyper starts
/// the same timer when a kept-alive connection waits for its next request, so this is the idle
/// keep-alive timeout too. A scrape sends its head in one packet at once: 5 s leaves room for
/// a slow network and still frees a connection that sends half a request within seconds.
/// A new connection has as long again for its first byte and, over TLS, its handshake.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection lives before the agent closes it after the request in flight: a
/// client that asks for `/metrics` and never reads the answer would otherwise hold the answer
/// in memory forever. Prometheus reconnects at its next scrape; a minute is many scrapes.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long the request in flight has to finish after [`CONNECTION_LIFETIME`] before the
/// connection is cut: a large exposition over a slow link takes well under a second.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The most a connection buffers of a request, head included (hyper's smallest allowed
/// value). The API only answers GETs with short paths and no body: a legitimate request head
/// is a few hundred bytes, and a larger one is answered 431 and closed.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Connections served at once, all clients together; beyond it a connection is accepted and
/// closed at once. About 10 kB each while open (docs/performance.md): 512 bound the server to a
/// few MiB, far above what a node needs (a Prometheus or two, `tracer top`, a port-forward).
pub const MAX_CONNECTIONS: usize = 512;

/// Connections served at once to one client address: one pod opening thousands of
/// connections is refused beyond this, and leaves room under [`MAX_CONNECTIONS`] for the
/// others (Prometheus among them). A scraper needs one or two.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 32;

/// Connections the kernel queues before the agent accepts them (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default). A burst of connections beyond the queue has the
/// kernel drop their handshakes' last packet, and they reach the agent, to be refused or timed
/// out, only seconds later: tokio's default of 1024 let a burst of 10,000 from one pod stay
/// open up to 11 s.
const LISTEN_BACKLOG: u32 = 4096;

/// How long to wait before accepting again when accept fails (out of file descriptors):
/// retrying at once would spin a core.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Listens on `address` with a queue of [`LISTEN_BACKLOG`] connections.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted agent binds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves `app` on `listener`, over TLS with `tls` to clients that open with a handshake,
/// until the runtime stops.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: TlsAcceptor,
    rejected: RejectedConnections,
) {
    let open = OpenConnections::default();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES);
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!("cannot accept a connection on the metrics address: {error}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        match open.admit(client.ip()) {
            Ok(admitted) => {
                let connection = Connection {
                    builder: builder.clone(),
                    app: app.clone(),
                    tls: tls.clone(),
                    rejected: rejected.clone(),
                    client,
                };
                tokio::spawn(connection.serve(stream, admitted));
            }
            Err(reason) => {
                debug!(%client, reason = reason.as_str(), "connection refused");
                rejected.count(reason);
                drop(stream);
            }
        }
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    builder: http1::Builder,
    app: Router,
    tls: TlsAcceptor,
    rejected: RejectedConnections,
    client: SocketAddr,
}

impl Connection {
    /// Serves requests until the client closes, a limit closes the connection, or its
    /// lifetime ends; `_admitted` frees the connection's place when it goes.
    async fn serve(self, stream: TcpStream, _admitted: Admitted) {
        let loopback = self.client.ip().to_canonical().is_loopback();
        let opening = tokio::time::timeout(HEADER_READ_TIMEOUT, self.open(stream)).await;
        match opening {
            Ok(Ok(Some(Opened::Plain(stream)))) => {
                let peer = Peer {
                    loopback,
                    tls: false,
                };
                self.serve_http(stream, peer).await;
            }
            Ok(Ok(Some(Opened::Tls(stream)))) => {
                let peer = Peer {
                    loopback,
                    tls: true,
                };
                self.serve_http(*stream, peer).await;
            }
            // Closed before its first byte.
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                debug!(client = %self.client, "TLS handshake failed: {error}");
                self.rejected.count(Rejection::TlsHandshake);
            }
            Err(_elapsed) => self.rejected.count(Rejection::HeaderTimeout),
        }
    }

    /// Waits for the first byte, and makes the TLS handshake when it opens one.
    async fn open(&self, stream: TcpStream) -> std::io::Result<Option<Opened>> {
        let mut first = [0];
        if stream.peek(&mut first).await? == 0 {
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE {
            return Ok(Some(Opened::Plain(stream)));
        }
        let stream = self.tls.accept(stream).await?;
        Ok(Some(Opened::Tls(Box::new(stream))))
    }

    /// Serves HTTP/1 on an opened connection, each request marked with `peer`.
    async fn serve_http<S>(self, stream: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Whether a request came: a timeout after one is a kept-alive connection left idle (a
        // scraper between two scrapes), not a client that never sent a whole request.
        let served = Arc::new(AtomicBool::new(false));
        let service = {
            let served = Arc::clone(&served);
            let app = TowerToHyperService::new(self.app);
            service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(peer);
                served.store(true, Ordering::Relaxed);
                app.call(request)
            })
        };
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let outcome = tokio::select! {
            outcome = connection.as_mut() => Ended::Closed(outcome),
            () = tokio::time::sleep(CONNECTION_LIFETIME) => Ended::Aged,
        };
        let outcome = match outcome {
            Ended::Closed(outcome) => outcome,
            // An aged connection that ends within the grace was idle or finishing: closed, not
            // refused. One still stuck then (an answer its client never reads) is cut.
            Ended::Aged => {
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
                    Ok(outcome) => outcome,
                    Err(_elapsed) => {
                        self.rejected.count(Rejection::Lifetime);
                        return;
                    }
                }
            }
        };
        if let Err(error) = outcome {
            debug!(client = %self.client, "connection closed: {error}");
            if let Some(reason) = Rejection::of(&error, served.load(Ordering::Relaxed)) {
                self.rejected.count(reason);
            }
        }
    }
}

/// A connection once its first byte said how to serve it.
enum Opened {
    Plain(TcpStream),
    /// Boxed: a TLS session's buffers are many times a socket's size.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// How serving a connection ended.
enum Ended {
    /// The connection closed by itself (client, error or limit).
    Closed(hyper::Result<()>),
    /// It reached [`CONNECTION_LIFETIME`].
    Aged,
}

label_enum!(
    /// Why the agent refused a connection or closed it before the client did: the `reason`
    /// label of `tracer_http_connections_rejected_total` (a fixed set, so the family stays small).
    Rejection {
        /// [`MAX_CONNECTIONS`] were open.
        ConnectionLimit => "connection_limit",
        /// [`MAX_CONNECTIONS_PER_CLIENT`] were open from the same address.
        ClientLimit => "client_limit",
        /// No whole request head within [`HEADER_READ_TIMEOUT`] of the connection's start
        /// (nor a first byte, nor a finished TLS handshake).
        HeaderTimeout => "header_timeout",
        /// A TLS handshake that failed: not TLS after all, or a client that does not trust
        /// the agent's certificate.
        TlsHandshake => "tls_handshake",
        /// Not HTTP/1 (answered 400).
        Malformed => "malformed",
        /// A request head over [`MAX_REQUEST_BYTES`] (answered 431).
        TooLarge => "too_large",
        /// An answer still not taken [`SHUTDOWN_GRACE`] after [`CONNECTION_LIFETIME`].
        Lifetime => "lifetime",
    }
);

impl Rejection {
    /// The reason a connection closed with `error`, when it is one the agent counts.
    /// `served`: whether the connection had a request (then a timeout is an idle close).
    fn of(error: &hyper::Error, served: bool) -> Option<Self> {
        if error.is_timeout() {
            (!served).then_some(Self::HeaderTimeout)
        } else if error.is_parse_too_large() {
            Some(Self::TooLarge)
        } else if error.is_parse() {
            Some(Self::Malformed)
        } else {
            None
        }
    }
}

/// The connections refused or closed early, by [`Rejection`]: cheap to clone (one shared
/// array), read by `/metrics`.
#[derive(Clone, Default)]
pub struct RejectedConnections {
    counts: Arc<[AtomicU64; Rejection::ALL.len()]>,
}

impl RejectedConnections {
    fn count(&self, reason: Rejection) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each reason with its count, in [`Rejection::ALL`]'s order.
    pub fn totals(&self) -> impl Iterator<Item = (Rejection, u64)> + '_ {
        Rejection::ALL
            .into_iter()
            .map(|reason| (reason, self.counts[reason as usize].load(Ordering::Relaxed)))
    }
}

/// The connections open now, in all and by client address.
#[derive(Clone, Default)]
struct OpenConnections {
    counts: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

impl OpenConnections {
    /// Takes a place for a connection from `client`, or says which limit refuses it.
    fn admit(&self, client: IpAddr) -> Result<Admitted, Rejection> {
        let mut counts = self.lock();
        let of_client = counts.by_client.get(&client).copied().unwrap_or(0);
        if counts.total >= MAX_CONNECTIONS {
            return Err(Rejection::ConnectionLimit);
        }
        if of_client >= MAX_CONNECTIONS_PER_CLIENT {
            return Err(Rejection::ClientLimit);
        }
        counts.total += 1;
        counts.by_client.insert(client, of_client + 1);
        Ok(Admitted {
            open: self.clone(),
            client,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding the lock.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection's place under the limits, given back when it drops.
struct Admitted {
    open: OpenConnections,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.open.lock();
        counts.total -= 1;
        if let Some(of_client) = counts.by_client.get_mut(&self.client) {
            *of_client -= 1;
            if *of_client == 0 {
                counts.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::tls::{ServerTls, testing};

    #[test]
    fn one_client_is_refused_beyond_its_share_and_others_still_get_in() {
        let open = OpenConnections::default();
        let hostile = IpAddr::from([10, 0, 1, 101]);
        let admitted: Vec<Admitted> = (0..MAX_CONNECTIONS_PER_CLIENT)
            .map(|_| open.admit(hostile).expect("under the per-client limit"))
            .collect();
        assert!(matches!(open.admit(hostile), Err(Rejection::ClientLimit)));
        let scraper = open.admit(IpAddr::from([127, 0, 0, 1]));
        assert!(scraper.is_ok());
        drop(admitted);
        assert!(open.admit(hostile).is_ok());
    }

    #[test]
    fn every_client_is_refused_beyond_the_total() {
        let open = OpenConnections::default();
        let admitted: Vec<Admitted> = (0..MAX_CONNECTIONS)
            .map(|n| {
                let client = IpAddr::from([10, 1, (n / 256) as u8, (n % 256) as u8]);
                open.admit(client).expect("under the total")
            })
            .collect();
        let late = open.admit(IpAddr::from([127, 0, 0, 1]));
        assert!(matches!(late, Err(Rejection::ConnectionLimit)));
        drop(admitted);
        assert_eq!(open.lock().total, 0);
        assert!(open.lock().by_client.is_empty());
    }

    /// A client that never sends a whole request is counted when the header timeout closes it;
    /// a kept-alive connection left idle after a request (a scraper between scrapes) is closed
    /// by the same timer without counting. Real sockets on loopback, real time (~5 s).
    #[tokio::test]
    async fn only_a_connection_that_never_sent_a_request_counts_as_a_header_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let rejected = RejectedConnections::default();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let tls = ServerTls::load(None, &[]).unwrap().acceptor().unwrap();
        tokio::spawn(serve(listener, app, tls, rejected.clone()));

        let mut silent = TcpStream::connect(address).await.expect("connect");
        silent.write_all(b"GET /hea").await.expect("half a request");
        let mut idle = TcpStream::connect(address).await.expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
            .await
            .expect("a request");
        let mut answer = [0; 17];
        idle.read_exact(&mut answer).await.expect("an answer");
        assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");

        // Both are closed by the agent once the timeout passes: reading gives end of stream.
        let closed = |mut stream: TcpStream| async move {
            let mut rest = Vec::new();
            tokio::time::timeout(HEADER_READ_TIMEOUT * 2, stream.read_to_end(&mut rest))
                .await
                .is_ok()
        };
        let (silent_closed, idle_closed) = tokio::join!(closed(silent), closed(idle));
        assert!(
            silent_closed && idle_closed,
            "the header timeout closes both"
        );
        let timeouts = rejected
            .totals()
            .find(|(reason, _)| *reason == Rejection::HeaderTimeout)
            .map(|(_, count)| count);
        assert_eq!(timeouts, Some(1), "only the silent connection counts");
    }

    /// Plain HTTP and HTTPS on the same port, each request marked with how it came: real
    /// sockets on loopback, a real TLS handshake.
    #[tokio::test]
    async fn one_port_serves_http_and_https_and_each_request_knows_which() {
        use axum::Extension;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_rustls::rustls::pki_types::ServerName;

        let dir = std::env::temp_dir().join(format!("tracer-listener-{}", std::process::id()));
        let pair = testing::pem_pair();
        let tls = ServerTls::load(Some(testing::write(&dir, &pair)), &[]).unwrap();
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let app = Router::new().route(
            "/peer",
            axum::routing::get(|Extension(peer): Extension<Peer>| async move {
                format!("loopback={} tls={}", peer.loopback, peer.tls)
            }),
        );
        let rejected = RejectedConnections::default();
        tokio::spawn(serve(
            listener,
            app,
            tls.acceptor().unwrap(),
            rejected.clone(),
        ));

        let request = b"GET /peer HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n";
        let mut plain = TcpStream::connect(address).await.unwrap();
        plain.write_all(request).await.unwrap();
        let mut answer = String::new();
        plain.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("loopback=true tls=false"), "{answer}");

        let stream = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut secure = testing::client(&pair.0)
            .connect(name, stream)
            .await
            .unwrap();
        secure.write_all(request).await.unwrap();
        let mut answer = String::new();
        secure.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("loopback=true tls=true"), "{answer}");

        // A client that does not trust the certificate fails its handshake, and is counted.
        let stream = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let stranger = testing::client(&testing::pem_pair().0);
        assert!(stranger.connect(name, stream).await.is_err());
        let handshakes = || {
            rejected
                .totals()
                .find(|(reason, _)| *reason == Rejection::TlsHandshake)
                .map(|(_, count)| count)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while handshakes() != Some(1) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(handshakes(), Some(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

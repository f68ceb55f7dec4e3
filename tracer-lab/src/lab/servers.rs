//! The lab's servers (kubelet, pods, API server, CoreDNS, VPC resolver, IMDS, NLB, external
//! host): which runs where, the `lab serve` subcommand that runs one inside a namespace, and
//! the threaded TCP scaffolding they share.
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Lab, cli, dns,
    facts::{EXTERNAL_HOST, IMDS, NLB_IPS, RESOLVER},
    http,
    imds::Imds,
    sink, state,
};

/// Concurrent connections per server; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum ServerKind {
    /// Counts the bytes of each connection and answers the count (the sink protocol).
    Sink,
    /// The external host: `POST /upload`, `GET /`.
    Http,
    /// The cluster endpoint per endpoint mode (the VPC resolver, CoreDNS).
    Dns,
    /// The instance metadata service.
    Imds,
}

/// One server of the lab.
struct Server {
    role: &'static str,
    /// Unique in the lab: names its pid, log and ready files.
    name: &'static str,
    kind: ServerKind,
    listen: Vec<SocketAddrV4>,
}

fn lab_servers() -> Vec<Server> {
    use ServerKind::*;
    let any = |port| vec![SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)];
    let on = |ip, port| vec![SocketAddrV4::new(ip, port)];
    let server = |role, name, kind, listen| Server {
        role,
        name,
        kind,
        listen,
    };
    #[rustfmt::skip]
    let all = vec![
        server("node", "kubelet", Sink, any(10250)),
        server("node", "node-sink", Sink, any(8081)),
        server("pod-a", "pod-a", Sink, any(8080)),
        server("pod-b", "pod-b", Sink, any(8080)),
        server("pod-c", "pod-c", Sink, any(8080)),
        server("coredns", "coredns", Dns, any(53)),
        server("node2", "node2", Sink, any(8080)),
        server("pod-r", "pod-r", Sink, any(8080)),
        // On both EKS-owned ENIs.
        server("cp", "apiserver", Sink, any(443)),
        server("vpc", "vpc-resolver", Dns, on(RESOLVER, 53)),
        server("vpc", "imds", Imds, on(IMDS, 80)),
        server("inet", "nlb", Sink, NLB_IPS.map(|ip| SocketAddrV4::new(ip, 443)).to_vec()),
        server("inet", "external-http", Http, on(EXTERNAL_HOST, 80)),
        server("inet", "external-sink", Sink, on(EXTERNAL_HOST, 9000)),
    ];
    all
}

/// Starts every server of `lab` and waits until each listens.
pub(super) fn start(lab: &Lab) -> anyhow::Result<()> {
    let helper = lab.saved.helper_exe.to_string_lossy().into_owned();
    let state_dir = lab.state_dir().to_string_lossy().into_owned();
    let file =
        |server: &Server, extension| lab.state_dir().join(format!("{}.{extension}", server.name));
    let mut started = Vec::new();
    for server in lab_servers() {
        let ready = file(&server, "ready").to_string_lossy().into_owned();
        let kind = cli::arg_name(server.kind);
        let listen: Vec<String> = server.listen.iter().map(ToString::to_string).collect();
        let mut argv = vec![
            helper.as_str(),
            "lab",
            "serve",
            &kind,
            "--state-dir",
            &state_dir,
            "--ready",
            &ready,
        ];
        for address in &listen {
            argv.extend(["--listen", address]);
        }
        eprintln!(
            "lab: starting {} ({kind} on {}) in {}",
            server.name,
            listen.join(", "),
            lab.ns(server.role)
        );
        let pid = lab.spawn_in(server.role, server.name, &argv)?;
        started.push((server, pid));
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    for (server, pid) in &started {
        while !file(server, "ready").exists() {
            if !state::alive(*pid) || Instant::now() > deadline {
                bail!(
                    "{} in {} did not start listening; its log:\n{}",
                    server.name,
                    lab.ns(server.role),
                    std::fs::read_to_string(file(server, "log"))
                        .unwrap_or_default()
                        .trim()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    eprintln!("lab: all {} servers listen", started.len());
    Ok(())
}

/// `lab serve`: one server, run inside a namespace by [`start`].
#[derive(clap::Args, Debug)]
pub(super) struct ServeArgs {
    kind: ServerKind,
    /// Addresses to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddrV4>,
    /// The lab's state directory (the endpoint mode for dns, state.json for imds).
    #[arg(long)]
    state_dir: PathBuf,
    /// A file to create once every address listens.
    #[arg(long)]
    ready: PathBuf,
}

/// Runs a server until it is killed.
pub(super) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    eprintln!("serve: {:?} on {:?}", args.kind, args.listen);
    match args.kind {
        ServerKind::Sink => serve_tcp(&args, |mut stream| {
            sink::receive(&mut stream).map(drop).map_err(Into::into)
        }),
        ServerKind::Http => serve_tcp(&args, http::external_host),
        ServerKind::Imds => {
            let imds = Imds::new(&state::load(&args.state_dir)?.facts);
            let state_dir = args.state_dir.clone();
            serve_tcp(&args, move |stream| {
                imds.handle(stream, state::read_context_health(&state_dir)?.imds)
            })
        }
        ServerKind::Dns => {
            let sockets = args
                .listen
                .iter()
                .map(|address| {
                    UdpSocket::bind(address).with_context(|| format!("binding udp {address}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            mark_ready(&args.ready)?;
            let state_dir = Arc::new(args.state_dir);
            run_forever(sockets, move |socket| {
                let state_dir = Arc::clone(&state_dir);
                move || dns::serve(socket, &state_dir)
            })
        }
    }
}

/// Accepts connections on every address, each handled on its own thread (at most
/// [`MAX_CONNECTIONS`] at once) with 5 s read and write timeouts. A failed connection is
/// logged; the server carries on.
fn serve_tcp<H>(args: &ServeArgs, handler: H) -> anyhow::Result<()>
where
    H: Fn(TcpStream) -> anyhow::Result<()> + Send + Sync + 'static,
{
    let listeners = args
        .listen
        .iter()
        .map(|address| TcpListener::bind(address).with_context(|| format!("binding tcp {address}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    mark_ready(&args.ready)?;
    let handler = Arc::new(handler);
    let slots = Arc::new(Slots::default());
    run_forever(listeners, move |listener| {
        let (handler, slots) = (Arc::clone(&handler), Arc::clone(&slots));
        move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        eprintln!("serve: accepting: {error}");
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let slot = slots.acquire();
                let handler = Arc::clone(&handler);
                thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map_or_else(|_| "?".to_owned(), |peer| peer.to_string());
                    let handled = stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
                        .map_err(anyhow::Error::from)
                        .and_then(|()| handler(stream));
                    if let Err(error) = handled {
                        eprintln!("serve: connection from {peer}: {error:#}");
                    }
                    drop(slot);
                });
            }
        }
    })
}

/// Runs `work(item)` on a thread per item and waits for them (they run until killed).
fn run_forever<T, F, W>(items: Vec<T>, work: F) -> anyhow::Result<()>
where
    F: Fn(T) -> W,
    W: FnOnce() + Send + 'static,
{
    let threads: Vec<_> = items
        .into_iter()
        .map(|item| thread::spawn(work(item)))
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a server thread panicked"))?;
    }
    Ok(())
}

fn mark_ready(path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, b"").with_context(|| format!("creating {}", path.display()))
}

/// A counting semaphore bounding concurrent connections.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

struct Slot(Arc<Slots>);

impl Slots {
    /// Waits for a free slot; it is given back when the returned guard drops.
    fn acquire(self: &Arc<Self>) -> Slot {
        let mut used = self.used.lock().expect("no thread panics holding the lock");
        while *used >= MAX_CONNECTIONS {
            used = self
                .freed
                .wait(used)
                .expect("no thread panics holding the lock");
        }
        *used += 1;
        Slot(Arc::clone(self))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self
            .0
            .used
            .lock()
            .expect("no thread panics holding the lock") -= 1;
        self.0.freed.notify_one();
    }
}

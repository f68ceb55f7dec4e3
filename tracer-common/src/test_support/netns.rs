//! Running work inside a network namespace other than the caller's: a fresh one for a test or
//! a benchmark (nothing it creates is seen outside, nothing needs cleaning up), or a named one
//! of the lab's. The work gets a thread of its own that moves, so the caller's namespace never
//! changes, and sockets the work opens stay in the namespace it ran in.
//!
//! ```
//! use tracer_common::test_support::netns::{self, Netns};
//!
//! // A thread's own view of its namespace's interfaces: a fresh namespace only has loopback.
//! let devices = netns::run_in(Netns::Fresh, || {
//!     std::fs::read_to_string("/proc/thread-self/net/dev")
//! })??;
//! assert!(devices.contains("lo:"));
//! assert_eq!(devices.lines().count(), 3, "two header lines, then lo:\n{devices}");
//! # Ok::<(), std::io::Error>(())
//! ```
use std::{
    fmt,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
};

/// The network namespace some work runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Netns<'a> {
    /// A new, anonymous namespace with loopback up, gone when the work's thread ends.
    /// Creating one needs root (CAP_SYS_ADMIN).
    Fresh,
    /// The namespace `ip netns add NAME` made (bind-mounted at `/run/netns/NAME`).
    Named(&'a str),
}

impl fmt::Display for Netns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Netns::Fresh => f.write_str("a fresh network namespace"),
            Netns::Named(name) => write!(f, "network namespace {name} (/run/netns/{name})"),
        }
    }
}

/// Runs `work` on a thread of its own inside `netns` and returns what it returns. The error
/// names the namespace that could not be created or entered; a panic in `work` goes on in the
/// caller, so a failed assertion fails the calling test.
pub fn run_in<T: Send>(netns: Netns<'_>, work: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| enter(netns).map(|()| work()))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread, and only it, into `netns`: for a thread spawned to live there
/// (a watcher that loops until told to stop); anything shorter should use `run_in`.
pub fn enter(netns: Netns<'_>) -> io::Result<()> {
    let entered = match netns {
        Netns::Fresh => unshare().and_then(|()| ip(&["link", "set", "lo", "up"])),
        Netns::Named(name) => set_netns(name),
    };
    entered.map_err(|error| io::Error::new(error.kind(), format!("{netns}: {error}")))
}

fn unshare() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; it moves only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_netns(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a namespace descriptor that stays open for the call; it moves only the
    // calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ip args` from the calling thread, so in that thread's namespace; its error output
/// goes to the caller's. Fails when `ip` cannot start or does not succeed.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let command = || format!("ip {}", args.join(" "));
    let status = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", command())))?;
    if !status.success() {
        return Err(io::Error::other(format!("{}: {status}", command())));
    }
    Ok(())
}

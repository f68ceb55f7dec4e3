//! What an agent leaves its successor, so that a restart without SIGTERM (a crash, an OOM
//! kill, `kill -9`) neither loses packets nor sends a counter backwards.
//!
//! The datapath outlives the agent in bpffs (`datapath::Pins`) and goes on counting; every
//! poll, before its snapshot is published, the agent saves here what it made of the flow
//! table: each connection's counters as last read, the per-path totals and the bookkeeping of
//! entries lost and evicted. A successor that finds the same flow table (by kernel id) takes
//! the totals over and adds only what each connection grew since: what was counted during the
//! gap included, nothing twice, and no total below what was ever published.
//!
//! The file is a JSON line (the totals, small) followed by one fixed-size binary record per
//! connection (tens of thousands, every poll). It is written aside and renamed into place, so
//! a kill in the middle leaves the previous one whole.
use std::{
    ffi::OsString,
    fs::File,
    io::{self, BufRead as _, BufReader, BufWriter, Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tracer_common::{FlowKey, FlowStats};

use crate::{
    aggregate::ena::EnaAllowances,
    aggregate::workload::WorkloadTallies,
    aggregate::{Carried, Handshake, Unread},
    datapath::Evictions,
    pipeline::snapshot::{History, LatencyHistogram},
};

/// Bumped whenever the layout changes: a successor then starts afresh.
const VERSION: u32 = 1;
/// Key, counters as last read, idle polls, handshake (tag and time), reset reported.
const RECORD: usize = size_of::<FlowKey>() + size_of::<FlowStats>() + 4 + 1 + 8 + 1;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a state this agent can read ({reason})")]
    Format { path: PathBuf, reason: String },
    #[error(
        "{path} is in use by another agent ({holder}): one agent per state file and pin directory, or they would take each other's links and count the same connections twice (a DaemonSet's maxSurge must stay 0)"
    )]
    Busy { path: PathBuf, holder: String },
}

/// The totals, before the connections' records.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header<H, U, E, W, A, N> {
    version: u32,
    flow_table_id: u32,
    connections: u64,
    history: H,
    unread: U,
    evictions: E,
    /// With `--workload-metrics`; absent (None) otherwise.
    workloads: Option<W>,
    /// Absent (None) in the states of agents that did not time their attaches.
    attach_times: Option<A>,
    /// Absent (None) in the states of agents that did not read the ENA allowances.
    ena: Option<N>,
}

/// What a poll saves beside the connections, borrowed from the pipeline.
pub(crate) struct Totals<'a> {
    pub history: &'a History,
    pub unread: &'a Unread,
    pub evictions: &'a Evictions,
    pub workloads: Option<&'a WorkloadTallies>,
    pub attach_times: &'a LatencyHistogram,
    pub ena: &'a EnaAllowances,
}

/// What a predecessor left.
pub(crate) struct Saved {
    /// The kernel id of the flow table these counts were read from.
    pub flow_table_id: u32,
    pub history: History,
    pub unread: Unread,
    pub evictions: Evictions,
    pub workloads: Option<WorkloadTallies>,
    pub attach_times: Option<LatencyHistogram>,
    pub ena: Option<EnaAllowances>,
    pub connections: Vec<(FlowKey, Carried)>,
}

/// The state file (`tracer agent --state-file`), held by one agent at a time: an exclusive
/// `flock` on `<file>.lock`, released by the kernel when the agent ends however it ends.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    #[expect(dead_code, reason = "held for its flock, released when it closes")]
    lock: File,
}

impl StateFile {
    /// Takes the state file for this agent (making its directory if needed); `Busy` while
    /// another one holds it.
    pub(crate) fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let lock_path = lock_path(path);
        let io_error = |source| StateError::Io {
            path: lock_path.clone(),
            source,
        };
        let mut lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_error)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_error(error));
            }
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            return Err(StateError::Busy {
                path: path.to_owned(),
                holder: holder.trim().to_owned(),
            });
        }
        lock.set_len(0).map_err(io_error)?;
        writeln!(lock, "pid {}", std::process::id()).map_err(io_error)?;
        Ok(Self {
            path: path.to_owned(),
            lock,
        })
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the predecessor saved; `None` when it left nothing.
    pub(crate) fn load(&self) -> Result<Option<Saved>, StateError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.io_error(source)),
        };
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|source| self.io_error(source))?;
        let header: Header<
            History,
            Unread,
            Evictions,
            WorkloadTallies,
            LatencyHistogram,
            EnaAllowances,
        > = serde_json::from_slice(&line).map_err(|error| self.format_error(error.to_string()))?;
        if header.version != VERSION {
            return Err(self.format_error(format!("version {}", header.version)));
        }
        let mut connections = Vec::with_capacity(header.connections.min(1 << 24) as usize);
        let mut record = [0u8; RECORD];
        for _ in 0..header.connections {
            reader.read_exact(&mut record).map_err(|error| {
                self.format_error(format!(
                    "{} connections announced: {error}",
                    header.connections
                ))
            })?;
            connections
                .push(decode(&record).ok_or_else(|| self.format_error("bad record".to_owned()))?);
        }
        Ok(Some(Saved {
            flow_table_id: header.flow_table_id,
            history: header.history,
            unread: header.unread,
            evictions: header.evictions,
            workloads: header.workloads,
            attach_times: header.attach_times,
            ena: header.ena,
            connections,
        }))
    }

    /// Replaces the file with the counts of this poll.
    pub(crate) fn save<'a>(
        &self,
        flow_table_id: u32,
        totals: Totals<'_>,
        connections: impl ExactSizeIterator<Item = (&'a FlowKey, Carried)>,
    ) -> Result<(), StateError> {
        let aside = beside(&self.path, ".new");
        let write = || -> io::Result<()> {
            let mut out = BufWriter::new(File::create(&aside)?);
            let header = Header {
                version: VERSION,
                flow_table_id,
                connections: connections.len() as u64,
                history: totals.history,
                unread: totals.unread,
                evictions: totals.evictions,
                workloads: totals.workloads,
                attach_times: Some(totals.attach_times),
                ena: Some(totals.ena),
            };
            serde_json::to_writer(&mut out, &header)?;
            out.write_all(b"\n")?;
            for (key, carried) in connections {
                out.write_all(&encode(key, &carried))?;
            }
            out.into_inner().map_err(io::IntoInnerError::into_error)?;
            std::fs::rename(&aside, &self.path)
        };
        write().map_err(|source| self.io_error(source))
    }

    /// Removes the file and its lock: after a clean stop there is nothing to carry on.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(lock_path(&self.path));
    }

    fn io_error(&self, source: io::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn format_error(&self, reason: String) -> StateError {
        StateError::Format {
            path: self.path.clone(),
            reason,
        }
    }
}

fn encode(key: &FlowKey, carried: &Carried) -> [u8; RECORD] {
    let (tag, took) = match carried.handshake {
        Handshake::Open => (0u8, 0u64),
        Handshake::Timed(took) => (1, took.as_nanos() as u64),
        Handshake::Refused => (2, 0),
        Handshake::Unanswered => (3, 0),
    };
    let mut record = [0u8; RECORD];
    let parts: [&[u8]; 6] = [
        bytes_of(key),
        bytes_of(&carried.last),
        &carried.idle_polls.to_le_bytes(),
        &[tag],
        &took.to_le_bytes(),
        &[u8::from(carried.reset_counted)],
    ];
    let mut at = 0;
    for part in parts {
        record[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    record
}

fn decode(record: &[u8; RECORD]) -> Option<(FlowKey, Carried)> {
    let (key, rest) = record.split_at(size_of::<FlowKey>());
    let (last, rest) = rest.split_at(size_of::<FlowStats>());
    let (idle_polls, rest) = rest.split_at(4);
    let (tag, rest) = rest.split_at(1);
    let (took, reset) = rest.split_at(8);
    let took = Duration::from_nanos(u64::from_le_bytes(took.try_into().ok()?));
    let handshake = match tag[0] {
        0 => Handshake::Open,
        1 => Handshake::Timed(took),
        2 => Handshake::Refused,
        3 => Handshake::Unanswered,
        _ => return None,
    };
    Some((
        from_bytes(key),
        Carried {
            last: from_bytes(last),
            idle_polls: u32::from_le_bytes(idle_polls.try_into().ok()?),
            handshake,
            reset_counted: reset[0] != 0,
        },
    ))
}

fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: a `Pod` type is plain data without implicit padding: all its bytes are
    // initialised, and the slice lives as long as the borrow.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

/// `bytes` must be `size_of::<T>()` long (the callers split them so).
fn from_bytes<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: the length is checked, the read is unaligned, and any bytes are a valid `Pod`.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Maps saved as lists of pairs (`#[serde(with = "crate::pipeline::restart::pairs")]`): a JSON map
/// needs string keys, and the saved maps are keyed by labels and series.
pub(crate) mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<'a, M, K, V, S>(map: &'a M, serializer: S) -> Result<S::Ok, S::Error>
    where
        &'a M: IntoIterator<Item = (&'a K, &'a V)>,
        K: Serialize + 'a,
        V: Serialize + 'a,
        S: Serializer,
    {
        serializer.collect_seq(map)
    }

    pub(crate) fn deserialize<'de, M, K, V, D>(deserializer: D) -> Result<M, D::Error>
    where
        M: FromIterator<(K, V)>,
        K: Deserialize<'de>,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

fn lock_path(path: &Path) -> PathBuf {
    beside(path, ".lock")
}

/// `path` with `suffix` added to its file name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::aggregate::ena::{Allowance, EnaReading};

    fn connection(port: u16, handshake: Handshake) -> (FlowKey, Carried) {
        let key = FlowKey {
            lo_port: port,
            hi_port: 443,
            proto: 6,
            ..FlowKey::default()
        };
        let last = FlowStats {
            packets: [3, 2],
            bytes: [300, u64::MAX - 1],
            syn_ns: 5,
            synack_ns: 7,
            ..FlowStats::default()
        };
        (
            key,
            Carried {
                last,
                idle_polls: 9,
                handshake,
                reset_counted: true,
            },
        )
    }

    #[test]
    fn a_saved_state_loads_back_whole() {
        let dir = std::env::temp_dir().join(format!("tracer-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = StateFile::open(&dir.join("state")).unwrap();
        assert!(file.load().unwrap().is_none(), "nothing saved yet");
        // One agent at a time: a second one is told who holds it.
        let error = StateFile::open(&dir.join("state")).expect_err("held");
        let pid = format!("pid {}", std::process::id());
        assert!(error.to_string().contains(&pid), "{error}");
        let connections = [
            connection(1, Handshake::Open),
            connection(2, Handshake::Timed(Duration::from_micros(250))),
            connection(3, Handshake::Refused),
            connection(4, Handshake::Unanswered),
        ];
        let mut unread = Unread::default();
        unread.update(7, &crate::aggregate::PollResult::default());
        let mut attach_times = LatencyHistogram::default();
        attach_times.observe(Duration::from_millis(14));
        let mut ena = EnaAllowances::default();
        let reading = EnaReading {
            exceeded: BTreeMap::from([(Allowance::Linklocal, 9), (Allowance::Conntrack, 4)]),
            conntrack_available: Some(30_000),
        };
        ena.update(BTreeMap::from([("eth0".to_owned(), Some(reading))]));
        let totals = Totals {
            history: &History::default(),
            unread: &unread,
            evictions: &Evictions::default(),
            workloads: None,
            attach_times: &attach_times,
            ena: &ena,
        };
        file.save(
            42,
            totals,
            connections.iter().map(|(key, carried)| (key, *carried)),
        )
        .unwrap();
        let saved = file.load().unwrap().expect("saved");
        assert_eq!(saved.flow_table_id, 42);
        assert_eq!(
            saved.workloads, None,
            "no workload metrics, nothing saved of them"
        );
        assert_eq!(saved.unread.lost(), 7);
        assert_eq!(saved.attach_times, Some(attach_times));
        assert_eq!(saved.ena, Some(ena));
        assert_eq!(saved.connections, connections);

        // A file cut short is an error naming the file, never a panic nor half a state.
        let bytes = std::fs::read(file.path()).unwrap();
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(file.path(), &bytes[..cut]).unwrap();
            let error = file.load().err().expect("a cut file is refused");
            assert!(error.to_string().contains("state"), "{error}");
        }
        file.remove();
        drop(file);
        StateFile::open(&dir.join("state")).expect("free once the holder is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

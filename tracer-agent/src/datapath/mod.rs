//! The kernel side as user space sees it: load the programs, attach them to interfaces, and
//! read the flow table and the datapath counters; `ethtool` reads a driver's private
//! statistics (the ENA driver's count of the VPC's allowances).
pub mod discovery;
pub mod ethtool;
pub mod netlink;
pub(crate) mod privileges;
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use netlink::FilterAdded;
use tracer_common::{
    COUNTERS_MAP, DatapathCounter, FLOWS_MAP, FRAGMENT_TABLE_SIZE, FRAGMENTS_MAP, FlowKey,
    FlowStats, FragmentKey, FragmentPorts, PROGRAM_BASELINE, PROGRAM_EGRESS, PROGRAM_INGRESS,
};

/// The kernel programs, built by build.rs and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// A stand-in for the VPC CNI's network-policy agent (`policy_standin`: drops TCP to the port
/// in its global `DENIED_TCP_PORT`), built with the kernel programs for the coexistence tests.
/// The agent never loads it.
pub static POLICY_STANDIN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-standin"));
/// The stand-in's program and the global that holds its denied port.
pub const POLICY_STANDIN_PROGRAM: &str = "policy_standin";
pub const POLICY_STANDIN_PORT_GLOBAL: &str = "DENIED_TCP_PORT";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading the flow table (BPF_MAP_LOOKUP_BATCH, kernel ≥ 5.6): {0}")]
    Batch(std::io::Error),
    #[error("the eBPF object has no {0}: it does not match this agent")]
    Missing(&'static str),
    #[error("attaching to {interface} ({hook:?}): {source}")]
    Attach {
        interface: String,
        hook: TcAttachType,
        source: aya::programs::ProgramError,
    },
    #[error("{path}: {message}")]
    Pin { path: PathBuf, message: String },
}

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel ≥ 6.6): owned by the agent's file descriptors, gone when it exits.
    Tcx(TcxOrder),
    /// Legacy clsact qdisc with direct-action filters, for older kernels: at priority 1,
    /// kept ahead of every other filter (see `Datapath::overtakes`).
    Clsact,
}

impl AttachMode {
    /// tcx where the kernel has it, clsact before 6.6.
    pub fn for_running_kernel(order: TcxOrder) -> Self {
        match KernelVersion::current() {
            Ok(version) if version >= KernelVersion::new(6, 6, 0) => Self::Tcx(order),
            _ => Self::Clsact,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx(_) => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// Where on a hook's tcx chain the agent's programs go. A program that drops or redirects a
/// packet (a network-policy agent's, for one) hides it from every program after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcxOrder {
    /// Ahead of every program already there: the agent sees every packet, those another
    /// program then drops included (a denied connection's SYNs are counted).
    First,
    /// Behind every program already there: the agent sees only what the others pass on.
    Last,
}

impl TcxOrder {
    fn link_order(self) -> LinkOrder {
        match self {
            Self::First => LinkOrder::first(),
            Self::Last => LinkOrder::last(),
        }
    }
}

/// The clsact priority of the agent's filters: the first there is. Within one priority the
/// newest filter runs first, so the agent moves its filter back in front whenever another
/// lands at this priority after it.
const CLSACT_PRIORITY: u16 = 1;
/// The agent's two filter handles ("trc" 1 and 2), used in turn: to move ahead of another
/// filter the agent adds its filter anew under the other handle, then removes the old one,
/// so that no packet passes unseen in between. Handle 1 is the VPC CNI's network-policy
/// agent's, which finds its filter by it.
const CLSACT_HANDLES: [u32; 2] = [0x7472_6301, 0x7472_6302];

/// `BPF_MAP_LOOKUP_BATCH`, the `bpf(2)` command aya 0.14 does not wrap.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per batch: far more than a hash bucket ever holds (a batch never splits one).
const BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Copies the flow table out with one syscall per `BATCH` entries, instead of two per entry
/// (next key, then lookup) with aya's iterator: reading the table is the agent's main cost
/// at tens of thousands of flows. Entries added or evicted meanwhile may or may not be seen,
/// as with any walk of a live table. `capacity` is the table's size: the copy is allocated
/// once, never grown (growing held a larger copy than the entries needed); the pages the
/// entries do not fill are never touched, so they cost no memory.
fn read_batched(
    map: BorrowedFd<'_>,
    capacity: usize,
) -> std::io::Result<Vec<(FlowKey, FlowStats)>> {
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowStats::default(); BATCH];
    let mut flows = Vec::with_capacity(capacity);
    // The position in the table: for hash maps, a bucket index the kernel hands back.
    let (mut position, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const position) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute points at live buffers of `count` keys and values of the map's
        // key and value types, and at two u32 batch tokens; the kernel writes nothing else.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if result < 0 {
            let error = std::io::Error::last_os_error();
            // ENOENT: the walk reached the end (the last entries are in this batch).
            if error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error);
            }
            true
        } else {
            false
        };
        let filled = (attr.count as usize).min(BATCH);
        flows.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        if done {
            return Ok(flows);
        }
        position = next;
        first = false;
    }
}

/// Both hooks of one interface.
struct Attachment {
    /// The interface's index: a pod deleted and re-created between two scans keeps its name
    /// but not its index, and needs attaching again.
    index: u32,
    /// Ingress, then egress, held for their drop, which detaches.
    links: [HeldLink; 2],
    /// In clsact mode, the handle each hook's filter has (one of `CLSACT_HANDLES`).
    handles: [u32; 2],
}

/// One hook's link, held for its drop, which detaches (a pinned one once unpinned too).
#[expect(dead_code, reason = "held for its drop, which detaches")]
enum HeldLink {
    Program(SchedClassifierLink),
    /// A new tcx link just pinned, kept as the descriptor it is: turning it back into a
    /// `SchedClassifierLink` would ask the kernel for its type, which takes the RTNL lock —
    /// a wait behind other attaches' grace periods on every new pod.
    Pinned(FdLink),
}

/// The two hooks, in the order of `Attachment::links`.
const HOOKS: [(&str, TcAttachType); 2] = [
    (PROGRAM_INGRESS, TcAttachType::Ingress),
    (PROGRAM_EGRESS, TcAttachType::Egress),
];

/// A directory on a bpffs where the datapath outlives its agent: the maps, and the tcx links
/// that keep the programs attached. An agent killed without SIGTERM (crash, OOM kill,
/// `kill -9`) leaves them counting; its successor reopens the maps and moves the links to its
/// own programs in place (`BPF_LINK_UPDATE`: no gap, and no RCU grace period per hook as a
/// new attach costs).
#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

/// `BPF_FS_MAGIC`, the `statfs` type of a bpffs.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

impl Pins {
    /// Creates `dir` if needed; it must be on a bpffs.
    pub fn new(dir: &Path) -> Result<Self, DatapathError> {
        let pin_error = |message: String| DatapathError::Pin {
            path: dir.to_owned(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|error| pin_error(error.to_string()))?;
        let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|error| pin_error(error.to_string()))?;
        // SAFETY: statfs writes into the zeroed struct we own and reads the C string.
        let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c_path.as_ptr(), &mut stats) } != 0 {
            return Err(pin_error(std::io::Error::last_os_error().to_string()));
        }
        // `f_type` is 32 or 64 bits wide depending on the target; the magic fits in 32.
        if stats.f_type as u32 != BPF_FS_MAGIC {
            return Err(pin_error(
                "not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)".to_owned(),
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self, name: &str) -> PathBuf {
        self.dir.join(format!("map-{name}"))
    }

    fn link(&self, index: u32, program: &str) -> PathBuf {
        self.dir.join(format!("link-{index}-{program}"))
    }

    /// Removes the pinned maps unless the flow table is the one `resume` names and all have the shapes
    /// this agent would create: a table of another size or layout starts afresh.
    fn keep_maps_if(&self, resume: Option<u32>, flow_table_size: u32) -> bool {
        let shapes = [
            (
                FLOWS_MAP,
                size_of::<FlowKey>(),
                size_of::<FlowStats>(),
                flow_table_size,
            ),
            (
                FRAGMENTS_MAP,
                size_of::<FragmentKey>(),
                size_of::<FragmentPorts>(),
                FRAGMENT_TABLE_SIZE,
            ),
            (
                COUNTERS_MAP,
                size_of::<u32>(),
                size_of::<u64>(),
                DatapathCounter::COUNT,
            ),
        ];
        let fits = resume.is_some()
            && shapes.iter().all(|(name, key, value, entries)| {
                MapData::from_pin(self.map(name))
                    .and_then(|map| map.info())
                    .is_ok_and(|info| {
                        info.key_size() as usize == *key
                            && info.value_size() as usize == *value
                            && info.max_entries() == *entries
                            && (*name != FLOWS_MAP || Some(info.id()) == resume)
                    })
            });
        if !fits {
            for (name, ..) in shapes {
                let _ = std::fs::remove_file(self.map(name));
            }
        }
        fits
    }

    /// Removes link pins of interfaces not in `attached` (deleted while no agent ran): their
    /// last reference goes, and with it whatever they still held.
    fn forget_links_except(&self, attached: &HashMap<String, Attachment>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|name| name.strip_prefix("link-")) else {
                continue;
            };
            let index = rest.split('-').next().and_then(|index| index.parse().ok());
            if !attached
                .values()
                .any(|attachment| Some(attachment.index) == index)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes every pin and the directory, once the datapath is detached.
    fn remove_all(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The loaded kernel programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    mode: AttachMode,
    attached: HashMap<String, Attachment>,
    /// Where maps and tcx links are pinned, when they are.
    pins: Option<Pins>,
    /// Whether the maps are a predecessor's, still counting (see `Pins`).
    resumed: bool,
    /// The flow table's kernel id and capacity, fixed for the datapath's life.
    flow_table_id: u32,
    flow_table_capacity: u32,
    /// Whether link pins of a predecessor may remain for interfaces that are gone.
    stale_pins: bool,
    /// Times a clsact filter was moved back in front (`tracer_attach_reorders_total`).
    reorders: u64,
}

impl Datapath {
    /// Loads the programs into the kernel with a flow table of `flow_table_size` entries.
    pub fn load(flow_table_size: u32, mode: AttachMode) -> Result<Self, DatapathError> {
        Self::load_pinned(flow_table_size, mode, None, None)
    }

    /// Loads the programs with their maps pinned in `pins`, reusing the pinned ones when they
    /// are the flow table `resume` names (a saved state's); see `Pins`.
    pub fn load_pinned(
        flow_table_size: u32,
        mode: AttachMode,
        pins: Option<Pins>,
        resume: Option<u32>,
    ) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(FLOWS_MAP, flow_table_size);
        let resumed = pins
            .as_ref()
            .is_some_and(|pins| pins.keep_maps_if(resume, flow_table_size));
        if let Some(pins) = &pins {
            for name in [FLOWS_MAP, FRAGMENTS_MAP, COUNTERS_MAP] {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [PROGRAM_INGRESS, PROGRAM_EGRESS, PROGRAM_BASELINE] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let flow_table = flow_table(&ebpf)?
            .info()
            .map_err(|source| DatapathError::Map {
                name: FLOWS_MAP,
                source,
            })?;
        Ok(Self {
            ebpf,
            mode,
            attached: HashMap::new(),
            stale_pins: pins.is_some(),
            pins,
            resumed,
            flow_table_id: flow_table.id(),
            flow_table_capacity: flow_table.max_entries(),
            reorders: 0,
        })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Whether the maps were carried over from a predecessor (their counts go on).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The flow table's kernel id, which a saved state names (see `restart`).
    pub fn flow_table_id(&self) -> u32 {
        self.flow_table_id
    }

    /// Attaches the ingress and egress programs to `interface`: in clsact mode ahead of every
    /// filter already there, in tcx mode where `TcxOrder` says. They hand every packet on, so
    /// going first changes no other program's verdict, and sees what those drop.
    /// How long it took when it attached anew; `None` when it already was.
    pub fn attach(
        &mut self,
        interface: &str,
        index: u32,
    ) -> Result<Option<Duration>, DatapathError> {
        match self.attached.get(interface) {
            Some(attachment) if attachment.index == index => return Ok(None),
            Some(_) => self.detach(interface),
            None => {}
        }
        let started = Instant::now();
        // An agent killed before it could detach (SIGKILL, OOM) leaves its clsact filters
        // behind, still running on every packet: remove them, or each restart adds one more
        // program per hook (tcx links die with their process). One datapath runs per node, so
        // a tracer filter found here is a dead one's. A qdisc added just now holds none: the
        // two dumps that look for them (each waiting for the RTNL lock) are spared on a new
        // pod's veth. Already present is fine: another tool (or the CNI) may have added it.
        if self.mode == AttachMode::Clsact && tc::qdisc_add_clsact(interface).is_err() {
            for (program, hook) in HOOKS {
                let _ = tc::qdisc_detach_program(interface, hook, program);
            }
        }
        let handle = CLSACT_HANDLES[0];
        let ingress = self.attach_one(interface, index, HOOKS[0], handle)?;
        // On failure, dropping `ingress` detaches it again.
        let egress = self.attach_one(interface, index, HOOKS[1], handle)?;
        self.attached.insert(
            interface.to_owned(),
            Attachment {
                index,
                links: [ingress, egress],
                handles: [handle; 2],
            },
        );
        Ok(Some(started.elapsed()))
    }

    /// Whether `filter`, just added, runs before the agent's clsact filter on its hook: it
    /// is another program's (not under one of the agent's handles) at the agent's priority
    /// or a lower one. The agent's own additions never count, so moving in front does not
    /// call for moving again.
    pub fn overtakes(filter: &FilterAdded) -> bool {
        filter.priority <= CLSACT_PRIORITY && !CLSACT_HANDLES.contains(&filter.handle)
    }

    /// Times a clsact filter was moved back in front of another program's.
    pub fn reorders(&self) -> u64 {
        self.reorders
    }

    /// Puts the agent's clsact filter on `hook` of the interface `index` back in front: adds
    /// it anew under its other handle (the newest runs first), then removes the old one.
    /// Nothing to do outside clsact mode or on an interface not held.
    pub fn move_to_front(&mut self, index: u32, hook: TcAttachType) -> Result<(), DatapathError> {
        if self.mode != AttachMode::Clsact {
            return Ok(());
        }
        let Some(slot) = HOOKS.iter().position(|(_, held)| *held == hook) else {
            return Ok(());
        };
        let Some((interface, attachment)) = self
            .attached
            .iter()
            .find(|(_, attachment)| attachment.index == index)
        else {
            return Ok(());
        };
        let handle = if attachment.handles[slot] == CLSACT_HANDLES[0] {
            CLSACT_HANDLES[1]
        } else {
            CLSACT_HANDLES[0]
        };
        let interface = interface.clone();
        let link = self.attach_one(&interface, index, HOOKS[slot], handle)?;
        if let Some(attachment) = self.attached.get_mut(&interface) {
            // The old filter goes with its link, now that the new one runs first.
            attachment.links[slot] = link;
            attachment.handles[slot] = handle;
        }
        self.reorders += 1;
        Ok(())
    }

    /// One hook: a pinned link of a predecessor moved to this agent's program, else a new
    /// attachment (pinned, with pins and tcx).
    fn attach_one(
        &mut self,
        interface: &str,
        index: u32,
        (program, hook): (&'static str, TcAttachType),
        handle: u32,
    ) -> Result<HeldLink, DatapathError> {
        let attach_error = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            hook,
            source,
        };
        let pin = match (&self.pins, self.mode) {
            (Some(pins), AttachMode::Tcx(_)) => Some(pins.link(index, program)),
            _ => None,
        };
        let classifier = classifier(&mut self.ebpf, program)?;
        if let Some(pin) = &pin
            && let Ok(pinned) = PinnedLink::from_pin(pin)
        {
            let moved = SchedClassifierLink::try_from(FdLink::from(pinned)).map(|link| {
                classifier
                    .attach_to_link(link)
                    .and_then(|id| classifier.take_link(id))
            });
            match moved {
                Ok(Ok(link)) => return Ok(HeldLink::Program(link)),
                // The interface it held was deleted (ENOLINK): attach anew.
                _ => {
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        let options = match self.mode {
            AttachMode::Tcx(order) => TcAttachOptions::TcxOrder(order.link_order()),
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions {
                priority: CLSACT_PRIORITY,
                handle: TcHandle::from(handle),
                ..NlOptions::default()
            }),
        };
        let link = classifier
            .attach_with_options(interface, hook, options)
            .and_then(|id| classifier.take_link(id))
            .map_err(attach_error)?;
        let Some(pin) = pin else {
            return Ok(HeldLink::Program(link));
        };
        let pin_error = |error: &dyn std::fmt::Display| DatapathError::Pin {
            path: pin.clone(),
            message: error.to_string(),
        };
        let pinned = FdLink::try_from(link)
            .map_err(|error| pin_error(&error))?
            .pin(&pin)
            .map_err(|error| pin_error(&error))?;
        Ok(HeldLink::Pinned(FdLink::from(pinned)))
    }

    /// Once, after the first attach: forgets a predecessor's pinned links of interfaces that
    /// are gone or no longer traced (later ones are unpinned as they go).
    pub fn forget_stale_pins(&mut self) {
        if let Some(pins) = self.pins.as_ref().filter(|_| self.stale_pins) {
            pins.forget_links_except(&self.attached);
            self.stale_pins = false;
        }
    }

    /// Detaches from an interface (its pins too); a vanished interface is not an error.
    pub fn detach(&mut self, interface: &str) {
        if let Some(attachment) = self.attached.remove(interface)
            && let Some(pins) = &self.pins
        {
            for (program, _) in HOOKS {
                let _ = std::fs::remove_file(pins.link(attachment.index, program));
            }
        }
    }

    /// Names of the interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// The pin directory and how many interfaces keep their links there when the agent exits
    /// (tcx links are pinned; clsact filters go with the agent).
    pub fn pinned(&self) -> Option<(&Path, usize)> {
        let pins = self.pins.as_ref()?;
        let linked = match self.mode {
            AttachMode::Tcx(_) => self.attached.len(),
            AttachMode::Clsact => 0,
        };
        Some((pins.dir(), linked))
    }

    /// Detaches from every interface and removes every pin: a clean stop leaves nothing.
    /// (Dropping the `Datapath` detaches too, but leaves pins for a successor.)
    pub fn detach_all(&mut self) {
        let interfaces: Vec<String> = self.attached.keys().cloned().collect();
        for interface in interfaces {
            self.detach(&interface);
        }
        if let Some(pins) = &self.pins {
            pins.remove_all();
        }
    }

    /// A copy of the flow table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowStats)>, DatapathError> {
        read_batched(
            flow_table(&self.ebpf)?.fd().as_fd(),
            self.flow_table_capacity as usize,
        )
        .map_err(DatapathError::Batch)
    }

    /// One connection's entry, if the table holds it.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowStats>, DatapathError> {
        let map_error = |source| DatapathError::Map {
            name: FLOWS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(FLOWS_MAP)
            .ok_or(DatapathError::Missing(FLOWS_MAP))?;
        let map: BpfHashMap<&MapData, FlowKey, FlowStats> =
            BpfHashMap::try_from(map).map_err(map_error)?;
        match map.get(key, 0) {
            Ok(stats) => Ok(Some(stats)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(source)),
        }
    }

    /// Removes connections from the flow table (after their last counts were read); returns
    /// how many were still there.
    pub fn forget(&mut self, keys: &[FlowKey]) -> Result<u64, DatapathError> {
        let map = self
            .ebpf
            .map_mut(FLOWS_MAP)
            .ok_or(DatapathError::Missing(FLOWS_MAP))?;
        let mut map: BpfHashMap<&mut MapData, FlowKey, FlowStats> = BpfHashMap::try_from(map)
            .map_err(|source| DatapathError::Map {
                name: FLOWS_MAP,
                source,
            })?;
        let mut removed = 0;
        for key in keys {
            match map.remove(key) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: FLOWS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(removed)
    }

    /// The datapath counters, summed over CPUs, indexed by `DatapathCounter`.
    pub fn counters(&self) -> Result<[u64; DatapathCounter::COUNT as usize], DatapathError> {
        let map_error = |source| DatapathError::Map {
            name: COUNTERS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or(DatapathError::Missing(COUNTERS_MAP))?;
        let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_error)?;
        let mut totals = [0u64; DatapathCounter::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            *total = array
                .get(&(index as u32), 0)
                .map_err(map_error)?
                .iter()
                .sum();
        }
        totals[DatapathCounter::Seen as usize] = DatapathCounter::ALL
            .iter()
            .filter(|counter| counter.is_outcome())
            .map(|counter| totals[*counter as usize])
            .sum();
        Ok(totals)
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }
}

/// The flow table's LRU evictions, which the kernel makes silently: every connection the
/// datapath created (`DatapathCounter::FlowsCreated`) is still in the table, was removed by the
/// agent, or was evicted. Counts also the connections evicted before any read saw them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Evictions {
    removed: u64,
    evicted: u64,
}

impl Evictions {
    /// Connections the agent removed from the table itself.
    pub fn removed(&mut self, count: u64) {
        self.removed += count;
    }

    /// The evictions so far, from the `created` counter and the `entries` found in the table
    /// afterwards. Reading the counter first errs low (a connection created in between is in
    /// the table but not in `created`), and a low estimate is made good by a later one: the
    /// total never goes back.
    pub fn update(&mut self, created: u64, entries: usize) -> u64 {
        let evicted = created.saturating_sub(entries as u64 + self.removed);
        self.evicted = self.evicted.max(evicted);
        self.evicted
    }
}

fn flow_table(ebpf: &Ebpf) -> Result<&MapData, DatapathError> {
    match ebpf.map(FLOWS_MAP) {
        Some(aya::maps::Map::LruHashMap(data)) => Ok(data),
        _ => Err(DatapathError::Missing(FLOWS_MAP)),
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones to the cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels ≥ 5.11");
    }
}

#[cfg(test)]
mod tests {
    use super::Evictions;

    #[test]
    fn evictions_are_what_was_created_and_is_neither_in_the_table_nor_removed() {
        let mut evictions = Evictions::default();
        assert_eq!(evictions.update(100, 100), 0);
        // 50 more created, the table holds 120: 30 evicted.
        assert_eq!(evictions.update(150, 120), 30);
        // The agent removes 20 idle ones: not evictions.
        evictions.removed(20);
        assert_eq!(evictions.update(150, 100), 30);
        // Created after the counter was read, found in the table: an estimate too low for a
        // while, never a count that goes back.
        assert_eq!(evictions.update(150, 110), 30);
        assert_eq!(evictions.update(200, 120), 60);
    }
}

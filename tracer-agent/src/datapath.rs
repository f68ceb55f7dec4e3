//! The kernel side as user space sees it: load the programs, attach them to interfaces, and
//! read the flow table and the datapath counters.
use std::collections::HashMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        links::LinkOrder,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use tracer_common::{
    COUNTERS_MAP, DatapathCounter, FLOWS_MAP, FlowKey, FlowStats, PROGRAM_BASELINE, PROGRAM_EGRESS,
    PROGRAM_INGRESS,
};

/// The kernel programs, built by build.rs and embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0} (the agent needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON, and a kernel with BTF)"
    )]
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
    #[error("the eBPF object has no {0}: it does not match this agent")]
    Missing(&'static str),
    #[error("attaching to {interface} ({hook:?}): {source}")]
    Attach {
        interface: String,
        hook: TcAttachType,
        source: aya::programs::ProgramError,
    },
}

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel ≥ 6.6): owned by the agent's file descriptors, gone when it exits.
    Tcx,
    /// Legacy clsact qdisc with direct-action filters, for older kernels.
    Clsact,
}

impl AttachMode {
    /// tcx where the kernel has it, clsact before 6.6.
    pub fn for_running_kernel() -> AttachMode {
        match KernelVersion::current() {
            Ok(version) if version >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Clsact,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// Both hooks of one interface.
struct Attachment {
    /// The interface's index: a pod deleted and re-created between two scans keeps its name
    /// but not its index, and needs attaching again.
    index: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// The loaded kernel programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    mode: AttachMode,
    attached: HashMap<String, Attachment>,
}

impl Datapath {
    /// Loads the programs into the kernel with a flow table of `flow_table_size` entries.
    pub fn load(flow_table_size: u32, mode: AttachMode) -> Result<Datapath, DatapathError> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS_MAP, flow_table_size)
            .load(EBPF_OBJECT)?;
        for name in [PROGRAM_INGRESS, PROGRAM_EGRESS, PROGRAM_BASELINE] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Datapath {
            ebpf,
            mode,
            attached: HashMap::new(),
        })
    }

    /// Attaches the ingress and egress programs to `interface`, after whatever is already
    /// there (they hand every packet on, so order does not change other programs' verdicts).
    pub fn attach(&mut self, interface: &str, index: u32) -> Result<(), DatapathError> {
        match self.attached.get(interface) {
            Some(attachment) if attachment.index == index => return Ok(()),
            Some(_) => self.detach(interface),
            None => {}
        }
        if self.mode == AttachMode::Clsact {
            // Already present is fine: another tool (or the CNI) may have added it.
            let _ = tc::qdisc_add_clsact(interface);
        }
        let ingress = self.attach_one(interface, PROGRAM_INGRESS, TcAttachType::Ingress)?;
        let egress = match self.attach_one(interface, PROGRAM_EGRESS, TcAttachType::Egress) {
            Ok(egress) => egress,
            Err(error) => {
                if let Ok(program) = classifier(&mut self.ebpf, PROGRAM_INGRESS) {
                    let _ = program.detach(ingress);
                }
                return Err(error);
            }
        };
        self.attached.insert(
            interface.to_owned(),
            Attachment {
                index,
                ingress,
                egress,
            },
        );
        Ok(())
    }

    fn attach_one(
        &mut self,
        interface: &str,
        program: &'static str,
        hook: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        let options = match self.mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::last()),
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
        };
        classifier(&mut self.ebpf, program)?
            .attach_with_options(interface, hook, options)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                hook,
                source,
            })
    }

    /// Detaches from an interface; a vanished interface is not an error.
    pub fn detach(&mut self, interface: &str) {
        if let Some(Attachment {
            ingress, egress, ..
        }) = self.attached.remove(interface)
        {
            if let Ok(program) = classifier(&mut self.ebpf, PROGRAM_INGRESS) {
                let _ = program.detach(ingress);
            }
            if let Ok(program) = classifier(&mut self.ebpf, PROGRAM_EGRESS) {
                let _ = program.detach(egress);
            }
        }
    }

    /// Names of the interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Detaches from every interface (also what dropping the `Datapath` does).
    pub fn detach_all(&mut self) {
        let interfaces: Vec<String> = self.attached.keys().cloned().collect();
        for interface in interfaces {
            self.detach(&interface);
        }
    }

    /// A copy of the flow table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowStats)>, DatapathError> {
        let map = self.flow_map()?;
        let mut flows = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok(entry) => flows.push(entry),
                // The entry was evicted or deleted while iterating: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: FLOWS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(flows)
    }

    /// Removes connections from the flow table (after their last counts were read).
    pub fn forget(&mut self, keys: &[FlowKey]) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(FLOWS_MAP)
            .ok_or(DatapathError::Missing(FLOWS_MAP))?;
        let mut map: BpfHashMap<&mut MapData, FlowKey, FlowStats> = BpfHashMap::try_from(map)
            .map_err(|source| DatapathError::Map {
                name: FLOWS_MAP,
                source,
            })?;
        for key in keys {
            match map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: FLOWS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn flow_map(&self) -> Result<BpfHashMap<&MapData, FlowKey, FlowStats>, DatapathError> {
        let map = self
            .ebpf
            .map(FLOWS_MAP)
            .ok_or(DatapathError::Missing(FLOWS_MAP))?;
        BpfHashMap::try_from(map).map_err(|source| DatapathError::Map {
            name: FLOWS_MAP,
            source,
        })
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
        log::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels ≥ 5.11");
    }
}

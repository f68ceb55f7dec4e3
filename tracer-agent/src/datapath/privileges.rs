//! The capabilities the agent needs. When the kernel refuses to load the datapath, the error
//! is led by the capabilities this process lacks, each named with what it is for, rather than
//! a bare EPERM or a verifier log.
//!
//! The container image gives the binary these capabilities as *permitted* file capabilities
//! (no effective bit), so a non-root process gets those the container's bounding set allows,
//! and raises them here. Without the effective bit the kernel does not refuse to run the binary
//! when one is missing, which is what lets the agent explain the problem (docs/deploy.md).
use std::io;

use aya::util::KernelVersion;

/// One Linux capability: its number (linux/capability.h) and why the agent needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Capability {
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
    /// CAP_SYS_ADMIN grants it too (the kernel's `bpf_capable()` and `perfmon_capable()`).
    pub implied_by_sys_admin: bool,
}

pub(crate) const CAP_NET_ADMIN: Capability = Capability {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "loading TC classifiers, attaching them to interfaces, reading conntrack over netlink",
    implied_by_sys_admin: false,
};
pub(crate) const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    why: "covers CAP_BPF and CAP_PERFMON; never needed when those are granted",
    implied_by_sys_admin: false,
};
pub(crate) const CAP_SYS_RESOURCE: Capability = Capability {
    bit: 24,
    name: "CAP_SYS_RESOURCE",
    why: "raising RLIMIT_MEMLOCK, which kernels before 5.11 charge eBPF maps to",
    implied_by_sys_admin: false,
};
pub(crate) const CAP_PERFMON: Capability = Capability {
    bit: 38,
    name: "CAP_PERFMON",
    why: "the verifier rejects the packet parser's pointer arithmetic without it",
    implied_by_sys_admin: true,
};
pub(crate) const CAP_BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
    why: "creating eBPF maps and loading programs",
    implied_by_sys_admin: true,
};

/// What every kernel needs; CAP_SYS_RESOURCE is added on kernels before 5.11.
pub(crate) const REQUIRED: [Capability; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// The first kernel that charges eBPF maps to the memory cgroup instead of RLIMIT_MEMLOCK.
const MEMCG_ACCOUNTING: KernelVersion = KernelVersion::new(5, 11, 0);

/// A set of capabilities, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapSet(pub u64);

impl CapSet {
    #[cfg(test)]
    fn of(capabilities: &[Capability]) -> Self {
        Self(capabilities.iter().fold(0, |set, cap| set | 1 << cap.bit))
    }

    pub(crate) fn contains(self, cap: Capability) -> bool {
        self.0 & (1 << cap.bit) != 0
    }

    /// Whether a process holding this set passes the kernel's check for `cap`.
    pub(crate) fn grants(self, cap: Capability) -> bool {
        self.contains(cap) || (cap.implied_by_sys_admin && self.contains(CAP_SYS_ADMIN))
    }
}

/// What decides whether the agent can load its programs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Privileges {
    pub effective: CapSet,
    pub kernel: KernelVersion,
    /// The RLIMIT_MEMLOCK hard limit is unlimited, so the agent can raise its own soft limit.
    pub memlock_unlimited: bool,
}

impl Privileges {
    /// The capabilities the agent lacks, each with why it needs it; empty when it can run.
    pub(crate) fn missing(&self) -> Vec<Capability> {
        let mut needed = REQUIRED.to_vec();
        if self.kernel < MEMCG_ACCOUNTING && !self.memlock_unlimited {
            needed.push(CAP_SYS_RESOURCE);
        }
        needed
            .into_iter()
            .filter(|cap| !self.effective.grants(*cap))
            .collect()
    }

    /// `error` (the kernel refusing to load the datapath), led by the capabilities that
    /// explain it, each with why it is needed and how to grant it.
    pub(crate) fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        let missing = self.missing();
        if missing.is_empty() {
            return error;
        }
        let reasons: Vec<String> = missing
            .iter()
            .map(|cap| format!("{} ({})", cap.name, cap.why))
            .collect();
        let names: Vec<&str> = missing
            .iter()
            .map(|cap| cap.name.trim_start_matches("CAP_"))
            .collect();
        error.context(format!(
            "missing capabilities: {}. Add {} to the container's securityContext.capabilities.add, or run as root (docs/deploy.md). The kernel said",
            reasons.join("; "),
            names.join(", ")
        ))
    }
}

/// Raises every permitted capability into the effective set (the image grants them as
/// permitted file capabilities) and notes what decides whether loading can succeed.
pub(crate) fn acquire() -> anyhow::Result<Privileges> {
    Ok(Privileges {
        effective: raise_permitted()
            .map_err(|error| anyhow::anyhow!("reading this process's capabilities: {error}"))?,
        kernel: KernelVersion::current()
            .map_err(|error| anyhow::anyhow!("reading the kernel version: {error}"))?,
        memlock_unlimited: memlock_hard_limit() == libc::RLIM_INFINITY,
    })
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`: two of them hold capabilities 0–31 and 32–63.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes the effective set equal the permitted one and returns it.
fn raise_permitted() -> io::Result<CapSet> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData for version 3, the size of `data`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for half in &mut data {
        half.effective = half.permitted;
    }
    // SAFETY: capset reads the header and two CapData; raising effective up to permitted is
    // always allowed.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CapSet(
        u64::from(data[0].effective) | u64::from(data[1].effective) << 32,
    ))
}

fn memlock_hard_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privileges(caps: &[Capability], kernel: (u8, u8), memlock_unlimited: bool) -> Privileges {
        Privileges {
            effective: CapSet::of(caps),
            kernel: KernelVersion::new(kernel.0, kernel.1, 0),
            memlock_unlimited,
        }
    }

    #[test]
    fn the_three_capabilities_suffice_on_a_memcg_kernel() {
        assert!(privileges(&REQUIRED, (6, 1), false).missing().is_empty());
    }

    #[test]
    fn each_missing_capability_is_named() {
        for cap in REQUIRED {
            let held: Vec<Capability> = REQUIRED.into_iter().filter(|c| *c != cap).collect();
            assert_eq!(privileges(&held, (6, 12), false).missing(), vec![cap]);
        }
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        let missing = privileges(&[CAP_SYS_ADMIN], (6, 6), false).missing();
        assert_eq!(missing, vec![CAP_NET_ADMIN]);
    }

    #[test]
    fn kernels_before_5_11_need_to_raise_memlock() {
        assert_eq!(
            privileges(&REQUIRED, (5, 10), false).missing(),
            vec![CAP_SYS_RESOURCE]
        );
        assert!(privileges(&REQUIRED, (5, 10), true).missing().is_empty());
        let mut al2 = REQUIRED.to_vec();
        al2.push(CAP_SYS_RESOURCE);
        assert!(privileges(&al2, (5, 10), false).missing().is_empty());
    }
}

//! A driver's private statistics, as `ethtool -S` shows them: the `SIOCETHTOOL` ioctl on a
//! socket of the calling thread's network namespace.
//!
//! Four requests: `ETHTOOL_GDRVINFO` (the driver's name), `ETHTOOL_GSSET_INFO` (how many
//! statistics the driver has), `ETHTOOL_GSTRINGS` (their names, set `ETH_SS_STATS`) and
//! `ETHTOOL_GSTATS` (their values, in the same order). The names and values are returned as
//! pairs: callers find a statistic by name, never by position, since the layout differs
//! between drivers, their versions and queue counts.
//!
//! The kernel writes as many names and values as the driver has *when it answers*, whatever
//! length the request announces, and the count can grow between two requests (more queues
//! after `ethtool -L`). So names and values are read into a [`GuardedBuffer`]: a mapping of its
//! own followed by a page nothing may write, where a longer answer makes the kernel's copy fail
//! (`EFAULT`) instead of overwriting memory. That answer, and one whose count differs from the
//! one asked for, is refused ([`EthtoolError::Changed`]); the next poll asks again.
//! No maintained crate reads these: the `ethtool` crate of rust-netlink speaks the ethtool
//! netlink family, which carries standard statistics groups but not a driver's private ones.
use std::{
    ffi::c_void,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
/// The string set of `ethtool -S`.
const ETH_SS_STATS: u32 = 1;
/// Bytes per name, NUL-padded.
const ETH_GSTRING_LEN: usize = 32;
/// Bytes of the name fields of `struct ethtool_drvinfo`.
const DRVINFO_NAME_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    #[error("cannot open a socket for SIOCETHTOOL: {0}")]
    Socket(io::Error),
    #[error("interface name {0:?} is too long for an ioctl (15 bytes at most)")]
    Name(String),
    #[error("SIOCETHTOOL {request} on {interface}: {source}")]
    Ioctl {
        interface: String,
        request: &'static str,
        source: io::Error,
    },
    #[error(
        "{interface}: the driver's statistics changed while they were read (its queues changed?); read again"
    )]
    Changed { interface: String },
    #[error("cannot map a buffer for the driver's statistics: {0}")]
    Buffer(io::Error),
}

/// `struct ifreq` with `ifr_data`, the member `SIOCETHTOOL` reads.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    /// The rest of the union (`struct ifmap` is the largest member, 24 bytes).
    _pad: [u8; 16],
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; DRVINFO_NAME_LEN],
    /// Version, firmware, bus, expansion ROM (32 bytes each), 12 reserved, five counts (u32):
    /// not read.
    _rest: [u8; 4 * DRVINFO_NAME_LEN + 12 + 5 * 4],
}

/// `struct ethtool_sset_info` asking for one set: its header and room for one count.
#[repr(C)]
struct SsetInfo {
    cmd: u32,
    reserved: u32,
    sset_mask: u64,
    count: u32,
}

/// Bytes of the header of `struct ethtool_gstrings` (cmd, string_set, len) before the names.
const GSTRINGS_HEADER: usize = 12;
/// Bytes of the header of `struct ethtool_stats` (cmd, n_stats) before the values.
const GSTATS_HEADER: usize = 8;

/// A socket to send `SIOCETHTOOL` on; interfaces are those of the namespace it was opened in.
pub struct Ethtool {
    socket: OwnedFd,
}

impl Ethtool {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, EthtoolError> {
        // SAFETY: socket takes no pointers; a non-negative result is a descriptor we own.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(EthtoolError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { socket })
    }

    /// The name of the driver behind `interface` (`ena`, `veth`, …); `None` for an interface
    /// without one to tell (`lo`).
    pub fn driver(&self, interface: &str) -> Result<Option<String>, EthtoolError> {
        let mut info = DrvInfo {
            cmd: ETHTOOL_GDRVINFO,
            driver: [0; DRVINFO_NAME_LEN],
            _rest: [0; 4 * DRVINFO_NAME_LEN + 12 + 5 * 4],
        };
        match self.request(interface, "ETHTOOL_GDRVINFO", (&raw mut info).cast()) {
            Ok(()) => Ok(Some(c_string(&info.driver))),
            Err(EthtoolError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Every private statistic of `interface` with its name, in the driver's order; empty
    /// when the driver has none.
    pub fn statistics(&self, interface: &str) -> Result<Vec<(String, u64)>, EthtoolError> {
        let count = self.count(interface)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let names = self.names(interface, count)?;
        let values = self.values(interface, count)?;
        Ok(names.into_iter().zip(values).collect())
    }

    /// How many statistics the driver has now (0 when it has no `ETH_SS_STATS` set).
    fn count(&self, interface: &str) -> Result<usize, EthtoolError> {
        let mut info = SsetInfo {
            cmd: ETHTOOL_GSSET_INFO,
            reserved: 0,
            sset_mask: 1 << ETH_SS_STATS,
            count: 0,
        };
        // The kernel writes one count per bit it keeps in the mask: at most the one asked.
        self.request(interface, "ETHTOOL_GSSET_INFO", (&raw mut info).cast())?;
        Ok(if info.sset_mask & (1 << ETH_SS_STATS) == 0 {
            0
        } else {
            info.count as usize
        })
    }

    fn names(&self, interface: &str, count: usize) -> Result<Vec<String>, EthtoolError> {
        let end = GSTRINGS_HEADER + count * ETH_GSTRING_LEN;
        let mut buffer = GuardedBuffer::new(end)?;
        put_u32s(
            buffer.bytes_mut(),
            &[ETHTOOL_GSTRINGS, ETH_SS_STATS, count as u32],
        );
        let data = buffer.as_mut_ptr();
        self.request_growing(interface, "ETHTOOL_GSTRINGS", data)?;
        check(interface, count, u32_at(buffer.bytes(), 8))?;
        Ok(buffer.bytes()[GSTRINGS_HEADER..end]
            .chunks_exact(ETH_GSTRING_LEN)
            .map(c_string)
            .collect())
    }

    fn values(&self, interface: &str, count: usize) -> Result<Vec<u64>, EthtoolError> {
        let end = GSTATS_HEADER + count * 8;
        let mut buffer = GuardedBuffer::new(end)?;
        put_u32s(buffer.bytes_mut(), &[ETHTOOL_GSTATS, count as u32]);
        let data = buffer.as_mut_ptr();
        self.request_growing(interface, "ETHTOOL_GSTATS", data)?;
        check(interface, count, u32_at(buffer.bytes(), 4))?;
        Ok(buffer.bytes()[GSTATS_HEADER..end]
            .chunks_exact(8)
            .map(|value| u64::from_ne_bytes(value.try_into().unwrap_or_default()))
            .collect())
    }

    /// A request whose answer is as long as the driver's statistics are now: a fault while
    /// the kernel copies it means they grew past the buffer since they were counted.
    fn request_growing(
        &self,
        interface: &str,
        request: &'static str,
        data: *mut c_void,
    ) -> Result<(), EthtoolError> {
        match self.request(interface, request, data) {
            Err(EthtoolError::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EFAULT) =>
            {
                Err(EthtoolError::Changed {
                    interface: interface.to_owned(),
                })
            }
            other => other,
        }
    }

    /// Sends one `SIOCETHTOOL` request whose structure (starting with its `cmd`) is at `data`.
    fn request(
        &self,
        interface: &str,
        request: &'static str,
        data: *mut c_void,
    ) -> Result<(), EthtoolError> {
        let mut ifreq = IfReq {
            name: [0; libc::IFNAMSIZ],
            data,
            _pad: [0; 16],
        };
        // One byte stays for the NUL.
        if interface.len() >= libc::IFNAMSIZ {
            return Err(EthtoolError::Name(interface.to_owned()));
        }
        ifreq.name[..interface.len()].copy_from_slice(interface.as_bytes());
        // SAFETY: `ifreq` names the interface and points at a request structure its caller
        // sized for what the kernel writes back (see the module's doc).
        let result =
            unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifreq) };
        if result < 0 {
            return Err(EthtoolError::Ioctl {
                interface: interface.to_owned(),
                request,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// Refuses an answer of another length than asked: names and values would not pair up.
fn check(interface: &str, expected: usize, got: u32) -> Result<(), EthtoolError> {
    if got as usize == expected {
        Ok(())
    } else {
        Err(EthtoolError::Changed {
            interface: interface.to_owned(),
        })
    }
}

/// Writes a request's header words at the start of `bytes`.
fn put_u32s(bytes: &mut [u8], words: &[u32]) {
    for (slot, word) in bytes.chunks_exact_mut(4).zip(words) {
        slot.copy_from_slice(&word.to_ne_bytes());
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

/// Memory the kernel may write past the end of without harm: whole pages of their own,
/// followed by one that cannot be written (`PROT_NONE`), so a copy running past them faults in
/// the kernel (`EFAULT`) instead of overwriting anything.
struct GuardedBuffer {
    base: *mut c_void,
    /// Writable bytes: what was asked for, rounded up to pages.
    len: usize,
    /// Mapped bytes: `len` and the guard page.
    mapped: usize,
}

impl GuardedBuffer {
    fn new(bytes: usize) -> Result<Self, EthtoolError> {
        // SAFETY: sysconf takes no pointers.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = bytes.max(1).div_ceil(page) * page;
        let mapped = len + page;
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(EthtoolError::Buffer(io::Error::last_os_error()));
        }
        let buffer = Self { base, len, mapped };
        // SAFETY: the last page of the mapping just made.
        if unsafe { libc::mprotect(base.cast::<u8>().add(len).cast(), page, libc::PROT_NONE) } != 0
        {
            return Err(EthtoolError::Buffer(io::Error::last_os_error()));
        }
        Ok(buffer)
    }

    fn as_mut_ptr(&mut self) -> *mut c_void {
        self.base
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `base`, zero-filled at mapping, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.base.cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.base.cast(), self.len) }
    }
}

impl Drop for GuardedBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        unsafe { libc::munmap(self.base, self.mapped) };
    }
}

/// A NUL-padded name as text.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structures_have_the_kernel_sizes() {
        assert_eq!(size_of::<IfReq>(), 40);
        assert_eq!(size_of::<DrvInfo>(), 196);
        assert_eq!(size_of::<SsetInfo>(), 24);
    }

    #[test]
    fn a_write_past_the_guarded_buffer_faults_instead_of_overwriting() {
        let mut buffer = GuardedBuffer::new(10).expect("mapping");
        assert!(buffer.bytes().len() >= 10);
        buffer.bytes_mut().fill(0xa5);
        // What the kernel does when it copies more than was mapped: `read` into the buffer
        // from /dev/zero, one byte more than its writable pages.
        let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
        let len = buffer.bytes().len();
        // SAFETY: the kernel checks the destination; past `len` it meets the guard page.
        let read = unsafe { libc::read(zero.as_raw_fd(), buffer.as_mut_ptr(), len + 1) };
        let error = io::Error::last_os_error();
        assert!(
            read == -1 && error.raw_os_error() == Some(libc::EFAULT) || read == len as isize,
            "read {read}: {error}"
        );
    }

    #[test]
    fn names_end_at_the_first_nul() {
        assert_eq!(c_string(b"ena\0\0\0"), "ena");
        assert_eq!(c_string(b"peer_ifindex"), "peer_ifindex");
    }
}

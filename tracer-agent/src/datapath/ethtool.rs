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
//! length the request announces. The count can grow between two requests (more queues after
//! `ethtool -L`), so the buffers have headroom ([`capacity`]) and an answer whose count differs
//! from the one asked for is refused ([`EthtoolError::Changed`]); the next poll asks again.
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
        "{interface}: the driver reported {got} statistics where it announced {expected} (its queues changed?); read again"
    )]
    Changed {
        interface: String,
        expected: usize,
        got: usize,
    },
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

/// Entries the names and values buffers hold when `count` are asked for: the kernel writes the
/// count of the moment, and a driver that gained queues meanwhile writes more. ENA has about
/// 35 statistics per queue pair and at most 32 pairs; twice the count plus 1024 covers going
/// from one pair to all.
fn capacity(count: usize) -> usize {
    2 * count + 1024
}

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
        // `struct ethtool_gstrings`: cmd, string_set, len, then the names; u32 words keep
        // the header aligned.
        const HEADER_WORDS: usize = 3;
        const WORDS_PER_NAME: usize = ETH_GSTRING_LEN / 4;
        let mut buffer = vec![0u32; HEADER_WORDS + capacity(count) * WORDS_PER_NAME];
        buffer[0] = ETHTOOL_GSTRINGS;
        buffer[1] = ETH_SS_STATS;
        buffer[2] = count as u32;
        self.request(interface, "ETHTOOL_GSTRINGS", buffer.as_mut_ptr().cast())?;
        let got = buffer[2] as usize;
        check(interface, count, got)?;
        let bytes: Vec<u8> = buffer[HEADER_WORDS..HEADER_WORDS + count * WORDS_PER_NAME]
            .iter()
            .flat_map(|word| word.to_ne_bytes())
            .collect();
        Ok(bytes.chunks_exact(ETH_GSTRING_LEN).map(c_string).collect())
    }

    fn values(&self, interface: &str, count: usize) -> Result<Vec<u64>, EthtoolError> {
        // `struct ethtool_stats`: cmd and n_stats in the first u64 word, then the values.
        let mut buffer = vec![0u64; 1 + capacity(count)];
        let header: *mut u32 = buffer.as_mut_ptr().cast();
        // SAFETY: the first u64 of the buffer holds the two u32 of the header.
        unsafe {
            header.write(ETHTOOL_GSTATS);
            header.add(1).write(count as u32);
        }
        self.request(interface, "ETHTOOL_GSTATS", buffer.as_mut_ptr().cast())?;
        // SAFETY: as above; the kernel wrote n_stats there.
        let got = unsafe { header.add(1).read() } as usize;
        check(interface, count, got)?;
        Ok(buffer[1..=count].to_vec())
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
fn check(interface: &str, expected: usize, got: usize) -> Result<(), EthtoolError> {
    if got == expected {
        Ok(())
    } else {
        Err(EthtoolError::Changed {
            interface: interface.to_owned(),
            expected,
            got,
        })
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
    fn names_end_at_the_first_nul() {
        assert_eq!(c_string(b"ena\0\0\0"), "ena");
        assert_eq!(c_string(b"peer_ifindex"), "peer_ifindex");
    }
}

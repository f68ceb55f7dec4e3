//! IP prefixes (`10.0.0.0/16`, `fd00::/8`): parsed strictly, compared cheaply.
use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR block like 10.0.0.0/16")]
    Syntax(String),
    #[error("{0:?}: prefix length larger than the address")]
    PrefixTooLong(String),
    #[error("{0:?} has host bits set (did you mean {1}?)")]
    HostBits(String, Cidr),
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix_len) == self.addr
    }

    /// The block's first address after the network address: in a service CIDR, the
    /// `kubernetes` service's ClusterIP.
    pub fn first_host(&self) -> IpAddr {
        self.host(1)
    }

    /// The block's `n`th address after the network address (base + n).
    pub fn host(&self, n: u8) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4).wrapping_add(n.into())).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6).wrapping_add(n.into())).into()),
        }
    }

    /// Whether some address lies in both blocks (one contains the other's network address).
    pub fn overlaps(&self, other: &Self) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

/// `addr` with every bit past `prefix_len` cleared.
fn masked(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix_len) = text.split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = prefix_len.parse().map_err(|_| syntax())?;
        if prefix_len > max_prefix(addr) {
            return Err(CidrError::PrefixTooLong(text.to_owned()));
        }
        let network = masked(addr, prefix_len);
        let cidr = Self {
            addr: network,
            prefix_len,
        };
        if network != addr {
            return Err(CidrError::HostBits(text.to_owned(), cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_contains() {
        let vpc: Cidr = "10.0.0.0/16".parse().unwrap();
        assert!(vpc.contains("10.0.255.1".parse().unwrap()));
        assert!(!vpc.contains("10.1.0.1".parse().unwrap()));
        assert!(!vpc.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6: Cidr = "2600:1f14::/56".parse().unwrap();
        assert!(v6.contains("2600:1f14:0:ff::1".parse().unwrap()));
        assert!(!v6.contains("2600:1f14:0:100::1".parse().unwrap()));
    }

    #[test]
    fn overlaps_only_within_one_family() {
        let block = |text: &str| text.parse::<Cidr>().unwrap();
        assert!(block("10.0.0.0/16").overlaps(&block("10.0.3.0/24")));
        assert!(block("10.0.3.0/24").overlaps(&block("10.0.0.0/16")));
        assert!(!block("10.0.0.0/16").overlaps(&block("10.100.0.0/16")));
        assert!(!block("0.0.0.0/0").overlaps(&block("::/0")));
        assert_eq!(
            block("10.100.0.0/16").first_host().to_string(),
            "10.100.0.1"
        );
        assert_eq!(
            block("fd00:10::/108").first_host().to_string(),
            "fd00:10::1"
        );
    }

    #[test]
    fn rejects_malformed_blocks() {
        assert!(matches!(
            "10.0.0.0".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong(_))
        ));
        assert!(matches!(
            "10.0.1.5/16".parse::<Cidr>(),
            Err(CidrError::HostBits(..))
        ));
    }
}

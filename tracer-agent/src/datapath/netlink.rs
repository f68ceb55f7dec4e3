//! A minimal synchronous netlink client, and the rtnetlink dumps of links, addresses and routes
//! built on it.
//!
//! The agent needs three facts from the kernel — which interfaces exist, which addresses are
//! the node's, and which /32 routes point at pod interfaces (that is how the VPC CNI wires
//! pods) — so a dump per poll is enough and needs no async netlink stack. The generic part
//! ([`Socket`], [`Message`], [`Attributes`], [`Attr`]) also serves the conntrack dump over
//! `NETLINK_NETFILTER` (see `conntrack`).
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a {protocol} socket: {source}")]
    Socket {
        protocol: &'static str,
        source: io::Error,
    },
    #[error("cannot subscribe to netlink change notifications: {0}")]
    Subscribe(io::Error),
    #[error("cannot send the netlink request: {0}")]
    Send(io::Error),
    #[error("cannot receive the netlink answer: {0}")]
    Recv(io::Error),
    #[error("the kernel did not answer the netlink request within {0:?}")]
    Timeout(Duration),
    #[error("netlink dump lost messages: the socket's receive buffer overflowed (ENOBUFS); retry")]
    Overrun,
    #[error("a netlink datagram of {0} bytes did not fit the receive buffer (MSG_TRUNC)")]
    Truncated(usize),
    /// An `NLMSG_ERROR` answer, or an `NLMSG_DONE` that reports a failed dump; `code` is the
    /// (positive) errno.
    #[error("the kernel refused the netlink request: {source}")]
    Kernel { code: i32, source: io::Error },
    #[error("netlink answer with sequence number {got}, expected {expected}")]
    Sequence { expected: u32, got: u32 },
    #[error("malformed netlink message: {what} at byte {offset} of a datagram")]
    Malformed { what: &'static str, offset: usize },
}

pub(crate) const NLMSG_HDRLEN: usize = 16;
const NLA_TYPE_MASK: u16 = !0xc000; // drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
/// Large enough for any datagram of a dump (the kernel fills at most ~32 KiB per datagram).
const RECV_BUFFER: usize = 64 * 1024;
/// The kernel answers at once; this only keeps a wedged kernel from hanging the agent's poll.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The netlink families this crate talks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `NETLINK_ROUTE`: links, addresses, routes.
    Route,
    /// `NETLINK_NETFILTER`: conntrack, among others.
    Netfilter,
}

impl Protocol {
    fn raw(self) -> libc::c_int {
        match self {
            Protocol::Route => libc::NETLINK_ROUTE,
            Protocol::Netfilter => libc::NETLINK_NETFILTER,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Route => "NETLINK_ROUTE",
            Protocol::Netfilter => "NETLINK_NETFILTER",
        }
    }
}

/// A netlink socket of the current network namespace, with a receive timeout.
pub struct Socket {
    socket: OwnedFd,
    seq: u32,
    buffer: Vec<u8>,
}

impl Socket {
    pub fn open(protocol: Protocol) -> Result<Socket, NetlinkError> {
        let error = |source| NetlinkError::Socket {
            protocol: protocol.name(),
            source,
        };
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol.raw(),
            )
        };
        if fd < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the option value is a valid timeval of the given size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        Ok(Socket {
            socket,
            seq: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// Sends a dump request — an `nlmsghdr` of `msg_type` with `NLM_F_REQUEST | NLM_F_DUMP`,
    /// followed by `header` (the family's fixed header: `ifinfomsg`, `nfgenmsg`…) — and reads
    /// the answer up to `NLMSG_DONE`, however many datagrams it takes. `parse` sees every
    /// message of the answer (control messages aside); what it returns is collected.
    ///
    /// After an error the socket may still hold the rest of the aborted dump: open a new one.
    pub fn dump<T>(
        &mut self,
        msg_type: u16,
        header: &[u8],
        parse: impl FnMut(Message<'_>) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        let mut items = Vec::new();
        self.dump_each(msg_type, header, collect(&mut items, parse))?;
        Ok(items)
    }

    /// Like [`dump`](Self::dump), but hands each message to `each` as its datagram arrives:
    /// only one datagram (the socket's buffer, reused) is held at a time, however large the
    /// answer, so a caller that keeps a few messages of a large table never holds all of it.
    pub fn dump_each(
        &mut self,
        msg_type: u16,
        header: &[u8],
        mut each: impl FnMut(Message<'_>) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        self.send(&dump_request(msg_type, self.seq, header))?;
        loop {
            let received = self.recv()?;
            if parse_datagram(&self.buffer[..received], self.seq, &mut each)? {
                return Ok(());
            }
        }
    }

    fn send(&self, request: &[u8]) -> Result<(), NetlinkError> {
        // SAFETY: the buffer is valid for its length; a zeroed sockaddr_nl addresses the kernel.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Send(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Joins multicast `groups` (`RTMGRP_*` bits): the kernel then sends a message on every
    /// change of what they cover, which [`Socket::link_changes`] reads.
    pub fn subscribe(&self, groups: u32) -> Result<(), NetlinkError> {
        // SAFETY: a zeroed sockaddr_nl with the family and groups set is a valid address.
        let bound = unsafe {
            let mut local: libc::sockaddr_nl = std::mem::zeroed();
            local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            local.nl_groups = groups;
            libc::bind(
                self.socket.as_raw_fd(),
                (&local as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(NetlinkError::Subscribe(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to the receive timeout for notifications of the subscribed groups and returns
    /// the links they announce (`RTM_NEWLINK`), or `Lost` when the kernel had to drop some
    /// (ENOBUFS); nothing on timeout. Other messages are stepped over.
    pub fn link_changes(&mut self) -> Result<Vec<LinkChange>, NetlinkError> {
        let received = match self.recv() {
            Ok(received) => received,
            Err(NetlinkError::Overrun) => return Ok(vec![LinkChange::Lost]),
            Err(NetlinkError::Timeout(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let links = announced_links(&self.buffer[..received])?;
        Ok(links.into_iter().map(LinkChange::New).collect())
    }

    /// Receives one datagram into the buffer and returns its length.
    fn recv(&mut self) -> Result<usize, NetlinkError> {
        loop {
            // SAFETY: the buffer is valid for its length. MSG_TRUNC makes recv return the
            // datagram's real length, so a datagram larger than the buffer is detected.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    libc::MSG_TRUNC,
                )
            };
            if received >= 0 {
                let received = received as usize;
                if received > self.buffer.len() {
                    return Err(NetlinkError::Truncated(received));
                }
                return Ok(received);
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => return Err(NetlinkError::Overrun),
                Some(libc::EAGAIN) => return Err(NetlinkError::Timeout(RECV_TIMEOUT)),
                _ => return Err(NetlinkError::Recv(error)),
            }
        }
    }
}

/// A dump request: `nlmsghdr` (`NLM_F_REQUEST | NLM_F_DUMP`) followed by `header`.
pub(crate) fn dump_request(msg_type: u16, seq: u32, header: &[u8]) -> Vec<u8> {
    let total = NLMSG_HDRLEN + header.len();
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut request = Vec::with_capacity(align4(total));
    request.extend_from_slice(&(total as u32).to_ne_bytes());
    request.extend_from_slice(&msg_type.to_ne_bytes());
    request.extend_from_slice(&flags.to_ne_bytes());
    request.extend_from_slice(&seq.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    request.extend_from_slice(header);
    request.resize(align4(total), 0);
    request
}

/// A message handler that collects what `parse` makes of each message into `items`.
fn collect<T>(
    items: &mut Vec<T>,
    mut parse: impl FnMut(Message<'_>) -> Result<Option<T>, NetlinkError>,
) -> impl FnMut(Message<'_>) -> Result<(), NetlinkError> {
    move |message| {
        items.extend(parse(message)?);
        Ok(())
    }
}

/// Parses one datagram of a dump answer, handing each message (control messages aside) to
/// `each`; true when the datagram ended the dump.
pub(crate) fn parse_datagram(
    data: &[u8],
    seq: u32,
    each: impl FnMut(Message<'_>) -> Result<(), NetlinkError>,
) -> Result<bool, NetlinkError> {
    parse_messages(data, Some(seq), each)
}

/// [`parse_datagram`], checking the sequence number of every message against `seq` when given.
fn parse_messages(
    data: &[u8],
    seq: Option<u32>,
    mut each: impl FnMut(Message<'_>) -> Result<(), NetlinkError>,
) -> Result<bool, NetlinkError> {
    let mut offset = 0;
    while offset < data.len() {
        let header: [u8; NLMSG_HDRLEN] =
            read(data, offset).ok_or_else(|| malformed("nlmsghdr", offset))?;
        let [l0, l1, l2, l3, k0, k1, f0, f1, s0, s1, s2, s3, ..] = header;
        let len = u32::from_ne_bytes([l0, l1, l2, l3]) as usize;
        let kind = u16::from_ne_bytes([k0, k1]);
        let msg_seq = u32::from_ne_bytes([s0, s1, s2, s3]);
        let payload = data
            .get(offset..)
            .and_then(|rest| rest.get(NLMSG_HDRLEN..len))
            .ok_or_else(|| malformed("nlmsghdr length", offset))?;
        if let Some(expected) = seq
            && msg_seq != expected
        {
            return Err(NetlinkError::Sequence {
                expected,
                got: msg_seq,
            });
        }
        let message = Message {
            kind,
            flags: u16::from_ne_bytes([f0, f1]),
            payload,
            offset: offset + NLMSG_HDRLEN,
        };
        match kind {
            // NLMSG_DONE carries the dump's own result: negative when the kernel gave up on it.
            k if k == libc::NLMSG_DONE as u16 => {
                return match read(payload, 0).map(i32::from_ne_bytes) {
                    Some(code) if code < 0 => Err(kernel(code)),
                    _ => Ok(true),
                };
            }
            k if k == libc::NLMSG_ERROR as u16 => {
                let code = read(payload, 0)
                    .map(i32::from_ne_bytes)
                    .ok_or_else(|| malformed("nlmsgerr", message.offset))?;
                if code != 0 {
                    return Err(kernel(code));
                }
            }
            k if k < libc::NLMSG_MIN_TYPE as u16 => {} // NOOP, OVERRUN: nothing to read
            _ => each(message)?,
        }
        offset += align4(len);
    }
    Ok(false)
}

/// One message of an answer, without its `nlmsghdr`.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub payload: &'a [u8],
    /// Where the payload starts in its datagram, for errors.
    pub offset: usize,
}

impl<'a> Message<'a> {
    /// Splits the payload into the family's fixed header of `N` bytes (`ifinfomsg`, `rtmsg`,
    /// `nfgenmsg`…), named `what` in errors, and the attributes that follow it.
    pub fn split<const N: usize>(
        &self,
        what: &'static str,
    ) -> Result<([u8; N], Attributes<'a>), NetlinkError> {
        let header = read(self.payload, 0).ok_or_else(|| malformed(what, self.offset))?;
        let start = align4(N).min(self.payload.len());
        Ok((
            header,
            Attributes::new(&self.payload[start..], self.offset + start),
        ))
    }
}

/// One netlink attribute; `offset` is where its value starts in the datagram.
#[derive(Clone, Copy, Debug)]
pub struct Attr<'a> {
    /// The type, without the `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` flags.
    pub kind: u16,
    pub value: &'a [u8],
    pub offset: usize,
}

impl<'a> Attr<'a> {
    /// The attributes nested in this one.
    pub fn nested(self) -> Attributes<'a> {
        Attributes::new(self.value, self.offset)
    }

    /// The value, which must be exactly `N` bytes long (`what` names it in the error).
    pub fn fixed<const N: usize>(self, what: &'static str) -> Result<[u8; N], NetlinkError> {
        self.value
            .try_into()
            .map_err(|_| malformed(what, self.offset))
    }

    pub fn u8(self) -> Result<u8, NetlinkError> {
        self.fixed::<1>("u8 attribute size").map(|[byte]| byte)
    }

    /// A big-endian (network order) `u16`, as ports are.
    pub fn be16(self) -> Result<u16, NetlinkError> {
        self.fixed("be16 attribute size").map(u16::from_be_bytes)
    }

    /// A host-order `u32`, as interface indexes and table ids are.
    pub fn u32(self) -> Result<u32, NetlinkError> {
        self.fixed("u32 attribute size").map(u32::from_ne_bytes)
    }

    /// An IPv4 or IPv6 address, told apart by its size.
    pub fn addr(self) -> Result<IpAddr, NetlinkError> {
        match <[u8; 4]>::try_from(self.value) {
            Ok(v4) => Ok(IpAddr::from(v4)),
            Err(_) => self.fixed::<16>("IP address size").map(IpAddr::from),
        }
    }

    /// A NUL-terminated string; bytes that are not UTF-8 are replaced.
    pub fn string(self) -> String {
        let bytes = self.value.split(|b| *b == 0).next().unwrap_or(&[]);
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Iterates over the attributes (`struct nlattr`, 4-byte aligned) of one level; a malformed
/// attribute yields an error and ends the iteration.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Attributes<'a> {
    /// The attributes in `data`, which starts at byte `offset` of its datagram.
    pub fn new(data: &'a [u8], offset: usize) -> Self {
        Attributes { data, offset }
    }

    fn parse_next(&mut self) -> Result<Attr<'a>, NetlinkError> {
        let [l0, l1, k0, k1] =
            read(self.data, 0).ok_or_else(|| malformed("nlattr header", self.offset))?;
        let len = u16::from_ne_bytes([l0, l1]) as usize;
        if len < 4 || len > self.data.len() {
            return Err(malformed("nlattr length", self.offset));
        }
        let attr = Attr {
            kind: u16::from_ne_bytes([k0, k1]) & NLA_TYPE_MASK,
            value: &self.data[4..len],
            offset: self.offset + 4,
        };
        // The last attribute's padding may be left out.
        let advance = align4(len).min(self.data.len());
        self.data = &self.data[advance..];
        self.offset += advance;
        Ok(attr)
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<Attr<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.is_empty() {
            return None;
        }
        let attr = self.parse_next();
        if attr.is_err() {
            self.data = &[];
        }
        Some(attr)
    }
}

fn malformed(what: &'static str, offset: usize) -> NetlinkError {
    NetlinkError::Malformed { what, offset }
}

/// The error of a negative errno as netlink reports it.
fn kernel(code: i32) -> NetlinkError {
    let code = code.checked_neg().unwrap_or(i32::MAX);
    NetlinkError::Kernel {
        code,
        source: io::Error::from_raw_os_error(code),
    }
}

/// `N` bytes of `data` from `at`, when it has them.
fn read<const N: usize>(data: &[u8], at: usize) -> Option<[u8; N]> {
    data.get(at..)?.get(..N)?.try_into().ok()
}

pub(crate) fn align4(len: usize) -> usize {
    (len + 3) & !3
}

// rtnetlink: from linux/rtnetlink.h, if_link.h, if_addr.h.
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_GETADDR: u16 = 22;
const RTM_GETROUTE: u16 = 26;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

/// What a link notification tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A link appeared in this namespace, or changed (state, name).
    New(Link),
    /// Notifications were lost: only a dump tells what changed.
    Lost,
}

/// An address configured on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
}

/// A route of the main table with a destination prefix and an output interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub oif: u32,
}

pub fn links() -> Result<Vec<Link>, NetlinkError> {
    // struct ifinfomsg: family, pad, type, index, flags, change — all zero.
    Socket::open(Protocol::Route)?.dump(RTM_GETLINK, &[0; IFINFOMSG_LEN], parse_link)
}

pub fn addresses() -> Result<Vec<Address>, NetlinkError> {
    // struct ifaddrmsg: family (AF_UNSPEC dumps all), prefixlen, flags, scope, index.
    Socket::open(Protocol::Route)?.dump(RTM_GETADDR, &[0; IFADDRMSG_LEN], parse_address)
}

pub fn routes() -> Result<Vec<Route>, NetlinkError> {
    // struct rtmsg: family (AF_UNSPEC dumps all), dst_len, src_len, tos, table, protocol,
    // scope, type, flags.
    Socket::open(Protocol::Route)?.dump(RTM_GETROUTE, &[0; RTMSG_LEN], parse_route)
}

/// The links a datagram of notifications announces (`RTM_NEWLINK`); other messages are
/// stepped over. Notifications carry the sequence number of the request that caused them, if
/// any: none is expected.
fn announced_links(data: &[u8]) -> Result<Vec<Link>, NetlinkError> {
    let mut links = Vec::new();
    parse_messages(
        data,
        None,
        collect(&mut links, |message| match message.kind {
            RTM_NEWLINK => parse_link(message),
            _ => Ok(None),
        }),
    )?;
    Ok(links)
}

/// An `RTM_NEWLINK`; None without a name.
fn parse_link(message: Message<'_>) -> Result<Option<Link>, NetlinkError> {
    let ([_, _, _, _, i0, i1, i2, i3, ..], attributes) =
        message.split::<IFINFOMSG_LEN>("ifinfomsg")?;
    let mut name = None;
    for attr in attributes {
        let attr = attr?;
        if attr.kind == IFLA_IFNAME {
            name = Some(attr.string());
        }
    }
    let index = u32::from_ne_bytes([i0, i1, i2, i3]);
    Ok(name.map(|name| Link { index, name }))
}

/// An `RTM_NEWADDR`; None for families other than IPv4 and IPv6, or without an address.
fn parse_address(message: Message<'_>) -> Result<Option<Address>, NetlinkError> {
    let ([family, _, _, _, i0, i1, i2, i3], attributes) =
        message.split::<IFADDRMSG_LEN>("ifaddrmsg")?;
    if !is_ip(family) {
        return Ok(None);
    }
    // IFA_LOCAL is the interface's own address on point-to-point links, IFA_ADDRESS elsewhere.
    let (mut local, mut address) = (None, None);
    for attr in attributes {
        let attr = attr?;
        match attr.kind {
            IFA_LOCAL => local = Some(attr.addr()?),
            IFA_ADDRESS => address = Some(attr.addr()?),
            _ => {}
        }
    }
    let index = u32::from_ne_bytes([i0, i1, i2, i3]);
    Ok(local.or(address).map(|addr| Address { index, addr }))
}

/// An `RTM_NEWROUTE`; None unless it is an IPv4 or IPv6 route of the main table with a
/// destination and a single output interface.
fn parse_route(message: Message<'_>) -> Result<Option<Route>, NetlinkError> {
    let ([family, prefix_len, _, _, table, ..], attributes) =
        message.split::<RTMSG_LEN>("rtmsg")?;
    if !is_ip(family) {
        return Ok(None);
    }
    let mut table = u32::from(table);
    let (mut dst, mut oif) = (None, None);
    for attr in attributes {
        let attr = attr?;
        match attr.kind {
            RTA_DST => dst = Some(attr.addr()?),
            RTA_OIF => oif = Some(attr.u32()?),
            RTA_TABLE => table = attr.u32()?,
            _ => {}
        }
    }
    Ok(match (dst, oif, table) {
        (Some(dst), Some(oif), RT_TABLE_MAIN) => Some(Route {
            dst,
            prefix_len,
            oif,
        }),
        _ => None,
    })
}

fn is_ip(family: u8) -> bool {
    matches!(i32::from(family), libc::AF_INET | libc::AF_INET6)
}

/// Builders of netlink bytes as the kernel sends them, for the tests of this crate.
#[cfg(test)]
pub(crate) mod bytes {
    use super::{NLMSG_HDRLEN, align4};

    /// The sequence number of every message [`message`] builds.
    pub const SEQ: u32 = 7;
    pub const NLA_F_NESTED: u16 = 0x8000;

    pub fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    pub fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | NLA_F_NESTED, &children.concat())
    }

    /// A message of a dump answer (`NLM_F_MULTI`, sequence number [`SEQ`]).
    pub fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        bytes.extend_from_slice(&SEQ.to_ne_bytes());
        bytes.extend_from_slice(&1234u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    /// The `NLMSG_DONE` that ends a dump, reporting `code` (0, or a negative errno).
    pub fn done_with(code: i32) -> Vec<u8> {
        message(libc::NLMSG_DONE as u16, &code.to_ne_bytes())
    }

    pub fn done() -> Vec<u8> {
        done_with(0)
    }
}

#[cfg(test)]
mod tests {
    use super::{bytes::*, *};

    const RTM_NEWADDR: u16 = 20;
    const RTM_NEWROUTE: u16 = 24;
    const IFLA_MTU: u16 = 4;
    const RTA_GATEWAY: u16 = 5;

    fn parse<T>(
        data: &[u8],
        parse: impl FnMut(Message<'_>) -> Result<Option<T>, NetlinkError>,
    ) -> Result<(bool, Vec<T>), NetlinkError> {
        let mut items = Vec::new();
        let done = parse_datagram(data, SEQ, collect(&mut items, parse))?;
        Ok((done, items))
    }

    fn link_message(index: u32, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![libc::AF_UNSPEC as u8, 0, 1, 0]; // family, pad, ARPHRD_ETHER
        payload.extend(index.to_ne_bytes());
        payload.extend([0; 8]); // flags, change
        payload.extend(attributes.concat());
        message(RTM_NEWLINK, &payload)
    }

    fn address_message(family: i32, index: u32, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![family as u8, 24, 0, 0];
        payload.extend(index.to_ne_bytes());
        payload.extend(attributes.concat());
        message(RTM_NEWADDR, &payload)
    }

    fn route_message(family: i32, prefix_len: u8, table: u8, attributes: &[Vec<u8>]) -> Vec<u8> {
        // family, dst_len, src_len, tos, table, protocol (boot), scope (link), type (unicast).
        let mut payload = vec![family as u8, prefix_len, 0, 0, table, 3, 253, 1];
        payload.extend(0u32.to_ne_bytes()); // flags
        payload.extend(attributes.concat());
        message(RTM_NEWROUTE, &payload)
    }

    /// The bytes of an address as netlink carries it.
    fn octets(text: &str) -> Vec<u8> {
        match ip(text) {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
        }
    }

    #[test]
    fn links_by_name_and_index() {
        let bytes = [
            link_message(
                1,
                &[
                    attr(IFLA_IFNAME, b"lo\0"),
                    attr(IFLA_MTU, &65536u32.to_ne_bytes()),
                ],
            ),
            link_message(7, &[attr(IFLA_MTU, &9001u32.to_ne_bytes())]), // no name: left out
            link_message(12, &[attr(IFLA_IFNAME, b"eni1a2b3c4d5e6\0")]),
            done(),
        ]
        .concat();
        let (done, links) = parse(&bytes, parse_link).unwrap();
        assert!(done);
        assert_eq!(links, vec![link(1, "lo"), link(12, "eni1a2b3c4d5e6")]);
    }

    #[test]
    fn notifications_announce_new_links_whatever_their_sequence_number() {
        let new_address = address_message(libc::AF_INET, 12, &[attr(IFA_LOCAL, &[10, 0, 0, 5])]);
        let mut new_link = link_message(12, &[attr(IFLA_IFNAME, b"eni1a2b3c4d5e6\0")]);
        // Caused by a request with sequence number 99 (`ip link add`).
        new_link[8..12].copy_from_slice(&99u32.to_ne_bytes());
        let bytes = [new_address, new_link].concat();
        assert_eq!(
            announced_links(&bytes).unwrap(),
            vec![link(12, "eni1a2b3c4d5e6")]
        );
    }

    #[test]
    fn addresses_prefer_the_local_one() {
        let bytes = [
            address_message(
                libc::AF_INET,
                2,
                &[
                    attr(IFA_ADDRESS, &octets("10.0.0.10")),
                    attr(IFA_LOCAL, &octets("10.0.0.10")),
                ],
            ),
            // Point-to-point: IFA_ADDRESS is the peer's.
            address_message(
                libc::AF_INET,
                3,
                &[
                    attr(IFA_ADDRESS, &octets("10.0.9.1")),
                    attr(IFA_LOCAL, &octets("10.0.9.2")),
                ],
            ),
            address_message(
                libc::AF_INET6,
                2,
                &[attr(IFA_ADDRESS, &octets("2001:db8::a"))],
            ),
            // Not an IP family (AF_MCTP's addresses are one byte): left out, not an error.
            address_message(45, 4, &[attr(IFA_LOCAL, &[8])]),
            done(),
        ]
        .concat();
        let (_, addresses) = parse(&bytes, parse_address).unwrap();
        assert_eq!(
            addresses,
            vec![
                Address {
                    index: 2,
                    addr: ip("10.0.0.10")
                },
                Address {
                    index: 3,
                    addr: ip("10.0.9.2")
                },
                Address {
                    index: 2,
                    addr: ip("2001:db8::a")
                },
            ]
        );
    }

    #[test]
    fn routes_of_the_main_table_with_an_interface() {
        let main = RT_TABLE_MAIN as u8;
        let pod = route_message(
            libc::AF_INET,
            32,
            main,
            &[
                attr(RTA_TABLE, &RT_TABLE_MAIN.to_ne_bytes()),
                attr(RTA_DST, &octets("10.0.1.5")),
                attr(RTA_OIF, &9u32.to_ne_bytes()),
            ],
        );
        let default = route_message(
            libc::AF_INET,
            0,
            main,
            &[
                attr(RTA_GATEWAY, &octets("10.0.0.1")),
                attr(RTA_OIF, &2u32.to_ne_bytes()),
            ],
        );
        let local_table = route_message(
            libc::AF_INET,
            32,
            255,
            &[
                attr(RTA_DST, &octets("10.0.0.10")),
                attr(RTA_OIF, &2u32.to_ne_bytes()),
            ],
        );
        // RTA_TABLE overrides rtm_table, which cannot hold ids above 255.
        let big_table = route_message(
            libc::AF_INET,
            32,
            main,
            &[
                attr(RTA_TABLE, &1000u32.to_ne_bytes()),
                attr(RTA_DST, &octets("10.0.1.6")),
                attr(RTA_OIF, &9u32.to_ne_bytes()),
            ],
        );
        // An MPLS route's RTA_DST is a label, not an address.
        let mpls = route_message(
            28,
            20,
            main,
            &[
                attr(RTA_DST, &[0, 1, 0x41, 0]),
                attr(RTA_OIF, &9u32.to_ne_bytes()),
            ],
        );
        let bytes = [pod, default, local_table, big_table, mpls, done()].concat();
        let (done, routes) = parse(&bytes, parse_route).unwrap();
        assert!(done);
        assert_eq!(
            routes,
            vec![Route {
                dst: ip("10.0.1.5"),
                prefix_len: 32,
                oif: 9
            }]
        );
    }

    #[test]
    fn malformed_rtnetlink_is_an_error() {
        let bad_address = address_message(libc::AF_INET, 2, &[attr(IFA_LOCAL, &[10, 0, 0])]);
        let error = parse(&bad_address, parse_address).unwrap_err();
        assert!(
            matches!(
                error,
                NetlinkError::Malformed {
                    what: "IP address size",
                    offset: 28
                }
            ),
            "{error}"
        );

        let bad_oif = route_message(
            libc::AF_INET,
            32,
            RT_TABLE_MAIN as u8,
            &[attr(RTA_DST, &octets("10.0.1.5")), attr(RTA_OIF, &[9, 0])],
        );
        assert!(matches!(
            parse(&bad_oif, parse_route),
            Err(NetlinkError::Malformed {
                what: "u32 attribute size",
                ..
            })
        ));

        // An attribute that claims more than the message holds, after a good one: the old
        // iterator stopped there silently and kept the name.
        let mut overlong = link_message(
            3,
            &[
                attr(IFLA_IFNAME, b"eth0\0"),
                attr(IFLA_MTU, &1500u32.to_ne_bytes()),
            ],
        );
        let mtu = NLMSG_HDRLEN + IFINFOMSG_LEN + 12;
        overlong[mtu..mtu + 2].copy_from_slice(&64u16.to_ne_bytes());
        let error = parse(&overlong, parse_link).unwrap_err();
        assert!(
            matches!(
                error,
                NetlinkError::Malformed {
                    what: "nlattr length",
                    offset
                } if offset == mtu
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!("malformed netlink message: nlattr length at byte {mtu} of a datagram")
        );

        let short = message(RTM_NEWROUTE, &[libc::AF_INET as u8, 32, 0, 0]);
        assert!(matches!(
            parse(&short, parse_route),
            Err(NetlinkError::Malformed { what: "rtmsg", .. })
        ));
    }

    #[test]
    fn truncated_rtnetlink_at_every_offset() {
        let first = link_message(1, &[attr(IFLA_IFNAME, b"lo\0")]);
        let bytes = [
            first.clone(),
            link_message(2, &[attr(IFLA_IFNAME, b"eth0\0")]),
        ]
        .concat();
        for cut in 0..bytes.len() {
            match parse(&bytes[..cut], parse_link) {
                Ok((false, _)) if cut == 0 || cut == first.len() => {}
                Err(NetlinkError::Malformed { .. }) if cut != 0 && cut != first.len() => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn control_messages_and_dump_results() {
        // NOOP and a zero nlmsgerr (an ack) are stepped over.
        let noop = message(libc::NLMSG_NOOP as u16, &[]);
        let ack = message(libc::NLMSG_ERROR as u16, &0i32.to_ne_bytes());
        let lo = link_message(1, &[attr(IFLA_IFNAME, b"lo\0")]);
        let (ended, links) = parse(&[noop, ack, lo, done()].concat(), parse_link).unwrap();
        assert!(ended);
        assert_eq!(links, vec![link(1, "lo")]);

        // A dump the kernel gave up on ends in NLMSG_DONE with a negative errno.
        let error = parse(&done_with(-libc::EMSGSIZE), parse_link).unwrap_err();
        assert!(
            matches!(
                error,
                NetlinkError::Kernel {
                    code: libc::EMSGSIZE,
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("Message too long"), "{error}");

        let error = parse_datagram(&done(), SEQ + 1, |_| Ok(())).unwrap_err();
        assert!(matches!(
            error,
            NetlinkError::Sequence {
                expected: 8,
                got: SEQ
            }
        ));
    }

    #[test]
    fn nested_attributes_and_their_offsets() {
        let inner = [attr(1, &[5]), attr(2, &443u16.to_be_bytes())];
        let data = [attr(9, b"x"), nested(3, &inner)].concat();
        let attrs: Vec<Attr<'_>> = Attributes::new(&data, 100).map(Result::unwrap).collect();
        assert_eq!(
            attrs.iter().map(|a| (a.kind, a.offset)).collect::<Vec<_>>(),
            vec![(9, 104), (3, 112)]
        );
        let children: Vec<Attr<'_>> = attrs[1].nested().map(Result::unwrap).collect();
        assert_eq!((children[0].kind, children[0].offset), (1, 116));
        assert_eq!(children[0].u8().unwrap(), 5);
        assert_eq!(children[1].be16().unwrap(), 443);
        assert!(matches!(
            children[1].u32(),
            Err(NetlinkError::Malformed {
                what: "u32 attribute size",
                offset: 124
            })
        ));
    }

    #[test]
    fn request_bytes() {
        let request = dump_request(RTM_GETROUTE, 3, &[libc::AF_INET as u8, 0]);
        assert_eq!(request.len(), 20);
        assert_eq!(request[..4], 18u32.to_ne_bytes());
        assert_eq!(request[4..6], RTM_GETROUTE.to_ne_bytes());
        assert_eq!(
            request[6..8],
            ((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes()
        );
        assert_eq!(request[8..12], 3u32.to_ne_bytes());
        assert_eq!(request[16..], [libc::AF_INET as u8, 0, 0, 0]);
    }

    /// The dumps of this process's own namespace, through a real socket: every namespace has a
    /// loopback interface, and reading it needs no privilege.
    #[test]
    fn live_dumps_of_this_namespace() {
        let links = links().unwrap();
        assert!(links.iter().any(|link| link.name == "lo"), "{links:?}");
        addresses().unwrap();
        routes().unwrap();

        // One socket serves several dumps, each with its own sequence number.
        let mut socket = Socket::open(Protocol::Route).unwrap();
        for _ in 0..3 {
            let again = socket
                .dump(RTM_GETLINK, &[0; IFINFOMSG_LEN], parse_link)
                .unwrap();
            assert!(again.iter().any(|link| link.name == "lo"), "{again:?}");
        }
    }
}

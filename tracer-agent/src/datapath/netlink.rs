//! A small synchronous netlink client on the rust-netlink crates, and the rtnetlink dumps of
//! links, addresses and routes built on it.
//!
//! The agent needs three facts from the kernel — which interfaces exist, which addresses are
//! the node's, and which /32 routes point at pod interfaces (that is how the VPC CNI wires
//! pods) — so a dump per poll is enough and needs no async netlink stack. `netlink-sys`
//! provides the socket, `netlink-packet-core` the message framing and `netlink-packet-route`
//! the rtnetlink messages; [`Socket`] adds what the agent relies on: a receive timeout, typed
//! errors, sequence checks and dumps read datagram by datagram. It also serves the conntrack
//! dump over `NETLINK_NETFILTER` (see `conntrack`).
use std::{io, net::IpAddr, os::fd::AsRawFd as _, time::Duration};

use aya::programs::TcAttachType;
use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, Parseable as _,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage},
    tc::TcHeader,
};
use netlink_sys::{SocketAddr, protocols};

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
    /// A message that does not parse; `offset` is where it starts in its datagram.
    #[error("malformed netlink message at byte {offset} of a datagram: {source}")]
    Malformed { offset: usize, source: DecodeError },
}

/// Large enough for any datagram of a dump (the kernel fills at most ~32 KiB per datagram).
const RECV_BUFFER: usize = 64 * 1024;
/// The receive buffer of a subscribed socket: some 10,000 notifications.
const NOTIFICATION_BUFFER: usize = 4 << 20;
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
    fn raw(self) -> isize {
        match self {
            Self::Route => protocols::NETLINK_ROUTE,
            Self::Netfilter => protocols::NETLINK_NETFILTER,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Route => "NETLINK_ROUTE",
            Self::Netfilter => "NETLINK_NETFILTER",
        }
    }
}

/// A netlink socket of the current network namespace, with a receive timeout.
pub struct Socket {
    socket: netlink_sys::Socket,
    seq: u32,
    buffer: Vec<u8>,
}

impl Socket {
    pub fn open(protocol: Protocol) -> Result<Self, NetlinkError> {
        let error = |source| NetlinkError::Socket {
            protocol: protocol.name(),
            source,
        };
        let socket = netlink_sys::Socket::new(protocol.raw()).map_err(error)?;
        set_receive_timeout(&socket, RECV_TIMEOUT).map_err(error)?;
        Ok(Self {
            socket,
            seq: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// Sends `request` as a dump (`NLM_F_REQUEST | NLM_F_DUMP`) and collects the answer up to
    /// `NLMSG_DONE`, however many datagrams it takes (control messages aside).
    ///
    /// After an error the socket may still hold the rest of the aborted dump: open a new one.
    pub fn dump<A: NetlinkDeserializable>(
        &mut self,
        request: impl NetlinkSerializable,
    ) -> Result<Vec<A>, NetlinkError> {
        let mut items = Vec::new();
        self.dump_each(request, |item| {
            items.push(item);
            Ok(())
        })?;
        Ok(items)
    }

    /// Like [`dump`](Self::dump), but hands each message to `each` as its datagram arrives:
    /// only one datagram (the socket's buffer, reused) is held at a time, however large the
    /// answer, so a caller that keeps a few messages of a large table never holds all of it.
    pub fn dump_each<A: NetlinkDeserializable>(
        &mut self,
        request: impl NetlinkSerializable,
        mut each: impl FnMut(A) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let request = dump_request(request, self.seq);
        self.socket
            .send_to(&request, &SocketAddr::new(0, 0), 0)
            .map_err(NetlinkError::Send)?;
        loop {
            let received = self.recv()?;
            if parse_datagram(&self.buffer[..received], Some(self.seq), &mut each)? {
                return Ok(());
            }
        }
    }

    /// Joins multicast `groups` (`RTMGRP_*` bits): the kernel then sends a message on every
    /// change of what they cover, which [`Socket::changes`] reads. The receive buffer grows
    /// to `NOTIFICATION_BUFFER` first (with CAP_NET_ADMIN, past `net.core.rmem_max`): a
    /// burst — the agent's own filters at start-up, a CNI plumbing many pods — must not
    /// overflow it, since what is lost is known only by a full scan.
    pub fn subscribe(&mut self, groups: u32) -> Result<(), NetlinkError> {
        let size = NOTIFICATION_BUFFER as libc::c_int;
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: the option value is a valid int of the given size.
            let set = unsafe {
                libc::setsockopt(
                    self.socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set == 0 {
                break;
            }
        }
        self.socket
            .bind(&SocketAddr::new(0, groups))
            .map_err(NetlinkError::Subscribe)
    }

    /// Waits up to the receive timeout for notifications of the subscribed groups and returns
    /// the links (`RTM_NEWLINK`) and tc filters (`RTM_NEWTFILTER`) they announce, or `Lost`
    /// when the kernel had to drop some (ENOBUFS); nothing on timeout. Other messages are
    /// stepped over.
    pub fn changes(&mut self) -> Result<Vec<Change>, NetlinkError> {
        let received = match self.recv() {
            Ok(received) => received,
            Err(NetlinkError::Overrun) => return Ok(vec![Change::Lost]),
            Err(NetlinkError::Timeout(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        announced(&self.buffer[..received])
    }

    /// Receives one datagram into the buffer and returns its length.
    fn recv(&mut self) -> Result<usize, NetlinkError> {
        loop {
            // MSG_TRUNC makes recv return the datagram's real length, so a datagram larger
            // than the buffer is detected.
            match self
                .socket
                .recv(&mut self.buffer.as_mut_slice(), libc::MSG_TRUNC)
            {
                Ok(received) if received > self.buffer.len() => {
                    return Err(NetlinkError::Truncated(received));
                }
                Ok(received) => return Ok(received),
                Err(error) => match error.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => return Err(NetlinkError::Overrun),
                    Some(libc::EAGAIN) => return Err(NetlinkError::Timeout(RECV_TIMEOUT)),
                    _ => return Err(NetlinkError::Recv(error)),
                },
            }
        }
    }
}

/// `SO_RCVTIMEO`, which `netlink-sys` does not wrap.
fn set_receive_timeout(socket: &netlink_sys::Socket, timeout: Duration) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the option value is a valid timeval of the given size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes of a dump request: `request` behind an `nlmsghdr` with `NLM_F_REQUEST | NLM_F_DUMP`.
pub(crate) fn dump_request(request: impl NetlinkSerializable, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Parses one datagram of an answer, handing each message (control messages aside) to `each`;
/// true when the datagram ended a dump. The sequence number of every message must be `seq`
/// when given (a dump's answer), and is not checked otherwise (notifications).
pub(crate) fn parse_datagram<A: NetlinkDeserializable>(
    data: &[u8],
    seq: Option<u32>,
    mut each: impl FnMut(A) -> Result<(), NetlinkError>,
) -> Result<bool, NetlinkError> {
    let mut offset = 0;
    while let Some(rest) = data.get(offset..).filter(|rest| !rest.is_empty()) {
        let malformed = |source| NetlinkError::Malformed { offset, source };
        let buffer = NetlinkBuffer::new_checked(&rest).map_err(malformed)?;
        if let Some(expected) = seq
            && buffer.sequence_number() != expected
        {
            return Err(NetlinkError::Sequence {
                expected,
                got: buffer.sequence_number(),
            });
        }
        let message = NetlinkMessage::<A>::parse(&buffer).map_err(malformed)?;
        match message.payload {
            // NLMSG_DONE carries the dump's own result: negative when the kernel gave up on it.
            NetlinkPayload::Done(done) if done.code < 0 => return Err(kernel(done.code)),
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => {
                if let Some(code) = error.code {
                    return Err(kernel(code.get()));
                }
            }
            NetlinkPayload::InnerMessage(inner) => each(inner)?,
            _ => {} // NOOP, OVERRUN: nothing to read
        }
        offset += align4(message.header.length as usize);
    }
    Ok(false)
}

/// The error of a negative errno as netlink reports it.
fn kernel(code: i32) -> NetlinkError {
    let code = code.checked_neg().unwrap_or(i32::MAX);
    NetlinkError::Kernel {
        code,
        source: io::Error::from_raw_os_error(code),
    }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The `local` routing table's id (`RT_TABLE_LOCAL`): the node's own addresses and
/// broadcasts, no route to anywhere else.
const RT_TABLE_LOCAL: u32 = 255;
/// The families of [`addresses`] and [`routes`], dumped one at a time.
const IP_FAMILIES: [AddressFamily; 2] = [AddressFamily::Inet, AddressFamily::Inet6];

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Packets received plus transmitted, from the kernel's own counters (`IFLA_STATS64`);
    /// None when the message carries none. What blindness is judged against (`blindness`).
    pub packets: Option<u64>,
}

/// What a notification tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A link appeared in this namespace, or changed (state, name).
    Link(Link),
    /// A tc filter was added (or replaced) on a hook of the clsact qdisc.
    Filter(FilterAdded),
    /// Notifications were lost: only a dump tells what changed.
    Lost,
}

/// A tc filter added on a clsact hook, as its `RTM_NEWTFILTER` header tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterAdded {
    pub index: u32,
    pub hook: TcAttachType,
    /// Lower runs first; within one priority, the newest filter runs first.
    pub priority: u16,
    pub handle: u32,
}

/// The `tcm_parent` of clsact's two hooks: `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// One notification, read only as far as the agent needs it: of a tc filter, the header
/// alone (its options, actions and statistics are none of the agent's business, and a kind
/// the crates do not know must not stop the watch).
enum Notice {
    Change(Change),
    Other,
}

impl NetlinkDeserializable for Notice {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        match header.message_type {
            libc::RTM_NEWLINK => Ok(link_of(RouteNetlinkMessage::deserialize(header, payload)?)
                .map_or(Self::Other, |link| Self::Change(Change::Link(link)))),
            libc::RTM_NEWTFILTER => {
                let tc = TcHeader::parse(payload)?;
                let hook = match u32::from(tc.parent) {
                    CLSACT_INGRESS => TcAttachType::Ingress,
                    CLSACT_EGRESS => TcAttachType::Egress,
                    _ => return Ok(Self::Other),
                };
                Ok(Self::Change(Change::Filter(FilterAdded {
                    index: tc.index as u32,
                    hook,
                    priority: (tc.info >> 16) as u16,
                    handle: u32::from(tc.handle),
                })))
            }
            _ => Ok(Self::Other),
        }
    }
}

/// An address configured on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
}

/// A route with a destination prefix and an output interface, of any table but `local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub oif: u32,
}

pub fn links() -> Result<Vec<Link>, NetlinkError> {
    let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
    let answer: Vec<RouteNetlinkMessage> = Socket::open(Protocol::Route)?.dump(request)?;
    Ok(answer.into_iter().filter_map(link_of).collect())
}

pub fn addresses() -> Result<Vec<Address>, NetlinkError> {
    ip_dumps(
        |family| {
            let mut request = AddressMessage::default();
            request.header.family = family;
            RouteNetlinkMessage::GetAddress(request)
        },
        address_of,
    )
}

/// The routes of every table but `local`: the VPC CNI puts a branch-ENI pod's host route
/// (security groups for pods) in its VLAN's table, not the main one. A route's table id can be
/// above 255, which only its `RTA_TABLE` tells.
pub fn routes() -> Result<Vec<Route>, NetlinkError> {
    ip_dumps(
        |family| {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            RouteNetlinkMessage::GetRoute(request)
        },
        route_of,
    )
}

/// Dumps `request(family)` for IPv4, then IPv6, keeping what `item` makes of each answer.
/// A dump of every family (`AF_UNSPEC`) would also bring families whose attributes are not IP
/// addresses (MPLS routes, MCTP addresses); `item` is told the family asked for because a
/// kernel without IPv6 answers an IPv6 dump with every family.
fn ip_dumps<T>(
    request: impl Fn(AddressFamily) -> RouteNetlinkMessage,
    item: impl Fn(RouteNetlinkMessage, AddressFamily) -> Option<T>,
) -> Result<Vec<T>, NetlinkError> {
    let mut socket = Socket::open(Protocol::Route)?;
    let mut items = Vec::new();
    for family in IP_FAMILIES {
        socket.dump_each(request(family), |message| {
            items.extend(item(message, family));
            Ok(())
        })?;
    }
    Ok(items)
}

/// The links and tc filters a datagram of notifications announces; other messages are
/// stepped over. Notifications carry the sequence number of the request that caused them, if
/// any: none is expected.
fn announced(data: &[u8]) -> Result<Vec<Change>, NetlinkError> {
    let mut changes = Vec::new();
    parse_datagram(data, None, |notice| {
        if let Notice::Change(change) = notice {
            changes.push(change);
        }
        Ok(())
    })?;
    Ok(changes)
}

/// The link of an `RTM_NEWLINK`; None for other messages, or without a name.
fn link_of(message: RouteNetlinkMessage) -> Option<Link> {
    let RouteNetlinkMessage::NewLink(link) = message else {
        return None;
    };
    let (mut name, mut packets) = (None, None);
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(text) => name = Some(text),
            LinkAttribute::Stats64(stats) => {
                packets = Some(stats.rx_packets.wrapping_add(stats.tx_packets));
            }
            _ => {}
        }
    }
    name.map(|name| Link {
        index: link.header.index,
        name,
        packets,
    })
}

/// The address of an `RTM_NEWADDR` of `family`; None for other messages.
fn address_of(message: RouteNetlinkMessage, family: AddressFamily) -> Option<Address> {
    let RouteNetlinkMessage::NewAddress(address) = message else {
        return None;
    };
    if address.header.family != family {
        return None;
    }
    // IFA_LOCAL is the interface's own address on point-to-point links, IFA_ADDRESS elsewhere.
    let (mut local, mut peer) = (None, None);
    for attribute in address.attributes {
        match attribute {
            AddressAttribute::Local(addr) => local = Some(addr),
            AddressAttribute::Address(addr) => peer = Some(addr),
            _ => {}
        }
    }
    local.or(peer).map(|addr| Address {
        index: address.header.index,
        addr,
    })
}

/// The route of an `RTM_NEWROUTE` of `family`; None unless it has a destination and a single
/// output interface and is not in the `local` table.
fn route_of(message: RouteNetlinkMessage, family: AddressFamily) -> Option<Route> {
    let RouteNetlinkMessage::NewRoute(route) = message else {
        return None;
    };
    if route.header.address_family != family {
        return None;
    }
    // RTA_TABLE overrides rtm_table, which cannot hold ids above 255.
    let mut table = u32::from(route.header.table);
    let (mut dst, mut oif) = (None, None);
    for attribute in route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(v6)),
            RouteAttribute::Oif(index) => oif = Some(index),
            RouteAttribute::Table(id) => table = id,
            _ => {}
        }
    }
    match (dst, oif) {
        (Some(dst), Some(oif)) if table != RT_TABLE_LOCAL => Some(Route {
            dst,
            prefix_len: route.header.destination_prefix_length,
            oif,
        }),
        _ => None,
    }
}

/// Builders of netlink bytes as the kernel sends them, for the tests of this crate.
#[cfg(test)]
pub(crate) mod bytes {
    use netlink_packet_core::{
        DefaultNla, Emitable, NLA_F_NESTED, NLM_F_MULTIPART, NLMSG_DONE, NetlinkHeader,
    };

    use super::align4;

    /// The sequence number of every message [`message`] builds.
    pub(crate) const SEQ: u32 = 7;
    const NLMSG_HDRLEN: usize = 16;

    pub(crate) fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        emit(&DefaultNla::new(kind, value.to_vec()))
    }

    pub(crate) fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | NLA_F_NESTED, &children.concat())
    }

    /// A message of a dump answer (`NLM_F_MULTI`, sequence number [`SEQ`]).
    pub(crate) fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.length = (NLMSG_HDRLEN + payload.len()) as u32;
        header.message_type = kind;
        header.flags = NLM_F_MULTIPART;
        header.sequence_number = SEQ;
        header.port_number = 1234;
        let mut bytes = emit(&header);
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    /// The `NLMSG_DONE` that ends a dump, reporting `code` (0, or a negative errno).
    pub(crate) fn done_with(code: i32) -> Vec<u8> {
        message(NLMSG_DONE, &code.to_ne_bytes())
    }

    pub(crate) fn done() -> Vec<u8> {
        done_with(0)
    }

    fn emit(item: &impl Emitable) -> Vec<u8> {
        let mut bytes = vec![0; item.buffer_len()];
        item.emit(&mut bytes);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::{bytes::*, *};
    use netlink_packet_core::{NLMSG_ERROR, NLMSG_NOOP};
    use netlink_packet_route::route::RouteHeader;

    const RTM_GETROUTE: u16 = 26;

    /// The bytes of an `RTM_NEWLINK` of link `index`, named `name` when given, as the kernel
    /// sends it in a dump (sequence number [`SEQ`]).
    fn link_message(index: u32, name: Option<&str>) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Mtu(1500));
        link.attributes
            .extend(name.map(|name| LinkAttribute::IfName(name.into())));
        let mut header = NetlinkHeader::default();
        header.sequence_number = SEQ;
        let mut message = NetlinkMessage::new(header, RouteNetlinkMessage::NewLink(link).into());
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn parse_links(data: &[u8], seq: u32) -> Result<(bool, Vec<Link>), NetlinkError> {
        let mut links = Vec::new();
        let done = parse_datagram(data, Some(seq), |message| {
            links.extend(link_of(message));
            Ok(())
        })?;
        Ok((done, links))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            packets: None,
        }
    }

    #[test]
    fn a_links_packets_are_its_received_and_transmitted_packets() {
        let mut message = LinkMessage::default();
        message.header.index = 4;
        message
            .attributes
            .push(LinkAttribute::IfName("eth0".into()));
        let mut stats = netlink_packet_route::link::Stats64::default();
        stats.rx_packets = 40;
        stats.tx_packets = 2;
        stats.rx_bytes = 9000;
        message.attributes.push(LinkAttribute::Stats64(stats));
        let link = link_of(RouteNetlinkMessage::NewLink(message)).unwrap();
        assert_eq!(link.packets, Some(42));
    }

    #[test]
    fn links_by_name_and_index() {
        let bytes = [
            link_message(1, Some("lo")),
            link_message(7, None), // no name: left out
            link_message(12, Some("eni1a2b3c4d5e6")),
            done(),
        ]
        .concat();
        let (done, links) = parse_links(&bytes, SEQ).unwrap();
        assert!(done);
        assert_eq!(links, vec![link(1, "lo"), link(12, "eni1a2b3c4d5e6")]);
    }

    #[test]
    fn notifications_announce_new_links_whatever_their_sequence_number() {
        let mut new_link = link_message(12, Some("eni1a2b3c4d5e6"));
        // Caused by a request with sequence number 99 (`ip link add`).
        new_link[8..12].copy_from_slice(&99u32.to_ne_bytes());
        let bytes = [message(NLMSG_NOOP, &[]), new_link].concat();
        assert_eq!(
            announced(&bytes).unwrap(),
            vec![Change::Link(link(12, "eni1a2b3c4d5e6"))]
        );
    }

    /// An `RTM_NEWTFILTER` of a bpf filter on interface 12 under `parent`, its options in
    /// attributes the agent does not read.
    fn filter_message(parent: u32, priority: u16, handle: u32) -> Vec<u8> {
        /// `ETH_P_ALL`, in network order as `tcm_info` carries it.
        const ALL_PROTOCOLS: u32 = 0x0300;
        let header = [
            [0u8; 4].as_slice(), // family, padding
            &12i32.to_ne_bytes(),
            &handle.to_ne_bytes(),
            &parent.to_ne_bytes(),
            &((u32::from(priority) << 16) | ALL_PROTOCOLS).to_ne_bytes(),
        ]
        .concat();
        let kind = attr(1, b"bpf\0"); // TCA_KIND
        let options = nested(2, &[attr(6, &[0x5a; 12]), attr(0x7f, &[1; 5])]); // TCA_OPTIONS
        message(libc::RTM_NEWTFILTER, &[header, kind, options].concat())
    }

    #[test]
    fn notifications_announce_filters_of_clsact_hooks_by_their_header() {
        let bytes = [
            filter_message(CLSACT_INGRESS, 1, 1),
            filter_message(CLSACT_EGRESS, 49152, 0x7472_6301),
            // A filter of a classful qdisc's class: not a hook.
            filter_message(0x0001_0000, 1, 1),
        ]
        .concat();
        let filter = |hook, priority, handle| {
            Change::Filter(FilterAdded {
                index: 12,
                hook,
                priority,
                handle,
            })
        };
        assert_eq!(
            announced(&bytes).unwrap(),
            vec![
                filter(TcAttachType::Ingress, 1, 1),
                filter(TcAttachType::Egress, 49152, 0x7472_6301),
            ]
        );
        // A header cut short is an error, not a guess.
        let cut = message(libc::RTM_NEWTFILTER, &[0; 12]);
        assert!(announced(&cut).is_err());
    }

    fn address_message(
        family: AddressFamily,
        index: u32,
        attributes: Vec<AddressAttribute>,
    ) -> RouteNetlinkMessage {
        let mut address = AddressMessage::default();
        address.header.family = family;
        address.header.index = index;
        address.attributes = attributes;
        RouteNetlinkMessage::NewAddress(address)
    }

    #[test]
    fn addresses_prefer_the_local_one() {
        let inet = AddressFamily::Inet;
        let plain = address_message(
            inet,
            2,
            vec![
                AddressAttribute::Address(ip("10.0.0.10")),
                AddressAttribute::Local(ip("10.0.0.10")),
            ],
        );
        // Point-to-point: IFA_ADDRESS is the peer's.
        let peer = address_message(
            inet,
            3,
            vec![
                AddressAttribute::Address(ip("10.0.9.1")),
                AddressAttribute::Local(ip("10.0.9.2")),
            ],
        );
        let v6 = address_message(
            AddressFamily::Inet6,
            2,
            vec![AddressAttribute::Address(ip("2001:db8::a"))],
        );
        assert_eq!(
            address_of(plain, inet),
            Some(Address {
                index: 2,
                addr: ip("10.0.0.10")
            })
        );
        assert_eq!(
            address_of(peer, inet),
            Some(Address {
                index: 3,
                addr: ip("10.0.9.2")
            })
        );
        // Another family than the one asked for (a kernel without IPv6 answers with all).
        assert_eq!(address_of(v6.clone(), inet), None);
        assert_eq!(
            address_of(v6, AddressFamily::Inet6),
            Some(Address {
                index: 2,
                addr: ip("2001:db8::a")
            })
        );
    }

    fn route_message(table: u8, prefix_len: u8, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.destination_prefix_length = prefix_len;
        route.header.table = table;
        route.attributes = attributes;
        route
    }

    #[test]
    fn routes_of_every_table_but_local_with_an_interface() {
        let main = RouteHeader::RT_TABLE_MAIN;
        let dst = |text: &str| RouteAttribute::Destination(ip(text).into());
        let pod = route_message(
            main,
            32,
            vec![
                RouteAttribute::Table(u32::from(main)),
                dst("10.0.1.5"),
                RouteAttribute::Oif(9),
            ],
        );
        let default = route_message(
            main,
            0,
            vec![
                RouteAttribute::Gateway(ip("10.0.0.1").into()),
                RouteAttribute::Oif(2),
            ],
        );
        let local_table = route_message(255, 32, vec![dst("10.0.0.10"), RouteAttribute::Oif(2)]);
        // RTA_TABLE overrides rtm_table, which cannot hold ids above 255: a branch-ENI pod's
        // host route in its VLAN's table, and a local route the header calls main.
        let vlan_table = route_message(
            main,
            32,
            vec![
                RouteAttribute::Table(1000),
                dst("10.0.1.6"),
                RouteAttribute::Oif(9),
            ],
        );
        let local_by_attribute = route_message(
            main,
            32,
            vec![
                RouteAttribute::Table(RT_TABLE_LOCAL),
                dst("10.0.0.11"),
                RouteAttribute::Oif(2),
            ],
        );
        let routes: Vec<Route> = [pod, default, local_table, vlan_table, local_by_attribute]
            .into_iter()
            .filter_map(|route| route_of(RouteNetlinkMessage::NewRoute(route), AddressFamily::Inet))
            .collect();
        let host = |text: &str| Route {
            dst: ip(text),
            prefix_len: 32,
            oif: 9,
        };
        assert_eq!(routes, vec![host("10.0.1.5"), host("10.0.1.6")]);
    }

    #[test]
    fn malformed_rtnetlink_is_an_error() {
        // An attribute that claims more than the message holds, after a good message.
        let good = link_message(1, Some("lo"));
        let mut overlong = link_message(3, Some("eth0"));
        // The first attribute (IFLA_MTU) follows the nlmsghdr and the 16-byte ifinfomsg.
        overlong[32..34].copy_from_slice(&64u16.to_ne_bytes());
        let error = parse_links(&[good.clone(), overlong].concat(), SEQ).unwrap_err();
        assert!(
            matches!(error, NetlinkError::Malformed { offset, .. } if offset == good.len()),
            "{error}"
        );
        assert!(
            error.to_string().starts_with(&format!(
                "malformed netlink message at byte {} ",
                good.len()
            )),
            "{error}"
        );
    }

    #[test]
    fn truncated_rtnetlink_at_every_offset() {
        let first = link_message(1, Some("lo"));
        let bytes = [first.clone(), link_message(2, Some("eth0"))].concat();
        for cut in 0..bytes.len() {
            match parse_links(&bytes[..cut], SEQ) {
                Ok((false, _)) if cut == 0 || cut == first.len() => {}
                Err(NetlinkError::Malformed { .. }) if cut != 0 && cut != first.len() => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn control_messages_and_dump_results() {
        // NOOP and a zero nlmsgerr (an ack) are stepped over.
        let noop = message(NLMSG_NOOP, &[]);
        let ack = message(NLMSG_ERROR, &0i32.to_ne_bytes());
        let lo = link_message(1, Some("lo"));
        let (ended, links) = parse_links(&[noop, ack, lo, done()].concat(), SEQ).unwrap();
        assert!(ended);
        assert_eq!(links, vec![link(1, "lo")]);

        // A dump the kernel gave up on ends in NLMSG_DONE with a negative errno.
        let error = parse_links(&done_with(-libc::EMSGSIZE), SEQ).unwrap_err();
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

        let mut refused = (-libc::EPERM).to_ne_bytes().to_vec();
        // nlmsgerr echoes the request.
        refused.extend(dump_request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            SEQ,
        ));
        let error = parse_links(&message(NLMSG_ERROR, &refused), SEQ).unwrap_err();
        assert!(
            matches!(
                error,
                NetlinkError::Kernel {
                    code: libc::EPERM,
                    ..
                }
            ),
            "{error}"
        );

        let error = parse_links(&done(), SEQ + 1).unwrap_err();
        assert!(matches!(
            error,
            NetlinkError::Sequence {
                expected: 8,
                got: SEQ
            }
        ));
    }

    #[test]
    fn request_bytes() {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        let request = dump_request(RouteNetlinkMessage::GetRoute(route), 3);
        // nlmsghdr, then the 12-byte rtmsg.
        assert_eq!(request.len(), 28);
        assert_eq!(request[..4], 28u32.to_ne_bytes());
        assert_eq!(request[4..6], RTM_GETROUTE.to_ne_bytes());
        assert_eq!(request[6..8], (NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        assert_eq!(request[8..12], 3u32.to_ne_bytes());
        assert_eq!(request[16], libc::AF_INET as u8);
        // Table 0 (RT_TABLE_UNSPEC): every table is dumped.
        assert_eq!(request[20], 0);
    }

    /// The dumps of this process's own namespace, through a real socket: every namespace has a
    /// loopback interface, and reading it needs no privilege.
    #[test]
    fn live_dumps_of_this_namespace() {
        let links = links().unwrap();
        assert!(links.iter().any(|link| link.name == "lo"), "{links:?}");
        assert!(
            links.iter().all(|link| link.packets.is_some()),
            "a link without IFLA_STATS64: {links:?}"
        );
        addresses().unwrap();
        routes().unwrap();

        // One socket serves several dumps, each with its own sequence number.
        let mut socket = Socket::open(Protocol::Route).unwrap();
        for _ in 0..3 {
            let answer: Vec<RouteNetlinkMessage> = socket
                .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
                .unwrap();
            let again: Vec<Link> = answer.into_iter().filter_map(link_of).collect();
            assert!(again.iter().any(|link| link.name == "lo"), "{again:?}");
        }
    }
}

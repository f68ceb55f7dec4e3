//! DNS for the lab: a small RFC 1035 message codec (header, one question, A answers), the
//! answers the VPC resolver and the CoreDNS pod give (the cluster endpoint per endpoint mode,
//! NXDOMAIN for anything else), their server loop, and the client.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use super::{
    EndpointMode,
    facts::{CLUSTER_ENDPOINT, CONTROLPLANE_IPS, NLB_IPS, VPC_CIDR},
    state,
    traffic::Report,
};

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const TTL_SECONDS: u32 = 5;
const HEADER_LEN: usize = 12;

const FLAG_RESPONSE: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const FLAG_AUTHORITATIVE: u16 = 0x0400;
const FLAG_RECURSION_DESIRED: u16 = 0x0100;
const FLAG_RECURSION_AVAILABLE: u16 = 0x0080;
const RCODE_MASK: u16 = 0x000f;

const RCODE_NOERROR: u8 = 0;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// How long the client waits for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A DNS message with exactly one question; answers are the A records (others are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Message {
    pub id: u16,
    /// QR, opcode, AA, TC, RD, RA and the response code, as on the wire.
    pub flags: u16,
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    pub answers: Vec<Ipv4Addr>,
}

impl Message {
    pub(super) fn query(id: u16, name: &str, qtype: u16) -> Self {
        Self {
            id,
            flags: FLAG_RECURSION_DESIRED,
            name: name.to_owned(),
            qtype,
            qclass: CLASS_IN,
            answers: Vec::new(),
        }
    }

    pub(super) fn rcode(&self) -> u8 {
        (self.flags & RCODE_MASK) as u8
    }

    pub(super) fn encode(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64);
        for word in [self.id, self.flags, 1, self.answers.len() as u16, 0, 0] {
            out.extend(word.to_be_bytes());
        }
        let name = self.name.trim_end_matches('.');
        for label in name.split('.').filter(|label| !label.is_empty()) {
            ensure!(label.len() <= 63, "label {label:?} longer than 63 bytes");
            out.push(label.len() as u8);
            out.extend(label.as_bytes());
        }
        out.push(0);
        ensure!(
            out.len() - HEADER_LEN <= 255,
            "name {name:?} longer than 255 bytes"
        );
        out.extend(self.qtype.to_be_bytes());
        out.extend(self.qclass.to_be_bytes());
        for address in &self.answers {
            // The owner name points back at the question's (offset 12).
            out.extend((0xc000 | HEADER_LEN as u16).to_be_bytes());
            out.extend(TYPE_A.to_be_bytes());
            out.extend(CLASS_IN.to_be_bytes());
            out.extend(TTL_SECONDS.to_be_bytes());
            out.extend(4u16.to_be_bytes());
            out.extend(address.octets());
        }
        Ok(out)
    }

    pub(super) fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut reader = Reader { bytes, pos: 0 };
        let id = reader.u16()?;
        let flags = reader.u16()?;
        let questions = reader.u16()?;
        let answer_count = reader.u16()?;
        reader.skip(4)?; // authority and additional counts: not used
        ensure!(
            questions == 1,
            "{questions} questions: the lab handles exactly one"
        );
        let name = reader.name()?;
        let qtype = reader.u16()?;
        let qclass = reader.u16()?;
        let mut answers = Vec::new();
        for _ in 0..answer_count {
            reader.name()?;
            let (rtype, rclass) = (reader.u16()?, reader.u16()?);
            reader.skip(4)?; // TTL
            let length = usize::from(reader.u16()?);
            let data = reader.take(length)?;
            if rtype == TYPE_A && rclass == CLASS_IN {
                let octets: [u8; 4] = data
                    .try_into()
                    .context("an A record's data is not 4 bytes")?;
                answers.push(Ipv4Addr::from(octets));
            }
        }
        Ok(Self {
            id,
            flags,
            name,
            qtype,
            qclass,
            answers,
        })
    }
}

/// Reads a message front to back, failing instead of running past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> anyhow::Result<&'a [u8]> {
        let slice = self
            .bytes
            .get(self.pos..self.pos + len)
            .with_context(|| format!("message truncated at byte {}", self.pos))?;
        self.pos += len;
        Ok(slice)
    }

    fn skip(&mut self, len: usize) -> anyhow::Result<()> {
        self.take(len).map(drop)
    }

    fn u16(&mut self) -> anyhow::Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into()?))
    }

    /// A domain name, following compression pointers (a bounded number of them, so that a
    /// pointer loop is an error rather than a hang).
    fn name(&mut self) -> anyhow::Result<String> {
        let mut labels = Vec::new();
        let mut at = self.pos;
        let mut resume = None;
        for _ in 0..128 {
            let len = *self.bytes.get(at).context("name runs past the message")?;
            match len {
                0 => {
                    self.pos = resume.unwrap_or(at + 1);
                    return Ok(labels.join("."));
                }
                len if len & 0xc0 == 0xc0 => {
                    let low = *self.bytes.get(at + 1).context("truncated pointer")?;
                    resume.get_or_insert(at + 2);
                    at = usize::from(len & 0x3f) << 8 | usize::from(low);
                }
                len if len & 0xc0 != 0 => bail!("unsupported label type {len:#x}"),
                len => {
                    let label = self
                        .bytes
                        .get(at + 1..at + 1 + usize::from(len))
                        .context("label runs past the message")?;
                    labels.push(String::from_utf8_lossy(label).into_owned());
                    at += 1 + usize::from(len);
                }
            }
        }
        bail!("name too long or compression loop")
    }
}

/// Where the cluster endpoint name points for someone asking from `asker` (docs/taxonomy.md,
/// "EKS networking facts": the endpoint access modes).
pub(super) fn endpoint_addresses(mode: EndpointMode, asker: Ipv4Addr) -> Vec<Ipv4Addr> {
    let inside_vpc = VPC_CIDR.contains(asker);
    match mode {
        EndpointMode::PublicPrivate if inside_vpc => CONTROLPLANE_IPS.to_vec(),
        EndpointMode::Public | EndpointMode::PublicPrivate => NLB_IPS.to_vec(),
        EndpointMode::Private => CONTROLPLANE_IPS.to_vec(),
    }
}

/// The lab resolver's answer to `query` from `asker`: A records of the cluster endpoint (TTL
/// 5 s), no data for its other types, NXDOMAIN for any other name.
pub(super) fn answer(query: &Message, mode: EndpointMode, asker: Ipv4Addr) -> Message {
    let is_endpoint = query
        .name
        .trim_end_matches('.')
        .eq_ignore_ascii_case(CLUSTER_ENDPOINT);
    if query.flags & OPCODE_MASK != 0 {
        reply(query, RCODE_NOTIMP, Vec::new())
    } else if !is_endpoint {
        reply(query, RCODE_NXDOMAIN, Vec::new())
    } else if query.qtype == TYPE_A && query.qclass == CLASS_IN {
        reply(query, RCODE_NOERROR, endpoint_addresses(mode, asker))
    } else {
        reply(query, RCODE_NOERROR, Vec::new())
    }
}

fn reply(query: &Message, rcode: u8, answers: Vec<Ipv4Addr>) -> Message {
    Message {
        flags: FLAG_RESPONSE
            | FLAG_AUTHORITATIVE
            | FLAG_RECURSION_AVAILABLE
            | (query.flags & (OPCODE_MASK | FLAG_RECURSION_DESIRED))
            | u16::from(rcode),
        answers,
        ..query.clone()
    }
}

/// Serves DNS on `socket` forever, reading the endpoint mode from `state_dir` for every query
/// so that a mode switch takes effect at once.
pub(super) fn serve(socket: UdpSocket, state_dir: &Path) {
    let mut buffer = [0u8; 512];
    loop {
        let (len, asker) = match socket.recv_from(&mut buffer) {
            Ok((len, SocketAddr::V4(asker))) => (len, asker),
            Ok(_) => continue, // the lab has no IPv6
            Err(error) => {
                eprintln!("dns: receiving: {error}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let query = match Message::decode(&buffer[..len]) {
            Ok(query) if query.flags & FLAG_RESPONSE == 0 => query,
            Ok(_) => continue,
            Err(error) => {
                eprintln!("dns: ignoring a malformed query from {asker}: {error:#}");
                continue;
            }
        };
        let response = match state::read_mode(state_dir) {
            Ok(mode) => answer(&query, mode, *asker.ip()),
            Err(error) => {
                eprintln!("dns: {error:#}");
                reply(&query, RCODE_SERVFAIL, Vec::new())
            }
        };
        match response.encode() {
            Ok(bytes) => {
                if let Err(error) = socket.send_to(&bytes, asker) {
                    eprintln!("dns: answering {asker}: {error}");
                }
            }
            Err(error) => eprintln!("dns: encoding the answer to {asker}: {error:#}"),
        }
    }
}

/// Sends `queries` A queries for `name` to `to`, each from a fresh socket (as a stub resolver
/// does) and waits for each answer; an unanswered query counts as timed out. The report's
/// answers are the last response's.
pub(super) fn client(to: SocketAddrV4, queries: u32, name: &str) -> Report {
    let mut report = Report::new(to);
    for attempt in 1..=queries {
        report.connections += 1;
        match ask(to, attempt as u16, name, &mut report.payload_bytes) {
            Ok(response) => {
                report.connected += 1;
                report.answers = response.answers;
            }
            Err(error) => report.unanswered(attempt, error),
        }
    }
    report
}

/// Resolves `name` through the resolver at `to`.
pub(super) fn resolve(to: SocketAddrV4, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut written = 0;
    let response = ask(to, 1, name, &mut written)?;
    if response.answers.is_empty() {
        bail!(
            "{to} has no address for {name} (response code {})",
            response.rcode()
        );
    }
    Ok(response.answers)
}

/// One query and its answer; `written` grows by the bytes sent.
fn ask(to: SocketAddrV4, id: u16, name: &str, written: &mut u64) -> anyhow::Result<Message> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let query = Message::query(id, name, TYPE_A).encode()?;
    socket.send(&query)?;
    *written += query.len() as u64;
    let mut buffer = [0u8; 512];
    let len = socket.recv(&mut buffer)?;
    let response = Message::decode(&buffer[..len])?;
    ensure!(
        response.id == id && response.flags & FLAG_RESPONSE != 0,
        "{to} answered with id {} to query {id}",
        response.id
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE_AAAA: u16 = 28;
    const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);
    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

    #[test]
    fn a_query_encodes_as_on_the_wire_and_decodes_back() {
        let query = Message::query(0x1234, "a.bc", TYPE_A);
        let bytes = query.encode().unwrap();
        assert_eq!(
            bytes,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, // header: RD, one question
                1, b'a', 2, b'b', b'c', 0, // name
                0, 1, 0, 1, // type A, class IN
            ]
        );
        assert_eq!(Message::decode(&bytes).unwrap(), query);
    }

    #[test]
    fn answers_round_trip_with_a_compressed_owner_name() {
        let query = Message::query(7, CLUSTER_ENDPOINT, TYPE_A);
        let response = answer(&query, EndpointMode::Public, POD);
        let bytes = response.encode().unwrap();
        // Each answer: pointer (2) type (2) class (2) TTL (4) length (2) address (4).
        assert_eq!(bytes.len(), query.encode().unwrap().len() + 2 * 16);
        assert_eq!(
            &bytes[bytes.len() - 10..bytes.len() - 6],
            &TTL_SECONDS.to_be_bytes()
        );
        let decoded = Message::decode(&bytes).unwrap();
        assert_eq!(decoded, response);
        assert_eq!(decoded.answers, NLB_IPS);
        assert_eq!(decoded.rcode(), RCODE_NOERROR);
        assert_ne!(decoded.flags & FLAG_RESPONSE, 0);
        assert_ne!(decoded.flags & FLAG_RECURSION_DESIRED, 0);
    }

    #[test]
    fn the_endpoint_follows_the_mode_and_the_asker() {
        let query = Message::query(1, &format!("{}.", CLUSTER_ENDPOINT.to_uppercase()), TYPE_A);
        let ask = |mode, asker| answer(&query, mode, asker).answers;
        assert_eq!(ask(EndpointMode::Public, POD), NLB_IPS);
        assert_eq!(ask(EndpointMode::PublicPrivate, POD), CONTROLPLANE_IPS);
        assert_eq!(ask(EndpointMode::PublicPrivate, OUTSIDE), NLB_IPS);
        assert_eq!(ask(EndpointMode::Private, POD), CONTROLPLANE_IPS);
        assert_eq!(ask(EndpointMode::Private, OUTSIDE), CONTROLPLANE_IPS);
    }

    #[test]
    fn other_names_do_not_exist_and_aaaa_has_no_data() {
        let other = answer(
            &Message::query(2, "example.com", TYPE_A),
            EndpointMode::Public,
            POD,
        );
        assert_eq!((other.rcode(), other.answers.len()), (RCODE_NXDOMAIN, 0));
        let aaaa = answer(
            &Message::query(3, CLUSTER_ENDPOINT, TYPE_AAAA),
            EndpointMode::Public,
            POD,
        );
        assert_eq!((aaaa.rcode(), aaaa.answers.len()), (RCODE_NOERROR, 0));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let bytes = Message::query(1, CLUSTER_ENDPOINT, TYPE_A)
            .encode()
            .unwrap();
        for len in 0..bytes.len() {
            assert!(
                Message::decode(&bytes[..len]).is_err(),
                "truncated at {len}"
            );
        }
        // A name that points at itself.
        let mut looping = bytes[..HEADER_LEN].to_vec();
        looping.extend([0xc0, HEADER_LEN as u8, 0, 1, 0, 1]);
        assert!(Message::decode(&looping).is_err());
        // Two questions.
        let mut two = bytes;
        two[5] = 2;
        assert!(Message::decode(&two).is_err());
        assert!(Message::query(1, &"x".repeat(64), TYPE_A).encode().is_err());
    }
}

//! The instance metadata service at 169.254.169.254, answering the paths a node agent reads
//! (IMDSv2 tokens accepted, IMDSv1 too), and its client.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::BufReader,
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use super::{
    ImdsHealth, LabFacts,
    facts::{REGION, SUBNET_A, VPC_CIDR},
    http::{self, read_request, write_response},
    traffic::Report,
};

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const META_DATA: &str = "/latest/meta-data/";
/// How late a slow IMDS answers: twice the agent's timeout (1 s).
pub(super) const SLOW_ANSWER: Duration = Duration::from_secs(2);
/// What a broken IMDS (or a proxy in front of it) answers with status 200.
const GARBAGE: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>\n";

/// The metadata tree as full paths to leaf values; directories are derived from it.
pub(super) struct Imds {
    leaves: BTreeMap<String, String>,
    token: String,
}

impl Imds {
    pub(super) fn new(facts: &LabFacts) -> Self {
        let mut leaves = BTreeMap::new();
        let mut put = |path: &str, value: String| {
            leaves.insert(format!("{META_DATA}{path}"), value);
        };
        put("instance-id", facts.instance_id.clone());
        put("local-ipv4", facts.node_ip.to_string());
        put("mac", facts.enis[0].mac.clone());
        put(
            "placement/availability-zone",
            facts.availability_zone.clone(),
        );
        put("placement/region", REGION.to_owned());
        for eni in &facts.enis {
            let dir = format!("network/interfaces/macs/{}/", eni.mac);
            let local_ipv4s: Vec<String> = std::iter::once(eni.primary_ip)
                .chain(eni.secondary_ips.iter().copied())
                .map(|ip| ip.to_string())
                .collect();
            put(
                &format!("{dir}device-number"),
                eni.device_number.to_string(),
            );
            put(&format!("{dir}interface-id"), eni.interface_id.clone());
            put(&format!("{dir}local-ipv4s"), local_ipv4s.join("\n"));
            put(
                &format!("{dir}subnet-ipv4-cidr-block"),
                SUBNET_A.to_string(),
            );
            put(&format!("{dir}vpc-ipv4-cidr-block"), VPC_CIDR.to_string());
            put(&format!("{dir}vpc-ipv4-cidr-blocks"), VPC_CIDR.to_string());
        }
        Self {
            leaves,
            token: format!("lab-token-{}", facts.instance_id),
        }
    }

    /// A leaf's value, or a directory's listing (children one per line, sub-directories with a
    /// trailing `/`), as IMDS answers them.
    fn get(&self, path: &str) -> Option<String> {
        if let Some(value) = self.leaves.get(path) {
            return Some(value.clone());
        }
        let prefix = if path.ends_with('/') {
            path.to_owned()
        } else {
            format!("{path}/")
        };
        let children: BTreeSet<&str> = self
            .leaves
            .keys()
            .filter_map(|key| key.strip_prefix(&prefix))
            .map(|rest| match rest.find('/') {
                Some(slash) => &rest[..=slash],
                None => rest,
            })
            .collect();
        (!children.is_empty()).then(|| children.into_iter().collect::<Vec<_>>().join("\n"))
    }

    /// Answers one request: `PUT /latest/api/token` (IMDSv2), GETs with or without a token;
    /// late or with garbage when `health` says so.
    pub(super) fn handle(&self, stream: TcpStream, health: ImdsHealth) -> anyhow::Result<()> {
        let request = read_request(&mut BufReader::new(&stream))?;
        match health {
            ImdsHealth::Garbage => {
                return write_response(&mut &stream, 200, &[], GARBAGE).map_err(Into::into);
            }
            ImdsHealth::Slow => std::thread::sleep(SLOW_ANSWER),
            ImdsHealth::Answers | ImdsHealth::Down => {}
        }
        let ttl = request.header(TOKEN_TTL_HEADER);
        let (status, body) = match (request.method.as_str(), request.path.as_str()) {
            ("PUT", TOKEN_PATH) => match ttl.and_then(|ttl| ttl.parse::<u32>().ok()) {
                Some(1..=21600) => (200, self.token.clone()),
                _ => (400, format!("{TOKEN_TTL_HEADER} must be 1 to 21600\n")),
            },
            ("GET", _)
                if request
                    .header(TOKEN_HEADER)
                    .is_some_and(|token| token != self.token) =>
            {
                (401, "invalid token\n".to_owned())
            }
            ("GET", path) => match self.get(path) {
                Some(value) => (200, value),
                None => (404, "not found\n".to_owned()),
            },
            _ => (405, "method not allowed\n".to_owned()),
        };
        let echo_ttl: Vec<(&str, &str)> = ttl
            .filter(|_| status == 200)
            .map(|ttl| (TOKEN_TTL_HEADER, ttl))
            .into_iter()
            .collect();
        write_response(&mut &stream, status, &echo_ttl, &body)?;
        Ok(())
    }
}

/// What a node agent does at start: an IMDSv2 token, then GETs with it. `requests` requests,
/// each on its own connection; every answer must be 200.
pub(super) fn client(to: SocketAddrV4, requests: u32) -> Report {
    const PATHS: [&str; 4] = [
        "local-ipv4",
        "mac",
        "placement/availability-zone",
        "network/interfaces/macs/",
    ];
    let mut report = Report::new(to);
    let mut token = String::new();
    for attempt in 1..=requests {
        let response = if attempt == 1 {
            http::request(
                &mut report,
                attempt,
                to,
                "PUT",
                TOKEN_PATH,
                &[(TOKEN_TTL_HEADER, "60")],
                0,
            )
        } else {
            let path = format!("{META_DATA}{}", PATHS[(attempt as usize - 2) % PATHS.len()]);
            http::request(
                &mut report,
                attempt,
                to,
                "GET",
                &path,
                &[(TOKEN_HEADER, &token)],
                0,
            )
        };
        match response {
            Some(response) if response.status == 200 && attempt == 1 => token = response.body,
            Some(response) if response.status == 200 => {}
            Some(response) => report.transfer_failed(
                attempt,
                format!(
                    "IMDS answered {}: {}",
                    response.status,
                    response.body.trim()
                ),
            ),
            None => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_answers_leaves_and_lists_directories() {
        let facts = LabFacts::new("1a2b");
        let imds = Imds::new(&facts);
        let (mac0, mac1) = (&facts.enis[0].mac, &facts.enis[1].mac);
        assert_eq!(
            imds.get("/latest/meta-data/local-ipv4").unwrap(),
            "10.0.1.10"
        );
        assert_eq!(imds.get("/latest/meta-data/mac").unwrap(), *mac0);
        assert_eq!(
            imds.get("/latest/meta-data/network/interfaces/macs/")
                .unwrap(),
            format!("{}/\n{}/", mac0.min(mac1), mac0.max(mac1))
        );
        assert_eq!(
            imds.get(&format!(
                "/latest/meta-data/network/interfaces/macs/{mac0}/local-ipv4s"
            ))
            .unwrap(),
            "10.0.1.10\n10.0.1.101\n10.0.1.102\n10.0.1.103"
        );
        assert_eq!(
            imds.get(&format!(
                "/latest/meta-data/network/interfaces/macs/{mac1}/device-number"
            ))
            .unwrap(),
            "1"
        );
        assert!(
            imds.get(&format!(
                "/latest/meta-data/network/interfaces/macs/{mac1}/"
            ))
            .unwrap()
            .contains("vpc-ipv4-cidr-blocks")
        );
        assert_eq!(
            imds.get("/latest/meta-data/placement/").unwrap(),
            "availability-zone\nregion"
        );
        assert!(imds.get("/latest/meta-data/nothing").is_none());
        assert!(imds.get("/latest/meta-data/loc").is_none());
    }
}

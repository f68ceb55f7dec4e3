//! Bytes per workload (`tracer_workload_bytes_total{namespace,workload,path}`), opt-in and
//! capped: the `top_k` series with the most bytes are named, everything else is summed into
//! one `_other` series per path, so the number of series stays bounded.
//!
//! Every series only ever grows, as Prometheus counters must: each poll's bytes go to the
//! workload's series if it ranks in the top K after the poll, to `_other` otherwise. A
//! workload that climbs into the top K resumes its named series where it left off (zero the
//! first time) while the bytes it moved outside stay in `_other`; one that drops out keeps its
//! count for when it returns. Workloads that no longer have a pod on this node are forgotten.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use crate::classify::Path;
use crate::context::kubernetes::PodRef;

/// The namespace and workload of the series that sums everything outside the top K.
pub const OVERFLOW: &str = "_other";

/// One series' labels.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct WorkloadSeries {
    pub namespace: String,
    pub workload: String,
    pub path: Path,
}

/// A connection's new bytes since the last poll (both directions), its ends and its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBytes {
    pub initiator: IpAddr,
    pub responder: IpAddr,
    pub path: Path,
    pub bytes: u64,
}

/// The per-workload counters, across polls.
#[derive(Debug)]
pub struct WorkloadBytes {
    top_k: usize,
    counts: WorkloadTallies,
    /// The series named now: the `top_k` with the most bytes in total.
    named: HashSet<WorkloadSeries>,
    /// Bytes of polls made before the pods were known, by connection ends and path, for
    /// the first poll that knows them.
    held: HashMap<(IpAddr, IpAddr, Path), u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Tally {
    /// Every byte the workload moved on this path: what it is ranked by.
    total: u64,
    /// The bytes counted in its named series.
    counted: u64,
}

/// Every workload's tally and the `_other` sums: what a restart carries over (`restart`), so
/// that no series goes back. Which series are named follows from them and the top K.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadTallies {
    #[serde(with = "crate::pipeline::restart::pairs")]
    tallies: HashMap<WorkloadSeries, Tally>,
    overflow: BTreeMap<Path, u64>,
}

impl WorkloadBytes {
    pub fn new(top_k: usize) -> Self {
        Self::resume(top_k, WorkloadTallies::default())
    }

    /// Goes on from a predecessor's tallies.
    pub fn resume(top_k: usize, carried: WorkloadTallies) -> Self {
        let mut workloads = Self {
            top_k,
            counts: carried,
            named: HashSet::new(),
            held: HashMap::new(),
        };
        workloads.rank();
        workloads
    }

    /// What a successor needs to go on.
    pub fn tallies(&self) -> &WorkloadTallies {
        &self.counts
    }

    /// Keeps one poll's bytes for the first `record`, while the pods are not known yet (the
    /// Kubernetes context has not listed them): attributed now, they would belong to nobody.
    pub fn hold(&mut self, connections: impl IntoIterator<Item = ConnectionBytes>) {
        for connection in connections {
            *self
                .held
                .entry((connection.initiator, connection.responder, connection.path))
                .or_default() += connection.bytes;
        }
    }

    /// Adds one poll's bytes, and those held before. A connection belongs to its initiator's
    /// pod when the initiator is a pod of this node, otherwise to its responder's; connections
    /// with neither (the node's own) belong to no workload.
    pub fn record(
        &mut self,
        connections: impl IntoIterator<Item = ConnectionBytes>,
        pods: &HashMap<IpAddr, PodRef>,
    ) {
        let held = std::mem::take(&mut self.held).into_iter().map(
            |((initiator, responder, path), bytes)| ConnectionBytes {
                initiator,
                responder,
                path,
                bytes,
            },
        );
        let mut polled: HashMap<WorkloadSeries, u64> = HashMap::new();
        for connection in held.chain(connections) {
            let pod = pods
                .get(&connection.initiator)
                .or_else(|| pods.get(&connection.responder));
            if let Some(pod) = pod {
                let series = WorkloadSeries {
                    namespace: pod.namespace.clone(),
                    workload: pod.workload.name.clone(),
                    path: connection.path,
                };
                *polled.entry(series).or_default() += connection.bytes;
            }
        }
        for (series, bytes) in &polled {
            self.counts.tallies.entry(series.clone()).or_default().total += bytes;
        }
        let present: HashSet<(&str, &str)> = pods
            .values()
            .map(|pod| (pod.namespace.as_str(), pod.workload.name.as_str()))
            .collect();
        self.counts.tallies.retain(|series, _| {
            polled.contains_key(series)
                || present.contains(&(series.namespace.as_str(), series.workload.as_str()))
        });
        self.rank();
        for (series, bytes) in polled {
            if self.named.contains(&series) {
                self.counts.tallies.entry(series).or_default().counted += bytes;
            } else {
                *self.counts.overflow.entry(series.path).or_default() += bytes;
            }
        }
    }

    fn rank(&mut self) {
        let mut ranked: Vec<(&WorkloadSeries, u64)> = self
            .counts
            .tallies
            .iter()
            .map(|(series, tally)| (series, tally.total))
            .collect();
        ranked.sort_by(|(a, a_total), (b, b_total)| b_total.cmp(a_total).then_with(|| a.cmp(b)));
        self.named = ranked
            .into_iter()
            .take(self.top_k)
            .map(|(series, _)| series.clone())
            .collect();
    }

    /// The series to export, in label order: at most `top_k` named ones, and an `_other` one
    /// per path that has overflowed.
    pub fn series(&self) -> Vec<(WorkloadSeries, u64)> {
        let named = self
            .named
            .iter()
            .map(|series| (series.clone(), self.counts.tallies[series].counted));
        let overflow = self.counts.overflow.iter().map(|(path, bytes)| {
            let series = WorkloadSeries {
                namespace: OVERFLOW.into(),
                workload: OVERFLOW.into(),
                path: *path,
            };
            (series, *bytes)
        });
        let mut series: Vec<_> = named.chain(overflow).collect();
        series.sort();
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::kubernetes::Workload;

    const WEB: &str = "10.0.1.10";
    const API: &str = "10.0.1.11";
    const BATCH: &str = "10.0.1.12";
    const REMOTE: &str = "10.0.40.7";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn pods(present: &[(&str, &str)]) -> HashMap<IpAddr, PodRef> {
        present
            .iter()
            .map(|(address, workload)| {
                let pod = PodRef {
                    namespace: "shop".into(),
                    name: format!("{workload}-pod"),
                    workload: Workload {
                        kind: "Deployment".into(),
                        name: workload.to_string(),
                    },
                };
                (ip(address), pod)
            })
            .collect()
    }

    fn sent(from: &str, path: Path, bytes: u64) -> ConnectionBytes {
        ConnectionBytes {
            initiator: ip(from),
            responder: ip(REMOTE),
            path,
            bytes,
        }
    }

    fn named(workload: &str, path: Path, bytes: u64) -> (WorkloadSeries, u64) {
        let series = WorkloadSeries {
            namespace: "shop".into(),
            workload: workload.into(),
            path,
        };
        (series, bytes)
    }

    fn other(path: Path, bytes: u64) -> (WorkloadSeries, u64) {
        let series = WorkloadSeries {
            namespace: OVERFLOW.into(),
            workload: OVERFLOW.into(),
            path,
        };
        (series, bytes)
    }

    fn sorted(mut series: Vec<(WorkloadSeries, u64)>) -> Vec<(WorkloadSeries, u64)> {
        series.sort();
        series
    }

    /// web, api and batch, after a first poll that names web and api in a top 2.
    fn top_two_of_three() -> (HashMap<IpAddr, PodRef>, WorkloadBytes) {
        use Path::*;
        let all = pods(&[(WEB, "web"), (API, "api"), (BATCH, "batch")]);
        let mut bytes = WorkloadBytes::new(2);
        bytes.record(
            [
                sent(WEB, PodToPodRemote, 500),
                sent(API, PodToPodRemote, 300),
                sent(BATCH, PodToExternal, 100),
            ],
            &all,
        );
        (all, bytes)
    }

    #[test]
    fn a_successor_goes_on_from_the_saved_tallies_and_no_series_goes_back() {
        use Path::*;
        let (all, bytes) = top_two_of_three();
        let before = bytes.series();
        // Through the state file's format.
        let saved = serde_json::to_string(&bytes.tallies()).unwrap();
        let carried: WorkloadTallies = serde_json::from_str(&saved).unwrap();
        assert_eq!(&carried, bytes.tallies());
        let mut successor = WorkloadBytes::resume(2, carried.clone());
        assert_eq!(successor.series(), before);
        successor.record([sent(API, PodToPodRemote, 1)], &all);
        assert_eq!(
            successor.series(),
            sorted(vec![
                named("web", PodToPodRemote, 500),
                named("api", PodToPodRemote, 301),
                other(PodToExternal, 100),
            ])
        );
        // A smaller top K names fewer series; their counts and `_other` go on from the saved.
        let narrower = WorkloadBytes::resume(1, carried);
        assert_eq!(
            narrower.series(),
            sorted(vec![
                named("web", PodToPodRemote, 500),
                other(PodToExternal, 100),
            ])
        );
    }

    #[test]
    fn bytes_held_before_the_pods_are_known_go_to_their_workloads_once_they_are() {
        use Path::*;
        let mut bytes = WorkloadBytes::new(2);
        bytes.hold([sent(WEB, PodToPodRemote, 70)]);
        bytes.hold([sent(WEB, PodToPodRemote, 30), sent(API, PodToExternal, 5)]);
        assert_eq!(
            bytes.series(),
            Vec::new(),
            "nothing is named before the pods are known"
        );
        let all = pods(&[(WEB, "web"), (API, "api")]);
        bytes.record([sent(WEB, PodToPodRemote, 1)], &all);
        assert_eq!(
            bytes.series(),
            sorted(vec![
                named("web", PodToPodRemote, 101),
                named("api", PodToExternal, 5),
            ])
        );
        bytes.record([], &all);
        assert_eq!(
            bytes.series()[1],
            named("web", PodToPodRemote, 101),
            "held bytes count once"
        );
    }

    #[test]
    fn the_top_k_are_named_the_rest_overflows_and_counters_only_grow() {
        use Path::*;
        let (all, mut bytes) = top_two_of_three();
        assert_eq!(
            bytes.series(),
            sorted(vec![
                named("web", PodToPodRemote, 500),
                named("api", PodToPodRemote, 300),
                other(PodToExternal, 100),
            ])
        );
        // batch overtakes api: api's count is kept for its return, batch's starts now.
        bytes.record(
            [
                sent(API, PodToPodRemote, 30),
                sent(BATCH, PodToExternal, 1000),
            ],
            &all,
        );
        assert_eq!(
            bytes.series(),
            sorted(vec![
                named("web", PodToPodRemote, 500),
                named("batch", PodToExternal, 1000),
                other(PodToPodRemote, 30),
                other(PodToExternal, 100),
            ])
        );
        // api comes back past both, web drops out; bytes of the unnamed go to _other.
        bytes.record(
            [
                sent(API, PodToPodRemote, 2000),
                sent(WEB, PodToPodRemote, 7),
            ],
            &all,
        );
        assert_eq!(
            bytes.series(),
            sorted(vec![
                named("api", PodToPodRemote, 2300),
                named("batch", PodToExternal, 1000),
                other(PodToPodRemote, 37),
                other(PodToExternal, 100),
            ])
        );
    }

    #[test]
    fn connections_belong_to_the_initiating_pod_else_the_responding_one() {
        use Path::*;
        let all = pods(&[(WEB, "web"), (API, "api")]);
        let mut bytes = WorkloadBytes::new(10);
        let local = |bytes| ConnectionBytes {
            initiator: ip(WEB),
            responder: ip(API),
            path: PodToPodLocal,
            bytes,
        };
        let inbound = |bytes| ConnectionBytes {
            initiator: ip("203.0.113.9"),
            responder: ip(API),
            path: ExternalToPod,
            bytes,
        };
        let node = |bytes| ConnectionBytes {
            initiator: ip("10.0.1.1"),
            responder: ip("198.51.100.1"),
            path: NodeToExternal,
            bytes,
        };
        bytes.record([local(1), inbound(2), node(4)], &all);
        bytes.record([local(7), inbound(9), node(11)], &all);
        assert_eq!(
            bytes.series(),
            sorted(vec![
                named("web", PodToPodLocal, 8),
                named("api", ExternalToPod, 11),
            ])
        );
    }

    #[test]
    fn workloads_gone_from_the_node_are_forgotten() {
        use Path::*;
        let mut bytes = WorkloadBytes::new(1);
        let before = pods(&[(WEB, "web"), (API, "api")]);
        bytes.record([sent(WEB, PodToDns, 10), sent(API, PodToDns, 3)], &before);
        assert_eq!(
            bytes.series(),
            sorted(vec![named("web", PodToDns, 10), other(PodToDns, 3)])
        );
        // web's last pod left: its series goes, and api takes the free place.
        let after = pods(&[(API, "api")]);
        bytes.record([sent(API, PodToDns, 1)], &after);
        assert_eq!(
            bytes.series(),
            sorted(vec![named("api", PodToDns, 1), other(PodToDns, 3)])
        );
    }
}

//! At SIGTERM: hand the pinned datapath over to the next agent, or stop cleanly.
//!
//! A rolling update of the DaemonSet and an uninstall both stop the agent with SIGTERM. They
//! differ in the API server: during an update the DaemonSet stands and will start a successor
//! on this node, which takes the pinned links over in place; after an uninstall it is gone (or
//! being deleted) and nothing would, so the agent must detach and remove its pins. The agent
//! asks (its pod's owner, then that DaemonSet), bounded in time, and [`decide`]s from the
//! answer; whatever it cannot establish ends in a clean stop, which leaves nothing behind.
use std::time::Duration;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kube::Api;

/// How long the agent waits for both answers, within the pod's termination grace period.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The pod this agent runs in (`--pod-name`, `--pod-namespace`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
}

/// What the agent needs to ask; missing any of it, it stops cleanly (the reason says which).
pub(crate) struct Asker {
    config: kube::Config,
    pod: PodIdentity,
}

impl Asker {
    /// Whether a handover can be asked about at all: pinned, with the Kubernetes context and
    /// knowing the agent's own pod.
    pub(crate) fn new(
        pinned: bool,
        kubernetes: Option<&kube::Config>,
        pod: Option<PodIdentity>,
    ) -> Result<Self, CleanStop> {
        match (pinned, kubernetes, pod) {
            (false, ..) => Err(CleanStop::NotPinned),
            (true, None, _) => Err(CleanStop::NoKubernetes),
            (true, Some(_), None) => Err(CleanStop::NoPodIdentity),
            (true, Some(config), Some(pod)) => Ok(Self {
                config: config.clone(),
                pod,
            }),
        }
    }

    /// Asks the API server, within [`ASK_TIMEOUT`], whether the owner DaemonSet stands.
    pub(crate) async fn ask(&self) -> Stop {
        let answer = tokio::time::timeout(ASK_TIMEOUT, self.owner())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer from the API server within {ASK_TIMEOUT:?}"
                ))
            });
        decide(answer)
    }

    /// GET of the pod, then of its owner DaemonSet.
    async fn owner(&self) -> Result<Owner, String> {
        let client = kube::Client::try_from(self.config.clone())
            .map_err(|error| format!("no client for the API server: {error}"))?;
        let PodIdentity { namespace, name } = &self.pod;
        let pod = Api::<Pod>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map_err(|error| format!("GET pod {namespace}/{name}: {error}"))?;
        let Some(daemonset) = daemonset_owner(&pod) else {
            return Ok(Owner::NotDaemonSet {
                pod: format!("{namespace}/{name}"),
            });
        };
        let found = Api::<DaemonSet>::namespaced(client, namespace)
            .get_opt(&daemonset)
            .await
            .map_err(|error| format!("GET daemonset {namespace}/{daemonset}: {error}"))?;
        Ok(Owner::DaemonSet {
            name: format!("{namespace}/{daemonset}"),
            found: found.map(Box::new),
        })
    }
}

/// What the API server said about the agent's owner.
#[derive(Debug)]
pub(crate) enum Owner {
    /// The pod has no DaemonSet among its owners (run by hand, or by another controller).
    NotDaemonSet { pod: String },
    /// The owner DaemonSet (`namespace/name`), as a GET found it: `None` when it is gone (404).
    DaemonSet {
        name: String,
        found: Option<Box<DaemonSet>>,
    },
}

/// How the agent stops.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The DaemonSet (`namespace/name`) stands: leave the datapath pinned for its next pod.
    HandOver {
        daemonset: String,
    },
    Clean(CleanStop),
}

/// Why the agent detaches and removes its pins and state.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CleanStop {
    #[error("no --pin-path: nothing to hand over")]
    NotPinned,
    #[error(
        "no Kubernetes context (in-cluster or --kubeconfig) to ask whether the DaemonSet stays"
    )]
    NoKubernetes,
    #[error("no --pod-name/--pod-namespace (POD_NAME, POD_NAMESPACE) to find the owner DaemonSet")]
    NoPodIdentity,
    #[error("SIGINT: handed over only on SIGTERM")]
    Interrupted,
    #[error("pod {pod} is not owned by a DaemonSet: no successor would take over")]
    NotDaemonSet { pod: String },
    #[error("DaemonSet {name} is gone: the agent is being uninstalled")]
    DaemonSetGone { name: String },
    #[error("DaemonSet {name} is being deleted: the agent is being uninstalled")]
    DaemonSetDeleting { name: String },
    #[error("cannot tell whether the DaemonSet stays ({reason}): leaving nothing behind")]
    Unanswered { reason: String },
}

/// The name of the DaemonSet among `pod`'s owners.
pub(crate) fn daemonset_owner(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.kind == "DaemonSet" && owner.api_version.starts_with("apps/"))
        .map(|owner| owner.name.clone())
}

/// Hands over only when the owner DaemonSet is known to stand; every doubt stops cleanly.
pub(crate) fn decide(answer: Result<Owner, String>) -> Stop {
    let clean = match answer {
        Err(reason) => CleanStop::Unanswered { reason },
        Ok(Owner::NotDaemonSet { pod }) => CleanStop::NotDaemonSet { pod },
        Ok(Owner::DaemonSet { name, found: None }) => CleanStop::DaemonSetGone { name },
        Ok(Owner::DaemonSet {
            name,
            found: Some(daemonset),
        }) => {
            if daemonset.metadata.deletion_timestamp.is_some() {
                CleanStop::DaemonSetDeleting { name }
            } else {
                return Stop::HandOver { daemonset: name };
            }
        }
    };
    Stop::Clean(clean)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use kube_standin::{
        Kind, StandIn,
        objects::{daemonset, pod},
    };

    use super::*;

    const NAMESPACE: &str = "tracer";
    const POD: &str = "tracer-agent-x7k2p";
    const DAEMONSET: &str = "tracer-agent";

    fn standing() -> Box<DaemonSet> {
        serde_json::from_value(daemonset(NAMESPACE, DAEMONSET)).unwrap()
    }

    fn owned_by(kind: &str) -> Pod {
        let owner = Some((kind, DAEMONSET));
        serde_json::from_value(pod(NAMESPACE, POD, "node-1", None, owner)).unwrap()
    }

    #[test]
    fn the_owner_is_the_daemonset_among_the_owner_references() {
        assert_eq!(
            daemonset_owner(&owned_by("DaemonSet")).as_deref(),
            Some(DAEMONSET)
        );
        assert_eq!(daemonset_owner(&owned_by("ReplicaSet")), None);
        let alone: Pod = serde_json::from_value(pod(NAMESPACE, POD, "n", None, None)).unwrap();
        assert_eq!(daemonset_owner(&alone), None);
    }

    #[test]
    fn only_a_standing_daemonset_is_handed_over_to() {
        let name = format!("{NAMESPACE}/{DAEMONSET}");
        let found = |daemonset| {
            decide(Ok(Owner::DaemonSet {
                name: name.clone(),
                found: daemonset,
            }))
        };
        assert_eq!(
            found(Some(standing())),
            Stop::HandOver {
                daemonset: name.clone()
            }
        );
        let mut deleting = standing();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        assert_eq!(
            found(Some(deleting)),
            Stop::Clean(CleanStop::DaemonSetDeleting { name: name.clone() })
        );
        assert_eq!(
            found(None),
            Stop::Clean(CleanStop::DaemonSetGone { name: name.clone() })
        );
        let pod = format!("{NAMESPACE}/{POD}");
        assert_eq!(
            decide(Ok(Owner::NotDaemonSet { pod: pod.clone() })),
            Stop::Clean(CleanStop::NotDaemonSet { pod })
        );
        let stop = decide(Err("connection refused".into()));
        assert_eq!(
            stop,
            Stop::Clean(CleanStop::Unanswered {
                reason: "connection refused".into()
            })
        );
    }

    #[test]
    fn without_pins_a_context_or_the_pod_there_is_nothing_to_ask() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let identity = || {
            Some(PodIdentity {
                namespace: NAMESPACE.into(),
                name: POD.into(),
            })
        };
        let reason = |asker: Result<Asker, CleanStop>| asker.err();
        assert_eq!(
            reason(Asker::new(false, Some(&config), identity())),
            Some(CleanStop::NotPinned)
        );
        assert_eq!(
            reason(Asker::new(true, None, identity())),
            Some(CleanStop::NoKubernetes)
        );
        assert_eq!(
            reason(Asker::new(true, Some(&config), None)),
            Some(CleanStop::NoPodIdentity)
        );
        assert!(Asker::new(true, Some(&config), identity()).is_ok());
    }

    fn asker(url: &str) -> Asker {
        let config = kube::Config::new(url.parse().unwrap());
        let pod = PodIdentity {
            namespace: NAMESPACE.into(),
            name: POD.into(),
        };
        Asker::new(true, Some(&config), Some(pod)).unwrap()
    }

    /// Against the stand-in: the real client, GETs and JSON shapes, 404 included.
    #[tokio::test]
    async fn the_api_server_says_whether_the_daemonset_stands() {
        let mut stand_in = StandIn::start().await;
        let asker = asker(&stand_in.url());
        let name = format!("{NAMESPACE}/{DAEMONSET}");
        let unanswered = |stop: Stop| matches!(stop, Stop::Clean(CleanStop::Unanswered { .. }));

        let stop = asker.ask().await;
        assert!(unanswered(stop), "the pod is not there yet");
        stand_in.apply(
            Kind::Pods,
            pod(
                NAMESPACE,
                POD,
                "node-1",
                None,
                Some(("DaemonSet", DAEMONSET)),
            ),
        );
        let gone = Stop::Clean(CleanStop::DaemonSetGone { name: name.clone() });
        assert_eq!(asker.ask().await, gone);
        stand_in.apply(Kind::DaemonSets, daemonset(NAMESPACE, DAEMONSET));
        let handover = Stop::HandOver {
            daemonset: name.clone(),
        };
        assert_eq!(asker.ask().await, handover);
        stand_in.begin_deletion(Kind::DaemonSets, NAMESPACE, DAEMONSET);
        let deleting = Stop::Clean(CleanStop::DaemonSetDeleting { name: name.clone() });
        assert_eq!(asker.ask().await, deleting);
        stand_in.delete(Kind::DaemonSets, NAMESPACE, DAEMONSET);
        assert_eq!(asker.ask().await, gone);

        stand_in.garbage(true);
        assert!(unanswered(asker.ask().await), "garbage is no answer");
        stand_in.garbage(false);
        stand_in.stop().await;
        let stop = asker.ask().await;
        assert!(unanswered(stop), "an API server that is down is no answer");
    }

    /// An API server that accepts the connection and never answers costs at most ASK_TIMEOUT.
    #[tokio::test]
    async fn an_api_server_that_never_answers_is_given_up_on_in_time() {
        let silent = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let asker = asker(&format!("http://{}", silent.local_addr().unwrap()));
        let started = std::time::Instant::now();
        let stop = asker.ask().await;
        let took = started.elapsed();
        assert!(
            matches!(&stop, Stop::Clean(CleanStop::Unanswered { reason }) if reason.contains("within")),
            "{stop:?}"
        );
        assert!(
            took >= ASK_TIMEOUT && took < ASK_TIMEOUT + Duration::from_millis(500),
            "gave up after {took:?}"
        );
        drop(silent);
    }
}

//! The watches behind [`ClusterFacts`]: one kube-runtime watcher per kind of object, with the
//! runtime's backoff, resume from the last resourceVersion (bookmarks included) and re-list
//! after 410 Gone. One task applies their events in order and publishes the facts whenever
//! they change.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use futures_util::{
    StreamExt as _,
    stream::{self, BoxStream},
};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    client::ClientBuilder,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::{mpsc, watch};
use tower::util::MapResponseLayer;
use tracing::{debug, info, warn};

use super::{
    Connection,
    facts::{self, ClusterFacts, NodeInfo, PodRef},
};

/// The label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Starts watching the cluster and returns the facts, updated as events arrive: read the
/// latest with `borrow()` once per poll. Must be called inside a tokio runtime; the watches
/// stop when every receiver is dropped. Fails only on a configuration the client cannot use.
pub fn start(connection: Connection) -> Result<watch::Receiver<ClusterFacts>, kube::Error> {
    let Connection { config, node_name } = connection;
    let (answers_sender, mut answers) = mpsc::unbounded_channel();
    let client = |source| client_for(&config, source, &answers_sender);
    let watches = [
        watch_of(
            Api::<Pod>::all(client(Source::Pods)?),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            Update::Pods,
        ),
        watch_of(
            Api::<EndpointSlice>::namespaced(client(Source::ControlPlane)?, "default"),
            watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}=kubernetes")),
            Update::ControlPlane,
        ),
        watch_of(
            Api::<Service>::namespaced(client(Source::DnsService)?, "kube-system"),
            watcher::Config::default().fields("metadata.name=kube-dns"),
            Update::DnsService,
        ),
        watch_of(
            Api::<EndpointSlice>::namespaced(client(Source::DnsEndpoints)?, "kube-system"),
            watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}=kube-dns")),
            Update::DnsEndpoints,
        ),
        watch_of(
            Api::<Node>::all(client(Source::Nodes)?),
            watcher::Config::default(),
            Update::Nodes,
        ),
    ];
    let answered = stream::poll_fn(move |context| answers.poll_recv(context))
        .map(|(source, at)| Update::Answered(source, at));
    let mut updates = stream::select_all(watches.into_iter().chain([answered.boxed()]));

    let (sender, receiver) = watch::channel(ClusterFacts::default());
    let mut tracker = Tracker::new(node_name);
    tokio::spawn(async move {
        loop {
            let update = tokio::select! {
                update = updates.next() => update,
                () = sender.closed() => break,
            };
            let Some(update) = update else { break };
            if tracker.apply(update) {
                let fresh = tracker.facts();
                sender.send_if_modified(|facts| {
                    let changed = *facts != fresh;
                    *facts = fresh;
                    changed
                });
            }
        }
    });
    Ok(receiver)
}

/// Which watch an update comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Pods,
    ControlPlane,
    DnsService,
    DnsEndpoints,
    Nodes,
}

/// An update, boxed: API objects are large and the updates many.
enum Update {
    Pods(Box<watcher::Result<Event<Pod>>>),
    ControlPlane(Box<watcher::Result<Event<EndpointSlice>>>),
    DnsService(Box<watcher::Result<Event<Service>>>),
    DnsEndpoints(Box<watcher::Result<Event<EndpointSlice>>>),
    Nodes(Box<watcher::Result<Event<Node>>>),
    /// The API server answered a request of this watch successfully at this instant.
    Answered(Source, Instant),
}

fn watch_of<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(Box<watcher::Result<Event<K>>>) -> Update,
) -> BoxStream<'static, Update>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .map(move |result| wrap(Box::new(result)))
        .boxed()
}

/// A client of its own per watch, which reports every successful answer: a watch that resumes
/// after an outage delivers no event until something changes, and its error must not linger.
fn client_for(
    config: &kube::Config,
    source: Source,
    answers: &mpsc::UnboundedSender<(Source, Instant)>,
) -> Result<Client, kube::Error> {
    let answers = answers.clone();
    let report = MapResponseLayer::new(move |response: http::Response<_>| {
        if response.status().is_success() {
            // The receiver is gone only when the watches are stopping.
            let _ = answers.send((source, Instant::now()));
        }
        response
    });
    Ok(ClientBuilder::try_from(config.clone())?
        .with_layer(&report)
        .build())
}

/// The facts' sources, each the projection of one watch.
struct Tracker {
    node_name: String,
    pods: Projection<Vec<(IpAddr, PodRef)>>,
    controlplane: Projection<BTreeSet<IpAddr>>,
    dns_service: Projection<Option<IpAddr>>,
    dns_endpoints: Projection<BTreeSet<IpAddr>>,
    nodes: Projection<NodeInfo>,
}

impl Tracker {
    fn new(node_name: String) -> Self {
        Self {
            node_name,
            pods: Projection::new("pods of this node"),
            controlplane: Projection::new("default/kubernetes EndpointSlices"),
            dns_service: Projection::new("kube-system/kube-dns Service"),
            dns_endpoints: Projection::new("kube-system/kube-dns EndpointSlices"),
            nodes: Projection::new("nodes"),
        }
    }

    /// Applies one update; true when the facts may have changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Pods(result) => self.pods.apply(*result, facts::pod_addresses),
            Update::ControlPlane(result) => {
                self.controlplane.apply(*result, facts::slice_addresses)
            }
            Update::DnsService(result) => self.dns_service.apply(*result, facts::cluster_ip),
            Update::DnsEndpoints(result) => {
                self.dns_endpoints.apply(*result, facts::slice_addresses)
            }
            Update::Nodes(result) => self.nodes.apply(*result, facts::node_info),
            Update::Answered(source, at) => match source {
                Source::Pods => self.pods.answered(at),
                Source::ControlPlane => self.controlplane.answered(at),
                Source::DnsService => self.dns_service.answered(at),
                Source::DnsEndpoints => self.dns_endpoints.answered(at),
                Source::Nodes => self.nodes.answered(at),
            },
        }
    }

    fn facts(&self) -> ClusterFacts {
        let nodes = self.nodes.values();
        let failures = [
            self.pods.failure(),
            self.controlplane.failure(),
            self.dns_service.failure(),
            self.dns_endpoints.failure(),
            self.nodes.failure(),
        ];
        let failures: Vec<String> = failures.into_iter().flatten().collect();
        ClusterFacts {
            pods: self.pods.values().flatten().cloned().collect(),
            controlplane_ips: self.controlplane.values().flatten().copied().collect(),
            cluster_dns: self.dns_service.values().flatten().next().copied(),
            coredns_ips: self.dns_endpoints.values().flatten().copied().collect(),
            node_zones: nodes
                .clone()
                .filter_map(|node| Some((node.zone.clone()?, &node.addresses)))
                .flat_map(|(zone, addresses)| addresses.iter().map(move |ip| (*ip, zone.clone())))
                .collect(),
            own_zone: nodes
                .filter(|node| node.name == self.node_name)
                .find_map(|node| node.zone.clone()),
            synced: self.pods.synced
                && self.controlplane.synced
                && self.dns_service.synced
                && self.dns_endpoints.synced
                && self.nodes.synced,
            last_error: (!failures.is_empty()).then(|| failures.join("; ")),
        }
    }
}

/// What one watch says, object by object (keyed `namespace/name`), projected onto what the
/// facts need: a node heartbeat that changes neither addresses nor zone changes nothing.
struct Projection<V> {
    what: &'static str,
    objects: BTreeMap<String, V>,
    /// Objects of a re-list in progress, which replace `objects` when it completes.
    relisting: Option<BTreeMap<String, V>>,
    synced: bool,
    failure: Option<Failure>,
}

struct Failure {
    message: String,
    at: Instant,
}

impl<V: PartialEq> Projection<V> {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            objects: BTreeMap::new(),
            relisting: None,
            synced: false,
            failure: None,
        }
    }

    fn values(&self) -> impl Iterator<Item = &V> + Clone {
        self.objects.values()
    }

    fn failure(&self) -> Option<String> {
        let failure = self.failure.as_ref()?;
        Some(format!("watching {}: {}", self.what, failure.message))
    }

    /// Applies one watch result; true when the projection or its failure changed.
    fn apply<K: Resource>(
        &mut self,
        result: watcher::Result<Event<K>>,
        project: fn(&K) -> V,
    ) -> bool {
        match result {
            // `Init` comes before the list is asked for: it proves nothing about the server.
            Ok(Event::Init) => self.apply_event(Event::Init, project),
            Ok(event) => self.failure.take().is_some() | self.apply_event(event, project),
            // Gone is how the API server asks for a re-list, which the watcher does next.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                debug!(
                    resource = %self.what,
                    "watch expired: {} (re-listing)", status.message
                );
                false
            }
            Err(error) => {
                let message = error.to_string();
                if self.failure.as_ref().map(|failure| &failure.message) == Some(&message) {
                    debug!(resource = %self.what, "watch failed again: {message}");
                } else {
                    warn!(
                        resource = %self.what,
                        "watch failed: {message}; keeping the last state, retrying"
                    );
                }
                self.failure = Some(Failure {
                    message,
                    at: Instant::now(),
                });
                true
            }
        }
    }

    fn apply_event<K: Resource>(&mut self, event: Event<K>, project: fn(&K) -> V) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let relisting = self.relisting.get_or_insert_default();
                relisting.insert(key(&object), project(&object));
                false
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let changed = !self.synced || listed != self.objects;
                if !self.synced {
                    info!(resource = %self.what, objects = listed.len(), "watch listed");
                }
                self.objects = listed;
                self.synced = true;
                changed
            }
            Event::Apply(object) => {
                let (key, value) = (key(&object), project(&object));
                let changed = self.objects.get(&key) != Some(&value);
                self.objects.insert(key, value);
                changed
            }
            Event::Delete(object) => self.objects.remove(&key(&object)).is_some(),
        }
    }

    /// The API server answered this watch at `at`: a failure seen before is over.
    fn answered(&mut self, at: Instant) -> bool {
        let over = self.failure.as_ref().is_some_and(|failure| failure.at < at);
        if over {
            info!(
                resource = %self.what,
                "the API server answers the watch again"
            );
            self.failure = None;
        }
        over
    }
}

fn key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

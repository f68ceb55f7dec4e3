//! An in-process stand-in for the Kubernetes API server (docs/design.md, "Testing without a
//! cluster": the machines cannot run a real one): list and watch of pods, nodes, Services and
//! EndpointSlices, and GET of a single pod or DaemonSet (404 with a `Status` when absent), in
//! the API's JSON shapes, with one resourceVersion counter for every write, a history that
//! watches resume from, bookmarks every 100 ms to watches that ask for them, field and label
//! selectors of the `key=value` form — and, on demand, 410 Gone, dropped watch connections,
//! garbage answers and a server that is down. It also answers TokenReview and
//! SubjectAccessReview for the tokens and non-resource grants a test registers
//! ([`StandIn::add_token`], [`StandIn::grant`]).
//!
//! The agent's tests run it on loopback; the lab serves it inside a lab namespace, for the real
//! agent to watch through a kubeconfig ([`StandIn::start_with`]). [`objects`] builds the objects
//! it serves.
pub mod objects;
mod reviews;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{StatusCode, Uri, header},
    response::{IntoResponse as _, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot},
    task::JoinHandle,
};

const BOOKMARK_PERIOD: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Nodes,
    Services,
    EndpointSlices,
    DaemonSets,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::DaemonSets => "apps/v1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Nodes => "Node",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::DaemonSets => "DaemonSet",
        }
    }
}

/// A request the stand-in answered, for tests to check how the client lists and resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub watch: bool,
    pub resource_version: String,
}

struct Written {
    resource_version: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
}

#[derive(Clone)]
enum Message {
    Written(Arc<Written>),
    /// 410 Gone on every open watch.
    Expire,
    /// Cut every open watch connection mid-stream.
    Cut,
    /// End every open watch normally.
    End,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Arc<Written>>,
    /// Watches resumed from a resourceVersion below this one get 410 Gone.
    compacted: u64,
    /// Writes are kept out of the history and of the open watches, as events lost to
    /// compaction while a client was away.
    silent: bool,
    garbage: bool,
    requests: Vec<Request>,
    bookmarks: Vec<(Kind, u64)>,
    identities: reviews::Identities,
}

struct Shared {
    store: Mutex<Store>,
    messages: broadcast::Sender<Message>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("the stand-in's store lock")
    }
}

/// Opens the stand-in's listening socket at an address, in whichever network namespace the
/// caller chooses (a socket stays in the namespace it was opened in).
pub type Bind = Arc<dyn Fn(SocketAddr) -> io::Result<std::net::TcpListener> + Send + Sync>;

pub struct StandIn {
    address: SocketAddr,
    bind: Bind,
    shared: Arc<Shared>,
    serving: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl StandIn {
    /// Serves on a free port of 127.0.0.1 in this process's namespace.
    pub async fn start() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_with(loopback, Arc::new(std::net::TcpListener::bind)).await
    }

    /// Serves on the socket `bind` opens at `address` (port 0: a free one); [`restart`]
    /// opens its socket the same way, on the port first chosen.
    ///
    /// [`restart`]: StandIn::restart
    pub async fn start_with(address: SocketAddr, bind: Bind) -> Self {
        let listener = listen(&bind, address);
        let (messages, _) = broadcast::channel(1024);
        let mut stand_in = Self {
            address: listener.local_addr().expect("the stand-in's address"),
            bind,
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                messages,
            }),
            serving: None,
        };
        stand_in.serve(listener);
        stand_in
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Creates or replaces an object (serialized from its k8s-openapi type).
    pub fn apply(&self, kind: Kind, object: Value) {
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("an object has a name");
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut store = self.shared.store();
        let event = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.write(&mut store, key, event, object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut store = self.shared.store();
        let object = store
            .objects
            .get(&key)
            .cloned()
            .expect("deleting an object that exists");
        self.write(&mut store, key, "DELETED", object);
    }

    fn write(
        &self,
        store: &mut Store,
        key: (Kind, String, String),
        event: &'static str,
        mut object: Value,
    ) {
        store.resource_version += 1;
        let resource_version = store.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        if event == "DELETED" {
            store.objects.remove(&key);
        } else {
            store.objects.insert(key.clone(), object.clone());
        }
        if store.silent {
            return;
        }
        let written = Arc::new(Written {
            resource_version,
            kind: key.0,
            event,
            object,
        });
        store.history.push(Arc::clone(&written));
        // Sent under the store's lock: a bookmark taken after it never overtakes it.
        let _ = self.shared.messages.send(Message::Written(written));
    }

    /// Starts deleting an object as the API server does while finalizers hold it (foreground
    /// deletion): it stays, with `metadata.deletionTimestamp` set.
    pub fn begin_deletion(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut store = self.shared.store();
        let mut object = store
            .objects
            .get(&key)
            .cloned()
            .expect("deleting an object that exists");
        object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.write(&mut store, key, "MODIFIED", object);
    }

    /// While silent, writes reach neither the open watches nor the history.
    pub fn silence(&self, silent: bool) {
        self.shared.store().silent = silent;
    }

    /// Compacts the history: open watches and every resume get 410 Gone, so clients re-list.
    pub fn expire(&self) {
        let mut store = self.shared.store();
        store.compacted = store.resource_version + 1;
        store.history.clear();
        let _ = self.shared.messages.send(Message::Expire);
    }

    /// Cuts every open watch connection mid-stream.
    pub fn cut_watches(&self) {
        let _ = self.shared.messages.send(Message::Cut);
    }

    /// Answers every request with 200 and a body that is not JSON, or stops doing so.
    pub fn garbage(&self, on: bool) {
        self.shared.store().garbage = on;
        let _ = self.shared.messages.send(Message::End);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.store().requests.clone()
    }

    /// The resourceVersions of the bookmarks sent so far on watches of `kind`.
    pub fn bookmarks(&self, kind: Kind) -> Vec<u64> {
        let store = self.shared.store();
        store
            .bookmarks
            .iter()
            .filter(|(of, _)| *of == kind)
            .map(|(_, rv)| *rv)
            .collect()
    }

    /// TokenReview says `token` is `user`'s; any other token is no one's.
    pub fn add_token(&self, token: &str, user: &str) {
        self.shared.store().identities.add_token(token, user);
    }

    /// SubjectAccessReview lets `user` get the non-resource URLs `pattern` names: one URL, or
    /// every URL with a prefix when it ends in `*` (as an RBAC rule's `nonResourceURLs`).
    pub fn grant(&self, user: &str, pattern: &str) {
        self.shared.store().identities.grant(user, pattern);
    }

    /// TokenReviews and SubjectAccessReviews answered so far.
    pub fn reviews(&self) -> u64 {
        self.shared.store().identities.reviews
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version
    }

    /// Goes down: open watches are cut, the port stops accepting.
    pub async fn stop(&mut self) {
        let (shutdown, mut serving) = self.serving.take().expect("the stand-in is serving");
        let _ = shutdown.send(());
        // Watches opened while the server winds down are cut too.
        let cut = async {
            loop {
                let _ = self.shared.messages.send(Message::Cut);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            stopped = &mut serving => stopped.expect("the stand-in's server task"),
            () = cut => unreachable!(),
            () = tokio::time::sleep(Duration::from_secs(5)) => panic!("the stand-in did not stop within 5 s"),
        }
    }

    /// Comes back on the same address, with the same objects and history.
    pub async fn restart(&mut self) {
        let listener = listen(&self.bind, self.address);
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let router = Router::new()
            .route(
                "/api/v1/pods",
                get(|state, uri| answer(state, Kind::Pods, None, uri)),
            )
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}",
                get(|state, Path(at)| one(state, Kind::Pods, at)),
            )
            .route(
                "/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}",
                get(|state, Path(at)| one(state, Kind::DaemonSets, at)),
            )
            .route(
                "/api/v1/nodes",
                get(|state, uri| answer(state, Kind::Nodes, None, uri)),
            )
            .route(
                "/api/v1/namespaces/{namespace}/services",
                get(|state, Path(namespace), uri| {
                    answer(state, Kind::Services, Some(namespace), uri)
                }),
            )
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                get(|state, Path(namespace), uri| {
                    answer(state, Kind::EndpointSlices, Some(namespace), uri)
                }),
            )
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(reviews::token_review),
            )
            .route(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                post(reviews::subject_access_review),
            )
            .with_state(Arc::clone(&self.shared));
        let (shutdown, stopped) = oneshot::channel();
        let serving = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("the stand-in serves");
        });
        self.serving = Some((shutdown, serving));
    }
}

/// A listening socket from `bind`, for tokio (which must be running).
fn listen(bind: &Bind, address: SocketAddr) -> TcpListener {
    let listener = bind(address)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .unwrap_or_else(|error| panic!("binding the stand-in to {address}: {error}"));
    TcpListener::from_std(listener).expect("a tokio listener from the stand-in's socket")
}

/// What a request selects: a namespace and `key=value` field and label selectors.
struct Selection {
    namespace: Option<String>,
    fields: Vec<(String, String)>,
    labels: Vec<(String, String)>,
}

impl Selection {
    fn parse(namespace: Option<String>, query: &HashMap<String, String>) -> Result<Self, String> {
        let terms = |name: &str| -> Result<Vec<(String, String)>, String> {
            let Some(selector) = query.get(name).filter(|text| !text.is_empty()) else {
                return Ok(Vec::new());
            };
            selector
                .split(',')
                .map(|term| match term.split_once('=') {
                    Some((key, value)) if !key.ends_with('!') && !value.starts_with('=') => {
                        Ok((key.to_owned(), value.to_owned()))
                    }
                    _ => Err(format!(
                        "the stand-in only serves {name} terms key=value, not {term:?}"
                    )),
                })
                .collect()
        };
        Ok(Self {
            namespace,
            fields: terms("fieldSelector")?,
            labels: terms("labelSelector")?,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let in_namespace = match &self.namespace {
            Some(namespace) => metadata["namespace"].as_str() == Some(namespace.as_str()),
            None => true,
        };
        let field = |path: &str| {
            let pointer = format!("/{}", path.replace('.', "/"));
            object
                .pointer(&pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        in_namespace
            && self
                .fields
                .iter()
                .all(|(path, value)| field(path).as_deref() == Some(value))
            && self
                .labels
                .iter()
                .all(|(key, value)| metadata["labels"][key].as_str() == Some(value.as_str()))
    }
}

async fn answer(
    State(shared): State<Arc<Shared>>,
    kind: Kind,
    namespace: Option<String>,
    uri: Uri,
) -> Response {
    let query: HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let resource_version = query.get("resourceVersion").cloned().unwrap_or_default();
    let garbage = {
        let mut store = shared.store();
        store.requests.push(Request {
            kind,
            watch,
            resource_version: resource_version.clone(),
        });
        store.garbage
    };
    if garbage {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            "<html>502 Bad Gateway</html>\n",
        )
            .into_response();
    }
    let selection = match Selection::parse(namespace, &query) {
        Ok(selection) => selection,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    if watch {
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|value| value == "true");
        watch_answer(shared, kind, selection, &resource_version, bookmarks)
    } else {
        list_answer(&shared, kind, &selection)
    }
}

/// One object as the API server answers a GET of it: whole, with its kind and apiVersion; or
/// 404 with a `Status` saying so.
async fn one(
    State(shared): State<Arc<Shared>>,
    kind: Kind,
    (namespace, name): (String, String),
) -> Response {
    let mut store = shared.store();
    store.requests.push(Request {
        kind,
        watch: false,
        resource_version: String::new(),
    });
    if store.garbage {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            "<html>502 Bad Gateway</html>\n",
        )
            .into_response();
    }
    let resource = format!("{}s", kind.kind().to_lowercase());
    let (status, body) = match store.objects.get(&(kind, namespace, name.clone())) {
        Some(object) => {
            let mut object = object.clone();
            object["kind"] = json!(kind.kind());
            object["apiVersion"] = json!(kind.api_version());
            (StatusCode::OK, object)
        }
        None => (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{resource} \"{name}\" not found"), "reason": "NotFound",
                "details": {"name": name, "kind": resource}, "code": 404}),
        ),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A list as the API server answers it: items without kind and apiVersion, the list's
/// resourceVersion in its metadata.
fn list_answer(shared: &Shared, kind: Kind, selection: &Selection) -> Response {
    let store = shared.store();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((of, _, _), object)| *of == kind && selection.matches(object))
        .map(|(_, object)| {
            let mut item = object.clone();
            let fields = item.as_object_mut().expect("objects are JSON objects");
            fields.remove("kind");
            fields.remove("apiVersion");
            item
        })
        .collect();
    let list = json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": store.resource_version.to_string()},
        "items": items,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        list.to_string(),
    )
        .into_response()
}

/// A watch: the events after `resource_version` from the history, then live ones, one JSON
/// object per line, until the client goes or the test ends, cuts or expires it.
fn watch_answer(
    shared: Arc<Shared>,
    kind: Kind,
    selection: Selection,
    resource_version: &str,
    bookmarks: bool,
) -> Response {
    let Ok(from) = resource_version.parse::<u64>() else {
        return (
            StatusCode::BAD_REQUEST,
            "the stand-in serves watches resumed from a resourceVersion only",
        )
            .into_response();
    };
    let (lines, mut body) = mpsc::channel(64);
    let (messages, backlog, gone) = {
        let store = shared.store();
        let backlog: Vec<Arc<Written>> = store
            .history
            .iter()
            .filter(|written| written.resource_version > from)
            .cloned()
            .collect();
        (shared.messages.subscribe(), backlog, from < store.compacted)
    };
    let watch = Watch {
        shared,
        kind,
        selection,
        from,
        lines,
        messages,
    };
    tokio::spawn(watch.run(backlog, gone, bookmarks));
    let body = Body::from_stream(futures_util::stream::poll_fn(move |context| {
        body.poll_recv(context)
    }));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// One open watch, writing lines into its response body.
struct Watch {
    shared: Arc<Shared>,
    kind: Kind,
    selection: Selection,
    from: u64,
    lines: mpsc::Sender<Result<Bytes, io::Error>>,
    messages: broadcast::Receiver<Message>,
}

/// Whether a watch goes on after a message.
enum Next {
    Continue,
    Stop,
}

impl Watch {
    async fn run(mut self, backlog: Vec<Arc<Written>>, gone: bool, bookmarks: bool) {
        if gone {
            self.handle(Message::Expire).await;
            return;
        }
        for written in backlog {
            if let Next::Stop = self.handle(Message::Written(written)).await {
                return;
            }
        }
        let mut ticks = tokio::time::interval(BOOKMARK_PERIOD);
        loop {
            let next = tokio::select! {
                message = self.messages.recv() => match message {
                    Ok(message) => self.handle(message).await,
                    // A watch that cannot keep up is cut, as the API server does.
                    Err(_) => self.handle(Message::Cut).await,
                },
                _ = ticks.tick(), if bookmarks => self.bookmark().await,
            };
            if let Next::Stop = next {
                return;
            }
        }
    }

    async fn handle(&mut self, message: Message) -> Next {
        match message {
            Message::Written(written) => {
                let wanted = written.kind == self.kind
                    && written.resource_version > self.from
                    && self.selection.matches(&written.object);
                if !wanted {
                    return Next::Continue;
                }
                self.send(json!({"type": written.event, "object": written.object}))
                    .await
            }
            Message::Expire => {
                let from = self.from;
                self.send(json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from}"),
                    "reason": "Expired", "code": 410}}))
                    .await;
                Next::Stop
            }
            Message::Cut => {
                let cut = io::Error::other("connection cut by the test");
                let _ = self.lines.send(Err(cut)).await;
                Next::Stop
            }
            Message::End => Next::Stop,
        }
    }

    /// A bookmark at the latest resourceVersion, after every event written up to it (they are
    /// queued already: writes are broadcast under the store's lock).
    async fn bookmark(&mut self) -> Next {
        let now = self.shared.store().resource_version;
        while let Ok(message) = self.messages.try_recv() {
            if let Next::Stop = self.handle(message).await {
                return Next::Stop;
            }
        }
        self.shared.store().bookmarks.push((self.kind, now));
        let kind = self.kind;
        self.send(json!({"type": "BOOKMARK", "object": {
            "kind": kind.kind(), "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": now.to_string()}}}))
            .await
    }

    async fn send(&self, line: Value) -> Next {
        let mut text = line.to_string();
        text.push('\n');
        match self.lines.send(Ok(Bytes::from(text))).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }
}

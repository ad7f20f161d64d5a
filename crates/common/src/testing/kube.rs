//! A fake Kubernetes API server for tests: real HTTP/1.1 on loopback and the
//! API's JSON wire format, so a real `kube::Client` (pointed at
//! [`FakeApiServer::url`]) runs its real request, decoding and watch code
//! against it. No kube crate is needed here: it is all JSON.
//!
//! What it does, as the API reference describes it:
//! - an in-memory store keyed by API prefix (`api/v1`, `apis/<group>/<version>`),
//!   resource, namespace and name; one global `resourceVersion` counter,
//!   stamped into `metadata.resourceVersion` at every write (and `uid` at
//!   create);
//! - GET of one object (404 `NotFound` Status), LIST (kind `List`,
//!   `metadata.resourceVersion`, `fieldSelector` / `labelSelector` equality
//!   terms), POST (409 `AlreadyExists`), PUT (404, or 409 `Conflict` when the
//!   body's `resourceVersion` is not the stored one), DELETE;
//! - `?watch=true`: newline-delimited `{"type":…,"object":…}` events
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`); from a `resourceVersion`
//!   older than the last [`FakeApiServer::compact`] the stream is a single
//!   `ERROR` event holding a 410 `Expired` Status, as etcd compaction makes
//!   it; without one (or `"0"`) it starts with an `ADDED` per object;
//!   `timeoutSeconds` ends it; [`FakeApiServer::drop_watches`] cuts every open
//!   watch connection;
//! - [`FakeApiServer::react`] installs a hook that answers (or refuses, e.g.
//!   403) chosen requests first: TokenReviews are answered that way.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Where an object lives: `(prefix, resource, namespace, name)`; `prefix`
/// is `api/v1` or `apis/<group>/<version>`, `namespace` empty for
/// cluster-scoped resources.
pub type Key = (String, String, String, String);

/// One request as the fake saw it, for a hook to decide on.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub method: Method,
    /// `api/v1` or `apis/<group>/<version>`.
    pub prefix: String,
    pub resource: String,
    pub namespace: String,
    /// Empty for a collection.
    pub name: String,
    /// The decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// The JSON body (`Null` when there is none).
    pub body: Value,
}

impl FakeRequest {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|v| v == "true" || v == "1")
    }

    /// The API group: `""` for the core group (`api/v1`).
    pub fn api_group(&self) -> &str {
        self.prefix
            .strip_prefix("apis/")
            .and_then(|g| g.split('/').next())
            .unwrap_or("")
    }

    /// The RBAC verb the API server checks for this request: a GET is
    /// `watch` with `watch=true`, else `get` of a name or `list` of a
    /// collection; POST `create`, PUT `update`, PATCH `patch`, DELETE
    /// `delete`. `None` for another method.
    pub fn rbac_verb(&self) -> Option<&'static str> {
        Some(match self.method {
            Method::GET if self.is_watch() => "watch",
            Method::GET if !self.name.is_empty() => "get",
            Method::GET => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => return None,
        })
    }
}

/// A hook's answer: the status code and the JSON body.
pub type Reaction = (u16, Value);
type Hook = Arc<dyn Fn(&FakeRequest) -> Option<Reaction> + Send + Sync>;

#[derive(Clone, Debug)]
struct Event {
    prefix: String,
    resource: String,
    namespace: String,
    version: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    /// Every write, oldest first, from the last compaction on.
    log: Vec<Event>,
    version: u64,
    /// Watches from a version below this get 410.
    compacted: u64,
    uids: u64,
}

struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    hooks: Mutex<Vec<Hook>>,
    /// Replaced by [`FakeApiServer::drop_watches`].
    watch_cut: Mutex<CancellationToken>,
    /// `METHOD /path?query` of each request, and the request as the fake
    /// placed it (without its body; `None` for a path outside the API).
    requests: Mutex<Vec<(String, Option<FakeRequest>)>>,
    stop: CancellationToken,
}

/// The fake API server (see the module docs). Stops when dropped.
#[derive(Clone)]
pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A `Status` object, as the API server sends with every failure.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and serves until the last clone is dropped.
    pub async fn start() -> std::io::Result<FakeApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            events: broadcast::channel(4096).0,
            hooks: Mutex::new(Vec::new()),
            watch_cut: Mutex::new(CancellationToken::new()),
            requests: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&inner);
        let stop = inner.stop.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let Some(inner) = weak.upgrade() else { return };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(inner.handle(req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(FakeApiServer { addr, inner })
    }

    /// `http://127.0.0.1:<port>`: give it to `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: new connections are refused, open ones cut.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        self.drop_watches();
    }

    /// Stores `object` (its `apiVersion`, `kind`, `metadata.namespace` and
    /// `metadata.name` say where) as a create would, and returns it stamped.
    /// `resource` is the plural (`pods`, `secrets`, `leases`).
    pub fn insert(&self, resource: &str, object: Value) -> Value {
        let prefix = prefix_of(&object);
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut store = self.inner.lock();
        let key = (prefix, resource.to_owned(), ns, name);
        let kind = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.inner.write(&mut store, key, object, kind)
    }

    /// The stored object, if any.
    pub fn get(&self, prefix: &str, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .objects
            .get(&key(prefix, resource, namespace, name))
            .cloned()
    }

    /// Every stored object of `resource` (any prefix, any namespace).
    pub fn list(&self, resource: &str) -> Vec<Value> {
        self.inner
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.1 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Deletes an object as a DELETE would; returns whether it existed.
    pub fn delete(&self, prefix: &str, resource: &str, namespace: &str, name: &str) -> bool {
        let mut store = self.inner.lock();
        self.inner
            .remove(&mut store, key(prefix, resource, namespace, name))
            .is_some()
    }

    /// Forgets the event history: a watch from any version seen so far gets
    /// `410 Gone` (an `ERROR` event), as after an etcd compaction.
    pub fn compact(&self) {
        let mut store = self.inner.lock();
        store.compacted = store.version + 1;
        store.log.clear();
    }

    /// Sends a `BOOKMARK` at the current version to every open watch.
    pub fn bookmark(&self) {
        let store = self.inner.lock();
        let _ = self.inner.events.send(Event {
            prefix: String::new(),
            resource: String::new(),
            namespace: String::new(),
            version: store.version,
            kind: "BOOKMARK",
            object: Value::Null,
        });
    }

    /// Cuts every open watch connection (the client sees the body end).
    pub fn drop_watches(&self) {
        let mut cut = self
            .inner
            .watch_cut
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Installs a hook asked before the store about every request; the first
    /// hook answering `Some` wins; [`Self::clear_hooks`] removes them all.
    pub fn react(&self, hook: impl Fn(&FakeRequest) -> Option<Reaction> + Send + Sync + 'static) {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    pub fn clear_hooks(&self) {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// `METHOD /path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.placed_requests()
            .into_iter()
            .map(|(line, _)| line)
            .collect()
    }

    /// Every request so far: its `METHOD /path?query` and the request as
    /// the fake placed it, without its body (`None` for a path outside the
    /// API, which the fake answered 404).
    pub fn placed_requests(&self) -> Vec<(String, Option<FakeRequest>)> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many requests so far match `what`.
    pub fn count(&self, what: impl Fn(&str) -> bool) -> usize {
        self.requests().iter().filter(|r| what(r)).count()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn key(prefix: &str, resource: &str, namespace: &str, name: &str) -> Key {
    (
        prefix.trim_matches('/').to_owned(),
        resource.to_owned(),
        namespace.to_owned(),
        name.to_owned(),
    )
}

fn prefix_of(object: &Value) -> String {
    match object["apiVersion"].as_str() {
        Some(v) if v.contains('/') => format!("apis/{v}"),
        Some(v) => format!("api/{v}"),
        None => "api/v1".into(),
    }
}

/// Splits `/api/v1/...` or `/apis/<g>/<v>/...` into
/// `(prefix, resource, namespace, name)`.
fn parse_path(path: &str) -> Option<Key> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segs.first()? {
        "api" if segs.len() >= 3 => (format!("api/{}", segs[1]), &segs[2..]),
        "apis" if segs.len() >= 4 => (format!("apis/{}/{}", segs[1], segs[2]), &segs[3..]),
        _ => return None,
    };
    let (ns, rest) = if rest.len() >= 3 && rest[0] == "namespaces" {
        (rest[1], &rest[2..])
    } else {
        ("", rest)
    };
    match rest {
        [resource] => Some((prefix, (*resource).to_owned(), ns.to_owned(), String::new())),
        [resource, name] => Some((
            prefix,
            (*resource).to_owned(),
            ns.to_owned(),
            (*name).to_owned(),
        )),
        _ => None,
    }
}

/// A request on `path?raw_query` as the fake places it, without a body;
/// `None` for a path outside the API.
fn place(method: &Method, path: &str, raw_query: &str) -> Option<FakeRequest> {
    let (prefix, resource, namespace, name) = parse_path(path)?;
    Some(FakeRequest {
        method: method.clone(),
        prefix,
        resource,
        namespace,
        name,
        query: parse_query(raw_query),
        body: Value::Null,
    })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// `a.b.c` of `v`, as a string.
fn field<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Whether `object` passes the `fieldSelector` and `labelSelector`
/// equality terms of `query` (`k=v`, `k==v`, `k!=v`, comma-separated).
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let terms = |sel: Option<&String>| -> Vec<(String, String, bool)> {
        sel.map(|s| {
            s.split(',')
                .filter(|t| !t.is_empty())
                .filter_map(|t| {
                    if let Some((k, v)) = t.split_once("!=") {
                        Some((k.to_owned(), v.to_owned(), false))
                    } else {
                        let (k, v) = t.split_once("==").or_else(|| t.split_once('='))?;
                        Some((k.to_owned(), v.to_owned(), true))
                    }
                })
                .collect()
        })
        .unwrap_or_default()
    };
    let fields_ok = terms(query.get("fieldSelector"))
        .iter()
        .all(|(k, v, eq)| (field(object, k).unwrap_or("") == v) == *eq);
    let labels_ok = terms(query.get("labelSelector")).iter().all(|(k, v, eq)| {
        let got = object["metadata"]["labels"].get(k).and_then(Value::as_str);
        (got == Some(v.as_str())) == *eq
    });
    fields_ok && labels_ok
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("a valid response")
}

fn failure(code: u16, reason: &str, message: String) -> Response<Body> {
    json_response(code, &status(code, reason, &message))
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stamps and stores `object` under `key`, logs and broadcasts the event.
    fn write(&self, store: &mut Store, key: Key, mut object: Value, kind: &'static str) -> Value {
        store.version += 1;
        let version = store.version;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(version.to_string());
        meta["name"] = json!(key.3);
        if !key.2.is_empty() {
            meta["namespace"] = json!(key.2);
        }
        if kind == "ADDED" {
            store.uids += 1;
            meta["uid"] = json!(format!("fake-uid-{}", store.uids));
        } else if let Some(old) = store.objects.get(&key) {
            meta["uid"] = old["metadata"]["uid"].clone();
        }
        store.objects.insert(key.clone(), object.clone());
        let event = Event {
            prefix: key.0,
            resource: key.1,
            namespace: key.2,
            version,
            kind,
            object: object.clone(),
        };
        store.log.push(event.clone());
        let _ = self.events.send(event);
        object
    }

    fn remove(&self, store: &mut Store, key: Key) -> Option<Value> {
        let mut object = store.objects.remove(&key)?;
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let event = Event {
            prefix: key.0,
            resource: key.1,
            namespace: key.2,
            version,
            kind: "DELETED",
            object: object.clone(),
        };
        store.log.push(event.clone());
        let _ = self.events.send(event);
        Some(object)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let raw_query = req.uri().query().unwrap_or("").to_owned();
        let placed = place(&method, &path, &raw_query);
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((
                format!("{method} {path}?{}", decode(&raw_query)),
                placed.clone(),
            ));
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return failure(400, "BadRequest", format!("reading the body: {e}")),
        };
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return failure(400, "BadRequest", format!("the body is not JSON: {e}")),
            }
        };
        let Some(mut request) = placed else {
            return failure(404, "NotFound", format!("the server could not find {path}"));
        };
        request.body = body;
        let hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            if let Some((code, body)) = hook(&request) {
                return json_response(code, &body);
            }
        }
        self.serve(request)
    }

    fn serve(self: Arc<Self>, r: FakeRequest) -> Response<Body> {
        let what = if r.namespace.is_empty() {
            format!("{} {:?}", r.resource, r.name)
        } else {
            format!("{} {:?} in namespace {:?}", r.resource, r.name, r.namespace)
        };
        let key = (
            r.prefix.clone(),
            r.resource.clone(),
            r.namespace.clone(),
            r.name.clone(),
        );
        match (r.method.clone(), r.name.is_empty()) {
            (Method::GET, true) if r.is_watch() => self.watch(r),
            (Method::GET, true) => {
                let store = self.lock();
                let items: Vec<Value> = store
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.0 == r.prefix
                            && k.1 == r.resource
                            && (r.namespace.is_empty() || k.2 == r.namespace)
                    })
                    .map(|(_, v)| v)
                    .filter(|v| selected(v, &r.query))
                    .cloned()
                    .collect();
                json_response(
                    200,
                    &json!({"kind": "List", "apiVersion": "v1",
                            "metadata": {"resourceVersion": store.version.to_string()},
                            "items": items}),
                )
            }
            (Method::GET, false) => match self.lock().objects.get(&key) {
                Some(o) => json_response(200, o),
                None => failure(404, "NotFound", format!("{what} not found")),
            },
            (Method::POST, true) => {
                let name = r.body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if name.is_empty() {
                    return failure(
                        422,
                        "Invalid",
                        format!("{}: metadata.name: Required value", r.resource),
                    );
                }
                let key = (r.prefix, r.resource.clone(), r.namespace, name.clone());
                let mut store = self.lock();
                if store.objects.contains_key(&key) {
                    return failure(
                        409,
                        "AlreadyExists",
                        format!("{} {name:?} already exists", r.resource),
                    );
                }
                let stored = self.write(&mut store, key, r.body, "ADDED");
                json_response(201, &stored)
            }
            (Method::PUT, false) => {
                let mut store = self.lock();
                let Some(current) = store.objects.get(&key) else {
                    return failure(404, "NotFound", format!("{what} not found"));
                };
                let want = r.body["metadata"]["resourceVersion"].as_str();
                let have = current["metadata"]["resourceVersion"].as_str();
                if want.is_some_and(|w| Some(w) != have) {
                    return failure(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again",
                            r.resource, r.name
                        ),
                    );
                }
                let stored = self.write(&mut store, key, r.body, "MODIFIED");
                json_response(200, &stored)
            }
            (Method::DELETE, false) => {
                let mut store = self.lock();
                match self.remove(&mut store, key) {
                    Some(o) => json_response(200, &o),
                    None => failure(404, "NotFound", format!("{what} not found")),
                }
            }
            (m, _) => failure(
                405,
                "MethodNotAllowed",
                format!("{m} is not supported by the fake API server on {what}"),
            ),
        }
    }

    fn watch(self: Arc<Self>, r: FakeRequest) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let line = |kind: &str, object: &Value| -> Result<Frame<Bytes>, Infallible> {
            Ok(Frame::data(Bytes::from(format!(
                "{}\n",
                json!({"type": kind, "object": object})
            ))))
        };
        let matches = {
            let r = r.clone();
            move |e: &Event| {
                e.prefix == r.prefix
                    && e.resource == r.resource
                    && (r.namespace.is_empty() || e.namespace == r.namespace)
                    && selected(&e.object, &r.query)
            }
        };
        let from: u64 = r
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Under the store lock: the replay and the live feed join without a gap.
        let (initial, mut live, mut last) = {
            let store = self.lock();
            let live = self.events.subscribe();
            if from != 0 && from < store.compacted {
                let gone = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({})", store.compacted),
                );
                let _ = tx.try_send(line("ERROR", &gone));
                drop(tx);
                return Response::new(
                    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
                );
            }
            let initial: Vec<Result<Frame<Bytes>, Infallible>> = if from == 0 {
                store
                    .objects
                    .iter()
                    .filter(|(k, _)| {
                        k.0 == r.prefix
                            && k.1 == r.resource
                            && (r.namespace.is_empty() || k.2 == r.namespace)
                    })
                    .map(|(_, v)| v)
                    .filter(|v| selected(v, &r.query))
                    .map(|v| line("ADDED", v))
                    .collect()
            } else {
                store
                    .log
                    .iter()
                    .filter(|e| e.version > from && matches(e))
                    .map(|e| line(e.kind, &e.object))
                    .collect()
            };
            (initial, live, store.version.max(from))
        };
        let timeout = r
            .query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(3600));
        let cut = self
            .watch_cut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let stop = self.stop.clone();
        let bookmarks = r
            .query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        tokio::spawn(async move {
            for frame in initial {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                let event = tokio::select! {
                    // A cut connection delivers nothing more, even if events wait.
                    biased;
                    _ = cut.cancelled() => return,
                    _ = stop.cancelled() => return,
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    e = live.recv() => match e {
                        Ok(e) => e,
                        // Too slow a reader: end the watch, as the server would.
                        Err(_) => return,
                    },
                };
                if event.kind == "BOOKMARK" {
                    if bookmarks {
                        let object = json!({"kind": "", "apiVersion": "",
                            "metadata": {"resourceVersion": event.version.to_string()}});
                        if tx.send(line("BOOKMARK", &object)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                if event.version <= last || !matches(&event) {
                    continue;
                }
                last = event.version;
                if tx.send(line(event.kind, &event.object)).await.is_err() {
                    return;
                }
            }
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync())
            .expect("a valid response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_prefix_resource_namespace_name() {
        assert_eq!(
            parse_path("/api/v1/namespaces/default/pods/web-0"),
            Some(key("api/v1", "pods", "default", "web-0"))
        );
        assert_eq!(
            parse_path("/api/v1/pods"),
            Some(key("api/v1", "pods", "", ""))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces"),
            Some(key("api/v1", "namespaces", "", ""))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces/istio-system"),
            Some(key("api/v1", "namespaces", "", "istio-system"))
        );
        assert_eq!(
            parse_path("/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/x"),
            Some(key(
                "apis/coordination.k8s.io/v1",
                "leases",
                "istio-system",
                "x"
            ))
        );
        assert_eq!(parse_path("/version"), None);
    }

    #[test]
    fn requests_map_to_rbac_verbs_and_groups() {
        let r = |m: Method, path: &str, q: &str| {
            let r = place(&m, path, q).unwrap();
            (
                r.rbac_verb().unwrap(),
                r.api_group().to_owned(),
                r.resource,
                r.namespace,
            )
        };
        let t = |v: &'static str, g: &str, res: &str, ns: &str| {
            (v, g.to_owned(), res.to_owned(), ns.to_owned())
        };
        assert_eq!(
            r(
                Method::GET,
                "/api/v1/namespaces/istio-system/secrets/istio-ca-secret",
                ""
            ),
            t("get", "", "secrets", "istio-system")
        );
        assert_eq!(
            r(Method::GET, "/api/v1/pods", "watch=true&resourceVersion=5"),
            t("watch", "", "pods", "")
        );
        assert_eq!(
            r(Method::GET, "/api/v1/namespaces", ""),
            t("list", "", "namespaces", "")
        );
        assert_eq!(
            r(
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/x",
                ""
            ),
            t("update", "coordination.k8s.io", "leases", "istio-system")
        );
        assert_eq!(
            r(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                ""
            ),
            t("create", "authentication.k8s.io", "tokenreviews", "")
        );
        assert_eq!(
            place(&Method::OPTIONS, "/api/v1/pods", "")
                .unwrap()
                .rbac_verb(),
            None
        );
    }

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "a", "labels": {"app": "web"}},
                         "spec": {"nodeName": "n1"}});
        let q = |s: &str| parse_query(s);
        assert!(selected(&pod, &q("fieldSelector=spec.nodeName%3Dn1")));
        assert!(!selected(&pod, &q("fieldSelector=spec.nodeName%3Dn2")));
        assert!(selected(&pod, &q("fieldSelector=metadata.name!%3Db")));
        assert!(selected(&pod, &q("labelSelector=app%3Dweb")));
        assert!(!selected(&pod, &q("labelSelector=app%3Ddb")));
    }
}

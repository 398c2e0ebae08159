//! A local Kubernetes API server for the Kubernetes feed's tests, on axum
//! (hyper) over loopback: list and watch of pods, namespaces and a
//! namespace's DaemonSets, with real JSON objects, resource versions,
//! bookmarks, `fieldSelector` and `labelSelector` as the API server applies
//! them (an object that stops matching is a watch's `DELETED`, one that
//! starts matching its `ADDED`), and watches that can be ended or answered
//! with `410 Gone` (an expired resource version) to force a relist; and
//! merge patches of a pod's `status` subresource (how a node agent writes
//! `ambient.istio.io/redirection`). It can go down and come back on the same
//! port with its state kept, as an API server does across a reboot.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, Query, State as Shared},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, patch},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One kind of request a client made, in RBAC's terms: what a role must
/// grant for it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiCall {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    /// With its subresource, as RBAC writes it (`pods/status`).
    pub resource: String,
    /// `None` for a cluster-wide request.
    pub namespace: Option<String>,
}

impl ApiCall {
    /// The call a request of `method` on `path` (with `query`) is.
    fn of(method: &axum::http::Method, path: &str, query: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        // `namespaces/NS/RESOURCE...` is namespaced, but `namespaces` and
        // `namespaces/NAME` are the namespaces themselves.
        let (namespace, rest) = match rest {
            ["namespaces", ns, resource, rest @ ..] => (Some(ns.to_string()), {
                let mut r = vec![*resource];
                r.extend(rest);
                r
            }),
            other => (None, other.to_vec()),
        };
        let (resource, name, subresource) = (rest.first()?, rest.get(1), rest.get(2));
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match *method {
            axum::http::Method::GET if watch => "watch",
            axum::http::Method::GET if name.is_some() => "get",
            axum::http::Method::GET => "list",
            axum::http::Method::POST => "create",
            axum::http::Method::PUT => "update",
            axum::http::Method::PATCH => "patch",
            axum::http::Method::DELETE => "delete",
            _ => return None,
        };
        Some(ApiCall {
            verb: verb.into(),
            group: group.into(),
            resource: match subresource {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            },
            namespace,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pods,
    Namespaces,
    DaemonSets,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Pods | Kind::Namespaces => "v1",
            Kind::DaemonSets => "apps/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Namespaces => "Namespace",
            Kind::DaemonSets => "DaemonSet",
        }
    }
}

/// One requirement of a `labelSelector`, as the API server parses them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &Value) -> bool {
        let value = |key: &str| labels[key].as_str().map(str::to_string);
        match self {
            LabelRequirement::Equals(k, v) => value(k).as_deref() == Some(v),
            LabelRequirement::NotEquals(k, v) => value(k).as_deref() != Some(v),
            LabelRequirement::In(k, vs) => value(k).is_some_and(|x| vs.contains(&x)),
            LabelRequirement::NotIn(k, vs) => !value(k).is_some_and(|x| vs.contains(&x)),
            LabelRequirement::Exists(k) => value(k).is_some(),
            LabelRequirement::DoesNotExist(k) => value(k).is_none(),
        }
    }
}

/// What a list or watch covers: a kind, in one namespace or all, and the
/// selectors it was asked with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    kind: Kind,
    namespace: Option<String>,
    /// `fieldSelector`: `path=value` and `path!=value` terms.
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelRequirement>,
}

impl Scope {
    fn new(kind: Kind, namespace: Option<String>, params: &Params) -> Result<Self, String> {
        Ok(Self {
            kind,
            namespace,
            fields: parse_field_selector(params.field_selector.as_deref().unwrap_or(""))?,
            labels: parse_label_selector(params.label_selector.as_deref().unwrap_or(""))?,
        })
    }

    fn covers(&self, kind: Kind, object: &Value) -> bool {
        self.kind == kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| object["metadata"]["namespace"] == ns.as_str())
            && self.fields.iter().all(|(path, equal, want)| {
                let got = path
                    .split('.')
                    .fold(object, |v, part| &v[part])
                    .as_str()
                    .unwrap_or("");
                (got == want) == *equal
            })
            && self
                .labels
                .iter()
                .all(|r| r.matches(&object["metadata"]["labels"]))
    }
}

/// The field selectors the API server supports for the kinds served here.
const SELECTABLE_FIELDS: [&str; 4] = [
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.phase",
];

fn parse_field_selector(text: &str) -> Result<Vec<(String, bool, String)>, String> {
    text.split(',')
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if !SELECTABLE_FIELDS.contains(&path) {
                return Err(format!("field label not supported: {path}"));
            }
            Ok((path.to_string(), equal, value.to_string()))
        })
        .collect()
}

fn parse_label_selector(text: &str) -> Result<Vec<LabelRequirement>, String> {
    // Commas separate requirements, except inside a set's parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("invalid label selector term {term:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            if let Some(key) = term.strip_prefix('!') {
                Ok(LabelRequirement::DoesNotExist(key.trim().to_string()))
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Ok(LabelRequirement::NotIn(k.trim().to_string(), set(rest)?))
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Ok(LabelRequirement::In(k.trim().to_string(), set(rest)?))
            } else if let Some((k, v)) = term.split_once("!=") {
                Ok(LabelRequirement::NotEquals(k.to_string(), v.to_string()))
            } else if let Some((k, v)) = term.split_once("==") {
                Ok(LabelRequirement::Equals(k.to_string(), v.to_string()))
            } else if let Some((k, v)) = term.split_once('=') {
                Ok(LabelRequirement::Equals(k.to_string(), v.to_string()))
            } else if term
                .chars()
                .all(|c| c.is_alphanumeric() || "-_./".contains(c))
            {
                Ok(LabelRequirement::Exists(term.to_string()))
            } else {
                Err(format!("invalid label selector term {term:?}"))
            }
        })
        .collect()
}

/// A watch's stream: event lines, `None` when the test ends it.
type WatchSender = mpsc::UnboundedSender<Option<String>>;

#[derive(Default)]
struct State {
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    /// By `namespace/name`.
    daemonsets: BTreeMap<String, Value>,
    watchers: Vec<(Scope, WatchSender)>,
    /// Watches started from a resource version at or below this get 410.
    expired_below: u64,
    /// When each list of pods was asked for.
    pod_lists: Vec<std::time::Instant>,
    /// Every kind of request made, answered or not.
    calls: std::collections::BTreeSet<ApiCall>,
}

impl State {
    fn objects(&mut self, kind: Kind) -> &mut BTreeMap<String, Value> {
        match kind {
            Kind::Pods => &mut self.pods,
            Kind::Namespaces => &mut self.namespaces,
            Kind::DaemonSets => &mut self.daemonsets,
        }
    }

    /// Tells each watcher what the change from `old` to `new` of one object
    /// is to it: an object that comes into its selection is `ADDED`, one
    /// that leaves it `DELETED`.
    fn notify(&mut self, kind: Kind, old: Option<&Value>, new: Option<&Value>) {
        self.watchers.retain(|(scope, tx)| {
            let was = old.is_some_and(|o| scope.covers(kind, o));
            let is = new.is_some_and(|n| scope.covers(kind, n));
            let event = match (was, is, new, old) {
                (false, true, Some(n), _) => json!({"type": "ADDED", "object": n}),
                (true, true, Some(n), _) => json!({"type": "MODIFIED", "object": n}),
                (true, false, Some(n), _) => json!({"type": "DELETED", "object": n}),
                (true, false, None, Some(o)) => json!({"type": "DELETED", "object": o}),
                _ => return true,
            };
            tx.send(Some(event.to_string())).is_ok()
        });
    }
}

/// The server; stops serving when dropped.
#[derive(Clone)]
pub struct KubeApi {
    port: u16,
    state: Arc<Mutex<State>>,
    /// The runtime serving requests, while the server is up: shutting it
    /// down cuts every connection.
    serving: Arc<Mutex<Option<tokio::runtime::Runtime>>>,
}

impl KubeApi {
    pub fn start() -> Self {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding the local API server");
        let port = listener.local_addr().unwrap().port();
        let api = KubeApi {
            port,
            state: Arc::new(Mutex::new(State {
                resource_version: 1,
                ..State::default()
            })),
            serving: Arc::default(),
        };
        api.serve_on(listener);
        api
    }

    fn serve_on(&self, listener: std::net::TcpListener) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the API server's runtime");
        listener.set_nonblocking(true).unwrap();
        let app = Router::new()
            .route("/api/v1/pods", get(list_or_watch_pods))
            .route("/api/v1/namespaces", get(list_or_watch_namespaces))
            .route(
                "/apis/apps/v1/namespaces/{ns}/daemonsets",
                get(list_or_watch_daemonsets),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/status",
                patch(patch_pod_status),
            )
            .fallback(|| async { not_found() })
            .layer(axum::middleware::from_fn_with_state(self.clone(), record))
            .with_state(self.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.ok();
        });
        *self.serving.lock().unwrap() = Some(runtime);
    }

    /// `ambridge run`'s arguments that make this server the Kubernetes
    /// source of the node named `node_name`, whose kubelet puts its pod
    /// cgroups under `node`'s cgroup.
    pub fn source_args(&self, node: &crate::Node, node_name: &str) -> Vec<String> {
        [
            "--source",
            "kubernetes",
            "--node-name",
            node_name,
            "--kube-api",
            &self.url(),
            "--kubepods-parent",
            &node.cgroup.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Every kind of request clients have made so far.
    pub fn calls(&self) -> std::collections::BTreeSet<ApiCall> {
        self.state.lock().unwrap().calls.clone()
    }

    /// When the first list of pods asked for at or after `since` came in.
    pub fn pods_listed_since(&self, since: std::time::Instant) -> Option<std::time::Instant> {
        let st = self.state.lock().unwrap();
        st.pod_lists.iter().copied().find(|at| *at >= since)
    }

    /// Takes the server down as a rebooting API server goes: every open
    /// connection (watch streams included) is cut, and connects to its
    /// port are refused until [`KubeApi::come_back`]. Its objects stay,
    /// and changes made meanwhile are there when it comes back.
    pub fn go_down(&self) {
        let runtime = self
            .serving
            .lock()
            .unwrap()
            .take()
            .expect("the API server is already down");
        self.state.lock().unwrap().watchers.clear();
        // Cancels the accepting task (closing the listener) and every
        // connection's task (closing its socket).
        runtime.shutdown_timeout(Duration::from_secs(5));
    }

    /// Serves again on the same port, with the state it had and whatever
    /// changed while it was down.
    pub fn come_back(&self) {
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap_or_else(|e| {
            panic!(
                "the API server's port {} was taken while it was down: {e}",
                self.port
            )
        });
        self.serve_on(listener);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn upsert(&self, kind: Kind, key: String, mut object: Value) {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        let old = st.objects(kind).insert(key, object.clone());
        st.notify(kind, old.as_ref(), Some(&object));
    }

    /// Adds or replaces a pod (keyed by its UID).
    pub fn put_pod(&self, pod: Value) {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .expect("a pod uid")
            .to_string();
        self.upsert(Kind::Pods, uid, pod);
    }

    /// Adds or replaces a namespace (keyed by its name).
    pub fn put_namespace(&self, ns: Value) {
        let name = ns["metadata"]["name"]
            .as_str()
            .expect("a namespace name")
            .to_string();
        self.upsert(Kind::Namespaces, name, ns);
    }

    /// Adds or replaces a DaemonSet (keyed by its namespace and name).
    pub fn put_daemonset(&self, ds: Value) {
        let key = format!(
            "{}/{}",
            ds["metadata"]["namespace"].as_str().expect("a namespace"),
            ds["metadata"]["name"].as_str().expect("a name")
        );
        self.upsert(Kind::DaemonSets, key, ds);
    }

    /// A pod's annotation, as the server holds it now.
    pub fn pod_annotation(&self, uid: &str, key: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.pods.get(uid)?["metadata"]["annotations"][key]
            .as_str()
            .map(String::from)
    }

    /// Applies a JSON merge patch of `metadata.annotations` to the pod
    /// `namespace/name`, as `PATCH .../pods/<name>/status` does, returning
    /// the pod; `None` if there is no such pod.
    fn patch_pod(&self, namespace: &str, name: &str, patch: &Value) -> Option<Value> {
        let (key, mut pod) = {
            let st = self.state.lock().unwrap();
            st.pods
                .iter()
                .find(|(_, p)| {
                    p["metadata"]["namespace"] == namespace && p["metadata"]["name"] == name
                })
                .map(|(k, p)| (k.clone(), p.clone()))?
        };
        if let Some(annotations) = patch["metadata"]["annotations"].as_object() {
            for (k, v) in annotations {
                let current = &mut pod["metadata"]["annotations"];
                if !current.is_object() {
                    *current = json!({});
                }
                if v.is_null() {
                    current.as_object_mut().unwrap().remove(k);
                } else {
                    current[k] = v.clone();
                }
            }
        }
        self.upsert(Kind::Pods, key.clone(), pod);
        self.state.lock().unwrap().pods.get(&key).cloned()
    }

    pub fn delete_pod(&self, uid: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(mut pod) = st.pods.remove(uid) {
            st.resource_version += 1;
            pod["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
            st.notify(Kind::Pods, Some(&pod), None);
        }
    }

    /// Ends every open watch. With `expire`, the resource versions they had
    /// are too old to resume from: re-watching gets `410 Gone`, and the
    /// client must list again.
    pub fn end_watches(&self, expire: bool) {
        let mut st = self.state.lock().unwrap();
        if expire {
            st.expired_below = st.resource_version;
        }
        for (_, tx) in st.watchers.drain(..) {
            let _ = tx.send(None);
        }
    }
}

/// The query parameters of a list or watch.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    #[serde(default)]
    watch: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    field_selector: Option<String>,
    #[serde(default)]
    label_selector: Option<String>,
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"kind": "Status", "code": 404})),
    )
        .into_response()
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": "BadRequest", "code": 400}),
        ),
    )
        .into_response()
}

/// Notes what each request asks for, before it is answered.
async fn record(
    Shared(api): Shared<KubeApi>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let uri = request.uri();
    let call = ApiCall::of(request.method(), uri.path(), uri.query().unwrap_or(""));
    if let Some(call) = call {
        api.state.lock().unwrap().calls.insert(call);
    }
    next.run(request).await
}

async fn list_or_watch_pods(
    Shared(api): Shared<KubeApi>,
    Query(params): Query<Params>,
) -> Response {
    list_or_watch(&api, Kind::Pods, None, &params)
}

async fn list_or_watch_namespaces(
    Shared(api): Shared<KubeApi>,
    Query(params): Query<Params>,
) -> Response {
    list_or_watch(&api, Kind::Namespaces, None, &params)
}

async fn list_or_watch_daemonsets(
    Shared(api): Shared<KubeApi>,
    Path(ns): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    list_or_watch(&api, Kind::DaemonSets, Some(ns), &params)
}

async fn patch_pod_status(
    Shared(api): Shared<KubeApi>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patched = serde_json::from_slice(&body)
        .ok()
        .and_then(|patch: Value| api.patch_pod(&ns, &name, &patch));
    match patched {
        Some(pod) => Json(pod).into_response(),
        None => not_found(),
    }
}

fn list_or_watch(
    api: &KubeApi,
    kind: Kind,
    namespace: Option<String>,
    params: &Params,
) -> Response {
    let scope = match Scope::new(kind, namespace, params) {
        Ok(scope) => scope,
        Err(message) => return bad_request(message),
    };
    if params
        .watch
        .as_deref()
        .is_some_and(|w| w == "true" || w == "1")
    {
        let from: u64 = params
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return watch(api, scope, from);
    }
    let mut st = api.state.lock().unwrap();
    if kind == Kind::Pods {
        st.pod_lists.push(std::time::Instant::now());
    }
    let resource_version = st.resource_version;
    let items: Vec<Value> = st
        .objects(kind)
        .values()
        .filter(|o| scope.covers(kind, o))
        .cloned()
        .collect();
    Json(json!({
        "kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    }))
    .into_response()
}

fn watch(api: &KubeApi, scope: Scope, from: u64) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut st = api.state.lock().unwrap();
    let first = if from <= st.expired_below && st.expired_below > 0 {
        let status = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        drop(tx);
        status
    } else {
        st.watchers.push((scope.clone(), tx));
        // A bookmark first, as a real server sends them from time to time.
        json!({"type": "BOOKMARK", "object": {
            "kind": scope.kind.name(), "apiVersion": scope.kind.api_version(),
            "metadata": {"resourceVersion": st.resource_version.to_string()}}})
    };
    drop(st);
    // The first event, then each line the watch is sent until it ends
    // (by the test, after 300 s, or with the server going down).
    let lines = futures::stream::unfold(
        (Some(first.to_string()), rx),
        |(first, mut rx)| async move {
            let line = match first {
                Some(line) => line,
                None => match tokio::time::timeout(Duration::from_secs(300), rx.recv()).await {
                    Ok(Some(Some(line))) => line,
                    _ => return None,
                },
            };
            Some((Ok::<_, Infallible>(Bytes::from(line + "\n")), (None, rx)))
        },
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(fields: &str, labels: &str) -> Result<Scope, String> {
        Scope::new(
            Kind::Pods,
            None,
            &Params {
                field_selector: Some(fields.into()),
                label_selector: Some(labels.into()),
                ..Params::default()
            },
        )
    }

    #[test]
    fn selectors_match_as_the_api_server_applies_them() {
        let pod = json!({"metadata": {"name": "a", "namespace": "default",
            "labels": {"app": "web", "tier": "front"}}, "spec": {"nodeName": "node-1"}});
        for (fields, labels, matches) in [
            ("", "", true),
            ("spec.nodeName=node-1", "", true),
            ("spec.nodeName=node-2", "", false),
            ("spec.nodeName!=node-2,metadata.name==a", "", true),
            ("", "app=web", true),
            ("", "app!=web", false),
            ("", "app in (db, web),tier", true),
            ("", "app notin (web)", false),
            ("", "!tier", false),
            ("", "missing", false),
            ("", "!missing", true),
        ] {
            assert_eq!(
                scope(fields, labels).unwrap().covers(Kind::Pods, &pod),
                matches,
                "{fields:?} {labels:?}"
            );
        }
    }

    #[test]
    fn an_unsupported_field_or_a_malformed_selector_is_refused() {
        for (fields, labels) in [
            ("spec.hostname=x", ""),
            ("nodeName", ""),
            ("", "app in web"),
        ] {
            let got = scope(fields, labels);
            assert!(got.is_err(), "{fields:?} {labels:?}");
        }
    }
}

//! A local Kubernetes API server for the Kubernetes feed's tests: list and
//! watch of pods, namespaces and a namespace's DaemonSets over HTTP/1.1 on
//! loopback, with real JSON
//! objects, resource versions, bookmarks, and watches that can be ended or
//! answered with `410 Gone` (an expired resource version) to force a relist;
//! and merge patches of a pod's `status` subresource (how a node agent
//! writes `ambient.istio.io/redirection`). It can go down and come back on
//! the same port with its state kept, as an API server does across a
//! reboot.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, Sender},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Eq)]
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
}

/// What a list or watch covers: a kind, in one namespace or all.
#[derive(Clone, PartialEq, Eq)]
struct Scope {
    kind: Kind,
    namespace: Option<String>,
}

impl Scope {
    fn covers(&self, kind: Kind, object: &Value) -> bool {
        self.kind == kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| object["metadata"]["namespace"] == ns.as_str())
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    /// By `namespace/name`.
    daemonsets: BTreeMap<String, Value>,
    watchers: Vec<(Scope, Sender<Option<String>>)>,
    /// Watches started from a resource version at or below this get 410.
    expired_below: u64,
    /// The open connections, by a number of their own, so that going down
    /// can cut them.
    connections: BTreeMap<u64, TcpStream>,
    next_connection: u64,
    /// Set by [`KubeApi::go_down`]: the accepting thread closes the
    /// listener at the next connection it takes.
    down: bool,
}

/// The server; stops serving when dropped (its threads end with their
/// connections).
#[derive(Clone)]
pub struct KubeApi {
    port: u16,
    state: Arc<Mutex<State>>,
    /// The thread accepting connections, while the server is up.
    accepting: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl KubeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the local API server");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            resource_version: 1,
            ..State::default()
        }));
        let api = KubeApi {
            port,
            state,
            accepting: Arc::default(),
        };
        api.accept_on(listener);
        api
    }

    fn accept_on(&self, listener: TcpListener) {
        let api = self.clone();
        let accepting = thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let id = {
                    let mut st = api.state.lock().unwrap();
                    if st.down {
                        // Dropping the listener: connects are refused now.
                        return;
                    }
                    let Ok(registered) = conn.try_clone() else {
                        continue;
                    };
                    let id = st.next_connection;
                    st.next_connection += 1;
                    st.connections.insert(id, registered);
                    id
                };
                let api = api.clone();
                thread::spawn(move || {
                    serve(conn, &api);
                    api.state.lock().unwrap().connections.remove(&id);
                });
            }
        });
        *self.accepting.lock().unwrap() = Some(accepting);
    }

    /// Takes the server down as a rebooting API server goes: every open
    /// connection (watch streams included) is cut, and connects to its
    /// port are refused until [`KubeApi::come_back`]. Its objects stay,
    /// and changes made meanwhile are there when it comes back.
    pub fn go_down(&self) {
        {
            let mut st = self.state.lock().unwrap();
            assert!(!st.down, "the API server is already down");
            st.down = true;
            for (_, tx) in st.watchers.drain(..) {
                let _ = tx.send(None);
            }
            for (_, conn) in std::mem::take(&mut st.connections) {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
        // The accepting thread sees `down` at its next connection: this
        // one, which it closes with the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accepting) = self.accepting.lock().unwrap().take() {
            accepting
                .join()
                .expect("the accepting thread ended cleanly");
        }
    }

    /// Serves again on the same port, with the state it had and whatever
    /// changed while it was down.
    pub fn come_back(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap_or_else(|e| {
            panic!(
                "the API server's port {} was taken while it was down: {e}",
                self.port
            )
        });
        self.state.lock().unwrap().down = false;
        self.accept_on(listener);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn upsert(&self, kind: Kind, key: String, mut object: Value) {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
        let map = match kind {
            Kind::Pods => &mut st.pods,
            Kind::Namespaces => &mut st.namespaces,
            Kind::DaemonSets => &mut st.daemonsets,
        };
        let event = if map.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        notify(&mut st, kind, json!({"type": event, "object": object}));
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
        let key = {
            let st = self.state.lock().unwrap();
            st.pods
                .iter()
                .find(|(_, p)| {
                    p["metadata"]["namespace"] == namespace && p["metadata"]["name"] == name
                })
                .map(|(k, _)| k.clone())?
        };
        let mut pod = self.state.lock().unwrap().pods[&key].clone();
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
        self.upsert(Kind::Pods, key, pod.clone());
        Some(pod)
    }

    pub fn delete_pod(&self, uid: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(mut pod) = st.pods.remove(uid) {
            st.resource_version += 1;
            pod["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
            notify(
                &mut st,
                Kind::Pods,
                json!({"type": "DELETED", "object": pod}),
            );
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

fn notify(st: &mut State, kind: Kind, event: Value) {
    let line = event.to_string();
    st.watchers.retain(|(scope, tx)| {
        !scope.covers(kind, &event["object"]) || tx.send(Some(line.clone())).is_ok()
    });
}

fn write_json(conn: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn write_chunk(conn: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
    conn.flush()
}

/// One connection: requests until the client closes, or a watch stream
/// until it ends.
fn serve(conn: TcpStream, api: &KubeApi) {
    let state = &*api.state;
    let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the blank line.
        let mut content_length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let method = request_line.split_whitespace().next().unwrap_or("GET");
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        if method == "PATCH" {
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            let patched = match parts.as_slice() {
                ["api", "v1", "namespaces", ns, "pods", name, "status"] => {
                    serde_json::from_slice(&body)
                        .ok()
                        .and_then(|patch: Value| api.patch_pod(ns, name, &patch))
                }
                _ => None,
            };
            let written = match patched {
                Some(pod) => write_json(&mut conn, "200 OK", &pod),
                None => write_json(
                    &mut conn,
                    "404 Not Found",
                    &json!({"kind": "Status", "code": 404}),
                ),
            };
            if written.is_err() {
                return;
            }
            continue;
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let scope = match parts.as_slice() {
            ["api", "v1", "pods"] => Scope {
                kind: Kind::Pods,
                namespace: None,
            },
            ["api", "v1", "namespaces"] => Scope {
                kind: Kind::Namespaces,
                namespace: None,
            },
            ["apis", "apps", "v1", "namespaces", ns, "daemonsets"] => Scope {
                kind: Kind::DaemonSets,
                namespace: Some(ns.to_string()),
            },
            _ => {
                let _ = write_json(
                    &mut conn,
                    "404 Not Found",
                    &json!({"kind": "Status", "code": 404}),
                );
                continue;
            }
        };
        if params
            .get("watch")
            .is_some_and(|w| *w == "true" || *w == "1")
        {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            watch(conn, state, scope, from);
            return;
        }
        let st = state.lock().unwrap();
        let (all, list_kind) = match scope.kind {
            Kind::Pods => (&st.pods, "PodList"),
            Kind::Namespaces => (&st.namespaces, "NamespaceList"),
            Kind::DaemonSets => (&st.daemonsets, "DaemonSetList"),
        };
        let items: Vec<Value> = all
            .values()
            .filter(|o| scope.covers(scope.kind, o))
            .cloned()
            .collect();
        let body = json!({
            "kind": list_kind, "apiVersion": scope.kind.api_version(),
            "metadata": {"resourceVersion": st.resource_version.to_string()},
            "items": items,
        });
        drop(st);
        if write_json(&mut conn, "200 OK", &body).is_err() {
            return;
        }
    }
}

fn watch(mut conn: TcpStream, state: &Mutex<State>, scope: Scope, from: u64) {
    let (tx, rx): (Sender<Option<String>>, Receiver<Option<String>>) = mpsc::channel();
    let (gone, rv) = {
        let mut st = state.lock().unwrap();
        let gone = from <= st.expired_below && st.expired_below > 0;
        if !gone {
            st.watchers.push((scope.clone(), tx));
        }
        (gone, st.resource_version)
    };
    if write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    if gone {
        let status = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        let _ = write_chunk(&mut conn, &status.to_string());
        let _ = write!(conn, "0\r\n\r\n");
        return;
    }
    // A bookmark first, as a real server sends them from time to time.
    let list_kind = match scope.kind {
        Kind::Pods => "Pod",
        Kind::Namespaces => "Namespace",
        Kind::DaemonSets => "DaemonSet",
    };
    let bookmark = json!({"type": "BOOKMARK", "object": {
        "kind": list_kind, "apiVersion": scope.kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()}}});
    if write_chunk(&mut conn, &bookmark.to_string()).is_err() {
        return;
    }
    loop {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(Some(line)) => {
                if write_chunk(&mut conn, &line).is_err() {
                    return;
                }
            }
            // Ended by the test (or timed out): close the stream.
            Ok(None) | Err(_) => {
                let _ = write!(conn, "0\r\n\r\n");
                return;
            }
        }
    }
}

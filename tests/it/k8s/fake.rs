//! A fake Kubernetes API server for the driver's tests, on 127.0.0.1:0:
//! list and watch of pods (`GET /api/v1/pods`, `?watch=true` streaming one
//! JSON `WatchEvent` a line, from the requested `resourceVersion`), the
//! scale subresource of Deployments and StatefulSets (GET, PUT, PATCH) and
//! GET and DELETE of the workloads. The objects have the shapes of the
//! Kubernetes API reference (Pod, PodList, WatchEvent, Scale, Deployment,
//! Status). A test scripts it: pods change, a watch is expired (410 Gone)
//! or closed by the server, a bookmark is sent, an answer is an error.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt as _, wrappers::UnboundedReceiverStream};

/// How long a test waits for anything.
pub const STEP: Duration = Duration::from_secs(10);

/// One request the fake received.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Option<Value>,
}

impl Seen {
    /// A pods list (not a watch).
    pub fn is_list(&self) -> bool {
        self.method == "GET" && self.path.ends_with("/pods") && !self.is_watch()
    }

    /// A pods watch.
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

/// The cluster the fake serves.
#[derive(Default)]
pub struct Cluster {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Pods by `namespace/name`.
    pods: BTreeMap<String, Value>,
    /// Watch events kept, with their versions; a watch from an older
    /// version than `oldest` is told 410 Gone.
    events: Vec<(u64, Value)>,
    oldest: u64,
    /// Live watch streams.
    watches: Vec<mpsc::UnboundedSender<Value>>,
    /// Workloads by their path (`/apis/apps/v1/namespaces/NS/deployments/NAME`).
    pub workloads: BTreeMap<String, Value>,
    /// Scripted error answers by `METHOD path`, in order.
    pub errors: HashMap<String, VecDeque<u16>>,
    /// Every request, in order.
    pub seen: Vec<Seen>,
}

/// The fake server: its cluster, and a signal bumped on every change.
#[derive(Clone)]
pub struct Fake {
    cluster: Arc<Mutex<Cluster>>,
    changed: Arc<watch::Sender<u64>>,
    pub url: String,
}

impl Fake {
    /// Starts the fake on 127.0.0.1:0, plain HTTP.
    pub async fn start() -> Fake {
        Fake::start_on(None).await
    }

    /// Starts the fake on 127.0.0.1:0, over HTTPS with `tls` when given.
    pub async fn start_on(tls: Option<tokio_rustls::TlsAcceptor>) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let cluster = Cluster {
            rv: 1000,
            ..Cluster::default()
        };
        let fake = Fake {
            cluster: Arc::new(Mutex::new(cluster)),
            changed: Arc::new(watch::channel(0).0),
            url,
        };
        let server = fake.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let fake = server.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.answer(request).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(socket), service).await;
                        }
                        Some(tls) => {
                            // A client that refuses the certificate (or has
                            // none to show) ends here.
                            if let Ok(stream) = tls.accept(socket).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        fake
    }

    /// The cluster, locked; every change is signalled when the guard goes.
    pub fn cluster(&self) -> Changing<'_> {
        Changing {
            guard: self.cluster.lock().expect("the fake's lock"),
            changed: &self.changed,
        }
    }

    /// Waits until `done` holds of the cluster; fails the test after
    /// [`STEP`].
    pub async fn until<T>(&self, what: &str, mut done: impl FnMut(&Cluster) -> Option<T>) -> T {
        let mut changes = self.changed.subscribe();
        tokio::time::timeout(STEP, async {
            loop {
                changes.borrow_and_update();
                if let Some(found) = done(&self.cluster.lock().expect("the fake's lock")) {
                    return found;
                }
                changes.changed().await.expect("the fake is alive");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {STEP:?}"))
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.cluster.lock().expect("the fake's lock").seen.clone()
    }

    async fn answer(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = parse_query(request.uri().query().unwrap_or_default());
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let authorization = header("authorization");
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = serde_json::from_slice::<Value>(&body).ok();
        let seen = Seen {
            method: method.to_string(),
            path: path.clone(),
            query,
            content_type,
            authorization,
            body,
        };
        let mut cluster = self.cluster();
        cluster.seen.push(seen.clone());
        if let Some(code) = cluster
            .errors
            .get_mut(&format!("{method} {path}"))
            .and_then(VecDeque::pop_front)
        {
            return json_response(code, status(code, &path));
        }
        if path == "/api/v1/pods"
            || (path.starts_with("/api/v1/namespaces/") && path.ends_with("/pods"))
        {
            let namespace = path
                .strip_prefix("/api/v1/namespaces/")
                .and_then(|p| p.strip_suffix("/pods"))
                .map(str::to_string);
            return if seen.is_watch() {
                cluster.watch(&seen, namespace)
            } else {
                cluster.list(namespace)
            };
        }
        cluster.workload(&method, &path, seen.body.as_ref())
    }
}

/// The cluster under its lock; signals a change when dropped.
pub struct Changing<'a> {
    guard: MutexGuard<'a, Cluster>,
    changed: &'a watch::Sender<u64>,
}

impl std::ops::Deref for Changing<'_> {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.guard
    }
}

impl std::ops::DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.guard
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Cluster {
    /// Adds or replaces a pod (by namespace and name), as a watch event.
    pub fn set_pod(&mut self, pod: Value) {
        let kind = if self.pods.contains_key(&key(&pod)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let pod = self.store(pod);
        self.publish(json!({"type": kind, "object": pod}));
    }

    /// Deletes a pod, as a watch event.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        if let Some(mut pod) = self.pods.remove(&format!("{namespace}/{name}")) {
            self.rv += 1;
            pod["metadata"]["resourceVersion"] = self.rv.to_string().into();
            self.publish(json!({"type": "DELETED", "object": pod}));
        }
    }

    /// The watch cache forgets every event so far, `change` is made
    /// without an event, and every open watch is told 410 Gone and closed:
    /// only a new list shows the change.
    pub fn expire(&mut self, change: Value) {
        self.store(change);
        self.oldest = self.rv + 1;
        self.events.clear();
        let gone = json!({"type": "ERROR", "object": status(410, "")});
        for watch in self.watches.drain(..) {
            let _ = watch.send(gone.clone());
        }
    }

    /// The last resourceVersion handed out.
    pub fn version(&self) -> u64 {
        self.rv
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.watches.iter().filter(|w| !w.is_closed()).count()
    }

    /// Every open watch ends, as when the server's timeout closes it.
    pub fn close_watches(&mut self) {
        self.watches.clear();
    }

    /// A bookmark at a new version to every open watch; returns the
    /// version.
    pub fn bookmark(&mut self) -> u64 {
        self.rv += 1;
        let bookmark = json!({"type": "BOOKMARK", "object": {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": self.rv.to_string(), "creationTimestamp": null},
            "spec": {"containers": null},
            "status": {}
        }});
        self.watches.retain(|w| w.send(bookmark.clone()).is_ok());
        self.rv
    }

    /// A Deployment (`deployments`) or StatefulSet (`statefulsets`) with
    /// `replicas`.
    pub fn add_workload(&mut self, namespace: &str, resource: &str, name: &str, replicas: u32) {
        self.rv += 1;
        let kind = if resource == "deployments" {
            "Deployment"
        } else {
            "StatefulSet"
        };
        let object = json!({
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": "4a7d9c1e-0000-4000-8000-00000000000a",
                "resourceVersion": self.rv.to_string(),
                "generation": 1,
                "creationTimestamp": "2025-01-10T09:00:00Z",
                "labels": {"app": name}
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "agent", "image": "registry.local/agent:1.4"}]}
                }
            },
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas}
        });
        self.workloads.insert(
            format!("/apis/apps/v1/namespaces/{namespace}/{resource}/{name}"),
            object,
        );
    }

    /// Requests of `method` to `path`, in order.
    pub fn requests(&self, method: &str, path: &str) -> Vec<Seen> {
        self.seen
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .cloned()
            .collect()
    }

    fn store(&mut self, mut pod: Value) -> Value {
        self.rv += 1;
        pod["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.pods.insert(key(&pod), pod.clone());
        pod
    }

    fn publish(&mut self, event: Value) {
        self.events.push((self.rv, event.clone()));
        self.watches.retain(|w| w.send(event.clone()).is_ok());
    }

    fn list(&self, namespace: Option<String>) -> Response<BoxBody<Bytes, Infallible>> {
        let items: Vec<&Value> = self
            .pods
            .values()
            .filter(|p| {
                namespace
                    .as_deref()
                    .is_none_or(|ns| p["metadata"]["namespace"] == ns)
            })
            .collect();
        json_response(
            200,
            json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(
        &mut self,
        seen: &Seen,
        namespace: Option<String>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let from: u64 = seen
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.rv);
        let (tx, rx) = mpsc::unbounded_channel();
        if from + 1 < self.oldest {
            let _ = tx.send(json!({"type": "ERROR", "object": status(410, "")}));
        } else {
            for (_, event) in self.events.iter().filter(|(rv, _)| *rv > from) {
                let _ = tx.send(event.clone());
            }
            self.watches.push(tx);
        }
        let lines = UnboundedReceiverStream::new(rx)
            .filter(move |event| {
                namespace.as_deref().is_none_or(|ns| {
                    event["type"] != "ADDED"
                        && event["type"] != "MODIFIED"
                        && event["type"] != "DELETED"
                        || event["object"]["metadata"]["namespace"] == ns
                })
            })
            .map(|event| Ok(Frame::data(Bytes::from(format!("{event}\n")))));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("transfer-encoding", "chunked")
            .body(BoxBody::new(StreamBody::new(lines)))
            .expect("a response")
    }

    fn workload(
        &mut self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let (object_path, subresource) = match path.strip_suffix("/scale") {
            Some(object) => (object.to_string(), true),
            None => (path.to_string(), false),
        };
        let Some(object) = self.workloads.get_mut(&object_path) else {
            return json_response(404, status(404, path));
        };
        match (method.as_str(), subresource) {
            ("GET", false) => json_response(200, object.clone()),
            ("DELETE", false) => {
                let name = object["metadata"]["name"].clone();
                let kind = object["kind"].as_str().unwrap_or_default().to_lowercase() + "s";
                self.workloads.remove(&object_path);
                json_response(
                    200,
                    json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {"name": name, "group": "apps", "kind": kind,
                            "uid": "4a7d9c1e-0000-4000-8000-00000000000a"}
                    }),
                )
            }
            ("GET", true) => json_response(200, scale(object)),
            ("PATCH", true) | ("PUT", true) => {
                let replicas = body
                    .and_then(|b| b["spec"]["replicas"].as_u64())
                    .unwrap_or_default();
                object["spec"]["replicas"] = replicas.into();
                json_response(200, scale(object))
            }
            _ => json_response(405, status(405, path)),
        }
    }
}

/// The Scale (autoscaling/v1) of a workload.
fn scale(object: &Value) -> Value {
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"]
        },
        "spec": {"replicas": object["spec"]["replicas"]},
        "status": {"replicas": object["status"]["replicas"], "selector": format!("app={}", metadata["name"].as_str().unwrap_or_default())}
    })
}

/// A `Status` (meta/v1) failure as the API server sends it.
pub fn status(code: u16, path: &str) -> Value {
    let name = path.rsplit('/').find(|s| *s != "scale").unwrap_or_default();
    let (reason, message) = match code {
        403 => (
            "Forbidden",
            format!(
                "deployments.apps \"{name}\" is forbidden: User \"system:serviceaccount:lifecycle:agent-lifecycle\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"prod\""
            ),
        ),
        404 => ("NotFound", format!("deployments.apps \"{name}\" not found")),
        410 => ("Expired", "too old resource version: 1 (2)".to_string()),
        422 => (
            "Invalid",
            format!(
                "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: 3: exceeds the namespace's quota"
            ),
        ),
        429 => (
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later"
                .to_string(),
        ),
        503 => (
            "ServiceUnavailable",
            "the server is currently unable to handle the request".to_string(),
        ),
        _ => (
            "InternalError",
            "an error on the server has prevented the request from succeeding".to_string(),
        ),
    };
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    });
    if !name.is_empty() {
        status["details"] = json!({"name": name, "group": "apps", "kind": "deployments"});
    }
    status
}

fn json_response(code: u16, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body.to_string()))))
        .expect("a response")
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")),
            None => (pair.to_string(), String::new()),
        })
        .collect()
}

fn key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
        pod["metadata"]["name"].as_str().unwrap_or_default()
    )
}

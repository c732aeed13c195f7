//! A Compute Engine REST fake for the GCE provider's tests and the sandbox: the documented
//! compute v1 contract for the resources ferry uses (`compute`), over HTTP on loopback, with
//! a log of the calls that reached it and faults a test asks for (an error status with its
//! reason for the next matching calls, a held-back answer, slow Operations).
//!
//! No GCE emulator exists in any registry ferry can reach, so this one is kept honest from
//! outside: its answers are checked against the compute v1 discovery document, and the
//! discovery-based Python client drives it in a contract test (`e2e/tests/gce_fake.rs`).

pub mod compute;
pub mod discovery;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use compute::{Compute, error};

/// An error answer for the next calls that match.
#[derive(Clone, Debug)]
struct Fault {
    /// A call name (`addresses.insert`) or `*`.
    call: String,
    status: u16,
    reason: String,
}

struct State {
    compute: Compute,
    calls: Vec<String>,
    faults: VecDeque<Fault>,
    hold: Option<(String, Duration)>,
}

/// The fake, serving one project until dropped.
pub struct GceFake {
    /// `http://127.0.0.1:<port>`; the API root is `<url>/compute/v1/`.
    pub url: String,
    pub project: String,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Drop for GceFake {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The name a call is logged under: `<collection>.<method>`, as the discovery document
/// names methods (`targetPools.addInstance`, `regionOperations.wait`).
pub fn call_name(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["projects", _, "global", rest @ ..] => rest,
        ["projects", _, "regions", _, rest @ ..] | ["projects", _, "zones", _, rest @ ..] => rest,
        _ => return format!("{method} {path}"),
    };
    let regional = parts.get(2).is_some_and(|s| *s == "regions");
    let collection = match rest.first() {
        Some(&"operations") if regional => "regionOperations",
        Some(&"operations") if parts.get(2) == Some(&"zones") => "zoneOperations",
        Some(&"operations") => "globalOperations",
        Some(c) => c,
        None => "",
    };
    let verb = match (method, rest.len(), rest.get(2)) {
        ("GET", 1, _) => "list",
        ("POST", 1, _) => "insert",
        ("GET", 2, _) => "get",
        ("DELETE", 2, _) => "delete",
        ("PATCH", 2, _) => "patch",
        ("PUT", 2, _) => "update",
        (_, 3, Some(v)) => v,
        _ => "unknown",
    };
    format!("{collection}.{verb}")
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn query_of(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let uri = req.uri().clone();
    let body = match http_body_util::BodyExt::collect(req.into_body()).await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let path = uri
        .path()
        .strip_prefix("/compute/v1/")
        .unwrap_or(uri.path());
    let call = call_name(&method, path);
    let (answer, hold) = {
        let mut s = lock(&state);
        s.calls.push(call.clone());
        let fault = s
            .faults
            .iter()
            .position(|f| f.call == "*" || f.call == call)
            .and_then(|i| s.faults.remove(i));
        let answer = match fault {
            Some(f) => error(
                f.status,
                &f.reason,
                &format!("injected {} {}", f.status, f.reason),
            ),
            None => s.compute.handle(&method, path, &query_of(&uri), &body),
        };
        let hold = match &s.hold {
            Some((c, d)) if *c == call => {
                let d = *d;
                s.hold = None;
                Some(d)
            }
            _ => None,
        };
        (answer, hold)
    };
    // The fake has acted; the answer arrives late (or, if the client gave up, never).
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    let (status, body) = answer;
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

impl GceFake {
    /// Serves `project` on a free loopback port.
    pub async fn start(project: &str) -> anyhow::Result<GceFake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State {
            compute: Compute::new(&url, project),
            calls: Vec::new(),
            faults: VecDeque::new(),
            hold: None,
        }));
        let accept_state = state.clone();
        let accept =
            crate::http_server::serve(listener, move |req| handle(accept_state.clone(), req));
        Ok(GceFake {
            url,
            project: project.to_string(),
            state,
            accept,
        })
    }

    /// Reads or changes the fake's state directly (seeding instances, out-of-band changes).
    pub fn with<T>(&self, f: impl FnOnce(&mut Compute) -> T) -> T {
        f(&mut lock(&self.state).compute)
    }

    /// The next `times` calls named `call` (or any, with `*`) get `status` with `reason`
    /// (`rateLimitExceeded` 429, `backendError` 503, `quotaExceeded` 403).
    pub fn fail_next(&self, call: &str, times: usize, status: u16, reason: &str) {
        let mut s = lock(&self.state);
        for _ in 0..times {
            s.faults.push_back(Fault {
                call: call.to_string(),
                status,
                reason: reason.to_string(),
            });
        }
    }

    /// The answer to the next `call` leaves `hold` after the fake acted on it.
    pub fn hold_next(&self, call: &str, hold: Duration) {
        lock(&self.state).hold = Some((call.to_string(), hold));
    }

    /// Writes from now on finish after `polls` polls of their Operation.
    pub fn slow_operations(&self, polls: u32) {
        self.with(|c| c.slow_operations(polls));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    /// A mark for `calls_since`.
    pub fn mark(&self) -> usize {
        lock(&self.state).calls.len()
    }

    /// Calls since `mark`, counted by name.
    pub fn calls_since(&self, mark: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for call in lock(&self.state).calls.iter().skip(mark) {
            *counts.entry(call.clone()).or_default() += 1;
        }
        counts
    }
}

//! Reconcile against a mocked API server (tower-test): every request the reconciler makes is
//! recorded and answered like kube-apiserver would, and each test asserts the calls a user
//! would see the effects of (finalizer, status, condition, Events) and the provider calls.

use std::sync::{Arc, Mutex};

use ferry_providers::fake::{Call, FakeProvider};
use ferry_providers::{LoadBalancerProvider, ProviderError};
use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::Value;

use super::*;
use crate::fixtures::{node, service};
use crate::status::READY_CONDITION;

/// One request as the API server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    body: Value,
}

impl Seen {
    fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// A scripted API server: answers every request, records it, and can fail chosen paths.
struct ApiServer {
    seen: Arc<Mutex<Vec<Seen>>>,
    fail: Arc<Mutex<Vec<(String, u16)>>>,
    services: Arc<Mutex<Vec<Service>>>,
    /// What a status write answers, when set (else the Service as it was).
    status_answer: Arc<Mutex<Option<Service>>>,
}

impl ApiServer {
    fn start(service: &Service) -> (Client, ApiServer) {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = ApiServer {
            seen: Arc::default(),
            fail: Arc::default(),
            services: Arc::new(Mutex::new(vec![service.clone()])),
            status_answer: Arc::default(),
        };
        let (seen, fail, services, status_answer) = (
            server.seen.clone(),
            server.fail.clone(),
            server.services.clone(),
            server.status_answer.clone(),
        );
        let echo = service.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let path = request.uri().path().to_string();
                let query = request.uri().query().unwrap_or_default().to_string();
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                seen.lock().unwrap().push(Seen {
                    method: method.clone(),
                    path: path.clone(),
                    query,
                    body: body.clone(),
                });
                let failure = {
                    let mut fail = fail.lock().unwrap();
                    fail.iter()
                        .position(|(p, _)| *p == path)
                        .map(|i| fail.remove(i).1)
                };
                let (status, reply) = if let Some(code) = failure {
                    (
                        code,
                        serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "injected", "reason": "Conflict", "code": code
                        }),
                    )
                } else if path.ends_with("/events") {
                    (200, body)
                } else if let Some(answer) = status_answer
                    .lock()
                    .unwrap()
                    .clone()
                    .filter(|_| method == "PATCH" && path.ends_with("/status"))
                {
                    (200, serde_json::to_value(&answer).unwrap())
                } else if method == "GET" && path == "/api/v1/services" {
                    let items = services.lock().unwrap().clone();
                    (
                        200,
                        serde_json::json!({ "kind": "ServiceList", "apiVersion": "v1", "metadata": {}, "items": items }),
                    )
                } else {
                    (200, serde_json::to_value(&echo).unwrap())
                };
                let response = Response::builder()
                    .status(StatusCode::from_u16(status).unwrap())
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        (Client::new(mock, "default"), server)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn fail_once(&self, path: &str, code: u16) {
        self.fail.lock().unwrap().push((path.to_string(), code));
    }

    /// Events are published in the background; give them a moment to arrive.
    async fn events(&self) -> Vec<(String, String)> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.seen()
            .into_iter()
            .filter(|s| s.path.ends_with("/events"))
            .map(|s| {
                (
                    s.body["reason"].as_str().unwrap_or_default().to_string(),
                    s.body["type"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn status_patches(&self) -> Vec<Value> {
        self.seen()
            .into_iter()
            .filter(|s| s.is("PATCH", "/api/v1/namespaces/default/services/web/status"))
            .map(|s| s.body)
            .collect()
    }
}

const SVC: &str = "/api/v1/namespaces/default/services/web";

struct World {
    ctx: Arc<Context>,
    api: ApiServer,
    fake: Arc<FakeProvider>,
    nodes: Writer<Node>,
}

fn world(svc: &Service, fake: FakeProvider, nodes: &[Node]) -> World {
    let (client, api) = ApiServer::start(svc);
    let fake = Arc::new(fake);
    let (store, mut writer) = reflector::store::<Node>();
    for n in nodes {
        writer.apply_watcher_event(&watcher::Event::Apply(n.clone()));
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferry-operator".into(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context::new(
        client,
        fake.clone() as Arc<dyn LoadBalancerProvider>,
        ClassFilter {
            class: "ferry.dev/local".into(),
            default_class: true,
        },
        store,
        recorder,
        Arc::new(Metrics::new()),
        Duration::from_secs(600),
    ));
    World {
        ctx,
        api,
        fake,
        nodes: writer,
    }
}

fn condition(body: &Value) -> &Value {
    &body["status"]["conditions"][0]
}

fn provisioned(svc: Service, ip: &str) -> Service {
    let mut svc = svc;
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: Some("Proxy".into()),
                ..Default::default()
            }]),
        }),
        conditions: Some(vec![Condition {
            type_: READY_CONDITION.into(),
            status: "True".into(),
            reason: "LoadBalancerEnsured".into(),
            message: "the load balancer is provisioned".into(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        }]),
    });
    svc
}

/// A provider that holds the balancer of `service("web")` (it published 203.0.113.1).
async fn holding_web() -> FakeProvider {
    let fake = FakeProvider::new();
    let web = crate::desired::desired(&service("web").lb().port(80, 30080).build(), &[]).unwrap();
    fake.ensure(&web).await.unwrap();
    fake
}

#[tokio::test]
async fn a_new_service_gets_a_finalizer_then_a_balancer_then_its_status() {
    let svc = service("web").lb().port(80, 30080).build();
    let w = world(
        &svc,
        FakeProvider::new(),
        &[node("n1").ip("10.0.0.1").build()],
    );
    let action = reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert_ne!(
        action,
        Action::await_change(),
        "a periodic resync is scheduled"
    );

    let seen = w.api.seen();
    let finalizer = seen
        .iter()
        .position(|s| s.is("PATCH", SVC))
        .expect("finalizer patch");
    assert_eq!(seen[finalizer].body[1]["value"][0], FINALIZER);
    let status = seen
        .iter()
        .position(|s| s.is("PATCH", &format!("{SVC}/status")))
        .expect("status patch");
    assert!(
        finalizer < status,
        "the finalizer is added before anything is published"
    );
    assert!(seen[status].query.contains("fieldManager=ferry-operator"));

    let body = &seen[status].body;
    assert_eq!(
        body["status"]["loadBalancer"]["ingress"][0]["ip"],
        "203.0.113.1"
    );
    assert_eq!(
        body["status"]["loadBalancer"]["ingress"][0]["ipMode"],
        "Proxy"
    );
    assert_eq!(condition(body)["type"], READY_CONDITION);
    assert_eq!(condition(body)["status"], "True");

    assert_eq!(w.fake.calls(), vec![Call::Ensure("default/web".into())]);
    // A provider that answers at once needs no "Ensuring" Event.
    let events = w.api.events().await;
    assert_eq!(
        events,
        vec![("EnsuredLoadBalancer".into(), "Normal".into())]
    );
    let applied = w.ctx.applied("uid-web").unwrap();
    assert_eq!(applied.targets.len(), 1);
}

#[tokio::test]
async fn a_slow_provider_gets_an_ensuring_event_first() {
    let svc = service("web").lb().port(80, 30080).finalized().build();
    let fake = FakeProvider::new();
    fake.set_delay(Duration::from_millis(700));
    let w = world(&svc, fake, &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let reasons: Vec<_> = w.api.events().await.into_iter().map(|e| e.0).collect();
    assert_eq!(reasons, ["EnsuringLoadBalancer", "EnsuredLoadBalancer"]);
}

#[tokio::test]
async fn an_up_to_date_service_causes_no_writes() {
    let svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert!(w.api.seen().is_empty(), "no API calls: {:?}", w.api.seen());
    assert_eq!(w.fake.calls(), vec![Call::Ensure("default/web".into())]);
}

#[tokio::test]
async fn hostname_ingress_from_a_cloud_like_provider() {
    let svc = service("web").lb().port(80, 30080).finalized().build();
    let w = world(&svc, FakeProvider::with_hostnames(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let body = &w.api.status_patches()[0];
    let ingress = &body["status"]["loadBalancer"]["ingress"][0];
    assert!(
        ingress["hostname"]
            .as_str()
            .unwrap()
            .ends_with(".elb.example.com")
    );
    assert!(ingress.get("ip").is_none() && ingress.get("ipMode").is_none());
}

#[tokio::test]
async fn invalid_input_is_an_event_and_a_condition_and_waits_for_a_change() {
    let svc = service("web")
        .lb()
        .port(80, 30080)
        .finalized()
        .load_balancer_ip("not-an-ip")
        .build();
    let w = world(&svc, FakeProvider::new(), &[]);
    let svc = Arc::new(svc);
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert!(w.fake.calls().is_empty(), "nothing is provisioned");
    assert_eq!(
        w.api.events().await,
        vec![("InvalidConfiguration".into(), "Warning".into())]
    );
    let body = &w.api.status_patches()[0];
    assert_eq!(condition(body)["status"], "False");
    assert_eq!(condition(body)["reason"], "InvalidLoadBalancerIP");
    assert!(
        condition(body)["message"]
            .as_str()
            .unwrap()
            .contains("not-an-ip")
    );
    assert!(body["status"]["loadBalancer"].get("ingress").is_none());
    assert_eq!(
        error_policy(svc, &err, w.ctx.clone()),
        Action::await_change()
    );
}

#[tokio::test]
async fn bad_input_from_the_provider_keeps_the_current_address() {
    let svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    w.fake.fail_next(ProviderError::allocation(
        "IPInUse",
        "192.0.2.5 is already used by default/other",
    ));
    let svc = Arc::new(svc);
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        w.api.events().await,
        vec![("IPAllocationFailed".into(), "Warning".into())]
    );
    let body = &w.api.status_patches()[0];
    assert_eq!(condition(body)["reason"], "IPInUse");
    assert!(
        body["status"].get("loadBalancer").is_none(),
        "the address is not taken away"
    );
    // Not a hot loop: retried on a provider signal or after minutes.
    assert!(
        matches!(error_policy(svc.clone(), &err, w.ctx.clone()), a if a == Action::requeue(SLOW_RETRY))
    );

    w.fake
        .fail_next(ProviderError::invalid("UnsupportedProtocol", "SCTP"));
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        error_policy(svc, &err, w.ctx.clone()),
        Action::await_change()
    );
    assert_eq!(
        w.api.events().await.last().unwrap().0,
        "InvalidConfiguration"
    );
}

#[tokio::test]
async fn transient_failures_back_off_and_honour_retry_after() {
    let svc = Arc::new(service("web").lb().port(80, 30080).finalized().build());
    let w = world(&svc, FakeProvider::new(), &[]);
    let mut waits = Vec::new();
    for _ in 0..4 {
        w.fake
            .fail_next(ProviderError::transient("503 from the cloud"));
        let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
        waits.push(error_policy(svc.clone(), &err, w.ctx.clone()));
    }
    let expected: Vec<_> = (1..=4)
        .map(|n| Action::requeue(backoff(n, "uid-web")))
        .collect();
    assert_eq!(waits, expected);
    assert!(
        backoff(2, "k") >= Duration::from_secs(2) && backoff(30, "k") <= Duration::from_secs(330)
    );
    assert_eq!(
        w.api.events().await.last().unwrap(),
        &("SyncLoadBalancerFailed".to_string(), "Warning".to_string())
    );

    w.fake.fail_next(ProviderError::Transient {
        message: "throttled".into(),
        retry_after: Some(Duration::from_secs(7)),
    });
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        error_policy(svc.clone(), &err, w.ctx.clone()),
        Action::requeue(Duration::from_secs(7))
    );

    // Success resets the backoff.
    reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
    w.fake.fail_next(ProviderError::transient("again"));
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        error_policy(svc, &err, w.ctx.clone()),
        Action::requeue(backoff(1, "uid-web"))
    );
}

#[tokio::test]
async fn api_conflicts_are_retried_with_backoff() {
    let svc = Arc::new(service("web").lb().port(80, 30080).build());
    let w = world(&svc, FakeProvider::new(), &[]);
    w.api.fail_once(SVC, 409);
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Kube(_)));
    assert!(
        w.fake.calls().is_empty(),
        "nothing is provisioned without the finalizer"
    );
    assert_eq!(
        error_policy(svc.clone(), &err, w.ctx.clone()),
        Action::requeue(backoff(1, "uid-web"))
    );
    reconcile(svc, w.ctx.clone()).await.unwrap();
}

#[tokio::test]
async fn throttling_by_the_api_server_is_retried_soon_without_growing_the_backoff() {
    let svc = Arc::new(service("web").lb().port(80, 30080).build());
    let w = world(&svc, FakeProvider::new(), &[]);
    for _ in 0..5 {
        w.api.fail_once(SVC, 429);
        let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
        let wait = retry_delay(&err, &w.ctx, "uid-web").expect("retried");
        assert!(wait <= Duration::from_millis(2200), "{wait:?}");
    }
    // The next transient failure starts the backoff from the beginning.
    w.fake.fail_next(ProviderError::transient("503"));
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        error_policy(svc, &err, w.ctx.clone()),
        Action::requeue(backoff(1, "uid-web"))
    );
}

#[tokio::test]
async fn deletion_removes_the_balancer_then_the_finalizer() {
    let svc = provisioned(
        service("web")
            .lb()
            .port(80, 30080)
            .finalized()
            .deleting()
            .build(),
        "203.0.113.1",
    );
    let w = world(&svc, holding_web().await, &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert_eq!(
        w.fake.calls().last(),
        Some(&Call::Delete("default/web".into()))
    );
    let seen = w.api.seen();
    let status = seen
        .iter()
        .position(|s| s.is("PATCH", &format!("{SVC}/status")))
        .expect("the address withdrawn from status");
    assert_eq!(
        seen[status].body["status"]["loadBalancer"],
        serde_json::json!({ "ingress": null })
    );
    let finalizer = seen
        .iter()
        .position(|s| s.is("PATCH", SVC))
        .expect("finalizer removed");
    assert_eq!(seen[finalizer].body[1]["op"], "remove");
    assert!(
        status < finalizer,
        "the address leaves the status before the address is given back and the finalizer goes"
    );
    let reasons: Vec<_> = w.api.events().await.into_iter().map(|e| e.0).collect();
    assert_eq!(reasons, ["DeletingLoadBalancer", "DeletedLoadBalancer"]);
}

#[tokio::test]
async fn a_deleted_service_whose_status_write_fails_keeps_its_address() {
    let svc = provisioned(
        service("web")
            .lb()
            .port(80, 30080)
            .finalized()
            .deleting()
            .build(),
        "203.0.113.1",
    );
    let w = world(&svc, holding_web().await, &[]);
    w.api.fail_once(&format!("{SVC}/status"), 503);
    assert!(reconcile(Arc::new(svc), w.ctx.clone()).await.is_err());
    assert!(
        !w.fake.calls().contains(&Call::Delete("default/web".into())),
        "nothing is given back while the Service still shows it"
    );
}

#[tokio::test]
async fn a_failed_delete_keeps_the_finalizer() {
    let svc = service("web")
        .lb()
        .port(80, 30080)
        .finalized()
        .deleting()
        .build();
    let w = world(&svc, FakeProvider::new(), &[]);
    w.fake.fail_next(ProviderError::transient("timeout"));
    assert!(reconcile(Arc::new(svc), w.ctx.clone()).await.is_err());
    assert!(
        !w.api.seen().iter().any(|s| s.is("PATCH", SVC)),
        "finalizer kept"
    );
}

#[tokio::test]
async fn a_service_that_stops_being_ours_is_cleaned_up() {
    let mut svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    svc.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let w = world(&svc, holding_web().await, &[]);
    let action = reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        w.fake.calls().last(),
        Some(&Call::Delete("default/web".into()))
    );
    let body = &w.api.status_patches()[0];
    assert_eq!(
        body["status"]["loadBalancer"],
        serde_json::json!({ "ingress": null }),
        "ingress withdrawn"
    );
    assert_eq!(
        body["status"]["conditions"][0]["$patch"], "delete",
        "condition withdrawn"
    );
    assert!(
        w.api.seen().iter().any(|s| s.is("PATCH", SVC)),
        "finalizer removed"
    );
}

#[tokio::test]
async fn a_service_of_another_class_is_never_touched() {
    let svc = service("web")
        .lb()
        .class("example.com/other")
        .port(80, 30080)
        .build();
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert!(w.api.seen().is_empty());
    assert!(w.fake.calls().is_empty());
}

#[tokio::test]
async fn a_node_change_becomes_a_target_update() {
    let svc = Arc::new(provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    ));
    let mut w = world(
        &svc,
        FakeProvider::new(),
        &[node("n1").ip("10.0.0.1").build()],
    );
    reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
    w.nodes
        .apply_watcher_event(&watcher::Event::Apply(node("n2").ip("10.0.0.2").build()));
    reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
    assert_eq!(
        w.fake.calls(),
        vec![
            Call::Ensure("default/web".into()),
            Call::UpdateTargets("default/web".into(), vec!["n1".into(), "n2".into()])
        ]
    );
    assert_eq!(
        w.api.events().await,
        vec![("UpdatedLoadBalancer".into(), "Normal".into())]
    );
    // An excluded node leaves the targets.
    w.nodes.apply_watcher_event(&watcher::Event::Apply(
        node("n2")
            .ip("10.0.0.2")
            .label(crate::eligibility::EXCLUDE_LABEL, "")
            .build(),
    ));
    reconcile(svc, w.ctx.clone()).await.unwrap();
    assert_eq!(
        w.fake.calls().last().unwrap(),
        &Call::UpdateTargets("default/web".into(), vec!["n1".into()])
    );
}

#[tokio::test]
async fn orphans_are_deleted_and_live_balancers_kept() {
    let svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let orphan = ferry_providers::LoadBalancerId {
        namespace: "default".into(),
        name: "gone".into(),
        uid: "uid-gone".into(),
    };
    w.fake.insert_orphan(orphan.clone());
    let deleted = crate::orphans::collect_orphans(&w.ctx).await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(w.fake.balancers().len(), 1);
    assert_eq!(w.fake.balancers()[0].uid, "uid-web");
    assert!(
        w.api.seen().iter().any(|s| s.is("GET", "/api/v1/services")),
        "a fresh list, not a cache"
    );
}

#[tokio::test]
async fn resources_of_a_cluster_with_the_same_id_are_reported_never_deleted() {
    let svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let twin = ferry_providers::ForeignResource {
        id: ferry_providers::LoadBalancerId {
            namespace: "default".into(),
            name: "theirs".into(),
            uid: "uid-in-the-other-cluster".into(),
        },
        resource: "load balancer ferry-0123".into(),
        cluster_uid: Some("other-cluster".into()),
    };
    w.fake.insert_foreign(twin);
    // An old resource of a live Service of ours, from before the identity mark.
    w.fake.insert_foreign(ferry_providers::ForeignResource {
        id: ferry_providers::LoadBalancerId {
            namespace: "default".into(),
            name: "web".into(),
            uid: "uid-web".into(),
        },
        resource: "target group ferry-abcd-80-tcp".into(),
        cluster_uid: None,
    });
    let deleted = crate::orphans::collect_orphans(&w.ctx).await.unwrap();
    assert_eq!(deleted, 0);
    assert!(
        !w.fake.calls().iter().any(|c| matches!(c, Call::Delete(_))),
        "nothing deleted: {:?}",
        w.fake.calls()
    );
    assert_eq!(w.ctx.metrics.foreign_resources.get(), 1);
    assert!(w.ctx.metrics.encode().contains("ferry_foreign_resources 1"));
}

#[tokio::test]
async fn the_finalizer_and_the_record_go_on_in_one_write() {
    let svc = service("web").lb().port(80, 30080).build();
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let seen = w.api.seen();
    let claims: Vec<_> = seen.iter().filter(|s| s.is("PATCH", SVC)).collect();
    assert_eq!(claims.len(), 1, "one metadata write");
    let ops = &claims[0].body;
    assert!(
        ops.as_array().unwrap().iter().any(|op| op["op"] == "add"
            && op["path"] == "/metadata/annotations"
            && op["value"][PROVISIONED_BY] == "ferry.dev/local"),
        "{ops}"
    );
}

#[tokio::test]
async fn an_unrecorded_service_of_ours_gets_its_record_and_nothing_else() {
    let svc = provisioned(
        service("web")
            .lb()
            .port(80, 30080)
            .annotate("team", "web")
            .finalized_unrecorded()
            .build(),
        "203.0.113.1",
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    let seen = w.api.seen();
    let claims: Vec<_> = seen.iter().filter(|s| s.is("PATCH", SVC)).collect();
    assert_eq!(claims.len(), 1);
    let ops = claims[0].body.as_array().unwrap();
    assert_eq!(ops.len(), 2, "test and add the record: {ops:?}");
    assert_eq!(
        ops[1]["path"],
        "/metadata/annotations/ferry.dev~1provisioned-by"
    );
}

#[tokio::test]
async fn another_instances_service_is_never_cleaned_up_here() {
    // Provisioned by the aws instance, now of a class nobody here serves, being deleted:
    // the aws instance's business alone.
    for svc in [
        service("web")
            .lb()
            .class("ferry.dev/aws")
            .port(80, 30080)
            .finalized_by("ferry.dev/aws")
            .build(),
        service("web")
            .lb()
            .class("ferry.dev/aws")
            .port(80, 30080)
            .finalized_by("ferry.dev/aws")
            .deleting()
            .build(),
        service("web")
            .port(80, 30080)
            .finalized_by("ferry.dev/aws")
            .build(),
    ] {
        let w = world(&svc, FakeProvider::new(), &[]);
        let action = reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert!(w.api.seen().is_empty(), "{:?}", w.api.seen());
        assert!(w.fake.calls().is_empty());
    }
}

#[tokio::test]
async fn a_service_moved_here_waits_for_the_previous_instance() {
    // Now of our class (no class, default), but the aws instance has not cleaned up yet.
    let svc = service("web")
        .lb()
        .port(80, 30080)
        .finalized_by("ferry.dev/aws")
        .build();
    let w = world(&svc, FakeProvider::new(), &[]);
    let action = reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(SLOW_RETRY));
    assert!(w.fake.calls().is_empty(), "nothing provisioned yet");
    assert!(
        !w.api.seen().iter().any(|s| s.is("PATCH", SVC)),
        "the other's finalizer and record are left alone"
    );
    let body = &w.api.status_patches()[0];
    assert_eq!(condition(body)["status"], "False");
    assert_eq!(condition(body)["reason"], "ReleasedByPreviousClass");
    assert!(body["status"].get("loadBalancer").is_none());
}

#[tokio::test]
async fn cleanup_withdraws_only_the_ingress_this_instance_published() {
    let mut svc = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "192.0.2.99",
    );
    svc.spec.as_mut().unwrap().load_balancer_class = Some("metallb.io/metallb".into());
    // What this instance had: another address than the one the Service shows now.
    let w = world(&svc, holding_web().await, &[]);
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert!(w.fake.calls().contains(&Call::Delete("default/web".into())));
    for body in w.api.status_patches() {
        assert!(
            body["status"].get("loadBalancer").is_none(),
            "MetalLB's address is kept: {body}"
        );
    }
    let release = w
        .api
        .seen()
        .into_iter()
        .find(|s| s.is("PATCH", SVC))
        .expect("finalizer released");
    let paths: Vec<_> = release
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        paths.iter().any(|p| p.ends_with("provisioned-by")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn one_node_pass_per_debounce_window_touching_only_changed_balancers() {
    use futures::StreamExt;
    let web = provisioned(
        service("web").lb().port(80, 30080).finalized().build(),
        "203.0.113.1",
    );
    let mut w = world(
        &web,
        FakeProvider::new(),
        &[node("n1").ip("10.0.0.1").build()],
    );
    reconcile(Arc::new(web.clone()), w.ctx.clone())
        .await
        .unwrap();
    let never_ensured = service("fresh").lb().port(80, 30081).build();
    let (svc_store, mut svc_writer) = reflector::store::<Service>();
    svc_writer.apply_watcher_event(&watcher::Event::Apply(web));
    svc_writer.apply_watcher_event(&watcher::Event::Apply(never_ensured));

    let (changes_tx, changes_rx) = futures::channel::mpsc::unbounded();
    let triggers = crate::nodes::node_pass_triggers(
        changes_rx,
        w.ctx.clone(),
        svc_store,
        Duration::from_millis(200),
    );
    futures::pin_mut!(triggers);
    // A burst of node changes...
    for i in 2..6 {
        w.nodes.apply_watcher_event(&watcher::Event::Apply(
            node(&format!("n{i}")).ip(&format!("10.0.0.{i}")).build(),
        ));
        changes_tx.unbounded_send(()).unwrap();
    }
    // ...is one pass, naming only the balancer that was ensured with other targets.
    let first = tokio::time::timeout(Duration::from_secs(2), triggers.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.name, "web");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), triggers.next())
            .await
            .is_err(),
        "one trigger per pass"
    );
}

#[tokio::test]
async fn provider_signals_requeue_the_services_that_can_use_them() {
    use ferry_providers::ProviderSignal;
    use futures::StreamExt;
    let ready = provisioned(service("ready").lb().port(80, 1).build(), "203.0.113.1");
    let waiting = service("waiting").lb().port(80, 2).build();
    let theirs = service("theirs")
        .lb()
        .class("example.com/x")
        .port(80, 3)
        .build();
    let (store, mut writer) = reflector::store::<Service>();
    for s in [&ready, &waiting, &theirs] {
        writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
    }
    let class = ClassFilter {
        class: "ferry.dev/local".into(),
        default_class: true,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let triggers = crate::provider_triggers_for_test(rx, store, class);
    futures::pin_mut!(triggers);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(2), triggers.next())
            .await
            .unwrap()
            .unwrap()
            .name
    };

    // Freed capacity: only Services that are not ready are retried.
    tx.send(ProviderSignal::CapacityFreed).await.unwrap();
    assert_eq!(next().await, "waiting");
    // Pools changed: every Service of ours.
    tx.send(ProviderSignal::ConfigurationChanged).await.unwrap();
    let mut both = vec![next().await, next().await];
    both.sort();
    assert_eq!(both, ["ready", "waiting"]);
    // Repair: exactly the named ones.
    tx.send(ProviderSignal::Resync(vec![crate::desired::id_of(&ready)]))
        .await
        .unwrap();
    assert_eq!(next().await, "ready");
}

#[tokio::test]
async fn what_the_provider_ignores_is_a_warning_once_per_change_and_the_service_stays_ready() {
    let svc = Arc::new(
        service("web")
            .lb()
            .port(80, 30080)
            .annotate(
                ferry_providers::fake::NOTICE_ANNOTATION,
                "annotation x.io/y is not acted on",
            )
            .build(),
    );
    let w = world(&svc, FakeProvider::new(), &[]);
    for _ in 0..3 {
        reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
    }
    let body = w.api.status_patches().last().cloned().unwrap();
    assert_eq!(condition(&body)["status"], "True");
    let events = w.api.events().await;
    let ignored: Vec<_> = events
        .iter()
        .filter(|(r, _)| r == "IgnoredSetting")
        .collect();
    assert_eq!(ignored.len(), 1, "once, not at every resync: {events:?}");
    assert_eq!(ignored[0].1, "Warning");
}

#[tokio::test]
async fn a_balancer_the_cloud_is_still_making_shows_provisioning_without_a_warning_or_backoff() {
    let svc = Arc::new(service("web").lb().port(80, 30080).build());
    let w = world(&svc, FakeProvider::new(), &[]);
    for _ in 0..3 {
        w.fake.fail_next(ProviderError::in_progress(
            "forwarding rule ferry-web: operation RUNNING",
            Duration::from_secs(7),
        ));
        let action = reconcile(svc.clone(), w.ctx.clone())
            .await
            .expect("still provisioning is not a failed reconcile");
        assert_eq!(action, Action::requeue(Duration::from_secs(7)));
    }
    let body = w.api.status_patches().last().cloned().unwrap();
    assert_eq!(condition(&body)["status"], "False");
    assert_eq!(condition(&body)["reason"], "Provisioning");
    assert!(
        condition(&body)["message"]
            .as_str()
            .unwrap()
            .contains("operation RUNNING")
    );
    let events = w.api.events().await;
    assert!(
        events.iter().all(|(_, kind)| kind == "Normal"),
        "no Warning while the cloud works: {events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "EnsuringLoadBalancer"));

    // An absurd hint is bounded: never a hot loop, never an hour.
    w.fake
        .fail_next(ProviderError::in_progress("soon", Duration::ZERO));
    assert_eq!(
        reconcile(svc.clone(), w.ctx.clone()).await.unwrap(),
        Action::requeue(Duration::from_secs(1))
    );

    // Waiting grew no backoff: the first real failure starts from the beginning.
    w.fake.fail_next(ProviderError::transient("503"));
    let err = reconcile(svc.clone(), w.ctx.clone()).await.unwrap_err();
    assert_eq!(
        error_policy(svc.clone(), &err, w.ctx.clone()),
        Action::requeue(backoff(1, "uid-web"))
    );

    // Once done, the Service is ready.
    reconcile(svc.clone(), w.ctx.clone()).await.unwrap();
    let body = w.api.status_patches().last().cloned().unwrap();
    assert_eq!(condition(&body)["status"], "True");
}

#[tokio::test]
async fn a_delete_the_cloud_is_still_carrying_out_keeps_the_finalizer_without_a_warning() {
    let svc = Arc::new(provisioned(
        service("web")
            .lb()
            .port(80, 30080)
            .finalized()
            .deleting()
            .build(),
        "203.0.113.1",
    ));
    let w = world(&svc, holding_web().await, &[]);
    w.fake.fail_next(ProviderError::in_progress(
        "target pool ferry-web: operation RUNNING",
        Duration::from_secs(4),
    ));
    assert_eq!(
        reconcile(svc.clone(), w.ctx.clone()).await.unwrap(),
        Action::requeue(Duration::from_secs(4))
    );
    assert!(
        !w.api.seen().iter().any(|s| s.is("PATCH", SVC)),
        "the finalizer stays while the delete runs"
    );
    let events = w.api.events().await;
    assert!(
        events.iter().all(|(_, kind)| kind == "Normal"),
        "{events:?}"
    );

    reconcile(svc, w.ctx.clone()).await.unwrap();
    assert!(
        w.api.seen().iter().any(|s| s.is("PATCH", SVC)),
        "released once the delete is done"
    );
}

#[tokio::test]
async fn an_api_server_that_drops_ip_mode_gets_one_status_write_not_a_loop() {
    let svc = service("web").lb().port(80, 30080).finalized().build();
    let w = world(&svc, FakeProvider::new(), &[]);
    // As Kubernetes 1.29 keeps it: the address, without its ipMode.
    let mut kept = provisioned(svc.clone(), "203.0.113.1");
    if let Some(ingress) = kept
        .status
        .as_mut()
        .and_then(|s| s.load_balancer.as_mut())
        .and_then(|lb| lb.ingress.as_mut())
    {
        for i in ingress {
            i.ip_mode = None;
        }
    }
    *w.api.status_answer.lock().unwrap() = Some(kept.clone());
    reconcile(Arc::new(svc), w.ctx.clone()).await.unwrap();
    assert_eq!(w.api.status_patches().len(), 1);
    // The write's own watch event brings the Service back as the server kept it.
    for _ in 0..3 {
        reconcile(Arc::new(kept.clone()), w.ctx.clone())
            .await
            .unwrap();
    }
    assert_eq!(
        w.api.status_patches().len(),
        1,
        "the same status was written again: {:?}",
        w.api.status_patches()
    );
    let events: Vec<String> = w.api.events().await.into_iter().map(|e| e.0).collect();
    assert_eq!(events, ["EnsuredLoadBalancer"]);
}

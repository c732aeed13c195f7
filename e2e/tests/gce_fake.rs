//! The Compute Engine fake against the compute v1 discovery document: every answer of a
//! create/read/list/change/delete sequence over HTTP conforms to the schema its method
//! declares, every path and verb is one the document has, errors come in GCE's envelope —
//! and the discovery-based Python client (a second real client) runs the same kind of
//! sequence against it.

use std::collections::BTreeMap;

use ferry_e2e::gce::GceFake;
use ferry_e2e::gce::discovery::Discovery;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const PROJECT: &str = "proj";
const REGION: &str = "us-central1";
const ZONE: &str = "us-central1-a";

async fn send(fake: &GceFake, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(fake.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("/compute/v1/{path}"))
        .header("host", "compute.googleapis.com")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// Sends, and checks the answer against the discovery document: the method and path
/// exist there, a success conforms to the method's response schema, an error is GCE's
/// envelope with the status it was sent with.
async fn checked(
    d: &Discovery,
    fake: &GceFake,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let bare = path.split('?').next().unwrap_or(path);
    let call = ferry_e2e::gce::call_name(method, bare);
    let (http_method, template) = d
        .method(&call)
        .unwrap_or_else(|| panic!("{call} is not in the discovery document"));
    assert_eq!(http_method, method, "{call}");
    assert_eq!(
        template.split('/').count(),
        bare.split('/').count(),
        "{call}: {path} does not fit {template}"
    );
    let (status, answer) = send(fake, method, path, body).await;
    if status == 200 {
        let schema = d.response_schema(&call).unwrap();
        let problems = d.check(&schema, &answer);
        assert!(problems.is_empty(), "{call}: {problems:#?}\n{answer:#}");
    } else {
        assert_eq!(answer["error"]["code"], status, "{call}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
        assert!(
            answer["error"]["errors"][0]["reason"].is_string(),
            "{answer}"
        );
    }
    (status, answer)
}

fn region(path: &str) -> String {
    format!("projects/{PROJECT}/regions/{REGION}/{path}")
}

fn global(path: &str) -> String {
    format!("projects/{PROJECT}/global/{path}")
}

#[tokio::test]
async fn the_fake_answers_as_the_discovery_document_says() {
    let d = Discovery::load().unwrap();
    let fake = GceFake::start(PROJECT).await.unwrap();
    fake.with(|c| c.add_instance(ZONE, "node-a"));
    fake.with(|c| c.add_instance(ZONE, "node-b"));
    let node_a = format!(
        "{}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/node-a",
        fake.url
    );
    let node_b = node_a.replace("node-a", "node-b");

    let (s, hc) = checked(
        &d,
        &fake,
        "POST",
        &global("httpHealthChecks"),
        Some(json!({"name": "ferry-web", "port": 10256, "requestPath": "/healthz"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(hc["kind"], "compute#operation");
    assert_eq!(hc["status"], "DONE");
    let hc_link = hc["targetLink"].as_str().unwrap().to_string();
    assert!(
        hc_link.starts_with("http://"),
        "selfLinks are full URLs: {hc_link}"
    );

    let (s, op) = checked(&d, &fake, "POST", &region("targetPools"),
        Some(json!({"name": "ferry-web", "instances": [node_a], "healthChecks": [hc_link], "sessionAffinity": "CLIENT_IP"}))).await;
    assert_eq!(s, 200);
    let pool_link = op["targetLink"].as_str().unwrap().to_string();
    let (_, op) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "ferry-web"})),
    )
    .await;
    let (_, address) = checked(&d, &fake, "GET", &region("addresses/ferry-web"), None).await;
    assert_eq!(address["status"], "RESERVED");
    assert!(address.get("users").is_none());
    assert!(address["id"].is_string(), "uint64 as a string");
    let ip = address["address"].as_str().unwrap().to_string();
    assert_eq!(op["targetLink"], address["selfLink"]);

    let (s, _) = checked(&d, &fake, "POST", &region("forwardingRules"),
        Some(json!({"name": "ferry-web-tcp", "IPAddress": ip, "IPProtocol": "TCP", "portRange": "80-443", "target": pool_link}))).await;
    assert_eq!(s, 200);
    let (_, address) = checked(&d, &fake, "GET", &region("addresses/ferry-web"), None).await;
    assert_eq!(address["status"], "IN_USE");
    assert_eq!(address["users"].as_array().unwrap().len(), 1);
    checked(&d, &fake, "POST", &global("firewalls"),
        Some(json!({"name": "ferry-web-fw", "sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["80", "443"]}], "targetTags": ["nodes"]}))).await;

    // Reads, lists with a filter and pages.
    let (_, rule) = checked(
        &d,
        &fake,
        "GET",
        &region("forwardingRules/ferry-web-tcp"),
        None,
    )
    .await;
    assert_eq!(rule["IPAddress"], ip);
    for path in [
        region("forwardingRules"),
        region("targetPools"),
        global("firewalls"),
        global("httpHealthChecks"),
    ] {
        let (s, list) = checked(&d, &fake, "GET", &path, None).await;
        assert_eq!(
            (s, list["items"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{path}"
        );
    }
    let (_, list) = checked(
        &d,
        &fake,
        "GET",
        &format!(
            "{}?filter=name%20eq%20%22ferry-.*%22&maxResults=1",
            region("addresses")
        ),
        None,
    )
    .await;
    assert_eq!(list["items"][0]["name"], "ferry-web");
    let (_, none) = checked(
        &d,
        &fake,
        "GET",
        &format!("{}?filter=name%20%3D%20%22other%22", region("addresses")),
        None,
    )
    .await;
    assert!(
        none.get("items").is_none(),
        "an empty list has no items: {none}"
    );
    checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "second"})),
    )
    .await;
    let (_, page) = checked(
        &d,
        &fake,
        "GET",
        &format!("{}?maxResults=1", region("addresses")),
        None,
    )
    .await;
    let token = page["nextPageToken"].as_str().unwrap().to_string();
    let (_, rest) = checked(
        &d,
        &fake,
        "GET",
        &format!("{}?maxResults=1&pageToken={token}", region("addresses")),
        None,
    )
    .await;
    assert!(rest.get("nextPageToken").is_none());
    assert_ne!(page["items"][0]["name"], rest["items"][0]["name"]);
    let (s, _) = checked(
        &d,
        &fake,
        "GET",
        &format!("{}?filter=name%20~%20x", region("addresses")),
        None,
    )
    .await;
    assert_eq!(s, 400, "a filter it cannot parse is refused");

    // Target pool membership.
    checked(
        &d,
        &fake,
        "POST",
        &region("targetPools/ferry-web/addInstance"),
        Some(json!({"instances": [{"instance": node_b}]})),
    )
    .await;
    checked(
        &d,
        &fake,
        "POST",
        &region("targetPools/ferry-web/removeInstance"),
        Some(json!({"instances": [{"instance": node_a}]})),
    )
    .await;
    let (_, pool) = checked(&d, &fake, "GET", &region("targetPools/ferry-web"), None).await;
    assert_eq!(pool["instances"], json!([node_b]));
    let (_, inst) = checked(
        &d,
        &fake,
        "GET",
        &format!("projects/{PROJECT}/zones/{ZONE}/instances/node-b"),
        None,
    )
    .await;
    assert_eq!(inst["selfLink"], node_b);

    // Changes in place: a firewall rule patched and replaced, a rule pointed at another
    // pool; references given as partial URLs come back as full ones.
    let (s, _) = checked(
        &d,
        &fake,
        "PATCH",
        &global("firewalls/ferry-web-fw"),
        Some(json!({"sourceRanges": ["10.0.0.0/8"]})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, fw) = checked(&d, &fake, "GET", &global("firewalls/ferry-web-fw"), None).await;
    assert_eq!(fw["sourceRanges"], json!(["10.0.0.0/8"]));
    assert_eq!(
        fw["targetTags"],
        json!(["nodes"]),
        "a patch keeps what it does not name"
    );
    let (s, _) = checked(
        &d,
        &fake,
        "PUT",
        &global("firewalls/ferry-web-fw"),
        Some(json!({"name": "ferry-web-fw", "network": format!("projects/{PROJECT}/global/networks/default"),
            "sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "udp", "ports": ["53"]}]})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, fw) = checked(&d, &fake, "GET", &global("firewalls/ferry-web-fw"), None).await;
    assert_eq!(
        fw["allowed"],
        json!([{"IPProtocol": "udp", "ports": ["53"]}])
    );
    assert!(
        fw.get("targetTags")
            .is_none_or(|t| t.as_array().is_some_and(Vec::is_empty)),
        "an update replaces: {fw}"
    );
    assert!(fw["network"].as_str().unwrap().starts_with("http"), "{fw}");
    checked(
        &d,
        &fake,
        "POST",
        &region("targetPools"),
        Some(json!({"name": "ferry-other"})),
    )
    .await;
    let (s, _) = checked(
        &d,
        &fake,
        "POST",
        &region("forwardingRules/ferry-web-tcp/setTarget"),
        Some(json!({"target": format!("projects/{PROJECT}/regions/{REGION}/targetPools/ferry-other")})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, rule) = checked(
        &d,
        &fake,
        "GET",
        &region("forwardingRules/ferry-web-tcp"),
        None,
    )
    .await;
    assert!(
        rule["target"].as_str().unwrap().starts_with("http")
            && rule["target"]
                .as_str()
                .unwrap()
                .ends_with("/targetPools/ferry-other"),
        "{rule}"
    );
    checked(
        &d,
        &fake,
        "POST",
        &region("forwardingRules/ferry-web-tcp/setTarget"),
        Some(json!({"target": pool_link})),
    )
    .await;
    checked(
        &d,
        &fake,
        "DELETE",
        &region("targetPools/ferry-other"),
        None,
    )
    .await;

    // The errors GCE gives.
    let (s, e) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "ferry-web"})),
    )
    .await;
    assert_eq!(
        (s, e["error"]["errors"][0]["reason"].as_str()),
        (409, Some("alreadyExists"))
    );
    let (s, _) = checked(&d, &fake, "GET", &region("addresses/absent"), None).await;
    assert_eq!(s, 404);
    let (s, e) = checked(&d, &fake, "DELETE", &region("addresses/ferry-web"), None).await;
    assert_eq!(
        (s, e["error"]["errors"][0]["reason"].as_str()),
        (400, Some("resourceInUseByAnotherResource"))
    );
    let (s, _) = checked(&d, &fake, "DELETE", &region("targetPools/ferry-web"), None).await;
    assert_eq!(s, 400, "a pool a rule targets stays");
    let (s, _) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "Bad_Name"})),
    )
    .await;
    assert_eq!(s, 400);
    fake.fail_next("addresses.insert", 1, 403, "quotaExceeded");
    let (s, e) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "third"})),
    )
    .await;
    assert_eq!(
        (s, e["error"]["errors"][0]["reason"].as_str()),
        (403, Some("quotaExceeded"))
    );

    // Teardown in order, each delete an Operation.
    for path in [
        region("forwardingRules/ferry-web-tcp"),
        region("targetPools/ferry-web"),
        global("httpHealthChecks/ferry-web"),
        global("firewalls/ferry-web-fw"),
        region("addresses/ferry-web"),
    ] {
        let (s, op) = checked(&d, &fake, "DELETE", &path, None).await;
        assert_eq!(
            (s, op["operationType"].as_str()),
            (200, Some("delete")),
            "{path}"
        );
    }
    let (_, address) = checked(&d, &fake, "GET", &region("addresses/second"), None).await;
    assert_eq!(address["status"], "RESERVED");
}

#[tokio::test]
async fn slow_operations_run_before_their_change_is_seen_and_the_name_is_taken_meanwhile() {
    let d = Discovery::load().unwrap();
    let fake = GceFake::start(PROJECT).await.unwrap();
    fake.slow_operations(3);
    let (_, op) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "slow"})),
    )
    .await;
    assert_eq!(op["status"], "PENDING");
    let name = op["name"].as_str().unwrap().to_string();
    let (s, _) = checked(&d, &fake, "GET", &region("addresses/slow"), None).await;
    assert_eq!(s, 404, "not there while its insert runs");
    let (s, e) = checked(
        &d,
        &fake,
        "POST",
        &region("addresses"),
        Some(json!({"name": "slow"})),
    )
    .await;
    assert_eq!(
        (s, e["error"]["errors"][0]["reason"].as_str()),
        (409, Some("alreadyExists"))
    );
    let (_, op) = checked(
        &d,
        &fake,
        "GET",
        &region(&format!("operations/{name}")),
        None,
    )
    .await;
    assert_eq!(op["status"], "RUNNING");
    let (_, op) = checked(
        &d,
        &fake,
        "POST",
        &region(&format!("operations/{name}/wait")),
        None,
    )
    .await;
    assert_eq!(op["status"], "RUNNING");
    let (_, op) = checked(
        &d,
        &fake,
        "POST",
        &region(&format!("operations/{name}/wait")),
        None,
    )
    .await;
    assert_eq!(op["status"], "DONE");
    assert!(op["endTime"].is_string());
    let (s, _) = checked(&d, &fake, "GET", &region("addresses/slow"), None).await;
    assert_eq!(s, 200);
    assert_eq!(fake.calls_since(0).get("regionOperations.wait"), Some(&2));
}

#[tokio::test]
async fn the_discovery_based_python_client_drives_the_fake() {
    let fake = GceFake::start(PROJECT).await.unwrap();
    fake.with(|c| c.add_instance(ZONE, "node-a"));
    // Every write needs one wait, so the client's Operation handling runs too.
    fake.slow_operations(1);
    let doc = ferry_e2e::gce::discovery::document_path().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gce_contract.py");
    // Bounded: a client that hangs fails the test instead of stalling the suite (the child
    // is killed when the timeout drops it).
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .env("FAKE_URL", &fake.url)
        .env("DISCOVERY", &doc)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the Python client finished within 120 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = fake.calls_since(0);
    let expected: BTreeMap<String, usize> = [
        ("addresses.insert", 2),
        ("addresses.get", 1),
        ("addresses.list", 1),
        ("addresses.delete", 1),
        ("httpHealthChecks.insert", 1),
        ("httpHealthChecks.delete", 1),
        ("targetPools.insert", 1),
        ("targetPools.delete", 1),
        ("forwardingRules.insert", 1),
        ("forwardingRules.delete", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (call, n) in &expected {
        assert_eq!(calls.get(call), Some(n), "{call}: {calls:?}");
    }
    assert!(
        calls.get("regionOperations.wait").is_some_and(|n| *n >= 1),
        "{calls:?}"
    );
}

#[test]
fn the_check_finds_what_gce_would_never_send() {
    let d = Discovery::load().unwrap();
    let problems = d.check(
        "Address",
        &json!({"id": 5, "status": "WEIRD", "bogus": true, "users": "one"}),
    );
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        d.check("Address", &json!({"id": "5", "status": "IN_USE"}))
            .is_empty()
    );
}

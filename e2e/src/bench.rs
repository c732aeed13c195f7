//! What the call-count benchmarks (`ferry-bench-aws`, `ferry-bench-gce`) share: the
//! Services they create, waiting until every one has a balancer, taking nodes away, and
//! waiting until the cloud hears no more calls.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};

use crate::nodes::simulated_node;

/// Service `i` of a benchmark: ports 80 and 443, of `class`.
pub fn two_port_service(i: usize, class: &str) -> Service {
    let port = |name: &str, port| ServicePort {
        name: Some(name.into()),
        port,
        ..ServicePort::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:03}")),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(class.into()),
            ports: Some(vec![port("http", 80), port("https", 443)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Waits until `count` Services in `svcs` show an ingress (at most 10 min); `log` is what
/// to show when they do not.
pub async fn wait_all_ready(
    svcs: &Api<Service>,
    count: usize,
    log: impl Fn() -> String,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let list = svcs.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|l| l.ingress.as_ref())
                    .is_some_and(|i| !i.is_empty())
            })
            .count();
        if ready == count {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "{ready}/{count} Services got a balancer in 10 min\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the simulated nodes `<prefix>-<i+1>` for `which`, all at once.
pub async fn remove_nodes(
    client: &Client,
    prefix: &str,
    which: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let deletes = which.map(|i| {
        let api = api.clone();
        async move {
            api.delete(&simulated_node(prefix, i).name, &DeleteParams::default())
                .await
        }
    });
    for r in futures::future::join_all(deletes).await {
        r?;
    }
    Ok(())
}

/// Waits until the call log (`mark()` its length, `calls_since(m)` the calls after `m`) has
/// grown by at least `expect` since `mark` and then stayed still for 3 s (at most 10 min);
/// returns the calls since `mark` and how long after `start` the last one came.
pub async fn settle(
    mark: usize,
    start: Instant,
    expect: usize,
    now: impl Fn() -> usize,
    calls_since: impl Fn(usize) -> BTreeMap<String, usize>,
) -> anyhow::Result<(BTreeMap<String, usize>, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = (now(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = now();
        if seen != last.0 {
            last = (seen, Instant::now());
        }
        if seen - mark >= expect && last.1.elapsed() > Duration::from_secs(3) {
            return Ok((calls_since(mark), last.1.duration_since(start)));
        }
        if Instant::now() > deadline {
            bail!("no convergence within 10 min: {:?}", calls_since(mark));
        }
    }
}

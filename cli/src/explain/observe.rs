//! What `ferry explain` fetches from the API: the Service, every Service (for VIP sharing),
//! pools, nodes, EndpointSlices, the forwarders' heartbeat Leases and the Service's events.
//! Only reads; a missing Service or one that is not `type: LoadBalancer` is an error.

use std::sync::Arc;

use anyhow::Context;
use ferry_crds::LoadBalancerPool;
use ferry_model::announce::SERVICE_NAME_LABEL;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::explanation::{EventLine, LEASE_PREFIX, Observed};

/// Why there is nothing to explain.
#[derive(Debug, thiserror::Error)]
pub enum NothingToExplain {
    #[error("service {0}/{1} not found")]
    NotFound(String, String),
    #[error("service {0}/{1} is type {2}, not LoadBalancer: ferry has nothing to do with it")]
    NotLoadBalancer(String, String, String),
}

/// Every object of a cluster-wide kind; empty (and why on stderr) when it cannot be listed.
async fn list_all<K>(client: &Client, what: &str) -> Vec<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    or_empty(
        what,
        Api::<K>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items),
    )
}

/// A list that may be absent (the CRD not installed, no rights): empty, and why on stderr.
fn or_empty<T>(what: &str, r: Result<Vec<T>, kube::Error>) -> Vec<T> {
    r.unwrap_or_else(|e| {
        eprintln!("warning: cannot list {what}: {e}");
        Vec::new()
    })
}

pub async fn observe(
    client: &Client,
    namespace: &str,
    name: &str,
    forwarder_namespace: &str,
) -> anyhow::Result<Observed> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services
        .get_opt(name)
        .await
        .with_context(|| format!("reading service {namespace}/{name}"))?
        .ok_or_else(|| NothingToExplain::NotFound(namespace.into(), name.into()))?;
    let type_ = service
        .spec
        .as_ref()
        .and_then(|s| s.type_.clone())
        .unwrap_or_else(|| "ClusterIP".into());
    if type_ != "LoadBalancer" {
        return Err(NothingToExplain::NotLoadBalancer(namespace.into(), name.into(), type_).into());
    }
    let all_services = list_all::<Service>(client, "services").await;
    let pools = list_all::<LoadBalancerPool>(client, "LoadBalancerPools").await;
    let nodes = list_all::<Node>(client, "nodes").await;
    let slices = list_all::<EndpointSlice>(client, "endpointslices").await;
    // Only the Services on this one's VIPs matter, but sharing can cross namespaces.
    let slices = slices
        .into_iter()
        .filter(|s| s.labels().contains_key(SERVICE_NAME_LABEL))
        .map(Arc::new)
        .collect();
    let leases = or_empty(
        &format!("leases in {forwarder_namespace}"),
        Api::<Lease>::namespaced(client.clone(), forwarder_namespace)
            .list(&ListParams::default())
            .await
            .map(|l| l.items),
    )
    .into_iter()
    .filter(|l| l.name_any().starts_with(LEASE_PREFIX))
    .collect();
    let events = events(client, namespace, name).await;
    Ok(Observed {
        service,
        services: all_services,
        pools,
        nodes,
        slices,
        leases,
        events,
        now: jiff::Timestamp::now(),
    })
}

/// The Service's events from both APIs (one store behind them, so the same event may come
/// twice: kept once by uid).
async fn events(client: &Client, namespace: &str, name: &str) -> Vec<EventLine> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let new_params =
        ListParams::default().fields(&format!("regarding.kind=Service,regarding.name={name}"));
    let new_api = Api::<Event>::namespaced(client.clone(), namespace);
    let listed = new_api.list(&new_params).await.map(|l| l.items);
    for e in or_empty("events.k8s.io events", listed) {
        if !seen.insert(e.uid().unwrap_or_default()) {
            continue;
        }
        let time = e
            .series
            .as_ref()
            .map(|s| s.last_observed_time.0.to_string())
            .or_else(|| {
                e.deprecated_last_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
            })
            .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
            .or_else(|| {
                e.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
            });
        out.push(EventLine {
            time,
            type_: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.note.clone().unwrap_or_default(),
            count: e
                .series
                .as_ref()
                .map(|s| s.count)
                .or(e.deprecated_count)
                .unwrap_or(1),
        });
    }
    let old_params = ListParams::default().fields(&format!(
        "involvedObject.kind=Service,involvedObject.name={name}"
    ));
    let old_api = Api::<CoreEvent>::namespaced(client.clone(), namespace);
    let listed = old_api.list(&old_params).await.map(|l| l.items);
    for e in or_empty("core/v1 events", listed) {
        if !seen.insert(e.uid().unwrap_or_default()) {
            continue;
        }
        let time = e
            .last_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
            .or_else(|| {
                e.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
            });
        out.push(EventLine {
            time,
            type_: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: e.count.unwrap_or(1),
        });
    }
    out
}

//! How a Service's published addresses are read back from its status: the one place ferry
//! reads status as a source of truth (allocation state after a restart, the forwarder's VIPs).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

/// The addresses in a Service's `status.loadBalancer.ingress`, each with its `ipMode`.
pub fn status_ingress(svc: &Service) -> Vec<(IpAddr, Option<&str>)> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter_map(|i| Some((i.ip.as_ref()?.parse().ok()?, i.ip_mode.as_deref())))
                .collect()
        })
        .unwrap_or_default()
}

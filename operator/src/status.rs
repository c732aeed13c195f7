//! Service status as a projection of what the provider observed: `status.loadBalancer.ingress`
//! and the `ferry.dev/LoadBalancerReady` condition. Computes the server-side-apply body and
//! returns nothing when the Service already shows exactly that, so status is written only
//! when it differs.

use ferry_providers::{IpMode, ObservedLoadBalancer};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::json;

pub const READY_CONDITION: &str = "ferry.dev/LoadBalancerReady";

/// The condition ferry wants on a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Readiness {
    pub fn ready() -> Self {
        Self {
            ready: true,
            reason: "LoadBalancerEnsured",
            message: "the load balancer is provisioned".to_string(),
        }
    }

    pub fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// The ingress list Kubernetes should show for `observed`.
pub fn ingress_of(observed: &ObservedLoadBalancer) -> Vec<LoadBalancerIngress> {
    let ports = (!observed.port_errors.is_empty()).then(|| {
        observed
            .port_errors
            .iter()
            .map(|e| PortStatus {
                port: i32::from(e.port),
                protocol: e.protocol.as_str().to_string(),
                error: Some(e.error.clone()),
            })
            .collect::<Vec<_>>()
    });
    observed
        .ingress
        .iter()
        .map(|i| LoadBalancerIngress {
            ip: i.ip.map(|ip| ip.to_string()),
            hostname: i.hostname.clone(),
            // Kubernetes only accepts ipMode next to an ip.
            ip_mode: i.ip.and(i.ip_mode).map(|m| {
                match m {
                    IpMode::Proxy => "Proxy",
                    IpMode::Vip => "VIP",
                }
                .to_string()
            }),
            ports: ports.clone(),
        })
        .collect()
}

pub fn current_ingress(svc: &Service) -> Vec<LoadBalancerIngress> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default()
}

pub fn current_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
}

/// The strategic-merge patch that makes the Service show `ingress` and `readiness`, or
/// `None` when it already does. `ingress: None` leaves the ingress as it is (a failure never
/// takes an address away); `readiness: None` removes ferry's condition (the Service is no
/// longer ours). Conditions merge by type, so other controllers' conditions are kept.
/// Whether `current` shows what `wanted` says; with `ip_mode_kept` false (an API server
/// that drops `ipMode`) the modes are not compared.
pub fn same_ingress(
    current: &[LoadBalancerIngress],
    wanted: &[LoadBalancerIngress],
    ip_mode_kept: bool,
) -> bool {
    if ip_mode_kept {
        return current == wanted;
    }
    let without_mode = |i: &[LoadBalancerIngress]| -> Vec<LoadBalancerIngress> {
        i.iter()
            .map(|i| LoadBalancerIngress {
                ip_mode: None,
                ..i.clone()
            })
            .collect()
    };
    without_mode(current) == without_mode(wanted)
}

/// Whether the API server's answer to a write of `sent` lost the `ipMode`s it carried.
pub fn ip_mode_dropped(sent: &[LoadBalancerIngress], answered: &[LoadBalancerIngress]) -> bool {
    sent.iter().any(|i| i.ip_mode.is_some())
        && !answered.is_empty()
        && answered.iter().all(|i| i.ip_mode.is_none())
        && same_ingress(answered, sent, false)
}

pub fn status_patch(
    svc: &Service,
    ingress: Option<&[LoadBalancerIngress]>,
    readiness: Option<&Readiness>,
    ip_mode_kept: bool,
) -> Option<serde_json::Value> {
    let generation = svc.metadata.generation;
    let old = current_condition(svc);
    let condition = readiness.map(|r| {
        let status = if r.ready { "True" } else { "False" };
        Condition {
            type_: READY_CONDITION.to_string(),
            status: status.to_string(),
            reason: r.reason.to_string(),
            message: r.message.clone(),
            observed_generation: generation,
            last_transition_time: match old {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => Time(jiff::Timestamp::now()),
            },
        }
    });
    let condition_same = match (&condition, old) {
        (None, None) => true,
        (Some(new), Some(old)) => {
            new.status == old.status
                && new.reason == old.reason
                && new.message == old.message
                && new.observed_generation == old.observed_generation
        }
        _ => false,
    };
    let ingress_same = ingress.is_none_or(|i| same_ingress(&current_ingress(svc), i, ip_mode_kept));
    if condition_same && ingress_same {
        return None;
    }
    let mut status = json!({});
    if let Some(ingress) = ingress.filter(|_| !ingress_same) {
        // `ingress` is an atomic list: a strategic merge replaces it whole; null deletes it.
        status["loadBalancer"] = if ingress.is_empty() {
            json!({ "ingress": null })
        } else {
            json!({ "ingress": ingress })
        };
    }
    if !condition_same {
        status["conditions"] = match condition {
            Some(c) => json!([c]),
            None => json!([{ "type": READY_CONDITION, "$patch": "delete" }]),
        };
    }
    Some(json!({ "status": status }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::service;
    use ferry_providers::{Ingress, PortError, Protocol};
    use k8s_openapi::api::core::v1::{LoadBalancerStatus, ServiceStatus};

    fn observed(ip: &str) -> ObservedLoadBalancer {
        ObservedLoadBalancer {
            ingress: vec![Ingress::ip(ip.parse().unwrap(), IpMode::Proxy)],
            port_errors: vec![],
            notices: Vec::new(),
        }
    }

    fn with_status(ingress: Vec<LoadBalancerIngress>, cond: Option<Condition>) -> Service {
        service("web")
            .lb()
            .port(80, 30080)
            .status(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(ingress),
                }),
                conditions: cond.map(|c| vec![c]),
            })
            .build()
    }

    #[test]
    fn ip_ingress_carries_ip_mode_and_hostnames_do_not() {
        let i = ingress_of(&observed("192.0.2.1"));
        assert_eq!(i[0].ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(i[0].ip_mode.as_deref(), Some("Proxy"));
        let h = ingress_of(&ObservedLoadBalancer {
            ingress: vec![Ingress::hostname("lb.example.com")],
            port_errors: vec![],
            notices: Vec::new(),
        });
        assert_eq!(h[0].hostname.as_deref(), Some("lb.example.com"));
        assert_eq!(h[0].ip_mode, None);
    }

    #[test]
    fn per_port_errors_are_published() {
        let mut o = observed("192.0.2.1");
        o.port_errors.push(PortError {
            port: 53,
            protocol: Protocol::Udp,
            error: "ferry.dev/ListenerQuotaExceeded".into(),
        });
        let i = ingress_of(&o);
        let ports = i[0].ports.as_ref().unwrap();
        assert_eq!(
            ports[0].error.as_deref(),
            Some("ferry.dev/ListenerQuotaExceeded")
        );
        assert_eq!(ports[0].protocol, "UDP");
    }

    #[test]
    fn nothing_is_written_when_the_service_already_shows_it() {
        let svc = service("web").lb().port(80, 30080).build();
        let ingress = ingress_of(&observed("192.0.2.1"));
        let body = status_patch(&svc, Some(&ingress), Some(&Readiness::ready()), true)
            .expect("first write");
        // Feed the written status back: the next call writes nothing.
        let status: ServiceStatus = serde_json::from_value(body["status"].clone()).unwrap();
        let svc = with_status(
            status.load_balancer.unwrap().ingress.unwrap(),
            status.conditions.unwrap().pop(),
        );
        assert!(status_patch(&svc, Some(&ingress), Some(&Readiness::ready()), true).is_none());
        // A failure changes the condition and leaves the ingress alone.
        let failed = Readiness::failed("IPInUse", "taken");
        let body = status_patch(&svc, None, Some(&failed), true).unwrap();
        assert_eq!(body["status"]["conditions"][0]["status"], "False");
        assert!(body["status"].get("loadBalancer").is_none());
    }

    #[test]
    fn removing_ferry_from_a_service_clears_ingress_and_condition() {
        let svc = with_status(
            ingress_of(&observed("192.0.2.1")),
            Some(Condition {
                type_: READY_CONDITION.into(),
                status: "True".into(),
                reason: "LoadBalancerEnsured".into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            }),
        );
        let body = status_patch(&svc, Some(&[]), None, true).unwrap();
        assert_eq!(body["status"]["loadBalancer"], json!({ "ingress": null }));
        assert_eq!(
            body["status"]["conditions"],
            json!([{ "type": READY_CONDITION, "$patch": "delete" }])
        );
        assert!(status_patch(&service("x").build(), Some(&[]), None, true).is_none());
    }

    #[test]
    fn an_api_server_that_drops_ip_mode_is_not_written_again_and_again() {
        let sent = ingress_of(&observed("192.0.2.1"));
        let mut kept_by_server = sent.clone();
        kept_by_server[0].ip_mode = None;
        assert!(ip_mode_dropped(&sent, &kept_by_server));
        assert!(!ip_mode_dropped(&sent, &sent));
        assert!(!ip_mode_dropped(&sent, &[]), "an empty answer says nothing");
        let svc = with_status(kept_by_server.clone(), None);
        let ready = Readiness::ready();
        assert!(
            status_patch(&svc, Some(&sent), None, true).is_some(),
            "with ipMode kept, a missing mode is written"
        );
        assert!(
            status_patch(&svc, Some(&sent), None, false).is_none(),
            "with ipMode dropped, the same addresses are the same status"
        );
        assert!(
            status_patch(&svc, Some(&ingress_of(&observed("192.0.2.2"))), None, false).is_some()
        );
        assert!(status_patch(&svc, Some(&sent), Some(&ready), false).is_some());
    }
}

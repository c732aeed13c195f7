//! Small builders for test objects: `service("web").lb().port(80, 30080).build()`,
//! `node("n1").ip("10.0.0.1").build()`. Tests read as the scenario they check.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus,
    Service, ServicePort, ServiceSpec, SessionAffinityConfig, Taint,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

pub struct ServiceBuilder(Service);

pub fn service(name: &str) -> ServiceBuilder {
    ServiceBuilder(Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ip_family_policy: Some("SingleStack".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

impl ServiceBuilder {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }
    pub fn lb(mut self) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        self
    }
    pub fn class(mut self, class: &str) -> Self {
        self.spec().load_balancer_class = Some(class.into());
        self
    }
    fn push_port(mut self, protocol: &str, port: i32, node_port: i32) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: Some(format!("{}-{port}", protocol.to_lowercase())),
                protocol: Some(protocol.into()),
                port,
                node_port: (node_port != 0).then_some(node_port),
                ..ServicePort::default()
            });
        self
    }
    pub fn port(self, port: i32, node_port: i32) -> Self {
        self.push_port("TCP", port, node_port)
    }
    pub fn udp_port(self, port: i32, node_port: i32) -> Self {
        self.push_port("UDP", port, node_port)
    }
    pub fn sctp_port(self, port: i32, node_port: i32) -> Self {
        self.push_port("SCTP", port, node_port)
    }
    /// Sets the protocol of every port.
    pub fn protocol(mut self, protocol: &str) -> Self {
        for p in self.spec().ports.iter_mut().flatten() {
            p.protocol = Some(protocol.into());
        }
        self
    }
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.spec().load_balancer_ip = Some(ip.into());
        self
    }
    pub fn local(mut self, health_check_node_port: i32) -> Self {
        self.spec().external_traffic_policy = Some("Local".into());
        self.spec().health_check_node_port = Some(health_check_node_port);
        self
    }
    pub fn client_ip_affinity(mut self, timeout: i32) -> Self {
        self.spec().session_affinity = Some("ClientIP".into());
        self.spec().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(timeout),
            }),
        });
        self
    }
    pub fn source_range(mut self, cidr: &str) -> Self {
        self.spec()
            .load_balancer_source_ranges
            .get_or_insert_with(Vec::new)
            .push(cidr.into());
        self
    }
    pub fn dual_stack(mut self) -> Self {
        self.spec().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        self.spec().ip_family_policy = Some("RequireDualStack".into());
        self
    }
    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }
    /// Provisioned by the default local instance: ferry's finalizer and its record.
    pub fn finalized(self) -> Self {
        self.finalized_by(crate::class::DEFAULT_LOCAL_CLASS)
    }
    /// Provisioned by the instance serving `class`.
    pub fn finalized_by(self, class: &str) -> Self {
        self.finalized_unrecorded()
            .annotate(crate::class::PROVISIONED_BY, class)
    }
    /// ferry's finalizer without a record of who provisioned it (ferry before records).
    pub fn finalized_unrecorded(mut self) -> Self {
        self.0.metadata.finalizers = Some(vec![crate::class::FINALIZER.into()]);
        self
    }
    pub fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        self
    }
    pub fn status(mut self, status: k8s_openapi::api::core::v1::ServiceStatus) -> Self {
        self.0.status = Some(status);
        self
    }
    /// Publishes `ip` in `status.loadBalancer.ingress` with `ip_mode` (`Proxy` or `VIP`).
    pub fn ingress(mut self, ip: &str, ip_mode: &str) -> Self {
        let status = self.0.status.get_or_insert_with(Default::default);
        status
            .load_balancer
            .get_or_insert_with(Default::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: Some(ip_mode.into()),
                ..LoadBalancerIngress::default()
            });
        self
    }
    pub fn build(self) -> Service {
        self.0
    }
}

/// An EndpointSlice of Service `service` in `default`, one endpoint per `(address, node,
/// ready)`.
pub fn endpoint_slice(service: &str, endpoints: &[(&str, &str, bool)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(address, node, ready)| Endpoint {
                    addresses: vec![address.to_string()],
                    node_name: Some(node.to_string()),
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: None,
    }
}

pub struct NodeBuilder(Node);

pub fn node(name: &str) -> NodeBuilder {
    NodeBuilder(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    })
}

impl NodeBuilder {
    pub fn ip(mut self, ip: &str) -> Self {
        self.0
            .status
            .get_or_insert_with(NodeStatus::default)
            .addresses
            .get_or_insert_with(Vec::new)
            .push(NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            });
        self
    }
    pub fn provider_id(mut self, id: &str) -> Self {
        self.0
            .spec
            .get_or_insert_with(NodeSpec::default)
            .provider_id = Some(id.into());
        self
    }
    pub fn zone(self, zone: &str) -> Self {
        self.label(crate::eligibility::ZONE_LABEL, zone)
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }
    pub fn taint(mut self, key: &str) -> Self {
        self.0
            .spec
            .get_or_insert_with(NodeSpec::default)
            .taints
            .get_or_insert_with(Vec::new)
            .push(Taint {
                key: key.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
        self
    }
    pub fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        self
    }
    pub fn not_ready(mut self) -> Self {
        if let Some(c) = self.0.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            c[0].status = "False".into();
        }
        self
    }
    pub fn build(self) -> Node {
        self.0
    }
}

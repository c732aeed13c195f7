//! The AWS provider end to end: the operator as a process with `--provider aws`, against the
//! real control plane, talking through a counting, throttling proxy to moto's server, which
//! each test seeds with its own VPC, subnets, instances and Elastic IPs. What moto gets wrong
//! (see ENVIRONMENT notes in the provider's docs) is not relied on: duplicates are checked by
//! listing, not by moto refusing them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::types::{LoadBalancer, TargetDescription};
use ferry_e2e::aws::{AwsWorld, Seed};
use ferry_e2e::control_plane::{ControlPlane, shared};
use ferry_e2e::nodes::{SimulatedNode, register, simulated_node};
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::scenario::*;
use ferry_providers::aws::spec::{balancer_name, target_group_prefix};
use k8s_openapi::api::core::v1::{Event, Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const CLASS: &str = "ferry.dev/aws";
const PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// A Service port; `node_port` 0 lets the apiserver choose.
fn port(name: &str, protocol: &str, port: i32, node_port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port,
        node_port: (node_port != 0).then_some(node_port),
        ..ServicePort::default()
    }
}

fn aws_service(name: &str, ports: Vec<ServicePort>, annotations: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(CLASS.into()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Ready Nodes whose providerIDs name the given instances.
async fn aws_nodes(
    client: &Client,
    prefix: &str,
    world: &AwsWorld,
    which: std::ops::Range<usize>,
) -> Vec<SimulatedNode> {
    let nodes: Vec<SimulatedNode> = which.clone().map(|i| simulated_node(prefix, i)).collect();
    register(client, &nodes).await.unwrap();
    let api: Api<Node> = Api::all(client.clone());
    for (node, i) in nodes.iter().zip(which) {
        api.patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"providerID": world.instances[i].provider_id()}})),
        )
        .await
        .unwrap();
    }
    nodes
}

fn start_operator(cp: &ControlPlane, world: &AwsWorld, extra: &[&str]) -> OperatorProcess {
    let mut args: Vec<String> = world.operator_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    OperatorProcess::start_with_env(
        &cp.operator_kubeconfig,
        &cp.dir,
        &args,
        &world.operator_env(),
    )
    .unwrap()
}

/// The hostname and IPs a Service publishes.
fn published(svc: &Service) -> (Option<String>, Vec<String>) {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.clone())
        .unwrap_or_default();
    (
        ingress.iter().find_map(|i| i.hostname.clone()),
        ingress.iter().filter_map(|i| i.ip.clone()).collect(),
    )
}

async fn wait_for_hostname(api: &Api<Service>, name: &str) -> String {
    eventually(WAIT, &format!("hostname of Service {name}"), || async {
        published(&api.get(name).await.ok()?).0
    })
    .await
}

async fn balancer(world: &AwsWorld, svc: &Service) -> Option<LoadBalancer> {
    let name = balancer_name(&world.cluster_id, &svc.uid().unwrap());
    let found = world.balancers_named(&name).await.unwrap();
    assert!(found.len() <= 1, "two balancers named {name}");
    found.into_iter().next()
}

/// Target group name → (protocol, ARN).
async fn target_groups(world: &AwsWorld, svc: &Service) -> BTreeMap<String, (String, String)> {
    let prefix = target_group_prefix(&world.cluster_id, &svc.uid().unwrap());
    let out = world.elb.describe_target_groups().send().await.unwrap();
    out.target_groups()
        .iter()
        .filter(|t| t.target_group_name().unwrap().starts_with(&prefix))
        .map(|t| {
            (
                t.target_group_name().unwrap()[prefix.len()..].to_string(),
                (
                    t.protocol().unwrap().as_str().to_string(),
                    t.target_group_arn().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

async fn targets(world: &AwsWorld, tg_arn: &str) -> BTreeSet<(String, i32)> {
    let out = world
        .elb
        .describe_target_health()
        .target_group_arn(tg_arn)
        .send()
        .await
        .unwrap();
    out.target_health_descriptions()
        .iter()
        .map(|d| {
            let t = d.target().unwrap();
            (t.id().unwrap().to_string(), t.port().unwrap())
        })
        .collect()
}

/// Listener port → protocol.
async fn listeners(world: &AwsWorld, lb: &LoadBalancer) -> BTreeMap<i32, String> {
    let out = world
        .elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    out.listeners()
        .iter()
        .map(|l| {
            (
                l.port().unwrap(),
                l.protocol().unwrap().as_str().to_string(),
            )
        })
        .collect()
}

/// Ingress rules of the Service's security group as (protocol, port, cidr).
async fn security_rules(
    world: &AwsWorld,
    svc: &Service,
) -> Option<BTreeSet<(String, i32, String)>> {
    let name = balancer_name(&world.cluster_id, &svc.uid().unwrap());
    let out = world
        .ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values(name)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let group = out.security_groups().first()?;
    Some(
        group
            .ip_permissions()
            .iter()
            .flat_map(|p| {
                p.ip_ranges().iter().map(move |r| {
                    (
                        p.ip_protocol().unwrap().to_string(),
                        p.from_port().unwrap(),
                        r.cidr_ip().unwrap().to_string(),
                    )
                })
            })
            .collect(),
    )
}

async fn everything_gone(world: &AwsWorld, svc: &Service) -> bool {
    balancer(world, svc).await.is_none()
        && target_groups(world, svc).await.is_empty()
        && security_rules(world, svc).await.is_none()
}

fn instance_targets(world: &AwsWorld, which: &[usize], port: i32) -> BTreeSet<(String, i32)> {
    which
        .iter()
        .map(|i| (world.instances[*i].id.clone(), port))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nlb_is_created_converged_updated_in_place_and_deleted() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "aws").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "aws-life").await.unwrap();
    let world = AwsWorld::start(
        &cp.dir,
        Seed {
            instances: 4,
            eips: 0,
            internal_subnets: false,
        },
    )
    .await
    .unwrap();
    aws_nodes(&admin, "aws-life", &world, 0..3).await;
    let _operator = start_operator(cp, &world, &[]);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(
        &PostParams::default(),
        &aws_service(
            "web",
            vec![
                port("http", "TCP", 80, 31080),
                port("dns-tcp", "TCP", 53, 31053),
                port("dns-udp", "UDP", 53, 31053),
            ],
            &[("additional-resource-tags", "team=web")],
        ),
    )
    .await
    .unwrap();

    // Created: the NLB's DNS name is the Service's hostname.
    let hostname = wait_for_hostname(&svcs, "web").await;
    let svc = svcs.get("web").await.unwrap();
    let lb = balancer(&world, &svc).await.expect("a balancer");
    assert_eq!(lb.dns_name(), Some(hostname.as_str()));
    assert_eq!(lb.scheme().unwrap().as_str(), "internet-facing");
    let subnets: BTreeSet<String> = lb
        .availability_zones()
        .iter()
        .map(|z| z.subnet_id().unwrap().to_string())
        .collect();
    assert_eq!(subnets, world.public_subnets.iter().cloned().collect());
    let tags = world
        .elb
        .describe_tags()
        .resource_arns(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    let tags: BTreeMap<String, String> = tags.tag_descriptions()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(tags["ferry.dev/service-uid"], svc.uid().unwrap());
    assert_eq!(tags["ferry.dev/service-namespace"], ns);
    assert_eq!(tags["kubernetes.io/cluster/e2e"], "owned");
    assert_eq!(tags["team"], "web");

    // One target group per port number, TCP_UDP where TCP and UDP share it; every node's
    // instance at the NodePort; one listener per port.
    let groups = target_groups(&world, &svc).await;
    let kinds: Vec<(&str, &str)> = groups
        .iter()
        .map(|(k, (p, _))| (k.as_str(), p.as_str()))
        .collect();
    assert_eq!(kinds, [("53-tcpudp", "TCP_UDP"), ("80-tcp", "TCP")]);
    assert_eq!(
        targets(&world, &groups["80-tcp"].1).await,
        instance_targets(&world, &[0, 1, 2], 31080)
    );
    assert_eq!(
        targets(&world, &groups["53-tcpudp"].1).await,
        instance_targets(&world, &[0, 1, 2], 31053)
    );
    assert_eq!(
        listeners(&world, &lb).await,
        BTreeMap::from([(53, "TCP_UDP".to_string()), (80, "TCP".to_string())])
    );
    let rules = security_rules(&world, &svc)
        .await
        .expect("a security group");
    assert!(
        rules.contains(&("udp".into(), 53, "0.0.0.0/0".into())),
        "{rules:?}"
    );
    assert_eq!(rules.len(), 3, "{rules:?}");

    // Out of band: a listener deleted by hand comes back at the next reconcile, and
    // nothing else is recreated.
    let out = world
        .elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    let http = out
        .listeners()
        .iter()
        .find(|l| l.port() == Some(80))
        .unwrap();
    world
        .elb
        .delete_listener()
        .listener_arn(http.listener_arn().unwrap())
        .send()
        .await
        .unwrap();
    let mark = world.proxy.mark();
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"e2e.ferry.dev/touch": "1"}}})),
    )
    .await
    .unwrap();
    eventually(WAIT, "the deleted listener to be recreated", || async {
        listeners(&world, &lb).await.contains_key(&80).then_some(())
    })
    .await;
    let calls = world.proxy.calls_since(mark);
    assert_eq!(calls.get("CreateListener"), Some(&1), "{calls:?}");
    for never in [
        "CreateLoadBalancer",
        "CreateTargetGroup",
        "CreateSecurityGroup",
        "RegisterTargets",
    ] {
        assert_eq!(
            calls.get(never),
            None,
            "{never} after an out-of-band change: {calls:?}"
        );
    }

    // A port change moves the listener and its target group in place: same balancer.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Json::<Service>(
            serde_json::from_value(json!([
                {"op": "replace", "path": "/spec/ports/0/port", "value": 8080}
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    eventually(WAIT, "listener 8080 instead of 80", || async {
        let l = listeners(&world, &lb).await;
        (l.contains_key(&8080) && !l.contains_key(&80)).then_some(())
    })
    .await;
    eventually(WAIT, "the old target group to be deleted", || async {
        let g = target_groups(&world, &svc).await;
        (g.contains_key("8080-tcp") && !g.contains_key("80-tcp")).then_some(())
    })
    .await;
    assert_eq!(
        balancer(&world, &svc).await.unwrap().load_balancer_arn(),
        lb.load_balancer_arn(),
        "a port change must not replace the balancer"
    );
    let groups = target_groups(&world, &svc).await;
    // Let the port change settle before counting the node change's calls.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A node joins: one RegisterTargets per target group, no Describe calls.
    let mark = world.proxy.mark();
    aws_nodes(&admin, "aws-life", &world, 3..4).await;
    eventually(WAIT, "the new node's instance to be registered", || async {
        (targets(&world, &groups["8080-tcp"].1).await.len() == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = world.proxy.calls_since(mark);
    assert_eq!(
        calls,
        BTreeMap::from([("RegisterTargets".to_string(), 2)]),
        "a node joining costs one RegisterTargets per target group"
    );
    assert_eq!(
        targets(&world, &groups["53-tcpudp"].1).await,
        instance_targets(&world, &[0, 1, 2, 3], 31053)
    );

    // A node leaves: one DeregisterTargets per target group.
    let mark = world.proxy.mark();
    Api::<Node>::all(admin.clone())
        .delete("aws-life-2", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        WAIT,
        "the departed node's instance to be deregistered",
        || async {
            (targets(&world, &groups["8080-tcp"].1).await
                == instance_targets(&world, &[0, 2, 3], 31080))
            .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = world.proxy.calls_since(mark);
    assert_eq!(
        calls,
        BTreeMap::from([("DeregisterTargets".to_string(), 2)])
    );

    // Deleted: balancer, target groups and security group go, then the finalizer.
    delete_and_wait(&svcs, "web", WAIT).await;
    assert!(
        everything_gone(&world, &svc).await,
        "something was left behind"
    );
    delete_nodes(&admin, "aws-life").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policy_internal_scheme_and_elastic_ips() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "aws").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "aws-shapes").await.unwrap();
    let world = AwsWorld::start(
        &cp.dir,
        Seed {
            instances: 2,
            eips: 3,
            internal_subnets: true,
        },
    )
    .await
    .unwrap();
    aws_nodes(&admin, "aws-shapes", &world, 0..2).await;
    let _operator = start_operator(cp, &world, &[]);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    // Local traffic policy on an internal balancer.
    let mut local = aws_service(
        "local",
        vec![port("http", "TCP", 80, 31180)],
        &[("scheme", "internal")],
    );
    local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    svcs.create(&PostParams::default(), &local).await.unwrap();
    // Two addresses from the annotation, one per public subnet.
    let allocations = format!("{},{}", world.eips[0].0, world.eips[1].0);
    // Only these sources may reach it.
    let mut fixed = aws_service(
        "static",
        vec![port("http", "TCP", 80, 31181)],
        &[("eip-allocations", &allocations)],
    );
    fixed.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
    svcs.create(&PostParams::default(), &fixed).await.unwrap();
    // One address through spec.loadBalancerIP, in the one subnet named by its Name tag.
    let mut pinned = aws_service(
        "pinned",
        vec![port("http", "TCP", 80, 31182)],
        &[("subnets", "public-us-east-1a")],
    );
    pinned.spec.as_mut().unwrap().load_balancer_ip = Some(world.eips[2].1.clone());
    svcs.create(&PostParams::default(), &pinned).await.unwrap();

    wait_for_hostname(&svcs, "local").await;
    let local = svcs.get("local").await.unwrap();
    let health_port = local.spec.as_ref().unwrap().health_check_node_port.unwrap();
    let lb = balancer(&world, &local).await.unwrap();
    assert_eq!(lb.scheme().unwrap().as_str(), "internal");
    let subnets: BTreeSet<String> = lb
        .availability_zones()
        .iter()
        .map(|z| z.subnet_id().unwrap().to_string())
        .collect();
    assert_eq!(subnets, world.private_subnets.iter().cloned().collect());
    let groups = target_groups(&world, &local).await;
    let tg = world
        .elb
        .describe_target_groups()
        .target_group_arns(&groups["80-tcp"].1)
        .send()
        .await
        .unwrap();
    let tg = &tg.target_groups()[0];
    assert_eq!(tg.health_check_protocol().unwrap().as_str(), "HTTP");
    assert_eq!(tg.health_check_path(), Some("/healthz"));
    assert_eq!(
        tg.health_check_port(),
        Some(health_port.to_string().as_str())
    );

    wait_for_hostname(&svcs, "static").await;
    let fixed = svcs.get("static").await.unwrap();
    let (_, ips) = published(&fixed);
    assert_eq!(ips, [world.eips[0].1.clone(), world.eips[1].1.clone()]);
    assert_eq!(
        security_rules(&world, &fixed).await,
        Some(BTreeSet::from([(
            "tcp".to_string(),
            80,
            "203.0.113.0/24".to_string()
        )]))
    );
    // Changing the ranges changes the rules in place.
    svcs.patch(
        "static",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"loadBalancerSourceRanges": ["198.51.100.0/24"]}})),
    )
    .await
    .unwrap();
    eventually(
        WAIT,
        "the security group to follow the source ranges",
        || async {
            (security_rules(&world, &fixed).await
                == Some(BTreeSet::from([(
                    "tcp".to_string(),
                    80,
                    "198.51.100.0/24".to_string(),
                )])))
            .then_some(())
        },
    )
    .await;

    wait_for_hostname(&svcs, "pinned").await;
    let pinned = svcs.get("pinned").await.unwrap();
    assert_eq!(published(&pinned).1, [world.eips[2].1.clone()]);
    let lb = balancer(&world, &pinned).await.unwrap();
    assert_eq!(lb.availability_zones().len(), 1);
    assert_eq!(
        lb.availability_zones()[0].subnet_id(),
        Some(world.public_subnets[0].as_str())
    );

    for name in ["local", "static", "pinned"] {
        let svc = svcs.get(name).await.unwrap();
        delete_and_wait(&svcs, name, WAIT).await;
        assert!(
            everything_gone(&world, &svc).await,
            "{name} left something behind"
        );
    }
    delete_nodes(&admin, "aws-shapes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_an_event_and_a_condition_and_creates_nothing() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "aws").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "aws-bad").await.unwrap();
    let world = AwsWorld::start(
        &cp.dir,
        Seed {
            instances: 1,
            eips: 0,
            internal_subnets: false,
        },
    )
    .await
    .unwrap();
    aws_nodes(&admin, "aws-bad", &world, 0..1).await;
    let _operator = start_operator(cp, &world, &[]);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let http = || vec![port("http", "TCP", 80, 0)];
    let cases: Vec<(Service, &str, &str)> = vec![
        (
            aws_service(
                "unknown-eip",
                http(),
                &[(
                    "eip-allocations",
                    "eipalloc-0doesnotexist,eipalloc-0neither",
                )],
            ),
            "EIPNotFound",
            "eip-allocations",
        ),
        (
            aws_service("no-subnets", http(), &[("scheme", "internal")]),
            "NoSubnets",
            "kubernetes.io/role/internal-elb",
        ),
        (
            aws_service("sctp", vec![port("sctp", "SCTP", 9, 0)], &[]),
            "UnsupportedProtocol",
            "SCTP",
        ),
        (
            aws_service("malformed", http(), &[("healthcheck-interval", "often")]),
            "InvalidAnnotation",
            "aws-load-balancer-healthcheck-interval",
        ),
    ];
    for (svc, _, _) in &cases {
        svcs.create(&PostParams::default(), svc).await.unwrap();
    }
    for (svc, reason, mention) in &cases {
        let name = svc.name_any();
        let (status, got_reason, message) =
            eventually(WAIT, &format!("condition of {name}"), || async {
                ready_condition(&svcs, &name)
                    .await
                    .filter(|c| c.0 == "False")
            })
            .await;
        assert_eq!(
            (status.as_str(), got_reason.as_str()),
            ("False", *reason),
            "{name}: {message}"
        );
        assert!(message.contains(mention), "{name}: {message}");
        let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
        eventually(WAIT, &format!("a Warning Event for {name}"), || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.involved_object.name.as_deref() == Some(name.as_str())
                        && e.type_.as_deref() == Some("Warning")
                        && e.message.as_deref().is_some_and(|m| m.contains(mention))
                })
                .then_some(())
        })
        .await;
        let svc = svcs.get(&name).await.unwrap();
        assert!(
            balancer(&world, &svc).await.is_none(),
            "{name} got a balancer"
        );
        assert!(published(&svc).0.is_none(), "{name} published a hostname");
    }
    // Nothing was created for any of them, not even a security group.
    let groups = world
        .ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:ferry.dev/cluster")
                .values("e2e")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(groups.security_groups().is_empty());
    // Fixing the input fixes the Service.
    svcs.patch(
        "malformed",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {format!("{PREFIX}healthcheck-interval"): "30"}}}),
        ),
    )
    .await
    .unwrap();
    wait_for_hostname(&svcs, "malformed").await;

    for (svc, _, _) in &cases {
        delete_and_wait(&svcs, &svc.name_any(), WAIT).await;
    }
    delete_nodes(&admin, "aws-bad").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_throttling_orphans_and_drift_are_survived() {
    let _serial = serial().await;
    let cp = shared();
    let admin = cp.admin_client().await.unwrap();
    delete_nodes(&admin, "aws").await;
    sweep_class(&admin, CLASS).await;
    let ns = namespace(&admin, "aws-rough").await.unwrap();
    let world = AwsWorld::start(
        &cp.dir,
        Seed {
            instances: 2,
            eips: 0,
            internal_subnets: false,
        },
    )
    .await
    .unwrap();
    aws_nodes(&admin, "aws-rough", &world, 0..2).await;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);

    // The operator dies after AWS created the balancer but before it heard back; the next
    // operator finds that balancer by name instead of making a second one.
    let mut operator = start_operator(cp, &world, &[]);
    world
        .proxy
        .hold_next("CreateLoadBalancer", Duration::from_secs(300));
    svcs.create(
        &PostParams::default(),
        &aws_service("crash", vec![port("http", "TCP", 80, 31380)], &[]),
    )
    .await
    .unwrap();
    let uid = eventually(WAIT, "the Service's UID", || async {
        svcs.get("crash").await.ok()?.uid()
    })
    .await;
    let name = balancer_name(&world.cluster_id, &uid);
    eventually(WAIT, "AWS to create the balancer", || async {
        (!world.balancers_named(&name).await.ok()?.is_empty()).then_some(())
    })
    .await;
    operator.kill();
    let mark = world.proxy.mark();
    operator.restart().unwrap();
    wait_for_hostname(&svcs, "crash").await;
    let crash = svcs.get("crash").await.unwrap();
    assert_eq!(world.balancers_named(&name).await.unwrap().len(), 1);
    // The new operator does not reconcile before it knows the nodes: no target is taken out.
    let groups = target_groups(&world, &crash).await;
    assert_eq!(
        targets(&world, &groups["80-tcp"].1).await,
        instance_targets(&world, &[0, 1], 31380)
    );
    let calls = world.proxy.calls_since(mark);
    assert_eq!(calls.get("DeregisterTargets"), None, "{calls:?}");
    assert_eq!(calls.get("CreateLoadBalancer"), None, "{calls:?}");

    // Throttling on every third call: the Service still gets its balancer.
    world.proxy.throttle_every(3);
    svcs.create(
        &PostParams::default(),
        &aws_service(
            "busy",
            vec![
                port("http", "TCP", 80, 31381),
                port("https", "TCP", 443, 31382),
            ],
            &[],
        ),
    )
    .await
    .unwrap();
    wait_for_hostname(&svcs, "busy").await;
    world.proxy.throttle_every(0);
    assert!(world.proxy.throttled() > 0);
    assert_eq!(
        ready_condition(&svcs, "busy").await.map(|c| c.0),
        Some("True".to_string())
    );
    let metrics = metrics_text(operator.metrics_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_aws_api_calls_total{")
                && l.contains("outcome=\"throttled\"")),
        "throttled calls are counted:\n{metrics}"
    );
    let busy = svcs.get("busy").await.unwrap();

    // The operator is down while "crash" loses its finalizer and is deleted: orphan
    // collection deletes its balancer, target groups and security group, and leaves
    // "busy" alone. The short resync also repairs drift on "busy".
    operator.kill();
    svcs.patch(
        "crash",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    svcs.delete("crash", &DeleteParams::default())
        .await
        .unwrap();
    let busy_lb = balancer(&world, &busy).await.unwrap();
    let groups = target_groups(&world, &busy).await;
    world
        .elb
        .deregister_targets()
        .target_group_arn(&groups["443-tcp"].1)
        .targets(
            TargetDescription::builder()
                .id(&world.instances[0].id)
                .port(31382)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let restarted = world.proxy.mark();
    let _operator = start_operator(
        cp,
        &world,
        &["--orphan-interval", "2s", "--resync-period", "2s"],
    );
    eventually(WAIT, "the orphaned balancer to be collected", || async {
        everything_gone(&world, &crash).await.then_some(())
    })
    .await;
    eventually(
        WAIT,
        "the deregistered target to be registered again",
        || async {
            (targets(&world, &groups["443-tcp"].1).await
                == instance_targets(&world, &[0, 1], 31382))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        balancer(&world, &busy).await.unwrap().load_balancer_arn(),
        busy_lb.load_balancer_arn()
    );
    // Starting with balancers and nodes in place never takes a live target out.
    let calls = world.proxy.calls_since(restarted);
    assert_eq!(calls.get("DeregisterTargets"), None, "{calls:?}");

    delete_and_wait(&svcs, "busy", WAIT).await;
    assert!(everything_gone(&world, &busy).await);
    delete_nodes(&admin, "aws-rough").await;
}

/// A target group as an interrupted ensure or delete leaves it: ferry's name and tags for
/// the Service `uid` of the cluster `cluster_uid`, and no balancer.
async fn stray_target_group(world: &AwsWorld, cluster_uid: &str, uid: &str) -> String {
    use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Tag};
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let out = world
        .elb
        .create_target_group()
        .name(format!(
            "{}80-tcp",
            target_group_prefix(&world.cluster_id, uid)
        ))
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .vpc_id(&world.vpc)
        .tags(tag("ferry.dev/cluster", &world.cluster_id))
        .tags(tag("ferry.dev/cluster-uid", cluster_uid))
        .tags(tag("ferry.dev/service-namespace", "gone"))
        .tags(tag("ferry.dev/service-name", "gone"))
        .tags(tag("ferry.dev/service-uid", uid))
        .send()
        .await
        .unwrap();
    out.target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_string()
}

async fn target_group_exists(world: &AwsWorld, arn: &str) -> bool {
    let out = world.elb.describe_target_groups().send().await.unwrap();
    out.target_groups()
        .iter()
        .any(|t| t.target_group_arn() == Some(arn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_with_one_cluster_id_never_collect_each_others_balancers() {
    let _serial = serial().await;
    let here = shared();
    let there = ferry_e2e::control_plane::start_in_keeper_thread(Default::default());
    let admin_here = here.admin_client().await.unwrap();
    let admin_there = there.admin_client().await.unwrap();
    delete_nodes(&admin_here, "twin").await;
    sweep_class(&admin_here, CLASS).await;
    // One account, one --cluster-id ("e2e"), copied to both clusters.
    let world = AwsWorld::start(
        &here.dir,
        Seed {
            instances: 2,
            eips: 0,
            internal_subnets: false,
        },
    )
    .await
    .unwrap();
    aws_nodes(&admin_here, "twin", &world, 0..2).await;
    aws_nodes(&admin_there, "twin", &world, 0..2).await;
    let fast = ["--orphan-interval", "2s"];
    let mut op_here = start_operator(here, &world, &fast);
    let mut op_there = start_operator(&there, &world, &fast);
    let ns_here = namespace(&admin_here, "twin").await.unwrap();
    let ns_there = namespace(&admin_there, "twin").await.unwrap();
    let svcs_here: Api<Service> = Api::namespaced(admin_here.clone(), &ns_here);
    let svcs_there: Api<Service> = Api::namespaced(admin_there.clone(), &ns_there);
    for svcs in [&svcs_here, &svcs_there] {
        svcs.create(
            &PostParams::default(),
            &aws_service("web", vec![port("http", "TCP", 80, 31480)], &[]),
        )
        .await
        .unwrap();
    }
    wait_for_hostname(&svcs_here, "web").await;
    wait_for_hostname(&svcs_there, "web").await;
    let web_here = svcs_here.get("web").await.unwrap();
    let web_there = svcs_there.get("web").await.unwrap();

    // Leftovers of each cluster: each collects its own, and only its own.
    let uid_here = cluster_identity(&admin_here, "e2e").await.unwrap().uid;
    let uid_there = cluster_identity(&admin_there, "e2e").await.unwrap().uid;
    assert_ne!(uid_here, uid_there);
    let stray_here = stray_target_group(&world, &uid_here, "uid-gone-here").await;
    let stray_there = stray_target_group(&world, &uid_there, "uid-gone-there").await;
    eventually(
        WAIT,
        "each cluster to collect its own stray target group",
        || async {
            (!target_group_exists(&world, &stray_here).await
                && !target_group_exists(&world, &stray_there).await)
                .then_some(())
        },
    )
    .await;

    // Several orphan periods later, neither has lost its balancer to the other.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        balancer(&world, &web_here).await.is_some(),
        "this cluster's balancer"
    );
    assert!(
        balancer(&world, &web_there).await.is_some(),
        "the other cluster's balancer"
    );
    for svcs in [&svcs_here, &svcs_there] {
        assert_eq!(
            ready_condition(svcs, "web").await.map(|c| c.0),
            Some("True".to_string())
        );
    }
    // Each sees the other's resources, warns, and counts them.
    for op in [&op_here, &op_there] {
        let metrics = metrics_text(op.metrics_addr).await;
        let foreign = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ferry_foreign_resources "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0);
        assert!(
            foreign >= 2,
            "the other's balancer and security group at least:\n{metrics}"
        );
        assert!(op.log_text().contains("not its identity"));
    }

    delete_and_wait(&svcs_here, "web", WAIT).await;
    delete_and_wait(&svcs_there, "web", WAIT).await;
    assert!(everything_gone(&world, &web_here).await);
    assert!(everything_gone(&world, &web_there).await);
    op_here.terminate();
    op_there.terminate();
    delete_nodes(&admin_here, "twin").await;
}

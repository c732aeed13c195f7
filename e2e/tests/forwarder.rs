//! The forwarder on a real network: three node namespaces and a client on a bridge, the real
//! control plane and operator, one `ferry-forwarder` per node (as a process inside its
//! namespace, under the forwarders' RBAC) and NodePort backends that answer with their node's
//! name and the client address they saw. The two data-plane tests serve NodePorts as
//! kube-proxy does (NAT rules to a pod address; nothing listens on the NodePort), the others
//! with the backend listening on the NodePort itself. Traffic goes from the client namespace
//! to the VIP; ownership is checked with `ip addr` in every node and `arping` from the client.
//!
//! Needs root. Everything created is removed at the end, also when a test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use ferry_e2e::cluster::*;
use ferry_e2e::forwarder::NodePorts;
use ferry_e2e::nodes::register;
use ferry_e2e::scenario::*;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// What both data planes must do: answer, spread, UDP, TCP and UDP on one port, affinity,
/// exactly one owner, Local only where endpoints are, and withdrawal on delete.
async fn serves_traffic(c: &Cluster, kernel: bool) {
    let web = c.http_service("web", 30080, json!({})).await;
    c.wait_for_single_owner(&web).await;
    let body = c.wait_for_traffic(&web, 80).await;
    assert!(NODES.contains(&body_node(&body).as_str()), "{body}");
    let nodes = c.spread(&web, 80, 30);
    assert_eq!(nodes.len(), 3, "requests reached {nodes:?}");
    // A client on the node holding the VIP (its packets take the output hook, and leave
    // again for the other nodes) is spread the same.
    let owner = c.wait_for_single_owner(&web).await;
    let nodes = c.spread_from_node(&owner, &web, 80, 30);
    assert_eq!(nodes.len(), 3, "requests from {owner} reached {nodes:?}");

    let dns = c
        .service(
            "dns",
            json!({ "type": "LoadBalancer", "ports": [
                { "name": "dns-udp", "port": 53, "nodePort": 30053, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "nodePort": 30053, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await;
    c.wait_for_single_owner(&dns).await;
    let reply = eventually(WAIT, "a UDP answer", || async { c.udp(&dns, 53).ok() }).await;
    assert!(NODES.contains(&body_node(&reply).as_str()), "{reply}");
    c.wait_for_traffic(&dns, 53).await;

    let sticky = c
        .service(
            "sticky",
            json!({ "type": "LoadBalancer", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 2 } }, "ports": [
                { "name": "http", "port": 80, "nodePort": 30081, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await;
    c.wait_for_single_owner(&sticky).await;
    c.wait_for_traffic(&sticky, 80).await;
    let stuck = c.spread(&sticky, 80, 12);
    assert_eq!(stuck.len(), 1, "ClientIP affinity spread over {stuck:?}");
    // A client quiet for longer than the timeout is spread anew.
    let mut seen = stuck.clone();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        seen.extend(c.spread(&sticky, 80, 1));
        if seen.len() > 1 {
            break;
        }
    }
    assert!(
        seen.len() > 1,
        "still stuck to {seen:?} after the affinity timeout"
    );

    // A sticky client stays with its backend when the owner's data plane changes for another
    // port of the Service (kernel mode replaces the node's table, and carries the recent
    // clients over; a new table's round robin would start again at the first backend).
    delete_and_wait(&c.svcs, "sticky", WAIT).await;
    let http = json!({ "name": "http", "port": 80, "nodePort": 30081, "protocol": "TCP" });
    let long = c
        .service(
            "sticky-long",
            json!({ "type": "LoadBalancer", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 600 } },
                    "ports": [http] }),
            json!({}),
        )
        .await;
    c.wait_for_single_owner(&long).await;
    // The client's own address is the first new client and takes the first backend; a
    // second address of the client's is the next, and is spread to the next backend.
    c.wait_for_traffic(&long, 80).await;
    let second = "10.213.0.101";
    c.topo
        .client
        .ns()
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"])
        .unwrap();
    let stuck = body_node(&c.get_from(second, &long, 80).unwrap());
    c.svcs
        .patch(
            "sticky-long",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "ports": [http,
                { "name": "udp", "port": 81, "nodePort": 30054, "protocol": "UDP" }] } })),
        )
        .await
        .unwrap();
    eventually(WAIT, "the added port served", || async {
        c.udp(&long, 81).ok()
    })
    .await;
    for _ in 0..5 {
        let body = c.get_from(second, &long, 80).unwrap();
        assert_eq!(
            body_node(&body),
            stuck,
            "affinity lost when the data plane changed"
        );
    }

    // Local: only fwd-node-2 has endpoints, so only it may hold the VIP, and only it serves.
    c.endpoints_on("local", "fwd-node-2").await;
    let annotations = if kernel {
        json!({})
    } else {
        // The userspace path keeps the client's address through PROXY protocol v2.
        json!({ "ferry.dev/proxy-protocol": "v2" })
    };
    let local = c
        .service(
            "local",
            json!({ "type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": HEALTH_PORT, "ports": [
                { "name": "http", "port": 8080, "nodePort": 30090, "protocol": "TCP" } ] }),
            annotations,
        )
        .await;
    assert_eq!(c.wait_for_single_owner(&local).await, "fwd-node-2");
    c.wait_for_traffic(&local, 8080).await;
    for _ in 0..5 {
        let body = c.get(&local, 8080, "/").unwrap();
        assert_eq!(body_node(&body), "fwd-node-2");
        assert_eq!(
            body_client(&body),
            c.topo.client.ip.to_string(),
            "client address kept"
        );
    }

    // Deleting a Service withdraws its VIP everywhere.
    delete_and_wait(&c.svcs, "web", WAIT).await;
    eventually(WAIT, "the VIP withdrawn", || async {
        c.holders(&web).is_empty().then_some(())
    })
    .await;
    assert!(c.topo.arp_owners(&web).unwrap().is_empty());
    assert!(c.get(&web, 80, "/").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_mode_serves_a_vip_from_one_node() {
    let _serial = serial().await;
    let c = Cluster::start("kernel", NodePorts::KubeProxy, &["--mode", "kernel"]).await;
    serves_traffic(&c, true).await;
    let log = c.forwarder("fwd-node-1").log_text();
    assert!(log.contains("data plane: kernel"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_mode_serves_a_vip_from_one_node() {
    let _serial = serial().await;
    let c = Cluster::start("userspace", NodePorts::KubeProxy, &["--mode", "userspace"]).await;
    serves_traffic(&c, false).await;

    // With ipMode VIP the forwarder only announces (kube-proxy would forward): one node holds
    // the address, and nothing of ferry's listens on it.
    let announced = c
        .http_service("announced", 30091, json!({ "ferry.dev/ip-mode": "VIP" }))
        .await;
    c.wait_for_single_owner(&announced).await;
    assert!(
        c.get(&announced, 80, "/").is_err(),
        "VIP mode must not be forwarded"
    );
    delete_and_wait(&c.svcs, "announced", WAIT).await;

    // An address no pool holds any more is left alone, with a log line.
    let orphan = c.http_service("orphan", 30091, json!({})).await;
    let owner = c.wait_for_single_owner(&orphan).await;
    delete_pools(&c.admin).await;
    eventually(WAIT, "the out-of-pool VIP withdrawn", || async {
        c.holders(&orphan).is_empty().then_some(())
    })
    .await;
    let log = c.forwarder(&owner).log_text();
    assert!(
        log.contains("is in no local LoadBalancerPool; ignored"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_vip_is_announced_by_neighbour_advertisement_and_moves() {
    let _serial = serial().await;
    // Kernel mode, and the Nodes have IPv4 addresses only: NAT cannot take an IPv6 VIP to
    // them, so the forwarder's userspace side serves it.
    let mut c = Cluster::start("ipv6", NodePorts::Listening, &["--mode", "kernel"]).await;
    c.add_ipv6_pool().await;
    let vip = c.ipv6_http_service("web6", 30080).await;
    assert!(vip.starts_with("fd00:213::"), "{vip}");
    let owner = c.wait_for_one_holder(&vip).await;
    let url_host = format!("[{vip}]");
    let body = c.wait_for_traffic(&url_host, 80).await;
    assert!(NODES.contains(&body_node(&body).as_str()), "{body}");
    let mac_of = |node: &str| c.topo.nodes[c.node_index(node)].mac.to_lowercase();
    assert_eq!(
        c.topo.client_neighbour(&vip),
        Some(mac_of(&owner)),
        "the client reached the owner"
    );

    // The owner's node fails (cut from the switch). Its successor's unsolicited neighbour
    // advertisement rewrites the client's neighbour entry before the client sends anything
    // again: neighbour unreachability detection alone would need traffic and seconds.
    let i = c.node_index(&owner);
    let owner_mac = mac_of(&owner);
    c.forwarders[i].as_mut().unwrap().kill();
    c.backends[i].as_mut().unwrap().kill();
    drop(c.topo.unplug(i).unwrap());
    let successor = c.wait_for_one_holder(&vip).await;
    let successor_mac = c.topo.nodes[c.node_index(&successor)].mac.to_lowercase();
    assert_ne!(successor_mac, owner_mac);
    eventually(
        Duration::from_secs(5),
        "the client's neighbour entry pointing at the successor",
        || async { (c.topo.client_neighbour(&vip) == Some(successor_mac.clone())).then_some(()) },
    )
    .await;
    c.wait_for_traffic(&url_host, 80).await;

    // Deleting the Service withdraws the IPv6 VIP everywhere.
    delete_and_wait(&c.svcs, "web6", WAIT).await;
    eventually(WAIT, "the IPv6 VIP withdrawn", || async {
        c.holders(&vip).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_mode_nats_an_ipv6_vip_to_dual_stack_nodes_and_relays_it_without_forwarding() {
    let _serial = serial().await;
    let c = Cluster::start("dualstack", NodePorts::Listening, &["--mode", "kernel"]).await;
    c.add_ipv6_pool().await;
    register(&c.admin, &c.topo.dual_stack_nodes())
        .await
        .unwrap();
    let table = |node: &str| {
        c.topo.nodes[c.node_index(node)]
            .ns()
            .exec("nft", &["list", "table", "inet", "ferry"])
            .unwrap_or_default()
    };

    // The nodes have IPv6 InternalIPs and forward IPv6: nftables takes the VIP to all three.
    let vip = c.ipv6_http_service("web6", 30080).await;
    let owner = c.wait_for_one_holder(&vip).await;
    let host = format!("[{vip}]");
    c.wait_for_traffic(&host, 80).await;
    let nodes = c.spread(&host, 80, 30);
    assert_eq!(nodes.len(), 3, "requests reached {nodes:?}");
    assert!(table(&owner).contains(&vip), "{}", table(&owner));

    // Without IPv6 forwarding NAT could reach only the owner's own NodePort; a VIP created
    // then is relayed by the owner's userspace side, and still reaches every node.
    for node in &c.topo.nodes {
        node.ns()
            .sysctl("net.ipv6.conf.all.forwarding", "0")
            .unwrap();
    }
    let relayed = c.ipv6_http_service("relayed6", 30081).await;
    let owner = c.wait_for_one_holder(&relayed).await;
    let host = format!("[{relayed}]");
    c.wait_for_traffic(&host, 80).await;
    let nodes = c.spread(&host, 80, 30);
    assert_eq!(nodes.len(), 3, "requests reached {nodes:?}");
    assert!(!table(&owner).contains(&relayed), "{}", table(&owner));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vip_moves_when_its_owner_fails() {
    let _serial = serial().await;
    let mut c = Cluster::start("failover", NodePorts::Listening, &[]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    let first = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;

    // Stopped as Kubernetes stops it (SIGTERM), the owner withdraws its VIP and releases its
    // Lease: another node takes over without waiting for the Lease to expire.
    let i = c.node_index(&first);
    let stopping = Instant::now();
    let status = c.forwarders[i].as_mut().unwrap().terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}"
    );
    assert!(
        !c.holders(&web).contains(&first),
        "the stopped owner still holds the VIP"
    );
    let stand_in = c.wait_for_single_owner(&web).await;
    assert_ne!(stand_in, first);
    c.wait_for_traffic(&web, 80).await;
    eprintln!(
        "owner stopped: traffic again after {:?}",
        stopping.elapsed()
    );
    c.forwarders[i].as_mut().unwrap().restart().unwrap();
    assert_eq!(c.wait_for_single_owner(&web).await, first);

    // The owner's forwarder is killed (no withdrawal, no Lease release).
    let killed = Instant::now();
    c.forwarders[i].as_mut().unwrap().kill();
    let second = eventually(WAIT, "another node holding the VIP", || async {
        let h = c.holders(&web);
        let others: Vec<String> = h.into_iter().filter(|n| *n != first).collect();
        (others.len() == 1).then(|| others[0].clone())
    })
    .await;
    eventually(WAIT, "traffic after the forwarder was killed", || async {
        let arp = c.topo.arp_owners(&web).ok()?;
        (arp.contains(&second) && c.get(&web, 80, "/").is_ok()).then_some(())
    })
    .await;
    eprintln!(
        "forwarder killed: traffic again after {:?}",
        killed.elapsed()
    );

    // Restarted (as its DaemonSet would), the forwarder takes its VIP back and the stand-in
    // lets go: one owner again.
    c.forwarders[i].as_mut().unwrap().restart().unwrap();
    let back = c.wait_for_single_owner(&web).await;
    assert_eq!(
        back, first,
        "rendezvous hashing gives the VIP back to its first owner"
    );
    c.wait_for_traffic(&web, 80).await;

    // The owner's whole node goes away: cut from the switch, its processes gone.
    let unplugged = Instant::now();
    c.forwarders[i].as_mut().unwrap().kill();
    c.backends[i].as_mut().unwrap().kill();
    drop(c.topo.unplug(i).unwrap());
    eventually(WAIT, "traffic after the node was unplugged", || async {
        c.get(&web, 80, "/").ok()
    })
    .await;
    let recovered = unplugged.elapsed();
    let third = c.wait_for_single_owner(&web).await;
    assert_ne!(third, first);
    eprintln!("node unplugged: traffic again after {recovered:?} (now on {third})");
}

/// Opens `n` connections from the client to each of `targets`, each answered once, and holds
/// them until `release` is dropped; reports how many were answered through `opened`.
fn hold_connections(
    c: &Cluster,
    targets: Vec<SocketAddr>,
    n: usize,
    opened: std::sync::mpsc::Sender<usize>,
    release: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<anyhow::Result<usize>> {
    c.topo
        .client
        .ns()
        .spawn(move || {
            let _ = ferry_forwarder::raise_open_files_limit();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
                let mut tasks = tokio::task::JoinSet::new();
                for target in targets.iter().flat_map(|t| std::iter::repeat_n(*t, n)) {
                    let permit = limit.clone().acquire_owned().await?;
                    tasks.spawn(async move {
                        let mut s = tokio::time::timeout(
                            Duration::from_secs(10),
                            tokio::net::TcpStream::connect(target),
                        )
                        .await??;
                        s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n").await?;
                        let mut buf = [0u8; 512];
                        let mut got = 0;
                        while got < 20 || !buf[..got].ends_with(b"\n") {
                            let n = tokio::time::timeout(
                                Duration::from_secs(10),
                                s.read(&mut buf[got..]),
                            )
                            .await??;
                            if n == 0 {
                                anyhow::bail!("closed before an answer");
                            }
                            got += n;
                        }
                        drop(permit);
                        anyhow::Ok(s)
                    });
                }
                let mut streams = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    if let Ok(Ok(s)) = r {
                        streams.push(s);
                    }
                }
                let answered = streams.len();
                let _ = opened.send(answered);
                let _ = release.recv();
                drop(streams);
                Ok(answered)
            })
        })
        .unwrap()
}

/// 10,000 concurrent connections through the userspace path. One process here may hold at
/// most 20,000 descriptors (the hard limit, which needs CAP_SYS_RESOURCE to raise), and a
/// relayed connection costs a forwarder two, so the load goes to two VIPs owned by two nodes:
/// 5,000 connections each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_holds_ten_thousand_connections_in_bounded_memory() {
    let _serial = serial().await;
    let _ = ferry_forwarder::raise_open_files_limit();
    let c = Cluster::start("load", NodePorts::Listening, &["--mode", "userspace"]).await;
    let mut vips: Vec<(String, String)> = Vec::new();
    for (i, node_port) in TCP_PORTS.iter().enumerate() {
        let ip = c
            .http_service(&format!("web{i}"), *node_port, json!({}))
            .await;
        let owner = c.wait_for_single_owner(&ip).await;
        if vips.iter().all(|(_, o)| *o != owner) {
            vips.push((ip, owner));
        }
        if vips.len() == 2 {
            break;
        }
    }
    assert_eq!(vips.len(), 2, "two VIPs on two nodes: {vips:?}");
    for (ip, _) in &vips {
        c.wait_for_traffic(ip, 80).await;
    }
    let before: Vec<u64> = vips
        .iter()
        .map(|(_, o)| c.forwarder(o).rss_kib().unwrap())
        .collect();

    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let targets = vips
        .iter()
        .map(|(ip, _)| format!("{ip}:80").parse().unwrap())
        .collect();
    let holder = hold_connections(&c, targets, 5_000, opened_tx, release_rx);
    let answered =
        tokio::task::spawn_blocking(move || opened_rx.recv_timeout(Duration::from_secs(180)))
            .await
            .unwrap()
            .expect("the client never finished opening connections");
    let mut active = 0.0;
    let mut grown = Vec::new();
    for (i, (_, owner)) in vips.iter().enumerate() {
        let f = c.forwarder(owner);
        active += f
            .metric_values("ferry_forwarder_active_connections{")
            .iter()
            .sum::<f64>();
        grown.push(f.rss_kib().unwrap().saturating_sub(before[i]));
    }
    drop(release_tx);
    holder.join().unwrap().unwrap();
    eprintln!(
        "10,000 connections: {answered} answered, {active} active in the forwarders, RSS before {before:?} KiB, growth {grown:?} KiB"
    );
    assert_eq!(answered, 10_000);
    assert!(active >= 9_900.0, "the forwarders relayed {active}");
    // Idle connections hold no buffers: well under 10 KiB each.
    for g in &grown {
        assert!(*g < 50 * 1024, "RSS grew by {g} KiB for 5,000 connections");
    }
    for (_, owner) in &vips {
        eventually(WAIT, "connections closed in the forwarder", || async {
            let values = c
                .forwarder(owner)
                .metric_values("ferry_forwarder_active_connections{");
            (!values.is_empty() && values.iter().all(|v| *v == 0.0)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_bounds_time_and_flows_and_isolates_backend_failures() {
    let _serial = serial().await;
    let mut c = Cluster::start(
        "limits",
        NodePorts::Listening,
        &[
            "--mode",
            "userspace",
            "--idle-timeout",
            "2s",
            "--half-close-timeout",
            "2s",
            "--udp-max-flows",
            "300",
            "--udp-idle-timeout",
            "3s",
        ],
    )
    .await;
    let web = c
        .service(
            "web",
            json!({ "type": "LoadBalancer", "ports": [
                { "name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP" },
                { "name": "dns", "port": 54, "nodePort": 30054, "protocol": "UDP" } ] }),
            json!({}),
        )
        .await;
    let owner = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;
    let target: SocketAddr = format!("{web}:80").parse().unwrap();

    // An idle connection is closed after the idle timeout.
    let idle_closed = c
        .topo
        .client
        .ns()
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let started = Instant::now();
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf)?;
            Ok((n, started.elapsed()))
        })
        .unwrap();
    assert_eq!(idle_closed.0, 0);
    assert!(
        idle_closed.1 >= Duration::from_millis(1500) && idle_closed.1 < Duration::from_secs(8),
        "idle connection closed after {:?}",
        idle_closed.1
    );

    // A half-closed connection whose backend never finishes is closed after the half-close
    // timeout.
    let half_closed = c
        .topo
        .client
        .ns()
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /hold HTTP/1.1\r\nHost: vip\r\n\r\n")?;
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let started = Instant::now();
            while s.read(&mut buf)? > 0 {}
            Ok(started.elapsed())
        })
        .unwrap();
    assert!(
        half_closed < Duration::from_secs(8),
        "half-closed for {half_closed:?}"
    );

    // A UDP flood from many source ports keeps the flow table within its bound.
    let udp_target: SocketAddr = format!("{web}:54").parse().unwrap();
    c.topo
        .client
        .ns()
        .enter(move || {
            // Paced, so the kernel's receive queue does not drop datagrams before the
            // forwarder sees them: the test is about the flow table.
            for i in 0..2000 {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.send_to(b"flood", udp_target)?;
                if i % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Ok(())
        })
        .unwrap();
    let namespace = c.namespace.clone();
    let series = |name: &str| format!("{name}{{namespace=\"{namespace}\",service=\"web\"}}");
    // Counted once the figures stop moving (a few datagrams may be lost in the kernel's
    // queue before the forwarder reads them; a debug build opens flows slowly).
    let mut last = (-1.0, -1.0);
    let (flows, evicted) = eventually(WAIT, "the flood counted", || {
        let now = {
            let f = c.forwarder(&owner);
            (
                f.metric(&series("ferry_forwarder_udp_flows"))
                    .unwrap_or(0.0),
                f.metric(&series("ferry_forwarder_udp_flows_evicted_total"))
                    .unwrap_or(0.0),
            )
        };
        let settled = now == last && now.0 + now.1 >= 1000.0;
        last = now;
        async move {
            if settled {
                return Some(now);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    })
    .await;
    assert!(evicted > 0.0, "no idle flow made room at the bound");
    eprintln!("UDP flood of 2000 flows: {flows} in the table, {evicted} evicted");
    assert!(flows <= 300.0, "{flows} flows for a bound of 300");
    // The table is full of the flood's idle flows, and a new client is still served: the
    // most idle flow makes room for it.
    eventually(WAIT, "a new client answered at the bound", || async {
        c.udp(&web, 54).ok()
    })
    .await;
    // Quiet flows leave the table after the UDP idle timeout.
    eventually(WAIT, "idle UDP flows expired", || async {
        let flows = c
            .forwarder(&owner)
            .metric(&series("ferry_forwarder_udp_flows"))?;
        (flows == 0.0).then_some(())
    })
    .await;

    // A backend that dies mid-stream ends only its own connections.
    let streams = c
        .topo
        .client
        .ns()
        .enter(move || {
            let mut out = Vec::new();
            for _ in 0..6 {
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"GET /stream HTTP/1.1\r\nHost: vip\r\n\r\n")?;
                // The head may come before the first line naming the node.
                let mut text = String::new();
                let node = loop {
                    let mut buf = [0u8; 256];
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Err(std::io::Error::other("stream closed at once"));
                    }
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if let Some(node) = NODES.iter().find(|n| text.contains(*n)) {
                        break node.to_string();
                    }
                };
                out.push((node, s));
            }
            Ok(out)
        })
        .unwrap();
    let victim = streams[0].0.clone();
    let vi = c.node_index(&victim);
    c.backends[vi].as_mut().unwrap().kill();
    let results = tokio::task::spawn_blocking(move || {
        streams
            .into_iter()
            .map(|(node, mut s)| {
                // Drain what is buffered, then see whether the stream still flows.
                let deadline = Instant::now() + Duration::from_millis(1500);
                let mut buf = [0u8; 4096];
                let mut alive = true;
                while Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            alive = false;
                            break;
                        }
                        Ok(_) => {}
                    }
                }
                (node, alive)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(results.iter().any(|(n, _)| *n != victim), "{results:?}");
    for (node, alive) in &results {
        assert_eq!(
            *alive,
            *node != victim,
            "stream via {node}: alive={alive} ({results:?})"
        );
    }
}

/// A foreign address inside the pool, on every node (another program's VIP, a keepalived
/// API-server address, say): ferry must leave it alone.
const FOREIGN: &str = "10.213.0.207";

async fn exposes_only_its_services(mode: &str) {
    // The forwarder's own metrics and a host daemon listen on every address of the node.
    let mut c = Cluster::start(
        &format!("exposure-{mode}"),
        NodePorts::Listening,
        &["--mode", mode, "--metrics-addr", "0.0.0.0:9470"],
    )
    .await;
    let mut daemons = Vec::new();
    for host in &c.topo.nodes {
        host.ns()
            .ip(&["addr", "add", &format!("{FOREIGN}/32"), "dev", "eth0"])
            .unwrap();
        daemons.push(
            ferry_e2e::forwarder::start_backend(
                &c.cp.dir,
                host.ns(),
                &format!("{}-sshd", host.name),
                &[2222],
                &[],
                None,
                NodePorts::Listening,
            )
            .unwrap(),
        );
    }
    let web = c.http_service("web", 30080, json!({})).await;
    let owner = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;
    let owner_ip = c.topo.nodes[c.node_index(&owner)].ip.to_string();
    // The host daemon answers on the node's address...
    eventually(WAIT, "the host daemon on the node's address", || async {
        c.get(&owner_ip, 2222, "/").ok()
    })
    .await;
    // ...but neither it nor ferry's metrics answer on the VIP; the Service does.
    assert!(c.get(&web, 80, "/").is_ok());
    assert!(
        c.get(&web, 2222, "/").is_err(),
        "a host daemon answered on the VIP"
    );
    assert!(
        c.get(&web, 9470, "/metrics").is_err(),
        "ferry's metrics answered on the VIP"
    );
    // VIPs come and go, and the resync passes: the foreign address stays on every node.
    let other = c.http_service("other", 30081, json!({})).await;
    c.wait_for_single_owner(&other).await;
    delete_and_wait(&c.svcs, "other", WAIT).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    for host in &c.topo.nodes {
        let addrs = host.ns().addresses("eth0").unwrap();
        assert!(
            addrs.contains(&format!(" {FOREIGN}/32")),
            "{} lost another program's address:\n{addrs}",
            host.name
        );
    }
    assert_eq!(c.wait_for_single_owner(&web).await, owner);
    for mut d in daemons {
        d.kill();
    }
    delete_and_wait(&c.svcs, "web", WAIT).await;
    c.backends.iter_mut().flatten().for_each(|b| b.kill());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_exposes_only_its_services_and_leaves_other_addresses_alone_in_kernel_mode() {
    let _serial = serial().await;
    exposes_only_its_services("kernel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_exposes_only_its_services_and_leaves_other_addresses_alone_in_userspace_mode() {
    let _serial = serial().await;
    exposes_only_its_services("userspace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_node_ports_is_served_at_its_endpoints() {
    let _serial = serial().await;
    let c = Cluster::start("no-nodeports", NodePorts::Listening, &[]).await;
    // No NodePorts: the forwarder sends VIP traffic straight to the ready endpoints. The
    // "pod" is node 2's backend, listening on 30090 on every address of its node.
    let endpoint = c.topo.nodes[1].ip.to_string();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": { "name": "direct-1", "labels": { "kubernetes.io/service-name": "direct" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [endpoint], "nodeName": "fwd-node-2", "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 30090, "protocol": "TCP" }],
    }))
    .unwrap();
    kube::Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
        c.admin.clone(),
        &c.namespace,
    )
    .create(&Default::default(), &slice)
    .await
    .unwrap();
    let vip = c
        .service(
            "direct",
            json!({ "type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                    "ports": [ { "name": "http", "port": 80, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await;
    c.wait_for_single_owner(&vip).await;
    let body = c.wait_for_traffic(&vip, 80).await;
    assert_eq!(body_node(&body), "fwd-node-2", "{body}");
    assert_eq!(c.spread(&vip, 80, 10).len(), 1, "only the endpoint's node");
    delete_and_wait(&c.svcs, "direct", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_that_cannot_be_served_on_its_node_goes_to_another_and_says_why() {
    let _serial = serial().await;
    let c = Cluster::start("clash", NodePorts::Listening, &["--mode", "userspace"]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    c.wait_for_traffic(&web, 80).await;
    // The node rendezvous hashing would pick for this VIP has a host daemon on the
    // Service's port: the listener cannot bind there.
    let vip = "10.213.0.205";
    let chosen = ferry_model::announce::owner(&vip.parse().unwrap(), NODES)
        .unwrap()
        .to_string();
    let host = &c.topo.nodes[c.node_index(&chosen)];
    let mut daemon = ferry_e2e::forwarder::start_backend(
        &c.cp.dir,
        host.ns(),
        &format!("{chosen}-daemon"),
        &[2222],
        &[],
        None,
        NodePorts::Listening,
    )
    .unwrap();
    eventually(WAIT, "the host daemon to listen", || async {
        c.get(&host.ip.to_string(), 2222, "/").ok()
    })
    .await;
    let clash = c
        .service(
            "clash",
            json!({ "type": "LoadBalancer", "loadBalancerIP": vip,
                    "ports": [ { "name": "ssh", "port": 2222, "nodePort": 30090, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await;
    assert_eq!(clash, vip);
    // Another node announces it and forwards it; the Service is told.
    let holder = c.wait_for_single_owner(vip).await;
    assert_ne!(
        holder, chosen,
        "the node that cannot bind does not hold the VIP"
    );
    c.wait_for_traffic(vip, 2222).await;
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(c.admin.clone(), &c.namespace);
    let note = eventually(WAIT, "a ForwardingFailed Event on the Service", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("ForwardingFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("clash")
            })
            .and_then(|e| e.note)
    })
    .await;
    assert!(note.contains(&chosen) && note.contains("2222"), "{note}");
    assert_eq!(
        c.forwarder(&chosen).metric("ferry_forwarder_refused_vips"),
        Some(1.0)
    );
    // The other Services keep converging on every node, the refusing one included.
    assert!(c.get(&web, 80, "/").is_ok());
    let later = c.http_service("later", 30081, json!({})).await;
    c.wait_for_single_owner(&later).await;
    c.wait_for_traffic(&later, 80).await;
    // The daemon goes: the probe finds the port free, and the VIP returns to its node.
    daemon.kill();
    eventually(
        WAIT,
        "the VIP back on the node rendezvous picks",
        || async { (c.holders(vip) == [chosen.clone()]).then_some(()) },
    )
    .await;
    c.wait_for_traffic(vip, 2222).await;
    for name in ["web", "clash", "later"] {
        delete_and_wait(&c.svcs, name, WAIT).await;
    }
}

/// The forwarders' `ferry.dev/Announced` condition on `name`: (status, reason, message).
async fn announced(c: &Cluster, name: &str) -> Option<(String, String, String)> {
    let svc = c.svcs.get(name).await.ok()?;
    svc.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "ferry.dev/Announced")
        .map(|c| (c.status, c.reason, c.message))
}

/// The notes of the Events with `reason` on the Service `name`, oldest first.
async fn event_notes(c: &Cluster, name: &str, reason: &str) -> Vec<String> {
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(c.admin.clone(), &c.namespace);
    let mut found: Vec<(Option<String>, String)> = events
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .map(|e| {
            (
                e.event_time.map(|t| t.0.to_string()),
                e.note.unwrap_or_default(),
            )
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, note)| note).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_says_which_node_announces_it_and_when_none_can() {
    let _serial = serial().await;
    let mut c = Cluster::start("announced", NodePorts::Listening, &[]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    let owner = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;

    // The owner says so on the Service, beside the operator's own condition, with an Event.
    let expected = format!("announcing {web} from node \"{owner}\" (kernel mode)");
    eventually(WAIT, "the Announced condition naming the owner", || async {
        let (status, reason, message) = announced(&c, "web").await?;
        (status == "True" && reason == "Announced" && message == expected).then_some(())
    })
    .await;
    let svc = c.svcs.get("web").await.unwrap();
    let types: Vec<String> = svc
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert!(
        types.contains(&"ferry.dev/LoadBalancerReady".to_string()),
        "the operator's condition is kept: {types:?}"
    );
    let notes = eventually(WAIT, "a NodeAssigned Event", || async {
        let n = event_notes(&c, "web", "NodeAssigned").await;
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(notes, std::slice::from_ref(&expected));
    let owner_series = format!(
        "ferry_forwarder_vip_owner{{vip=\"{web}\",namespace=\"{}\",service=\"web\",node=\"{owner}\"}}",
        c.namespace
    );
    assert_eq!(c.forwarder(&owner).metric(&owner_series), Some(1.0));
    for other in NODES.iter().filter(|n| **n != owner) {
        assert_eq!(
            c.forwarder(other).metric("ferry_forwarder_vip_owner{"),
            None,
            "{other} does not announce {web}"
        );
    }
    let healthy = format!(
        "ferry_forwarder_backends{{namespace=\"{}\",service=\"web\",state=\"healthy\"}}",
        c.namespace
    );
    eventually(WAIT, "three healthy NodePorts in the metrics", || async {
        (c.forwarder(&owner).metric(&healthy) == Some(3.0)).then_some(())
    })
    .await;
    // Kernel mode counts the Service's new connections too, from its nftables counters.
    assert_eq!(c.spread(&web, 80, 12).len(), 3);
    let connections = format!(
        "ferry_forwarder_connections_total{{namespace=\"{}\",service=\"web\"}}",
        c.namespace
    );
    eventually(
        WAIT,
        "the kernel's new connections in the metrics",
        || async { (c.forwarder(&owner).metric(&connections) >= Some(12.0)).then_some(()) },
    )
    .await;

    // The owner's forwarder dies: the new owner says so, once.
    let i = c.node_index(&owner);
    c.forwarders[i].as_mut().unwrap().kill();
    let second = c.wait_for_single_owner(&web).await;
    assert_ne!(second, owner);
    let moved = format!("announcing {web} from node \"{second}\" (kernel mode)");
    eventually(WAIT, "the condition naming the new owner", || async {
        let (_, _, message) = announced(&c, "web").await?;
        (message == moved).then_some(())
    })
    .await;
    eventually(WAIT, "a NodeAssigned Event for the new owner", || async {
        let n = event_notes(&c, "web", "NodeAssigned").await;
        (n.last() == Some(&moved)).then_some(())
    })
    .await;
    assert!(
        c.forwarder(&second)
            .metric_values("ferry_forwarder_vip_owner_changes_total{")
            .iter()
            .sum::<f64>()
            >= 1.0
    );
    c.forwarders[i].as_mut().unwrap().restart().unwrap();
    assert_eq!(c.wait_for_single_owner(&web).await, owner);
    eventually(
        WAIT,
        "the condition naming the first owner again",
        || async {
            let (_, _, message) = announced(&c, "web").await?;
            (message == expected).then_some(())
        },
    )
    .await;

    // `Local` with no ready endpoint anywhere: no node can announce it, and the Service says so.
    let lonely = c
        .service(
            "lonely",
            json!({ "type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [
                { "name": "http", "port": 80, "nodePort": 30082, "protocol": "TCP" } ] }),
            json!({}),
        )
        .await;
    let (_, reason, message) =
        eventually(WAIT, "the Announced condition turning False", || async {
            announced(&c, "lonely")
                .await
                .filter(|(s, _, _)| s == "False")
        })
        .await;
    assert_eq!(reason, "NoNodeAnnounces");
    assert!(
        message.contains(&format!("no node can announce {lonely}"))
            && message.contains("3 nodes without a ready endpoint"),
        "{message}"
    );
    eventually(WAIT, "a NoNodeAnnounces Warning", || async {
        (!event_notes(&c, "lonely", "NoNodeAnnounces")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let unannounced = format!("ferry_forwarder_vip_unannounced{{vip=\"{lonely}\"");
    eventually(
        WAIT,
        "every forwarder counting the VIP nobody announces",
        || async {
            NODES
                .iter()
                .all(|n| c.forwarder(n).metric(&unannounced) == Some(1.0))
                .then_some(())
        },
    )
    .await;
    // An endpoint appears on one node: that node announces it, and the condition follows.
    c.endpoints_on("lonely", NODES[1]).await;
    assert_eq!(c.wait_for_single_owner(&lonely).await, NODES[1]);
    eventually(WAIT, "the Announced condition turning True", || async {
        let (status, _, message) = announced(&c, "lonely").await?;
        (status == "True" && message.contains(NODES[1])).then_some(())
    })
    .await;
    // A change right after a write is written at once, not held back to the next resync.
    c.service(
        "flip",
        json!({ "type": "LoadBalancer", "ports": [
            { "name": "http", "port": 80, "nodePort": 30083, "protocol": "TCP" } ] }),
        json!({}),
    )
    .await;
    eventually(WAIT, "the new Service announced", || async {
        announced(&c, "flip").await.filter(|(s, _, _)| s == "True")
    })
    .await;
    c.svcs
        .patch(
            "flip",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "externalTrafficPolicy": "Local" } })),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(4),
        "the condition following the change within seconds",
        || async { announced(&c, "flip").await.filter(|(s, _, _)| s == "False") },
    )
    .await;

    // A settled condition is not rewritten: no write loop.
    let before = c.svcs.get("web").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        c.svcs.get("web").await.unwrap().metadata.resource_version,
        before,
        "the Service was written again with nothing changed"
    );
    assert_eq!(
        event_notes(&c, "web", "NodeAssigned").await.last(),
        Some(&expected)
    );
    for name in ["web", "lonely", "flip"] {
        delete_and_wait(&c.svcs, name, WAIT).await;
    }
}

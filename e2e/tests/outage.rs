//! The data plane outlives its control plane, on the namespace cluster (`cluster`): VIPs keep
//! serving while the API server is stopped (SIGSTOP: it accepts connections and answers
//! nothing, its watches fall silent), a node lost meanwhile has its VIPs taken over by the
//! peers that still hear each other, a node whose peers cannot hear it (its peer port blocked)
//! keeps its VIPs while the API shows it alive, and a forwarder killed outright takes its VIPs
//! with it.
//!
//! Needs root. Everything created is removed at the end, also when a test fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_e2e::cluster::*;
use ferry_e2e::forwarder::NodePorts;
use ferry_e2e::scenario::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vips_keep_serving_through_a_minute_without_the_api() {
    let _serial = serial().await;
    let c = Cluster::start("fail-static", NodePorts::Listening, &[]).await;
    let a = c.http_service("a", 30080, json!({})).await;
    let b = c.http_service("b", 30081, json!({})).await;
    let owner_a = c.wait_for_single_owner(&a).await;
    let owner_b = c.wait_for_single_owner(&b).await;
    c.wait_for_traffic(&a, 80).await;
    c.wait_for_traffic(&b, 80).await;
    let targets: Vec<SocketAddr> = [&a, &b]
        .iter()
        .map(|ip| format!("{ip}:80").parse().unwrap())
        .collect();
    let client = SteadyClient::start(&c, targets);
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let _paused = c.cp.pause();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            c.holders(&a),
            std::slice::from_ref(&owner_a),
            "a stayed where it was"
        );
        assert_eq!(
            c.holders(&b),
            std::slice::from_ref(&owner_b),
            "b stayed where it was"
        );
    }
    // The API is back: every forwarder trusts its Leases again, and nothing moves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (sent, failed) = client.stop();
    assert!(sent > 1000, "{sent} requests");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert_eq!(c.wait_for_single_owner(&a).await, owner_a);
    assert_eq!(c.wait_for_single_owner(&b).await, owner_b);
    let log = c.forwarder(&owner_a).log_text();
    assert!(
        log.contains("the API's view is stale") && log.contains("fresh again"),
        "the forwarder noticed the outage and its end:\n{log}"
    );
    eprintln!("{sent} requests through a 60 s API outage, {failed} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_while_the_api_is_down_is_taken_over_within_three_seconds() {
    let _serial = serial().await;
    let mut c = Cluster::start("failover-no-api", NodePorts::Listening, &[]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    let target: SocketAddr = format!("{web}:80").parse().unwrap();
    let mut samples = Vec::new();
    for round in 0..5 {
        let owner = c.wait_for_single_owner(&web).await;
        c.wait_for_traffic(&web, 80).await;
        let i = c.node_index(&owner);
        let took = {
            let _paused = c.cp.pause();
            c.fail_node(i);
            let lost = Instant::now();
            loop {
                let ok = c
                    .topo
                    .client
                    .ns()
                    .enter(move || Ok(answered(target)))
                    .unwrap_or(false);
                if ok {
                    break lost.elapsed();
                }
                assert!(
                    lost.elapsed() < Duration::from_secs(30),
                    "round {round}: no traffic 30 s after the owner was lost"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        eprintln!(
            "round {round}: owner {owner} lost with the API down, traffic again after {took:?}"
        );
        samples.push(took);
        c.restore_node(i);
        c.wait_for_live_forwarders(3).await;
        // Settled: the restored node may take its VIP back (rendezvous), once.
        c.wait_for_single_owner(&web).await;
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    eprintln!("failover with the API down: {samples:?}, median {median:?}");
    assert!(
        median < Duration::from_secs(3),
        "median failover {median:?} ({samples:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_peer_port_is_blocked_keeps_its_vips_while_the_api_shows_it_alive() {
    let _serial = serial().await;
    let c = Cluster::start("peer-blocked", NodePorts::Listening, &[]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    let owner = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;
    c.wait_for_peers_heard().await;
    let client = SteadyClient::start(&c, vec![format!("{web}:80").parse().unwrap()]);
    // A firewall on the owner drops the direct heartbeats both ways; its Lease renewals go on.
    // (The rule lives in the node's namespace, which the cluster removes.)
    let node = &c.topo.nodes[c.node_index(&owner)];
    node.ns()
        .exec(
            "nft",
            &["add table inet peer_block; \
               add chain inet peer_block in { type filter hook input priority -300; } ; \
               add chain inet peer_block out { type filter hook output priority -300; } ; \
               add rule inet peer_block in udp dport 9472 drop ; \
               add rule inet peer_block out udp dport 9472 drop"],
        )
        .unwrap();
    // Silent for four seconds, twice its Lease and far past the peer timeout: its peers see
    // it renewing, so nobody takes its VIP, and it keeps it.
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            c.holders(&web),
            std::slice::from_ref(&owner),
            "the VIP stays on its owner only"
        );
    }
    let (sent, failed) = client.stop();
    assert!(sent > 20, "{sent} requests");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    // The metrics say what is wrong: the owner hears neither peer, each peer misses it.
    let i = c.node_index(&owner);
    for (j, f) in c.forwarders.iter().enumerate() {
        let f = f.as_ref().unwrap();
        let (heard, silent) = if j == i { (0.0, 2.0) } else { (1.0, 1.0) };
        assert_eq!(f.peers("heard"), Some(heard), "node {j} hears");
        assert_eq!(f.peers("silent"), Some(silent), "node {j} misses");
        assert_eq!(f.peers("unheard"), Some(0.0), "node {j}");
    }
    node.ns()
        .exec("nft", &["delete table inet peer_block"])
        .unwrap();
    assert_eq!(c.wait_for_single_owner(&web).await, owner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_forwarders_vips_leave_its_node_within_their_lifetime() {
    let _serial = serial().await;
    let mut c = Cluster::start("lifetime", NodePorts::Listening, &[]).await;
    let web = c.http_service("web", 30080, json!({})).await;
    let first = c.wait_for_single_owner(&web).await;
    c.wait_for_traffic(&web, 80).await;
    let i = c.node_index(&first);
    // SIGKILL: no withdrawal, no Lease release; the node and its namespace stay.
    c.forwarders[i].as_mut().unwrap().kill();
    let killed = Instant::now();
    eventually(
        WAIT,
        "the VIP to leave the killed forwarder's node",
        || async { (!c.holders(&web).contains(&first)).then_some(()) },
    )
    .await;
    let gone = killed.elapsed();
    // Lifetime: twice the 2 s Lease, renewed every second; the kernel checks each second.
    assert!(gone < Duration::from_secs(7), "the VIP stayed {gone:?}");
    let second = c.wait_for_single_owner(&web).await;
    assert_ne!(
        second, first,
        "exactly one MAC answers ARP, the new owner's"
    );
    c.wait_for_traffic(&web, 80).await;
    eprintln!("killed forwarder's VIP gone from its node after {gone:?}; {second} holds it");
}

//! Direct heartbeats between forwarders over the node network, so that liveness does not
//! depend on the API server alone: every `interval` each forwarder sends a small UDP datagram
//! to every peer it knows, and notes when it last heard each one.
//!
//! Why direct heartbeats and not SWIM gossip (e.g. `foca`): a VIP's owner must be agreed by
//! every node from what each one sees, and a full mesh gives every node first-hand evidence of
//! every other within one interval, with no protocol state to reason about; SWIM saves
//! traffic by probing a few members per period and spreading rumours, which pays off from
//! hundreds of nodes on and detects a failure in several periods instead of one timeout. At
//! 100 nodes and 5 heartbeats a second a node sends and receives 500 datagrams of ~40 bytes a
//! second (~20 KB/s each way), cheap beside the traffic it forwards. The Lease stays: it is
//! how peers are discovered (nodes with a heartbeat Lease run a forwarder), and it decides
//! what the peers cannot (see `liveness`).
//!
//! A datagram is `ferry-hb1 <node name>[ <vip>,<vip>…]`: the node, and the VIPs it cannot
//! serve (their forwarding could not be set up there), so its peers hand those to another
//! node. It counts only from one of that node's own InternalIPs (as the API last showed
//! them), so nothing else on the network speaks for a node by naming it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

const MAGIC: &str = "ferry-hb1 ";

/// A peer to send to: its node name and where its forwarder listens.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub node: String,
    /// The node's InternalIPs; heartbeats go to the first of this forwarder's family.
    pub ips: Vec<IpAddr>,
}

/// When each peer was last heard, shared with the planner.
pub type Heard = Arc<Mutex<HashMap<String, Instant>>>;

/// VIPs a node cannot serve: this node's (advertised) or each peer's (as heard).
pub type Refused = Arc<Mutex<BTreeSet<IpAddr>>>;

pub struct Membership {
    pub heard: Heard,
    /// Each peer's refusals, from its last heartbeat.
    refusals: Arc<Mutex<HashMap<String, BTreeSet<IpAddr>>>>,
    peers: Arc<Mutex<Vec<Peer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn message(node: &str, refused: &BTreeSet<IpAddr>) -> Vec<u8> {
    let vips: Vec<String> = refused.iter().map(ToString::to_string).collect();
    if vips.is_empty() {
        format!("{MAGIC}{node}").into_bytes()
    } else {
        format!("{MAGIC}{node} {}", vips.join(",")).into_bytes()
    }
}

/// The node a heartbeat names and the VIPs it refuses.
fn parse(datagram: &[u8]) -> Option<(&str, BTreeSet<IpAddr>)> {
    let text = std::str::from_utf8(datagram).ok()?.strip_prefix(MAGIC)?;
    let (node, vips) = text.split_once(' ').unwrap_or((text, ""));
    if node.is_empty() || node.len() > 253 {
        return None;
    }
    let refused = vips
        .split(',')
        .filter(|v| !v.is_empty())
        .filter_map(|v| v.parse().ok())
        .collect();
    Some((node, refused))
}

impl Membership {
    /// Listens on `bind` (the node's own address and the peer port) and heartbeats to the
    /// peers `set_peers` names, every `interval`, until `stop`. `changed` is poked when a peer
    /// is heard that was silent for `timeout` (coming back); going silent is the planner's to
    /// notice, at `next_expiry`.
    pub async fn start(
        me: &str,
        bind: SocketAddr,
        interval: Duration,
        timeout: Duration,
        refused: Refused,
        changed: Arc<Notify>,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<Membership> {
        let socket = Arc::new(UdpSocket::bind(bind).await?);
        let heard: Heard = Arc::default();
        let refusals: Arc<Mutex<HashMap<String, BTreeSet<IpAddr>>>> = Arc::default();
        let peers: Arc<Mutex<Vec<Peer>>> = Arc::default();
        info!(%bind, every = ?interval, "heartbeating to peers directly");
        let sender = {
            let (socket, peers, mut stop) = (socket.clone(), peers.clone(), stop.clone());
            let me = me.to_string();
            let port = bind.port();
            let v6 = bind.is_ipv6();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failing = false;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = crate::stopped(&mut stop) => return,
                    }
                    let msg = message(&me, &refused.lock().map(|r| r.clone()).unwrap_or_default());
                    let targets: Vec<SocketAddr> = peers
                        .lock()
                        .map(|p| {
                            p.iter()
                                .filter_map(|p| p.ips.iter().find(|ip| ip.is_ipv6() == v6))
                                .map(|ip| SocketAddr::new(*ip, port))
                                .collect()
                        })
                        .unwrap_or_default();
                    for to in targets {
                        // A peer that is down answers ICMP unreachable; that is not news.
                        match socket.send_to(&msg, to).await {
                            Ok(_) => failing = false,
                            Err(err) if !failing => {
                                debug!(%to, error = %err, "cannot send a heartbeat");
                                failing = true;
                            }
                            Err(_) => {}
                        }
                    }
                }
            })
        };
        let receiver = {
            let (heard, refusals, peers, mut stop) =
                (heard.clone(), refusals.clone(), peers.clone(), stop);
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let (n, from) = tokio::select! {
                        r = socket.recv_from(&mut buf) => match r {
                            Ok(r) => r,
                            Err(err) => {
                                // ICMP errors of earlier sends surface here; keep listening.
                                debug!(error = %err, "receiving heartbeats");
                                continue;
                            }
                        },
                        _ = crate::stopped(&mut stop) => return,
                    };
                    let Some((node, refused)) = buf.get(..n).and_then(parse) else {
                        continue;
                    };
                    let genuine = peers.lock().is_ok_and(|p| {
                        p.iter()
                            .any(|p| p.node == node && p.ips.contains(&from.ip()))
                    });
                    if !genuine {
                        debug!(%from, node, "heartbeat from an address that is not that node's; ignored");
                        continue;
                    }
                    let now = Instant::now();
                    let refusals_changed = refusals.lock().is_ok_and(|mut r| {
                        let before = r.insert(node.to_string(), refused.clone());
                        before.unwrap_or_default() != refused
                    });
                    let back = {
                        let Ok(mut heard) = heard.lock() else {
                            continue;
                        };
                        let before = heard.insert(node.to_string(), now);
                        before.is_none_or(|at| now.saturating_duration_since(at) >= timeout)
                    };
                    if back {
                        debug!(node, "peer heard");
                    }
                    if back || refusals_changed {
                        changed.notify_one();
                    }
                }
            })
        };
        Ok(Membership {
            heard,
            refusals,
            peers,
            tasks: vec![sender, receiver],
        })
    }

    /// The peers to heartbeat to (from the Nodes and Leases the API showed last).
    pub fn set_peers(&self, mut peers: Vec<Peer>) {
        peers.sort();
        match self.peers.lock() {
            Ok(mut p) if *p != peers => *p = peers,
            Ok(_) => {}
            Err(_) => warn!("peer list lock poisoned"),
        }
    }

    /// When each peer was last heard.
    pub fn heard(&self) -> HashMap<String, Instant> {
        self.heard.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The VIPs each peer refused in its last heartbeat.
    pub fn refusals(&self) -> HashMap<String, BTreeSet<IpAddr>> {
        self.refusals.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_name_their_node_and_its_refusals_and_nothing_else_parses() {
        let none = BTreeSet::new();
        assert_eq!(
            parse(&message("node-1", &none)),
            Some(("node-1", none.clone()))
        );
        let refused: BTreeSet<IpAddr> =
            ["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()].into();
        assert_eq!(
            parse(&message("node-1", &refused)),
            Some(("node-1", refused))
        );
        assert_eq!(parse(b"ferry-hb1 "), None);
        assert_eq!(parse(b"hello"), None);
        assert_eq!(parse(&[0xff, 0xfe]), None);
    }

    #[tokio::test]
    async fn a_peer_is_heard_only_from_its_own_address() {
        let changed = Arc::new(Notify::new());
        let (_stop_tx, stop) = watch::channel(false);
        let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let me = Membership::start(
            "me",
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(20),
            Duration::from_millis(200),
            Refused::default(),
            changed.clone(),
            stop,
        )
        .await
        .unwrap();
        me.set_peers(vec![
            Peer {
                node: "a".into(),
                ips: vec!["127.0.0.1".parse().unwrap()],
            },
            Peer {
                node: "far".into(),
                ips: vec!["10.9.9.9".parse().unwrap()],
            },
        ]);
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let refused: BTreeSet<IpAddr> = ["192.0.2.7".parse().unwrap()].into();
        for node in ["a", "far", "stranger"] {
            sender
                .send_to(&message(node, &refused), ("127.0.0.1", port))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !me.heard().contains_key("a") {
            assert!(Instant::now() < deadline, "a was never heard");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let heard = me.heard();
        assert!(!heard.contains_key("far"), "not from far's own address");
        assert!(!heard.contains_key("stranger"), "not a known node");
        assert_eq!(me.refusals().get("a"), Some(&refused));
    }
}

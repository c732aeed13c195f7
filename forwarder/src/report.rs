//! What the data plane tells users where they look: the `ferry.dev/Announced` condition on
//! each Service it serves (which node announces each address, in which mode, and the ports it
//! cannot forward), with an Event when that changes: `NodeAssigned` ("announcing from node
//! …", the words MetalLB users know), `NoNodeAnnounces` and `PortNotForwarded` as Warnings.
//!
//! One forwarder writes each Service: the owner of its first announced address, or, when no
//! node can announce any, the live node first in rendezvous order for its first address.
//! Every forwarder computes the same writer from the same view, so nothing is written twice
//! and no election is needed. The condition is written with server-side apply under the
//! forwarder's own field manager: conditions are keyed by type, so the operator's
//! `ferry.dev/LoadBalancerReady` is never touched. Events follow the condition as stored in
//! the API, so a restarted forwarder does not repeat them. Writing is off the planner's path,
//! bounded in time, at most once per Service every few seconds, and skipped while the API's
//! view is stale (fail static: what it cannot see, it does not report either).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_model::announce;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use serde_json::json;
use tracing::{debug, warn};

use crate::plan::NodePlan;

/// The condition type the forwarders own on Services.
pub const ANNOUNCED_CONDITION: &str = "ferry.dev/Announced";
/// The field manager of the condition.
pub const FIELD_MANAGER: &str = "ferry-forwarder";
/// How long one write (patch and Events) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two writes of one Service's condition.
const REWRITE_AFTER: Duration = Duration::from_secs(5);
/// Separates what is announced from the ports not forwarded in the condition's message.
const PROBLEMS: &str = "; not forwarded: ";

/// The condition one Service should carry, and which node writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceReport {
    /// `namespace/name`.
    pub service: String,
    pub writer: String,
    pub announced: bool,
    /// Which node announces each address and how, or why none can.
    pub announcement: String,
    /// The ports not forwarded, and why (only known to the owner, which is then the writer).
    pub problems: Vec<String>,
}

impl ServiceReport {
    pub fn reason(&self) -> &'static str {
        if self.announced {
            "Announced"
        } else {
            "NoNodeAnnounces"
        }
    }

    pub fn message(&self) -> String {
        if self.problems.is_empty() {
            self.announcement.clone()
        } else {
            format!(
                "{}{PROBLEMS}{}",
                self.announcement,
                self.problems.join("; ")
            )
        }
    }
}

/// How this node carries the VIPs it holds, for messages: "kernel mode", "userspace mode".
#[derive(Clone, Debug)]
pub struct Mode(pub String);

/// The condition of every Service on a VIP ferry serves, as `plan` (this node's, from the
/// same view as every other node's) has it. `live` are the nodes whose forwarder is alive;
/// `mode` is how this node forwards (only the owner's own words are used, since the owner
/// writes).
pub fn reports(
    plan: &NodePlan,
    live: &BTreeSet<String>,
    me: &str,
    mode: &Mode,
) -> Vec<ServiceReport> {
    // Per Service, its addresses in order, with whether it forwards on each.
    let mut by_service: BTreeMap<&str, Vec<(IpAddr, bool)>> = BTreeMap::new();
    for (vip, claimants) in &plan.claimants {
        for c in claimants {
            by_service
                .entry(c.service.as_str())
                .or_default()
                .push((*vip, c.forward));
        }
    }
    let mut out = Vec::new();
    for (service, vips) in by_service {
        let mut parts = Vec::new();
        let mut writer = None;
        for (vip, forward) in &vips {
            match plan.owners.get(vip) {
                Some(owner) => {
                    writer.get_or_insert_with(|| owner.clone());
                    let how = if !forward {
                        "announce only, kube-proxy forwards (ipMode VIP)".to_string()
                    } else if owner == me {
                        mode.0.clone()
                    } else {
                        // Only the owner's words reach the API; this is never written.
                        "forwarding".to_string()
                    };
                    parts.push(format!("announcing {vip} from node \"{owner}\" ({how})"));
                }
                None => parts.push(
                    plan.unowned
                        .get(vip)
                        .cloned()
                        .unwrap_or_else(|| format!("no node can announce {vip}")),
                ),
            }
        }
        let announced = vips.iter().all(|(vip, _)| plan.owners.contains_key(vip));
        let writer = writer.or_else(|| {
            vips.first()
                .and_then(|(vip, _)| announce::owner(vip, live.iter().map(String::as_str)))
                .map(str::to_string)
        });
        let Some(writer) = writer else {
            // No live forwarder at all: nobody can say anything.
            continue;
        };
        let problems = if writer == me {
            plan.port_problems
                .get(service)
                .map(|p| p.iter().cloned().collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        out.push(ServiceReport {
            service: service.to_string(),
            writer,
            announced,
            announcement: parts.join("; "),
            problems,
        });
    }
    out
}

/// The Events a change of the condition from `old` (its message, if any) to `new` calls for.
pub fn events_for(
    old: Option<&Condition>,
    new: &ServiceReport,
) -> Vec<(EventType, &'static str, String)> {
    let (old_announcement, old_problems) = match old {
        Some(c) => match c.message.split_once(PROBLEMS) {
            Some((a, p)) => (Some(a), Some(p)),
            None => (Some(c.message.as_str()), None),
        },
        None => (None, None),
    };
    let mut events = Vec::new();
    if old_announcement != Some(new.announcement.as_str()) {
        events.push(if new.announced {
            (EventType::Normal, "NodeAssigned", new.announcement.clone())
        } else {
            (
                EventType::Warning,
                "NoNodeAnnounces",
                new.announcement.clone(),
            )
        });
    }
    let problems = new.problems.join("; ");
    if !new.problems.is_empty() && old_problems != Some(problems.as_str()) {
        events.push((EventType::Warning, "PortNotForwarded", problems));
    }
    events
}

/// The forwarders' condition on `svc`, if it carries one.
pub fn current(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == ANNOUNCED_CONDITION)
}

fn key_of(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// What was written to a Service (its condition's status and message, or `None` for its
/// removal), and when.
type Written = (Option<String>, Instant);

/// Writes the reports this node is the writer of, when they differ from what the API shows.
pub struct Reporter {
    client: Client,
    recorder: Recorder,
    node: String,
    /// What was last written to each Service and when: the same content is not written
    /// again within `REWRITE_AFTER` (a write in flight, or its watch event still on its way;
    /// a failing API is not hammered), while a change is written at once.
    written: Mutex<HashMap<String, Written>>,
}

impl Reporter {
    pub fn new(client: Client, recorder: Recorder, node: &str) -> Self {
        Self {
            client,
            recorder,
            node: node.to_string(),
            written: Mutex::default(),
        }
    }

    /// Publishes what changed. `services` is the API's view; `live` the live forwarders (the
    /// first of them by name also removes the condition from Services no longer served).
    pub fn publish(
        &self,
        reports: &[ServiceReport],
        services: &[Arc<Service>],
        live: &BTreeSet<String>,
    ) {
        let by_key: HashMap<String, &Arc<Service>> =
            services.iter().map(|s| (key_of(s), s)).collect();
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.retain(|_, (_, at)| now.duration_since(*at) < REWRITE_AFTER);
        for report in reports.iter().filter(|r| r.writer == self.node) {
            let Some(svc) = by_key.get(&report.service) else {
                continue;
            };
            let old = current(svc);
            let status = if report.announced { "True" } else { "False" };
            let same = old.is_some_and(|c| {
                c.status == status && c.reason == report.reason() && c.message == report.message()
            });
            let content = Some(format!("{status} {}", report.message()));
            if same
                || written
                    .get(&report.service)
                    .is_some_and(|(c, _)| *c == content)
            {
                continue;
            }
            written.insert(report.service.clone(), (content, now));
            let condition = Condition {
                type_: ANNOUNCED_CONDITION.to_string(),
                status: status.to_string(),
                reason: report.reason().to_string(),
                message: report.message(),
                observed_generation: svc.metadata.generation,
                last_transition_time: match old {
                    Some(c) if c.status == status => c.last_transition_time.clone(),
                    _ => Time(jiff::Timestamp::now()),
                },
            };
            let events = events_for(old, report);
            self.spawn_write(svc, Some(condition), events);
        }
        // Services that carry the condition but are no longer served here: one node clears it.
        if live.iter().next() != Some(&self.node) {
            return;
        }
        let served: BTreeSet<&str> = reports.iter().map(|r| r.service.as_str()).collect();
        for svc in services {
            let key = key_of(svc);
            if current(svc).is_none()
                || served.contains(key.as_str())
                || written.get(&key).is_some_and(|(c, _)| c.is_none())
            {
                continue;
            }
            written.insert(key, (None, now));
            self.spawn_write(svc, None, Vec::new());
        }
    }

    /// Applies `condition` (or drops the forwarders' condition) and then sends `events`,
    /// off the caller's path and bounded in time.
    fn spawn_write(
        &self,
        svc: &Service,
        condition: Option<Condition>,
        events: Vec<(EventType, &'static str, String)>,
    ) {
        let (Some(namespace), Some(name)) = (svc.namespace(), svc.metadata.name.clone()) else {
            return;
        };
        let api: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
        let reference = svc.object_ref(&());
        let recorder = self.recorder.clone();
        // Applying without the condition removes it: this manager owned it.
        let conditions = condition.map(|c| vec![c]).unwrap_or_default();
        let body = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace },
            "status": { "conditions": conditions },
        });
        tokio::spawn(async move {
            let write = async {
                let params = PatchParams::apply(FIELD_MANAGER).force();
                api.patch_status(&name, &params, &Patch::Apply(&body))
                    .await
                    .map_err(|e| {
                        format!("cannot write the {ANNOUNCED_CONDITION} condition: {e}")
                    })?;
                for (type_, reason, note) in events {
                    let event = Event {
                        type_,
                        reason: reason.into(),
                        note: Some(note),
                        action: "Announce".into(),
                        secondary: None,
                    };
                    recorder
                        .publish(&event, &reference)
                        .await
                        .map_err(|e| format!("cannot publish an Event: {e}"))?;
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {
                    debug!(service = %format!("{namespace}/{name}"), "data-plane state written")
                }
                Ok(Err(err)) => warn!(service = %format!("{namespace}/{name}"), error = %err),
                Err(_) => {
                    warn!(service = %format!("{namespace}/{name}"), "writing the data-plane state timed out")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Claimant;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn live(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|s| s.to_string()).collect()
    }

    fn plan_with(vips: &[(&str, &str, Option<&str>, bool)]) -> NodePlan {
        let mut plan = NodePlan::default();
        for (vip, service, owner, forward) in vips {
            plan.claimants.entry(ip(vip)).or_default().push(Claimant {
                service: service.to_string(),
                forward: *forward,
            });
            match owner {
                Some(o) => {
                    plan.owners.insert(ip(vip), o.to_string());
                }
                None => {
                    plan.unowned.insert(
                        ip(vip),
                        format!("no node can announce {vip} (no live forwarder that can serve it)"),
                    );
                }
            }
        }
        plan
    }

    fn kernel() -> Mode {
        Mode("kernel mode".into())
    }

    #[test]
    fn the_owner_writes_that_it_announces_and_how() {
        let plan = plan_with(&[("192.0.2.1", "default/web", Some("n2"), true)]);
        let r = reports(&plan, &live(&["n1", "n2", "n3"]), "n2", &kernel());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].writer, "n2");
        assert!(r[0].announced);
        assert_eq!(r[0].reason(), "Announced");
        assert_eq!(
            r[0].message(),
            "announcing 192.0.2.1 from node \"n2\" (kernel mode)"
        );
    }

    #[test]
    fn every_node_agrees_on_one_writer() {
        let plan = plan_with(&[
            ("192.0.2.1", "default/web", Some("n2"), true),
            ("192.0.2.2", "default/dark", None, true),
        ]);
        let nodes = live(&["n1", "n2", "n3"]);
        let writers: Vec<BTreeMap<String, String>> = ["n1", "n2", "n3"]
            .iter()
            .map(|me| {
                reports(&plan, &nodes, me, &kernel())
                    .into_iter()
                    .map(|r| (r.service, r.writer))
                    .collect()
            })
            .collect();
        assert!(writers.windows(2).all(|w| w[0] == w[1]), "{writers:?}");
        assert_eq!(writers[0]["default/web"], "n2");
        let dark = &writers[0]["default/dark"];
        assert_eq!(
            Some(dark.as_str()),
            announce::owner(&ip("192.0.2.2"), nodes.iter().map(String::as_str))
        );
    }

    #[test]
    fn an_address_nobody_announces_is_not_ready_and_says_why() {
        let plan = plan_with(&[("192.0.2.2", "default/dark", None, true)]);
        let r = reports(&plan, &live(&["n1"]), "n1", &kernel());
        assert!(!r[0].announced);
        assert_eq!(r[0].reason(), "NoNodeAnnounces");
        assert!(
            r[0].message().contains("no node can announce 192.0.2.2"),
            "{}",
            r[0].message()
        );
    }

    #[test]
    fn with_no_live_forwarder_nothing_is_written() {
        let plan = plan_with(&[("192.0.2.2", "default/dark", None, true)]);
        assert!(reports(&plan, &BTreeSet::new(), "n1", &kernel()).is_empty());
    }

    #[test]
    fn announce_only_services_say_kube_proxy_forwards_and_dual_stack_needs_every_address() {
        let plan = plan_with(&[
            ("192.0.2.1", "default/web", Some("n1"), false),
            ("2001:db8::1", "default/web", None, false),
        ]);
        let r = reports(&plan, &live(&["n1"]), "n1", &kernel());
        assert!(!r[0].announced, "one of two addresses has no owner");
        assert!(
            r[0].message()
                .contains("announce only, kube-proxy forwards"),
            "{}",
            r[0].message()
        );
        assert!(r[0].message().contains("no node can announce 2001:db8::1"));
    }

    #[test]
    fn ports_the_owner_cannot_forward_are_in_the_message_and_a_warning() {
        let mut plan = plan_with(&[("192.0.2.1", "default/web", Some("n1"), true)]);
        plan.port_problems.insert(
            "default/web".into(),
            BTreeSet::from(["port 5000/SCTP is not forwarded (TCP and UDP only)".to_string()]),
        );
        let r = reports(&plan, &live(&["n1"]), "n1", &kernel());
        assert!(r[0].announced);
        assert!(
            r[0].message()
                .ends_with("not forwarded: port 5000/SCTP is not forwarded (TCP and UDP only)")
        );
        let events = events_for(None, &r[0]);
        let reasons: Vec<&str> = events.iter().map(|e| e.1).collect();
        assert_eq!(reasons, ["NodeAssigned", "PortNotForwarded"]);
    }

    fn condition(message: &str) -> Condition {
        Condition {
            type_: ANNOUNCED_CONDITION.into(),
            status: "True".into(),
            reason: "Announced".into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn events_follow_the_stored_condition_so_a_restart_repeats_none() {
        let plan = plan_with(&[("192.0.2.1", "default/web", Some("n1"), true)]);
        let r = &reports(&plan, &live(&["n1"]), "n1", &kernel())[0];
        let stored = condition(&r.message());
        assert!(events_for(Some(&stored), r).is_empty());
        let moved = condition("announcing 192.0.2.1 from node \"n3\" (kernel mode)");
        let events = events_for(Some(&moved), r);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, "NodeAssigned");
        assert_eq!(
            events[0].2,
            "announcing 192.0.2.1 from node \"n1\" (kernel mode)"
        );
    }
}

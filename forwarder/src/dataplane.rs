//! The data plane this node runs, chosen once at start: nftables (`kernel`) with a userspace
//! side for what nftables cannot serve, or userspace alone; and, in either mode where
//! nftables works, the `guard` that keeps a VIP from exposing anything but its Services.
//! `apply` programs the frontends the planner computed with the node facts the planner read
//! for that plan (forwarding per family), which decide what kernel mode hands to its
//! userspace side.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use ferry_model::Protocol;
use tracing::{info, warn};

use crate::config::{Announce, Config, Mode};
use crate::guard::Guard;
use crate::kernel::{self, Forwarding, Kernel};
use crate::metrics::Metrics;
use crate::plan::Frontend;
use crate::userspace::{Limits, Userspace};

/// A frontend whose forwarding could not be set up.
#[derive(Clone, Debug)]
pub struct Failure {
    pub frontend: Frontend,
    pub error: String,
    pub kind: FailureKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// A listener could not bind (a host process holds the port): checked again by probing.
    Bind,
    /// nftables refused the frontend's rules: tried again after a backoff.
    Kernel,
}

/// nftables refused the table for `frontends`: finds the VIPs whose rules it refuses by
/// adding them one at a time, keeps the others applied, and returns the refused ones. When
/// not even the table without any VIP applies, nothing can be narrowed down.
async fn narrow_down(
    kernel: &mut Kernel,
    frontends: &[Frontend],
    error: &str,
) -> anyhow::Result<Vec<Failure>> {
    let mut by_vip: std::collections::BTreeMap<IpAddr, Vec<Frontend>> = Default::default();
    for f in frontends {
        by_vip.entry(f.vip).or_default().push(f.clone());
    }
    kernel
        .apply(&[])
        .await
        .with_context(|| format!("nftables refuses even an empty table (first: {error})"))?;
    let mut good: Vec<Frontend> = Vec::new();
    let mut failures = Vec::new();
    for (vip, group) in by_vip {
        let mut trial = good.clone();
        trial.extend(group.iter().cloned());
        match kernel.apply(&trial).await {
            Ok(()) => good = trial,
            Err(err) => {
                warn!(%vip, error = %err, "nftables refuses this VIP's rules");
                failures.extend(group.into_iter().map(|frontend| Failure {
                    frontend,
                    error: format!("nftables refused its rules: {err}"),
                    kind: FailureKind::Kernel,
                }));
            }
        }
    }
    kernel.apply(&good).await?;
    Ok(failures)
}

pub struct Dataplane {
    forwarding: Paths,
    /// `None` where nftables cannot be programmed.
    guard: Option<Guard>,
}

enum Paths {
    /// nftables, with a userspace side for what nftables cannot serve (`kernel::split`);
    /// the node's own addresses.
    Kernel(Kernel, Userspace, Vec<IpAddr>),
    Userspace(Userspace),
}

impl Dataplane {
    /// How this node forwards, in words for users.
    pub fn describe(&self) -> &'static str {
        match self.forwarding {
            Paths::Kernel(..) => "kernel mode",
            Paths::Userspace(_) => "userspace mode",
        }
    }

    /// Guards the VIPs `held`: only `exposed` is open on them (see `guard`).
    pub async fn guard(
        &mut self,
        held: &BTreeSet<IpAddr>,
        exposed: &BTreeSet<(IpAddr, Protocol, u16)>,
        frontends: &[Frontend],
        node: Forwarding,
    ) -> anyhow::Result<()> {
        let relayed = match &self.forwarding {
            Paths::Kernel(_, _, own) => kernel::split(frontends, node, own).1,
            Paths::Userspace(_) => frontends.to_vec(),
        };
        if let Some(guard) = &mut self.guard {
            guard
                .apply(held, exposed, &relayed)
                .await
                .context("cannot guard the VIPs")?;
        }
        Ok(())
    }

    /// Programs `frontends`; returns the ones whose forwarding could not be set up (with
    /// why), the others being in place. One Service's failure stays its own: nftables
    /// refusing the table is narrowed down VIP by VIP, and a listener that cannot bind
    /// fails alone. An error means nothing could be applied at all.
    pub async fn apply(
        &mut self,
        frontends: &[Frontend],
        node: Forwarding,
    ) -> anyhow::Result<Vec<Failure>> {
        let mut failures = Vec::new();
        let (userspace, rest) = match &mut self.forwarding {
            Paths::Kernel(kernel, userspace, own) => {
                let (kernel_side, userspace_side) = kernel::split(frontends, node, own);
                if let Err(err) = kernel.apply(&kernel_side).await {
                    failures.extend(narrow_down(kernel, &kernel_side, &err.to_string()).await?);
                }
                (userspace, userspace_side)
            }
            Paths::Userspace(userspace) => (userspace, frontends.to_vec()),
        };
        failures.extend(
            userspace
                .apply(&rest)
                .into_iter()
                .map(|(frontend, err)| Failure {
                    error: format!(
                        "cannot listen on {}:{}/{}: {err}",
                        frontend.vip, frontend.port, frontend.protocol
                    ),
                    frontend,
                    kind: FailureKind::Bind,
                }),
        );
        Ok(failures)
    }

    /// Adds what the kernel counted since the last call to the per-Service connection
    /// counters (the userspace side counts its own as it relays).
    pub async fn collect_counts(&mut self, metrics: &Metrics) {
        if let Paths::Kernel(kernel, _, _) = &mut self.forwarding {
            for (service, n) in kernel.new_connections().await {
                metrics.dataplane.service(&service).counted(n);
            }
        }
    }

    /// Whether the frontends of a refused VIP could be set up now, without taking the VIP:
    /// listeners bind before their address is on the interface (IP_FREEBIND).
    pub fn probe(&self, frontends: &[Frontend]) -> std::io::Result<()> {
        frontends.iter().try_for_each(crate::userspace::probe)
    }

    pub async fn clear(&mut self) {
        match &mut self.forwarding {
            Paths::Kernel(kernel, userspace, _) => {
                if let Err(err) = kernel.clear().await {
                    warn!(error = %err, "removing the nftables table");
                }
                userspace.apply(&[]);
            }
            Paths::Userspace(userspace) => {
                userspace.apply(&[]);
            }
        }
        if let Some(guard) = &mut self.guard
            && let Err(err) = guard.clear().await
        {
            warn!(error = %err, "removing the guard table");
        }
    }

    /// The data plane `config` asks for, where this node allows it.
    pub async fn choose(
        config: &Config,
        limits: Limits,
        metrics: &Metrics,
        own: &[IpAddr],
    ) -> anyhow::Result<Dataplane> {
        let userspace = Userspace::new(limits, metrics.dataplane.clone());
        // VIPs that are already local (`--announce none`, the sandbox's loopback addresses)
        // are not this forwarder's to guard: they were never added to an interface by it.
        let guard = match config.announce {
            Announce::None => None,
            Announce::Netlink => match Guard::probe().await {
                Ok(()) => Some(Guard::default()),
                Err(err) => {
                    warn!(reason = %err, "nftables cannot be programmed here: VIPs on this node answer on every port a host process listens on, not only their Services'");
                    None
                }
            },
        };
        let kernel = |userspace| Dataplane {
            forwarding: Paths::Kernel(Kernel::default(), userspace, own.to_vec()),
            guard: guard.clone(),
        };
        let user = |userspace| Dataplane {
            forwarding: Paths::Userspace(userspace),
            guard: guard.clone(),
        };
        let forwarding = Forwarding::read();
        let off = match (forwarding.ipv4, forwarding.ipv6) {
            (true, true) => None,
            (false, true) => Some("net.ipv4.ip_forward is 0"),
            (true, false) => Some("net.ipv6.conf.all.forwarding is 0"),
            (false, false) => Some("net.ipv4.ip_forward and net.ipv6.conf.all.forwarding are 0"),
        };
        if let Some(off) = off.filter(|_| config.mode != Mode::Userspace) {
            info!(
                "{off}: VIPs of that family with backends on other nodes are relayed by the \
                 userspace side (NAT would need the node to forward)"
            );
        }
        match config.mode {
            Mode::Userspace => {
                info!("data plane: userspace (as configured)");
                Ok(user(userspace))
            }
            Mode::Kernel => {
                Kernel::probe()
                    .await
                    .context("--mode kernel, but nftables cannot be programmed here")?;
                info!("data plane: kernel (nftables, as configured)");
                Ok(kernel(userspace))
            }
            Mode::Auto => match Kernel::probe().await {
                Ok(()) => {
                    info!("data plane: kernel (nftables works)");
                    Ok(kernel(userspace))
                }
                Err(err) => {
                    info!(reason = %err, "data plane: userspace (nftables cannot be programmed here)");
                    Ok(user(userspace))
                }
            },
        }
    }
}

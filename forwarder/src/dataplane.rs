//! The data plane this node runs, chosen once at start: nftables (`kernel`) with a userspace
//! side for what nftables cannot serve, or userspace alone; and, in either mode where
//! nftables works, the `guard` that keeps a VIP from exposing anything but its Services.
//! `apply` programs the frontends the planner computed, reading the node facts the split
//! depends on (forwarding per family) at the moment it applies.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use ferry_providers::Protocol;
use tracing::{info, warn};

use crate::config::{Config, Mode};
use crate::guard::Guard;
use crate::kernel::{self, Forwarding, Kernel};
use crate::metrics::Metrics;
use crate::plan::Frontend;
use crate::userspace::{Limits, Userspace};

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
    /// Guards the VIPs `held`: only `exposed` is open on them (see `guard`).
    pub async fn guard(
        &mut self,
        held: &BTreeSet<IpAddr>,
        exposed: &BTreeSet<(IpAddr, Protocol, u16)>,
        frontends: &[Frontend],
    ) -> anyhow::Result<()> {
        let relayed = match &self.forwarding {
            Paths::Kernel(_, _, own) => kernel::split(frontends, Forwarding::read(), own).1,
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

    pub async fn apply(&mut self, frontends: &[Frontend]) -> anyhow::Result<()> {
        let (userspace, rest) = match &mut self.forwarding {
            Paths::Kernel(kernel, userspace, own) => {
                let (kernel_side, userspace_side) =
                    kernel::split(frontends, Forwarding::read(), own);
                kernel.apply(&kernel_side).await?;
                (userspace, userspace_side)
            }
            Paths::Userspace(userspace) => (userspace, frontends.to_vec()),
        };
        let failed = userspace.apply(&rest);
        if let Some((f, err)) = failed.first() {
            anyhow::bail!(
                "cannot listen on {}:{}/{} for {} ({} listener(s) failed): {err}",
                f.vip,
                f.port,
                f.protocol,
                f.service,
                failed.len()
            );
        }
        Ok(())
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
        let guard = match Guard::probe().await {
            Ok(()) => Some(Guard::default()),
            Err(err) => {
                warn!(reason = %err, "nftables cannot be programmed here: VIPs on this node answer on every port a host process listens on, not only their Services'");
                None
            }
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

//! The forwarder's configuration: one struct, parsed by clap, every flag also read from an
//! environment variable. Nothing deeper in the code reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
pub use ferry_runtime::ParseOutcome;
use ferry_runtime::{LogFormat, duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Kernel when nftables can be programmed here, else userspace.
    Auto,
    /// nftables DNAT (Services asking for PROXY protocol still use userspace).
    Kernel,
    /// tokio listeners on each VIP port.
    Userspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Announce {
    /// Add VIPs to the interface over netlink and announce them with ARP / NDP.
    Netlink,
    /// Leave interfaces alone: the VIPs are already local (the sandbox, on loopback), so
    /// holding a VIP means only binding it.
    None,
}

/// ferry-forwarder: announces each LoadBalancer VIP from one node and forwards its ports to
/// the nodes' NodePorts.
#[derive(Clone, Debug, Parser)]
#[command(name = "ferry-forwarder", version, about, long_about = None)]
pub struct Config {
    /// This node's name (the Node object's).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Interface VIPs are added to [default: the one holding the node's InternalIP].
    #[arg(long, env = "FERRY_INTERFACE")]
    pub interface: Option<String>,

    /// Data plane.
    #[arg(long, env = "FERRY_FORWARDER_MODE", value_enum, default_value = "auto")]
    pub mode: Mode,

    /// How VIPs are held.
    #[arg(long, env = "FERRY_ANNOUNCE", value_enum, default_value = "netlink")]
    pub announce: Announce,

    /// The `spec.loadBalancerClass` served (the operator's).
    #[arg(
        long,
        env = "FERRY_LOAD_BALANCER_CLASS",
        default_value = "ferry.dev/local"
    )]
    pub load_balancer_class: String,

    /// Also serve LoadBalancer Services that name no class.
    #[arg(long, env = "FERRY_DEFAULT_CLASS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub default_class: bool,

    /// Namespace of the heartbeat Leases.
    #[arg(long, env = "FERRY_LEASE_NAMESPACE", default_value = "ferry-system")]
    pub lease_namespace: String,

    /// A node whose forwarder has not renewed its Lease for this long loses its VIPs
    /// (whole seconds; bounds failover time).
    #[arg(long, env = "FERRY_LEASE_DURATION", default_value = "2s", value_parser = duration)]
    pub lease_duration: Duration,

    /// How often this forwarder renews its Lease.
    #[arg(long, env = "FERRY_LEASE_RENEW_INTERVAL", default_value = "500ms", value_parser = duration)]
    pub lease_renew_interval: Duration,

    /// UDP port of the direct heartbeats between forwarders, on the node's own address
    /// (0 turns them off: liveness then comes from the Leases alone, and fails with the API).
    #[arg(long, env = "FERRY_PEER_PORT", default_value_t = 9472)]
    pub peer_port: u16,

    /// How often this forwarder heartbeats to every peer directly.
    #[arg(long, env = "FERRY_PEER_INTERVAL", default_value = "200ms", value_parser = duration)]
    pub peer_interval: Duration,

    /// A peer not heard for this long is silent: gone once its Lease renewals are overdue too
    /// (one and a half renewal intervals), or, while the API is down, once a majority agrees.
    #[arg(long, env = "FERRY_PEER_TIMEOUT", default_value = "600ms", value_parser = duration)]
    pub peer_timeout: Duration,

    /// How often each backend NodePort is health-checked.
    #[arg(long, env = "FERRY_HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = duration)]
    pub health_check_interval: Duration,

    /// How long a health check may take.
    #[arg(long, env = "FERRY_HEALTH_CHECK_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub health_check_timeout: Duration,

    /// How long a connect to a backend may take before the next one is tried (userspace).
    #[arg(long, env = "FERRY_CONNECT_TIMEOUT", default_value = "3s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// A TCP connection quiet in both directions for this long is closed (userspace).
    #[arg(long, env = "FERRY_IDLE_TIMEOUT", default_value = "10m", value_parser = duration)]
    pub idle_timeout: Duration,

    /// A half-closed TCP connection quiet for this long is closed (userspace).
    #[arg(long, env = "FERRY_HALF_CLOSE_TIMEOUT", default_value = "1m", value_parser = duration)]
    pub half_close_timeout: Duration,

    /// TCP connections relayed at once (userspace); past it, new clients wait for a place.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Pin each userspace TCP thread to a CPU of its own, and have the kernel hand it the
    /// connections that CPU received, when the forwarder has a thread for every CPU it may
    /// use (not under a CPU quota that leaves it fewer).
    #[arg(long, env = "FERRY_PIN_THREADS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_threads: bool,

    /// UDP flows per VIP port (userspace); at the limit the most idle flows make room.
    #[arg(long, env = "FERRY_UDP_MAX_FLOWS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_max_flows: u32,

    /// A UDP flow quiet for this long is removed (userspace).
    #[arg(long, env = "FERRY_UDP_IDLE_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub udp_idle_timeout: Duration,

    /// Address of the Prometheus metrics endpoint (`/metrics`).
    #[arg(long, env = "FERRY_METRICS_ADDR", default_value = "0.0.0.0:9470")]
    pub metrics_addr: SocketAddr,

    /// Address of the health endpoints (`/healthz`, `/readyz`).
    #[arg(long, env = "FERRY_HEALTH_ADDR", default_value = "0.0.0.0:9471")]
    pub health_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    pub log_filter: String,
}

impl Config {
    /// Parses `args`; on a bad or missing flag returns the message as one line.
    pub fn parse_args<I, T>(args: I) -> Result<Config, ParseOutcome>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config: Config = ferry_runtime::parse_args(args)?;
        if config.lease_duration < Duration::from_secs(1) {
            return Err(ParseOutcome::Error(
                "error: --lease-duration must be at least 1s (Leases count whole seconds)".into(),
            ));
        }
        if config.lease_renew_interval >= config.lease_duration {
            return Err(ParseOutcome::Error(format!(
                "error: --lease-renew-interval ({:?}) must be shorter than --lease-duration ({:?})",
                config.lease_renew_interval, config.lease_duration
            )));
        }
        if config.peer_interval >= config.peer_timeout {
            return Err(ParseOutcome::Error(format!(
                "error: --peer-interval ({:?}) must be shorter than --peer-timeout ({:?})",
                config.peer_interval, config.peer_timeout
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ParseOutcome> {
        Config::parse_args(std::iter::once("ferry-forwarder").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Err(ParseOutcome::Error(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_need_only_the_node_name() {
        let c = parse(&["--node-name", "n1"]).unwrap();
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.announce, Announce::Netlink);
        assert_eq!(c.lease_duration, Duration::from_secs(2));
        assert_eq!(c.load_balancer_class, "ferry.dev/local");
    }

    #[test]
    fn bad_flags_are_one_line() {
        let e = error(&[]);
        assert!(e.contains("--node-name"), "{e}");
        assert!(!e.contains('\n'));
        assert!(error(&["--node-name", "n1", "--mode", "ebpf"]).contains("ebpf"));
        assert!(error(&["--node-name", "n1", "--lease-duration", "500ms"]).contains("at least 1s"));
        assert!(error(&["--node-name", "n1", "--lease-renew-interval", "5s"]).contains("shorter"));
        assert!(error(&["--node-name", "n1", "--peer-interval", "2s"]).contains("--peer-timeout"));
    }
}

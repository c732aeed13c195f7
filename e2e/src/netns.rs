//! A network-namespace cluster for data-plane tests: a switch (a bridge in its own namespace),
//! node namespaces and a client namespace on it, real ARP and real traffic. Everything is
//! created by the test and removed on drop, even when the test fails; namespaces left behind
//! by a killed run are removed at the next start. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
//!
//! Addresses are `10.213.0.0/24` inside these namespaces only: nodes `.11`, `.12`, …, the
//! client `.100`, VIP pools from `.200`. No traffic leaves them.
//!
//! Processes inside a node reach the control plane on the host's loopback through
//! `ApiRelay`: a listener created inside the namespace (sockets keep the namespace they were
//! made in) whose connections are copied to the API server by threads of this process.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

const PREFIX: &str = "ferry-t";
pub const SUBNET_PREFIX: &str = "10.213.0";

/// Runs `ip args…`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `program args…` inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets `f` creates stay in it.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        });
        match handle.join() {
            Ok(r) => Ok(r?),
            Err(_) => bail!("thread in {} panicked", self.name),
        }
    }

    /// Runs `f` on a new thread inside this namespace and returns at once.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error().into());
            }
            f()
        }))
    }

    /// Addresses on `dev` inside the namespace (`ip -o addr show dev`).
    pub fn addresses(&self, dev: &str) -> anyhow::Result<String> {
        self.ip(&["-o", "addr", "show", "dev", dev])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Removes namespaces left by runs whose process is gone.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A host on the switch.
#[derive(Debug)]
pub struct Host {
    /// The Kubernetes node name (or `client`).
    pub name: String,
    pub ip: Ipv4Addr,
    /// `None` once the host was taken off the network.
    pub ns: Option<Netns>,
    pub mac: String,
    /// The switch port's name in the switch namespace.
    port: String,
}

impl Host {
    pub fn ns(&self) -> &Netns {
        self.ns.as_ref().expect("the host was removed")
    }
}

/// Switch, nodes and a client.
pub struct Topology {
    pub switch: Netns,
    pub nodes: Vec<Host>,
    pub client: Host,
}

fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{tag}{n}", std::process::id())
}

fn attach(switch: &Netns, host_ns: &Netns, port: &str, ip: Ipv4Addr) -> anyhow::Result<String> {
    ip_link_veth(host_ns, switch, port)?;
    switch.ip(&["link", "set", port, "master", "br0", "up"])?;
    host_ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    host_ns.ip(&["link", "set", "eth0", "up"])?;
    let mac = host_ns
        .exec("cat", &["/sys/class/net/eth0/address"])?
        .trim()
        .to_string();
    Ok(mac)
}

fn ip_link_veth(host: &Netns, switch: &Netns, port: &str) -> anyhow::Result<()> {
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &host.name,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        &switch.name,
    ])
    .map(drop)
}

impl Topology {
    /// `nodes` node namespaces (named `node_names`) and a client, on one bridge.
    pub fn new(node_names: &[&str]) -> anyhow::Result<Self> {
        remove_stale();
        let switch = Netns::create(&unique("sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for (i, name) in node_names.iter().enumerate() {
            let ns = Netns::create(&unique("n"))?;
            let ip = Ipv4Addr::new(10, 213, 0, 11 + i as u8);
            let port = format!("p{i}");
            let mac = attach(&switch, &ns, &port, ip)?;
            // A node forwards (Cluster policy sends to other nodes' NodePorts).
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            nodes.push(Host {
                name: name.to_string(),
                ip,
                ns: Some(ns),
                mac,
                port,
            });
        }
        let client_ns = Netns::create(&unique("c"))?;
        let client_ip = Ipv4Addr::new(10, 213, 0, 100);
        let mac = attach(&switch, &client_ns, "pc", client_ip)?;
        Ok(Self {
            switch,
            nodes,
            client: Host {
                name: "client".into(),
                ip: client_ip,
                ns: Some(client_ns),
                mac,
                port: "pc".into(),
            },
        })
    }

    /// Gives every host an IPv6 address on the switch too: `fd00:213::<n>` where `n` is the
    /// last octet of its IPv4 address (no duplicate address detection, so usable at once).
    /// Nodes forward IPv6 as they do IPv4.
    pub fn add_ipv6(&self) -> anyhow::Result<()> {
        for host in &self.nodes {
            host.ns().sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        for host in self.nodes.iter().chain([&self.client]) {
            host.ns().ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", Self::ipv6_of(host)),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// The IPv6 address `add_ipv6` gives `host`.
    pub fn ipv6_of(host: &Host) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x213, 0, 0, 0, 0, 0, u16::from(host.ip.octets()[3]))
    }

    /// The link-layer address the client's neighbour table holds for `ip`, if any.
    pub fn client_neighbour(&self, ip: &str) -> Option<String> {
        let out = self
            .client
            .ns()
            .ip(&["neigh", "show", ip, "dev", "eth0"])
            .ok()?;
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_lowercase)
    }

    /// The nodes as dual-stack Node objects (their `add_ipv6` address as a second InternalIP).
    pub fn dual_stack_nodes(&self) -> Vec<crate::nodes::SimulatedNode> {
        let mut nodes = self.simulated_nodes();
        for (node, host) in nodes.iter_mut().zip(&self.nodes) {
            node.ipv6 = Some(Self::ipv6_of(host));
        }
        nodes
    }

    /// The nodes as Node objects to register (name and InternalIP).
    pub fn simulated_nodes(&self) -> Vec<crate::nodes::SimulatedNode> {
        self.nodes
            .iter()
            .map(|h| crate::nodes::SimulatedNode {
                name: h.name.clone(),
                ip: h.ip,
                ipv6: None,
            })
            .collect()
    }

    /// Takes node `i` off the network at once (its switch port goes), as a node failure.
    /// The namespace itself goes when the caller drops what it returns.
    pub fn unplug(&mut self, i: usize) -> anyhow::Result<Option<Netns>> {
        let host = &mut self.nodes[i];
        self.switch.ip(&["link", "del", &host.port])?;
        Ok(host.ns.take())
    }

    /// Puts node `i` back on the network after `unplug`: a fresh namespace with the same
    /// address on the same switch port (a new MAC, as a replaced machine has).
    pub fn replug(&mut self, i: usize) -> anyhow::Result<()> {
        let host = &mut self.nodes[i];
        if host.ns.is_some() {
            return Ok(());
        }
        let ns = Netns::create(&unique("n"))?;
        host.mac = attach(&self.switch, &ns, &host.port, host.ip)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        host.ns = Some(ns);
        Ok(())
    }

    /// Which host (by name) answers ARP for `ip`, asked from the client: every distinct MAC
    /// that replied, mapped back to host names.
    pub fn arp_owners(&self, ip: &str) -> anyhow::Result<Vec<String>> {
        let client = self.client.ns();
        // arping exits non-zero when nobody answers; that is an answer too.
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.name,
                "arping",
                "-c",
                "2",
                "-w",
                "2",
                "-I",
                "eth0",
                ip,
            ])
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let mut owners: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| text.contains(&n.mac.to_lowercase()))
            .map(|n| n.name.clone())
            .collect();
        owners.sort();
        Ok(owners)
    }

    /// Nodes whose eth0 holds `ip`.
    pub fn holders(&self, ip: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| {
                n.ns.as_ref().is_some_and(|ns| {
                    ns.addresses("eth0")
                        .is_ok_and(|a| a.contains(&format!(" {ip}/")))
                })
            })
            .map(|n| n.name.clone())
            .collect()
    }
}

/// Copies connections made inside a namespace to an address on the host's loopback.
pub struct ApiRelay {
    pub port: u16,
    stopped: Arc<AtomicBool>,
    listener_fd: i32,
}

impl ApiRelay {
    pub fn start(ns: &Netns, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let stopped = Arc::new(AtomicBool::new(false));
        let listener_fd = listener.as_raw_fd();
        let stop = stopped.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(inside) = conn else { continue };
                let Ok(outside) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                else {
                    continue;
                };
                let (Ok(inside2), Ok(outside2)) = (inside.try_clone(), outside.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || copy_then_close(inside, outside));
                std::thread::spawn(move || copy_then_close(outside2, inside2));
            }
        });
        Ok(Self {
            port,
            stopped,
            listener_fd,
        })
    }
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees `stopped` and drops the listener.
        // SAFETY: shutdown(2) on a descriptor the accept thread still owns.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
    }
}

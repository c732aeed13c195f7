//! `ferry-bench-forwarder`: the forwarder's data plane against what users run today, in one
//! run so the ratios compare like with like. A client namespace and a node namespace on the
//! test switch; the backends (iperf3, and nginx answering a small HTTP body) listen on the
//! node's NodePorts; each variant puts something between the client and them:
//!
//! direct (no proxy), nftables DNAT written by hand, HAProxy (TCP mode), nginx stream, socat,
//! ferry's kernel path and ferry's userspace path (the real forwarder, driven by the real
//! control plane and operator), and the floor proxy (`ferry-bench-floor-proxy`: the least a
//! proxy can do per connection), its threads placed as the forwarder's are and, for the
//! placement's A/B, left to the scheduler. Figures: single-stream iperf3 throughput, wrk requests/s on
//! 32 keep-alive connections, and new connections/s (wrk with `Connection: close`). Each figure
//! is measured in slices, the paths compared with each other taking turns (see `--slices`):
//! on a shared machine, load comes and goes within seconds, and a path measured for five
//! seconds once per run would carry whatever load fell on those seconds into its ratio.
//!
//! Then VIP failover: three nodes with forwarders at default settings, the owner cut off the
//! switch and its forwarder killed once every forwarder hears every other directly; the time
//! until a client's requests succeed again.
//! Run through `e2e/bench/forwarder.sh`, which writes the results into `docs/results.md`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, Options, start_in_keeper_thread};
use ferry_e2e::forwarder::{ForwarderProcess, NodePorts, start_backend};
use ferry_e2e::netns::{Netns, Topology};
use ferry_e2e::nodes::register;
use ferry_e2e::operator::OperatorProcess;
use ferry_e2e::process::ProcessUnderTest;
use ferry_e2e::scenario::{ingress_ip, pool};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Runs of every measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Slices each measurement is cut into: the compared paths take turns a slice at a time
    /// (HAProxy, ferry, floor, …, then again in the next order), so load that comes and goes
    /// on the machine falls on all of them alike. Each slice lasts `seconds / slices` (at
    /// least 1 s).
    #[arg(long, default_value_t = 5)]
    slices: u64,
    /// Failovers measured (0 skips the failover part).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Measure only these paths (for quick comparisons while working; results for the record
    /// come from a full run), e.g. `haproxy,ferry-userspace`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also count each proxy's system calls per new connection (`perf stat` on its process
    /// during its first new-connection slice of each run; printed to stderr, not part of the
    /// table: tracing them costs CPU, so the CPU figures of such a run are not for the record).
    #[arg(long)]
    syscalls: bool,
    /// The rules "nftables by hand" is measured with, instead of its two DNAT rules: an
    /// nftables file in which `{NODE_IP}` stands for the node's address, steering
    /// 10.213.0.150:30280 to port 30282 of the node (and, optionally, port 30201 to the same
    /// port). For A/Bs of ferry's kernel table against variants of it (e2e/bench/nft/).
    #[arg(long)]
    hand_rules: Option<PathBuf>,
}

const IPERF_PORT: u16 = 30201;
const HTTP_PORT: u16 = 30280;
/// The same HTTP backend on ports of their own for the paths that reach it from the client's
/// own address, direct and nftables by hand (ferry's kernel path uses `HTTP_PORT`). The backend
/// closes each `Connection: close` connection first, so it keeps a TIME_WAIT socket per client
/// port for 60 s; the client stamps its timestamps with an offset per destination address, so
/// a SYN from a port another of these paths used moments ago can carry an older timestamp than
/// that TIME_WAIT socket holds and be dropped, costing the connection a 1 s retransmission.
/// With a port each, a path only ever meets its own TIME_WAIT sockets, whatever ran before it.
const DIRECT_HTTP_PORT: u16 = 30281;
const HAND_HTTP_PORT: u16 = 30282;
/// The address nftables-by-hand DNATs from (outside ferry's pool, so no forwarder touches it).
const HAND_VIP: &str = "10.213.0.150";
const POOL: &str = "10.213.0.200/29";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Direct,
    Nftables,
    Haproxy,
    Nginx,
    Socat,
    FerryKernel,
    FerryUserspace,
    Floor,
    FloorUnpinned,
}

impl Variant {
    const ALL: [Variant; 9] = [
        Variant::Direct,
        Variant::Nftables,
        Variant::Haproxy,
        Variant::Nginx,
        Variant::Socat,
        Variant::FerryKernel,
        Variant::FerryUserspace,
        Variant::Floor,
        Variant::FloorUnpinned,
    ];
    /// The order of measurement within each round of slices (which starts one path further on
    /// each round): each ferry path right after the path it is compared with.
    const MEASURED: [Variant; 9] = [
        Variant::Direct,
        Variant::FerryKernel,
        Variant::Nftables,
        Variant::Haproxy,
        Variant::FerryUserspace,
        Variant::Floor,
        Variant::FloorUnpinned,
        Variant::Nginx,
        Variant::Socat,
    ];

    /// Measured while the forwarder runs in kernel mode: ferry's kernel path and the two it is
    /// compared with. Every other path is measured while it runs in userspace mode.
    fn with_kernel_mode(self) -> bool {
        matches!(
            self,
            Variant::Direct | Variant::FerryKernel | Variant::Nftables
        )
    }

    /// The spelling `--only` takes.
    fn key(self) -> String {
        self.name()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join("-")
            .to_lowercase()
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Nftables => "nftables DNAT (by hand)",
            Variant::Haproxy => "HAProxy",
            Variant::Nginx => "nginx stream",
            Variant::Socat => "socat",
            Variant::FerryKernel => "ferry kernel",
            Variant::FerryUserspace => "ferry userspace",
            Variant::Floor => "floor proxy",
            Variant::FloorUnpinned => "unpinned floor proxy",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    gbits: f64,
    rps: f64,
    cps: f64,
    /// The proxy process's CPU time (all threads) per request and per new connection, in µs,
    /// where the path is one process (HAProxy, ferry's userspace path).
    cpu_per_request: Option<Cpu>,
    cpu_per_connection: Option<Cpu>,
}

/// CPU time of one process, split where it was spent.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// In the process's own code (and its libraries).
    user: f64,
    /// In the kernel on its behalf: system calls, and the network stack work they run.
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }

    fn plus(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    fn minus(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user - other.user,
            system: self.system - other.system,
        }
    }

    fn per(self, n: f64) -> Cpu {
        let each = 1e6 / n.max(1.0);
        Cpu {
            user: self.user * each,
            system: self.system * each,
        }
    }
}

/// CPU seconds `pid` (all threads) has used so far.
fn cpu_seconds(pid: u32) -> Option<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let (user, system) = (
        fields.get(11)?.parse::<f64>().ok()?,
        fields.get(12)?.parse::<f64>().ok()?,
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(Cpu {
        user: user / hz,
        system: system / hz,
    })
}

/// `perf stat` counting one process's system calls, by call.
struct SyscallCount {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl SyscallCount {
    fn start(pid: u32) -> anyhow::Result<SyscallCount> {
        let out = std::env::temp_dir().join(format!("ferry-bench-syscalls-{pid}.csv"));
        let child = std::process::Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "syscalls:sys_enter_*",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf stat")?;
        // perf attaches to every thread before it counts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(SyscallCount { child, out })
    }

    /// Stops counting and prints the calls per connection (`connections` in the run).
    fn report(mut self, path: &str, connections: f64) -> anyhow::Result<()> {
        // SAFETY: kill(2) with a pid we spawned; SIGINT makes perf write its counts.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        let _ = std::fs::remove_file(&self.out);
        let mut calls: Vec<(f64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split(',');
                let n: f64 = f.next()?.trim().parse().ok()?;
                let name = f
                    .nth(1)?
                    .trim_start_matches("syscalls:sys_enter_")
                    .to_string();
                (n > 0.0).then(|| (n / connections.max(1.0), name))
            })
            .collect();
        calls.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = calls.iter().map(|c| c.0).sum();
        let each: Vec<String> = calls
            .iter()
            .filter(|c| c.0 >= 0.01)
            .map(|(n, name)| format!("{name} {n:.2}"))
            .collect();
        eprintln!(
            "syscalls per new connection via {path}: {total:.2} in all: {}",
            each.join(", ")
        );
        Ok(())
    }
}

/// What wrk reported: requests per second and requests in all.
struct WrkRun {
    rate: f64,
    requests: f64,
}

fn in_ns(
    dir: &Path,
    ns: &Netns,
    what: &str,
    program: &str,
    args: Vec<String>,
) -> anyhow::Result<ProcessUnderTest> {
    let (ns_name, program) = (ns.name.clone(), program.to_string());
    ProcessUnderTest::start(what, dir.join(format!("{what}.log")), move || {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns_name])
            .arg(&program)
            .args(&args);
        Ok(cmd)
    })
}

fn wait_port(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ns
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).map(drop));
        if ok.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing answers on {addr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

struct Bench<'a> {
    args: &'a Args,
    client: &'a Netns,
}

impl Bench<'_> {
    /// One iperf3 measurement; tried again, up to three times, when iperf3 reports an error
    /// (its server takes one test at a time, and says it is busy while the last one ends).
    fn iperf(&self, ip: &str, port: u16, seconds: u64) -> anyhow::Result<f64> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.iperf_once(ip, port, seconds) {
                Ok(gbits) => return Ok(gbits),
                Err(err) if tries < 3 => {
                    eprintln!("iperf3 via {ip}:{port} failed ({err:#}), trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn iperf_once(&self, ip: &str, port: u16, seconds: u64) -> anyhow::Result<f64> {
        let out = self.client.exec(
            "iperf3",
            &[
                "-c",
                ip,
                "-p",
                &port.to_string(),
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("iperf3 printed no throughput: {}", v["error"]))
    }

    fn wrk(&self, ip: &str, port: u16, close: bool, seconds: u64) -> anyhow::Result<WrkRun> {
        let url = format!("http://{ip}:{port}/");
        let duration = format!("{seconds}s");
        let mut args = vec!["-t2", "-c32", "-d", &duration, "--timeout", "5s"];
        if close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let out = self.client.exec("wrk", &args)?;
        let rate = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("wrk printed no rate:\n{out}"))?;
        // "  123456 requests in 5.00s, …"
        let requests = out
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("wrk printed no request count:\n{out}"))?;
        Ok(WrkRun { rate, requests })
    }

    /// One slice of `metric` through `ip`; with `proxy`, also that process's CPU over it.
    fn slice(
        &self,
        metric: Metric,
        (ip, iperf_port, http_port): (&str, u16, u16),
        proxy: Option<u32>,
        count_syscalls: bool,
    ) -> anyhow::Result<Slice> {
        let seconds = (self.args.seconds / self.args.slices.max(1)).max(1);
        let cpu = || proxy.and_then(cpu_seconds);
        let before = cpu();
        let (rate, count) = match metric {
            Metric::Throughput => (self.iperf(ip, iperf_port, seconds)?, 0.0),
            Metric::Requests => {
                let run = self.wrk(ip, http_port, false, seconds)?;
                (run.rate, run.requests)
            }
            Metric::Connections => {
                let counting = match proxy {
                    Some(pid) if count_syscalls => Some(SyscallCount::start(pid)?),
                    _ => None,
                };
                let run = self.wrk(ip, http_port, true, seconds)?;
                if let Some(counting) = counting {
                    counting.report(ip, run.requests)?;
                }
                (run.rate, run.requests)
            }
        };
        let cpu = before.zip(cpu()).map(|(b, a)| a.minus(b));
        Ok(Slice { rate, count, cpu })
    }
}

/// What a slice measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    /// Single-stream iperf3 throughput.
    Throughput,
    /// wrk on 32 keep-alive connections.
    Requests,
    /// wrk with `Connection: close`: one new connection per request.
    Connections,
}

/// One slice's result: the rate (Gbit/s or per second), what wrk completed, the proxy's CPU.
struct Slice {
    rate: f64,
    count: f64,
    cpu: Option<Cpu>,
}

/// One metric's slices of one path in one run.
#[derive(Default)]
struct Part {
    rates: Vec<f64>,
    /// What wrk completed over them.
    count: f64,
    /// The proxy's CPU over them.
    cpu: Option<Cpu>,
}

impl Part {
    fn add(&mut self, slice: Slice) {
        self.rates.push(slice.rate);
        self.count += slice.count;
        self.cpu = match (self.cpu, slice.cpu) {
            (Some(a), Some(c)) => Some(a.plus(c)),
            (a, c) => a.or(c),
        };
    }

    /// The mean of the slices (all last alike).
    fn rate(&self) -> f64 {
        self.rates.iter().sum::<f64>() / (self.rates.len().max(1) as f64)
    }

    /// The CPU over every slice divided by what they completed, in µs each.
    fn cpu_each(&self) -> Option<Cpu> {
        self.cpu.map(|c| c.per(self.count))
    }
}

/// One path's slices in one run, summed.
#[derive(Default)]
struct Tally {
    throughput: Part,
    requests: Part,
    connections: Part,
    /// The control plane's CPU seconds and the wall-clock seconds over this path's slices.
    control_plane_cpu: f64,
    elapsed: f64,
}

impl Tally {
    fn add(&mut self, metric: Metric, slice: Slice) {
        match metric {
            Metric::Throughput => self.throughput.add(slice),
            Metric::Requests => self.requests.add(slice),
            Metric::Connections => self.connections.add(slice),
        }
    }

    fn figures(&self) -> Figures {
        Figures {
            gbits: self.throughput.rate(),
            rps: self.requests.rate(),
            cps: self.connections.rate(),
            cpu_per_request: self.requests.cpu_each(),
            cpu_per_connection: self.connections.cpu_each(),
        }
    }
}

async fn throughput(
    args: &Args,
    cp: &ControlPlane,
) -> anyhow::Result<Vec<(Variant, Vec<Figures>)>> {
    let dir = cp.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::new(&["bench-node"])?;
    let node = &topo.nodes[0];
    let node_ns = node.ns();
    let node_ip = node.ip.to_string();
    let admin = cp.admin_client().await?;
    register(&admin, &topo.simulated_nodes()).await?;
    Api::<LoadBalancerPool>::all(admin.clone())
        .create(&PostParams::default(), &pool("bench", &[POOL]))
        .await?;
    let _operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[])?;

    // Backends on the node's NodePorts.
    let _iperf = in_ns(
        &dir,
        node_ns,
        "iperf3-server",
        "iperf3",
        vec!["-s".into(), "-p".into(), IPERF_PORT.to_string()],
    )?;
    let backend_conf = write(
        &dir,
        "backend-nginx.conf",
        &format!(
            "worker_processes 1;\npid {d}/backend-nginx.pid;\nerror_log {d}/backend-nginx.err;\n\
             events {{ worker_connections 8192; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen {HTTP_PORT} reuseport; listen {DIRECT_HTTP_PORT} reuseport; listen {HAND_HTTP_PORT} reuseport; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    let _http = in_ns(
        &dir,
        node_ns,
        "backend-nginx",
        "nginx",
        vec![
            "-c".into(),
            backend_conf.display().to_string(),
            "-g".into(),
            "daemon off;".into(),
        ],
    )?
    .terminated_on_drop();

    // The proxies, each on its own ports of the node's address.
    node_ns.ip(&["addr", "add", &format!("{HAND_VIP}/32"), "dev", "eth0"])?;
    let hand = match &args.hand_rules {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .replace("{NODE_IP}", &node_ip),
        None => format!(
            "table ip bench {{ chain pre {{ type nat hook prerouting priority -100; policy accept;\n\
               ip daddr {HAND_VIP} tcp dport {IPERF_PORT} dnat to {node_ip}:{IPERF_PORT}\n\
               ip daddr {HAND_VIP} tcp dport {HTTP_PORT} dnat to {node_ip}:{HAND_HTTP_PORT}\n}}\n}}\n"
        ),
    };
    let hand = write(&dir, "hand.nft", &hand)?;
    node_ns.exec("nft", &["-f", hand.to_str().unwrap_or_default()])?;
    // With NAT in this namespace every connection is tracked, and one client's 60,000 closed
    // connections a measurement leaves in conntrack's TIME_WAIT (120 s) slow down whichever
    // path is measured next (its new connections land on old entries): forget them at once,
    // so each path starts from the same state whatever ran before it.
    node_ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")?;
    let haproxy_conf = write(
        &dir,
        "haproxy.cfg",
        &format!(
            "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen iperf\n  bind {node_ip}:15201\n  server b 127.0.0.1:{IPERF_PORT}\n\
             listen http\n  bind {node_ip}:18080\n  server b 127.0.0.1:{HTTP_PORT}\n"
        ),
    )?;
    let haproxy = in_ns(
        &dir,
        node_ns,
        "haproxy",
        "haproxy",
        vec![
            "-f".into(),
            haproxy_conf.display().to_string(),
            "-db".into(),
        ],
    )?;
    let nginx_conf = write(
        &dir,
        "stream-nginx.conf",
        &format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\n\
             pid {d}/stream-nginx.pid;\nerror_log {d}/stream-nginx.err;\nevents {{ worker_connections 8192; }}\n\
             stream {{ server {{ listen {node_ip}:25201; proxy_pass 127.0.0.1:{IPERF_PORT}; }}\n\
                       server {{ listen {node_ip}:28080; proxy_pass 127.0.0.1:{HTTP_PORT}; }} }}\n",
            d = dir.display()
        ),
    )?;
    let _nginx = in_ns(
        &dir,
        node_ns,
        "stream-nginx",
        "nginx",
        vec![
            "-c".into(),
            nginx_conf.display().to_string(),
            "-g".into(),
            "daemon off;".into(),
        ],
    )?
    .terminated_on_drop();
    let socat = |port: u16, to: u16, what: &str| {
        in_ns(
            &dir,
            node_ns,
            what,
            "socat",
            vec![
                format!("TCP-LISTEN:{port},fork,reuseaddr,bind={node_ip},backlog=4096"),
                format!("TCP:127.0.0.1:{to}"),
            ],
        )
    };
    let _socat_iperf = socat(35201, IPERF_PORT, "socat-iperf")?;
    let _socat_http = socat(38080, HTTP_PORT, "socat-http")?;
    let floor_proxy = |name: &str, ports: (u16, u16), pin: bool| {
        in_ns(
            &dir,
            node_ns,
            name,
            &ferry_e2e::operator::binary("ferry-bench-floor-proxy")?
                .display()
                .to_string(),
            vec![
                "--route".into(),
                format!("{node_ip}:{},127.0.0.1:{IPERF_PORT}", ports.0),
                "--route".into(),
                format!("{node_ip}:{},127.0.0.1:{HTTP_PORT}", ports.1),
                "--pin-threads".into(),
                pin.to_string(),
            ],
        )
    };
    let floor = floor_proxy("floor-proxy", (45201, 48080), true)?;
    // The same proxy with its threads left to the scheduler: the placement's A/B.
    let unpinned_floor = floor_proxy("unpinned-floor-proxy", (55201, 58080), false)?;

    // ferry: a Service whose ports reach the same NodePorts.
    let svcs: Api<Service> = Api::namespaced(admin.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "bench" },
        "spec": { "type": "LoadBalancer", "ports": [
            { "name": "iperf", "port": 5201, "nodePort": IPERF_PORT, "protocol": "TCP" },
            { "name": "http", "port": 80, "nodePort": HTTP_PORT, "protocol": "TCP" } ] }
    }))?;
    svcs.create(&PostParams::default(), &svc).await?;
    let vip = address_of(&svcs, "bench").await?;

    let client = topo.client.ns();
    for (ip, port) in [
        (node_ip.as_str(), DIRECT_HTTP_PORT),
        (HAND_VIP, HTTP_PORT),
        (node_ip.as_str(), 18080),
        (node_ip.as_str(), 28080),
        (node_ip.as_str(), 38080),
        (node_ip.as_str(), 48080),
    ] {
        wait_port(client, format!("{ip}:{port}").parse()?)?;
    }
    let bench = Bench { args, client };
    let mut results: Vec<(Variant, Vec<Figures>)> = Variant::MEASURED
        .iter()
        .filter(|v| args.only.is_empty() || args.only.contains(&v.key()))
        .map(|v| (*v, Vec::new()))
        .collect();
    // The forwarder runs through every path, as its DaemonSet would on the node, so each
    // path is measured with its heartbeats and watches loading the control plane alike; in
    // userspace mode it touches nothing but the VIP's ports. For the kernel path it is
    // restarted in kernel mode, and back.
    let start_forwarder = |mode: &str| -> anyhow::Result<ForwarderProcess> {
        let f = ForwarderProcess::start(
            cp,
            node_ns,
            &node.name,
            &["--mode", mode, "--log-filter", "warn"],
        )?;
        wait_port(client, format!("{vip}:80").parse()?)?;
        Ok(f)
    };
    let mut forwarder = start_forwarder("userspace")?;
    let control_plane: Vec<u32> = ["kube-apiserver", "etcd", "ferry-operator"]
        .iter()
        .filter_map(|name| {
            let out = std::process::Command::new("pgrep")
                .args(["-n", "-x", name])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let control_plane_cpu = || {
        control_plane
            .iter()
            .filter_map(|p| cpu_seconds(*p))
            .map(Cpu::total)
            .sum::<f64>()
    };
    let route = |variant: Variant| -> (String, u16, u16) {
        match variant {
            Variant::Direct => (node_ip.clone(), IPERF_PORT, DIRECT_HTTP_PORT),
            Variant::Nftables => (HAND_VIP.to_string(), IPERF_PORT, HTTP_PORT),
            Variant::Haproxy => (node_ip.clone(), 15201, 18080),
            Variant::Nginx => (node_ip.clone(), 25201, 28080),
            Variant::Socat => (node_ip.clone(), 35201, 38080),
            Variant::Floor => (node_ip.clone(), 45201, 48080),
            Variant::FloorUnpinned => (node_ip.clone(), 55201, 58080),
            Variant::FerryKernel | Variant::FerryUserspace => (vip.clone(), 5201, 80),
        }
    };
    for run in 0..args.runs {
        let mut tallies: Vec<Tally> = results.iter().map(|_| Tally::default()).collect();
        // The paths compared with each other take turns a slice at a time, one metric after
        // the other; each round starts one path further on, so none always follows the same.
        for kernel in [true, false] {
            let group: Vec<usize> = results
                .iter()
                .enumerate()
                .filter(|(_, (v, _))| v.with_kernel_mode() == kernel)
                .map(|(i, _)| i)
                .collect();
            if group.is_empty() {
                continue;
            }
            if kernel {
                forwarder.terminate();
                forwarder = start_forwarder("kernel")?;
            }
            for metric in [Metric::Throughput, Metric::Requests, Metric::Connections] {
                for round in 0..args.slices.max(1) as usize {
                    for k in 0..group.len() {
                        let Some(&i) = group.get((round + k) % group.len()) else {
                            continue;
                        };
                        let (Some((variant, _)), Some(tally)) =
                            (results.get(i), tallies.get_mut(i))
                        else {
                            continue;
                        };
                        let proxy = match variant {
                            Variant::Haproxy => haproxy.pid(),
                            Variant::FerryUserspace => forwarder.pid(),
                            Variant::Floor => floor.pid(),
                            Variant::FloorUnpinned => unpinned_floor.pid(),
                            _ => None,
                        };
                        let (ip, iperf, http) = route(*variant);
                        // Let the previous slice's closed connections leave conntrack.
                        if metric == Metric::Connections {
                            std::thread::sleep(Duration::from_millis(1500));
                        }
                        let (cpu_before, started) = (control_plane_cpu(), Instant::now());
                        let slice = bench.slice(
                            metric,
                            (&ip, iperf, http),
                            proxy,
                            args.syscalls && round == 0,
                        )?;
                        tally.control_plane_cpu += control_plane_cpu() - cpu_before;
                        tally.elapsed += started.elapsed().as_secs_f64();
                        tally.add(metric, slice);
                    }
                }
            }
            if kernel {
                forwarder.terminate();
                forwarder = start_forwarder("userspace")?;
            }
        }
        for ((variant, figures), tally) in results.iter_mut().zip(&tallies) {
            let f = tally.figures();
            let cpu = match (f.cpu_per_request, f.cpu_per_connection) {
                (Some(r), Some(c)) => format!(
                    ", proxy CPU {:.1} µs/req ({:.1} user), {:.1} µs/conn ({:.1} user)",
                    r.total(),
                    r.user,
                    c.total(),
                    c.user
                ),
                _ => String::new(),
            };
            eprintln!(
                "run {} {:<24} {:6.2} Gbit/s {:9.0} req/s {:8.0} conn/s (control plane {:.1} % of a core{cpu})",
                run + 1,
                variant.name(),
                f.gbits,
                f.rps,
                f.cps,
                tally.control_plane_cpu * 100.0 / tally.elapsed.max(f64::MIN_POSITIVE)
            );
            figures.push(f);
        }
    }
    forwarder.terminate();
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone())
        .delete(&node.name, &Default::default())
        .await;
    Ok(results)
}

/// The address the operator gives Service `name`, waited for at most a minute.
async fn address_of(svcs: &Api<Service>, name: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ip) = svcs.get_opt(name).await?.as_ref().and_then(ingress_ip) {
            return Ok(ip);
        }
        if Instant::now() > deadline {
            bail!("Service {name} got no address");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `what` to become `Some`, for at most a minute.
async fn within_a_minute<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Failover at default settings: returns the seconds from cutting the owner off until the
/// client's requests succeed again, per failover.
async fn failover(args: &Args, cp: &ControlPlane) -> anyhow::Result<Vec<f64>> {
    let dir = cp.dir.clone();
    let names = ["fo-node-1", "fo-node-2", "fo-node-3"];
    let topo = Topology::new(&names)?;
    let admin = cp.admin_client().await?;
    register(&admin, &topo.simulated_nodes()).await?;
    let _operator = OperatorProcess::start(&cp.operator_kubeconfig, &cp.dir, &[])?;
    let mut backends = Vec::new();
    let mut forwarders = Vec::new();
    for h in &topo.nodes {
        backends.push(start_backend(
            &dir,
            h.ns(),
            &h.name,
            &[30380],
            &[],
            None,
            NodePorts::Listening,
        )?);
        forwarders.push(ForwarderProcess::start(cp, h.ns(), &h.name, &[])?);
    }
    let svcs: Api<Service> = Api::namespaced(admin.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "failover" },
        "spec": { "type": "LoadBalancer", "ports": [
            { "name": "http", "port": 80, "nodePort": 30380, "protocol": "TCP" } ] }
    }))?;
    svcs.create(&PostParams::default(), &svc).await?;
    let vip = address_of(&svcs, "failover").await?;
    let target: SocketAddr = format!("{vip}:80").parse()?;
    let client = topo.client.ns();
    let get = move || -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&target, Duration::from_millis(100))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf)?;
        if n == 0 {
            Err(std::io::Error::other("closed"))
        } else {
            Ok(())
        }
    };
    let mut times = Vec::new();
    for round in 0..args.failovers {
        // One owner, serving, and every forwarder hearing the others directly (a node lost
        // within a second of a forwarder's start, before its peers have heard it, is judged by
        // its Lease and moves at Lease expiry, about 2 s: that case is the liveness bench's).
        let owner = within_a_minute("one node holding the VIP and serving", || {
            let h = topo.holders(&vip);
            let settled = forwarders
                .iter()
                .all(|f| f.peers("heard") == Some((names.len() - 1) as f64));
            (h.len() == 1 && settled && client.enter(get).is_ok()).then(|| h[0].clone())
        })
        .await?;
        let i = names
            .iter()
            .position(|n| *n == owner)
            .context("owner is not a node")?;
        // The node fails: off the switch, its forwarder gone without a word.
        let cut = Instant::now();
        topo.switch.ip(&["link", "set", &format!("p{i}"), "down"])?;
        forwarders[i].kill();
        let took = client.enter(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if get().is_ok() {
                    return Ok(cut.elapsed());
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other("no traffic within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })?;
        eprintln!(
            "failover {}: owner {owner} lost, traffic again after {took:?}",
            round + 1
        );
        times.push(took.as_secs_f64());
        // The node comes back.
        forwarders[i].restart()?;
        topo.switch.ip(&["link", "set", &format!("p{i}"), "up"])?;
    }
    drop(backends);
    Ok(times)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for tool in [
        "iperf3", "wrk", "haproxy", "nginx", "socat", "nft", "curl", "arping",
    ] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing (e2e/bench/forwarder.sh installs it)");
        }
    }
    let _ = ferry_forwarder::raise_open_files_limit();
    let cp = start_in_keeper_thread(Options::default());
    let runtime = tokio::runtime::Runtime::new()?;
    let results = runtime.block_on(throughput(&args, &cp))?;
    let failovers = if args.failovers == 0 {
        Vec::new()
    } else {
        runtime.block_on(failover(&args, &cp))?
    };

    let med = |v: Variant, f: fn(&Figures) -> f64| {
        median(
            results
                .iter()
                .find(|(x, _)| *x == v)
                .map(|(_, r)| r.iter().map(f).collect())
                .unwrap_or_default(),
        )
    };
    let gb = |f: &Figures| f.gbits;
    let rps = |f: &Figures| f.rps;
    let cps = |f: &Figures| f.cps;
    println!(
        "| path | throughput, 1 TCP stream (Gbit/s) | requests/s, 32 keep-alive connections | new connections/s |"
    );
    println!("| --- | --- | --- | --- |");
    for v in Variant::ALL {
        println!(
            "| {} | {:.2} | {:.0} | {:.0} |",
            v.name(),
            med(v, gb),
            med(v, rps),
            med(v, cps)
        );
    }
    println!();
    println!(
        "| ratio, median of the runs' own ratios (lowest–highest) | throughput | requests/s | new connections/s | target |"
    );
    println!("| --- | --- | --- | --- | --- |");
    // Paired: the ratio within each run (the two paths measured back to back), then the
    // median of those, so load that drifts between runs cancels out.
    let ratio = |a: Variant, b: Variant, f: fn(&Figures) -> f64| {
        let runs = |v: Variant| {
            results
                .iter()
                .find(|(x, _)| *x == v)
                .map(|(_, r)| r.iter().map(f).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let per_run: Vec<f64> = runs(a)
            .iter()
            .zip(runs(b))
            .map(|(x, y)| x / y.max(f64::MIN_POSITIVE))
            .collect();
        let (lo, hi) = per_run.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        if per_run.is_empty() {
            "—".to_string()
        } else {
            format!("{:.2} ({lo:.2}–{hi:.2})", median(per_run))
        }
    };
    println!(
        "| ferry userspace / HAProxy | {} | {} | {} | ≥ 1.2, ≥ 1.1, ≥ 1.1 |",
        ratio(Variant::FerryUserspace, Variant::Haproxy, gb),
        ratio(Variant::FerryUserspace, Variant::Haproxy, rps),
        ratio(Variant::FerryUserspace, Variant::Haproxy, cps)
    );
    println!(
        "| floor proxy / HAProxy (the least a proxy can do per connection; it copies, so not a bound on throughput) | {} | {} | {} | — |",
        ratio(Variant::Floor, Variant::Haproxy, gb),
        ratio(Variant::Floor, Variant::Haproxy, rps),
        ratio(Variant::Floor, Variant::Haproxy, cps)
    );
    println!(
        "| floor proxy / unpinned floor proxy (what placing each thread on the CPU of its connections does) | {} | {} | {} | — |",
        ratio(Variant::Floor, Variant::FloorUnpinned, gb),
        ratio(Variant::Floor, Variant::FloorUnpinned, rps),
        ratio(Variant::Floor, Variant::FloorUnpinned, cps)
    );
    println!(
        "| ferry kernel / direct | {} | {} | {} | throughput ≥ 0.97 |",
        ratio(Variant::FerryKernel, Variant::Direct, gb),
        ratio(Variant::FerryKernel, Variant::Direct, rps),
        ratio(Variant::FerryKernel, Variant::Direct, cps)
    );
    println!(
        "| ferry kernel / nftables by hand | {} | {} | {} | new connections/s ≥ 1.0 |",
        ratio(Variant::FerryKernel, Variant::Nftables, gb),
        ratio(Variant::FerryKernel, Variant::Nftables, rps),
        ratio(Variant::FerryKernel, Variant::Nftables, cps)
    );
    println!();
    let cpu_of = |v: Variant, f: fn(&Figures) -> Option<Cpu>, part: fn(Cpu) -> f64| {
        let values: Vec<f64> = results
            .iter()
            .find(|(x, _)| *x == v)
            .map(|(_, r)| r.iter().filter_map(f).map(part).collect())
            .unwrap_or_default();
        if values.is_empty() {
            "—".to_string()
        } else {
            format!("{:.1}", median(values))
        }
    };
    let per_req = |f: &Figures| f.cpu_per_request;
    let per_conn = |f: &Figures| f.cpu_per_connection;
    let (total, user, system) = (Cpu::total, |c: Cpu| c.user, |c: Cpu| c.system);
    println!(
        "| proxy CPU, all threads, µs (median of the runs) | per request, keep-alive | of which user | per new connection | of which user | of which system |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for v in [
        Variant::Haproxy,
        Variant::FerryUserspace,
        Variant::Floor,
        Variant::FloorUnpinned,
    ] {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            v.name(),
            cpu_of(v, per_req, total),
            cpu_of(v, per_req, user),
            cpu_of(v, per_conn, total),
            cpu_of(v, per_conn, user),
            cpu_of(v, per_conn, system)
        );
    }
    println!();
    // What the user-space share leaves to gain: were ferry's own code free, its CPU per new
    // connection would be its system time alone, against HAProxy's whole.
    let bound: Vec<f64> = results
        .iter()
        .find(|(x, _)| *x == Variant::Haproxy)
        .zip(results.iter().find(|(x, _)| *x == Variant::FerryUserspace))
        .map(|((_, h), (_, f))| {
            h.iter()
                .zip(f)
                .filter_map(|(h, f)| {
                    Some(h.cpu_per_connection?.total() / f.cpu_per_connection?.system)
                })
                .collect()
        })
        .unwrap_or_default();
    if !bound.is_empty() {
        println!(
            "HAProxy's CPU per new connection over ferry's system time alone (the ceiling of ferry's CPU advantage, were its own code free): {:.2}",
            median(bound)
        );
        println!();
    }
    println!();
    let all: Vec<String> = failovers.iter().map(|t| format!("{t:.2} s")).collect();
    println!(
        "| VIP failover, owner node lost → client traffic flows again | median of {} | all |",
        failovers.len()
    );
    println!("| --- | --- | --- |");
    println!(
        "| default settings (peer heartbeats every 200 ms, silent after 600 ms; 2 s Lease, 500 ms renewals); target < 1 s | {:.2} s | {} |",
        median(failovers.clone()),
        all.join(", ")
    );
    Ok(())
}

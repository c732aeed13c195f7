//! `ferry-bench-scale`: the forwarder's data plane with many VIPs on one node. In a network
//! namespace of its own (gone when the process exits), it drives the forwarder library's
//! `Kernel` or `Userspace` (`--mode`) as the forwarder does, with `--vips` VIPs × `--ports`
//! ports (two backends each) on the loopback interface, and measures: the time to apply the
//! whole plan, the time to apply single-Service changes (a port added, backends changed, a
//! port removed, the port added back), the process's RSS, and throughput (iperf3) and new
//! connections/s through one VIP with one VIP present and with all of them present.
//! Prints a Markdown table row per figure; run through `e2e/bench/scale.sh`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use ferry_forwarder::kernel::{self, Kernel};
use ferry_forwarder::metrics::DataplaneMetrics;
use ferry_forwarder::plan::{Frontend, HealthCheck};
use ferry_forwarder::userspace::{Limits, Userspace, relay};
use ferry_model::Protocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Kernel,
    Userspace,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 1000)]
    vips: usize,
    /// Ports per VIP (at most 4: 80, 443, 5201, 8080).
    #[arg(long, default_value_t = 4)]
    ports: usize,
    /// Single-Service changes timed (in rounds of four kinds).
    #[arg(long, default_value_t = 24)]
    changes: usize,
    /// Runs of each traffic figure; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per traffic run.
    #[arg(long, default_value_t = 2)]
    seconds: u64,
}

const PORTS: [u16; 4] = [80, 443, 5201, 8080];
/// The NodePorts of the measured VIP: iperf3 behind port 5201, an accept-and-close server
/// behind port 80.
const IPERF_NODEPORT: u16 = 30201;
const ACCEPT_NODEPORT: u16 = 30280;
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 250, 0, 1),
    Ipv4Addr::new(10, 250, 0, 2),
    Ipv4Addr::new(10, 250, 0, 3),
];

fn vip(i: usize) -> Ipv4Addr {
    // 10.240.0.1 onwards, 250 a /24.
    Ipv4Addr::new(10, 240, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The VIP traffic goes through: the last, where a dispatch that scans VIPs in order finds it
/// last.
fn measured(vips: usize) -> usize {
    vips - 1
}

fn frontend(i: usize, port: u16, backends: &[Ipv4Addr], vips: usize) -> Frontend {
    let nodeport = match port {
        5201 if i == measured(vips) => IPERF_NODEPORT,
        80 if i == measured(vips) => ACCEPT_NODEPORT,
        _ => 31000 + port % 1000,
    };
    Frontend {
        service: format!("bench/svc-{i}"),
        vip: IpAddr::V4(vip(i)),
        port,
        protocol: Protocol::Tcp,
        backends: backends
            .iter()
            .map(|b| SocketAddr::new(IpAddr::V4(*b), nodeport))
            .collect(),
        health: HealthCheck::Connect,
        affinity: None,
        proxy_protocol: false,
        source_ranges: vec![],
        local: false,
    }
}

/// The frontends of VIPs `from..vips`.
fn plan(from: usize, vips: usize, ports: usize) -> Vec<Frontend> {
    (from..vips)
        .flat_map(|i| {
            PORTS
                .iter()
                .take(ports)
                .map(move |p| frontend(i, *p, &BACKENDS[..2], vips))
        })
        .collect()
}

enum Plane {
    Kernel(Kernel),
    Userspace(Userspace),
}

impl Plane {
    async fn apply(&mut self, frontends: &[Frontend]) -> anyhow::Result<()> {
        match self {
            Plane::Kernel(k) => k.apply(frontends).await.context("nftables")?,
            Plane::Userspace(u) => {
                if let Some((f, err)) = u.apply(frontends).into_iter().next() {
                    bail!("cannot listen on {}:{}: {err}", f.vip, f.port);
                }
            }
        }
        Ok(())
    }
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Puts this process (and what it starts) into a network namespace of its own, with the
/// VIPs and the backends' addresses on its loopback interface.
fn enter_netns(vips: usize) -> anyhow::Result<()> {
    // SAFETY: called before any thread is started; unshare affects only this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "cannot make a network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut batch = String::from("link set lo up\n");
    batch.push_str(&format!("address add {HAND}/32 dev lo\n"));
    for b in BACKENDS {
        batch.push_str(&format!("address add {b}/32 dev lo\n"));
    }
    for i in 0..vips {
        batch.push_str(&format!("address add {}/32 dev lo\n", vip(i)));
    }
    let path = std::env::temp_dir().join(format!("ferry-bench-scale-{}.ip", std::process::id()));
    std::fs::write(&path, batch)?;
    let added = run("ip", &["-batch", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    added.map(|_| ())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Accepts connections and closes them at once, on its own threads.
fn accept_and_close(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    Ok(())
}

fn iperf_gbits(to: Ipv4Addr, seconds: u64) -> anyhow::Result<f64> {
    let out = run(
        "iperf3",
        &[
            "-c",
            &to.to_string(),
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no throughput in iperf3's report")
}

/// New connections per second to `to`:80, for `seconds`: each opened, closed by the server,
/// then by the client (so no TIME_WAIT stays on the client's side). Connections that fail
/// (a SYN lost to a reused port, say) are retried and counted apart.
fn connections_per_second(to: Ipv4Addr, seconds: u64) -> anyhow::Result<(f64, u64)> {
    let addr = SocketAddr::new(IpAddr::V4(to), 80);
    let start = Instant::now();
    let (mut n, mut failed) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(seconds) {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut stream) => {
                let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
                n += 1;
            }
            Err(_) => failed += 1,
        }
    }
    if n == 0 {
        bail!("no connection to {addr} succeeded");
    }
    Ok((n as f64 / start.elapsed().as_secs_f64(), failed))
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(at).copied().unwrap_or(f64::NAN)
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The address nftables DNAT by hand serves (not one of the VIPs, so ferry leaves it alone).
const HAND: Ipv4Addr = Ipv4Addr::new(10, 249, 0, 1);

/// The reference: what a user would write by hand, one DNAT rule per port, in its own table.
fn hand_dnat(on: bool) -> anyhow::Result<()> {
    let script = if on {
        format!(
            "table ip bench_hand {{\n\tchain out {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tip daddr {HAND} tcp dport 80 dnat to {b}:{ACCEPT_NODEPORT}\n\t\tip daddr {HAND} tcp dport 5201 dnat to {b}:{IPERF_NODEPORT}\n\t}}\n}}\n",
            b = BACKENDS[0]
        )
    } else {
        "delete table ip bench_hand\n".to_string()
    };
    let path = std::env::temp_dir().join(format!("ferry-bench-scale-{}.nft", std::process::id()));
    std::fs::write(&path, script)?;
    let done = run("nft", &["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    done.map(|_| ())
}

async fn traffic(args: &Args) -> anyhow::Result<(f64, f64)> {
    traffic_to(vip(measured(args.vips)), args)
}

fn traffic_to(to: Ipv4Addr, args: &Args) -> anyhow::Result<(f64, f64)> {
    let mut gbits = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..args.runs {
        gbits.push(iperf_gbits(to, args.seconds)?);
        let (rate, lost) = connections_per_second(to, args.seconds)?;
        rates.push(rate);
        if lost > 0 {
            eprintln!("{to}: {lost} connections failed and were retried");
        }
    }
    Ok((quantile(&gbits, 0.5), quantile(&rates, 0.5)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.ports == 0 || args.ports > PORTS.len() || args.vips < 2 || args.vips > 250 * 256 {
        bail!("--ports must be 1 to 4 and --vips 2 to 64000");
    }
    enter_netns(args.vips)?;
    ferry_forwarder::raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let _iperf = Killed(
        Command::new("iperf3")
            .args(["-s", "-p", &IPERF_NODEPORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start iperf3")?,
    );
    accept_and_close(ACCEPT_NODEPORT)?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mode = format!("{:?}", args.mode).to_lowercase();
    let rss_start = rss_mib();
    let mut plane = match args.mode {
        Mode::Kernel => Plane::Kernel(Kernel::default()),
        Mode::Userspace => Plane::Userspace(Userspace::new(
            Limits {
                connect_timeout: Duration::from_secs(2),
                timeouts: relay::Timeouts {
                    idle: Duration::from_secs(60),
                    half_close: Duration::from_secs(60),
                },
                max_connections: 10_000,
                udp_max_flows: 1_000,
                udp_idle_timeout: Duration::from_secs(30),
                pin_threads: true,
            },
            Arc::new(DataplaneMetrics::default()),
        )),
    };
    let row = |what: &str, value: String| println!("| {mode} | {what} | {value} |");

    // One VIP.
    let one = plan(measured(args.vips), args.vips, args.ports);
    plane.apply(&one).await?;
    let (gbits_one, rate_one) = traffic(&args).await?;

    // All of them, applied as the first plan after start would be.
    let mut all = plan(0, args.vips, args.ports);
    let started = Instant::now();
    plane.apply(&all).await?;
    let whole = started.elapsed();
    let rss_all = rss_mib();
    let (gbits_all, rate_all) = traffic(&args).await?;
    // The same, alternating with DNAT by hand, so the two compare within one run.
    let hand = if args.mode == Mode::Kernel {
        hand_dnat(true)?;
        let figures = traffic_to(HAND, &args);
        hand_dnat(false)?;
        Some(figures?)
    } else {
        None
    };

    // Single-Service changes, on VIPs other than the measured one.
    let kinds = [
        "port added",
        "backends changed",
        "port removed",
        "port added back",
    ];
    let mut timings: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut computing = Vec::new();
    for c in 0..args.changes {
        let before = all.clone();
        let i = (c / kinds.len()) * 7 % measured(args.vips);
        let at = |all: &[Frontend], port: u16| {
            all.iter()
                .position(|f| f.vip == IpAddr::V4(vip(i)) && f.port == port)
        };
        match c % kinds.len() {
            0 => all.push(frontend(i, 9000, &BACKENDS[..2], args.vips)),
            1 => {
                let Some(at) = at(&all, PORTS[0]) else {
                    bail!("no frontend to change")
                };
                all[at] = frontend(i, PORTS[0], &BACKENDS[1..], args.vips);
            }
            2 => {
                let Some(at) = at(&all, 9000) else {
                    bail!("no frontend to remove")
                };
                all.remove(at);
            }
            _ => all.push(frontend(i, 9000, &BACKENDS[..2], args.vips)),
        }
        if let Plane::Kernel(_) = plane {
            // The pure part alone: the plans by identity and the transaction between them.
            let started = Instant::now();
            let _ = kernel::changes(&kernel::by_identity(&before), &kernel::by_identity(&all));
            computing.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let started = Instant::now();
        plane.apply(&all).await?;
        timings[c % kinds.len()].push(started.elapsed().as_secs_f64() * 1e3);
    }
    let counting = match &mut plane {
        Plane::Kernel(k) => {
            let started = Instant::now();
            let _ = k.new_connections().await;
            Some(started.elapsed())
        }
        Plane::Userspace(_) => None,
    };

    let n = args.vips * args.ports;
    row(
        "whole plan applied (first apply)",
        format!("{:.0} ms ({n} frontends)", whole.as_secs_f64() * 1e3),
    );
    let every: Vec<f64> = timings.iter().flatten().copied().collect();
    row(
        &format!("one Service changed, all kinds ({} changes)", every.len()),
        format!(
            "median {:.1} ms, p90 {:.1} ms",
            quantile(&every, 0.5),
            quantile(&every, 0.9)
        ),
    );
    for (kind, t) in kinds.iter().zip(&timings) {
        row(
            &format!("— {kind} ({})", t.len()),
            format!(
                "median {:.1} ms, p90 {:.1} ms",
                quantile(t, 0.5),
                quantile(t, 0.9)
            ),
        );
    }
    if !computing.is_empty() {
        row(
            "— of which computing the transaction (diff of the plans)",
            format!("median {:.1} ms", quantile(&computing, 0.5)),
        );
    }
    if let Some(counting) = counting {
        row(
            "counters read (every 5 s)",
            format!("{:.1} ms", counting.as_secs_f64() * 1e3),
        );
    }
    row(
        "process RSS: before / with all frontends",
        format!("{rss_start:.1} MiB / {rss_all:.1} MiB"),
    );
    row(
        "iperf3 through one VIP: 1 VIP / all present",
        format!("{gbits_one:.2} / {gbits_all:.2} Gbit/s"),
    );
    row(
        "new connections/s through one VIP: 1 VIP / all present",
        format!("{rate_one:.0} / {rate_all:.0}"),
    );
    if let Some((gbits, rate)) = hand {
        row(
            "nftables DNAT by hand (1 rule per port), same run: iperf3 / new connections/s",
            format!("{gbits:.2} Gbit/s / {rate:.0}"),
        );
    }
    if let Plane::Kernel(k) = &mut plane {
        k.clear().await?;
    } else if let Plane::Userspace(u) = &mut plane {
        u.apply(&[]);
    }
    Ok(())
}

//! `ferry-sandbox`: a whole ferry cluster on one machine, in one command. A real
//! kube-apiserver and etcd, simulated nodes on loopback addresses with NodePort responders,
//! a default address pool, the operator and one forwarder per node (each with exactly
//! ferry's RBAC). The forwarders run in userspace mode without touching interfaces: every
//! loopback address is already local, so holding a VIP is binding it, and `curl` to an
//! EXTERNAL-IP reaches the NodePorts through the VIP's owner. With `--provider aws` or
//! `--provider gce` the operator provisions in moto's server or the Compute Engine fake
//! instead (no pool, no forwarders), run as a child process of this binary so that the
//! cloud's environment is its own. Prints the kubeconfig to use; Ctrl-C stops everything and
//! removes what it created.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ferry_crds::LoadBalancerPool;
use ferry_e2e::control_plane::{ControlPlane, Options, client_from};
use ferry_e2e::nodes::{register_nodes, start_responders};
use ferry_e2e::process::ProcessUnderTest;
use ferry_e2e::sandbox::Cloud;
use ferry_e2e::scenario::pool;
use ferry_forwarder::config::Config as ForwarderConfig;
use ferry_operator::config::Config as OperatorConfig;
use kube::api::{Api, Patch, PatchParams};

/// Prints a line for the user; a closed stdout (piped into `head`) must not stop the sandbox.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry-sandbox",
    about = "Run ferry against a real, local Kubernetes control plane"
)]
struct Args {
    /// Number of simulated nodes (127.0.1.1, 127.0.1.2, ...).
    #[arg(long, env = "FERRY_SANDBOX_NODES", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=50))]
    nodes: u8,

    /// Address range of the default LoadBalancerPool.
    #[arg(long, env = "FERRY_SANDBOX_POOL", default_value = "127.240.0.0/24")]
    pool: String,

    /// Provider to run the operator with.
    /// `aws` runs it against moto's server, `gce` against the Compute Engine fake, both
    /// seeded with an instance per node: every provider with no cloud account.
    #[arg(long, env = "FERRY_SANDBOX_PROVIDER", default_value = "local", value_parser = ["local", "aws", "gce"])]
    provider: String,

    /// Do not run the operator: run your own against the printed operator kubeconfig.
    #[arg(long)]
    no_operator: bool,

    /// Do not run the forwarders (EXTERNAL-IPs then do not answer; NodePorts still do).
    #[arg(long)]
    no_forwarders: bool,

    /// Also copy the admin kubeconfig here (it always lives in the sandbox's own folder).
    #[arg(long, env = "FERRY_SANDBOX_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

/// The hidden first argument that makes this binary the sandbox's operator process.
const OPERATOR: &str = "__operator";

/// This binary as the operator (`ferry-sandbox __operator <operator flags>`), as
/// `ferry-operator` would run.
fn operator_main() {
    let args = std::env::args_os().skip(2);
    let config = ferry_runtime::or_exit(OperatorConfig::parse_args(
        std::iter::once("ferry-operator".into()).chain(args),
    ));
    if let Err(err) = ferry_operator::init_logging(&config) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(ferry_operator::run(config)));
    if let Err(err) = result {
        ferry_runtime::exit_with(&err);
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(OPERATOR) {
        return operator_main();
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            print!("{e}");
            return;
        }
        Err(e) => {
            let line = e.to_string().lines().next().unwrap_or_default().to_string();
            eprintln!("{line}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    };
    // Listening for Ctrl-C and SIGTERM from the start: one that comes while the control
    // plane starts is kept, and the sandbox stops (and cleans up) as soon as it is up,
    // instead of dying with its folder and processes left behind.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        ferry_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // The control plane's processes die with the thread that started them: this one.
    eprintln!(
        "ferry-sandbox: starting kube-apiserver and etcd (the first run builds them from their Go modules: a few minutes)"
    );
    let cp = match ControlPlane::start(&Options::default()) {
        Ok(cp) => cp,
        Err(err) => {
            eprintln!("error: the control plane did not start: {err:#}");
            std::process::exit(1);
        }
    };
    if *stop.borrow() {
        eprintln!("ferry-sandbox: stopped while starting");
        drop(runtime);
        drop(cp);
        return;
    }
    let result = runtime.block_on(run(&args, &cp, stop));
    drop(runtime);
    drop(cp);
    if let Some(path) = &args.kubeconfig {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(()) => eprintln!("ferry-sandbox: stopped and cleaned up"),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}

/// The forwarders' kubeconfig (their own identity), next to the others.
fn write_forwarder_kubeconfig(cp: &ControlPlane) -> anyhow::Result<PathBuf> {
    let path = cp.dir.join("forwarder.kubeconfig");
    std::fs::write(&path, cp.kubeconfig_via(&cp.url, &cp.forwarder_token))?;
    Ok(path)
}

async fn run(
    args: &Args,
    cp: &ControlPlane,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let log_path = cp.dir.join("operator.log");
    let log_file = std::fs::File::create(&log_path)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log_file))
        .init();

    let admin = cp.admin_client().await?;
    let nodes = register_nodes(&admin, "sandbox-node", usize::from(args.nodes)).await?;
    let _responders = start_responders(admin.clone(), nodes.clone());
    if args.provider != "local" {
        return run_cloud(args, cp, &admin, &nodes, &log_path, stop).await;
    }
    let pools: Api<LoadBalancerPool> = Api::all(admin.clone());
    let mut default_pool = pool("default", &[args.pool.as_str()]);
    default_pool.spec.avoid_buggy_ips = true;
    let mut default_pool = serde_json::to_value(default_pool)?;
    default_pool["apiVersion"] = "ferry.dev/v1alpha1".into();
    default_pool["kind"] = "LoadBalancerPool".into();
    pools
        .patch(
            "default",
            &PatchParams::apply("ferry-sandbox").force(),
            &Patch::Apply(&default_pool),
        )
        .await
        .context("creating the default pool")?;

    let operator = if args.no_operator {
        None
    } else {
        let config = OperatorConfig::parse_args([
            "ferry-operator",
            "--provider",
            args.provider.as_str(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
            "--leader-elect-namespace",
            "ferry-system",
            "--node-debounce",
            "200ms",
        ])
        .map_err(|e| anyhow::anyhow!("operator flags: {e:?}"))?;
        let client = client_from(&cp.operator_kubeconfig).await?;
        Some(tokio::spawn(ferry_operator::run_with_client(
            config, client,
        )))
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut forwarders = Vec::new();
    if !args.no_forwarders {
        let client = client_from(&write_forwarder_kubeconfig(cp)?).await?;
        for node in &nodes {
            let config = ForwarderConfig::parse_args([
                "ferry-forwarder",
                "--node-name",
                &node.name,
                "--mode",
                "userspace",
                "--announce",
                "none",
                "--lease-namespace",
                "ferry-system",
                "--metrics-addr",
                "127.0.0.1:0",
                "--health-addr",
                "127.0.0.1:0",
            ])
            .map_err(|e| anyhow::anyhow!("forwarder flags: {e:?}"))?;
            forwarders.push(tokio::spawn(ferry_forwarder::run_with_client(
                config,
                client.clone(),
                stop_rx.clone(),
            )));
        }
    }

    let kubeconfig = match &args.kubeconfig {
        Some(path) => {
            std::fs::copy(&cp.admin_kubeconfig, path)?;
            path.clone()
        }
        None => cp.admin_kubeconfig.clone(),
    };
    let first = nodes.first().map(|n| n.ip.to_string()).unwrap_or_default();
    let last = nodes.last().map(|n| n.ip.to_string()).unwrap_or_default();
    say!("ferry sandbox is up");
    say!("  API server:  {}", cp.url);
    say!("  nodes:       {} ({first} .. {last})", nodes.len());
    say!("  pool:        default ({})", args.pool);
    if args.no_operator {
        say!(
            "  operator:    not started; run yours with KUBECONFIG={}",
            cp.operator_kubeconfig.display()
        );
    } else {
        say!("  operator:    running, log in {}", log_path.display());
    }
    if !args.no_forwarders {
        say!("  forwarders:  one per node (userspace), same log");
    }
    say!("kubeconfig: {}", kubeconfig.display());
    say!();
    say!("Try:");
    say!("  export KUBECONFIG={}", kubeconfig.display());
    say!("  kubectl apply -f examples/web.yaml");
    say!("  kubectl get svc web          # EXTERNAL-IP from the pool within a second");
    say!(
        "  curl http://$(kubectl get svc web -o jsonpath='{{.status.loadBalancer.ingress[0].ip}}')/   # through the forwarder"
    );
    say!(
        "  curl http://{first}:$(kubectl get svc web -o jsonpath='{{.spec.ports[0].nodePort}}')   # a node's NodePort"
    );
    say!("Ctrl-C (or SIGTERM) stops the sandbox and removes everything it created.");

    let mut stop = stop;
    let _ = stop.wait_for(|s| *s).await;
    eprintln!("ferry-sandbox: stopping");
    let _ = stop_tx.send(true);
    for f in forwarders {
        // Each withdraws and releases its heartbeat Lease.
        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
    }
    if let Some(op) = operator {
        // The operator saw the same Ctrl-C and releases its lease; give it a moment.
        let _ = tokio::time::timeout(Duration::from_secs(5), op).await;
    }
    Ok(())
}

/// The sandbox with a cloud provider: the cloud beside the control plane, the operator as a
/// child process with the cloud's flags and environment, no pool and no forwarders.
async fn run_cloud(
    args: &Args,
    cp: &ControlPlane,
    admin: &kube::Client,
    nodes: &[ferry_e2e::nodes::SimulatedNode],
    log_path: &std::path::Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cloud = Cloud::start(&args.provider, &cp.dir, admin, nodes).await?;
    let mut operator = None;
    if !args.no_operator {
        let program = std::env::current_exe()?;
        let flags = cloud.operator_args();
        let env = cloud.operator_env();
        let kubeconfig = cp.operator_kubeconfig.clone();
        let process = ProcessUnderTest::start("operator", log_path.to_path_buf(), move || {
            let mut cmd = std::process::Command::new(&program);
            cmd.arg(OPERATOR)
                .args(&flags)
                .args([
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--health-addr",
                    "127.0.0.1:0",
                    "--leader-elect-namespace",
                    "ferry-system",
                    "--node-debounce",
                    "200ms",
                ])
                .envs(env.clone())
                .env("KUBECONFIG", &kubeconfig);
            Ok(cmd)
        })?;
        // SIGTERM on the way out, so it releases its Lease.
        operator = Some(process.terminated_on_drop());
    }
    let kubeconfig = match &args.kubeconfig {
        Some(path) => {
            std::fs::copy(&cp.admin_kubeconfig, path)?;
            path.clone()
        }
        None => cp.admin_kubeconfig.clone(),
    };
    let first = nodes.first().map(|n| n.ip.to_string()).unwrap_or_default();
    say!("ferry sandbox is up (provider {})", args.provider);
    say!("  API server:  {}", cp.url);
    say!(
        "  nodes:       {}, each with an instance in the {} sandbox",
        nodes.len(),
        args.provider
    );
    if args.no_operator {
        say!(
            "  operator:    not started; run yours with KUBECONFIG={} {}",
            cp.operator_kubeconfig.display(),
            cloud.operator_args().join(" ")
        );
    } else {
        say!("  operator:    running, log in {}", log_path.display());
    }
    say!("kubeconfig: {}", kubeconfig.display());
    say!();
    say!("Try:");
    say!("  export KUBECONFIG={}", kubeconfig.display());
    say!("  kubectl apply -f examples/web.yaml");
    say!("  kubectl get svc web          # EXTERNAL-IP: the balancer the cloud made");
    say!(
        "  curl http://{first}:$(kubectl get svc web -o jsonpath='{{.spec.ports[0].nodePort}}')   # a node's NodePort"
    );
    say!("What ferry made in the cloud:");
    for line in cloud.inspect() {
        say!("{line}");
    }
    say!("Ctrl-C (or SIGTERM) stops the sandbox and removes everything it created.");
    let _ = stop.wait_for(|s| *s).await;
    eprintln!("ferry-sandbox: stopping");
    drop(operator);
    drop(cloud);
    Ok(())
}

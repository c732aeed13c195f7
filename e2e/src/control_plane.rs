//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from their Go
//! modules (see `tools`), started on free loopback ports with generated certificates, a
//! service-account signing key and RBAC authorization, the way controller-runtime's envtest
//! starts them. Three identities: an admin (`system:masters`), and the operator's and the
//! forwarders' service accounts, which have exactly the permissions of ferry's RBAC manifest.
//!
//! Processes get `PR_SET_PDEATHSIG`, so they die with the test process even when a test
//! panics or the binary is killed; the working directory is removed on drop, and stale ones
//! from killed runs are removed at the next start.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::{Client, ResourceExt};

use crate::{pki, repo_root, tools};

/// The operator's identity, bound by ferry's RBAC manifest.
pub const OPERATOR_USER: &str = "system:serviceaccount:ferry-system:ferry-operator";
/// The forwarders' identity, bound by the same manifest.
pub const FORWARDER_USER: &str = "system:serviceaccount:ferry-system:ferry-forwarder";

#[derive(Clone, Debug)]
pub struct Options {
    /// kube-apiserver compacts etcd this often; short values make stale watches get `410 Gone`.
    pub compaction_interval: Duration,
    /// `--max-requests-inflight` / `--max-mutating-requests-inflight`, with priority and
    /// fairness off so that overload is answered with `429` directly.
    pub max_inflight: Option<(u32, u32)>,
    /// With the watch cache off, watches are served by etcd itself, so compaction makes
    /// resuming from an old resourceVersion fail with `410 Gone`.
    pub watch_cache: bool,
    /// `--service-node-port-range`; the default fits 2768 Services with one port.
    pub node_port_range: Option<(u16, u16)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            compaction_interval: Duration::from_secs(300),
            max_inflight: None,
            watch_cache: true,
            node_port_range: None,
        }
    }
}

pub struct ControlPlane {
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    pub admin_kubeconfig: PathBuf,
    pub operator_kubeconfig: PathBuf,
    pub operator_token: String,
    /// The forwarders' token (use with `kubeconfig_via`).
    pub forwarder_token: String,
    ca_pem: String,
    etcd: Child,
    apiserver: Child,
}

/// A free TCP port on loopback for a server a test starts. It is below the kernel's
/// ephemeral range, so no outgoing connection takes it as its source port between this check
/// and the server's bind (which made etcd fail with "address already in use" in CI), below
/// Kubernetes' NodePort range (30000–32767, which tests listen on), and never the same twice
/// in one process, so tests running side by side do not pick one port.
pub fn free_port() -> std::io::Result<u16> {
    const LOW: u32 = 20_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let high = ephemeral_low().unwrap_or(32_768).min(30_000);
    if high <= LOW + 1_000 {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = high - LOW;
    // Test binaries run one after another; a start of their own keeps one binary from
    // walking into ports an earlier one's leftovers may still hold.
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos) % span
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(port) = u16::try_from(LOW + (start + n) % span) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port below the ephemeral range",
    ))
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_low() -> Option<u32> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Makes the child get SIGKILL when the thread that spawned it exits, so test processes never
/// outlive a failed or killed test run.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("flags.go")).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Removes working directories left behind by test processes that no longer exist.
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("ferry-e2e-")
            .and_then(|s| s.split('-').next())
        else {
            continue;
        };
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            if !alive {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the API is ready, ferry's CRDs are
    /// established and its RBAC is in place. Blocking; call from a thread that outlives the
    /// processes (they are killed when the spawning thread exits).
    pub fn start(options: &Options) -> anyhow::Result<ControlPlane> {
        let bin = tools::ensure_built()?;
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let dir = base.join(format!(
            "ferry-e2e-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_nanosecond()
        ));
        fs::create_dir_all(&dir)?;

        let pki = pki::generate().context("generating certificates")?;
        fs::write(dir.join("ca.crt"), &pki.ca_pem)?;
        fs::write(dir.join("apiserver.crt"), &pki.serving_cert_pem)?;
        fs::write(dir.join("apiserver.key"), &pki.serving_key_pem)?;
        fs::write(dir.join("sa.key"), &pki.service_account_key_pem)?;
        fs::write(dir.join("sa.pub"), &pki.service_account_public_pem)?;
        let admin_token = format!("admin-{}", jiff::Timestamp::now().as_nanosecond());
        let operator_token = format!("operator-{}", jiff::Timestamp::now().as_nanosecond());
        let forwarder_token = format!("forwarder-{}", jiff::Timestamp::now().as_nanosecond());
        let mut tokens = fs::File::create(dir.join("tokens.csv"))?;
        writeln!(
            tokens,
            "{admin_token},ferry-e2e-admin,admin,\"system:masters\""
        )?;
        writeln!(
            tokens,
            "{operator_token},{OPERATOR_USER},ferry-operator,\"system:serviceaccounts,system:serviceaccounts:ferry-system\""
        )?;
        writeln!(
            tokens,
            "{forwarder_token},{FORWARDER_USER},ferry-forwarder,\"system:serviceaccounts,system:serviceaccounts:ferry-system\""
        )?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args([
            "--name=default",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        let etcd = spawn(etcd, &dir.join("etcd.log"))?;

        let port = free_port()?;
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            &format!("--secure-port={port}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--cert-dir={}", dir.join("certs").display()),
            &format!("--tls-cert-file={}", dir.join("apiserver.crt").display()),
            &format!(
                "--tls-private-key-file={}",
                dir.join("apiserver.key").display()
            ),
            &format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ),
            &format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ),
            // Dual-stack, so IPv6 Services can exist (IPv4 stays the default family).
            "--service-cluster-ip-range=10.96.0.0/16,fd00:96::/112",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            &format!(
                "--etcd-compaction-interval={}s",
                options.compaction_interval.as_secs().max(1)
            ),
            "--v=1",
        ]);
        if let Some((first, last)) = options.node_port_range {
            apiserver.arg(format!("--service-node-port-range={first}-{last}"));
        }
        if !options.watch_cache {
            apiserver.arg("--watch-cache=false");
        }
        if let Some((reads, mutating)) = options.max_inflight {
            apiserver.args([
                "--enable-priority-and-fairness=false",
                &format!("--max-requests-inflight={reads}"),
                &format!("--max-mutating-requests-inflight={mutating}"),
            ]);
        }
        let apiserver = spawn(apiserver, &dir.join("kube-apiserver.log"))?;

        let url = format!("https://127.0.0.1:{port}");
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let operator_kubeconfig = dir.join("operator.kubeconfig");
        fs::write(
            &admin_kubeconfig,
            kubeconfig(&url, &pki.ca_pem, &admin_token, "admin"),
        )?;
        fs::write(
            &operator_kubeconfig,
            kubeconfig(&url, &pki.ca_pem, &operator_token, "ferry-operator"),
        )?;

        let mut cp = ControlPlane {
            dir,
            url,
            port,
            admin_kubeconfig,
            operator_kubeconfig,
            operator_token,
            forwarder_token,
            ca_pem: pki.ca_pem,
            etcd,
            apiserver,
        };
        cp.wait_ready(Duration::from_secs(90))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Installing is idempotent; a throttled control plane may refuse some attempts.
        let mut attempt = 0;
        loop {
            match rt.block_on(cp.install()) {
                Ok(()) => break,
                Err(err) if attempt < 100 => {
                    attempt += 1;
                    tracing::debug!(error = %format!("{err:#}"), "installing CRDs and RBAC; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => return Err(err),
            }
        }
        Ok(cp)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.apiserver.try_wait()? {
                bail!(
                    "kube-apiserver exited with {status}:\n{}",
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            if let Some(status) = self.etcd.try_wait()? {
                bail!(
                    "etcd exited with {status}:\n{}",
                    tail(&self.dir.join("etcd.log"))
                );
            }
            let ready = rt.block_on(async {
                let client = self.admin_client().await.ok()?;
                let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                client.request_text(req).await.ok()
            });
            if ready.as_deref() == Some("ok") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {timeout:?}:\n{}",
                    tail(&self.dir.join("kube-apiserver.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Installs ferry's CRDs and RBAC, waiting until the CRDs are established.
    async fn install(&self) -> anyhow::Result<()> {
        let client = self.admin_client().await?;
        let crds = fs::read_to_string(repo_root().join("crds").join(ferry_crds::CRDS_FILE))?;
        apply_manifest(&client, &crds).await?;
        let rbac = fs::read_to_string(repo_root().join("e2e").join("rbac.yaml"))?;
        apply_manifest(&client, &rbac).await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in ["loadbalancerpools.ferry.dev"] {
            loop {
                let crd = api.get(name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not established");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// A kubeconfig for `server` (the apiserver itself, or a fault proxy in front of it).
    pub fn kubeconfig_via(&self, server: &str, token: &str) -> String {
        kubeconfig(server, &self.ca_pem, token, "via")
    }

    pub async fn admin_client(&self) -> anyhow::Result<Client> {
        client_from(&self.admin_kubeconfig).await
    }

    pub async fn operator_client(&self) -> anyhow::Result<Client> {
        client_from(&self.operator_kubeconfig).await
    }
}

/// The API server stopped (SIGSTOP) until dropped (SIGCONT): it accepts connections and
/// answers nothing, as an overloaded or wedged API server does; watches fall silent.
pub struct Paused<'a> {
    cp: &'a ControlPlane,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.cp.signal(libc::SIGCONT);
    }
}

impl ControlPlane {
    /// Stops the API server until the returned guard is dropped.
    pub fn pause(&self) -> Paused<'_> {
        self.signal(libc::SIGSTOP);
        Paused { cp: self }
    }

    fn signal(&self, signal: i32) {
        let pid = self.apiserver.id() as i32;
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.etcd.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub async fn client_from(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig(server: &str, ca_pem: &str, token: &str, user: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ferry-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: ferry-e2e
  context:
    cluster: ferry-e2e
    user: {user}
    namespace: default
current-context: ferry-e2e
"
    )
}

/// `kubectl apply --server-side` for a multi-document YAML manifest.
pub async fn apply_manifest(client: &Client, yaml: &str) -> anyhow::Result<()> {
    let discovery = Discovery::new(client.clone()).run().await?;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(value)?;
        let Some(types) = obj.types.as_ref() else {
            bail!("manifest document without apiVersion/kind");
        };
        let gvk = kube::api::GroupVersionKind::try_from(types)?;
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .with_context(|| format!("unknown kind {gvk:?}"))?;
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let ns = obj.namespace().unwrap_or_else(|| "default".to_string());
            Api::namespaced_with(client.clone(), &ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("ferry-e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {} {}", gvk.kind, obj.name_any()))?;
    }
    Ok(())
}

use serde::Deserialize as _;

/// The control plane shared by every test in one test binary, started on first use.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    SHARED.get_or_init(|| start_in_keeper_thread(Options::default()))
}

/// Starts a control plane from a thread that lives as long as the process, so that the
/// processes' parent-death signal fires only when the test binary exits.
pub fn start_in_keeper_thread(options: Options) -> ControlPlane {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane-keeper".into())
        .spawn(move || {
            let _ = tx.send(ControlPlane::start(&options));
            loop {
                std::thread::park();
            }
        })
        .expect("spawning the control-plane keeper thread");
    match rx.recv() {
        Ok(Ok(cp)) => cp,
        Ok(Err(err)) => panic!("the test control plane did not start: {err:#}"),
        Err(_) => panic!("the control-plane keeper thread died"),
    }
}

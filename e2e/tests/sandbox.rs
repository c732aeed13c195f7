//! The sandbox as a user meets it: start it, then drive it with kubectl (a real client nobody
//! here wrote): apply a LoadBalancer Service, wait for its ingress, see the EXTERNAL-IP,
//! reach a NodePort, delete. Ctrl-C stops it and removes what it created.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::operator::binary;
use ferry_e2e::repo_root;

struct Sandbox {
    child: Child,
    kubeconfig: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sandbox() -> Sandbox {
    start_sandbox_with(&["--nodes", "2", "--pool", "127.241.0.0/28"])
}

fn start_sandbox_with(args: &[&str]) -> Sandbox {
    let mut child = Command::new(binary("ferry-sandbox").unwrap())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut kubeconfig = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(path) = line.strip_prefix("kubeconfig: ") {
            kubeconfig = Some(PathBuf::from(path.trim()));
            break;
        }
    }
    // Keep reading, so the sandbox never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    Sandbox {
        child,
        kubeconfig: kubeconfig.expect("the sandbox prints its kubeconfig"),
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The whole answer to `GET /`, or an empty string when nothing answers.
fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `--provider gce`: the operator, a child of the sandbox, provisions in the Compute Engine
/// fake, and kubectl sees the address it reserved there, as a VIP.
#[test]
fn the_gce_sandbox_gives_a_service_a_balancer_in_the_compute_engine_fake() {
    let mut sandbox = start_sandbox_with(&["--nodes", "2", "--provider", "gce"]);
    let kc = sandbox.kubeconfig.clone();
    let web = repo_root().join("examples").join("web.yaml");
    kubectl(&kc, &["apply", "-f", web.to_str().unwrap()]);
    kubectl(
        &kc,
        &[
            "wait",
            "--for=jsonpath={.status.loadBalancer.ingress[0].ipMode}=VIP",
            "svc/web",
            "--timeout=30s",
        ],
    );
    let ip = kubectl(
        &kc,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ],
    );
    assert!(
        ip.starts_with("203.0.113."),
        "an address from the fake: {ip}"
    );
    kubectl(
        &kc,
        &[
            "wait",
            "--for=condition=ferry.dev/LoadBalancerReady",
            "svc/web",
            "--timeout=10s",
        ],
    );
    kubectl(
        &kc,
        &["delete", "-f", web.to_str().unwrap(), "--timeout=30s"],
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(sandbox.child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = sandbox.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sandbox did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn kubectl_sees_an_external_ip_within_seconds() {
    let mut sandbox = start_sandbox();
    let kc = sandbox.kubeconfig.clone();
    let web = repo_root().join("examples").join("web.yaml");
    let started = Instant::now();
    kubectl(&kc, &["apply", "-f", web.to_str().unwrap()]);
    kubectl(
        &kc,
        &[
            "wait",
            "--for=jsonpath={.status.loadBalancer.ingress[0].ip}",
            "svc/web",
            "--timeout=20s",
        ],
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "ingress took {took:?}");

    let table = kubectl(&kc, &["get", "svc", "web"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "web");
    assert_eq!(row[1], "LoadBalancer");
    assert_eq!(
        row[3], "127.241.0.1",
        "EXTERNAL-IP from the sandbox pool, skipping .0:\n{table}"
    );

    let events = kubectl(
        &kc,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=web",
        ],
    );
    assert!(events.contains("EnsuredLoadBalancer"), "{events}");
    // Pool status is written shortly after allocations (debounced).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pools = kubectl(&kc, &["get", "lbpool"]);
        let row: Vec<&str> = pools
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        // NAME ADDRESSES AUTO-ASSIGN ALLOCATED AVAILABLE READY AGE
        if row.len() >= 7 && row[3] == "1" && row[4] == "14" && row[5] == "True" {
            break;
        }
        assert!(Instant::now() < deadline, "pool status not shown:\n{pools}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A simulated node answers on the Service's NodePort.
    let node_port = kubectl(
        &kc,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ],
    );
    let reply = http_get(&format!("127.0.1.2:{node_port}"));
    assert!(
        reply.contains("node=sandbox-node-2 service=default/web port=80"),
        "{reply}"
    );

    // The EXTERNAL-IP itself answers, through the VIP's owner, from one of the nodes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let reply = http_get("127.241.0.1:80");
        if reply.contains("service=default/web port=80") {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "EXTERNAL-IP does not answer: {reply}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reply.contains("node=sandbox-node-"), "{reply}");

    kubectl(
        &kc,
        &["delete", "-f", web.to_str().unwrap(), "--timeout=20s"],
    );
    let gone = kubectl(&kc, &["get", "svc", "-o", "name"]);
    assert!(!gone.contains("service/web"), "{gone}");

    // Ctrl-C: the sandbox exits cleanly and removes its folder.
    let dir = kc.parent().unwrap().to_path_buf();
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(sandbox.child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = sandbox.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sandbox did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

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

/// Sandboxes with forwarders take turns: their simulated nodes share the addresses
/// 127.0.1.x, and so the forwarders' peer heartbeat ports.
fn forwarders_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
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
    let _turn = forwarders_turn();
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

/// One UDP datagram to `addr` and its answer, or an empty string when none comes.
fn udp_ask(addr: &str) -> String {
    let Ok(s) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.send_to(b"who", addr).is_err() {
        return String::new();
    }
    let mut buf = [0u8; 512];
    match s.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
        Err(_) => String::new(),
    }
}

/// Waits until `check` holds, for at most 15 s.
fn within(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The upstream LoadBalancer e2e tests change a Service under a live balancer: the simulated
/// nodes follow each change as kube-proxy does. Without forwarders, nothing else writes the
/// Service between the changes, so each change alone must be enough.
#[test]
fn the_simulated_nodes_follow_every_service_change_and_sigterm_stops_the_sandbox() {
    let mut sandbox = start_sandbox_with(&[
        "--nodes",
        "2",
        "--pool",
        "127.242.0.0/28",
        "--no-forwarders",
    ]);
    let kc = sandbox.kubeconfig.clone();
    let dir = kc.parent().unwrap().to_path_buf();
    let manifest = dir.join("follow.yaml");
    let apply = |kind: &str, port: u16, node_port: Option<u16>, protocol: &str| {
        let node_port = node_port
            .map(|p| format!("\n      nodePort: {p}"))
            .unwrap_or_default();
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: follow\n  namespace: default\nspec:\n  type: {kind}\n  ports:\n    - name: p\n      port: {port}\n      protocol: {protocol}{node_port}\n"
            ),
        )
        .unwrap();
        kubectl(&kc, &["apply", "-f", manifest.to_str().unwrap()]);
    };
    let echo = |port: u16| format!("service=default/follow port={port}");

    apply("LoadBalancer", 80, Some(30180), "TCP");
    within("the NodePort answers", || {
        http_get("127.0.1.1:30180").contains(&echo(80))
    });
    // The Service's port changes, its NodePort stays: the node answers for the new port
    // (before, it stopped answering on the NodePort, and the EXTERNAL-IP accepted and closed
    // every connection).
    apply("LoadBalancer", 8080, Some(30180), "TCP");
    within("the NodePort answers for the new port", || {
        http_get("127.0.1.2:30180").contains(&echo(8080))
    });

    // The NodePort changes: the new one answers, the old one is closed.
    apply("LoadBalancer", 8080, Some(30181), "TCP");
    within("the new NodePort answers", || {
        http_get("127.0.1.1:30181").contains(&echo(8080))
    });
    within("the old NodePort closed", || {
        http_get("127.0.1.1:30180").is_empty()
    });

    // TCP becomes UDP on the same NodePort.
    apply("LoadBalancer", 8080, Some(30181), "UDP");
    within("the NodePort answers UDP", || {
        udp_ask("127.0.1.2:30181").contains(&echo(8080))
    });
    within("the NodePort no longer takes TCP", || {
        http_get("127.0.1.2:30181").is_empty()
    });

    // A ClusterIP Service has no NodePort; back to LoadBalancer, it has one again.
    apply("ClusterIP", 8080, None, "UDP");
    within("no NodePort for a ClusterIP Service", || {
        udp_ask("127.0.1.1:30181").is_empty()
    });
    apply("LoadBalancer", 80, Some(30182), "TCP");
    within("the NodePort of the LoadBalancer again", || {
        http_get("127.0.1.1:30182").contains(&echo(80))
    });

    kubectl(&kc, &["delete", "svc", "follow", "--timeout=20s"]);
    within("nothing on the NodePort of a deleted Service", || {
        http_get("127.0.1.1:30182").is_empty()
    });

    // SIGTERM, as a process manager stops it: a clean exit that removes its folder.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(sandbox.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = sandbox.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "sandbox did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// A user's program: answers every HTTP request on `listener` with `name`, until the test ends.
fn serve_program(listener: std::net::TcpListener, name: &'static str) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                name.len()
            );
        }
    });
}

/// The EXTERNAL-IP of `svc`, once it has one.
fn external_ip(kc: &Path, svc: &str) -> String {
    kubectl(
        kc,
        &[
            "wait",
            "--for=jsonpath={.status.loadBalancer.ingress[0].ip}",
            &format!("svc/{svc}"),
            "--timeout=20s",
        ],
    );
    kubectl(
        kc,
        &[
            "get",
            "svc",
            svc,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ],
    )
}

/// A user puts their own program behind a sandbox Service, both ways the README shows: a
/// Service without a selector and a hand-written EndpointSlice whose address is in 192.0.2.0/24
/// (the API refuses 127.0.0.0/8; the simulated nodes reach 192.0.2.N at 127.0.2.N), and a
/// Deployment exposed with kubectl whose Service names the program in one annotation. Both
/// answer through the EXTERNAL-IP.
#[test]
fn a_users_program_answers_through_the_external_ip() {
    let _turn = forwarders_turn();
    let sandbox = start_sandbox_with(&["--nodes", "2", "--pool", "127.243.0.0/28"]);
    let kc = sandbox.kubeconfig.clone();
    let dir = kc.parent().unwrap().to_path_buf();

    // Without a selector: the EndpointSlice is the user's.
    let sliced = std::net::TcpListener::bind("127.0.2.7:0").unwrap();
    let sliced_port = sliced.local_addr().unwrap().port();
    serve_program(sliced, "program behind an EndpointSlice");
    let manifest = dir.join("sliced.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: sliced\n  namespace: default\nspec:\n  type: LoadBalancer\n  ports:\n    - port: 80\n      targetPort: {sliced_port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: sliced-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: sliced\naddressType: IPv4\nports:\n  - port: {sliced_port}\n    protocol: TCP\nendpoints:\n  - addresses: [\"192.0.2.7\"]\n"
        ),
    )
    .unwrap();
    kubectl(&kc, &["apply", "-f", manifest.to_str().unwrap()]);

    // A Deployment (no pods run in the sandbox) exposed as usual, plus one annotation.
    let annotated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let annotated_port = annotated.local_addr().unwrap().port();
    serve_program(annotated, "program named by the annotation");
    kubectl(
        &kc,
        &["create", "deployment", "web", "--image=example.invalid/web"],
    );
    kubectl(
        &kc,
        &[
            "expose",
            "deployment",
            "web",
            "--type=LoadBalancer",
            "--port=80",
            &format!("--target-port={annotated_port}"),
        ],
    );
    kubectl(
        &kc,
        &[
            "annotate",
            "service",
            "web",
            &format!("ferry.dev/sandbox-backend=127.0.0.1:{annotated_port}"),
        ],
    );

    for (svc, answer) in [
        ("sliced", "program behind an EndpointSlice"),
        ("web", "program named by the annotation"),
    ] {
        let vip = external_ip(&kc, svc);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply = http_get(&format!("{vip}:80"));
            if reply.contains(answer) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{svc} at {vip}:80 does not reach the program: {reply:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
